"""The local tier of one rank under torch.distributed (see :mod:`ckpt.storage.tiers`).

``ckpt.Checkpointer(url, local=LOCAL, persist_every=K)`` on several ranks gives each rank
its own local store, ``<LOCAL>/rank-<r:05d>`` (ranks of one node sharing ``LOCAL`` never
collide; ``tier.json`` there binds it to the durable URL and records the world size and
the rank). Every save commits, on every rank, an ordinary single-process checkpoint of
what that rank needs to restore itself at the same world size: its own tree (replicated
values included: a node-local tier cannot read another node's disk), its per-rank values,
and each DTensor leaf as its local shard, stored as a plain tensor of the local shape
whose box (global offsets and shape) the manifest's ``meta`` records. ``meta`` also
carries the identity of the collective save: its id (shared by every rank of that save),
the world size and the rank, so that a restore never mixes ranks' checkpoints of different
saves or runs.

Because each rank's local store holds complete checkpoints with their own manifests,
per-rank retention (``local_keep_last``) and GC are the one-process ones. The durable tier
receives the ordinary global collective checkpoint (:func:`ckpt.distributed.coordinator.
commit_collective`), written from the same staged host copy (or, at close, from the
local checkpoint read back by :func:`part_from_local`), so it loads with ``ckpt.load`` /
``ckpt.restore`` at any world size.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch

from ckpt.api import write_checkpoint
from ckpt.errors import CheckpointError, CorruptCheckpointError
from ckpt.io.hashing import hash_bytes
from ckpt.io.plan import ReadPlan
from ckpt.io.reader import read_tensors
from ckpt.snapshot.executor import io_pool
from ckpt.state.restore import decode_values, fit_live
from ckpt.storage import retention, tier_checks
from ckpt.storage.commit import latest_for_save, load_manifest
from ckpt.storage.manifest import DTYPE_ITEMSIZE, Manifest, Shard, TensorEntry
from ckpt.storage.store import Store
from ckpt.storage.writer_lease import WriterLease
from ckpt.types import CheckpointInfo

from .coordinator import LocalPart
from .sharding import is_dtensor, local_box

log = logging.getLogger("ckpt")

#: the key of ``Manifest.meta`` with a rank tier's identity (local and durable checkpoints)
META = "ckpt.rank_tier"


def rank_url(local: str, rank: int) -> str:
    """The local store of ``rank`` under the local tier URL ``local``."""
    return f"{str(local).rstrip('/')}/rank-{rank:05d}"


@dataclasses.dataclass(frozen=True)
class Version:
    """One rank's local checkpoint of a collective save (what the ranks compare)."""

    step: int
    save: str
    created: float
    #: the save the run that wrote it restored from (None: a fresh run, or unknown)
    base: str | None = None


class RankTier:
    """Rank ``rank``'s local store of a world of ``world`` ranks (see the module docstring)."""

    def __init__(
        self,
        local: str,
        durable: Store,
        *,
        rank: int,
        world: int,
        keep_last: int | None,
        storage_options: dict[str, Any] | None = None,
        take_over: bool | None = None,
    ) -> None:
        retention.retained([], keep_last=keep_last)  # validates
        self.store = Store(rank_url(local, rank), storage_options)
        self.store.direct_writes = False  # a restart reads it at once: keep it in the page cache
        if self.store.url == durable.url or Store(local, storage_options).url == durable.url:
            raise CheckpointError(f"the local tier and the durable tier are the same store: {durable.url}")
        self.rank, self.world, self.keep_last = rank, world, keep_last
        tier_checks.bind(self.store, durable, extra={"world_size": world, "rank": rank})
        self.lease = WriterLease(self.store, take_over=take_over, what=f"Checkpointer (local tier of rank {rank})")
        self._parent: Manifest | None = None
        self._parent_loaded = False

    # -- saving --------------------------------------------------------------------------
    def commit(
        self,
        plugins: Any,
        *,
        step: int,
        part: LocalPart,
        tensors: Mapping[str, torch.Tensor],
        save: str,
        base: str | None,
        protect: set[int],
    ) -> CheckpointInfo:
        """Commit this rank's part of save ``save`` (step ``step``) to the local store, then prune it."""
        if not self._parent_loaded:
            self._parent, self._parent_loaded = latest_for_save(self.store).manifest, True
        boxes = {p: [list(d[3]), list(d[2])] for p, d in part.tensors.items() if d[0] == "box"}
        devices = {p: d[6] if d[0] == "box" else d[5] for p, d in part.tensors.items()}
        meta = {META: {"save": save, "base": base, "world_size": self.world, "rank": self.rank, "boxes": boxes}}
        self.lease.saving(step, self._parent, keep=protect)
        with io_pool() as pool:
            info = write_checkpoint(
                self.store,
                plugins,
                step=step,
                json_tree=part.tree,
                adapters=part.adapters,
                tensors=tensors,
                parent=self._parent,
                pool=pool,
                meta=meta,
                classes=part.classes,
                devices={p: d for p, d in devices.items() if d != "cpu"},
                lease=self.lease,
            )
        self._parent = info.manifest
        self.lease.committed(step, keep=protect)
        if self.keep_last is not None:
            try:
                retention.prune(self.store, keep_last=self.keep_last, protect={step, *protect}, writer=self.lease)
            except CheckpointError as exc:  # housekeeping: the commit stands
                log.warning("pruning the local tier %s after step %d failed: %s", self.store.url, step, exc)
        return info

    def restored(self, manifest: Manifest | None) -> None:
        """The next local save continues from ``manifest``, the local checkpoint restored (None:
        this rank restored from the durable tier; what its local tier holds may be damaged or
        of another save, so the next local save is written in full)."""
        self._parent, self._parent_loaded = manifest, True

    # -- what this rank holds --------------------------------------------------------------
    def versions(self) -> dict[int, Version]:
        """This rank's local checkpoints of this world size and rank, by step (others: logged, ignored)."""
        out: dict[int, Version] = {}
        try:
            steps = self.store.steps()
        except CheckpointError as exc:
            log.warning("restore: the local tier %s of rank %d cannot be listed (%s)", self.store.url, self.rank, exc)
            return out
        for step in steps:
            try:
                manifest = load_manifest(self.store, step)
                save = identity(manifest, self.world, self.rank)
            except CheckpointError as exc:
                log.warning("restore: step %d of the local tier %s is not used (%s)", step, self.store.url, exc)
                continue
            out[step] = Version(step, save, tier_checks.created(manifest), base_of(manifest))
        return out

    def load(self, step: int) -> Manifest:
        return load_manifest(self.store, step)

    def close(self) -> None:
        try:
            self.lease.release()
        except CheckpointError as exc:
            log.warning("releasing the writer lease of %s failed: %s", self.store.url, exc)


def identity(manifest: Manifest, world: int, rank: int) -> str:
    """The save id of a rank tier's local checkpoint saved by ``rank`` of ``world`` ranks.

    :raises CheckpointError: not a rank tier's checkpoint, or of another world size or rank.
    """
    doc = manifest.meta.get(META)
    if not isinstance(doc, dict) or not isinstance(doc.get("save"), str):
        raise CorruptCheckpointError(f"step {manifest.step} has no rank tier identity in its meta")
    if doc.get("world_size") != world or doc.get("rank") != rank:
        raise CheckpointError(
            f"step {manifest.step} was saved by rank {str(doc.get('rank'))[:20]} of "
            f"{str(doc.get('world_size'))[:20]} ranks, this is rank {rank} of {world}"
        )
    return doc["save"]


def base_of(manifest: Manifest) -> str | None:
    """The save id of the checkpoint the run that wrote ``manifest`` restored from (None: unknown)."""
    doc = manifest.meta.get(META)
    base = doc.get("base") if isinstance(doc, dict) else None
    return base if isinstance(base, str) else None


def save_of(manifest: Manifest) -> str | None:
    """The save id a durable checkpoint records (None: not written by a rank tier)."""
    doc = manifest.meta.get(META)
    save = doc.get("save") if isinstance(doc, dict) else None
    return save if isinstance(save, str) else None


# -- restoring from the local tier -------------------------------------------------------------


def _boxes(manifest: Manifest) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """The recorded (global offsets, global shape) of each DTensor local shard, validated."""
    doc = manifest.meta.get(META)
    raw = doc.get("boxes", {}) if isinstance(doc, dict) else None
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"step {manifest.step}: malformed DTensor boxes in its meta")
    out = {}
    for path, box in raw.items():
        ok = (
            isinstance(box, list)
            and len(box) == 2
            and all(isinstance(b, list) and all(type(x) is int and x >= 0 for x in b) for b in box)
            and len(box[0]) == len(box[1])
            and path in manifest.tensors
        )
        if not ok:
            raise CorruptCheckpointError(f"step {manifest.step}: malformed DTensor box of {str(path)[:200]!r}")
        out[path] = (tuple(box[0]), tuple(box[1]))
    return out


def prepare_local(
    store: Store, plugins: Any, manifest: Manifest, state: Mapping[str, Any], *, tracked: list[Any] | None = None
) -> tuple[dict[str, Any], list[str], list[str]]:
    """Read, verify and check this rank's local checkpoint against the live objects (nothing
    live changes): as :func:`ckpt.distributed.restore._prepare`, each live DTensor taking the
    stored local shard, which must be its very box (same mesh and placements as saved).
    ``tracked`` receives the DataLoaders tracked for it (see :func:`ckpt.state.restore.fit_live`)."""
    boxes = _boxes(manifest)
    # the view the live objects are checked against: each box as a one-shard global entry
    tensors = dict(manifest.tensors)
    for path, (offsets, gshape) in boxes.items():
        e = manifest.tensors[path]
        if e.shards or len(e.shape) != len(gshape):
            raise CorruptCheckpointError(f"step {manifest.step}: tensor {path!r} is not a local shard")
        nbytes = int(torch.Size(gshape).numel()) * DTYPE_ITEMSIZE[e.dtype]
        tensors[path] = TensorEntry(e.dtype, gshape, nbytes, (), (Shard(offsets, e.shape, e.chunks),))
    view = dataclasses.replace(manifest, tensors=tensors)
    keys, live, wanted, missing, unexpected = fit_live(store, plugins, view, state, strict=True, tracked=tracked)
    read: dict[str, torch.Tensor] = {}
    for p in wanted:
        t = live.get(p)
        if (p in boxes) != is_dtensor(t):
            raise CheckpointError(f"tensor {p!r}: the live object and the local copy differ in being a DTensor")
        if p in boxes and local_box(t, p) != (boxes[p][0], manifest.tensors[p].shape):
            raise CheckpointError(
                f"tensor {p!r}: this rank's live shard is another box than the local copy's (another mesh or layout)"
            )
    plain = [p for p in wanted if p not in boxes]
    read.update(read_tensors(store, plugins.codecs, ReadPlan.for_paths(manifest, plain)))
    boxed = [p for p in wanted if p in boxes]
    if boxed:
        from torch.distributed.tensor import DTensor

        shards = read_tensors(store, plugins.codecs, ReadPlan.for_paths(manifest, boxed))
        for p in boxed:
            like: Any = live[p]
            local = shards[p]
            device = like.to_local().device
            if device.type != "cpu":
                local = local.to(device)
            read[p] = DTensor.from_local(
                local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
            )
    return decode_values(view, state, keys, read, plugins, strict=True), missing, unexpected


def part_from_local(store: Store, plugins: Any, manifest: Manifest) -> tuple[LocalPart, dict[str, torch.Tensor]]:
    """What :func:`ckpt.distributed.coordinator.capture_local` gave for this local checkpoint
    (to persist it to the durable tier at close), read back and verified."""
    boxes = _boxes(manifest)
    tensors = read_tensors(store, plugins.codecs, ReadPlan.for_paths(manifest, list(manifest.tensors)))
    desc: dict[str, tuple] = {}
    for path, t in tensors.items():
        device = manifest.devices.get(path, "cpu")
        dtype = str(t.dtype).removeprefix("torch.")
        if path in boxes:
            offsets, gshape = boxes[path]
            desc[path] = ("box", dtype, gshape, offsets, tuple(t.shape), t.nbytes, device)
        else:
            view = t.contiguous().reshape(-1).view(torch.uint8).numpy().data if t.numel() else memoryview(b"")
            desc[path] = ("plain", dtype, tuple(t.shape), t.nbytes, hash_bytes(view), device)
    return LocalPart(manifest.tree, dict(manifest.adapters), dict(manifest.classes), desc), tensors
