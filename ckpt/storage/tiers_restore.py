"""Restoring across the two tiers (:class:`TierRestore`, the restore half of
:class:`ckpt.storage.tiers.Tiers`; the ranking is described in that module's docstring).

The local tier's latest checkpoint is read, verified and (while the durable tier has not
answered yet) loaded before the durable tier's latest is known; the two are then ranked,
and a newer durable checkpoint is restored over the local one, all or nothing.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from ckpt.errors import CheckpointError, CorruptCheckpointError, NoCheckpointError
from ckpt.snapshot.executor import serial_pool
from ckpt.storage import tier_checks
from ckpt.storage.lineage import find_latest, parse_manifest, read_lineage
from ckpt.storage.manifest import Manifest
from ckpt.storage.store import Store
from ckpt.types import CheckpointInfo

log = logging.getLogger("ckpt")

#: ``restore(store, manifest) -> info``: loads one checkpoint into the live objects, all or nothing
RestoreFn = Callable[[Store, Manifest], CheckpointInfo]


@dataclass(frozen=True)
class Tier:
    name: str  # "local" or "durable"
    store: Store
    rank: int  # 0 for the faster tier: wins ties


class TierRestore:
    """Restore across :attr:`local` and :attr:`durable` (mixed into :class:`ckpt.storage.tiers.Tiers`)."""

    local: Tier
    durable: Tier
    #: the durable tier's latest, prefetched (None: ask again)
    _head: Future[Any] | None
    #: the durable tier opened (its keys attached), on the tiers' thread
    _opened: Future[Any]
    #: the newest checkpoint the local tier holds of this session (None: unknown)
    _newest_local: int | None

    def _durable_latest(self) -> Any:
        raise NotImplementedError

    def restore(
        self,
        restore_fn: RestoreFn,
        step: int | None = None,
        *,
        prepare_fn: Callable[[Store, Manifest], Any] | None = None,
        apply_fn: Callable[[Any], CheckpointInfo] | None = None,
        after_fn: Callable[[CheckpointInfo], None] | None = None,
    ) -> tuple[CheckpointInfo, Manifest, str]:
        """Restore the newest checkpoint across the tiers that is complete and verifies
        (``step``: that step, from the first tier holding an intact copy).

        With ``prepare_fn`` and ``apply_fn`` (``restore_fn``'s two halves: read and check,
        then load), the local tier's latest checkpoint is read while the durable tier's latest
        is fetched on another thread, so a restart from the local tier does not wait on the
        durable store's round trips. If it verified and the durable tier has not answered yet,
        it is loaded at once (a fresh process's durable client alone takes ~0.25 s to start).
        Should the durable tier's latest then rank first, that one is restored over it, all or
        nothing as always; a damaged one falls back to the next candidate as always (the local
        checkpoint, if it is next, is not read again). Any other error (a misfit, a store that
        fails) is raised as without the early load, but the live objects then hold the local
        checkpoint, whole; the log says so. ``apply_fn`` runs no ``ckpt_after_restore`` hooks:
        ``after_fn(info)`` is called once the local checkpoint loaded that way is the one
        restored (``restore_fn`` runs its own), so the hooks see only what the live objects
        end up holding.

        Returns its info, its manifest and the name of the tier it came from.
        :raises NoCheckpointError: neither tier holds a checkpoint (of ``step``).
        :raises CorruptCheckpointError: none that the tiers hold is intact (all named).
        """
        tiers = (self.local, self.durable)
        if step is not None:
            return self._restore_step(restore_fn, step, tiers)
        heap: list[tuple[int, float, int, int, int, Manifest]] = []
        empty: list[str] = []
        why: list[str] = []
        held = False
        latests: dict[str, Manifest] = {}
        side = serial_pool("ckpt-tiers-rank")
        try:
            durable_latest, self._head = self._head or side.submit(self._durable_latest), None
            local_latest = self._latest_or_error(self.local)
            early: tuple[Manifest, Any, BaseException | None] | None = None
            #: the local checkpoint already loaded into the live objects (see above)
            applied: tuple[Manifest, CheckpointInfo] | None = None
            m = None if isinstance(local_latest, BaseException) else local_latest.manifest
            #: the early load's error, raised once it changed the live objects (a raw object
            #: rewritten in place between its two reads): they match no checkpoint then
            damaged: CheckpointError | None = None
            if prepare_fn is not None and apply_fn is not None and m is not None:
                try:
                    early = (m, prepare_fn(self.local.store, m), None)
                    if not durable_latest.done():
                        applied = (m, apply_fn(early[1]))
                except CheckpointError as exc:  # raised, or passed over, if this one wins
                    damaged = exc if early is not None else None  # (the load failed, not the read)
                    early = (m, None, exc)
            found = {"local": local_latest, "durable": _result_or_error(durable_latest)}
        finally:
            side.shutdown(wait=False)

        def attempt(tier: Tier, manifest: Manifest) -> CheckpointInfo:
            if early is not None and tier is self.local and manifest is early[0]:
                if early[2] is not None:
                    raise early[2]
                if applied is not None:
                    info = applied[1]
                else:
                    assert apply_fn is not None
                    info = apply_fn(early[1])
                if after_fn is not None:
                    after_fn(info)
                return info
            return restore_fn(tier.store, manifest)

        for tier in tiers:
            try:
                latest = found[tier.name]
                if isinstance(latest, BaseException):
                    raise latest
            except CheckpointError as exc:
                why.append(f"{tier.name} tier {tier.store.url}: {exc}")
                log.warning("restore: the %s tier %s cannot be read (%s)", tier.name, tier.store.url, exc)
                continue
            if latest.manifest is None:
                held = held or bool(latest.skipped)
                reason = "holds no readable checkpoint" if latest.skipped else "holds no checkpoint"
                log.info("restore: the %s tier %s %s", tier.name, tier.store.url, reason)
                empty.append(f"the {tier.name} tier {tier.store.url} {reason}")
                if latest.skipped:
                    why.append(f"{tier.name} tier {tier.store.url}: {reason}")
                continue
            held = True
            latests[tier.name] = latest.manifest
        ahead = tier_checks.ahead(self.local.store, self.durable.store, latests)
        for tier in tiers:
            if tier.name in latests:
                _push(heap, tier, latests[tier.name], ahead if tier.name == ahead else None)
        expanded: set[str] = set()
        first = True
        while heap:
            _ahead_, _key, _step, index, _n, manifest = heapq.heappop(heap)
            tier = tiers[index]
            if not first:
                log.warning(
                    "restore: falling back to step %d of the %s tier %s", manifest.step, tier.name, tier.store.url
                )
            first = False
            try:
                info = attempt(tier, manifest)
            except CorruptCheckpointError as exc:
                why.append(f"step {manifest.step} of the {tier.name} tier: {exc}")
                log.warning(
                    "restore: step %d of the %s tier %s is missing data or corrupt (%s)",
                    manifest.step,
                    tier.name,
                    tier.store.url,
                    exc,
                )
                if tier.name not in expanded:
                    expanded.add(tier.name)
                    self._push_older(heap, tier, manifest.step)
                continue
            except CheckpointError as exc:
                if applied is not None and tier is not self.local:
                    log.warning(
                        "restore: step %d of the %s tier %s ranked first but cannot be restored (%s); "
                        "the live objects hold step %d of the local tier, loaded while the durable tier answered",
                        manifest.step,
                        tier.name,
                        tier.store.url,
                        exc,
                        applied[0].step,
                    )
                elif damaged is not None and tier is not self.local:
                    log.warning(
                        "restore: step %d of the %s tier %s ranked first but cannot be restored (%s); "
                        "the live objects are partly overwritten by step %d of the local tier, whose load "
                        "while the durable tier answered failed (%s): restore again before training",
                        manifest.step,
                        tier.name,
                        tier.store.url,
                        exc,
                        early[0].step if early is not None else -1,
                        damaged,
                    )
                raise
            if tier.rank and (empty or why):
                log.warning(
                    "restored step %d from the %s tier %s: %s",
                    manifest.step,
                    tier.name,
                    tier.store.url,
                    "; ".join(empty + why),
                )
            else:
                log.info("restored step %d from the %s tier %s", manifest.step, tier.name, tier.store.url)
            self._newest_local = manifest.step if tier is self.local else None
            return info, manifest, tier.name
        if not held:
            raise NoCheckpointError(f"no checkpoint in {self.local.store.url} or {self.durable.store.url}")
        raise CorruptCheckpointError("no intact checkpoint in either tier: " + "; ".join(why))

    @staticmethod
    def _latest_or_error(tier: Tier) -> Any:
        try:
            return find_latest(tier.store)
        except CheckpointError as exc:
            return exc

    def _push_older(self, heap: list[Any], tier: Tier, below: int) -> None:
        try:
            lineage, manifests = read_lineage(tier.store)
        except CheckpointError as exc:
            log.warning("restore: cannot read the lineage of the %s tier %s (%s)", tier.name, tier.store.url, exc)
            return
        for older in lineage.before(below):
            if older in manifests:
                _push(heap, tier, manifests[older])

    def _restore_step(
        self, restore_fn: RestoreFn, step: int, tiers: tuple[Tier, ...]
    ) -> tuple[CheckpointInfo, Manifest, str]:
        why: list[str] = []
        corrupt = False
        for tier in tiers:
            try:
                if tier is self.durable:
                    self._opened.result()
                manifest = parse_manifest(tier.store.read_manifest(step), step, tier.store.url)
                info = restore_fn(tier.store, manifest)
            except NoCheckpointError as exc:
                why.append(f"{tier.name} tier: {exc}")
                log.info("restore: step %d is not in the %s tier %s", step, tier.name, tier.store.url)
                continue
            except CorruptCheckpointError as exc:
                corrupt = True
                why.append(f"{tier.name} tier: {exc}")
                log.warning("restore: step %d of the %s tier %s is damaged (%s)", step, tier.name, tier.store.url, exc)
                continue
            log.info("restored step %d from the %s tier %s", step, tier.name, tier.store.url)
            self._newest_local = manifest.step if tier is self.local else None
            return info, manifest, tier.name
        kind = CorruptCheckpointError if corrupt else NoCheckpointError
        raise kind(f"no intact copy of step {step} in either tier: " + "; ".join(why))


_ORDER = itertools.count()


def _result_or_error(future: Future[Any]) -> Any:
    """The future's result, or the CheckpointError it raised (any other exception propagates)."""
    try:
        return future.result()
    except CheckpointError as exc:
        return exc


def _push(heap: list[Any], tier: Tier, manifest: Manifest, ahead: str | None = None) -> None:
    # a min-heap: the lineage's descendant (``ahead``) first, then the newest created, then the
    # higher step, then the faster tier
    key = (0 if ahead else 1, -tier_checks.created(manifest), -manifest.step, tier.rank, next(_ORDER), manifest)
    heapq.heappush(heap, key)
