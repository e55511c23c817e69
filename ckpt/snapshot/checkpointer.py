"""The asynchronous Checkpointer and the ``resume`` training-loop decorator.

:class:`Checkpointer` owns the run's store (and tiers), its writer lease, ``restore``,
``close`` and the training loop (``step``, ``resume``). Saving (``save()``, the background
commit, its errors, ``wait()``) is :class:`ckpt.snapshot.saving.Saving`, mixed in, with
:class:`SaveHandle` (importable from here too); the preemption signals ``resume`` handles,
and their deadline, are :class:`ckpt.snapshot.preemption.Preemption`.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections.abc import Callable, MutableMapping
from concurrent.futures import Future
from typing import Any

from torch.optim.optimizer import register_optimizer_step_pre_hook

from ckpt import config
from ckpt.api import restore_latest, restore_manifest
from ckpt.codecs.delta import DeltaLearner
from ckpt.errors import CheckpointError, NoCheckpointError
from ckpt.hooks.manager import get_plugins
from ckpt.security.binding import open_tiers
from ckpt.security.envelope import open_store
from ckpt.security.keys import Encryption
from ckpt.snapshot.executor import Background
from ckpt.snapshot.preemption import PREEMPT_SIGNALS, Preemption
from ckpt.snapshot.saving import SaveHandle, Saving
from ckpt.snapshot.staging import HostPool, Snapshot
from ckpt.state.dataloader import track_all
from ckpt.state.restore import apply_restore, gc_paused, prepare_restore
from ckpt.storage.commit import load_manifest, new_run_id
from ckpt.storage.manifest import Manifest
from ckpt.storage.store import Store
from ckpt.storage.tiers import Tiers
from ckpt.storage.writer_lease import WriterLease
from ckpt.types import CheckpointInfo

log = logging.getLogger("ckpt")

# SaveHandle and PREEMPT_SIGNALS: re-exported (their homes: ckpt.snapshot.saving, .preemption)
__all__ = ["PREEMPT_SIGNALS", "Checkpointer", "SaveHandle"]


class Checkpointer(Saving):
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
            from ckpt.distributed.exchange import active

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
        with gc_paused():
            if self.tiers is not None:  # the newest intact checkpoint of either tier
                live = state
                info, manifest, _tier = self.tiers.restore(
                    lambda store, m: restore_manifest(store, self._plugins, m, live),
                    step,
                    # a tier on local disk is read straight into the live tensors (verified before and after)
                    prepare_fn=lambda store, m: prepare_restore(store, self._plugins, m, live),
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
