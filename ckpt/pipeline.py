"""Chunk -> hash -> dedup -> codec -> store, and back: the only place that moves tensor bytes.

Work is split per chunk and run on a thread pool; zstandard, xxhash, NumPy copies and
file I/O release the GIL, so every core is used. Memory stays bounded by the number of
workers: a task holds one chunk's encoded payload at a time, the raw bytes are read
straight from (and decoded straight into) the tensors' own memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Container, Iterable, Mapping

import numpy as np
import torch
import xxhash

from ckpt import delta as deltamod
from ckpt.codecs import CodecRegistry, EncodeContext, decode_chain, default_chain, encode_chain
from ckpt.errors import CheckpointError, CorruptCheckpointError, UnsupportedValueError
from ckpt.manifest import ChunkRef, Manifest, TensorEntry
from ckpt.store import Store
from ckpt.tree import dtype_from_name

log = logging.getLogger("ckpt")


def hash_bytes(data: memoryview | bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


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
    return t, memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)

    def tried_delta(self, path: str, kept: bool) -> None:
        with self._lock:
            self.delta_outcome[path] = self.delta_outcome.get(path, False) or kept

    def frozen(self) -> SaveStats:
        with self._lock:
            values = {f.name: getattr(self, f.name) for f in dataclasses.fields(SaveStats)}
        values["delta_outcome"] = dict(values["delta_outcome"])
        return SaveStats(**values)


@dataclass(frozen=True)
class SaveStats:
    """A finished save's :class:`WriteStats` (plain values: copyable, picklable, ``asdict``-able)."""

    raw_bytes: int
    written_bytes: int
    reused_bytes: int
    objects_written: int
    delta_objects: int
    parent_reads: int
    probes: int
    delta_outcome: dict[str, bool]


#: bytes of a large changed chunk encoded both ways (in PROBE_SAMPLES pieces spread over it)
#: to choose between a delta and a full object before encoding the whole chunk one way
PROBE_BYTES = 512 * 1024
PROBE_SAMPLES = 4
#: a large chunk becomes a delta only when samples promise it at most this fraction of the
#: full encoding: a delta must also be read and XORed on restore, and a marginal gain
#: is not worth that
DELTA_MIN_GAIN = 0.9


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
    ) -> None:
        if isinstance(max_chain, bool) or not isinstance(max_chain, int) or max_chain < 1:
            raise CheckpointError(f"max_chain must be an int >= 1 (1 = no deltas), got {max_chain!r}")
        self.store = store
        self.codecs = codecs
        self.pool = pool
        self.known = dict(known or {})
        self.chunk_bytes = chunk_bytes
        self.stats = WriteStats()
        self._claims: dict[str, Future[ChunkRef]] = {}
        self._lock = threading.Lock()
        self.delta = bool(delta) and parent is not None and max_chain > 1 and deltamod.NAME in codecs
        self.parent = parent
        self.parent_tensors = parent_tensors or {}
        self.max_chain = max_chain
        #: tensor paths written in full without trying a delta (recently tried without gain)
        self.delta_skip = delta_skip
        self._reader: Reader | None = None

    def submit(self, path: str, tensor: torch.Tensor) -> Future[TensorEntry]:
        """Schedule ``tensor``'s chunks; the returned future gives its manifest entry."""
        keep, view = host_bytes(tensor, path)
        dtype = dtype_name(keep)
        itemsize = keep.element_size()
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

    def _delta_parents(
        self, path: str, dtype: str, spans: list[tuple[int, int]]
    ) -> tuple[tuple[ChunkRef, ...] | None, memoryview | None, torch.Tensor | None]:
        """The parent's chunks of ``path`` when they line up with ``spans``, and its host bytes."""
        if not self.delta or not spans or path in self.delta_skip:
            return None, None, None
        entry = self.parent.tensors.get(path) if self.parent is not None else None
        if entry is None or entry.dtype != dtype or len(entry.chunks) != len(spans):
            return None, None, None
        if any(ref.size != b - a for ref, (a, b) in zip(entry.chunks, spans)):
            return None, None, None
        pview = pkeep = None
        live = self.parent_tensors.get(path)
        if live is not None:
            try:
                pkeep, pview = host_bytes(live, path)
            except CheckpointError:
                pkeep = pview = None
            if pview is not None and (dtype_name(pkeep) != dtype or len(pview) != entry.nbytes):
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
            self.stats.add(reused_bytes=len(data))
            return other.result()
        try:
            payload, chain, key = self._encode(path, data, h, dtype, itemsize, parent, parent_view)
            self.store.put_object(key, payload)
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        ref = ChunkRef(hash=h, key=key, size=len(data), stored=len(payload), codec=tuple(chain))
        self.stats.add(
            written_bytes=len(payload), objects_written=1, delta_objects=int(key != h)
        )
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
    ) -> tuple[bytes | memoryview, list[dict], str]:
        """``(payload, chain, key)`` of a new chunk: in full, or as a delta when that is smaller.

        Encoding a large chunk both ways would double the codec work of every changed
        chunk, so samples spread over it decide first (:data:`PROBE_BYTES`), and only the
        chosen encoding runs on the whole chunk.
        """
        full_chain = default_chain(dtype)
        ctx = EncodeContext(dtype=dtype, itemsize=itemsize)
        base_ref, age = self._delta_base(parent)
        base = None
        if base_ref is not None:
            # the previous snapshot's bytes are the parent's: of use only when it is the base
            base = self._parent_raw(path, base_ref, parent_view if base_ref is parent else None)
        if base is None:
            payload, chain = encode_chain(self.codecs, full_chain, data, ctx)
            return payload, chain, h
        record = base_ref.to_json()
        # The base record and the age are repeated in the manifest: count them against the delta.
        overhead = len(json.dumps(record, separators=(",", ":"))) + len(',"age":') + len(str(age))
        dctx = EncodeContext(dtype=dtype, itemsize=itemsize, parent=base, parent_ref=record)
        delta_chain = [deltamod.NAME, *full_chain]

        def delta_wins(payload: bytes | memoryview, chain: list[dict], full_size: float) -> bool:
            won = bool(chain) and chain[0].get("name") == deltamod.NAME and len(payload) + overhead < full_size
            self.stats.tried_delta(path, won)
            if won:
                chain[0]["age"] = age
            return won

        if len(data) >= 4 * PROBE_BYTES:
            self.stats.add(probes=1)
            full_est, delta_est = self._probe(data, base, full_chain, delta_chain, ctx, dctx)
            if delta_est + overhead < full_est * DELTA_MIN_GAIN:
                payload, chain = encode_chain(self.codecs, delta_chain, data, dctx)
                if delta_wins(payload, chain, len(data)):
                    return payload, chain, deltamod.delta_key(h, base_ref.hash)
            else:
                self.stats.tried_delta(path, False)
            payload, chain = encode_chain(self.codecs, full_chain, data, ctx)
            return payload, chain, h
        payload, chain = encode_chain(self.codecs, full_chain, data, ctx)
        dpayload, dchain = encode_chain(self.codecs, delta_chain, data, dctx)
        if delta_wins(dpayload, dchain, len(payload) * DELTA_MIN_GAIN):
            return dpayload, dchain, deltamod.delta_key(h, base_ref.hash)
        return payload, chain, h

    def _delta_base(self, parent: ChunkRef | None) -> tuple[ChunkRef | None, int]:
        """The object a delta of this chunk cites, and the delta's age; ``(None, 0)``: write it in full.

        The base is the parent chunk when that is a full object, else the full object the
        parent's delta cites (see :mod:`ckpt.delta`). A delta ``max_chain - 1`` saves old
        ends the run: the chunk is written in full.
        """
        if parent is None:
            return None, 0
        age = deltamod.delta_age(parent.codec) + 1
        if age >= self.max_chain:
            return None, 0
        record = deltamod.parent_record(parent.codec)
        if record is None:
            return parent, age
        try:
            base = ChunkRef.from_json(record)
        except (KeyError, TypeError, ValueError):
            return parent, age
        if deltamod.parent_record(base.codec) is not None:
            return parent, age  # a store written with deltas of deltas: extend its chain
        return base, age

    def _probe(
        self,
        data: memoryview,
        base: memoryview,
        full_chain: list[str],
        delta_chain: list[str],
        ctx: EncodeContext,
        dctx: EncodeContext,
    ) -> tuple[float, float]:
        """Estimated full and delta sizes of ``data`` from encoding samples both ways."""
        n = len(data)
        step = PROBE_BYTES // PROBE_SAMPLES
        step -= step % 64  # keeps every sample aligned to whole elements
        starts = [((n - step) * i // (PROBE_SAMPLES - 1)) // 64 * 64 for i in range(PROBE_SAMPLES)]
        full = delta = taken = 0
        for a in starts:
            part, pbase = data[a : a + step], base[a : a + step]
            p, _ = encode_chain(self.codecs, full_chain, part, ctx)
            d, _ = encode_chain(self.codecs, delta_chain, part, dataclasses.replace(dctx, parent=pbase))
            full += len(p)
            delta += len(d)
            taken += len(part)
        return full * n / taken, delta * n / taken

    def _parent_raw(self, path: str, parent: ChunkRef, parent_view: memoryview | None) -> memoryview | None:
        """Verified raw bytes of ``parent``: from the previous snapshot if it still matches, else the store."""
        if parent_view is not None:
            # A private copy first: the caller's buffer may be reused while we encode.
            copy = memoryview(bytes(parent_view))
            if hash_bytes(copy) == parent.hash:
                return copy
        if self._reader is None:
            # each changed chunk has its own ancestors: caching them would only hold memory
            self._reader = Reader(self.store, self.codecs, self.pool, cache_bytes=0)
        try:
            self.stats.add(parent_reads=1)
            return self._reader.raw_chunk(parent.to_json(), what=f"parent of tensor {path!r}")
        except CheckpointError as exc:
            # A full object is always correct; a damaged parent only costs compression.
            log.warning("tensor %r: cannot read parent object %s for a delta (%s); writing it in full", path, parent.key, exc)
            return None


class Reader:
    """Reads chunks from a store, decodes them into destination memory and verifies them.

    Delta parents (see :mod:`ckpt.delta`) are read through :meth:`raw_chunk`, which keeps
    recently decoded parents (up to ``cache_bytes``) so a parent shared by several chunks,
    or by several links of one read, is fetched and verified once.
    """

    def __init__(
        self, store: Store, codecs: CodecRegistry, pool: ThreadPoolExecutor, *, cache_bytes: int = 64 * 1024 * 1024
    ) -> None:
        self.store = store
        self.codecs = codecs
        self.pool = pool
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cached = 0
        self._cache_lock = threading.Lock()
        #: parent objects decoded by :meth:`raw_chunk` (cache misses)
        self.parent_decodes = 0

    def raw_chunk(self, ref: Mapping[str, Any], *, what: str | None = None) -> memoryview:
        """DecodeContext: a verified chunk by its manifest record (delta parents)."""
        try:
            chunk = ChunkRef.from_json(ref)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"malformed parent record {ref!r}: {exc}") from None
        with self._cache_lock:
            hit = self._cache.get(chunk.key)
            if hit is not None:
                self._cache.move_to_end(chunk.key)
                return memoryview(hit)
        # Two threads may decode the same parent at once; waiting on each other instead
        # could deadlock on a (malicious) manifest whose parent records cite each other.
        raw = np.empty(chunk.size, dtype=np.uint8)  # fully overwritten by the decode
        self.read_chunk(chunk, memoryview(raw), what=what or f"parent object {chunk.key}")
        raw.flags.writeable = False  # shared through the cache: nobody may write into it
        with self._cache_lock:
            self.parent_decodes += 1
            if chunk.key not in self._cache and raw.nbytes <= self.cache_bytes:
                self._cache[chunk.key] = raw
                self._cached += raw.nbytes
                while self._cached > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= old.nbytes
        return memoryview(raw)

    def read_chunk(self, ref: ChunkRef, out: memoryview, *, what: str) -> None:
        payload = self.store.get_object(ref.key, what=what)
        if ref.stored >= 0 and len(payload) != ref.stored:
            raise CorruptCheckpointError(
                f"{what}: object {ref.key} has {len(payload)} bytes, the manifest says {ref.stored} (truncated or replaced)"
            )
        try:
            decode_chain(self.codecs, list(ref.codec), memoryview(payload), out, self, what=f"{what}, object {ref.key}")
        except CorruptCheckpointError as exc:
            # keeps the subclass: a delta whose parent object is gone is a MissingObjectError
            raise type(exc)(f"{what}: object {ref.key} is corrupt: {exc}") from None
        if hash_bytes(out) != ref.hash:
            raise CorruptCheckpointError(f"{what}: object {ref.key} fails verification (content hash mismatch)")

    def submit(self, path: str, entry: TensorEntry, dest: torch.Tensor) -> list[Future[None]]:
        """Decode ``entry`` into ``dest`` (a contiguous CPU tensor of the right size)."""
        if dest.nbytes != entry.nbytes:
            raise CheckpointError(f"tensor {path!r}: destination has {dest.nbytes} bytes, stored {entry.nbytes}")
        if entry.nbytes == 0:
            return []
        view = memoryview(dest.reshape(-1).view(torch.uint8).numpy())
        futs = []
        offset = 0
        for ref in entry.chunks:
            part = view[offset : offset + ref.size]
            futs.append(self.pool.submit(self.read_chunk, ref, part, what=f"tensor {path!r}"))
            offset += ref.size
        return futs


def empty_like_entry(entry: TensorEntry, path: str) -> torch.Tensor:
    return torch.empty(entry.shape, dtype=dtype_from_name(entry.dtype, what=f"tensor {path!r}"))


def wait_all(futures: Iterable[Future[Any]]) -> None:
    """Wait for every future, then raise the first error (never leaves work running)."""
    futures = list(futures)
    first: BaseException | None = None
    for f in futures:
        try:
            f.result()
        except BaseException as exc:  # noqa: BLE001
            if first is None:
                first = exc
    if first is not None:
        raise first
