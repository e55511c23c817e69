"""Chunk -> hash -> dedup -> codec -> store, and back: the only place that moves tensor bytes.

Work is split per chunk and run on a thread pool; zstandard, xxhash, NumPy copies and
file I/O release the GIL, so every core is used. Memory stays bounded by the number of
workers: a task holds one chunk's encoded payload at a time, the raw bytes are read
straight from (and decoded straight into) the tensors' own memory.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import xxhash

from ckpt.codecs import CodecRegistry, EncodeContext, decode_chain, default_chain, encode_chain
from ckpt.errors import CheckpointError, CorruptCheckpointError, UnsupportedValueError
from ckpt.manifest import ChunkRef, TensorEntry
from ckpt.store import Store
from ckpt.tree import dtype_from_name


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
    raw_bytes: int = 0
    written_bytes: int = 0
    reused_bytes: int = 0
    objects_written: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)


class Writer:
    """Writes tensors' chunks into a store, deduplicating against ``known`` objects.

    ``known`` maps raw-content hash -> the ChunkRef of an object known to be stored
    (from the parent manifest). Chunks seen twice in one save are written once.
    """

    def __init__(
        self,
        store: Store,
        codecs: CodecRegistry,
        pool: ThreadPoolExecutor,
        *,
        known: Mapping[str, ChunkRef] | None = None,
        chunk_bytes: int,
    ) -> None:
        self.store = store
        self.codecs = codecs
        self.pool = pool
        self.known = dict(known or {})
        self.chunk_bytes = chunk_bytes
        self.stats = WriteStats()
        self._claims: dict[str, Future[ChunkRef]] = {}
        self._lock = threading.Lock()

    def submit(self, path: str, tensor: torch.Tensor) -> Future[TensorEntry]:
        """Schedule ``tensor``'s chunks; the returned future gives its manifest entry."""
        keep, view = host_bytes(tensor, path)
        dtype = dtype_name(keep)
        itemsize = keep.element_size()
        spans = [(o, min(o + self.chunk_bytes, len(view))) for o in range(0, len(view), self.chunk_bytes)]
        chunk_futs = [self.pool.submit(self._write_chunk, path, view[a:b], dtype, itemsize) for a, b in spans]
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

        keep_alive = [keep]  # the byte views point into this tensor until every chunk is done
        if not chunk_futs:
            out.set_result(TensorEntry(dtype=dtype, shape=tuple(keep.shape), nbytes=0, chunks=()))
        for f in chunk_futs:
            f.add_done_callback(done)
        return out

    def _write_chunk(self, path: str, data: memoryview, dtype: str, itemsize: int) -> ChunkRef:
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
            payload, chain = encode_chain(
                self.codecs, default_chain(dtype), data, EncodeContext(dtype=dtype, itemsize=itemsize)
            )
            self.store.put_object(h, payload)
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        ref = ChunkRef(hash=h, key=h, size=len(data), stored=len(payload), codec=tuple(chain))
        self.stats.add(written_bytes=len(payload), objects_written=1)
        mine.set_result(ref)
        return ref


class Reader:
    """Reads chunks from a store, decodes them into destination memory and verifies them."""

    def __init__(self, store: Store, codecs: CodecRegistry, pool: ThreadPoolExecutor) -> None:
        self.store = store
        self.codecs = codecs
        self.pool = pool

    def raw_chunk(self, ref: Mapping[str, Any]) -> memoryview:
        """DecodeContext: a verified chunk by its manifest record (delta parents)."""
        chunk = ChunkRef(
            hash=str(ref["hash"]),
            key=str(ref.get("key", ref["hash"])),
            size=int(ref["size"]),
            stored=int(ref.get("stored", -1)),
            codec=tuple(ref.get("codec", ())),
        )
        out = memoryview(bytearray(chunk.size))
        self.read_chunk(chunk, out, what=f"parent object {chunk.key}")
        return out

    def read_chunk(self, ref: ChunkRef, out: memoryview, *, what: str) -> None:
        payload = self.store.get_object(ref.key, what=what)
        if ref.stored >= 0 and len(payload) != ref.stored:
            raise CorruptCheckpointError(
                f"{what}: object {ref.key} has {len(payload)} bytes, the manifest says {ref.stored} (truncated or replaced)"
            )
        try:
            decode_chain(self.codecs, list(ref.codec), memoryview(payload), out, self, what=f"{what}, object {ref.key}")
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"{what}: object {ref.key} is corrupt: {exc}") from None
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
