"""A run with a local tier killed (SIGKILL) or preempted (SIGTERM) in a real subprocess."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import ckpt

SCRIPT = Path(__file__).resolve().parent / "_tierrun.py"


def _cmd(durable, local, log, *extra):
    return [sys.executable, str(SCRIPT), str(durable), str(local), "--log", str(log), *extra]


def _wait_steps(log: Path, proc, n: int, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().split()) >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"no progress to step {n} (exit {proc.poll()})")


def test_sigkill_local_newest_wins_and_durable_holds_the_last_persisted(tmp_path):
    durable, local, log = tmp_path / "durable", tmp_path / "local", tmp_path / "log"
    proc = subprocess.Popen(
        _cmd(durable, local, log, "--sleep", "0.05", "--persist-every", "3"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_steps(log, proc, 7)
    deadline = time.time() + 60
    while not ckpt.steps(str(durable)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)  # a persist has landed (the machine may be slow): kill it from here on
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    newest_local = ckpt.latest_step(str(local))
    persisted = ckpt.latest_step(str(durable))
    assert newest_local is not None and newest_local >= 6
    assert persisted is not None and persisted % 3 == 0 and persisted <= newest_local
    # a fresh process resumes from the local tier's newest, then persists it on the way out
    out = subprocess.run(
        _cmd(durable, local, log, "--steps", str(newest_local + 1), "--persist-every", "3"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"START {newest_local}" in out.stdout
    assert f"restored step {newest_local} from the local tier" in out.stderr
    assert ckpt.latest_step(str(durable)) == newest_local + 1


def test_sigterm_persists_before_exit(tmp_path):
    durable, local, log = tmp_path / "durable", tmp_path / "local", tmp_path / "log"
    proc = subprocess.Popen(
        _cmd(durable, local, log, "--sleep", "0.05", "--persist-every", "1000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_steps(log, proc, 5)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    done = int(log.read_text().split()[-1])
    assert "SIGTERM received" in err
    # the step the preemption saved (the next one) is on both tiers
    assert ckpt.latest_step(str(local)) == ckpt.latest_step(str(durable)) >= done
    assert "persisted step" in err
