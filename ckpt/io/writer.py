"""Chunk -> hash -> dedup -> codec -> store: writes a save's objects and returns their entries.

Work is split per chunk and run on a thread pool; zstandard, xxhash, NumPy copies and
file I/O release the GIL, so every core is used. Memory stays bounded by the number of
workers: a task holds one chunk's encoded payload at a time, the raw bytes are read
straight from the tensors' own memory. Committing the entries is :mod:`ckpt.storage.commit`'s job.

Entries only cite objects that are in the store: the parent checkpoint's objects are reused
only as far as :func:`ckpt.io.reuse.reusable` finds them still committed and present.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Container, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt import config
from ckpt.codecs import crypto
from ckpt.codecs import delta as deltamod
from ckpt.codecs.base import CodecRegistry, EncodeContext
from ckpt.errors import CheckpointError, UnsupportedValueError
from ckpt.io import delta_bases, scratch
from ckpt.io.hashing import hash_bytes
from ckpt.io.packing import Layout, Packer, unchanged_slice
from ckpt.io.reader import Reader
from ckpt.io.reuse import reusable
from ckpt.snapshot.executor import core_slot, wait_all
from ckpt.storage.manifest import ChunkRef, Manifest, TensorEntry
from ckpt.storage.store import Store
from ckpt.types import SaveStats

log = logging.getLogger("ckpt")

#: raw bytes of a packed object of small tensors at most (or the chunk size, when smaller)
PACK_CAPACITY = 4 * 1024 * 1024
#: the parent's packed objects kept decoded while a save compares its small tensors with them
PARENT_PACK_CACHE = 64 * 1024 * 1024


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def host_bytes(t: torch.Tensor, path: str) -> tuple[torch.Tensor, memoryview]:
    """A contiguous CPU tensor with ``t``'s values and a byte view of its memory.

    Returns the tensor too: the view is only valid while it is alive.
    """
    if t.layout != torch.strided:
        raise UnsupportedValueError(f"tensor {path!r}: layout {t.layout} is not supported; convert it to dense")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.reshape(-1)
    return t, flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


@dataclass
class WriteStats:
    """What one save's writer did. Shared by its worker threads; :meth:`frozen` gives a copy
    without the lock (what ``CheckpointInfo.write_stats`` holds)."""

    raw_bytes: int = 0
    written_bytes: int = 0
    reused_bytes: int = 0
    objects_written: int = 0
    #: objects written as XOR deltas against the parent checkpoint's chunk
    delta_objects: int = 0
    #: parent chunks read back from the store to encode a delta against
    parent_reads: int = 0
    #: large chunks whose encoding was chosen from samples
    probes: int = 0
    #: tensor path -> whether a delta was kept for any of its chunks (paths where one was tried)
    delta_outcome: dict[str, bool] = field(default_factory=dict)
    #: parent chunks read back and decoded whole, verified or refused (the rest of ``parent_reads``: probed
    #: from their first bytes only, or not readable)
    parent_decodes: int = 0
    #: bytes of parent objects read back: ranges for the probe, whole objects to decode
    parent_bytes_read: int = 0
    #: tensor path -> whether a delta of any of its chunks saved what ``MIN_GAIN`` asks (paths tried)
    delta_paid: dict[str, bool] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)

    def tried_delta(self, path: str, kept: bool, paid: bool) -> None:
        with self._lock:
            self.delta_outcome[path] = self.delta_outcome.get(path, False) or kept
            self.delta_paid[path] = self.delta_paid.get(path, False) or paid

    def frozen(self) -> SaveStats:
        with self._lock:
            values = {f.name: getattr(self, f.name) for f in dataclasses.fields(SaveStats)}
        values["delta_outcome"] = dict(values["delta_outcome"])
        values["delta_paid"] = dict(values["delta_paid"])
        return SaveStats(**values)


class Writer:
    """Writes tensors' chunks into a store, deduplicating against ``known`` objects.

    ``known`` maps raw-content hash -> the ChunkRef of an object known to be stored
    (from the parent manifest). Chunks seen twice in one save are written once.

    With ``delta`` and a ``parent`` manifest, a chunk that changed is also encoded as an
    XOR delta against the same chunk (same tensor path, chunk index, size and dtype) of
    the parent, and the delta is kept when it is smaller than the full encoding plus
    the manifest bytes its parent record costs. Parent raw bytes come from
    ``parent_tensors`` (host tensors of the previous snapshot, by path; checked against
    the parent's hash before use) or else are read back from the store and verified.
    Deltas cite the chunk's last full object (its base), so a restore reads two objects;
    a chunk whose delta would be ``max_chain`` saves old is written in full.
    """

    def __init__(
        self,
        store: Store,
        codecs: CodecRegistry,
        pool: ThreadPoolExecutor,
        *,
        known: Mapping[str, ChunkRef] | None = None,
        chunk_bytes: int,
        parent: Manifest | None = None,
        parent_tensors: Mapping[str, torch.Tensor] | None = None,
        delta: bool = False,
        max_chain: int = 8,
        delta_skip: Container[str] = (),
        absent: frozenset[str] = frozenset(),
        pack_bytes: int = 0,
    ) -> None:
        if isinstance(max_chain, bool) or not isinstance(max_chain, int) or max_chain < 1:
            raise CheckpointError(f"max_chain must be an int >= 1 (1 = no deltas), got {max_chain!r}")
        self.store = store
        self.codecs = codecs
        self.pool = pool
        # whole-object records: a packed record of the parent names its object, reused whole
        self.known = {h: ref.object_ref() for h, ref in (known or {}).items()}
        self.chunk_bytes = chunk_bytes
        self.stats = WriteStats()
        self._claims: dict[str, Future[ChunkRef]] = {}
        self._lock = threading.Lock()
        #: False: objects stored raw (a fast local tier, see Store.compress): no codec, no delta
        self.compress = store.compress
        self.delta = self.compress and bool(delta) and parent is not None and max_chain > 1 and deltamod.NAME in codecs
        self.parent = parent
        self.parent_tensors = parent_tensors or {}
        self.max_chain = max_chain
        #: tensor paths written in full without trying a delta (recently tried without gain)
        self.delta_skip = delta_skip
        #: keys the parent cites that the store no longer holds: never a delta's base
        self.absent = absent
        self._reader: Reader | None = None
        self._pack_reader: Reader | None = None
        #: tensors below this many bytes (and the chunk size) share objects (:mod:`ckpt.io.packing`)
        self.pack_bytes = min(max(0, pack_bytes), chunk_bytes)
        # packs of a few MiB: few enough objects, and enough of them to encode and decode in parallel
        capacity = min(chunk_bytes, max(PACK_CAPACITY, self.pack_bytes))
        self.packer = Packer(
            pool,
            self._write_pack,
            capacity=capacity,
            parent=parent if self.delta else None,
            parent_bytes=self._parent_pack,
        )

    def _write_pack(
        self, path: str, data: memoryview, dtype: str, itemsize: int, parent: ChunkRef | None, layout: Layout
    ) -> ChunkRef:
        if parent is None or path in self.delta_skip:
            return self._write_chunk(path, data, dtype, itemsize, None, None)
        # the parent pack's bytes from the previous snapshot's tensors, when it holds them all
        # (checked against the parent's hash before use, as for any chunk)
        parts: list[torch.Tensor] = []
        for p, _at, size in layout:
            live = self.parent_tensors.get(p)
            if live is None:
                break
            try:
                keep, view = host_bytes(live, p)
            except CheckpointError:
                break
            if len(view) != size:
                break
            parts.append(keep.reshape(-1).view(torch.uint8))
        parent_view = torch.cat(parts).numpy().data if len(parts) == len(layout) else None
        if parent_view is None:
            # else the parent's object as its repack started from it (read back, decoded and
            # verified once a save, cached), not read and decoded from the store a second time
            parent_view = self._parent_pack(parent)
            if parent_view is not None:
                self.stats.add(parent_reads=1, parent_decodes=1, parent_bytes_read=max(parent.stored, 0))
        return self._write_chunk(path, data, dtype, itemsize, parent, parent_view)

    def flush(self) -> None:
        """Write the packs still open: call once every tensor is submitted."""
        self.packer.flush()

    def submit(self, path: str, tensor: torch.Tensor) -> Future[TensorEntry]:
        """Schedule ``tensor``'s chunks; the returned future gives its manifest entry."""
        keep, view = host_bytes(tensor, path)
        dtype = dtype_name(keep)
        itemsize = keep.element_size()
        if 0 < len(view) < self.pack_bytes:
            self.stats.add(raw_bytes=len(view))
            same = self._unchanged_slice(path, view, dtype)
            if self.packer.repacks(path, dtype, len(view)):
                # back to its slot of the parent's object (an unchanged tensor keeps its record)
                if same is not None:
                    self.stats.add(reused_bytes=len(view))
                return self.packer.add(path, view, dtype, itemsize, tuple(keep.shape), unchanged=same)
            if same is not None:
                # unchanged since the parent: cite its slice of the parent's packed object
                self.stats.add(reused_bytes=len(view))
                reused: Future[TensorEntry] = Future()
                reused.set_result(TensorEntry(dtype=dtype, shape=tuple(keep.shape), nbytes=len(view), chunks=(same,)))
                return reused
            # copied into the pack now: the tensor's memory is not needed after this call
            return self.packer.add(path, view, dtype, itemsize, tuple(keep.shape))
        spans = [(o, min(o + self.chunk_bytes, len(view))) for o in range(0, len(view), self.chunk_bytes)]
        parents, parent_view, parent_keep = self._delta_parents(path, dtype, spans)
        chunk_futs = [
            self.pool.submit(
                self._write_chunk,
                path,
                view[a:b],
                dtype,
                itemsize,
                parents[i] if parents else None,
                parent_view[a:b] if parent_view is not None else None,
            )
            for i, (a, b) in enumerate(spans)
        ]
        self.stats.add(raw_bytes=len(view))
        out: Future[TensorEntry] = Future()
        remaining = [len(chunk_futs)]
        lock = threading.Lock()

        def done(_f: Future) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            try:
                refs = tuple(f.result() for f in chunk_futs)
            except BaseException as exc:  # noqa: BLE001 - forwarded to the caller
                out.set_exception(exc)
                return
            out.set_result(TensorEntry(dtype=dtype, shape=tuple(keep.shape), nbytes=len(view), chunks=refs))
            del keep_alive[:]

        # the byte views point into these tensors until every chunk is done
        keep_alive = [keep, parent_keep]
        if not chunk_futs:
            out.set_result(TensorEntry(dtype=dtype, shape=tuple(keep.shape), nbytes=0, chunks=()))
        for f in chunk_futs:
            f.add_done_callback(done)
        return out

    def _unchanged_slice(self, path: str, view: memoryview, dtype: str) -> ChunkRef | None:
        if self.parent is None:
            return None
        return unchanged_slice(self.parent, self.known, self._parent_packs(), path, view, dtype)

    def _parent_packs(self) -> Reader:
        """The reader of the parent's packed objects (verified, cached: each decoded once a save)."""
        with self._lock:
            if self._pack_reader is None:
                self._pack_reader = Reader(self.store, self.codecs, cache_bytes=PARENT_PACK_CACHE)
            return self._pack_reader

    def _parent_pack(self, obj: ChunkRef) -> memoryview | None:
        """A parent's packed object, decoded and verified; None when it cannot be read."""
        if obj.hash not in self.known:
            return None
        try:
            return self._parent_packs().object_bytes(obj, what=f"parent packed object {obj.key}")
        except CheckpointError:
            return None

    def _delta_parents(
        self, path: str, dtype: str, spans: list[tuple[int, int]]
    ) -> tuple[tuple[ChunkRef, ...] | None, memoryview | None, torch.Tensor | None]:
        """The parent's chunks of ``path`` when they line up with ``spans``, and its host bytes."""
        if not self.delta or not spans or path in self.delta_skip:
            return None, None, None
        entry = self.parent.tensors.get(path) if self.parent is not None else None
        if entry is None or entry.dtype != dtype or len(entry.chunks) != len(spans):
            return None, None, None
        if any(ref.size != b - a or ref.packed for ref, (a, b) in zip(entry.chunks, spans)):
            return None, None, None
        pview = pkeep = None
        live = self.parent_tensors.get(path)
        if live is not None:
            try:
                pkeep, pview = host_bytes(live, path)
            except CheckpointError:
                pkeep = pview = None
            if pkeep is not None and pview is not None and (dtype_name(pkeep) != dtype or len(pview) != entry.nbytes):
                pkeep = pview = None
        return entry.chunks, pview, pkeep

    def _write_chunk(
        self,
        path: str,
        data: memoryview,
        dtype: str,
        itemsize: int,
        parent: ChunkRef | None = None,
        parent_view: memoryview | None = None,
    ) -> ChunkRef:
        h = hash_bytes(data)
        mine: Future[ChunkRef] | None = None
        with self._lock:
            ref = self.known.get(h)
            if ref is None:
                other = self._claims.get(h)
                if other is None:
                    mine = self._claims[h] = Future()
        if ref is not None:
            self.stats.add(reused_bytes=len(data))
            return ref
        if mine is None:
            assert other is not None  # no claim of ours: another writer's is pending
            self.stats.add(reused_bytes=len(data))
            return other.result()
        try:
            # the payload is built in buffers lent for this object alone (ckpt.io.scratch):
            # not used after the block
            with scratch.scope():
                payload, chain, key = self._encode(path, data, h, dtype, itemsize, parent, parent_view)
                self.store.put_object(key, payload)
                # an encoded object's stored bytes hashed too: a restore checks them before decoding
                stored_hash = hash_bytes(payload) if chain else ""
                stored = len(payload)
                del payload
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        ref = ChunkRef(hash=h, key=key, size=len(data), stored=stored, codec=tuple(chain), stored_hash=stored_hash)
        delta_object = any(s.get("name") == deltamod.NAME for s in chain)
        self.stats.add(written_bytes=stored, objects_written=1, delta_objects=int(delta_object))
        mine.set_result(ref)
        return ref

    def _encode(
        self,
        path: str,
        data: memoryview,
        h: str,
        dtype: str,
        itemsize: int,
        parent: ChunkRef | None,
        parent_view: memoryview | None,
    ) -> tuple[bytes | memoryview, list[dict[str, Any]], str]:
        """``(payload, chain, key)`` of a new chunk: in full, or as a delta when the policy of
        :mod:`ckpt.codecs.delta` finds that smaller."""
        if not self.compress:
            key = object_key(crypto.address(self.store.codec_context, h, len(data)), [], len(data))
            payload, chain = crypto.seal_chain(self.store.codec_context, key, data, [], len(data))
            return payload, chain, key
        parent_record = parent.to_json() if parent is not None else None
        base_record, age = deltamod.delta_base(parent_record, self.max_chain)
        if base_record is not None and not self.absent.isdisjoint(deltamod.referenced_keys(base_record)):
            base_record, age = None, 0  # the base is gone from the store: a delta of it could never be read
        base = base_ref = None
        if base_record is not None:
            base_ref = parent if base_record is parent_record else ChunkRef.from_json(base_record)
            assert base_ref is not None  # a base record exists only when a parent does
            base = self._delta_base(path, base_ref, base_record, age, parent_view if base_ref is parent else None)
        ctx = EncodeContext(dtype=dtype, itemsize=itemsize, codec_context=self.store.codec_context)
        # CPU work, one per core (see core_slot); not while a base is read from the store
        try:
            with contextlib.nullcontext() if base is not None and base.stored else core_slot():
                choice = deltamod.choose(self.codecs, data, ctx, base)
        finally:
            if base is not None:
                base.close()
        if choice.tried:
            self.stats.tried_delta(path, choice.delta, choice.paid)
        if choice.probed:
            self.stats.add(probes=1)
        # an encrypted store keys objects by a keyed hash and seals them last (ckpt.codecs.crypto)
        key = object_key(crypto.address(ctx.codec_context, h, len(data)), choice.chain, len(choice.payload))
        if choice.delta and base_ref is not None:
            key = deltamod.delta_key(key, base_ref.key)  # and the base it is a delta of
        payload, chain = crypto.seal_chain(ctx.codec_context, key, choice.payload, choice.chain, len(data))
        return payload, chain, key

    def _delta_base(
        self, path: str, ref: ChunkRef, record: Mapping[str, Any], age: int, parent_view: memoryview | None
    ) -> deltamod.DeltaBase:
        """The base of a delta of this chunk: the previous snapshot's bytes when they are still
        its (the parent's chunk is the base), else read back from the store as far as needed."""
        if parent_view is not None:
            base = delta_bases.from_snapshot(record, age, ref, parent_view)
            if base is not None:
                return base
        if self._reader is None:
            # each changed chunk has its own ancestors: caching them would only hold memory
            self._reader = Reader(self.store, self.codecs, cache_bytes=0)
        return delta_bases.StoredBase(self._reader, ref, f"parent of tensor {path!r}", self.stats.add).base(record, age)


def object_key(address: str, chain: list[dict[str, Any]], stored: int) -> str:
    """The key of an object: its content's address (the raw hash, or a keyed hash of it in an
    encrypted store) together with how it is encoded (the codec chain, a delta's parent aside,
    and the encoded size).

    Objects are immutable, and a manifest cites one with its codec chain and stored size: the
    same content encoded another way (stored raw on a local tier, another dtype's codec, another
    zstd level or version) must never land on the key an older checkpoint cites, or that
    checkpoint would be lost. Equal content encoded alike still shares one key (dedup).
    """
    steps = [[step.get("name"), {k: v for k, v in step.items() if k not in ("name", "parent")}] for step in chain]
    return hash_bytes(json.dumps([address, steps, stored], sort_keys=True, separators=(",", ":")).encode())


def write_objects(
    store: Store,
    codecs: CodecRegistry,
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    pool: ThreadPoolExecutor,
    chunk_bytes: int,
    parent: Manifest | None = None,
    parent_tensors: Mapping[str, torch.Tensor] | None = None,
    delta: bool = True,
    max_chain: int = 8,
    delta_skip: Container[str] = (),
    on_tensor_written: Callable[[str], None] | None = None,
    pack_bytes: int | None = None,
) -> tuple[dict[str, TensorEntry], SaveStats]:
    """Write every tensor's objects; return the manifest entries by path and what was done.

    ``tensors`` may be a lazy iterable of ``(path, tensor)`` pairs: the async engine yields
    each tensor as soon as it is staged, and ``on_tensor_written(path)`` tells it when the
    tensor's bytes are no longer needed (its staging buffer can be reused). Chunks stored
    by ``parent`` are referenced, not written (dedup); with ``delta`` a changed chunk may
    be written as a delta against the parent's (:mod:`ckpt.codecs.delta`). Only a parent
    still committed is reused, and only its objects still present (:func:`reusable`).
    Tensors below ``pack_bytes`` (default ``CKPT_PACK_BYTES``) share objects (:mod:`ckpt.io.packing`).
    """
    known, absent = reusable(store, parent, pool) if parent is not None else ({}, frozenset())
    writer = Writer(
        store,
        codecs,
        pool,
        known=known,
        chunk_bytes=chunk_bytes,
        parent=parent if known else None,
        parent_tensors=parent_tensors,
        delta=delta,
        max_chain=max_chain,
        delta_skip=delta_skip,
        absent=absent,
        pack_bytes=config.pack_bytes() if pack_bytes is None else pack_bytes,
    )
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    futures: dict[str, Future[TensorEntry]] = {}
    try:
        for path, tensor in items:
            fut = writer.submit(path, tensor)
            if on_tensor_written is not None and writer.packer.holds(path):
                # copied into a pack: its memory is free now (a pack is written when full or at
                # the end, and a staging pool waiting for this release must not wait for that)
                on_tensor_written(path)
            elif on_tensor_written is not None:
                # mypy cannot type a lambda whose extra parameter binds the loop variable
                fut.add_done_callback(lambda _f, p=path: on_tensor_written(p))  # type: ignore[misc]
            futures[path] = fut
    finally:
        try:
            writer.flush()
        finally:
            wait_all(futures.values())
    return {p: f.result() for p, f in futures.items()}, writer.stats.frozen()
