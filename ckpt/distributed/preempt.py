"""Preemption of a collective run: a signal on any rank stops every rank at the same step.

:meth:`DistributedCheckpointer.resume` installs handlers of SIGTERM and SIGUSR1 (the
single-process ones, :class:`ckpt.snapshot.preemption.Preemption`). A handler only
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

import signal
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ckpt.errors import CheckpointError
from ckpt.snapshot import preemption

SIGNALS = preemption.PREEMPT_SIGNALS


class Preemption(preemption.Preemption):
    """Signal handlers, the agreement between ranks and the deadline of one Checkpointer.

    :attr:`signal` is the signal this rank received, or learnt of from another rank.
    """

    def __init__(self, group: Any, deadline: float, exit_code: int, describe: Callable[[], str]) -> None:
        super().__init__(deadline, exit_code, lambda: f"{describe()} is not committed")
        self.group = group

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
