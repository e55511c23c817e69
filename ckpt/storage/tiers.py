"""Two tiers: a fast local store that takes every save, a durable store that receives copies.

``Checkpointer(url, local=LOCAL_URL, persist_every=K)`` commits every save to the local
tier (node-local disk, ``/dev/shm``, ``memory://``); :class:`Tiers` then copies each
checkpoint whose step is divisible by ``K`` to the durable tier ``url`` in the background
(:func:`ckpt.storage.copy.copy_stores`: missing objects, manifest, ref), and the newest
local checkpoint once more when the Checkpointer closes (the end of ``resume``, a
preemption). Persisting never holds training up: while one copy runs, a newer request
replaces an older waiting one (logged), so the durable tier lags by at most one copy.

Restore takes the newest checkpoint across both tiers that is complete and verifies. The
tiers' latest checkpoints are ranked by their ``created`` time (a copy keeps it; the step
breaks ties, then the local tier wins as the faster one); a candidate whose manifest or
objects are missing or corrupt is passed over for the next (the tier's older intact
checkpoints on its line, or the other tier), and every such decision is logged naming
the tier and why. ``created`` rather than the commit sequence ranks them because the two
stores number their commits independently; it also makes a stale local tier left by an
earlier session of this run lose to a newer durable one, and a rollback (restore 20, save
21) win over the abandoned higher steps. ``created`` comes from the clock of the node that
saved, so before it ranks them the lineage is asked
(:func:`ckpt.storage.tier_checks.ahead`): a latest checkpoint
whose parent chain reaches the other tier's latest (the same checkpoint, where its tier
holds that step) is the newer one whatever the clocks say (a restart on a node whose clock
is behind; a stale local tier written with a clock ahead). A local tier left by another run (the same local
path, another durable URL: a node reused by a new job) is refused when the Checkpointer is
made, never restored from or persisted (:func:`ckpt.storage.tier_checks.bind`,
``tier.json`` in the local tier).

A background persist that fails (any exception of the thread, as a :class:`CheckpointError`
naming the step and the durable URL) is logged, kept in :attr:`Tiers.errors`, and raised
once by the next :meth:`Tiers.committed`: the Checkpointer makes it the run's pending error
(``on_error``), raised by its next save or wait. A failed persist of the newest checkpoint
at close is retried there and returned.

Retention is per tier (:func:`ckpt.storage.retention.prune`): ``local_keep_last`` (2) on
the local tier, never dropping a checkpoint that is waiting to be persisted, and
``keep_last``/``keep_every`` on the durable tier after each copy. The durable tier's
writer lease is held from construction to :meth:`Tiers.close`. It is taken on the tiers'
background thread, so that a restart from the local tier does not wait for the round
trips (and the settling wait) of taking a lease on an object store: a second run writing
to the same durable URL is refused at its first save (:meth:`Tiers.committed` raises),
before it persists anything.

Many ranks: under a default process group of several ranks, ``ckpt.Checkpointer(url,
local=...)`` is a :class:`ckpt.distributed.checkpointer.DistributedCheckpointer` with a
local tier per rank (:mod:`ckpt.distributed.tiers`): each rank's local store,
``<local>/rank-<r:05d>``, holds that rank's own single-process checkpoints (its shards,
per-rank values and a copy of the replicated state, tagged with the id of the collective
save), so per-tier retention and GC are this module's; the durable tier receives the
global collective checkpoint (:func:`ckpt.distributed.coordinator.commit_collective`)
written from the staged host copy on a background thread, not a copy of the local stores
(no rank holds the global manifest). Restores agree across ranks on the checkpoint
(:mod:`ckpt.distributed.tier_restore`); a rank whose local tier lacks it reads its region
of the durable one while the others read locally. :class:`Tiers` itself stays one-process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ckpt.codecs.base import CodecRegistry
from ckpt.errors import CheckpointError
from ckpt.snapshot.executor import serial_pool
from ckpt.storage import retention, tier_checks
from ckpt.storage.copy import CopyResult, copy_stores
from ckpt.storage.lineage import find_latest
from ckpt.storage.resave import resave_step
from ckpt.storage.store import Store
from ckpt.storage.tiers_restore import Tier, TierRestore
from ckpt.storage.writer_lease import WriterLease

log = logging.getLogger("ckpt")


class Tiers(TierRestore):
    """The local and durable tiers of one Checkpointer (see the module docstring).

    :param local: the local tier, where every save commits (the Checkpointer writes it).
    :param durable: the durable tier.
    :param persist_every: persist steps divisible by this (None: only on close).
    :param local_keep_last: checkpoints kept on the local tier (None: all).
    :param keep_last: / :param keep_every: retention of the durable tier.
    :param local_compress: compress the local tier's objects too (default: stored raw, so a
        save there only hashes and writes and a restore reads straight into memory; each
        persisted checkpoint is then written to the durable tier compressed, see
        :mod:`ckpt.storage.resave`).
    """

    def __init__(
        self,
        local: Store,
        durable: Store,
        *,
        persist_every: int | None,
        local_keep_last: int | None = 2,
        keep_last: int | None = None,
        keep_every: int | None = None,
        take_over: bool | None = None,
        local_compress: bool = False,
        open_durable: Callable[[], Any] | None = None,
    ) -> None:
        if persist_every is not None and (
            isinstance(persist_every, bool) or not isinstance(persist_every, int) or persist_every < 1
        ):
            raise CheckpointError(f"persist_every must be a positive int, got {persist_every!r}")
        if local.url == durable.url:
            raise CheckpointError(f"the local tier and the durable tier are the same store: {local.url}")
        retention.retained([], keep_last=local_keep_last)  # validates
        tier_checks.bind(local, durable)
        local.compress = bool(local_compress)
        local.direct_writes = False  # a restart reads the local tier at once: keep it in the page cache
        self.local = Tier("local", local, 0)
        self.durable = Tier("durable", durable, 1)
        self.persist_every = persist_every
        self.local_keep_last = local_keep_last
        self.keep_last = keep_last
        self.keep_every = keep_every
        self._pool: ThreadPoolExecutor = serial_pool("ckpt-tiers")
        # The durable tier is opened (its encryption descriptor read) and its lease taken on
        # the tiers' thread: a restart from the local tier waits for neither.
        self._opened: Future[Any] = self._pool.submit(open_durable or _nothing)
        # the durable tier's latest, for the first restore to rank against (fetched meanwhile)
        self._head: Future[Any] | None = self._pool.submit(self._durable_latest)
        self._lease: Future[WriterLease] = self._pool.submit(self._take_lease, durable, take_over)
        self._lock = threading.Lock()
        self._running: int | None = None
        self._waiting: int | None = None
        self._future: Future[None] | None = None
        #: steps this session persisted, and the outcome of the last copy
        self.persisted: list[int] = []
        self.errors: list[CheckpointError] = []
        self._newest_local: int | None = None
        #: background persist failures not yet raised by :meth:`committed`
        self._unreported: list[CheckpointError] = []

    def _take_lease(self, durable: Store, take_over: bool | None) -> WriterLease:
        self._opened.result()  # a durable tier that cannot be opened refuses the first save
        return WriterLease(durable, take_over=take_over, what="Checkpointer (durable tier)")

    def _durable_latest(self) -> Any:
        self._opened.result()
        return find_latest(self.durable.store)

    @staticmethod
    def _codecs() -> CodecRegistry:
        from ckpt.hooks.manager import get_plugins

        return get_plugins(adapters=False).codecs

    @property
    def lease(self) -> WriterLease:
        """The durable tier's writer lease (waits for it to be taken).

        :raises CheckpointError: another live writer holds the durable tier.
        """
        return self._lease.result()

    # -- persisting --------------------------------------------------------------------
    def pinned(self) -> set[int]:
        """Local steps that must not be pruned: waiting for or being copied."""
        with self._lock:
            return {s for s in (self._running, self._waiting) if s is not None}

    def committed(self, step: int, *, protect: Iterable[int], writer: WriterLease) -> None:
        """After step ``step`` committed to the local tier: persist it when due, prune locally.

        :raises CheckpointError: the durable tier has another live writer, or a background
            persist failed since the last call (once; the save and this persist went ahead).
        """
        self.lease  # noqa: B018 - refused: raised here, at the first save
        self._newest_local = step
        self._head = None  # a later restore asks the durable tier again
        if self.persist_every is not None and step % self.persist_every == 0:
            self.persist_async(step)
        if self.local_keep_last is None:
            self.raise_unreported()
            return
        keep = {step, *protect, *self.pinned()}
        try:
            retention.prune(self.local.store, keep_last=self.local_keep_last, protect=keep, writer=writer)
        except CheckpointError as exc:  # housekeeping: the commit stands
            log.warning("pruning the local tier %s after step %d failed: %s", self.local.store.url, step, exc)
        self.raise_unreported()

    def raise_unreported(self) -> None:
        """Raise the oldest background persist failure not raised yet (the next save's error)."""
        with self._lock:
            if not self._unreported:
                return
            err, self._unreported = self._unreported[0], []
        raise err

    def persist_async(self, step: int) -> None:
        """Copy ``step`` to the durable tier in the background (replacing a waiting older request)."""
        with self._lock:
            if self._waiting is not None:
                log.warning(
                    "persisting step %d to %s skipped: step %d is newer and the durable tier is still busy",
                    self._waiting,
                    self.durable.store.url,
                    step,
                )
                self._waiting = step
                return
            self._waiting = step
            self._future = self._pool.submit(self._drain)

    def _drain(self) -> None:
        with self._lock:
            step, self._waiting = self._waiting, None
            self._running = step
        try:
            if step is not None:
                self.persist_now(step)
        except Exception as exc:  # noqa: BLE001 - any failure of the thread is reported, as a CheckpointError
            why = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
            err = CheckpointError(f"persisting step {step} to the durable tier {self.durable.store.url} failed: {why}")
            err.__cause__ = exc
            with self._lock:
                self.errors.append(err)
                self._unreported.append(err)
            log.error("%s", err)
        finally:
            with self._lock:
                self._running = None

    def persist_now(self, step: int) -> CopyResult:
        """Copy local step ``step`` to the durable tier (what it lacks), then prune the durable tier."""
        if self.local.store.compress:
            result = copy_stores(self.local.store, self.durable.store, step=step, lease=self.lease, as_latest=True)
        else:  # raw local objects: written to the durable tier compressed (ckpt.storage.resave)
            result = resave_step(self.local.store, self.durable.store, step, lease=self.lease, codecs=self._codecs())
        self.persisted.append(step)
        log.info(
            "persisted step %d from %s to %s (%d objects, %d bytes moved; %d already there)",
            step,
            self.local.store.url,
            self.durable.store.url,
            result.stats.objects,
            result.stats.bytes,
            result.stats.skipped,
        )
        self.lease.committed(step)
        if self.keep_last is not None or self.keep_every is not None:
            try:
                retention.prune(
                    self.durable.store,
                    keep_last=self.keep_last,
                    keep_every=self.keep_every,
                    protect={step},
                    writer=self.lease,
                )
            except CheckpointError as exc:
                log.warning("pruning the durable tier %s after step %d failed: %s", self.durable.store.url, step, exc)
        return result

    def wait(self) -> None:
        """Wait for the background copies (their errors are logged and kept in :attr:`errors`)."""
        while True:
            fut = self._future
            if fut is None:
                return
            fut.result()
            with self._lock:
                if self._future is fut and self._waiting is None:
                    return

    def close(self, *, persist: bool = True) -> CheckpointError | None:
        """Finish the background copies, persist the newest local checkpoint, release the lease.

        Returns the error of that last copy (the local checkpoint stands either way)."""
        err: CheckpointError | None = None
        try:
            self.wait()
            self._pool.shutdown(wait=True)
            # the last local commit, or the local checkpoint restored (a crash may have kept it
            # from the durable tier); not whatever else the local tier holds
            newest = self._newest_local
            try:
                if not persist:
                    return None
                if newest is not None and (not self.persisted or self.persisted[-1] != newest):
                    self.persist_now(newest)
            except CheckpointError as exc:
                err = exc
                self.errors.append(exc)
                log.error(
                    "persisting the newest local checkpoint (step %s) to %s failed: %s",
                    newest,
                    self.durable.store.url,
                    exc,
                )
        finally:
            try:
                if self._lease.exception() is None:
                    self._lease.result().release()
            except CheckpointError as exc:
                log.warning("releasing the writer lease of %s failed: %s", self.durable.store.url, exc)
        return err

    # -- restoring ---------------------------------------------------------------------


def _nothing() -> None:
    return None
