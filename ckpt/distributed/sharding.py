"""Shard boxes of DTensors, resharding reads, and the per-rank view of a distributed manifest.

A DTensor leaf is stored as a sharded entry (manifest schema 2, see
:mod:`ckpt.storage.manifest`): one box per distinct local shard, placed by its global
offsets. The boxes come from torch's own placement arithmetic
(``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``), so uneven
shards, ``Shard(d)`` on any dim and 2-D meshes (FSDP x TP, HSDP) are covered; a box held by
several ranks (replicated mesh dims) is written once.

:func:`read_region` reads any box of a stored tensor, plain or sharded, fetching only the
objects that overlap it: a restore into another world size or mesh reads about its own
share of the bytes and never materializes a full tensor.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ckpt.codecs.base import CodecRegistry
from ckpt.errors import CheckpointError, SchemaError, UnsupportedValueError
from ckpt.io.reader import Reader
from ckpt.io.region import read_box
from ckpt.snapshot.executor import io_pool
from ckpt.storage.manifest import RANK_TAG, Manifest, TensorEntry
from ckpt.storage.manifest_check import has_rank_node
from ckpt.storage.store import Store

log = logging.getLogger("ckpt")

Box = tuple[tuple[int, ...], tuple[int, ...]]


def read_region(
    store: Store,
    codecs: CodecRegistry,
    manifest: Manifest,
    path: str,
    offsets: Sequence[int],
    shape: Sequence[int],
    out: torch.Tensor | None = None,
    *,
    reader: Reader | None = None,
) -> torch.Tensor:
    """The box ``tensor[offsets[0]:offsets[0]+shape[0], ...]`` of tensor ``path`` of ``manifest``.

    Works for a plain entry (its chunks are row-major byte ranges of the whole tensor) and a
    sharded one (each shard's chunks are the row-major bytes of its box): only the objects
    whose bytes overlap the requested box are fetched, decoded and verified (content hash),
    then copied into place. ``out``, when given, is a CPU tensor of ``shape`` and the stored
    dtype (any strides: a view of a larger tensor works) and is returned; else a fresh
    contiguous CPU tensor is. ``reader`` shares a :class:`~ckpt.io.reader.Reader` (and its
    cache of delta parents) between calls. A box outside the tensor, or a path the manifest
    does not list, is a :class:`~ckpt.CheckpointError`.
    """
    entry = manifest.tensors.get(path)
    if entry is None:
        raise CheckpointError(f"checkpoint step {manifest.step} of {store.url} has no tensor {path!r}")
    reader = reader or Reader(store, codecs)
    with io_pool("ckpt-read") as pool:
        return read_box(reader, entry, path, offsets, shape, pool=pool, out=out)


# -- DTensor boxes --------------------------------------------------------------------------


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def local_box(t: Any, path: str = "") -> Box:
    """(global offsets, local shape) of this rank's shard of DTensor ``t``."""
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(isinstance(p, Partial) for p in t.placements):
        raise UnsupportedValueError(
            f"tensor {path!r}: a DTensor with a Partial placement holds partial sums, not values; "
            "redistribute it to Shard/Replicate before saving"
        )
    shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(int(o) for o in offsets), tuple(int(n) for n in shape)


def local_shard(t: Any, path: str = "") -> tuple[torch.Tensor, Box]:
    """This rank's local tensor of DTensor ``t`` and its box (checked to agree)."""
    box = local_box(t, path)
    local = t.to_local()
    if tuple(local.shape) != box[1]:
        raise UnsupportedValueError(
            f"tensor {path!r}: local shard of shape {list(local.shape)} does not match its placement's "
            f"box {list(box[1])} (a padded or custom DTensor layout)"
        )
    return local, box


def read_into_dtensor(
    store: Store, codecs: CodecRegistry, manifest: Manifest, path: str, like: Any, reader: Reader | None = None
) -> Any:
    """A DTensor laid out like ``like`` (mesh, placements, global shape) holding this rank's
    box of stored tensor ``path``: only that box is read."""
    from torch.distributed.tensor import DTensor

    offsets, shape = local_box(like, path)
    local = read_region(store, codecs, manifest, path, offsets, shape, reader=reader)
    device = like.to_local().device
    if device.type != "cpu":
        local = local.to(device)
    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


# -- per-rank views --------------------------------------------------------------------------


def rank_prefix(rank: int) -> str:
    """Path prefix of the tensors rank ``rank`` holds on its own."""
    return f"{RANK_TAG}/{rank}/"


def saved_rank(manifest: Manifest, rank: int, *, warn: bool = True) -> int:
    """Which saved rank's per-rank values rank ``rank`` takes.

    The rule: the same rank when the world size is the same (or ``rank`` exists in the
    saved world); otherwise ``rank % world_size`` (rank 5 of a restore at 8 ranks of a save
    at 4 takes rank 1's), with a warning, since per-rank values (RNG, loader positions)
    of another layout are a best effort.
    """
    world = manifest.world_size
    if not world:
        return 0
    if rank < 0:
        raise CheckpointError(f"rank must be >= 0, got {rank}")
    if rank < world:
        return rank
    if warn and has_per_rank(manifest):
        warnings.warn(
            f"checkpoint step {manifest.step} was saved by {world} ranks; rank {rank} takes the "
            f"per-rank values of rank {rank % world} (rank % {world})",
            stacklevel=3,
        )
    return rank % world


def has_per_rank(manifest: Manifest) -> bool:
    return any(p.startswith(RANK_TAG + "/") for p in manifest.tensors) or has_rank_node(manifest.tree)


def resolve_ranks(node: Any, rank: int) -> Any:
    """``node`` with every ``{"$rank": [...]}`` replaced by element ``rank`` (recursively)."""
    if isinstance(node, dict):
        if RANK_TAG in node and len(node) == 1 and isinstance(node[RANK_TAG], list):
            return resolve_ranks(node[RANK_TAG][rank], rank)
        return {k: resolve_ranks(v, rank) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve_ranks(v, rank) for v in node]
    return node


def _rename_refs(node: Any, renames: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        if "$tensor" in node and node["$tensor"] in renames:
            return {**node, "$tensor": renames[node["$tensor"]]}
        return {k: _rename_refs(v, renames) for k, v in node.items()}
    if isinstance(node, list):
        return [_rename_refs(v, renames) for v in node]
    return node


def rank_view(manifest: Manifest, rank: int = 0, *, warn: bool = True) -> Manifest:
    """What rank ``rank`` saved, as a single-process manifest: ``$rank`` nodes resolved to
    its value, its per-rank tensors under their tree paths, the other ranks' dropped.

    A manifest of a single-process save comes back unchanged. Another rank than any saved
    one follows :func:`saved_rank`'s rule. Sharded entries stay sharded (every reader reads them).
    """
    if not manifest.world_size:
        return manifest
    r = saved_rank(manifest, rank, warn=warn)
    prefix = rank_prefix(r)
    renames = {p: p[len(prefix) :] for p in manifest.tensors if p.startswith(prefix)}
    for old, new in renames.items():
        if new in manifest.tensors:  # a writer never stores a tensor both shared and per rank
            raise SchemaError(f"checkpoint step {manifest.step}: tensor {new!r} is listed both shared and as {old!r}")
    tensors: dict[str, TensorEntry] = {p: e for p, e in manifest.tensors.items() if not p.startswith(RANK_TAG + "/")}
    tensors.update({new: manifest.tensors[old] for old, new in renames.items()})
    tree = _rename_refs(resolve_ranks(manifest.tree, r), renames)
    devices = {
        renames.get(p, p): d for p, d in manifest.devices.items() if not p.startswith(RANK_TAG + "/") or p in renames
    }
    return dataclasses.replace(manifest, tree=tree, tensors=tensors, devices=devices)
