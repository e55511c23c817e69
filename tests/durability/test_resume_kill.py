"""A real training script (examples/train.py) killed and rerun ends bit-identical."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt.storage.store import Store

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train.py"
STEPS = 30


def _cmd(store, digest, log, extra=()):
    return [
        sys.executable,
        str(SCRIPT),
        "--store",
        str(store),
        "--steps",
        str(STEPS),
        "--every",
        "4",
        "--digest",
        str(digest),
        "--log",
        str(log),
        *extra,
    ]


def _final_losses(log: Path) -> dict[int, str]:
    out = {}
    for line in log.read_text().splitlines():
        step, loss = line.split()
        out[int(step)] = loss  # a resumed run rewrites the steps after its checkpoint
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    subprocess.run(_cmd(d / "store", d / "digest.json", d / "log"), check=True, capture_output=True, timeout=120)
    return json.loads((d / "digest.json").read_text()), _final_losses(d / "log")


def _wait_for_progress(log: Path, proc, min_lines: int, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= min_lines:
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path, reference):
    rng = random.Random(int(os.environ.get("CKPT_TEST_SEED", "0")) or None)
    digest, log = tmp_path / "digest.json", tmp_path / "log"
    kills = 0
    for _ in range(8):
        proc = subprocess.Popen(
            _cmd(tmp_path / "store", digest, log, ["--sleep", "0.03"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        done_before = len(log.read_text().splitlines()) if log.exists() else 0
        _wait_for_progress(log, proc, done_before + rng.randint(1, 8))
        time.sleep(rng.uniform(0, 0.08))  # anywhere: mid-step, mid-save, mid-commit
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(60)
        if digest.exists():
            break
    if not digest.exists():
        subprocess.run(_cmd(tmp_path / "store", digest, log), check=True, capture_output=True, timeout=120)
    assert kills >= 2
    ref_digest, ref_losses = reference
    assert json.loads(digest.read_text()) == ref_digest
    assert _final_losses(log) == ref_losses


def test_sigterm_saves_and_exits_cleanly_then_resume_is_bit_identical(tmp_path, reference):
    digest, log = tmp_path / "digest.json", tmp_path / "log"
    proc = subprocess.Popen(
        _cmd(tmp_path / "store", digest, log, ["--sleep", "0.05"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_progress(log, proc, 6)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not digest.exists()  # it stopped early ...
    steps_done = len(log.read_text().splitlines())
    assert Store(str(tmp_path / "store")).latest_step() == steps_done  # ... right after saving its step
    assert "SIGTERM received" in err
    subprocess.run(_cmd(tmp_path / "store", digest, log), check=True, capture_output=True, timeout=120)
    ref_digest, ref_losses = reference
    assert json.loads(digest.read_text()) == ref_digest
    assert _final_losses(log) == ref_losses


def test_workers_resume_is_bit_identical(tmp_path):
    """With DataLoader workers, a SIGTERM'd run resumes to the same result as a straight one."""
    ref = tmp_path / "ref"
    ref.mkdir()
    subprocess.run(
        _cmd(ref / "store", ref / "d.json", ref / "log", ["--workers", "2"]),
        check=True,
        capture_output=True,
        timeout=180,
    )
    digest, log = tmp_path / "d.json", tmp_path / "log"
    proc = subprocess.Popen(
        _cmd(tmp_path / "store", digest, log, ["--workers", "2", "--sleep", "0.05"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _wait_for_progress(log, proc, 17)  # past the first epoch (13 batches)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    subprocess.run(
        _cmd(tmp_path / "store", digest, log, ["--workers", "2"]), check=True, capture_output=True, timeout=180
    )
    assert json.loads(digest.read_text()) == json.loads((ref / "d.json").read_text())
    assert _final_losses(log) == _final_losses(ref / "log")
