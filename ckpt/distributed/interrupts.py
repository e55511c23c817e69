"""Ctrl-C during a collective save or restore: reported to every rank at the next exchange.

A KeyboardInterrupt raised wherever a SIGINT happens to land in one rank's collective
protocol puts the ranks out of step: between the two collectives inside an
``all_gather_object`` the others receive garbage, and between two of ckpt's gathers they wait
for a message that never comes (until ``CKPT_DIST_TIMEOUT``), while a job that catches the
interrupt meets the wrong collective next. So while a protocol runs on the main thread (the
only one Python delivers signals to), :func:`deferred` notes the first SIGINT instead of
raising it:

- the protocol's next gather sends it as this rank's failure
  (:func:`ckpt.distributed.exchange.gather_all`), so every rank raises there, as for any
  rank's failure, and nothing more is written;
- a gather after which a failure would be wrong (the one that tells the ranks the manifest is
  written: the step *is* committed) sends its value as usual;
- when the protocol ends, the interrupt is raised on this rank (the previous SIGINT handler
  runs: Python's default raises KeyboardInterrupt).

A second SIGINT, or one arriving while this rank already reports an interrupt, runs the
previous handler at once: this rank stops where it is (the user insists), and the others
find out when it exits, or after ``CKPT_DIST_TIMEOUT``. Nothing changes where SIGINT is
ignored or left to the system's default (the process dies; the others see a closed peer).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

log = logging.getLogger("ckpt")


class _State:
    """The main thread's protocol in progress (signal handlers run there only)."""

    def __init__(self) -> None:
        #: the SIGINT handler to restore (and to run for a deferred interrupt); None: no protocol
        self.previous: Any = None
        #: a noted SIGINT, raised at the protocol's end (the frame it interrupted)
        self.pending = False
        self.frame: FrameType | None = None
        #: the rank already stops (it reports an interrupt): the next SIGINT raises at once
        self.stopping = False


_state = _State()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    previous = _state.previous
    if _state.pending or _state.stopping or previous is None:
        _state.pending = False
        (previous or signal.default_int_handler)(signum, frame)
        return
    _state.pending, _state.frame = True, frame
    log.warning(
        "Ctrl-C during a collective checkpoint: every rank stops at the next exchange, so that "
        "they stay in step; Ctrl-C again stops this rank at once"
    )


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Defer SIGINT on the main thread for the duration of a collective protocol (see the
    module docstring); a decorator too. Nested uses, and uses on other threads, change nothing."""
    if _state.previous is not None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # ignored, the system's default, or set outside Python
        yield
        return
    try:
        signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main interpreter
        yield
        return
    _state.previous, _state.pending, _state.frame, _state.stopping = previous, False, None, False
    stopped: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        stopped = exc
        raise
    finally:
        if signal.getsignal(signal.SIGINT) is _on_sigint:  # first: a SIGINT from now on is the previous handler's
            signal.signal(signal.SIGINT, previous)
        pending, frame = _state.pending, _state.frame
        _state.previous, _state.pending, _state.frame, _state.stopping = None, False, None, False
        if pending and (stopped is None or isinstance(stopped, Exception)):  # not when already stopping
            previous(signal.SIGINT, frame)


def pending() -> bool:
    """Whether this thread's protocol holds a SIGINT not raised yet."""
    return _state.pending and threading.current_thread() is threading.main_thread()


def stopping() -> None:
    """This rank reports an interrupt of its own (a KeyboardInterrupt caught by a protocol's
    site): a SIGINT from now to the protocol's end raises at once."""
    if threading.current_thread() is threading.main_thread():
        _state.stopping = True


def report() -> KeyboardInterrupt | None:
    """The interrupt this thread's protocol holds, to send as this rank's failure (it is
    still raised at the protocol's end); None when there is none."""
    if not pending():
        return None
    return KeyboardInterrupt("Ctrl-C")
