"""Collective restore: every rank loads its part of a checkpoint into its live objects.

Rank 0 picks the step (the latest when none is given) and every rank reads that manifest.
Unlike a single-process restore, a damaged latest checkpoint is not skipped for an older
one: it raises on every rank (restore an older step explicitly).
Each rank takes :func:`~ckpt.distributed.sharding.rank_view` of it: with the same world size
its own per-rank values, with another one those of ``rank % saved world size`` (a warning
says so). A live DTensor (FSDP2 parameters and optimizer moments, tensor-parallel weights)
receives only its own box, read from the stored shards that overlap it, whatever mesh or
world size saved them; replicated and plain tensors are read whole on every rank.

All or nothing across ranks: every rank reads, verifies and checks everything first; only
when every rank reports success does any rank load into its live objects. A failure on any
rank raises CheckpointError on every rank and changes nothing live.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
import torch.distributed as dist

from ckpt.errors import CheckpointError, StateMismatchError
from ckpt.hooks.manager import get_plugins
from ckpt.io.plan import ReadPlan
from ckpt.io.reader import Reader, read_tensors
from ckpt.security.envelope import open_store
from ckpt.security.keys import Encryption
from ckpt.state import tree as treemod
from ckpt.state.capture import as_numpy, capture, check_into, live_tensors, load_into
from ckpt.state.dataloader import track_all
from ckpt.state.placement import DEFAULT_LOCATION, Placer, placer
from ckpt.state.restore import _check_class, _fit, as_mapping
from ckpt.storage.commit import load_manifest
from ckpt.storage.manifest import Manifest
from ckpt.storage.store import Store
from ckpt.types import CheckpointInfo

from .coordinator import _Failed, check_parts, ckpt_group, gather_all
from .sharding import is_dtensor, rank_view, read_into_dtensor


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
            chosen = load_manifest(store, step).step
    except Exception as exc:  # noqa: BLE001 - reported to every rank
        err, chosen = exc, _Failed(rank, exc)
    check_parts(picked := gather_all(group, chosen, what), err, what)
    prepared: Any = None
    try:
        manifest = load_manifest(store, picked[0])
        view = rank_view(manifest, rank)
        values, missing, unexpected = _prepare(store, plugins, view, live, strict=strict, place=place)
        prepared = True
    except Exception as exc:  # noqa: BLE001
        err, prepared = exc, _Failed(rank, exc)
    check_parts(gather_all(group, prepared, what), err, what)
    # every rank has read, verified and checked everything: load
    for key, value in values.items():
        live[key] = load_into(live[key], value, treemod.escape(key), plugins, strict=strict)
    info = CheckpointInfo.from_manifest(manifest, store.url)
    if not strict:
        info = info.with_keys(missing=missing, unexpected=unexpected)
    plugins.after_restore(info=info, state=live)
    return info


def _prepare(
    store: Store,
    plugins: Any,
    manifest: Manifest,
    state: Mapping[str, Any],
    *,
    strict: bool,
    place: Placer | None,
) -> tuple[dict[str, Any], list[str], list[str]]:
    """As :func:`ckpt.state.restore._prepare`, reading only this rank's box of each live DTensor."""
    stored_tree = manifest.tree
    if not isinstance(stored_tree, dict):
        raise CheckpointError(f"checkpoint step {manifest.step} of {store.url} has no state mapping")
    absent = [k for k in state if k not in stored_tree]
    if absent and strict:
        raise StateMismatchError(
            f"checkpoint step {manifest.step} of {store.url} has no {', '.join(map(repr, absent))}; "
            f"it holds {', '.join(map(repr, stored_tree))} (restore with strict=False to load what matches)"
        )
    keys = [k for k in state if k in stored_tree]
    track_all(state)
    live_tree, live_adapters = capture({k: state[k] for k in keys}, plugins)
    for path, name in live_adapters.items():
        saved = manifest.adapters.get(path)
        if saved != name:
            raise StateMismatchError(
                f"{path!r} was saved {'by adapter ' + repr(saved) if saved else 'as plain data'}, "
                f"but the live object needs adapter {name!r}"
            )
        _check_class(manifest, path, state, plugins, name)
    live: dict[str, torch.Tensor] = {}
    for key in keys:
        live_tensors(live_tree[key], treemod.escape(key), live)
    exact = [p for p, name in live_adapters.items() if getattr(plugins.adapters.get(name), "exact_tensors", False)]
    missing, unexpected = _fit(manifest, live, exact, strict)
    missing = [*map(str, absent), *missing]
    wanted = [p for key in keys for p in treemod.tensor_paths(stored_tree[key])]
    boxed = [p for p in wanted if is_dtensor(live.get(p))]
    whole = [p for p in wanted if p not in set(boxed)]
    tensors = read_tensors(store, plugins.codecs, ReadPlan.for_paths(manifest, whole))
    if place is not None:
        tensors = {p: place(t, manifest.devices.get(p, DEFAULT_LOCATION)) for p, t in tensors.items()}
    reader = Reader(store, plugins.codecs)
    for p in boxed:
        tensors[p] = read_into_dtensor(store, plugins.codecs, manifest, p, live[p], reader=reader)
    values = {}
    for key in keys:
        path = treemod.escape(key)
        values[key] = treemod.decode(stored_tree[key], lambda p, is_np: as_numpy(tensors[p], is_np), path)
        check_into(state[key], values[key], path, plugins, strict=strict)
    return values, missing, unexpected
