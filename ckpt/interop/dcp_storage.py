"""ckpt stores written by torch.distributed.checkpoint: ``StorageWriter`` (the reader: :mod:`ckpt.interop.dcp_reader`).

``dcp.save(sd, storage_writer=ckpt.dcp.StorageWriter(url, step=N))`` plans with DCP's
planner (replicated items deduplicated and spread over ranks, DTensor shards as boxes)
and stores the result as an ordinary ckpt checkpoint:

- each rank writes the objects of its plan items through ckpt's writer (chunking,
  compression, content-addressed dedup against the parent checkpoint, XOR deltas against
  the parent's same shard, hashes) and makes them durable; the coordinator writes the one
  manifest in :meth:`StorageWriter.finish`, after every rank's objects, under the store's
  writer lease (taken for the commit only, so a save that fails on a rank leaves no lease
  behind). The checkpoint continues from the store's latest (the coordinator picks it once
  and every rank reuses its objects). ``ckpt ls/show/verify/export`` and ``ckpt.load`` read it.
- a tensor whose DCP chunks are several boxes is a sharded entry (manifest schema 2): DCP's
  ``ChunkStorageMetadata`` offsets/sizes are exactly the shard boxes. A tensor saved as one
  box (replicated, DDP) is a plain entry, readable by any ckpt.
- the tree: each item sits at its place in the state dict (``metadata.planner_data``, the
  flattening path DCP records), so ``ckpt.load(url)`` gives ``{"model": {...}, "optim":
  {"state": ..., "param_groups": [...]}}``; ``meta["dcp"]["items"]`` maps every DCP key
  (fqn) to its kind and tree path, from which ``StorageReader`` rebuilds DCP's Metadata.
- DCP's non-tensor ("bytes") items: DCP hands the writer ``torch.save`` bytes. They are
  read back with ``torch.load(weights_only=True)`` in the saving process (a value that is
  not weights-only data is refused) and stored as plain JSON values of the tree (ckpt's
  tagged encoding: tuples, int-keyed mappings, floats bit for bit...); nothing pickled is
  stored. On load the reader serializes the decoded plain value for DCP's ``load_bytes``;
  a store therefore never feeds a pickle of its own to DCP's unpickler. A bytes value
  holding tensors (only with ``flatten_state_dict=False``) is refused: use the default.
- the same key on several ranks: DCP's planner deduplicates write items by (fqn, offset)
  before the storage layer sees them (pytorch#120356), keeping one rank's data, so two
  ranks with different data under one key are merged there, silently, and this writer
  cannot tell. Rank-local values belong in ``ckpt.save`` (per-rank leaves) or under
  per-rank keys. Boxes that overlap or leave a hole are refused at the commit.

Errors: everything read from the store is validated; failures are :class:`ckpt.CheckpointError`
subclasses. DCP wraps every exception of a rank in its ``CheckpointException`` (a
BaseException whose ``failures`` maps ranks to ``(exception, traceback)``);
:func:`checkpoint_error` finds the ckpt error in it.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import StorageWriter as _DCPWriter
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ckpt import config
from ckpt.codecs import delta as deltamod
from ckpt.errors import CheckpointError, CorruptCheckpointError, UnsupportedValueError
from ckpt.hooks.manager import get_plugins
from ckpt.io.region import pieces
from ckpt.io.reuse import present_objects, reusable
from ckpt.io.writer import Writer, dtype_name
from ckpt.security.envelope import before_write, open_store
from ckpt.security.keys import Encryption
from ckpt.snapshot.executor import io_pool, wait_all
from ckpt.state import tree as treemod
from ckpt.storage.commit import commit, load_manifest, new_manifest, next_seq, process_run_id
from ckpt.storage.manifest import ChunkRef, Manifest, Shard, TensorEntry, check_step
from ckpt.storage.store import Store
from ckpt.storage.writer_lease import WriterLease
from ckpt.types import CheckpointInfo, SaveStats

log = logging.getLogger("ckpt")

#: version of ``meta["dcp"]`` written by :class:`StorageWriter`
META_VERSION = 1


def checkpoint_error(exc: BaseException) -> CheckpointError | None:
    """The ckpt error inside what ``dcp.save``/``dcp.load`` raised (a ``CheckpointException``
    wrapping each rank's failure), or ``exc`` itself when it is one; None when there is none."""
    if isinstance(exc, CheckpointError):
        return exc
    for failure in (getattr(exc, "failures", None) or {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException) and (found := checkpoint_error(inner)) is not None:
            return found
    cause = exc.__cause__ or exc.__context__
    return checkpoint_error(cause) if cause is not None and cause is not exc else None


def _box_key(fqn: str, offsets: Sequence[int]) -> str:
    """The writer's name of one box: delta parents are looked up by it (same fqn, same box)."""
    return f"{fqn}@{','.join(map(str, offsets))}"


def _components(fqn: str, planner_data: Any) -> list[str | int]:
    """Where DCP key ``fqn`` sits in the tree: DCP's flattening path when it recorded one."""
    path = planner_data.get(fqn) if isinstance(planner_data, Mapping) else None
    if isinstance(path, (tuple, list)) and path and all(type(p) in (str, int) for p in path):
        return list(path)
    return [fqn]


#: one DCP item of a checkpoint: its kind, its place in the tree, and its tensor path (tensors)
Item = tuple[str, list[str | int], str | None]


def dcp_items(manifest: Manifest) -> dict[str, Item]:
    """DCP key -> (``"tensor"`` or ``"bytes"``, tree path components, tensor path or None).

    From ``meta["dcp"]["items"]`` for stores written by :class:`StorageWriter`; for other
    ckpt stores derived from the tree: each tensor and each other leaf under its dotted path.
    """
    meta = manifest.meta.get("dcp")
    where = f"manifest of step {manifest.step}"
    if isinstance(meta, Mapping) and "items" in meta:
        items = meta["items"]
        if not isinstance(items, Mapping):
            raise CorruptCheckpointError(f"{where}: meta.dcp.items is not a mapping")
        out: dict[str, Item] = {}
        for fqn, rec in items.items():
            ok = isinstance(rec, list) and len(rec) in (2, 3) and rec[0] in ("tensor", "bytes")
            ok = ok and isinstance(rec[1], list) and all(type(p) in (str, int) for p in rec[1])
            if ok and rec[0] == "tensor":
                ok = len(rec) == 3 and isinstance(rec[2], str) and rec[2] in manifest.tensors
            if not ok:
                raise CorruptCheckpointError(f"{where}: malformed meta.dcp.items entry for {str(fqn)[:80]!r}")
            out[str(fqn)] = (rec[0], list(rec[1]), rec[2] if rec[0] == "tensor" else None)
        return out
    out = {}
    stack: list[tuple[Any, list[str | int]]] = [(manifest.tree, [])]
    while stack:
        node, comps = stack.pop()
        if isinstance(node, dict) and "$tensor" in node:
            out[".".join(map(str, comps))] = ("tensor", comps, str(node["$tensor"]))
            continue
        kids = treemod.children(node)
        if not kids:
            if comps:
                out[".".join(map(str, comps))] = ("bytes", comps, None)
            continue
        stack.extend((kid, [*comps, name]) for name, kid in reversed(kids))
    return out


def subtree(tree: Any, comps: Sequence[str | int], where: str) -> Any:
    """The encoded node at ``comps`` (dict keys, list indexes; ``$map``/``$tuple`` by name)."""
    node = tree
    for c in comps:
        if isinstance(node, list) and type(c) is int and 0 <= c < len(node):
            node = node[c]
            continue
        if isinstance(node, dict) and not any(k.startswith("$") for k in node) and str(c) in node:
            node = node[str(c)]
            continue
        kids = dict(treemod.children(node) or [])
        if str(c) not in kids:
            raise CorruptCheckpointError(f"{where}: the tree has no {str(c)[:80]!r} on the path of a DCP item")
        node = kids[str(c)]
    return node


# -- writer (StorageReader: ckpt.interop.dcp_reader) -------------------------------------------------


class StorageWriter(_DCPWriter):
    """DCP's storage writer protocol over a ckpt store (see the module docstring).

    :param url: the store (any fsspec URL ckpt takes); ``checkpoint_id`` of ``dcp.save``
        replaces it when given.
    :param step: the step of the checkpoint this writer commits.
    :param storage_options: passed to fsspec.
    :param delta: write a changed chunk as an XOR delta against the parent's same shard when smaller.
    :param encryption: the key of an encrypted store (``ckpt.Encryption``): the coordinator
        writes a new store's descriptor while planning, before any rank writes.

    After a save, :attr:`stats` holds what this rank wrote (:class:`ckpt.SaveStats`) and,
    on the coordinator, :attr:`manifest` the committed manifest.
    """

    def __init__(
        self,
        url: str,
        step: int,
        storage_options: dict[str, Any] | None = None,
        *,
        delta: bool = True,
        encryption: Encryption | None = None,
    ) -> None:
        super().__init__()
        self.url = str(url)
        self.encryption = encryption
        self.step = check_step(step)
        self.storage_options = storage_options
        self.delta = delta
        self.stats: SaveStats | None = None
        self.manifest: Manifest | None = None
        self.is_coordinator = False
        self.rank = 0
        self._parent: int | None = None

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.url = os.fspath(checkpoint_id)
        self.stats = None
        self.manifest = None
        self._parent = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False  # chosen explicitly, never by DCP's guess from a path

    def _store(self, *, create: bool = False) -> Store:
        store = Store(self.url, self.storage_options)
        open_store(store, self.encryption, create=create)  # a missing or wrong key fails here
        return store

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0))
        if kwargs.get("use_collectives") is False and dist.is_initialized() and dist.get_world_size() > 1:
            # every rank would commit a manifest of its own items under the same step
            raise CheckpointError("ckpt.dcp.StorageWriter: one manifest for every rank needs use_collectives=True")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # One parent for every rank: the store's latest when planning, fixed here.
        store = self._store(create=True)
        with WriterLease(store, what="ckpt.dcp.StorageWriter"):  # a live writer refuses us now, not at the end
            before_write(store)  # a new encrypted store's descriptor, before any rank writes
        latest = store.latest_step()
        self._parent = latest
        return [dataclasses.replace(p, storage_data={"ckpt_parent": latest}) for p in plans]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        store = self._store()
        parent_step = plan.storage_data.get("ckpt_parent") if isinstance(plan.storage_data, dict) else None
        parent = self._load_parent(store, parent_step)
        results: list[WriteResult] = []
        with io_pool() as pool:
            writer = self._writer(store, parent, pool)
            pending = []
            try:
                for item in plan.items:
                    if item.type == WriteItemType.BYTE_IO:
                        results.append(_bytes_result(item.index, planner.resolve_data(item)))
                        continue
                    assert item.tensor_data is not None  # a tensor item always has it
                    box = item.tensor_data.chunk
                    tensor = planner.resolve_data(item)
                    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(box.sizes):
                        raise CheckpointError(
                            f"DCP item {item.index.fqn!r}: the planner gave {type(tensor).__name__} "
                            f"{list(getattr(tensor, 'shape', []))} for a box of {list(box.sizes)}"
                        )
                    pending.append((item.index, writer.submit(_box_key(item.index.fqn, box.offsets), tensor)))
            finally:
                wait_all([f for _, f in pending])
        store.sync_dirs()  # durable before the coordinator may commit
        for index, fut in pending:
            entry = fut.result()
            results.append(
                WriteResult(
                    index=index,
                    size_in_bytes=entry.nbytes,
                    storage_data={"dtype": entry.dtype, "chunks": [c.to_json() for c in entry.chunks]},
                )
            )
        self.stats = writer.stats.frozen()
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def _load_parent(self, store: Store, step: Any) -> Manifest | None:
        if step is None:
            return None
        try:
            return load_manifest(store, check_step(step, "parent step"))
        except CheckpointError as exc:
            log.warning("%s: parent step %s unreadable (%s); writing every chunk in full", store.url, step, exc)
            return None

    def _writer(self, store: Store, parent: Manifest | None, pool: ThreadPoolExecutor) -> Writer:
        codecs = get_plugins().codecs
        known, absent = reusable(store, parent, pool) if parent is not None else ({}, frozenset())
        return Writer(
            store,
            codecs,
            pool,
            known=known,
            chunk_bytes=config.chunk_bytes(),
            parent=_by_box_or_none(parent) if parent is not None and known else None,
            delta=self.delta,
            max_chain=config.delta_max_chain(),
            absent=absent,
        )

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        store = self._store()
        parent = self._load_parent(store, self._parent)
        manifest = self.build_manifest(metadata, results, parent)
        # what a reader would refuse (overlapping boxes, a hole) is refused before the commit
        Manifest.from_json_bytes(manifest.to_json_bytes(), where=f"step {self.step} of {store.url} (being saved)")
        with WriterLease(store, what="ckpt.dcp.StorageWriter") as lease, io_pool() as pool:
            lease.saving(self.step, parent)
            _check_present(store, manifest, pool)
            manifest = dataclasses.replace(manifest, seq=next_seq(store))
            lease.check()
            # (new_manifest's stored_bytes: what the ranks wrote, which commit settles)
            manifest = commit(store, manifest, written_bytes=manifest.stored_bytes)
        self.manifest = manifest
        get_plugins().after_commit(info=CheckpointInfo.from_manifest(manifest, store.url))

    def build_manifest(self, metadata: Metadata, results: list[list[WriteResult]], parent: Manifest | None) -> Manifest:
        """The manifest of this save from DCP's global metadata and every rank's write results."""
        by_index: dict[tuple[str, tuple[int, ...]], Any] = {}
        for rank_results in results:
            for r in rank_results:
                key = (r.index.fqn, tuple(r.index.offset) if r.index.offset is not None else ())
                by_index[key] = r.storage_data
        skeleton: dict[str, Any] = {}
        placeholders: dict[int, tuple[str, TensorEntry]] = {}
        items: dict[str, list[Any]] = {}
        comps_of: dict[str, list[str | int]] = {}
        raw = 0
        from torch.distributed.checkpoint._traverse import set_element

        for fqn, md in metadata.state_dict_metadata.items():
            comps = _components(fqn, metadata.planner_data)
            if isinstance(md, TensorStorageMetadata):
                entry = _entry(fqn, md, by_index)
                raw += entry.nbytes
                ph = torch.empty(0)
                placeholders[id(ph)] = (fqn, entry)
                set_element(skeleton, tuple(comps), ph)
            else:
                rec = by_index.get((fqn, ()))
                if not isinstance(rec, dict) or "value" not in rec:
                    raise CheckpointError(f"DCP item {fqn!r}: no rank wrote it")
                set_element(skeleton, tuple(comps), treemod.decode(rec["value"], no_tensor))
                items[fqn] = ["bytes", comps]
            comps_of[fqn] = comps
        tensors: dict[str, torch.Tensor] = {}
        json_tree = treemod.encode(skeleton, tensors, set())
        entries: dict[str, TensorEntry] = {}
        for path, ph in tensors.items():
            fqn, entry = placeholders[id(ph)]
            entries[path] = entry
            items[fqn] = ["tensor", comps_of[fqn], path]
        old = {c.key for c in parent.chunk_refs()} if parent is not None else set()
        new = {
            c["key"]: c["stored"]
            for rec in by_index.values()
            if isinstance(rec, dict)
            for c in rec.get("chunks", ())
            if c["key"] not in old
        }
        meta: dict[str, Any] = {"dcp": {"version": META_VERSION, "items": items}}
        if metadata.version is not None:
            meta["dcp"]["dcp_version"] = str(metadata.version)
        return new_manifest(
            step=self.step,
            tree=json_tree,
            adapters={},
            tensors=entries,
            parent=parent,
            raw_bytes=raw,
            written_bytes=sum(new.values()),
            chunk_bytes=config.chunk_bytes(),
            plugins=get_plugins().versions(),
            meta=meta,
            run=process_run_id(),
        )


def no_tensor(path: str, is_numpy: bool) -> Any:
    raise CheckpointError(f"a DCP bytes item holds tensor {path!r}")  # refused when written: never here


def _bytes_result(index: MetadataIndex, data: Any) -> WriteResult:
    """A DCP bytes item as a JSON value of the tree (read back weights-only; never stored pickled)."""
    fqn = index.fqn
    buf = io.BytesIO(data.getbuffer() if isinstance(data, io.BytesIO) else bytes(data))
    try:
        value = torch.load(buf, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise UnsupportedValueError(
            f"DCP item {fqn!r} is not weights-only data ({(str(exc) or type(exc).__name__).splitlines()[0][:200]}); "
            "ckpt stores no pickles: convert it to plain values"
        ) from None
    tensors: dict[str, torch.Tensor] = {}
    encoded = treemod.encode(value, tensors, set(), fqn)
    if tensors:
        raise UnsupportedValueError(
            f"DCP item {fqn!r} is a value holding tensors ({next(iter(tensors))!r}); "
            "save with DCP's default planner (flatten_state_dict=True) so each tensor is its own item"
        )
    return WriteResult(index=index, size_in_bytes=0, storage_data={"value": encoded})


def _entry(fqn: str, md: TensorStorageMetadata, by_index: Mapping[tuple[str, tuple[int, ...]], Any]) -> TensorEntry:
    """The manifest entry of tensor ``fqn`` from every rank's records of its boxes."""
    dtype = dtype_name(torch.empty(0, dtype=md.properties.dtype))
    shape = tuple(int(s) for s in md.size)
    nbytes = md.properties.dtype.itemsize
    for n in shape:
        nbytes *= n
    shards = []
    for box in md.chunks:
        offsets = tuple(int(o) for o in box.offsets)
        rec = by_index.get((fqn, offsets))
        if not isinstance(rec, dict) or "chunks" not in rec:
            raise CheckpointError(f"DCP item {fqn!r}: no rank wrote its box at {list(offsets)}")
        chunks = tuple(ChunkRef.from_json(c, strict=True) for c in rec["chunks"])
        shards.append(Shard(offsets=offsets, shape=tuple(int(s) for s in box.sizes), chunks=chunks))
    if len(shards) == 1 and shards[0].shape == shape:  # one box: a plain entry any ckpt reads
        return TensorEntry(dtype=dtype, shape=shape, nbytes=nbytes, chunks=shards[0].chunks)
    return TensorEntry(dtype=dtype, shape=shape, nbytes=nbytes, chunks=(), shards=tuple(shards))


def _by_box(parent: Manifest) -> Manifest:
    """``parent`` seen by box (``fqn@offsets`` -> entry of that box's chunks): the writer finds
    each shard's delta parent under the name it writes the shard by."""
    boxes: dict[str, TensorEntry] = {}
    for fqn, (kind, _, path) in dcp_items(parent).items():
        entry = parent.tensors.get(path) if kind == "tensor" and path is not None else None
        if entry is None:
            continue
        for offsets, shape, chunks in pieces(entry):
            n = sum(c.size for c in chunks)
            boxes[_box_key(fqn, offsets)] = TensorEntry(dtype=entry.dtype, shape=shape, nbytes=n, chunks=chunks)
    return dataclasses.replace(parent, tensors=boxes, tree={})


def _by_box_or_none(parent: Manifest) -> Manifest | None:
    try:
        return _by_box(parent)
    except CheckpointError as exc:  # a damaged parent costs deltas only, never the save
        log.warning("step %d: no deltas against it (%s)", parent.step, exc)
        return None


def _check_present(store: Store, manifest: Manifest, pool: ThreadPoolExecutor) -> None:
    """Every object the manifest cites is in the store (the parent's reused ones could have
    been collected while the ranks wrote, before the lease held the parent)."""
    keys = {k for ref in manifest.chunk_refs() for k in deltamod.referenced_keys(ref.to_json())}
    missing = keys - present_objects(store, keys, pool)
    if missing:
        raise CheckpointError(
            f"{store.url}: {len(missing)} object(s) of step {manifest.step} are gone before its commit "
            f"(e.g. {min(missing)}; a garbage collection ran during the save?); nothing committed"
        )
