"""Runs examples/train.py as a real subprocess, for the kill/preemption/resume tests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train.py"
STEPS = 30
PER_EPOCH = 13  # 200 samples in batches of 16


def cmd(store, digest, log, extra=(), steps=STEPS, script=SCRIPT):
    return [
        sys.executable,
        str(script),
        "--store",
        str(store),
        "--steps",
        str(steps),
        "--every",
        "4",
        "--digest",
        str(digest),
        "--log",
        str(log),
        *extra,
    ]


def final_losses(log: Path) -> dict[int, str]:
    out = {}
    for line in log.read_text().splitlines():
        step, loss = line.split()
        out[int(step)] = loss  # a resumed run rewrites the steps after its checkpoint
    return out


def run(store, digest, log, extra=(), timeout=120) -> None:
    proc = subprocess.run(cmd(store, digest, log, extra), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def reference(d: Path, extra=()) -> tuple[dict, dict[int, str]]:
    """An uninterrupted run's final fingerprint and per-step losses."""
    run(d / "store", d / "digest.json", d / "log", extra)
    return json.loads((d / "digest.json").read_text()), final_losses(d / "log")


def wait_for_progress(log: Path, proc, min_lines: int, timeout=90, *, finished_ok: bool = False) -> None:
    """Wait until ``log`` has ``min_lines`` lines; ``finished_ok``: a run that completes first
    (exit 0) is fine too (a random kill point past the end of training)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= min_lines:
            return
        time.sleep(0.01)
    if finished_ok and proc.poll() == 0:
        return
    raise AssertionError(f"training made no progress to {min_lines} steps (exit {proc.poll()})")
