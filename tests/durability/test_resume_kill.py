"""A real training script (examples/train.py) killed and rerun ends bit-identical.

Loader setups (workers, persistent workers, StatefulDataLoader, augmentation) and SIGTERM to
the whole process group are in test_loader_resume.py and test_preemption.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest
from _trainrun import cmd, final_losses, wait_for_progress

from ckpt.storage.store import Store


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    subprocess.run(cmd(d / "store", d / "digest.json", d / "log"), check=True, capture_output=True, timeout=120)
    return json.loads((d / "digest.json").read_text()), final_losses(d / "log")


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path, reference):
    rng = random.Random(int(os.environ.get("CKPT_TEST_SEED", "0")) or None)
    digest, log = tmp_path / "digest.json", tmp_path / "log"
    kills = 0
    for _ in range(8):
        proc = subprocess.Popen(
            cmd(tmp_path / "store", digest, log, ["--sleep", "0.03"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        done_before = len(log.read_text().splitlines()) if log.exists() else 0
        # a resumed run redoes the steps after its checkpoint, so it may finish before that many lines
        wait_for_progress(log, proc, done_before + rng.randint(1, 8), finished_ok=True)
        time.sleep(rng.uniform(0, 0.08))  # anywhere: mid-step, mid-save, mid-commit
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(60)
        if digest.exists():
            break
    if not digest.exists():
        subprocess.run(cmd(tmp_path / "store", digest, log), check=True, capture_output=True, timeout=120)
    assert kills >= 2
    ref_digest, ref_losses = reference
    assert json.loads(digest.read_text()) == ref_digest
    assert final_losses(log) == ref_losses


def test_sigterm_saves_and_exits_cleanly_then_resume_is_bit_identical(tmp_path, reference):
    digest, log = tmp_path / "digest.json", tmp_path / "log"
    proc = subprocess.Popen(
        cmd(tmp_path / "store", digest, log, ["--sleep", "0.05"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_progress(log, proc, 6)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not digest.exists()  # it stopped early ...
    steps_done = len(log.read_text().splitlines())
    assert Store(str(tmp_path / "store")).latest_step() == steps_done  # ... right after saving its step
    assert "SIGTERM received" in err
    subprocess.run(cmd(tmp_path / "store", digest, log), check=True, capture_output=True, timeout=120)
    ref_digest, ref_losses = reference
    assert json.loads(digest.read_text()) == ref_digest
    assert final_losses(log) == ref_losses
