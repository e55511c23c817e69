"""The records a manifest lists, and the bounds its fields are checked against.

A manifest (:mod:`ckpt.storage.manifest`) names every tensor of a checkpoint as a
:class:`TensorEntry`: its dtype, shape and the :class:`ChunkRef` of each stored object
holding its bytes, or, sharded, the :class:`Shard` boxes those objects hold.
:mod:`ckpt.storage.manifest_check` validates them as read from a store, against the bounds
defined here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ckpt.errors import CheckpointError

#: the newest manifest schema this ckpt reads (see :mod:`ckpt.storage.manifest`)
SCHEMA_VERSION = 2
#: what a manifest without any schema-2 addition is written as (older readers read it)
BASE_SCHEMA_VERSION = 1
#: tag of a per-rank node of the state tree, and the path prefix of per-rank tensors
RANK_TAG = "$rank"
HASH_NAME = "xxh3-128"

#: element size of every dtype a stored tensor may have, by name (``str(dtype)`` without
#: ``torch.``). An explicit table: a name from a manifest is never looked up on a module.
DTYPE_ITEMSIZE: Mapping[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
}
#: dtype names a ``{"$dtype": name}`` value of the state tree may carry: every tensor dtype,
#: and dtypes that only appear as values (quantization configs)
DTYPE_NAMES = frozenset({*DTYPE_ITEMSIZE, "qint8", "quint8", "qint32", "quint4x2", "quint2x4"})

#: the newest step a manifest can have: its file name has at most 18 digits
MAX_STEP = 10**18 - 1
#: bound of a tensor path's (and a name's) length
MAX_PATH_CHARS = 4096

#: JSON-pointer escaped components (``~`` only as ``~0``/``~1``), no control characters
PATH_RE = re.compile(r"(?:[^~\x00-\x1f\x7f]|~[01])*")


def check_step(value: Any, what: str = "step") -> int:
    """``value`` when it is a valid step number (an int in 0..10**18-1), else a CheckpointError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STEP:
        raise CheckpointError(f"{what} must be a non-negative int below 10**18, got {short(value)}")
    return value


def short(value: Any, n: int = 60) -> str:
    """``repr(value)`` cut to ``n`` characters: hostile values must not flood a message."""
    text = repr(value) if not isinstance(value, (dict, list)) or len(value) < 8 else f"<{type(value).__name__}>"
    return text if len(text) <= n else text[: n - 3] + "..."


@dataclass(frozen=True)
class ChunkRef:
    """One stored object holding ``size`` raw bytes of a tensor.

    A *packed* record (schema 2, ``of >= 0``) is a slice of a shared object: the object
    (``key``, ``hash``, ``stored``, ``codec``) holds ``of`` raw bytes and this chunk is bytes
    ``[at, at + size)`` of them; the hash and codec chain are those of the whole object.
    """

    hash: str
    key: str
    size: int
    stored: int
    codec: tuple[Mapping[str, Any], ...] = ()
    #: offset of this chunk in its packed object (-1: not packed)
    at: int = -1
    #: raw size of the packed object holding this chunk (-1: not packed; the object is ``size``)
    of: int = -1
    #: content hash of the object as stored (its encoded bytes), "" when not recorded: lets a
    #: restore verify an encoded object by reading it, before decoding it into live memory
    stored_hash: str = ""

    @property
    def packed(self) -> bool:
        return self.of >= 0

    @property
    def object_size(self) -> int:
        """Raw bytes of the stored object (what its hash covers and its chain decodes to)."""
        return self.of if self.of >= 0 else self.size

    def object_ref(self) -> ChunkRef:
        """The record of the whole stored object (itself when not packed)."""
        if self.of < 0:
            return self
        return replace(self, size=self.of, at=-1, of=-1)

    def to_json(self) -> dict[str, Any]:
        rec = {"hash": self.hash, "key": self.key, "size": self.size, "stored": self.stored, "codec": list(self.codec)}
        if self.of >= 0:
            rec["at"], rec["of"] = self.at, self.of
        if self.stored_hash:
            rec["stored_hash"] = self.stored_hash
        return rec

    @classmethod
    def from_json(cls, rec: Mapping[str, Any], *, strict: bool = False) -> ChunkRef:
        """A record of a manifest or of a delta's parent; ``stored`` is -1 (unknown) when absent
        unless ``strict``. Raises KeyError, TypeError or ValueError on a malformed record
        (records of a validated manifest are well formed)."""
        return cls(
            hash=str(rec["hash"]),
            key=str(rec.get("key", rec["hash"])),
            size=int(rec["size"]),
            stored=int(rec["stored"] if strict else rec.get("stored", -1)),
            codec=tuple(dict(s) for s in rec.get("codec", ())),
            at=int(rec.get("at", -1)),
            of=int(rec.get("of", -1)),
            stored_hash=str(rec.get("stored_hash", "")),
        )


@dataclass(frozen=True)
class Shard:
    """The box ``tensor[offsets[i]:offsets[i] + shape[i], ...]`` of a sharded tensor, its
    row-major bytes stored as ``chunks``."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    chunks: tuple[ChunkRef, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def to_json(self) -> dict[str, Any]:
        return {"offsets": list(self.offsets), "shape": list(self.shape), "chunks": [c.to_json() for c in self.chunks]}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: tuple[ChunkRef, ...]
    #: the boxes of a sharded tensor (schema 2); ``chunks`` is then ()
    shards: tuple[Shard, ...] = ()

    @property
    def refs(self) -> tuple[ChunkRef, ...]:
        """Every chunk of the tensor, of a plain or a sharded entry."""
        if not self.shards:
            return self.chunks
        return tuple(c for s in self.shards for c in s.chunks)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes}
        if self.shards:
            doc["shards"] = [s.to_json() for s in self.shards]
        else:
            doc["chunks"] = [c.to_json() for c in self.chunks]
        return doc
