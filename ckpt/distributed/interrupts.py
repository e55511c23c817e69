"""Ctrl-C during a collective save or restore: reported to every rank at the next exchange.

A KeyboardInterrupt raised wherever a SIGINT happens to land in one rank's collective
protocol puts the ranks out of step: between the two collectives inside an
``all_gather_object`` the others receive garbage, and between two of ckpt's gathers they wait
for a message that never comes (until ``CKPT_DIST_TIMEOUT``), while a job that catches the
interrupt meets the wrong collective next. So while a protocol runs on the main thread (the
only one Python delivers signals to), :func:`deferred` notes the first SIGINT instead of
raising it:

- with Python's own SIGINT handler (which raises KeyboardInterrupt), the protocol's next
  gather sends it as this rank's failure (:func:`ckpt.distributed.exchange.gather_all`), so
  every rank raises there, as for any rank's failure, and nothing more is written; a gather
  after which a failure would be wrong (the one that tells the ranks the manifest is
  written: the step *is* committed) sends its value as usual;
- when the protocol ends, the previous handler runs: Python's raises the KeyboardInterrupt
  on this rank; a handler of the job's own (one that sets a flag to stop after the next
  checkpoint, say) runs then, and the protocol, which it may not want stopped, is not
  reported as failed.

A SIGINT arriving while one is noted, or while this rank already reports an interrupt, runs
the previous handler at once: this rank stops where it is (the user insists). When it leaves
the protocol in the middle so, while the other ranks go on with it, its exchanges are out of
step with theirs: its next ckpt call on that group raises instead of meeting the wrong
collective (:func:`ckpt.distributed.exchange.gather_all`). Nothing changes where SIGINT is
ignored or left to the system's default (the process dies; the others see a closed peer).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

log = logging.getLogger("ckpt")


class _Protocol:
    """One protocol's SIGINT handling on the main thread (installed by :func:`deferred`)."""

    def __init__(self, previous: Callable[[int, FrameType | None], Any]) -> None:
        #: the handler to restore, and to run for a noted interrupt
        self.previous = previous
        #: a noted SIGINT, run at the protocol's end (the frame it interrupted)
        self.pending = False
        self.frame: FrameType | None = None
        #: the rank already stops (it reports an interrupt, or the user insisted): the next
        #: SIGINT runs the previous handler at once
        self.stopping = False
        #: the protocol ended: a SIGINT reaching this handler (not restored yet, or restored
        #: too late) goes straight to the previous one
        self.closed = False
        #: a SIGINT ran the previous handler in the middle of the protocol (the user insisted)
        self.escaped = False
        #: the protocol's latest gather (:func:`ckpt.distributed.exchange.gather_all`), told
        #: when the rank leaves the protocol by an escaped SIGINT (``left()``)
        self.last_gather: Any = None
        #: what tells the others, where they wait in the protocol's first gather, that this
        #: rank left before it (:func:`entering`)
        self.left_early: Callable[[BaseException], None] | None = None

    def on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.closed:
            self.previous(signum, frame)
        elif self.pending or self.stopping:
            self.stopping = self.escaped = True  # the noted one still runs at the end, unless this raises
            self.previous(signum, frame)
        else:
            self.pending, self.frame = True, frame
            log.warning(
                "Ctrl-C during a collective checkpoint: %s; Ctrl-C again stops this rank at once",
                "every rank stops at the next exchange, so that they stay in step"
                if self.raises
                else "the job's SIGINT handler runs when it ends",
            )

    def run_pending(self) -> None:
        """Run the job's own handler for a noted SIGINT now (see :func:`run_pending`)."""
        if self.pending and not self.raises:
            self.pending = False
            self.previous(signal.SIGINT, self.frame)

    @property
    def raises(self) -> bool:
        """Whether the previous handler is Python's, which raises KeyboardInterrupt."""
        return self.previous is signal.default_int_handler


#: the protocol running on the main thread (None: none, or SIGINT is not deferred)
_current: _Protocol | None = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Defer SIGINT on the main thread for the duration of a collective protocol (see the
    module docstring); a decorator too. Nested uses, and uses on other threads, change nothing.

    Its end survives a SIGINT at any point of it: the protocol is marked ended first (two
    plain assignments, between which CPython runs no signal handler), after which its
    handler only forwards; a SIGINT that keeps it from being restored leaves a forwarder,
    which the next protocol looks through."""
    global _current
    if _current is not None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    while isinstance(getattr(previous, "__self__", None), _Protocol):  # one a SIGINT left installed
        previous = previous.__self__.previous  # type: ignore[union-attr]
    if not callable(previous):  # ignored, the system's default, or set outside Python
        yield
        return
    proto = _Protocol(previous)
    try:
        signal.signal(signal.SIGINT, proto.on_sigint)
    except ValueError:  # not the main interpreter
        yield
        return
    _current = proto
    stopped: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        stopped = exc
        raise
    finally:
        proto.closed = True
        _current = None
        try:
            if proto.escaped and stopped is not None:  # the rank left in the middle: were the others still in it?
                if proto.last_gather is not None:
                    proto.last_gather.left()
                elif proto.left_early is not None:  # they wait in the first gather
                    proto.left_early(stopped)
        finally:
            try:
                if signal.getsignal(signal.SIGINT) == proto.on_sigint:
                    signal.signal(signal.SIGINT, previous)
            finally:
                if proto.pending and (stopped is None or isinstance(stopped, Exception)):  # not when stopping already
                    proto.pending = False
                    previous(signal.SIGINT, proto.frame)


def _here() -> _Protocol | None:
    """The protocol running on this thread: only the main thread's is deferred."""
    return _current if threading.current_thread() is threading.main_thread() else None


def pending() -> bool:
    """Whether this thread's protocol holds a SIGINT not run yet."""
    proto = _here()
    return proto is not None and proto.pending


def stopping() -> None:
    """This rank reports an interrupt of its own (a KeyboardInterrupt caught by a protocol's
    site): a SIGINT from now to the protocol's end runs the previous handler at once."""
    if (proto := _here()) is not None:
        proto.stopping = True


def report() -> KeyboardInterrupt | None:
    """The interrupt this thread's protocol holds, to send as this rank's failure (it is
    still raised at the protocol's end); None when there is none, or when the job's own
    handler is to decide what a Ctrl-C does."""
    proto = _here()
    if proto is None or not proto.pending or not proto.raises:
        return None
    return KeyboardInterrupt("Ctrl-C")


def gathered(record: Any) -> None:
    """The protocol running on this thread reached a gather (``record``: see ``last_gather``)."""
    if (proto := _here()) is not None:
        proto.last_gather = record


def entering(left_early: Callable[[BaseException], None]) -> None:
    """How the protocol running on this thread tells the others that this rank left it before
    its first gather (:func:`ckpt.distributed.exchange.entering`). The outermost protocol's
    call counts."""
    proto = _here()
    if proto is not None and proto.left_early is None:
        proto.left_early = left_early


def run_pending() -> None:
    """Run the job's own SIGINT handler now for a SIGINT the protocol noted, at a site whose
    failure reaches every rank (a constructor's last agreement: raised at its end, on one rank
    only, it would leave the others holding what this rank dropped). Python's own handler is
    left to :func:`report`."""
    if (proto := _here()) is not None:
        proto.run_pending()
