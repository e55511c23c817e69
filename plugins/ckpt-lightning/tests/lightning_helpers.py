"""Helpers of ckpt-lightning's tests (a module of its own: several plugins' tests have a conftest)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).with_name("train_script.py")

# Lightning's own advice (no workers, no logger) is noise in these tiny runs.
warnings.filterwarnings("ignore", module="lightning")


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPT.parent), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start_script(*args: str, hang_at: int | None = None) -> subprocess.Popen[str]:
    argv = [sys.executable, str(SCRIPT), *args]
    if hang_at is not None:
        argv += ["--hang-at", str(hang_at)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env())


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"training script failed ({proc.returncode}):\n{err[-4000:]}"
    return out


def kill_when(proc: subprocess.Popen[str], ready: Any, timeout: float = 120) -> None:
    """Read the script's output until it hangs, wait until ``ready()``, then SIGKILL it."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if line.startswith("HANG"):
            break
    else:
        _, err = proc.communicate()
        raise AssertionError(f"the script ended before hanging:\n{err[-4000:]}")
    while not ready():
        assert time.monotonic() < deadline, "the checkpoint never committed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
