"""The asynchronous Checkpointer and the ``resume`` training-loop decorator.

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

import functools
import logging
import sys
import threading
from collections.abc import Callable, Mapping, MutableMapping
from concurrent.futures import Future
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ckpt import config
from ckpt.api import devices_of, restore_latest, restore_manifest, write_checkpoint
from ckpt.codecs.delta import DeltaLearner
from ckpt.errors import CheckpointError, NoCheckpointError
from ckpt.hooks.manager import get_plugins
from ckpt.security.binding import open_tiers
from ckpt.security.envelope import open_store
from ckpt.security.keys import Encryption
from ckpt.snapshot.executor import Background
from ckpt.snapshot.preemption import PREEMPT_SIGNALS, Preemption
from ckpt.snapshot.staging import HostPool, Snapshot, guarded_storages
from ckpt.state import tree as treemod
from ckpt.state.capture import capture
from ckpt.state.dataloader import track_all
from ckpt.state.restore import apply_restore, prepare_restore
from ckpt.storage import retention
from ckpt.storage.commit import latest_for_save, load_manifest, new_run_id
from ckpt.storage.manifest import Manifest, check_step
from ckpt.storage.store import Store
from ckpt.storage.tiers import Tiers
from ckpt.storage.writer_lease import WriterLease
from ckpt.types import CheckpointInfo

log = logging.getLogger("ckpt")

# PREEMPT_SIGNALS: re-exported, its home is ckpt.snapshot.preemption
__all__ = ["PREEMPT_SIGNALS", "Checkpointer", "SaveHandle"]


class SaveHandle:
    """An asynchronous save: consistent when returned, committed when :meth:`wait` returns."""

    def __init__(self, checkpointer: Checkpointer, step: int, snapshot: Snapshot | None) -> None:
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


class Checkpointer:
    """Asynchronous checkpoints of one training run into the store at ``url``.

    :param every: ``step(n)`` saves when ``n % every == 0``.
    :param keep_last: keep the newest N checkpoints (pruned after each commit, with GC).
    :param keep_every: also keep every step divisible by this.
    :param max_host_memory: bound on staging buffers in bytes (None: one copy of the state).
    :param if_busy: ``"wait"`` or ``"skip"`` when a save is requested while one is in flight.
    :param on_error: ``"raise"`` (default) or ``"warn"`` for failed background saves.
    :param state: the state mapping ``step()`` saves (``resume`` sets it too).
    :param take_over: take the store's writer lease even from a live holder (operators only;
        default ``CKPT_WRITER_TAKE_OVER``).
    :param preempt_exit_code: exit status after a preemption's save has committed (0).
    :param local: a fast local tier (a path, ``/dev/shm/...``, ``memory://...``): every save
        commits there and ``url`` becomes the durable tier, which receives copies
        (:mod:`ckpt.storage.tiers`; with several ranks, one local tier per rank under it:
        :mod:`ckpt.distributed.tiers`); ``keep_last``/``keep_every`` then apply to the durable tier.
    :param persist_every: with ``local``, copy steps divisible by this to ``url`` in the
        background (None: only the newest, on close, at the end of ``resume`` and on preemption).
    :param local_keep_last: checkpoints kept on the local tier (2).
    :param local_storage_options: fsspec options of the local tier.
    :param local_compress: compress on the local tier too (default False: its objects are
        stored raw, so saves there cost no compression and restores no decoding; persisted
        checkpoints are compressed on their way to ``url``).
    :param preempt_deadline: seconds after a preemption signal by which the process exits even
        if the save has not committed, with status 128 + the signal number (default
        ``CKPT_PREEMPT_DEADLINE_SECONDS``, 60; 0 turns it off).
    :param encryption: a :class:`ckpt.Encryption`: the store is encrypted (see ``ckpt.save``).

    One writer per store: an open Checkpointer holds the store's writer lease
    (:class:`ckpt.storage.leases.WriterLease`) until :meth:`close`, and a second writer
    (another Checkpointer, ``ckpt.save``, ``ckpt import``) gets a CheckpointError naming it.
    The lease of a dead process on this host is taken over at once; one from another host
    once its heartbeat has stopped for ``CKPT_WRITER_LEASE_SECONDS``.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # under torch.distributed with several ranks: the collective variant
        if cls is Checkpointer and "torch.distributed" in sys.modules:
            from ckpt.distributed.coordinator import active

            if active():
                from ckpt.distributed.checkpointer import DistributedCheckpointer

                return DistributedCheckpointer(*args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        url: str,
        *,
        every: int | None = None,
        keep_last: int | None = None,
        keep_every: int | None = None,
        storage_options: dict[str, Any] | None = None,
        max_host_memory: int | None = None,
        if_busy: str = "wait",
        on_error: str = "raise",
        state: MutableMapping[str, Any] | None = None,
        preempt_exit_code: int = 0,
        take_over: bool | None = None,
        preempt_deadline: float | None = None,
        local: str | None = None,
        persist_every: int | None = None,
        local_keep_last: int | None = 2,
        local_storage_options: dict[str, Any] | None = None,
        encryption: Encryption | None = None,
        local_compress: bool = False,
    ) -> None:
        if every is not None and (not isinstance(every, int) or every < 1):
            raise CheckpointError(f"every must be a positive int, got {every!r}")
        if if_busy not in ("wait", "skip"):
            raise CheckpointError(f"if_busy must be 'wait' or 'skip', got {if_busy!r}")
        if on_error not in ("raise", "warn"):
            raise CheckpointError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        #: the durable tier behind a local one (``local=``; see :mod:`ckpt.storage.tiers`)
        self.tiers: Tiers | None = None
        if local is not None:
            # made on the tiers' thread: a restart from the local tier does not wait for s3fs
            durable = Store(url, storage_options, lazy=True)
            # an encrypted durable tier is opened below, with the local one: the tiers' thread
            # waits for that (its keys) before it reads the durable tier or takes its lease
            opened: Future[None] = Future()
            self.tiers = Tiers(
                Store(local, local_storage_options),
                durable,
                persist_every=persist_every,
                local_keep_last=local_keep_last,
                keep_last=keep_last,
                keep_every=keep_every,
                take_over=take_over,
                local_compress=local_compress,
                # a plain durable tier is opened on the tiers' thread (see below)
                open_durable=functools.partial(open_store, durable, None, create=True)
                if encryption is None
                else opened.result,
            )
            self.store = self.tiers.local.store  # every save commits there
        else:
            self.store = Store(url, storage_options)
        if self.tiers is not None:  # one descriptor for both tiers (ckpt.security.binding)
            try:
                if encryption is None:  # plain: the local tier now, the durable one in the background
                    open_store(self.store, None, create=True)
                else:
                    open_tiers(self.store, self.tiers.durable.store, encryption)
                    opened.set_result(None)
            except BaseException as exc:
                if encryption is not None:
                    opened.set_exception(exc)
                self.tiers.close(persist=False)
                raise
        else:
            open_store(self.store, encryption, create=True)  # a missing or wrong key fails here
        self.url = self.store.url
        self.every = every
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.if_busy = if_busy
        self.on_error = on_error
        #: the preemption signals' handlers and deadline (installed by ``resume``)
        self._preempt = Preemption(
            config.preempt_deadline_seconds() if preempt_deadline is None else preempt_deadline,
            preempt_exit_code,
            lambda: f"step {self._last_step} is not committed to {self.url}",
        )
        self.errors: list[CheckpointError] = []
        self._state = state
        self._plugins = get_plugins()
        # first: a refused lease must leave no threads or buffers behind
        try:
            self._writer = WriterLease(self.store, take_over=take_over, what="Checkpointer")
        except BaseException:
            if self.tiers is not None:
                self.tiers.close(persist=False)
            raise
        self._pool = HostPool(max_host_memory)
        self._threads = Background()
        self._lock = threading.Lock()
        self._inflight: SaveHandle | None = None
        self._snapshot: Snapshot | None = None
        #: the checkpoint the next save continues from (its parent) and deduplicates against
        self._parent: Manifest | None = None
        self._parent_loaded = False
        #: the highest commit sequence of the store as far as this writer knows
        self._top_seq: int | None = None
        #: this writer's id, recorded as ``run`` in its manifests
        self.run_id = new_run_id()
        self._deltas = DeltaLearner()
        self._pending_error: CheckpointError | None = None
        self._reported: set[int] = set()
        self._closed = False
        self._last_step: int | None = None
        self._last_saved_step: int | None = None
        self._restored_step: int | None = None
        self._side_stream: Any = None
        self._hook = register_optimizer_step_pre_hook(self._before_optimizer_step)

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(raise_errors=exc is None)

    def __repr__(self) -> str:
        return f"Checkpointer({self.url!r}, every={self.every})"

    @property
    def preempt_exit_code(self) -> int:
        """The exit status after a preemption's save has committed."""
        return self._preempt.exit_code

    @preempt_exit_code.setter
    def preempt_exit_code(self, code: int) -> None:
        self._preempt.exit_code = code

    @property
    def preempt_deadline(self) -> float:
        """Seconds after a preemption signal by which the process exits (0: no deadline)."""
        return self._preempt.deadline

    @preempt_deadline.setter
    def preempt_deadline(self, seconds: float) -> None:
        self._preempt.deadline = seconds

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
                self._deltas.learn(info.write_stats.delta_outcome)
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

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for pending saves, release resources and raise an unreported error."""
        if self._closed:
            return
        try:
            handle = self._inflight
            if handle is not None:
                handle._future.exception()
        finally:
            self._closed = True
            self._hook.remove()
            self._threads.shutdown()
            self._pool.clear()
            if self.tiers is not None:  # the newest local checkpoint goes to the durable tier
                err = self.tiers.close()
                if err is not None and raise_errors and self._pending_error is None:
                    self._pending_error = err
            try:
                self._writer.release()
            except CheckpointError as exc:  # a dead lease is taken over at once: nothing is blocked
                log.warning("releasing the writer lease of %s failed: %s", self.url, exc)
        if raise_errors:
            self._raise_pending()

    # -- restoring -----------------------------------------------------------------------
    def restore(self, state: MutableMapping[str, Any] | None = None, step: int | None = None) -> CheckpointInfo:
        """Load ``step`` (the latest when None) into ``state``'s live objects, after pending saves.

        The next save continues from the restored checkpoint: after ``restore(step=20)`` of a
        store holding 30, step 30 is abandoned and the run's next save is the latest. Without
        a step, unreadable or damaged newer checkpoints are skipped (logged) for the newest
        intact one; with a step, they raise.
        """
        self._check_open()
        self.wait()
        if state is None:
            state = self._state
            if state is None:
                raise CheckpointError("Checkpointer.restore() needs a state")
        if self.tiers is not None:  # the newest intact checkpoint of either tier
            live = state
            info, manifest, _tier = self.tiers.restore(
                lambda store, m: restore_manifest(store, self._plugins, m, live),
                step,
                # a raw local tier is read straight into the live tensors (verified before and after)
                prepare_fn=lambda store, m: prepare_restore(store, self._plugins, m, live, in_place=not store.compress),
                apply_fn=functools.partial(apply_restore, hooks=False),
                # once, for the checkpoint the live objects end up holding
                after_fn=lambda info: self._plugins.after_restore(info=info, state=live),
            )
        elif step is None:
            info, manifest = restore_latest(self.store, self._plugins, state)
        else:
            manifest = load_manifest(self.store, step)
            info = restore_manifest(self.store, self._plugins, manifest, state)
        self._parent, self._parent_loaded = manifest, True
        self._restored_step = manifest.step
        self._take_lease(manifest.step)
        return info

    def _take_lease(self, step: int) -> None:
        # GC must not sweep the checkpoint this run resumed from (its next parent) while the run is live.
        self._writer.protect([step])

    def latest_step(self) -> int | None:
        return self.store.latest_step()

    # -- the training loop ---------------------------------------------------------------
    def step(self, step: int) -> None:
        """Call once per training step with the number of steps completed.

        Saves asynchronously every ``every`` steps. After SIGTERM/SIGUSR1 it saves this
        step, waits for the commit and exits the process with ``preempt_exit_code``
        (unless ``preempt_deadline`` passes first).
        """
        self._raise_pending()
        self._last_step = step
        if self._preempt.signal is not None:
            log.warning("%s received: saving step %d to %s and exiting", self._preempt.signal, step, self.url)
            if self._last_saved_step != step:
                self.save(step=step)
            self.close()
            self._preempt.committed = True
            raise SystemExit(self.preempt_exit_code)
        if self.every and step % self.every == 0:
            self.save(step=step)

    def resume(self, state: MutableMapping[str, Any] | None = None, /, **objects: Any) -> Callable:
        """Decorator: restore the latest checkpoint, then call ``fn(start_step)``.

        The state is ``state`` and/or the keyword objects. The decorated function may be
        called with no arguments; the decorator supplies ``start_step`` (0 on a fresh run).
        On return it saves the final step and waits; on an exception it waits for pending
        saves and re-raises. SIGTERM and SIGUSR1 turn into a save at the next ``step()``.
        """
        merged: dict[str, Any] = dict(state or {})
        merged.update(objects)
        if not merged:
            raise CheckpointError("resume() needs the objects to checkpoint, e.g. resume(model=model, optim=opt)")

        def decorate(fn: Callable) -> Callable:
            @functools.wraps(fn)
            def run(*args: Any, **kwargs: Any) -> Any:
                self._state = merged
                track_all(merged)
                try:
                    try:
                        start = self.restore(merged).step
                    except NoCheckpointError:
                        if self.store.steps():  # a store holding checkpoints never starts over
                            raise
                        start = 0
                    self._last_saved_step = start if start else None
                    self._preempt.install()
                except BaseException:  # a resume that cannot start gives the store back
                    self.close(raise_errors=False)
                    raise
                try:
                    result = fn(start, *args, **kwargs)
                except BaseException:  # incl. the SystemExit of a preemption: never leave a torn save
                    self.close(raise_errors=False)
                    raise
                finally:
                    self._preempt.uninstall()
                if self._last_step is not None and self._last_saved_step != self._last_step:
                    self.save(step=self._last_step)
                self.close()
                self._preempt.committed = self._preempt.signal is not None  # the deadline exits with 0 now
                return result

            return run

        return decorate


def _chain(src: Future, dst: Future) -> None:
    exc = src.exception()
    if exc is not None:
        dst.set_exception(exc)
    else:
        dst.set_result(src.result())


def _optimizers_in(state: Mapping[str, Any]) -> list[torch.optim.Optimizer]:
    return treemod.instances(state, torch.optim.Optimizer)
