"""SIGINT deferred during a collective protocol (``ckpt.distributed.interrupts``), in one
process with real signals: what the ranks see is tested with real ranks in test_collective."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from ckpt.distributed import interrupts


def sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def test_a_noted_sigint_is_raised_when_the_protocol_ends_and_the_handler_is_back():
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        sigint()
        assert interrupts.pending()
        assert isinstance(interrupts.report(), KeyboardInterrupt)  # what the next gather sends
        with interrupts.deferred():  # nested: changes nothing
            pass
        assert interrupts.pending()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert interrupts._current is None and not interrupts.pending()


def test_a_second_sigint_raises_at_once_and_the_end_raises_no_other():
    raised = []
    with pytest.raises(KeyboardInterrupt) as caught, interrupts.deferred():
        sigint()
        try:
            sigint()
        except KeyboardInterrupt as exc:
            raised.append(exc)
            raise
    assert len(raised) == 1 and caught.value is raised[0]  # the end raised no other in its place
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_jobs_own_handler_is_run_once_at_the_end_and_not_reported():
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with interrupts.deferred():
            sigint()
            assert interrupts.pending() and interrupts.report() is None  # the protocol is not failed for it
            assert calls == []
        assert calls == [signal.SIGINT]
        with interrupts.deferred():  # twice: at once for the second, at the end for the first
            sigint()
            sigint()
            assert calls == [signal.SIGINT] * 2
        assert calls == [signal.SIGINT] * 3
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ignored_sigint_and_other_threads_are_left_alone():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts.deferred():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            sigint()  # ignored
            assert not interrupts.pending()
    finally:
        signal.signal(signal.SIGINT, previous)
    seen = []

    def other() -> None:
        with interrupts.deferred():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == [signal.default_int_handler] and interrupts._current is None


def test_a_sigint_while_the_protocol_ends_leaves_nothing_behind(monkeypatch):
    """The user's Ctrl-C landing just as the handler is put back (helper-48 F5): the
    interrupt is raised, and the next protocol defers again."""
    real = signal.signal

    class Shim:
        def __getattr__(self, name):
            return getattr(signal, name)

        def signal(self, signum, handler):
            out = real(signum, handler)
            if handler is signal.default_int_handler:  # the restore
                sigint()
            return out

    monkeypatch.setattr(interrupts, "signal", Shim())
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        sigint()  # noted; the restore then gets another: one KeyboardInterrupt
    monkeypatch.setattr(interrupts, "signal", signal)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        sigint()
        assert interrupts.pending()  # deferred again
    assert not interrupts.pending()
    # a handler of a protocol that ended only forwards, should it still be installed
    proto = interrupts._Protocol(signal.default_int_handler)
    proto.closed = True
    with pytest.raises(KeyboardInterrupt):
        proto.on_sigint(signal.SIGINT, None)
    assert not proto.pending


def test_a_forwarder_left_installed_is_looked_through():
    """A SIGINT storm can keep an ended protocol's handler from being restored (helper-49
    G8): it only forwards, and the next protocol defers as with Python's own handler."""
    ended = interrupts._Protocol(signal.default_int_handler)
    ended.closed = True
    previous = signal.signal(signal.SIGINT, ended.on_sigint)
    try:
        with pytest.raises(KeyboardInterrupt), interrupts.deferred():
            sigint()
            assert isinstance(interrupts.report(), KeyboardInterrupt)  # reported: Python's handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_jobs_own_handler_can_be_run_at_a_site():
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with interrupts.deferred():
            sigint()
            interrupts.run_pending()  # a constructor's last agreement
            assert calls == [signal.SIGINT] and not interrupts.pending()
        assert calls == [signal.SIGINT]  # not again at the end
    finally:
        signal.signal(signal.SIGINT, previous)
