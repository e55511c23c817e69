"""Reading chunks back: fetch, decode into the destination memory, verify against the hash."""

from __future__ import annotations

import contextlib
import struct
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, Literal

import numpy as np
import torch
import xxhash

from ckpt.codecs.base import CodecRegistry, DecodeContext, decode_chain, max_encoded_size
from ckpt.codecs.crypto import ObjectDecodeContext
from ckpt.codecs.delta import NAME as DELTA
from ckpt.codecs.zstd import ByteGroupZstdCodec
from ckpt.errors import CheckpointError, CorruptCheckpointError
from ckpt.io import scratch
from ckpt.io.hashing import hash_bytes
from ckpt.io.memory import Scatter, copy_into, payload_buffer, prefault
from ckpt.io.plan import ChunkRead, ReadPlan, object_identity
from ckpt.io.region import read_box
from ckpt.snapshot.executor import io_pool, io_threads, wait_all
from ckpt.state.tree import dtype_from_name
from ckpt.storage.manifest import ChunkRef, TensorEntry
from ckpt.storage.store import Store


class Reader:
    """Reads chunks from a store, decodes them into destination memory and verifies them.

    Delta parents (see :mod:`ckpt.codecs.delta`) are read through :meth:`raw_chunk`, which keeps
    recently decoded parents (up to ``cache_bytes``) so a parent shared by several chunks,
    or by several links of one read, is fetched and verified once.
    """

    def __init__(
        self,
        store: Store,
        codecs: CodecRegistry,
        *,
        cache_bytes: int = 64 * 1024 * 1024,
        prefault_out: bool = True,
        stream: bool = False,
    ) -> None:
        self.store = store
        #: whether large bgzstd objects on local disk are decoded a block at a time
        #: (:meth:`_stream`), for a read whose objects' stored bytes were verified already
        self.stream = stream
        #: whether destinations are mapped in (:func:`~ckpt.io.memory.prefault`) before a
        #: decode writes them: fresh memory is, in one call instead of a fault per page;
        #: live tensors (an in-place restore) are in memory already, where it would only
        #: walk their pages (0.8 ms per 16 MiB chunk)
        self.prefault_out = prefault_out
        self.codecs = codecs
        self.codec_context = store.codec_context
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[str, str, int, int, str], np.ndarray] = OrderedDict()
        self._cached = 0
        self._cache_lock = threading.Lock()
        #: parent objects decoded by :meth:`raw_chunk` (cache misses)
        self.parent_decodes = 0

    def raw_chunk(self, ref: Mapping[str, Any], *, what: str | None = None) -> memoryview:
        """DecodeContext: a verified chunk by its manifest record (delta parents)."""
        try:
            chunk = ChunkRef.from_json(ref)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"malformed parent record {str(ref)[:200]}: {exc}") from None
        raw, decoded = self._object_bytes(chunk, what=what or f"parent object {chunk.key}")
        if decoded:
            with self._cache_lock:
                self.parent_decodes += 1
        return raw

    def object_bytes(self, chunk: ChunkRef, *, what: str) -> memoryview:
        """The verified raw bytes of the whole object of ``chunk`` (read-only, cached)."""
        return self._object_bytes(chunk, what=what)[0]

    def _object_bytes(self, chunk: ChunkRef, *, what: str) -> tuple[memoryview, bool]:
        """:meth:`object_bytes`, and whether it was decoded (not found in the cache)."""
        chunk = chunk.object_ref()
        # keyed by everything the record promises, not by the key alone: two records naming
        # one object with different hashes, sizes, stored sizes or codec chains must not
        # share a verified copy (a parent decoded by one delta's record of it would vouch
        # for another delta's damaged record, which a reader without the cache refuses)
        cache_key = object_identity(chunk)
        with self._cache_lock:
            hit = self._cache.get(cache_key)
            if hit is not None:
                self._cache.move_to_end(cache_key)
                return hit.data, False
        # Two threads may decode the same parent at once; waiting on each other instead
        # could deadlock on a (malicious) manifest whose parent records cite each other.
        raw = payload_buffer(chunk.size, what=f"{what}, object {chunk.key}")  # fully overwritten by the decode
        self.read_object(chunk, raw.data, what=what)
        raw.flags.writeable = False  # shared through the cache: nobody may write into it
        with self._cache_lock:
            if cache_key not in self._cache and raw.nbytes <= self.cache_bytes:
                self._cache[cache_key] = raw
                self._cached += raw.nbytes
                while self._cached > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= old.nbytes
        return raw.data, True

    def read_chunk(self, ref: ChunkRef, out: memoryview, *, what: str) -> None:
        """Bytes of chunk ``ref`` into ``out``; a packed chunk is sliced from its (cached) object."""
        if ref.packed:
            raw = self.object_bytes(ref, what=what)
            copy_into(out, raw[ref.at : ref.at + ref.size])
            return
        self.read_object(ref, out, what=what)

    def read_object(self, ref: ChunkRef, out: memoryview, *, what: str) -> None:
        """The whole object of ``ref`` decoded into ``out`` (``ref.object_size`` bytes) and verified."""
        ref = ref.object_ref()
        # Never more than one byte past what the manifest records (or, for a parent record
        # without a stored size, past what any codec chain makes of the raw size).
        expected = ref.stored if ref.stored >= 0 else max_encoded_size(ref.size)
        # byte planes on local disk, decoded a block at a time: no buffer the payload's size
        streamed = (
            self.stream
            and self.store.local
            and _streamable(self.codecs, ref, len(out))
            and self.store.with_object_file(ref.key, lambda fd, size: self._stream(ref, fd, size, out, what), what=what)
        )
        if streamed:
            return
        if not ref.codec and ref.stored == len(out):
            # stored raw on local disk: read straight into the destination, then verify there
            if self.prefault_out:
                prefault(out)
            got = self.store.read_object_into(ref.key, out, what=what)
            if got is not None:
                self.check_payload(ref, out, out, what=what, in_place=got)
                return
        if self.store.local:  # (a remote store's payload comes back as bytes: no buffer of ours)
            with self._scratch(expected + 1) as buf:
                got = self.store.read_object_into(ref.key, buf, what=what)
                if got is not None:
                    self.check_payload(ref, buf[:got], out, what=what)
                    return
        payload = self.store.get_object(ref.key, what=what, limit=expected + 1)
        self.check_payload(ref, payload, out, what=what)

    def read_object_scattered(self, ref: ChunkRef, parts: list[tuple[int, memoryview]], *, what: str) -> bool:
        """The whole object of ``ref`` streamed (see :meth:`_stream`) and verified, its byte
        ranges ``(at, dest)`` copied into their destinations as they come by, through no buffer
        of the object's size (the tensors of a packed object). False, nothing written, where
        it cannot be streamed: read it whole then."""
        ref = ref.object_ref()
        if not (self.stream and self.store.local and _streamable(self.codecs, ref, ref.size)):
            return False
        out = Scatter(ref.size, parts)
        done = self.store.with_object_file(ref.key, lambda fd, size: self._stream(ref, fd, size, out, what), what=what)
        return bool(done)

    def _stream(self, ref: ChunkRef, fd: int, size: int, out: memoryview | Scatter, what: str) -> bool:
        """Object ``ref`` (one bgzstd step) streamed from ``fd`` into ``out`` and verified;
        False, nothing written, where its payload must be decoded whole."""
        if size != ref.stored:
            has = f"more than {ref.stored}" if size > ref.stored else str(size)
            raise CorruptCheckpointError(
                f"{what}: object {ref.key} has {has} bytes, the manifest says {ref.stored} (truncated or replaced)"
            )
        if self.prefault_out and isinstance(out, memoryview):
            prefault(out)
        digest = xxhash.xxh3_128()
        codec = self.codecs.get(BGZSTD, what=what)
        assert isinstance(codec, ByteGroupZstdCodec)  # (see _streamable)
        try:
            if not codec.decode_file(fd, size, out, ref.codec[0], digest, "it"):
                return False
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"{what}: object {ref.key} is corrupt: {exc}") from None
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, struct.error) as exc:
            # what the whole decode calls corrupt too (decode_chain); an OSError is the store's
            raise CorruptCheckpointError(
                f"{what}: object {ref.key} is corrupt: bgzstd cannot decode it ({type(exc).__name__}: {exc})"
            ) from None
        if digest.hexdigest() != ref.hash:
            raise CorruptCheckpointError(f"{what}: object {ref.key} fails verification (content hash mismatch)")
        return True

    @contextlib.contextmanager
    def _decode_context(self, ref: ChunkRef) -> Iterator[DecodeContext]:
        """What decoding object ``ref`` may ask for (an encrypted object is bound to its key).

        A Reader that caches no parents (``cache_bytes=0``) decodes the full object that a
        delta of ckpt's ``xor`` cites into a reused buffer lent to this decode alone, instead
        of fresh memory for each delta: on a host where fresh pages are costly, half of a
        delta restore's time (fp32 MiniLM, 103 of 105 chunks deltas).
        """
        base = None if self.cache_bytes else _xor_base(ref)
        if base is None:
            yield ObjectDecodeContext(self, ref.key)
            return
        with self._scratch(base.size) as raw:
            self.read_object(base, raw, what=f"parent object {base.key}")
            yield ObjectDecodeContext(_LentParent(self, base, raw), ref.key)

    @contextlib.contextmanager
    def _scratch(self, nbytes: int) -> Iterator[memoryview]:
        """A buffer of ``nbytes`` for one payload, lent by :mod:`ckpt.io.scratch` and given
        back after it: a later read (of this restore or the next) finds it mapped in."""
        buf = scratch.lend(nbytes, what="an object's payload")  # contents undefined: only what is read is used
        try:
            yield buf.data[:nbytes]
        finally:
            scratch.give_back(buf)

    def check_payload(
        self, ref: ChunkRef, payload: bytes | memoryview, out: memoryview, *, what: str, in_place: int | None = None
    ) -> None:
        """Decode ``payload`` (object ``ref.key`` as fetched) into ``out`` and verify its hash.

        ``in_place``: the payload was read straight into ``out`` (a raw object), this many bytes.
        """
        expected = ref.stored if ref.stored >= 0 else max_encoded_size(ref.size)
        if in_place is not None:
            if in_place != ref.stored:
                has = f"more than {ref.stored}" if in_place > ref.stored else str(in_place)
                raise CorruptCheckpointError(
                    f"{what}: object {ref.key} has {has} bytes, the manifest says {ref.stored} (truncated or replaced)"
                )
            if hash_bytes(out) != ref.hash:
                raise CorruptCheckpointError(f"{what}: object {ref.key} fails verification (content hash mismatch)")
            return
        if len(payload) > expected or (ref.stored >= 0 and len(payload) != ref.stored):
            has = f"more than {expected}" if len(payload) > expected else str(len(payload))
            raise CorruptCheckpointError(
                f"{what}: object {ref.key} has {has} bytes, the manifest says {ref.stored} (truncated or replaced)"
            )
        if self.prefault_out:
            prefault(out)
        try:
            with self._decode_context(ref) as ctx:
                decode_chain(
                    self.codecs, list(ref.codec), memoryview(payload), out, ctx, what=f"{what}, object {ref.key}"
                )
        except CorruptCheckpointError as exc:
            # keeps the subclass: a delta whose parent object is gone is a MissingObjectError
            raise type(exc)(f"{what}: object {ref.key} is corrupt: {exc}") from None
        if hash_bytes(out) != ref.hash:
            raise CorruptCheckpointError(f"{what}: object {ref.key} fails verification (content hash mismatch)")


BGZSTD = ByteGroupZstdCodec.name
#: a packed object may hold this many bytes more than twice what a read of it takes (the
#: slots of tensors removed since, others not read); ckpt writes packs of 4 MiB (at most
#: the chunk size, or ``CKPT_PACK_BYTES`` when larger)
PACK_SLACK_BYTES = 64 << 20
#: objects below this many raw bytes are decoded whole (see :meth:`Reader._stream`)
STREAM_MIN_BYTES = 1 << 20


def _streamable(codecs: CodecRegistry, ref: ChunkRef, size: int) -> bool:
    """Whether object ``ref`` (of ``size`` raw bytes) is one bgzstd step of ckpt's own codec,
    large enough to gain from :meth:`Reader._stream`."""
    if size < STREAM_MIN_BYTES or len(ref.codec) != 1 or ref.codec[0].get("name") != BGZSTD:
        return False
    return isinstance(codecs.get(BGZSTD, what=""), ByteGroupZstdCodec) if BGZSTD in codecs else False


class _LentParent:
    """A :class:`DecodeContext` that answers the parent record ``base`` with ``raw``, its
    bytes already read and verified, and any other with ``reader``'s :meth:`Reader.raw_chunk`."""

    def __init__(self, reader: Reader, base: ChunkRef, raw: memoryview) -> None:
        self.codec_context = reader.codec_context
        self._reader, self._base, self._raw = reader, base, raw

    def raw_chunk(self, ref: Mapping[str, Any]) -> memoryview:
        b = self._base
        if ref.get("hash") == b.hash and ref.get("key", ref.get("hash")) == b.key and ref.get("size") == b.size:
            return self._raw
        return self._reader.raw_chunk(ref)


def _xor_base(ref: ChunkRef) -> ChunkRef | None:
    """The full object a delta of ckpt's ``xor`` cites, when ``ref`` is one (else None)."""
    base = xor_parent(ref)
    if not isinstance(base, ChunkRef) or base.packed or xor_parent(base) is not None:
        return None
    return base


def xor_parent(ref: ChunkRef) -> ChunkRef | Literal[False] | None:
    """The record ``ref``'s codec chain cites as the parent of ckpt's ``xor``; None when no
    step cites a parent; False for anything else (several, a plugin's, a malformed record:
    the decode says what is wrong with it)."""
    citing = [step for step in ref.codec if "parent" in step]
    if not citing:
        return None
    if len(citing) > 1 or citing[0].get("name") != DELTA or not isinstance(citing[0]["parent"], Mapping):
        return False
    try:
        return ChunkRef.from_json(citing[0]["parent"])
    except (KeyError, TypeError, ValueError):
        return False


def empty_like_entry(entry: TensorEntry, path: str) -> torch.Tensor:
    dtype = dtype_from_name(entry.dtype, what=f"tensor {path!r}")
    try:
        host = torch.empty(entry.shape, dtype=dtype)
    except (RuntimeError, MemoryError) as exc:  # torch reports a failed allocation as a RuntimeError
        raise CheckpointError(f"tensor {path!r}: cannot allocate {entry.nbytes} bytes for it ({exc})") from None
    if host.nbytes != entry.nbytes:  # a validated manifest never gets here
        raise CorruptCheckpointError(f"tensor {path!r}: shape {list(entry.shape)} is not {entry.nbytes} bytes")
    return host


def writable_in_place(dest: torch.Tensor) -> bool:
    return dest.device.type == "cpu" and dest.is_contiguous() and not dest.is_conj() and not dest.is_neg()


def read_tensors(
    store: Store,
    codecs: CodecRegistry,
    plan: ReadPlan,
    *,
    destinations: Mapping[str, torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
    cache_parents: bool = True,
    stream: bool = False,
) -> dict[str, torch.Tensor]:
    """Carry out ``plan``: every tensor of it decoded and verified, in parallel.

    A tensor of ``destinations`` is filled in place (straight into its memory when it is
    a contiguous CPU tensor, else through a host copy); the others come back as fresh CPU
    tensors. ``progress(n)`` is called with the raw bytes of each chunk done; ``workers``
    sizes the pool (default :func:`~ckpt.snapshot.executor.io_threads`); ``cache_parents``
    False: a delta's parent is decoded for it alone, into a reused buffer (see
    :meth:`Reader._decode_context`), not kept for other chunks citing it; ``stream``: the
    plan's objects were verified by their stored bytes already (see :meth:`Reader._stream`).
    """
    destinations = destinations or {}
    result: dict[str, torch.Tensor] = {}
    staged: list[tuple[torch.Tensor, torch.Tensor]] = []  # (live, host copy)
    targets: dict[str, memoryview] = {}
    hosts: dict[str, torch.Tensor] = {}
    in_place: set[str] = set()  # paths decoded straight into their destinations
    for path in plan.paths:
        entry = plan.entry(path)
        dest = destinations.get(path)
        if dest is not None and writable_in_place(dest):
            if dest.nbytes != entry.nbytes:
                raise CheckpointError(f"tensor {path!r}: destination has {dest.nbytes} bytes, stored {entry.nbytes}")
            host = dest.detach()
            in_place.add(path)
        else:
            host = empty_like_entry(entry, path)
            if dest is not None:
                staged.append((dest, host))
        result[path] = dest if dest is not None else host
        hosts[path] = host
        # (an empty one writable too: a packed record of no bytes copies nothing into it)
        targets[path] = host.reshape(-1).view(torch.uint8).numpy().data if entry.nbytes else memoryview(bytearray())
    if not plan.reads and not staged:  # (every tensor empty, or none asked for: no pool to start)
        return result
    with io_pool("ckpt-read", workers) as pool:
        # only live destinations (an in-place restore): nothing fresh to map in
        fresh = any(p not in in_place for p in plan.paths)
        reader = Reader(
            store, codecs, prefault_out=fresh, stream=stream, **({} if cache_parents else {"cache_bytes": 0})
        )

        def job(r: ChunkRead) -> None:
            reader.read_chunk(r.ref, targets[r.path][r.offset : r.offset + r.ref.size], what=f"tensor {r.path!r}")
            if progress is not None:
                progress(r.ref.size)

        def packed_job(reads: list[ChunkRead]) -> None:
            # one decode and verification of the shared object, then a slice per tensor
            obj = reads[0].ref.object_ref()
            what = tensors_named(r.path for r in reads)
            parts = [(r.ref.at, targets[r.path][r.offset : r.offset + r.ref.size]) for r in reads]
            wanted = sum(r.ref.size for r in reads)
            if obj.size > 2 * wanted + PACK_SLACK_BYTES:
                # a forged size (runs of zeros store 64 GiB in 2 MiB) would cost that much memory
                # or decoding for a few tensors: ckpt's packs hold 4 MiB (at most the chunk size)
                raise CorruptCheckpointError(
                    f"{what}: packed object {obj.key} declares {obj.size} bytes, of which these tensors read "
                    f"{wanted}: larger than a pack of them can be"
                )
            # streamed (verified stored bytes): each block copied on, no buffer of its size;
            # only an object these reads fill half of at least
            if not (2 * wanted >= obj.size and reader.read_object_scattered(obj, parts, what=what)):
                buf = scratch.lend(obj.size, what=f"{what}, packed object {obj.key}")
                try:
                    raw = buf.data[: obj.size]
                    reader.read_object(obj, raw, what=what)
                    for at, dest in parts:
                        copy_into(dest, raw[at : at + dest.nbytes])
                finally:
                    scratch.give_back(buf)
            if progress is not None:
                for r in reads:
                    progress(r.ref.size)

        # packs first: each is one task holding many tensors, which must not end the read alone
        futures = [pool.submit(packed_job, reads) for reads in plan.packed_objects().values()]
        futures += [pool.submit(job, r) for r in plan.reads if not r.ref.packed and r.shard is None]
        # one object refused refuses the read: what is not started yet is not decoded for nothing
        wait_all(futures, cancel_on_error=True)
        for path in plan.paths:  # sharded tensors (schema 2): their boxes put together
            entry = plan.entry(path)
            if entry.shards:
                read_box(
                    reader,
                    entry,
                    path,
                    (0,) * len(entry.shape),
                    entry.shape,
                    pool=pool,
                    out=hosts[path].view(entry.shape),
                )
                if progress is not None:
                    progress(entry.nbytes)
    with torch.no_grad():
        for dest, host in staged:
            dest.copy_(host)
    return result


def tensors_named(paths: Iterable[str], limit: int = 8) -> str:
    """``tensor 'a'``, or ``tensor 'a' (packed with 'b', 'c')``: who shares a packed object."""
    names = list(dict.fromkeys(paths))
    head = f"tensor {names[0]!r}" if names else "tensor ?"
    if len(names) <= 1:
        return head
    shown = ", ".join(repr(p) for p in names[1:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{head} (packed with {shown}{more})"


def iter_chunks(
    store: Store, codecs: CodecRegistry, plan: ReadPlan, *, window: int | None = None
) -> Iterator[bytearray]:
    """Decoded, verified raw bytes of each read of ``plan``, in order.

    Up to ``window`` chunks are fetched and decoded in parallel ahead of the consumer, so
    memory stays bounded whatever the size of the checkpoint.
    """
    with io_pool("ckpt-read") as pool, io_pool("ckpt-read-slab") as slab_pool:
        window = window or io_threads() + 2
        reader = Reader(store, codecs)

        def job(r: ChunkRead) -> bytearray:
            try:
                buf = bytearray(r.ref.size)
            except MemoryError:
                raise CheckpointError(f"tensor {r.path!r}: cannot allocate {r.ref.size} bytes for a chunk") from None
            reader.read_chunk(r.ref, memoryview(buf), what=f"tensor {r.path!r}")
            return buf

        def slab(path: str, rows: tuple[int, int]) -> bytearray:
            entry = plan.entry(path)
            shape = (rows[1] - rows[0], *entry.shape[1:])
            box = read_box(reader, entry, path, (rows[0],) + (0,) * (len(shape) - 1), shape, pool=slab_pool)
            return bytearray(box.reshape(-1).view(torch.uint8).numpy().tobytes()) if box.numel() else bytearray()

        done: set[str] = set()  # sharded tensors (schema 2) already yielded whole
        pending: deque[Future[bytearray]] = deque()
        try:
            for r in plan.reads:
                if r.shard is not None:
                    if r.path in done:
                        continue
                    done.add(r.path)
                    entry = plan.entry(r.path)
                    while pending:  # in order: what precedes this tensor first
                        yield pending.popleft().result()
                    if not entry.shape:  # a scalar: one box
                        box = read_box(reader, entry, r.path, (), (), pool=slab_pool)
                        yield bytearray(box.reshape(-1).view(torch.uint8).numpy().tobytes())
                    for rows in _slabs(entry):  # the full tensor, a slab of rows at a time
                        yield slab(r.path, rows)
                    continue
                pending.append(pool.submit(job, r))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def _slabs(entry: TensorEntry, target: int = 16 * 1024 * 1024) -> Iterator[tuple[int, int]]:
    """Row ranges of a sharded tensor of about ``target`` bytes each (whole rows)."""
    rows = entry.shape[0] if entry.shape else 0
    row_bytes = max(1, entry.nbytes // rows) if rows else 1
    step = max(1, target // row_bytes)
    for lo in range(0, rows, step):
        yield lo, min(rows, lo + step)
