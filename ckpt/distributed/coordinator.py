"""Collective saves and restores under an initialized default process group.

Every rank calls :func:`save` (``ckpt.save`` dispatches here when ``torch.distributed`` is
initialized with more than one rank) with its own state. The protocol, over a gloo group
ckpt creates for itself (:func:`ckpt_group`, timeout ``CKPT_DIST_TIMEOUT``), never the
training's:

1. each rank captures and encodes its tree; DTensor leaves become their local box (global
   offsets from torch's placement arithmetic), other tensors are hashed (xxh3-128);
2. one all-gather of (tree, tensor descriptors); every rank then computes the same plan
   (:func:`plan_save`): a tensor equal on every rank is shared and written once, a tensor
   that differs is per rank (``$rank/<r>/<path>``), a DTensor box is written once by one
   of the ranks holding it; writes are balanced across ranks by bytes; the trees are merged
   with ``$rank`` nodes where ranks differ (see :mod:`ckpt.storage.manifest`);
3. rank 0 (the coordinator) takes the store's writer lease and broadcasts the parent;
4. each rank writes its assigned objects with the ordinary writer (dedup and deltas
   against the parent per shard) and reports its entries once they are durable;
5. rank 0 writes the one manifest only when every rank reported success, then broadcasts
   the outcome: every rank returns the same CheckpointInfo or raises CheckpointError.

Any rank failing is reported in the next collective, so every rank raises at once; a rank
that dies makes the others' collectives fail within ``CKPT_DIST_TIMEOUT`` (gloo notices a
closed peer sooner). No manifest is written then, so the previous checkpoint stays latest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from ckpt import config
from ckpt.errors import CheckpointError
from ckpt.hooks.manager import get_plugins
from ckpt.io.hashing import hash_bytes
from ckpt.io.writer import host_bytes, write_objects
from ckpt.security.envelope import before_write, open_store
from ckpt.security.keys import Encryption
from ckpt.snapshot.executor import io_pool
from ckpt.state import tree as treemod
from ckpt.state.capture import capture
from ckpt.state.restore import as_mapping
from ckpt.storage.commit import commit, latest_for_save, load_manifest, new_manifest, process_run_id
from ckpt.storage.manifest import DTYPE_ITEMSIZE, RANK_TAG, Manifest, Shard, TensorEntry, check_step, tiling_problem
from ckpt.storage.store import Store
from ckpt.storage.writer_lease import WriterLease
from ckpt.types import CheckpointInfo

from . import interrupts
from .exchange import Failed, check_parts, ckpt_group, entering, gather_all, same_step
from .sharding import is_dtensor, local_shard, rank_prefix

log = logging.getLogger("ckpt")

# -- capture ----------------------------------------------------------------------------------


@dataclasses.dataclass
class LocalPart:
    """What a rank contributes: its encoded tree and a descriptor of each tensor."""

    tree: Any
    adapters: dict[str, str]
    classes: dict[str, str]
    #: path -> ("plain", dtype, shape, nbytes, hash, device) or ("box", dtype, global shape, offsets, shape, nbytes, device)
    tensors: dict[str, tuple]


def capture_local(state: Any, plugins: Any) -> tuple[LocalPart, dict[str, torch.Tensor]]:
    classes: dict[str, str] = {}
    tree, adapters = capture(as_mapping(state, plugins)[0], plugins, classes)
    tensors: dict[str, torch.Tensor] = {}
    json_tree = treemod.encode(tree, tensors, set())
    desc: dict[str, tuple] = {}
    local: dict[str, torch.Tensor] = {}
    for path, t in tensors.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if is_dtensor(t):
            shard, (offsets, shape) = local_shard(t, path)
            local[path] = shard
            desc[path] = ("box", dtype, tuple(t.shape), offsets, shape, shard.nbytes, str(shard.device))
        else:
            host, view = host_bytes(t, path)
            local[path] = host
            desc[path] = ("plain", dtype, tuple(t.shape), t.nbytes, hash_bytes(view), str(t.device))
    return LocalPart(json_tree, dict(adapters), classes, desc), local


# -- planning ---------------------------------------------------------------------------------


@dataclasses.dataclass
class SavePlan:
    tree: Any
    adapters: dict[str, str]
    classes: dict[str, str]
    devices: dict[str, str]
    #: rank -> [(write path, manifest path, tensor path of that rank, box or None)]
    assign: dict[int, list[tuple[str, str, str, tuple | None]]]
    #: manifest path -> (dtype, global shape) of sharded tensors
    sharded: dict[str, tuple[str, tuple[int, ...]]]
    #: manifest path -> write paths of its boxes, in order (sharded) or its one write path
    parts: dict[str, list[str]]


def plan_save(parts: list[LocalPart]) -> SavePlan:
    """The same plan on every rank (see the module docstring); a CheckpointError when ranks
    disagree in a way no layout explains (one rank's DTensor is another's plain tensor)."""
    world = len(parts)
    paths: dict[str, None] = {}
    for p in parts:
        paths.update(dict.fromkeys(p.tensors))
    items: list[tuple[str, str, str, tuple | None, int, list[int]]] = []  # (wpath, mpath, path, box, bytes, holders)
    per_rank: set[str] = set()
    sharded: dict[str, tuple[str, tuple[int, ...]]] = {}
    devices: dict[str, str] = {}
    parts_of: dict[str, list[str]] = {}
    for path in paths:
        descs = [p.tensors.get(path) for p in parts]
        kinds = {d[0] for d in descs if d is not None}
        if kinds == {"box"}:
            if any(d is None for d in descs) or len({(d[1], d[2]) for d in descs if d}) != 1:
                raise CheckpointError(
                    f"tensor {path!r}: a DTensor of another dtype or shape, or missing, on some ranks"
                )
            boxes: dict[tuple, list[int]] = {}
            for r, d in enumerate(descs):
                assert d is not None
                boxes.setdefault((d[3], d[4]), []).append(r)
            dtype, gshape = descs[0][1], descs[0][2]  # type: ignore[index]
            problem = tiling_problem(gshape, list(boxes))
            if problem:
                raise CheckpointError(f"tensor {path!r}: the ranks' shards do not tile it: {problem}")
            sharded[path] = (dtype, gshape)
            for box, holders in sorted(boxes.items()):
                wpath = f"{path}#{','.join(map(str, box[0]))}"
                items.append((wpath, path, path, box, descs[holders[0]][5], holders))  # type: ignore[index]
                parts_of.setdefault(path, []).append(wpath)
            if descs[0][6] != "cpu":  # type: ignore[index]
                devices[path] = descs[0][6]  # type: ignore[index]
            continue
        if "box" in kinds:
            raise CheckpointError(f"tensor {path!r} is a DTensor on some ranks and a plain tensor on others")
        keys = {(d[1], d[2], d[4]) if d else None for d in descs}
        if len(keys) == 1 and None not in keys:
            items.append((path, path, path, None, descs[0][3], list(range(world))))  # type: ignore[index]
            parts_of[path] = [path]
            if descs[0][5] != "cpu":  # type: ignore[index]
                devices[path] = descs[0][5]  # type: ignore[index]
            continue
        per_rank.add(path)
        for r, d in enumerate(descs):
            if d is not None:
                mpath = rank_prefix(r) + path
                items.append((mpath, mpath, path, None, d[3], [r]))
                parts_of[mpath] = [mpath]
                if d[5] != "cpu":
                    devices[mpath] = d[5]
    # balance: forced items first, then the largest shared ones to the least loaded holder
    load = [0] * world
    assign: dict[int, list[tuple[str, str, str, tuple | None]]] = {r: [] for r in range(world)}
    for wpath, mpath, tpath, tbox, n, holders in sorted(items, key=lambda i: (len(i[5]) > 1, -i[4], i[0])):
        r = min(holders, key=lambda h: (load[h], h))
        load[r] += n
        assign[r].append((wpath, mpath, tpath, tbox))
    trees = [_per_rank_refs(p.tree, per_rank, r) for r, p in enumerate(parts)]
    adapters: dict[str, str] = {}
    classes: dict[str, str] = {}
    for p in parts:
        adapters.update(p.adapters)
        classes.update(p.classes)
    return SavePlan(merge_trees(trees), adapters, classes, devices, assign, sharded, parts_of)


def _per_rank_refs(node: Any, per_rank: set[str], rank: int) -> Any:
    if isinstance(node, dict):
        if "$tensor" in node:
            return {**node, "$tensor": rank_prefix(rank) + node["$tensor"]} if node["$tensor"] in per_rank else node
        return {k: _per_rank_refs(v, per_rank, rank) for k, v in node.items()}
    if isinstance(node, list):
        return [_per_rank_refs(v, per_rank, rank) for v in node]
    return node


def merge_trees(trees: list[Any]) -> Any:
    """One tree for every rank's: equal subtrees once, ``{"$rank": [...]}`` where they differ."""
    first = trees[0]
    if all(t == first for t in trees[1:]):
        return first
    if all(isinstance(t, dict) and "$tensor" not in t for t in trees) and all(
        list(t) == list(first) for t in trees[1:]
    ):
        return {k: merge_trees([t[k] for t in trees]) for k in first}
    if all(isinstance(t, list) and len(t) == len(first) for t in trees):
        return [merge_trees([t[i] for t in trees]) for i in range(len(first))]
    return {RANK_TAG: trees}


# -- save --------------------------------------------------------------------------------------


def _parent_view(parent: Manifest | None, mine: list[tuple[str, str, str, tuple | None]]) -> Manifest | None:
    """``parent`` keyed by this rank's write paths, so deltas line up per shard."""
    if parent is None:
        return None
    tensors: dict[str, TensorEntry] = {}
    for wpath, mpath, _, box in mine:
        entry = parent.tensors.get(mpath)
        if entry is None:
            continue
        if box is None and not entry.shards:
            tensors[wpath] = entry
        elif box is not None:
            for s in entry.shards:
                if (s.offsets, s.shape) == (tuple(box[0]), tuple(box[1])):
                    nbytes = sum(c.size for c in s.chunks)
                    tensors[wpath] = TensorEntry(entry.dtype, s.shape, nbytes, s.chunks)
    # chunk_refs of the view must still list every parent object (dedup against all of them)
    keep = {f"\x00{i}": e for i, e in enumerate(parent.tensors.values())}
    return dataclasses.replace(parent, tensors={**keep, **tensors})


@interrupts.deferred()
def save(
    url: str,
    state: Any,
    *,
    step: int,
    storage_options: dict[str, Any] | None = None,
    encryption: Encryption | None = None,
) -> CheckpointInfo:
    """``ckpt.save`` on every rank of the default group (see the module docstring)."""
    check_step(step)
    plugins = get_plugins()
    store = Store(url, storage_options)
    group = ckpt_group()
    entering(group, f"collective save of step {step} to {store.url}")
    err: BaseException | None = None
    part: Any
    local: dict[str, torch.Tensor] = {}
    try:
        part, local = capture_local(state, plugins)
        if dist.get_rank() == 0:
            plugins.before_save(url=store.url, step=step, tree=part.tree)
    except BaseException as exc:  # noqa: BLE001 - reported to every rank, re-raised here
        err, part = exc, Failed(dist.get_rank(), exc)
    return commit_collective(store, plugins, group, step=step, part=part, local=local, err=err, encryption=encryption)


@interrupts.deferred()
def commit_collective(
    store: Store,
    plugins: Any,
    group: Any,
    *,
    step: int,
    part: Any,
    local: Mapping[str, torch.Tensor],
    err: BaseException | None,
    encryption: Encryption | None = None,
    take_over: bool | None = None,
    after: Callable[[WriterLease, CheckpointInfo], None] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> CheckpointInfo:
    """Steps 2-5 of the protocol for a captured ``part`` (or this rank's failure ``err``),
    over ``group``: every rank of it calls this for the same step, in the same order.

    ``encryption``: rank 0 opens the store (creating an encrypted store's descriptor under
    its lease) before the first gather that follows; the other ranks open it after that
    gather, so that every rank uses the one store id (:mod:`ckpt.security.envelope`).

    ``after`` runs on the coordinator once every rank knows the commit, still holding the
    writer lease (the Checkpointer's retention); its failure is logged, the commit stands.
    ``meta`` is recorded in the manifest (a rank tier's save id, :mod:`ckpt.distributed.tiers`)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    what = f"collective save of step {step} to {store.url}"
    entering(group, what)
    pairs = gather_all(group, (step, part), what, err)
    check_parts(pairs, err, what)
    parts = same_step(step, pairs, what)
    plan = plan_save(parts)
    lease = None
    head: Any = None
    try:
        if rank == 0:
            lease = WriterLease(store, take_over=take_over, what="ckpt.save (collective)").__enter__()
            open_store(store, encryption, create=True)
            before_write(store)  # a new encrypted store's descriptor, before any rank writes
            latest = latest_for_save(store)
            lease.saving(step, latest.manifest)
            head = (None if latest.manifest is None else latest.manifest.step, latest.top_seq + 1)
    except BaseException as exc:  # noqa: BLE001
        err, head = exc, Failed(rank, exc)
    try:
        heads = gather_all(group, head, what, err)
        check_parts(heads, err, what)
        parent_step, seq = heads[0]
        out: Any
        parent = None
        try:
            if rank != 0:  # rank 0 wrote the descriptor of a new encrypted store before the gather
                open_store(store, encryption)
            parent = load_manifest(store, parent_step) if parent_step is not None else None
            mine = plan.assign[rank]
            tensors = {wpath: local[path] for wpath, _, path, _ in mine}
            with io_pool() as pool:
                entries, stats = write_objects(
                    store,
                    plugins.codecs,
                    tensors,
                    pool=pool,
                    chunk_bytes=config.chunk_bytes(),
                    parent=_parent_view(parent, mine),
                    delta=True,
                    max_chain=config.delta_max_chain(),
                )
            store.sync_dirs()  # this rank's objects (and new folders) durable before rank 0 commits
            out = (entries, stats)
        except BaseException as exc:  # noqa: BLE001
            err, out = exc, Failed(rank, exc)
        written = gather_all(group, out, what, err)
        check_parts(written, err, what)
        result: Any = None
        if rank == 0:
            try:
                assert lease is not None
                manifest = _manifest(
                    plan, written, step=step, parent=parent, seq=seq, world=world, plugins=plugins, meta=meta
                )
                lease.check()
                manifest = commit(store, manifest, written_bytes=sum(stats.written_bytes for _, stats in written))
                result = CheckpointInfo.from_manifest(manifest, store.url)
            except BaseException as exc:  # noqa: BLE001
                err, result = exc, Failed(rank, exc)
        # not ``report``: once the manifest is written, a Ctrl-C noted since is raised after
        # the ranks know the step is committed, never sent as a failure of a committed step
        results = gather_all(group, result, what, err, report=False, last=True)
        check_parts(results, err, what)
        info = dataclasses.replace(results[0], write_stats=written[rank][1])
        plugins.after_commit(info=info)
        if after is not None and lease is not None:
            try:
                after(lease, info)
            except CheckpointError as exc:  # housekeeping: the commit stands
                log.warning("after committing step %d to %s: %s", step, store.url, exc)
        return info
    finally:
        if lease is not None:
            lease.__exit__(None, None, None)


def _manifest(
    plan: SavePlan,
    written: list[Any],
    *,
    step: int,
    parent: Manifest | None,
    seq: int,
    world: int,
    plugins: Any,
    meta: Mapping[str, Any] | None = None,
) -> Manifest:
    entries: dict[str, TensorEntry] = {}
    raw = stored = 0
    for entries_r, stats in written:
        entries.update(entries_r)
        raw += stats.raw_bytes
        stored += stats.written_bytes
    tensors: dict[str, TensorEntry] = {}
    for mpath, wpaths in plan.parts.items():
        if mpath in plan.sharded:
            dtype, gshape = plan.sharded[mpath]
            shards = []
            for w in wpaths:
                e = entries[w]
                offsets = tuple(int(x) for x in w.rsplit("#", 1)[1].split(",")) if e.shape else ()
                shards.append(Shard(offsets, e.shape, e.chunks))
            itemsize = _itemsize(dtype)
            tensors[mpath] = TensorEntry(dtype, gshape, int(torch.Size(gshape).numel()) * itemsize, (), tuple(shards))
        else:
            tensors[mpath] = entries[wpaths[0]]
    manifest = new_manifest(
        step=step,
        tree=plan.tree,
        adapters=plan.adapters,
        tensors=tensors,
        parent=parent,
        raw_bytes=raw,
        written_bytes=stored,
        chunk_bytes=config.chunk_bytes(),
        plugins=plugins.versions(),
        seq=seq,
        run=process_run_id(),
        classes=plan.classes,
        devices=plan.devices,
        meta=meta,
        world_size=world,
    )
    Manifest.from_doc(_doc(manifest), where=f"step {step} (before commit)")  # what loads would refuse
    return manifest


def _doc(m: Manifest) -> Any:
    return json.loads(m.to_json_bytes())


def _itemsize(dtype: str) -> int:
    return DTYPE_ITEMSIZE[dtype]
