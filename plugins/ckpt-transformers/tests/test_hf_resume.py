"""A CkptTrainer run killed with SIGKILL part-way and resumed with the Trainer's own idiom,
``trainer.train(resume_from_checkpoint=True)``, finishes bit-identical to an uninterrupted
run: weights, AdamW moments, schedule, every step's loss and the RNG state at the end.

The runs are real subprocesses of ``hf_gpt2_run.py`` (tiny GPT-2, dropout on, shuffled
data, two epochs of 12 steps, a save every 4 steps).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt.testing import assert_same_state

SCRIPT = Path(__file__).with_name("hf_gpt2_run.py")
TOTAL_STEPS = 24


class Run:
    """One training subprocess; its output is collected line by line."""

    def __init__(self, out_dir: Path, store: str, *extra: str) -> None:
        self.out_dir = out_dir
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(out_dir), "--store", store, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=SCRIPT.parent,
        )
        self.lines: list[str] = []
        self._final: dict | None = None
        self._watchdog = threading.Timer(240, self.proc.kill)  # a hung run fails, never blocks the suite
        self._watchdog.start()

    def wait_for(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"the run ended without printing {prefix!r}:\n{self.output()}")

    def finish(self) -> int:
        out, _ = self.proc.communicate()
        self.lines.append(out)
        self._watchdog.cancel()
        return self.proc.returncode

    def output(self) -> str:
        return "".join(self.lines)[-4000:]

    def final(self) -> dict:
        if self._final is None:
            code = self.finish()
            assert code == 0, f"run exited {code}:\n{self.output()}"
            self._final = torch.load(self.out_dir / "final.pt", weights_only=True)
        return self._final


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run; it trains while the first test's run is being killed."""
    root = tmp_path_factory.mktemp("reference")
    run = Run(root / "out", f"file://{root}/store")
    yield run
    if run.proc.poll() is None:
        run.proc.kill()
        run.finish()


def assert_resumed_identically(resumed: dict, reference: dict) -> None:
    for key in ("model", "optimizer", "scheduler", "losses", "global_step", "torch_rng"):
        assert_same_state(resumed[key], reference[key], key)
    assert reference["global_step"] == TOTAL_STEPS and len(reference["losses"]) == TOTAL_STEPS


@pytest.mark.parametrize(
    "how",
    [
        # SIGKILL right after the save of step 8 was taken: it is still being written, so
        # the newest committed checkpoint is 4 (or 8 if it won the race).
        "kill-with-a-save-in-flight",
        # SIGKILL from outside while it sleeps after step 14, once the save of 12 committed:
        # resumes from 12, the end of epoch 0, where the Trainer applies the RNG states
        # before the epoch's data iterator.
        "kill-after-an-epoch-boundary",
    ],
)
def test_killed_run_resumes_bit_identical(how, tmp_path, reference):
    store = f"file://{tmp_path}/store"
    if how == "kill-with-a-save-in-flight":
        killed = Run(tmp_path / "out", store, "--kill-in-save", "8")
        expect_from = {4, 8}
    else:
        killed = Run(tmp_path / "out", store, "--pause-at", "14")
        killed.wait_for("paused 14")
        deadline = time.monotonic() + 120
        while 12 not in ckpt.steps(store):  # the save of 12 commits in the background while it sleeps
            assert time.monotonic() < deadline, f"step 12 never committed: {ckpt.steps(store)}"
            time.sleep(0.05)
        killed.proc.send_signal(signal.SIGKILL)
        expect_from = {12}
    assert killed.finish() == -signal.SIGKILL, killed.output()
    assert not (tmp_path / "out" / "final.pt").exists()
    committed = ckpt.steps(store)
    assert committed and max(committed) in expect_from, committed

    resumed = Run(tmp_path / "out", store, "--resume")
    final = resumed.final()
    assert final["restored"] == max(committed)
    done = json.loads(resumed.output().strip().splitlines()[-1])
    assert done == {"done": TOTAL_STEPS, "restored": max(committed)}
    assert_resumed_identically(final, reference.final())
    assert ckpt.steps(store) == sorted({*committed, *range(4, TOTAL_STEPS + 1, 4)})
