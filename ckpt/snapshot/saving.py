"""Saving of the asynchronous Checkpointer: :class:`SaveHandle` and :class:`Saving`, the
``save()``/``wait()`` half of :class:`ckpt.snapshot.checkpointer.Checkpointer` (mixed in there).

``save()`` returns once the snapshot is consistent (see :mod:`ckpt.snapshot.staging` for exactly
what that guarantees); staging of optimizer-owned tensors, encoding and writing run on a
background thread and a worker pool. At most one save is in flight: a second ``save()``
waits for the first to commit (``if_busy="wait"``, the default) or is skipped
(``if_busy="skip"``, logged). Errors of background work are raised, as
:class:`CheckpointError`, from ``handle.wait()``, the next ``save()``, ``step()``,
``wait()`` or ``close()`` — whichever comes first — never lost and never hung on
(with ``on_error="warn"`` they are logged and kept in :attr:`Checkpointer.errors`
instead, and training goes on; the previous checkpoint stays the latest).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, MutableMapping
from concurrent.futures import Future
from typing import Any

import torch

from ckpt.api import devices_of, write_checkpoint
from ckpt.codecs.delta import DeltaLearner
from ckpt.errors import CheckpointError
from ckpt.hooks.manager import Plugins
from ckpt.snapshot.executor import Background
from ckpt.snapshot.staging import HostPool, Snapshot, guarded_storages
from ckpt.state import tree as treemod
from ckpt.state.capture import capture
from ckpt.storage import retention
from ckpt.storage.commit import latest_for_save
from ckpt.storage.manifest import Manifest, check_step
from ckpt.storage.store import Store
from ckpt.storage.tiers import Tiers
from ckpt.storage.writer_lease import WriterLease
from ckpt.types import CheckpointInfo

log = logging.getLogger("ckpt")


class SaveHandle:
    """An asynchronous save: consistent when returned, committed when :meth:`wait` returns."""

    def __init__(self, checkpointer: Saving, step: int, snapshot: Snapshot | None) -> None:
        self.step = step
        self._ck = checkpointer
        self._snapshot = snapshot
        self._future: Future[CheckpointInfo] = Future()
        self.skipped = snapshot is None

    def done(self) -> bool:
        return self._future.done()

    def wait_staged(self, timeout: float | None = None) -> bool:
        """Wait until every tensor has been copied out of the live objects."""
        return True if self._snapshot is None else self._snapshot.staged.wait(timeout)

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Wait for the commit; returns its info (None for a skipped save).

        :raises CheckpointError: the save failed (the error is then reported only here).
        """
        if self.skipped:
            return None
        try:
            return self._future.result(timeout)
        except CheckpointError as exc:
            self._ck._mark_reported(exc)
            raise
        except TimeoutError:
            raise CheckpointError(
                f"save of step {self.step} to {self._ck.url} did not commit within {timeout}s"
            ) from None

    def __repr__(self) -> str:
        state = "skipped" if self.skipped else ("done" if self.done() else "in flight")
        return f"<SaveHandle step={self.step} {state}>"


class Saving:
    """``save()``, the background commit, its errors and ``wait()`` (mixed into
    :class:`ckpt.snapshot.checkpointer.Checkpointer`, whose constructor sets the state below)."""

    url: str
    store: Store  # the tier every save commits to
    tiers: Tiers | None
    keep_last: int | None
    keep_every: int | None
    if_busy: str
    on_error: str
    errors: list[CheckpointError]
    run_id: str
    _state: MutableMapping[str, Any] | None
    _plugins: Plugins
    _writer: WriterLease
    _pool: HostPool
    _threads: Background
    _lock: threading.Lock
    _inflight: SaveHandle | None
    _snapshot: Snapshot | None
    _parent: Manifest | None
    _parent_loaded: bool
    _top_seq: int | None
    _deltas: DeltaLearner
    _pending_error: CheckpointError | None
    _reported: set[int]
    _closed: bool
    _last_saved_step: int | None
    _restored_step: int | None
    _side_stream: Any

    # -- errors --------------------------------------------------------------------------
    def _mark_reported(self, exc: BaseException) -> None:
        with self._lock:
            self._reported.add(id(exc))
            if self._pending_error is exc:
                self._pending_error = None

    def _raise_pending(self) -> None:
        with self._lock:
            exc, self._pending_error = self._pending_error, None
            if exc is not None:
                self._reported.add(id(exc))
        if exc is not None:
            raise exc

    def _fail(self, step: int, exc: BaseException) -> CheckpointError:
        if isinstance(exc, CheckpointError):
            err = exc
        else:
            err = CheckpointError(f"saving step {step} to {self.url} failed: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
        self.errors.append(err)
        if self.on_error == "warn":
            log.error("checkpoint of step %d to %s failed (training continues): %s", step, self.url, err)
            self._reported.add(id(err))
        else:
            with self._lock:
                if self._pending_error is None:
                    self._pending_error = err
        return err

    # -- saving --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"Checkpointer for {self.url} is closed")

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        snap = self._snapshot
        if snap is not None and not snap.staged.is_set():
            snap.staged.wait()

    def _stream(self) -> Any:
        if self._side_stream is None and torch.cuda.is_available():
            self._side_stream = torch.cuda.Stream()
        return self._side_stream

    def save(
        self,
        state: Mapping[str, Any] | None = None,
        *,
        step: int,
        guard: bool = True,
        meta: Mapping[str, Any] | None = None,
    ) -> SaveHandle:
        """Snapshot ``state`` (default: the state given to ``resume``) as ``step`` and persist it
        in the background. Returns once the snapshot is consistent.

        :param guard: copy optimizer-owned tensors in the background, holding the next
            ``optimizer.step()`` until done (default). ``False`` copies all before returning.
        """
        self._check_open()
        self._raise_pending()
        check_step(step)
        if state is None:
            state = self._state
            if state is None:
                raise CheckpointError("Checkpointer.save() needs a state (or use Checkpointer.resume(...))")
        prev = self._inflight
        if prev is not None and not prev.done():
            if self.if_busy == "skip":
                log.warning("save of step %d skipped: step %d is still being written to %s", step, prev.step, self.url)
                return SaveHandle(self, step, None)
            prev._future.exception()  # wait; its error, if any, is pending now
            self._raise_pending()
        classes: dict[str, str] = {}
        tree, adapters = capture(state, self._plugins, classes)
        self._plugins.before_save(url=self.url, step=step, tree=tree)
        tensors: dict[str, torch.Tensor] = {}
        json_tree = treemod.encode(tree, tensors, set())
        guarded = guarded_storages(_optimizers_in(state)) if guard else set()
        snapshot = Snapshot.take(tensors, self._pool, guarded, side_stream=self._stream())
        if torch.cuda.is_available():
            snapshot.gpu_wait()
        handle = SaveHandle(self, step, snapshot)
        with self._lock:
            self._inflight = handle
            self._snapshot = snapshot
        self._last_saved_step = step
        fut = self._threads.commits.submit(
            self._persist, handle, json_tree, adapters, meta, classes, devices_of(tensors)
        )
        fut.add_done_callback(lambda f: _chain(f, handle._future))
        if not guard:
            snapshot.staged.wait()
        return handle

    def _persist(
        self,
        handle: SaveHandle,
        json_tree: Any,
        adapters: Mapping[str, str],
        meta: Any,
        classes: Mapping[str, str],
        devices: Mapping[str, str],
    ) -> CheckpointInfo:
        snapshot = handle._snapshot
        assert snapshot is not None
        try:
            # One plain copy first: the next optimizer step waits for nothing but it (no store
            # reads, no encoding), unless max_host_memory is too small to hold it at once.
            snapshot.copy_all(side_stream=self._side_stream)
            if not self._parent_loaded or self._top_seq is None:
                latest = latest_for_save(self.store)
                if not self._parent_loaded:  # no restore: continue from the store's latest
                    self._parent, self._parent_loaded = latest.manifest, True
                self._top_seq = latest.top_seq
            # Taken before writing: a save failing after its manifest was written must not
            # leave its seq to the next one.
            self._top_seq += 1
            self._writer.saving(handle.step, self._parent, keep=self._pinned())
            info = write_checkpoint(
                self.store,
                self._plugins,
                step=handle.step,
                json_tree=json_tree,
                adapters=adapters,
                tensors=snapshot.stage(side_stream=self._side_stream),
                parent=self._parent,
                pool=self._threads.io,
                meta=meta,
                on_tensor_written=snapshot.release,
                delta_skip=self._deltas.skip(),
                seq=self._top_seq,
                run=self.run_id,
                classes=classes,
                devices=devices,
                lease=self._writer,
            )
            if info.write_stats is not None:
                self._deltas.learn(info.write_stats.delta_paid)
            self._parent = info.manifest
            self._after_commit(info)
            return info
        except BaseException as exc:
            raise self._fail(handle.step, exc) from exc
        finally:
            snapshot.staged.set()
            snapshot.release_all()

    def _pinned(self) -> list[int]:
        """Steps this run holds besides its parent and the save in flight."""
        return [self._restored_step] if self._restored_step is not None else []

    def _after_commit(self, info: CheckpointInfo) -> None:
        try:
            self._writer.committed(info.step, keep=self._pinned())  # the next save's parent
        except CheckpointError as exc:  # the commit stands; the next save raises it
            log.error("after committing step %d to %s: %s", info.step, self.url, exc)
            return
        if self.tiers is not None:  # persist when due; per-tier retention
            try:
                self.tiers.committed(info.step, protect=self._pinned(), writer=self._writer)
            except CheckpointError as exc:  # the local commit stands; the next save raises it
                log.error("after committing step %d to %s: %s", info.step, self.url, exc)
                self._fail(info.step, exc)
            return
        if self.keep_last is None and self.keep_every is None:
            return
        protect = {s for s in (self._restored_step, info.step) if s is not None}
        try:
            # This run is the store's one writer: what only pruned checkpoints used goes now.
            retention.prune(
                self.store, keep_last=self.keep_last, keep_every=self.keep_every, protect=protect, writer=self._writer
            )
        except CheckpointError as exc:  # pruning is housekeeping: the commit stands
            log.warning("pruning %s after step %d failed: %s", self.url, info.step, exc)

    def wait(self) -> CheckpointInfo | None:
        """Wait for the save in flight (if any) to commit; raise a pending error."""
        handle = self._inflight
        info = None
        if handle is not None:
            try:
                info = handle._future.result()
            except CheckpointError:
                pass
        self._raise_pending()
        return info


def _chain(src: Future, dst: Future) -> None:
    exc = src.exception()
    if exc is not None:
        dst.set_exception(exc)
    else:
        dst.set_result(src.result())


def _optimizers_in(state: Mapping[str, Any]) -> list[torch.optim.Optimizer]:
    return treemod.instances(state, torch.optim.Optimizer)
