"""Collective restore across the local tiers of the ranks and the durable tier.

The ranks agree first (one all-gather on ckpt's group): each sends the local checkpoints
its own tier holds for this world size and rank (step, save id, created; see
:mod:`ckpt.distributed.tiers`), rank 0 the durable tier's latest. The candidates are the
saves EVERY rank holds locally (the same save id on each) and the durable checkpoints,
newest first (:func:`_newer`: two saves of one run by the run's own count, a save of a run
that restored from the other one first, else by ``created``, then the step); a durable
checkpoint written from a save that the local tiers hold too is one candidate. For a candidate, each rank reads from
its local tier when it holds that very save and it reads, verifies and fits, else its
region of the durable global checkpoint (:func:`~ckpt.distributed.sharding.rank_view`),
and logs which tier and why. All or nothing across ranks, as
:mod:`ckpt.distributed.restore`: when any rank fails to read a candidate, every rank moves
on to the next (the next durable one down its lineage once a durable one was tried), logged;
only when every rank succeeded does any live object change. With ``step``, only that step's
candidates are tried. A world size other than the one that saved finds no local candidate
(logged) and reshards from the durable tier.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import MutableMapping
from typing import Any

import torch.distributed as dist

from ckpt.errors import CheckpointError, CorruptCheckpointError, NoCheckpointError
from ckpt.state.dataloader import untracked_if_refused
from ckpt.state.restore import as_mapping
from ckpt.storage.commit import load_manifest
from ckpt.storage.manifest import Manifest
from ckpt.storage.store import Store
from ckpt.storage.tier_checks import created
from ckpt.types import CheckpointInfo

from . import interrupts
from .exchange import Failed, check_parts, entering, gather_all
from .restore import _Damaged, _older, _prepare, failures, load_on_every_rank
from .sharding import rank_view
from .tiers import RankTier, Version, base_of, identity, prepare_local, save_of

log = logging.getLogger("ckpt")


@dataclasses.dataclass(frozen=True)
class Candidate:
    step: int
    save: str | None  # None: a durable checkpoint not written by a rank tier
    created: float
    durable: bool  # the durable tier holds it
    local: bool  # every rank's local tier holds it
    base: str | None = None  # the save its run restored from

    @property
    def key(self) -> tuple[float, int, int]:
        return (self.created, self.step, self.local)

    def describe(self) -> str:
        where = " and ".join(n for n, held in (("local", self.local), ("durable", self.durable)) if held)
        return f"step {self.step} ({where})"


@dataclasses.dataclass
class Restored:
    info: CheckpointInfo
    candidate: Candidate
    #: the tier this rank read from ("local" or "durable") and its local manifest, if local
    tier: str
    local_manifest: Manifest | None


def _durable_version(durable: Store, step: int | None, below: int | None = None) -> Version | None:
    """The durable tier's latest (or ``step``, or the newest on the lineage before ``below``)."""
    try:
        if below is not None:
            older = _older(durable, below)
            if older is None:
                return None
            m = load_manifest(durable, older)
        else:
            m = load_manifest(durable, step)
    except NoCheckpointError:
        return None
    except CorruptCheckpointError as exc:
        log.warning("restore: the durable tier %s holds no readable checkpoint there (%s)", durable.url, exc)
        return None
    return Version(m.step, save_of(m) or "", created(m), base_of(m))


def _merge(
    locals_: list[dict[int, Version]], durable: Version | None, tried: set[tuple[int, str | None]]
) -> list[Candidate]:
    """Every candidate not tried yet, newest first."""
    out: dict[tuple[int, str | None], Candidate] = {}
    first = locals_[0]
    for step, v in first.items():
        held = [loc.get(step) for loc in locals_]
        if all(h is not None and h.save == v.save for h in held):
            out[(step, v.save)] = Candidate(step, v.save, max(h.created for h in held if h), False, True, v.base)
    if durable is not None:
        save = durable.save or None
        c = out.get((durable.step, save))
        out[(durable.step, save)] = (
            dataclasses.replace(c, durable=True)
            if c is not None
            else Candidate(durable.step, save, durable.created, True, False, durable.base)
        )
    return sorted((c for k, c in out.items() if k not in tried), key=functools.cmp_to_key(_newer), reverse=True)


def _counter(save: str | None) -> tuple[str, int] | None:
    """(run, n) of a save id ``<run>-<n>`` (see DistributedCheckpointer.save)."""
    run, _, n = (save or "").rpartition("-")
    return (run, int(n)) if run and n.isdigit() and len(n) < 19 else None


def _newer(a: Candidate, b: Candidate) -> int:
    """> 0 when ``a`` is newer than ``b``. Saves of one run are ordered by the run's own count,
    a save whose run restored from the other is newer; only then the clocks of the nodes
    (``created``) decide, then the step, then the local tiers (the faster)."""
    ra, rb = _counter(a.save), _counter(b.save)
    if ra is not None and rb is not None and ra[0] == rb[0] and ra[1] != rb[1]:
        return 1 if ra[1] > rb[1] else -1
    if a.base is not None and a.base == b.save:
        return 1
    if b.base is not None and b.base == a.save:
        return -1
    return (a.key > b.key) - (a.key < b.key)


@interrupts.deferred()
def restore_tiers(
    tier: RankTier, durable: Store, plugins: Any, group: Any, state: Any, *, step: int | None
) -> Restored:
    """Restore the newest checkpoint across the tiers on every rank (see the module docstring)."""
    rank = dist.get_rank(group)
    what = f"collective restore from the tiers of {durable.url}"
    entering(group, what)
    err: BaseException | None = None
    out: Any
    live: MutableMapping[str, Any] = {}
    try:
        mapping, _ = as_mapping(state, plugins)
        if not isinstance(mapping, MutableMapping):
            raise CheckpointError(f"restore needs a mutable mapping, got {type(mapping).__name__}")
        live = mapping
        mine = {s: v for s, v in tier.versions().items() if step is None or s == step}
        out = (mine, _durable_version(durable, step) if rank == 0 else None)
    except BaseException as exc:  # noqa: BLE001 - reported to every rank
        err, out = exc, Failed(rank, exc)
    outs = gather_all(group, out, what, err)
    check_parts(outs, err, what)
    locals_ = [o[0] for o in outs]
    head: Version | None = outs[0][1]
    mine = locals_[rank]
    if not mine and tier.store.steps():
        log.info(
            "restore: rank %d's local tier %s holds no checkpoint of this world size and rank", rank, tier.store.url
        )
    tried: set[tuple[int, str | None]] = set()
    skipped: list[str] = []
    # the DataLoaders tracked for candidates: untracked again when every one is refused
    with untracked_if_refused() as tracked:
        while True:
            candidates = _merge(locals_, head, tried)
            if not candidates:
                if not skipped:
                    raise NoCheckpointError(
                        f"{what}: no checkpoint{'' if step is None else f' of step {step}'} in either tier"
                    )
                raise CorruptCheckpointError(f"{what}: no intact checkpoint; skipped {'; '.join(skipped)}")
            c = candidates[0]
            tried.add((c.step, c.save))
            err = None
            prepared: Any
            try:
                prepared = _attempt(tier, durable, plugins, live, c, mine.get(c.step), rank, tracked)
                result: Any = True
            except CorruptCheckpointError as exc:
                err, result = exc, _Damaged(rank, exc)
            except CheckpointError as exc:
                # a local-only candidate that does not fit is passed over; anything the durable
                # copy refuses (a live state of another shape) would refuse every candidate
                err, result = exc, (_Damaged(rank, exc) if not c.durable else Failed(rank, exc))
            except BaseException as exc:  # noqa: BLE001
                err, result = exc, Failed(rank, exc)
            failed = failures(group, result, err, what)
            if not failed:
                break
            skipped.append(f"{c.describe()} (rank {failed[0].rank}: {failed[0].message})")
            log.warning(
                "restore: %s is damaged on rank %d (%s); trying an older one",
                c.describe(),
                failed[0].rank,
                failed[0].message,
            )
            if c.durable and step is None:  # the next durable candidate down its lineage
                err = None
                older: Any = None
                if rank == 0:
                    try:
                        older = _durable_version(durable, None, below=c.step)
                    except BaseException as exc:  # noqa: BLE001
                        err, older = exc, Failed(rank, exc)
                olders = gather_all(group, older, what, err)
                check_parts(olders, err, what)
                head = olders[0]
    values, source, manifest, why = prepared
    url = tier.store.url if source == "local" else durable.url
    info = CheckpointInfo.from_manifest(manifest, url)
    load_on_every_rank(group, live, values, plugins, info, strict=True, what=what)
    level = logging.INFO if source == "local" and not skipped else logging.WARNING
    log.log(
        level,
        "rank %d restored step %d from the %s tier %s%s%s",
        rank,
        c.step,
        source,
        url,
        f" ({why})" if why else "",
        f" after skipping {'; '.join(skipped)}" if skipped else "",
    )
    return Restored(info, c, source, manifest if source == "local" else None)


def _attempt(
    tier: RankTier,
    durable: Store,
    plugins: Any,
    live: Any,
    c: Candidate,
    mine: Version | None,
    rank: int,
    tracked: list[Any],
) -> tuple[dict[str, Any], str, Manifest, str]:
    """Read, verify and fit candidate ``c`` on this rank: (values, tier, manifest, why that
    tier); ``tracked`` receives the DataLoaders tracked for it."""
    why = ""
    if mine is not None and c.save is not None and mine.save == c.save:
        try:
            manifest = tier.load(c.step)
            if identity(manifest, tier.world, tier.rank) != c.save:
                raise CorruptCheckpointError(f"step {c.step} of {tier.store.url} changed meanwhile")
            values, _, _ = prepare_local(tier.store, plugins, manifest, live, tracked=tracked)
            return values, "local", manifest, ""
        except CheckpointError as exc:
            if not c.durable:
                raise
            why = f"its local copy is unusable: {exc}"
            log.warning(
                "restore: rank %d: step %d of the local tier %s is unusable (%s)", rank, c.step, tier.store.url, exc
            )
    elif mine is not None:
        why = "its local tier holds another save of that step"
    else:
        why = "its local tier does not hold it"
    if not c.durable:  # never: every rank holds a local-only candidate
        raise CorruptCheckpointError(f"step {c.step}: {why}")
    manifest = load_manifest(durable, c.step)
    if (save_of(manifest) or None) != c.save:
        raise CorruptCheckpointError(f"step {c.step} of {durable.url} changed meanwhile")
    values, _, _, _ = _prepare(
        durable, plugins, rank_view(manifest, rank), live, strict=True, place=None, tracked=tracked
    )
    return values, "durable", manifest, why
