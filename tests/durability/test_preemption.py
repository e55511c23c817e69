"""Preemption as schedulers send it: SIGTERM to the whole process group, then a deadline.

Slurm (``scancel``, preemption) and Kubernetes signal every process of the job, the
DataLoader's workers included, then SIGKILL after a grace period. The run must save the
step it reached, commit and exit 0; and if that cannot happen in time, exit at
``CKPT_PREEMPT_DEADLINE_SECONDS`` with the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from _trainrun import ROOT, cmd, final_losses, reference, run, wait_for_progress

import ckpt
from ckpt.storage.store import Store


def _group_gone(pgid: int, timeout: float = 15) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("extra", [["--workers", "2"], ["--workers", "2", "--persistent", "--augment"]])
def test_sigterm_to_the_process_group_saves_commits_and_exits_0(tmp_path, extra):
    ref_digest, ref_losses = reference(tmp_path / "ref", extra)
    store, digest, log = tmp_path / "store", tmp_path / "digest.json", tmp_path / "log"
    proc = subprocess.Popen(
        cmd(store, digest, log, [*extra, "--sleep", "0.05"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a batch job has
    )
    try:
        wait_for_progress(log, proc, 17)  # inside the second epoch
        os.killpg(proc.pid, signal.SIGTERM)  # the main process and its workers alike
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM received" in err and "killed by signal" not in err
    assert _group_gone(proc.pid), "DataLoader workers outlived the preempted run"
    assert not digest.exists()  # it stopped early ...
    steps_done = len(log.read_text().splitlines())
    assert Store(str(store)).latest_step() == steps_done  # ... right after committing its step
    run(store, digest, log, extra)
    assert json.loads(digest.read_text()) == ref_digest
    assert final_losses(log) == ref_losses


# Runs examples/train.py on ``faulty://`` over local files; the store becomes very slow
# (each call pauses up to 30 s) the moment SIGTERM arrives, so the preemption's save
# cannot commit before the deadline.
LAUNCHER = """
import json, signal, sys
sys.path[:0] = [{tests!r}, {examples!r}]
import fsspec, faultfs, train
OPTIONS = {{"target_protocol": "file", "target_options": {{"auto_mkdir": True}}, "seed": 12}}
def slow_down(signum, frame):
    fsspec.filesystem("faulty", **OPTIONS).delay = 30.0
signal.signal(signal.SIGTERM, slow_down)  # the Checkpointer's handler calls this one too
sys.exit(train.main(sys.argv[1:] + ["--storage-options", json.dumps(OPTIONS)]))
"""


def test_deadline_exits_with_the_previous_checkpoint_intact(tmp_path):
    ref_digest, ref_losses = reference(tmp_path / "ref")
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(tests=str(ROOT / "tests"), examples=str(ROOT / "examples")))
    path, digest, log = tmp_path / "store", tmp_path / "digest.json", tmp_path / "log"
    argv = cmd(f"faulty://{path}", digest, log, ["--sleep", "0.05"])
    argv[1] = str(launcher)
    env = dict(os.environ, CKPT_PREEMPT_DEADLINE_SECONDS="0.5")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 90
        while (Store(str(path)).latest_step() or 0) < 8 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        before = Store(str(path)).latest_step()
        assert before is not None and before >= 8
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "is not committed" in err
    assert took < 10  # the deadline, not the 30 s pauses of the save in flight
    steps_done = len(log.read_text().splitlines())
    latest = Store(str(path)).latest_step()
    assert latest is not None and before <= latest < steps_done  # the save in flight was abandoned
    assert ckpt.load(str(path))["model"]  # the previous checkpoint loads
    run(path, digest, log)  # and the run resumes from it (over the dead writer's lease)
    assert json.loads(digest.read_text()) == ref_digest
    assert final_losses(log) == ref_losses


def test_deadline_knob_and_argument(monkeypatch):
    monkeypatch.delenv("CKPT_PREEMPT_DEADLINE_SECONDS", raising=False)
    with ckpt.Checkpointer("memory://preempt-knob") as ck:
        assert ck.preempt_deadline == 25.0
    monkeypatch.setenv("CKPT_PREEMPT_DEADLINE_SECONDS", "7.5")
    with ckpt.Checkpointer("memory://preempt-env") as ck:
        assert ck.preempt_deadline == 7.5
    with ckpt.Checkpointer("memory://preempt-arg", preempt_deadline=5) as ck:
        assert ck.preempt_deadline == 5
