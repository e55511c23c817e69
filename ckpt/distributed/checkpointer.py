"""``ckpt.Checkpointer`` under an initialized default group of several ranks.

``ckpt.Checkpointer(url, ...)`` returns a :class:`DistributedCheckpointer` there; every rank
constructs it (collectively, in the same order as its other collectives) with the same
arguments. :meth:`~DistributedCheckpointer.save` stages locally on each rank: the tree is
captured and encoded, tensors hashed and copied to host memory (DTensors as their local
shard), and the call returns. One background thread per rank then runs the commit protocol
of :mod:`ckpt.distributed.coordinator` over a gloo group created for this Checkpointer at
construction (``dist.new_group``), never the training's group: training collectives
(all_reduce, FSDP's all-gathers) run concurrently without any ordering between the two.

Saves commit in order; a save requested while one is in flight waits for it (``if_busy``
is always "wait": skipping on one rank only would desynchronize the ranks). The store's
writer lease is taken by rank 0 for each commit. A failure on any rank is raised on every
rank by the next ``save``/``step``/``wait``/``close`` (or logged with ``on_error="warn"``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ckpt import config
from ckpt.errors import CheckpointError
from ckpt.hooks.manager import get_plugins
from ckpt.security.keys import Encryption
from ckpt.storage.manifest import check_step
from ckpt.storage.store import Store
from ckpt.types import CheckpointInfo

from .coordinator import _Failed, capture_local, commit_collective

log = logging.getLogger("ckpt")


class DistributedCheckpointer:
    """Asynchronous collective checkpoints (see the module docstring).

    Takes the arguments of :class:`ckpt.Checkpointer`; ``every``, ``state``,
    ``storage_options``, ``on_error`` and ``encryption`` are honoured, the others are accepted and ignored
    (retention and memory bounds of a sharded run are future work).
    """

    def __init__(
        self,
        url: str,
        *,
        every: int | None = None,
        storage_options: dict[str, Any] | None = None,
        on_error: str = "raise",
        state: MutableMapping[str, Any] | None = None,
        encryption: Encryption | None = None,
        **ignored: Any,
    ) -> None:
        if every is not None and (not isinstance(every, int) or every < 1):
            raise CheckpointError(f"every must be a positive int, got {every!r}")
        if on_error not in ("raise", "warn"):
            raise CheckpointError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        if ignored:
            log.debug("Checkpointer under torch.distributed ignores %s", sorted(ignored))
        self.store = Store(url, storage_options)
        self._encryption = encryption  # each commit opens the store with it (rank 0 first)
        self.url = self.store.url
        self.every = every
        self.on_error = on_error
        self._state = state
        self._plugins = get_plugins()
        # collective: every rank constructs its Checkpointer at the same point
        self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=config.dist_timeout_seconds()))
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ckpt-dist-commit")
        self._inflight: Future[CheckpointInfo] | None = None
        self._pending: CheckpointError | None = None
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> DistributedCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(raise_errors=exc[0] is None)

    def save(self, state: Mapping[str, Any] | None = None, *, step: int, **_: Any) -> Future[CheckpointInfo]:
        """Stage ``state`` as ``step`` on this rank and commit it in the background; returns a future."""
        if self._closed:
            raise CheckpointError(f"Checkpointer of {self.url} is closed")
        check_step(step)
        state = self._state if state is None else state
        if state is None:
            raise CheckpointError("Checkpointer.save() needs a state")
        self._wait_inflight()
        self._raise_pending()
        err: BaseException | None = None
        part: Any
        local: dict[str, torch.Tensor] = {}
        try:
            part, local = capture_local(state, self._plugins)
            # local staging: the training may change its tensors as soon as this returns
            local = {p: t.detach().to("cpu", copy=True) for p, t in local.items()}
        except Exception as exc:  # noqa: BLE001 - reported to every rank by the background commit
            err, part = exc, _Failed(dist.get_rank(), exc)
        fut = self._thread.submit(
            commit_collective,
            self.store,
            self._plugins,
            self._group,
            step=step,
            part=part,
            local=local,
            err=err,
            encryption=self._encryption,
        )
        fut.add_done_callback(self._done)
        self._inflight = fut
        return fut

    def _done(self, fut: Future[CheckpointInfo]) -> None:
        exc = fut.exception()
        if exc is None:
            return
        error = exc if isinstance(exc, CheckpointError) else CheckpointError(f"{type(exc).__name__}: {exc}")
        if self.on_error == "warn":
            log.warning("background collective save to %s failed: %s", self.url, error)
            return
        with self._lock:
            self._pending = self._pending or error

    def _wait_inflight(self) -> None:
        fut = self._inflight
        if fut is not None:
            fut.exception()  # waits

    def _raise_pending(self) -> None:
        with self._lock:
            error, self._pending = self._pending, None
        if error is not None:
            raise error

    def step(self, step: int) -> None:
        """Save when ``step`` is a multiple of ``every`` (with the state given at construction)."""
        if self.every is not None and step % self.every == 0:
            self.save(step=step)
        else:
            self._raise_pending()

    def wait(self) -> CheckpointInfo | None:
        """Wait for the save in flight; raise a failure of any rank."""
        fut = self._inflight
        self._wait_inflight()
        self._raise_pending()
        return None if fut is None or fut.exception() is not None else fut.result()

    def restore(self, state: MutableMapping[str, Any] | None = None, step: int | None = None) -> CheckpointInfo:
        """Collective restore (after the save in flight), as ``ckpt.restore``."""
        from .restore import restore

        self.wait()
        state = self._state if state is None else state
        if state is None:
            raise CheckpointError("Checkpointer.restore() needs a state")
        return restore(self.url, state, step=step, encryption=self._encryption)

    def latest_step(self) -> int | None:
        return self.store.latest_step()

    def close(self, *, raise_errors: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._wait_inflight()
        finally:
            self._thread.shutdown(wait=True)
        if raise_errors:
            self._raise_pending()
