"""The local tiers of a :class:`~ckpt.distributed.checkpointer.DistributedCheckpointer`:
local commits, background persists, the persist at close, and the restore's bookkeeping
(see :mod:`ckpt.distributed.tiers` for what a rank's local tier holds).

Every save commits, on the Checkpointer's commit thread, each rank's part to its own local
tier; the outcomes are gathered on the Checkpointer's group, so a failure on any rank
raises on every rank. A step divisible by ``persist_every`` is then committed as the
global collective checkpoint to the durable URL from the same staged host copy, on a
second background thread over a second gloo group, unless the previous persist still runs
on any rank: then every rank skips this one (logged), as the one-process tiers replace a
waiting request, so training never waits on the durable tier. :meth:`TierRun.close`
persists the newest local checkpoint, read back from the local tier, unless the durable
tier holds it; after an error (the ranks may be out of step) it persists nothing.

With ``encryption`` every rank's local tier and the durable tier share one descriptor,
agreed at construction (:mod:`ckpt.distributed.tier_crypto`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ckpt import config
from ckpt.errors import CheckpointError
from ckpt.security.keys import Encryption
from ckpt.storage.commit import new_run_id
from ckpt.storage.store import Store
from ckpt.storage.writer_lease import WriterLease
from ckpt.types import CheckpointInfo

from . import interrupts
from .coordinator import commit_collective
from .exchange import Failed, check_parts, entering, gather_all, same_step
from .tier_crypto import bind_ranks, local_descriptor
from .tiers import META, RankTier, part_from_local

log = logging.getLogger("ckpt")


def check_args(local: str | None, persist_every: Any, keep_last: Any, options: Any) -> None:
    """Refuse invalid tier arguments, and tier arguments without a tier."""
    if local is None:
        given = [
            name
            for name, value, default in (
                ("persist_every", persist_every, None),
                ("local_keep_last", keep_last, 2),
                ("local_storage_options", options, None),
            )
            if value != default
        ]
        if given:
            raise CheckpointError(f"Checkpointer: {', '.join(given)} needs a local tier (local=...), none is given")
        return
    if persist_every is not None and (
        isinstance(persist_every, bool) or not isinstance(persist_every, int) or persist_every < 1
    ):
        raise CheckpointError(f"persist_every must be a positive int, got {persist_every!r}")


class TierRun:
    """One Checkpointer's local tier on this rank and its persists (see the module docstring).

    Constructed collectively (every rank, same arguments, after the Checkpointer's groups).
    ``on_done`` receives each background persist's future (the Checkpointer's pending errors);
    ``prune`` is the durable tier's retention, run by the coordinator after each persist.
    """

    def __init__(
        self,
        local: str,
        durable: Store,
        group: Any,
        plugins: Any,
        *,
        persist_every: int | None,
        keep_last: int | None,
        storage_options: dict[str, Any] | None,
        take_over: bool | None,
        on_done: Callable[[Future[CheckpointInfo]], None],
        prune: Callable[[WriterLease, CheckpointInfo], None],
        compress: bool = False,
        encryption: Encryption | None = None,
    ) -> None:
        self.durable, self.group, self.plugins = durable, group, plugins
        self.encryption = encryption
        self.persist_every, self.take_over = persist_every, take_over
        self._on_done, self._prune = on_done, prune
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-dist-persist")
        self._persisting: Future[CheckpointInfo] | None = None
        #: (step, save id) of the newest local checkpoint and of the newest one persisted
        self.newest: tuple[int, str] | None = None
        self.persisted: tuple[int, str] | None = None
        #: the save id this run restored from (its saves record it: newer than it, whatever the clocks)
        self.base: str | None = None
        what = f"opening the local tiers of {durable.url}"
        tier: RankTier | None = None
        try:
            with interrupts.deferred():  # a Ctrl-C noted in here is raised after the cleanup below
                # the save ids of this run, shared by every rank
                run = [new_run_id()]
                dist.broadcast_object_list(run, src=0, group=group)
                self._run, self._saves = str(run[0]), 0
                self._persist_group = dist.new_group(
                    backend="gloo", timeout=timedelta(seconds=config.dist_timeout_seconds())
                )
                err: BaseException | None = None
                out: Any = True
                try:
                    tier = RankTier(
                        local,
                        durable,
                        rank=dist.get_rank(),
                        world=dist.get_world_size(),
                        keep_last=keep_last,
                        storage_options=storage_options,
                        take_over=take_over,
                    )
                    tier.store.compress = compress  # raw by default, as one process's local tier
                    if encryption is not None:
                        out = local_descriptor(tier.store)
                except BaseException as exc:  # noqa: BLE001 - refused on every rank
                    err, out = exc, Failed(dist.get_rank(), exc)
                outs = gather_all(group, out, what, err)
                check_parts(outs, err, what)
                assert tier is not None
                if encryption is not None:  # one descriptor for every tier (ckpt.distributed.tier_crypto)
                    bind_ranks(tier.store, durable, group, encryption, outs)
                # agreed once more, every tier open: a Ctrl-C noted while this rank waited in
                # the gathers above reaches every rank here (all close their tiers), rather
                # than being raised on this rank alone once the others hold a Checkpointer;
                # so does what the job's own SIGINT handler raises for it
                ok: Any = True
                err = None
                try:
                    interrupts.run_pending()
                except BaseException as exc:  # noqa: BLE001 - reported to every rank
                    err, ok = exc, Failed(dist.get_rank(), exc)
                check_parts(gather_all(group, ok, what, err, last=True), err, what)
        except BaseException:
            if tier is not None:
                tier.close()
            self._pool.shutdown(wait=False)
            raise
        self.tier = tier

    def next_save(self) -> str:
        """The id of the next collective save (the same on every rank: saves are in the same order)."""
        self._saves += 1
        return f"{self._run}-{self._saves}"

    def commit(
        self,
        step: int,
        part: Any,
        local: dict[str, torch.Tensor],
        err: BaseException | None,
        save: str,
        protect: set[int],
    ) -> CheckpointInfo:
        """On the commit thread: this rank's part to its local tier, then persist when due."""
        rank = dist.get_rank()
        info: Any = None
        busy = self._persisting is not None and not self._persisting.done()
        out: Any = part if err is not None else busy
        if err is None:
            try:
                info = self.tier.commit(
                    self.plugins, step=step, part=part, tensors=local, save=save, base=self.base, protect=protect
                )
            except BaseException as exc:  # noqa: BLE001 - reported to every rank
                err, out = exc, Failed(rank, exc)
        what = f"saving step {step} to the local tiers of {self.durable.url}"
        pairs = gather_all(self.group, (step, out), what, err, last=True)
        check_parts(pairs, err, what)
        outs = same_step(step, pairs, what)
        self.newest = (step, save)
        if self.persist_every is not None and step % self.persist_every == 0:
            if any(outs):
                log.warning(
                    "persisting step %d to %s skipped: the durable tier is still busy with the one before",
                    step,
                    self.durable.url,
                )
                return info
            prev = self._persisting
            if prev is not None:  # done on every rank (its error is pending already)
                prev.exception()
            fut = self._pool.submit(self._persist, step, part, local, save)
            fut.add_done_callback(self._on_done)
            self._persisting = fut
        return info

    def wait(self) -> None:
        """Wait for the background persist (its failure is the Checkpointer's pending error)."""
        fut = self._persisting
        if fut is not None:
            fut.exception()

    def _persist(
        self, step: int, part: Any, local: Mapping[str, torch.Tensor], save: str, err: BaseException | None = None
    ) -> CheckpointInfo:
        """The global collective checkpoint of save ``save`` to the durable tier (its own group)."""
        info = commit_collective(
            self.durable,
            self.plugins,
            self._persist_group,
            step=step,
            part=part,
            local=local,
            err=err,
            encryption=self.encryption,
            take_over=self.take_over,
            after=self._prune,
            meta={META: {"save": save, "base": self.base}},
        )
        self.persisted = (step, save)
        log.info("persisted step %d to the durable tier %s", step, self.durable.url)
        return info

    def restored(self, step: int, save: str | None, *, durable: bool, local_manifest: Any) -> None:
        """After a restore of save ``save`` (step ``step``): the next saves continue from it."""
        self.tier.restored(local_manifest)
        self.base = save
        if save is not None:
            self.newest = (step, save)  # persisted at close unless the durable tier holds it
            if durable:
                self.persisted = self.newest

    @interrupts.deferred()
    def close(self, *, persist: bool) -> CheckpointError | None:
        """Finish the persists, persist the newest local checkpoint (read back from the local
        tier) unless ``persist`` is false, release the local tier; returns that persist's error.
        Interrupted (a second Ctrl-C: see :mod:`ckpt.distributed.interrupts`), it releases the
        local tier without waiting for the persist under way."""
        what = f"closing the local tiers of {self.durable.url}"
        entering(self.group, what)  # (left at a second Ctrl-C while it waits: still told)
        stopped = False
        try:
            self.wait()
            newest = self.newest
            due = newest is not None and newest != self.persisted
            # every rank persists, or none, agreed before any rank decides alone: a rank closing
            # after an error (a KeyboardInterrupt leaving its ``with`` block), or one that did
            # not record the last persist (its after-commit hook failed), would otherwise leave
            # the others waiting for it in the persist's gathers
            try:
                # a rank interrupted (Ctrl-C) while it closes wants no persist either
                wants = gather_all(
                    self.group, (due, persist and not interrupts.pending()), what, report=False, last=True
                )
                check_parts(wants, None, what)
            except CheckpointError as exc:  # the other ranks gone, or out of step
                log.error("%s", exc)
                return exc if persist and due else None
            if not all(d for d, _ in wants):  # persisted (the ranks that did not record it failed after)
                return None
            if not all(p for _, p in wants):
                log.warning(
                    "closing after an error%s: the newest local checkpoint is not persisted to %s",
                    " on another rank" if persist and due else "",
                    self.durable.url,
                )
                return None
            assert newest is not None
            err: BaseException | None = None
            part: Any
            tensors: dict[str, torch.Tensor] = {}
            try:
                part, tensors = part_from_local(self.tier.store, self.plugins, self.tier.load(newest[0]))
            except BaseException as exc:  # noqa: BLE001 - reported to every rank
                err, part = exc, Failed(dist.get_rank(), exc)
            try:
                self._pool.submit(self._persist, newest[0], part, tensors, newest[1], err).result()
            except CheckpointError as exc:  # the local checkpoint stands
                log.error(
                    "persisting the newest local checkpoint (step %d) to %s failed: %s",
                    newest[0],
                    self.durable.url,
                    exc,
                )
                return exc
            return None
        except BaseException as exc:
            stopped = not isinstance(exc, Exception)
            raise
        finally:
            try:
                self._pool.shutdown(wait=not stopped)
            finally:
                self.tier.close()
