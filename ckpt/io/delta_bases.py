"""A delta's base chunk as the writer gets it: from the previous snapshot, or read back
from the store only as far as the choice of encoding needs (:class:`ckpt.codecs.delta.DeltaBase`).

Most bases are stored compressed. Deciding whether a changed chunk is worth a delta needs
only a sample of the base's raw bytes, so the probe reads ranges of the stored object: its
plane table and the first bytes of each plane, decoded alone
(:func:`ckpt.codecs.base.decode_prefix_from`), and the planes it stores raw only where the
probe samples them (about 0.6 MiB of a 16 MiB float32 chunk's 13 MB). The whole object is
read, decoded and verified against its hash only when the probe favours a delta, or finds
the first bytes unlike the rest (see :func:`ckpt.codecs.delta.choose`). Reading every base
whole cost the incremental save of a 1.2 GB MLP+AdamW state 0.25-0.3 s of reads and page
faults on a 2-core VM, for chunks most of which (Adam moments) are then written in full. A
base that cannot be read or does not verify costs compression only: the chunk is written
in full, and the log says why.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from ckpt.codecs.base import decode_prefix, decode_prefix_from, max_encoded_size
from ckpt.codecs.delta import DeltaBase, Sliceable
from ckpt.errors import CheckpointError, CorruptCheckpointError
from ckpt.io.hashing import hash_bytes
from ckpt.io.reader import Reader
from ckpt.io.scratch import scratch
from ckpt.storage.manifest import ChunkRef

log = logging.getLogger("ckpt")


def from_snapshot(record: Mapping[str, Any], age: int, ref: ChunkRef, view: memoryview) -> DeltaBase | None:
    """The base from the previous snapshot's bytes of the same chunk, if they still hash to it."""
    copy = memoryview(bytes(view))  # a private copy first: the caller's buffer may be reused while we encode
    if hash_bytes(copy) != ref.hash:
        return None
    return DeltaBase(record, age, whole=lambda: copy)


class StoredBase:
    """The base read back from the store: in ranges for the probe (the plane table, the
    planes' first bytes, samples of the raw planes), whole at most once, and decoded whole
    only when a delta is to be encoded against it."""

    def __init__(self, reader: Reader, ref: ChunkRef, what: str, count: Callable[..., None]) -> None:
        self.reader = reader
        self.ref = ref.object_ref()
        self.what = what
        #: ``count(parent_reads=1)``, ``count(parent_bytes_read=n)``, ``count(parent_decodes=1)``: the writer's stats
        self.count = count
        self._payload: memoryview | None = None
        self._failed = False
        self._read_once = False
        self._small: dict[tuple[int, int], bytes] = {}
        self._ranges: Callable[[int, int], bytes] | None = None
        self._open = contextlib.ExitStack()
        self._closed = False

    def base(self, record: Mapping[str, Any], age: int) -> DeltaBase:
        return DeltaBase(
            record,
            age,
            whole=self.whole,
            prefix=self.prefix,
            raw_planes=self.raw_planes,
            close=self.close,
            stored=True,
        )

    def close(self) -> None:
        """Close the object the ranges were read from; no range is read after this."""
        self._closed = True
        self._ranges = None
        self._open.close()

    def _first_read(self) -> None:
        if not self._read_once:
            self._read_once = True
            self.count(parent_reads=1)

    def _range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the stored object within its recorded size (``b""`` once
        it could not be read): what the probe reads instead of the whole object."""
        end = min(end, self.ref.stored)
        if self._failed or self._closed or start >= end:
            return b""
        if not self.reader.store.local:
            # a ranged GET each would cost a round trip and a request per range (about 17
            # for a float32 chunk): a remote object is fetched whole once and sliced
            payload = self.payload()
            return b"" if payload is None else bytes(payload[start:end])
        if (start, end) in self._small:  # the plane table, read by the prefix and the raw planes
            return self._small[start, end]
        self._first_read()
        try:
            if self._ranges is None:  # opened once (locally) for every range the probe reads
                self._ranges = self._open.enter_context(self.reader.store.object_ranges(self.ref.key, what=self.what))
            got = self._ranges(start, end)
        except CheckpointError as exc:
            self._fail(exc)
            return b""
        self.count(parent_bytes_read=len(got))
        if end - start <= _SMALL:
            self._small[start, end] = got
        return got

    def payload(self) -> memoryview | None:
        """The whole stored object as fetched (None, logged, when it cannot be read)."""
        if self._payload is None and not self._failed:
            ref = self.ref
            limit = ref.stored if ref.stored >= 0 else max_encoded_size(ref.size)
            self._first_read()
            try:
                if not self.reader.store.local:
                    self._payload = memoryview(self.reader.store.get_object(ref.key, what=self.what, limit=limit + 1))
                    self.count(parent_bytes_read=len(self._payload))
                    return self._payload
                # into a buffer reused from one object to the next (the writer's scope)
                buf = scratch(limit)
                got = self.reader.store.read_object_into(ref.key, buf.data, what=self.what)
                if got is None or got > limit:
                    raise CorruptCheckpointError(
                        f"{self.what}: object {ref.key} has more than {limit} bytes, "
                        f"the manifest says {ref.stored} (replaced)"
                    )
                self._payload = buf.data[:got]
                self.count(parent_bytes_read=len(self._payload))
            except CheckpointError as exc:
                self._fail(exc)
        return self._payload

    def prefix(self, nbytes: int) -> memoryview | None:
        if self.ref.stored < 0:  # a size not recorded: the object is read whole
            payload = self.payload()
            if payload is None:
                return None
            return decode_prefix(self.reader.codecs, self.ref.codec, payload, self.ref.size, nbytes)
        return decode_prefix_from(
            self.reader.codecs, self.ref.codec, self._range, self.ref.stored, self.ref.size, nbytes
        )

    def raw_planes(self) -> tuple[int, Mapping[int, Sliceable]] | None:
        """``(itemsize, planes stored raw)`` of a base stored by ``bgzstd`` alone, read in ranges where sliced."""
        chain = self.ref.codec
        if len(chain) != 1 or chain[0].get("name") != "bgzstd" or "bgzstd" not in self.reader.codecs:
            return None
        codec = self.reader.codecs.get("bgzstd")
        found: Mapping[int, Sliceable] | None = None
        if self.ref.stored >= 0 and hasattr(codec, "raw_planes_from"):
            found = codec.raw_planes_from(self._range, self.ref.stored, self.ref.size, chain[0])
        elif hasattr(codec, "raw_planes"):
            payload = self.payload()
            found = codec.raw_planes(payload, self.ref.size, chain[0]) if payload is not None else None
        return None if found is None else (int(chain[0]["itemsize"]), found)

    def whole(self) -> memoryview | None:
        payload = self.payload()
        if payload is None:
            return None
        self.count(parent_decodes=1)
        try:
            # reused from one object to the next: the writer encodes inside a scratch scope
            out = scratch(self.ref.size)
            self.reader.check_payload(self.ref, payload, out.data, what=self.what)
        except CheckpointError as exc:
            self._fail(exc)
            return None
        self._payload = None  # decoded: the payload is not needed again
        return out.data

    def _fail(self, exc: CheckpointError) -> None:
        # A full object is always correct; a damaged base only costs compression.
        self._failed = True
        self._payload = None
        self._open.close()
        log.warning("%s: cannot read object %s for a delta (%s); writing it in full", self.what, self.ref.key, exc)


#: ranges of at most this many bytes are kept once read (the plane table)
_SMALL = 4096
