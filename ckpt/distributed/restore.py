"""Collective restore: every rank loads its part of a checkpoint into its live objects.

Rank 0 picks the step (the latest when none is given) and every rank reads that manifest.
Without a step, as in a single-process restore, a newest checkpoint that is damaged on any
rank (its manifest, or an object that rank reads, missing or corrupt) is skipped by every
rank for the next older intact one on its lineage, logged: the ranks agree on each
candidate with one all-gather of their outcome. With a step, damage raises on every rank.
Each rank takes :func:`~ckpt.distributed.sharding.rank_view` of it: with the same world size
its own per-rank values, with another one those of ``rank % saved world size`` (a warning
says so). A live DTensor (FSDP2 parameters and optimizer moments, tensor-parallel weights)
receives only its own box, read from the stored shards that overlap it, whatever mesh or
world size saved them; replicated and plain tensors are read whole on every rank.

All or nothing across ranks: every rank reads, verifies and checks everything first; only
when every rank reports success does any rank load into its live objects. A failure on any
rank raises CheckpointError on every rank and changes nothing live. From local disk, whole
tensors, and DTensor boxes made of whole stored pieces (restored at the layout that saved
them), are verified by their stored bytes and decoded straight into the live (local) tensors
afterwards, as in a single process (:mod:`ckpt.state.in_place`); a failure of that second
pass on any rank (an object rewritten in between) raises on every rank, saying the live
tensors may be partly overwritten.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import torch.distributed as dist

from ckpt.errors import CheckpointError, CorruptCheckpointError, NoCheckpointError
from ckpt.hooks.manager import get_plugins
from ckpt.io.memory import sharing_memory
from ckpt.io.reader import Reader
from ckpt.security.envelope import open_store
from ckpt.security.keys import Encryption
from ckpt.state import tree as treemod
from ckpt.state.capture import load_into
from ckpt.state.dataloader import untracked_if_refused
from ckpt.state.in_place import Box, InPlace, box_in_place, decode_in_place, read_verified, verify_boxes
from ckpt.state.placement import DEFAULT_LOCATION, Placer, placer
from ckpt.state.restore import as_mapping, decode_values, fit_live
from ckpt.storage.commit import load_manifest
from ckpt.storage.lineage import read_lineage
from ckpt.storage.manifest import Manifest
from ckpt.storage.store import Store
from ckpt.types import CheckpointInfo

from . import interrupts
from .exchange import Failed, check_parts, ckpt_group, entering, gather_all
from .sharding import is_dtensor, local_box, rank_view, read_into_dtensor

log = logging.getLogger("ckpt")


class _NoCheckpoint(Failed):
    """What rank 0 sends when the store holds no (such) checkpoint: every rank raises
    NoCheckpointError, as a single-process restore does."""


class _Damaged(Failed):
    """A rank's outcome when the candidate checkpoint is missing or corrupt in its reads (in
    a restore from the tiers: in every tier it could read it from), or does not fit there
    while an older one may."""

    #: the ranks may go on to an older candidate (:func:`failures`)
    ends = False


def failures(group: Any, outcome: Any, err: BaseException | None, what: str) -> list[Failed]:
    """Every rank's ``outcome`` of preparing one candidate checkpoint gathered: the ranks that
    failed (none: every rank prepared it). A failure other than damage (a misfit: an older
    candidate would not fit either) raises on every rank (:func:`check_parts`)."""
    outcomes = gather_all(group, outcome, what, err)
    failed = [o for o in outcomes if isinstance(o, Failed)]
    if any(not isinstance(o, _Damaged) for o in failed):
        check_parts(outcomes, err, what)
    return failed


def _first(store: Store, step: int | None) -> int:
    """The step to try first: ``step``, or the latest (when its manifest is unreadable, the
    newest readable one on the lineage)."""
    if step is not None:
        return step
    try:
        return load_manifest(store, None).step
    except CorruptCheckpointError:
        lineage, _ = read_lineage(store)
        if not lineage.line:
            raise
        return lineage.line[0]


def _older(store: Store, step: int) -> int | None:
    """The newest readable checkpoint ``step`` continues from (its lineage, never an
    abandoned step), as :func:`ckpt.state.restore.restore_latest` falls back."""
    lineage, manifests = read_lineage(store)
    return next((s for s in lineage.before(step) if s in manifests), None)


@interrupts.deferred()
def restore(
    url: str,
    state: Any,
    *,
    step: int | None = None,
    strict: bool = True,
    map_location: Any = None,
    storage_options: dict[str, Any] | None = None,
    encryption: Encryption | None = None,
) -> CheckpointInfo:
    """``ckpt.restore`` on every rank of the default group (see the module docstring)."""
    group = ckpt_group()
    rank = dist.get_rank()
    what = f"collective restore from {url}"
    entering(group, what)
    plugins = get_plugins()
    err: BaseException | None = None
    chosen: Any = None
    try:
        place = placer(map_location)
        mapping, _ = as_mapping(state, plugins)
        if not isinstance(mapping, MutableMapping):
            raise CheckpointError(f"restore needs a mutable mapping, got {type(mapping).__name__}")
        live: MutableMapping[str, Any] = mapping
        store = Store(url, storage_options)
        open_store(store, encryption)  # every rank: a missing or wrong key fails before any data is read
        if rank == 0:
            chosen = _first(store, step)
    except NoCheckpointError as exc:
        err, chosen = exc, _NoCheckpoint(rank, exc)
    except BaseException as exc:  # noqa: BLE001 - reported to every rank
        err, chosen = exc, Failed(rank, exc)
    picked = gather_all(group, chosen, what, err)
    if isinstance(picked[0], _NoCheckpoint):
        raise err if err is not None else NoCheckpointError(f"{what}: {picked[0].message}")
    check_parts(picked, err, what)
    # loaders this rank tracks for the restore are untracked again when any rank refuses it
    with untracked_if_refused() as tracked:
        skipped: list[str] = []
        candidate = picked[0]
        while True:
            prepared: Any = None
            err = None
            try:
                manifest = load_manifest(store, candidate)
                view = rank_view(manifest, rank)
                values, missing, unexpected, later = _prepare(
                    store, plugins, view, live, strict=strict, place=place, in_place=store.local, tracked=tracked
                )
                prepared = True
            except CorruptCheckpointError as exc:
                err, prepared = exc, _Damaged(rank, exc)
            except BaseException as exc:  # noqa: BLE001
                err, prepared = exc, Failed(rank, exc)
            failed = failures(group, prepared, err, what)
            if not failed:
                break
            if step is not None:  # damage of an explicit step raises on every rank
                if err is not None:
                    raise err
                raise CorruptCheckpointError(
                    f"{what}: step {candidate} is damaged on rank {failed[0].rank}: {failed[0].message}"
                )
            skipped.append(f"step {candidate} (rank {failed[0].rank}: {failed[0].message})")
            older: Any = None
            err = None
            if rank == 0:
                try:
                    older = _older(store, candidate)
                except BaseException as exc:  # noqa: BLE001
                    err, older = exc, Failed(rank, exc)
            olders = gather_all(group, older, what, err)
            check_parts(olders, err, what)
            if olders[0] is None:
                raise CorruptCheckpointError(f"{what}: no intact checkpoint; skipped {'; '.join(skipped)}")
            log.warning(
                "collective restore from %s: step %d is damaged on rank %d; trying step %d",
                url,
                candidate,
                failed[0].rank,
                olders[0],
            )
            candidate = olders[0]
        if skipped:
            log.warning("restored step %d of %s after skipping %s", manifest.step, url, "; ".join(skipped))
        # every rank has read, verified and checked everything: decode in place, then load
        if later is not None:  # a late failure raises on every rank
            on_every_rank(group, lambda: decode_in_place(later, plugins.codecs), what)
    info = CheckpointInfo.from_manifest(manifest, store.url)
    if not strict:
        info = info.with_keys(missing=missing, unexpected=unexpected)
    load_on_every_rank(group, live, values, plugins, info, strict=strict, what=what)
    return info


def load_on_every_rank(
    group: Any,
    live: MutableMapping[str, Any],
    values: Mapping[str, Any],
    plugins: Any,
    info: CheckpointInfo,
    *,
    strict: bool,
    what: str,
) -> None:
    """Load the decoded ``values`` into the ``live`` objects, agree, then run the
    after-restore hooks and agree again: an adapter or hook failing on one rank raises on
    every rank (the failing one with its own error), so a job never goes on with some ranks
    restored and one not. The hooks run only once every rank has loaded, on every rank: a
    hook may run collectives of its own (a barrier, a broadcast of what it restored) without
    meeting a rank that has already left for ckpt's agreement."""

    def load() -> None:
        for key, value in values.items():
            live[key] = load_into(live[key], value, treemod.escape(key), plugins, strict=strict)

    on_every_rank(group, load, what)
    on_every_rank(group, lambda: plugins.after_restore(info=info, state=live), what, last=True)


def on_every_rank(group: Any, fn: Callable[[], object], what: str, *, last: bool = False) -> None:
    """Run ``fn`` on this rank, then agree: if it raised on any rank, raise on every rank
    (the failing one its own error, the others a CheckpointError naming it). ``last``: the
    protocol's last exchange (:func:`~ckpt.distributed.exchange.gather_all`)."""
    ok: Any = True
    err: BaseException | None = None
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - reported to every rank
        err, ok = exc, Failed(dist.get_rank(), exc)
    check_parts(gather_all(group, ok, what, err, last=last), err, what)


def _prepare(
    store: Store,
    plugins: Any,
    manifest: Manifest,
    state: Mapping[str, Any],
    *,
    strict: bool,
    place: Placer | None,
    in_place: bool = False,
    tracked: list[Any] | None = None,
) -> tuple[dict[str, Any], list[str], list[str], InPlace | None]:
    """As :func:`ckpt.state.restore._prepare`, reading only this rank's box of each live
    DTensor. With ``in_place`` (a store on local disk), whole tensors are only verified, as
    in a single process: the caller decodes the returned :class:`InPlace` into the live
    tensors once every rank has verified its reads."""
    refused: set[str] = set()
    with untracked_if_refused() as mine:  # refused here: this rank's loaders as they were
        keys, live, wanted, missing, unexpected = fit_live(
            store, plugins, manifest, state, strict=strict, not_in_place=refused, tracked=mine
        )
        if tracked is not None:
            tracked.extend(mine)
        boxed = [p for p in wanted if is_dtensor(live.get(p))]
        whole = [p for p in wanted if p not in set(boxed)]
        in_place = in_place and place is None
        tensors, later = read_verified(store, plugins.codecs, manifest, live, whole, refused, in_place=in_place)
        if place is not None:
            tensors = {p: place(t, manifest.devices.get(p, DEFAULT_LOCATION)) for p, t in tensors.items()}
        boxes = _boxes_in_place(manifest, live, boxed, refused, later, plugins.codecs) if in_place else {}
        if boxes:
            verify_boxes(store, plugins.codecs, boxes)
            if later is None:
                later = InPlace(store, None, {}, manifest.step)
            later.boxes.update(boxes)
        if later is not None:
            tensors.update(later.values())
        reader = Reader(store, plugins.codecs)
        for p in boxed:
            if p not in boxes:
                tensors[p] = read_into_dtensor(store, plugins.codecs, manifest, p, live[p], reader=reader)
        return decode_values(manifest, state, keys, tensors, plugins, strict=strict), missing, unexpected, later


def _boxes_in_place(
    manifest: Manifest,
    live: Mapping[str, Any],
    boxed: list[str],
    refused: set[str],
    later: InPlace | None,
    codecs: Any,
) -> dict[str, Box]:
    """The live DTensors of ``boxed`` whose box (this rank's shard) is decoded straight into
    their local tensor once every rank has verified (:func:`ckpt.state.in_place.box_in_place`),
    as whole tensors are: no fresh memory for the box, no copy of it by the adapters. Not one
    whose local memory another live tensor read in place shares (tied weights are read into
    fresh memory and loaded one after the other, as before)."""
    boxes: dict[str, Box] = {}
    for p in boxed:
        if p in refused:
            continue
        value = live[p]
        offsets, shape = local_box(value, p)
        local = value.to_local()
        entry = manifest.tensors[p]
        if tuple(local.shape) == shape and box_in_place(entry, offsets, local, codecs):
            boxes[p] = Box(entry, offsets, shape, local, value)
    whole = later.live if later is not None else {}
    named = [*((p, b.out) for p, b in boxes.items()), *whole.items()]
    for group in sharing_memory(named):
        for _, _, p in group:
            boxes.pop(p, None)
    return boxes
