"""Preemption signals of one process: handlers that record SIGTERM or SIGUSR1, and the deadline.

:class:`Preemption` is used by :meth:`ckpt.Checkpointer.resume` (its ``step()`` then saves
and exits) and, with the agreement between ranks added, by
:class:`ckpt.distributed.preempt.Preemption`. A handler only records the signal (and calls
the handler it replaced, when that is a function); the training loop acts on it at its next
step. From the first signal, a deadline of ``deadline`` seconds runs on a daemon thread:
when it passes, the process exits at once (``os._exit``) with status 128 + the signal
number if the preemption's save has not committed, or ``exit_code`` if it has (a shutdown
hung after the save is cut short too). 0 turns the deadline off.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ckpt")

PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preemption:
    """The preemption signal handlers and the deadline of one Checkpointer.

    :param deadline: seconds from the signal to the forced exit (0: none).
    :param exit_code: the exit status once the preemption's save has committed.
    :param describe: what is not committed, for the log line of a deadline that passed
        before the commit (e.g. ``"step 7 is not committed to s3://..."``).
    """

    def __init__(self, deadline: float, exit_code: int, describe: Callable[[], str]) -> None:
        self.deadline = deadline
        self.exit_code = exit_code
        self.describe = describe
        #: the signal received (None: none yet)
        self.signal: str | None = None
        self.signum: int | None = None
        #: the preemption's save has committed (the deadline then exits with ``exit_code``)
        self.committed = False
        self._timer: threading.Timer | None = None
        #: the handlers each :meth:`install` replaced, innermost last (a resume nested in
        #: another of the same Checkpointer gives back its own)
        self._previous: list[dict[int, Any]] = []

    def install(self) -> None:
        """Handle the preemption signals (from the main thread only: elsewhere, logged)."""
        previous: dict[int, Any] = {}
        self._previous.append(previous)  # (one per install, so each uninstall gives back its own)
        if threading.current_thread() is not threading.main_thread():
            log.warning("resume() outside the main thread: preemption signals are not handled")
            return
        for name in PREEMPT_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            old = signal.getsignal(signum)

            def handler(num: int, frame: Any, _old: Any = old, _name: str = name) -> None:
                if self.signal is None:
                    self.signal, self.signum = _name, num
                    self._start_deadline()
                if callable(_old) and _old not in (signal.default_int_handler,):
                    _old(num, frame)

            signal.signal(signum, handler)
            previous[signum] = old

    def uninstall(self) -> None:
        """Give the signals back to the handlers the last :meth:`install` replaced."""
        if not self._previous:
            return
        for signum, old in self._previous.pop().items():
            try:
                signal.signal(signum, old if old is not None else signal.SIG_DFL)
            except (ValueError, TypeError):  # pragma: no cover - not the main thread any more
                pass

    def _start_deadline(self) -> None:
        if self.deadline <= 0 or self._timer is not None:
            return
        # A daemon thread: it never holds the process up, and it still fires while the
        # interpreter exits (a hung shutdown after the save is cut short too).
        self._timer = threading.Timer(self.deadline, self._exit)
        self._timer.daemon = True
        self._timer.start()

    def _exit(self) -> None:
        if self.committed:
            code = self.exit_code
            log.error("preempted run did not exit within %ss after its save; exiting", self.deadline)
        else:
            # Abandons the save in flight: its manifest is not written, so the previous
            # checkpoint stays the latest; stray objects are collected by gc.
            code = 128 + (self.signum or 0)
            log.error(
                "%s received %ss ago and %s: exiting without it (the latest checkpoint is the one before)",
                self.signal,
                self.deadline,
                self.describe(),
            )
        for h in logging.getLogger().handlers + log.handlers:
            h.flush()
        os._exit(code)
