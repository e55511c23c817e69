"""Preemption of a collective run: a signal on any rank stops every rank at the same step.

:meth:`DistributedCheckpointer.resume` installs handlers of SIGTERM and SIGUSR1 (the
single-process ones, :data:`ckpt.snapshot.checkpointer.PREEMPT_SIGNALS`). A handler only
records the signal; each ``step(n)`` inside ``resume`` then takes one small all-reduce
(MAX of "preempted here") over a gloo group of its own, so every rank learns of a signal
that reached any rank at the same step ``n``: every rank saves ``n`` collectively, waits
for the commit and exits with ``preempt_exit_code``. The save commits on every rank or on
none (the coordinator writes the manifest only after every rank reported its objects).

A deadline (``preempt_deadline`` seconds after a rank learns of the signal) exits a rank
whose save has not committed, with status 128 + the signal number; the other ranks'
collectives then fail (within ``CKPT_DIST_TIMEOUT``, sooner when gloo sees the peer
gone), no manifest is written, and the previous checkpoint stays the latest.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ckpt.errors import CheckpointError

log = logging.getLogger("ckpt")

SIGNALS = ("SIGTERM", "SIGUSR1")


class Preemption:
    """Signal handlers, the agreement between ranks and the deadline of one Checkpointer."""

    def __init__(self, group: Any, deadline: float, exit_code: int, describe: Callable[[], str]) -> None:
        self.group = group
        self.deadline = deadline
        self.exit_code = exit_code
        self.describe = describe
        #: the signal this rank received (or learnt of from another rank)
        self.signal: str | None = None
        self.signum: int | None = None
        self.committed = False
        self._timer: threading.Timer | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("resume() outside the main thread: preemption signals are not handled")
            return
        for name in SIGNALS:
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
            self._previous[signum] = old

    def uninstall(self) -> None:
        for signum, old in self._previous.items():
            try:
                signal.signal(signum, old if old is not None else signal.SIG_DFL)
            except (ValueError, TypeError):  # pragma: no cover - not the main thread any more
                pass
        self._previous = {}

    def agreed(self, step: int) -> bool:
        """Whether any rank was preempted (collective: every rank calls it at each step)."""
        flag = torch.tensor([0 if self.signum is None else self.signum], dtype=torch.int64)
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        except Exception as exc:  # noqa: BLE001 - a peer gone
            raise CheckpointError(
                f"step {step}: the other ranks did not answer the preemption check ({type(exc).__name__}: {exc})"
            ) from None
        got = int(flag.item())
        if got and self.signal is None:  # another rank's signal
            self.signum = got
            try:
                self.signal = f"{signal.Signals(got).name} (on another rank)"
            except ValueError:
                self.signal = f"signal {got} (on another rank)"
            self._start_deadline()
        return got != 0

    def _start_deadline(self) -> None:
        if self.deadline <= 0 or self._timer is not None:
            return
        self._timer = threading.Timer(self.deadline, self._exit)
        self._timer.daemon = True
        self._timer.start()

    def _exit(self) -> None:
        if self.committed:
            code = self.exit_code
            log.error("preempted run did not exit within %ss after its save; exiting", self.deadline)
        else:
            code = 128 + (self.signum or 0)
            log.error(
                "%s received %ss ago and %s is not committed: exiting without it (the latest checkpoint "
                "is the one before)",
                self.signal,
                self.deadline,
                self.describe(),
            )
        for h in logging.getLogger().handlers + log.handlers:
            h.flush()
        os._exit(code)
