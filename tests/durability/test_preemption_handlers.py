"""The preemption handlers of ``Checkpointer.resume`` in one process: the step a signal
reaches is saved and the run exits with ``preempt_exit_code`` (set at construction or
after), and the handlers ``resume`` replaced are back once it returns or raises."""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest
import torch

import ckpt

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _handlers():
    return {s: signal.getsignal(s) for s in SIGNALS}


@pytest.fixture
def own_handlers():
    """A Python handler of each signal before resume (recorded calls), put back afterwards."""
    before = _handlers()
    got: list[int] = []
    mine = lambda num, frame: got.append(num)  # noqa: E731
    for s in SIGNALS:
        signal.signal(s, mine)
    try:
        yield mine, got
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@pytest.mark.parametrize("signum", SIGNALS)
@pytest.mark.parametrize("set_after", [False, True])
def test_a_signal_saves_the_step_and_exits_with_the_code(tmp_path, own_handlers, signum, set_after):
    mine, got = own_handlers
    url = str(tmp_path / "run")
    model = torch.nn.Linear(3, 3)
    ck = ckpt.Checkpointer(url, preempt_deadline=0, **({} if set_after else {"preempt_exit_code": 7}))
    if set_after:
        ck.preempt_exit_code = 7
    inside: list[object] = []

    @ck.resume(model=model)
    def train(start):
        inside.append(_handlers())
        for n in range(start + 1, 10):
            if n == 4:
                os.kill(os.getpid(), signum)
            ck.step(n)

    with pytest.raises(SystemExit) as exc:
        train()
    assert exc.value.code == 7
    assert ckpt.latest_step(url) == 4
    assert got == [signum]  # the handler it replaced was called too
    assert all(h is not mine for h in inside[0].values())
    assert _handlers() == {s: mine for s in SIGNALS}  # given back


def test_handlers_given_back_when_resume_returns_or_raises(tmp_path, own_handlers):
    mine, _ = own_handlers
    model = torch.nn.Linear(2, 2)
    with ckpt.Checkpointer(str(tmp_path / "a"), preempt_deadline=0) as ck:

        @ck.resume(model=model)
        def ok(start):
            ck.step(1)
            return "done"

        assert ok() == "done"
    assert _handlers() == {s: mine for s in SIGNALS}
    ck2 = ckpt.Checkpointer(str(tmp_path / "b"), preempt_deadline=0)

    @ck2.resume(model=model)
    def boom(start):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        boom()
    assert _handlers() == {s: mine for s in SIGNALS}


def test_resume_outside_the_main_thread_handles_no_signal(tmp_path, own_handlers, caplog):
    mine, _ = own_handlers
    model = torch.nn.Linear(2, 2)
    ck = ckpt.Checkpointer(str(tmp_path / "t"), preempt_deadline=0)
    seen: list[object] = []

    @ck.resume(model=model)
    def train(start):
        seen.append(_handlers())
        ck.step(1)

    caplog.set_level(logging.WARNING, logger="ckpt")
    t = threading.Thread(target=train)
    t.start()
    t.join(30)
    assert seen == [{s: mine for s in SIGNALS}] and _handlers() == {s: mine for s in SIGNALS}
    assert "outside the main thread" in caplog.text
    assert ckpt.latest_step(str(tmp_path / "t")) == 1


HUNG_SHUTDOWN = """
import os, signal, sys, threading
sys.path[:0] = {path!r}
import torch, ckpt
threading.Thread(target=threading.Event().wait).start()  # holds the interpreter's exit up
ck = ckpt.Checkpointer({url!r}, preempt_deadline=60)
ck.preempt_deadline = 0.5  # set after construction
ck.preempt_exit_code = 5

@ck.resume(model=torch.nn.Linear(2, 2))
def train(start):
    for n in range(1, 100):
        if n == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        ck.step(n)

train()
"""


def test_a_shutdown_hung_after_the_committed_save_exits_with_the_code_at_the_deadline(tmp_path):
    import subprocess
    import sys
    import time

    url = str(tmp_path / "run")
    script = HUNG_SHUTDOWN.format(path=[p for p in sys.path if p], url=url)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert "did not exit within 0.5s after its save" in proc.stderr
    assert time.monotonic() - start < 30
    assert ckpt.latest_step(url) == 3


def test_handlers_given_back_after_a_resume_called_again_inside_itself(tmp_path, own_handlers):
    # the decorated function called again from inside itself (its own resume nested): each
    # level gives back the handlers it replaced, so none of ckpt's is left once both return
    mine, _ = own_handlers
    ck = ckpt.Checkpointer(str(tmp_path / "r"), preempt_deadline=0)
    depth: list[int] = []

    @ck.resume(model=torch.nn.Linear(2, 2))
    def train(start):
        depth.append(start)
        if len(depth) == 1:
            train()
        ck.step(1)

    train()
    assert len(depth) == 2
    assert _handlers() == {s: mine for s in SIGNALS}
