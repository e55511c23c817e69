"""A Lightning run killed with SIGKILL part-way and resumed with ``trainer.fit(model, ckpt_path="last")``
ends bit-identical to the uninterrupted run: model, AdamW state, StepLR state, the loss of
every step, and torch's RNG (dropout on, shuffled data).

Each test runs train_script.py as real subprocesses: killed at a step, then resumed; the
uninterrupted run of each loader kind runs once per session, alongside the first of them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning_helpers import finish, kill_when, start_script

import ckpt
from ckpt.testing import assert_same_state
from ckpt_lightning.paths import MARKER_NAME


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    """``reference(loader)``: the uninterrupted run's result, computed once per loader kind.
    (Checkpoints change nothing in a run: one uninterrupted run serves every test.)"""
    started: dict[str, tuple[subprocess.Popen[str], Path]] = {}
    done: dict[str, dict[str, Any]] = {}

    def start(loader: str) -> None:
        if loader not in started:
            d = tmp_path_factory.mktemp(f"reference-{loader}")
            args = ["--store", f"file://{d}/store", "--dir", str(d / "ck"), "--out", str(d / "out.pt")]
            started[loader] = (start_script(*args, "--loader", loader), d / "out.pt")

    def result(loader: str) -> dict[str, Any]:
        if loader not in done:
            start(loader)
            proc, out = started[loader]
            finish(proc)
            done[loader] = _result(out)
        return done[loader]

    result.start = start  # type: ignore[attr-defined]
    return result


def kill_and_resume(tmp_path: Path, *, hang_at: int, committed: int | None, extra: list[str]) -> tuple[dict, int]:
    """The killed-and-resumed run's result and the step the resume started from."""
    url = f"file://{tmp_path}/run"
    args = ["--store", url, "--dir", str(tmp_path / "ck"), "--out", str(tmp_path / "run.pt"), *extra]
    marker = tmp_path / "ck" / MARKER_NAME  # written right after a directory's first commit
    killed = start_script(*args, hang_at=hang_at)
    if committed is None:  # killed at once: the save of the step before may still be in flight
        kill_when(killed, lambda: True)
    else:
        kill_when(killed, lambda: ckpt.latest_step(url) == committed and marker.exists())
    # without the marker, ckpt_path="last" finds nothing and Lightning starts over
    resumed_from = (ckpt.latest_step(url) or 0) if marker.exists() else 0
    finish(start_script(*args, "--resume"))
    return _result(tmp_path / "run.pt"), resumed_from


def _result(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def assert_identical(ref: dict[str, Any], run: dict[str, Any], resumed_from: int) -> None:
    assert run["global_step"] == ref["global_step"]
    # the resumed process ran exactly the steps after the checkpoint, with the same losses
    assert sorted(run["losses"]) == list(range(resumed_from + 1, ref["global_step"] + 1))
    assert {s: ref["losses"][s] for s in run["losses"]} == run["losses"]
    assert_same_state(run["model"], ref["model"])
    assert_same_state(run["optimizer"], ref["optimizer"])
    assert_same_state(run["scheduler"], ref["scheduler"])
    assert torch.equal(run["rng"], ref["rng"])


def test_killed_mid_epoch_resumes_bit_identical(tmp_path, reference):
    """5 steps an epoch, a checkpoint every 3: resumed from step 6, the first of epoch 1
    (a StatefulDataLoader gives Lightning the position within the epoch)."""
    reference.start("stateful")  # runs alongside
    run, start = kill_and_resume(tmp_path, hang_at=7, committed=6, extra=["--every", "3"])
    assert start == 6
    assert_identical(reference("stateful"), run, start)


@pytest.mark.slow
def test_killed_with_a_save_in_flight_resumes_bit_identical(tmp_path, reference):
    """Killed as soon as step 7 ended: the checkpoint of step 6 may be committed or not."""
    reference.start("stateful")
    run, start = kill_and_resume(tmp_path, hang_at=7, committed=None, extra=["--every", "3", "--top-k", "1"])
    assert start in (0, 3, 6)
    assert_identical(reference("stateful"), run, start)


def test_killed_after_an_epoch_end_checkpoint_resumes_bit_identical_with_a_plain_loader(tmp_path, reference):
    """A checkpoint at the last step of each epoch: a plain shuffled DataLoader draws the next
    epoch's order from the restored RNG, as the uninterrupted run did."""
    reference.start("plain")
    run, start = kill_and_resume(tmp_path, hang_at=7, committed=5, extra=["--every", "5", "--loader", "plain"])
    assert start == 5
    assert_identical(reference("plain"), run, start)
