"""A delta's base chunk as the writer gets it: from the previous snapshot, or read back
from the store only as far as the choice of encoding needs (:class:`ckpt.codecs.delta.DeltaBase`).

Most bases are stored compressed. Deciding whether a changed chunk is worth a delta needs
only a sample of the base's raw bytes, so the stored object is fetched once and only the
first bytes of its byte planes are decoded for the probe
(:func:`ckpt.codecs.base.decode_prefix`), and the planes it stores raw are read in place;
the whole object is decoded and verified against its hash only when the probe favours a
delta, or finds the first bytes unlike the rest (see :func:`ckpt.codecs.delta.choose`). A
base that cannot be read or does not verify costs compression only: the chunk is written
in full, and the log says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from ckpt.codecs.base import decode_prefix, max_encoded_size
from ckpt.codecs.delta import DeltaBase
from ckpt.errors import CheckpointError
from ckpt.io.hashing import hash_bytes
from ckpt.io.memory import payload_buffer
from ckpt.io.reader import Reader
from ckpt.storage.manifest import ChunkRef

log = logging.getLogger("ckpt")


def from_snapshot(record: Mapping[str, Any], age: int, ref: ChunkRef, view: memoryview) -> DeltaBase | None:
    """The base from the previous snapshot's bytes of the same chunk, if they still hash to it."""
    copy = memoryview(bytes(view))  # a private copy first: the caller's buffer may be reused while we encode
    if hash_bytes(copy) != ref.hash:
        return None
    return DeltaBase(record, age, whole=lambda: copy)


class StoredBase:
    """The base read back from the store: fetched at most once, decoded as far as asked."""

    def __init__(self, reader: Reader, ref: ChunkRef, what: str, count: Callable[..., None]) -> None:
        self.reader = reader
        self.ref = ref.object_ref()
        self.what = what
        #: ``count(parent_reads=1)`` / ``count(parent_decodes=1)``: the writer's stats
        self.count = count
        self._payload: memoryview | None = None
        self._failed = False

    def base(self, record: Mapping[str, Any], age: int) -> DeltaBase:
        return DeltaBase(record, age, whole=self.whole, prefix=self.prefix, raw_planes=self.raw_planes)

    def payload(self) -> memoryview | None:
        """The stored object as fetched (None, logged, when it cannot be read)."""
        if self._payload is None and not self._failed:
            ref = self.ref
            limit = ref.stored if ref.stored >= 0 else max_encoded_size(ref.size)
            self.count(parent_reads=1)
            try:
                self._payload = memoryview(self.reader.store.get_object(ref.key, what=self.what, limit=limit + 1))
            except CheckpointError as exc:
                self._fail(exc)
        return self._payload

    def prefix(self, nbytes: int) -> memoryview | None:
        payload = self.payload()
        if payload is None or (self.ref.stored >= 0 and len(payload) != self.ref.stored):
            return None  # the whole decode says what is wrong with it
        return decode_prefix(self.reader.codecs, self.ref.codec, payload, self.ref.size, nbytes)

    def raw_planes(self) -> tuple[int, dict[int, memoryview]] | None:
        """``(itemsize, planes stored raw)`` of a base stored by ``bgzstd`` alone, read in place."""
        payload = self.payload()
        chain = self.ref.codec
        if payload is None or len(chain) != 1 or chain[0].get("name") != "bgzstd" or "bgzstd" not in self.reader.codecs:
            return None
        planes = getattr(self.reader.codecs.get("bgzstd"), "raw_planes", None)
        found = planes(payload, self.ref.size, chain[0]) if planes is not None else None
        return None if found is None else (int(chain[0]["itemsize"]), found)

    def whole(self) -> memoryview | None:
        payload = self.payload()
        if payload is None:
            return None
        self.count(parent_decodes=1)
        try:
            out = payload_buffer(self.ref.size, what=f"{self.what}, object {self.ref.key}")
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
        log.warning("%s: cannot read object %s for a delta (%s); writing it in full", self.what, self.ref.key, exc)
