"""The manifest: one JSON document per checkpoint, written last; its existence is the commit.

Schema (version 1)::

    {"format": "ckpt", "schema": 1, "step": 10, "created": "2026-11-23T10:00:00Z",
     "parent": 5, "seq": 7, "run": "9f2c...", "hash": "xxh3-128", "chunk_bytes": 16777216,
     "tree": {...encoded state tree, tensors as {"$tensor": path}...},
     "adapters": {"model": "torch.nn.Module", ...},
     "tensors": {path: {"dtype": "float32", "shape": [2048, 2048], "nbytes": 16777216,
                        "chunks": [{"hash": h, "key": h, "size": n, "stored": m,
                                    "codec": [{"name": "bgzstd", "itemsize": 4}]}]}},
     "raw_bytes": ..., "stored_bytes": ..., "plugins": {name: version}, "meta": {...}}

``parent`` is the step this checkpoint continues from; ``seq`` its commit sequence in
the store (the newest commit has the highest, whatever its step) and ``run`` the id of
the writer that committed it; both are absent from manifests written before lineage
was recorded. ``stored`` is the encoded size of the object; ``key`` names the object in ``objects/``
(equal to ``hash`` for full objects). Readers accept every schema version up to
:data:`SCHEMA_VERSION` and refuse newer ones with a clear error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckpt.errors import CheckpointError, SchemaError

SCHEMA_VERSION = 1
HASH_NAME = "xxh3-128"


def check_step(value: Any, what: str = "step") -> int:
    """``value`` when it is a valid step number (an int >= 0), else a CheckpointError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{what} must be a non-negative int, got {value!r}")
    return value


@dataclass(frozen=True)
class ChunkRef:
    """One stored object holding ``size`` raw bytes of a tensor."""

    hash: str
    key: str
    size: int
    stored: int
    codec: tuple[Mapping[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"hash": self.hash, "key": self.key, "size": self.size, "stored": self.stored, "codec": list(self.codec)}

    @classmethod
    def from_json(cls, rec: Mapping[str, Any], *, strict: bool = False) -> ChunkRef:
        """A record of a manifest or of a delta's parent; ``stored`` is -1 (unknown) when absent
        unless ``strict``. Raises KeyError, TypeError or ValueError on a malformed record."""
        return cls(
            hash=str(rec["hash"]),
            key=str(rec.get("key", rec["hash"])),
            size=int(rec["size"]),
            stored=int(rec["stored"] if strict else rec.get("stored", -1)),
            codec=tuple(dict(s) for s in rec.get("codec", ())),
        )


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: tuple[ChunkRef, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "chunks": [c.to_json() for c in self.chunks],
        }


@dataclass(frozen=True)
class Manifest:
    step: int
    created: str
    tree: Any
    adapters: Mapping[str, str]
    tensors: Mapping[str, TensorEntry]
    parent: int | None = None
    raw_bytes: int = 0
    stored_bytes: int = 0
    chunk_bytes: int = 0
    plugins: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION
    #: commit sequence: one more than the highest of the store when committed (None: written
    #: before lineage was recorded); "latest" is the highest, not the highest step
    seq: int | None = None
    #: id of the writer (run) that committed it
    run: str = ""

    def to_json_bytes(self) -> bytes:
        doc = {
            "format": "ckpt",
            "schema": self.schema,
            "step": self.step,
            "created": self.created,
            "parent": self.parent,
            **({"seq": self.seq} if self.seq is not None else {}),
            **({"run": self.run} if self.run else {}),
            "hash": HASH_NAME,
            "chunk_bytes": self.chunk_bytes,
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
            "plugins": dict(self.plugins),
            "meta": dict(self.meta),
            "adapters": dict(self.adapters),
            "tree": self.tree,
            "tensors": {p: e.to_json() for p, e in self.tensors.items()},
        }
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()

    def chunk_refs(self) -> list[ChunkRef]:
        return [c for e in self.tensors.values() for c in e.chunks]

    @classmethod
    def from_json_bytes(cls, data: bytes, *, where: str) -> Manifest:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SchemaError(f"manifest {where} is not valid JSON: {exc}") from None
        return cls.from_doc(doc, where=where)

    @classmethod
    def from_doc(cls, doc: Any, *, where: str) -> Manifest:
        def fail(msg: str) -> SchemaError:
            return SchemaError(f"manifest {where}: {msg}")

        if not isinstance(doc, dict) or doc.get("format") != "ckpt":
            raise fail("not a ckpt manifest (missing format: ckpt)")
        schema = doc.get("schema")
        if not isinstance(schema, int) or schema < 1:
            raise fail(f"bad schema version {schema!r}")
        if schema > SCHEMA_VERSION:
            raise fail(
                f"written by schema version {schema}, this ckpt reads up to {SCHEMA_VERSION}; upgrade ckpt to read it"
            )
        if doc.get("hash", HASH_NAME) != HASH_NAME:
            raise fail(f"unknown hash function {doc.get('hash')!r}")
        try:
            tensors = {}
            for path, e in doc["tensors"].items():
                chunks = tuple(ChunkRef.from_json(c, strict=True) for c in e["chunks"])
                entry = TensorEntry(
                    dtype=str(e["dtype"]),
                    shape=tuple(int(s) for s in e["shape"]),
                    nbytes=int(e["nbytes"]),
                    chunks=chunks,
                )
                if sum(c.size for c in chunks) != entry.nbytes:
                    raise fail(f"tensor {path!r}: chunk sizes do not add up to {entry.nbytes} bytes")
                tensors[str(path)] = entry
            return cls(
                step=int(doc["step"]),
                created=str(doc.get("created", "")),
                tree=doc["tree"],
                adapters=dict(doc.get("adapters", {})),
                tensors=tensors,
                parent=None if doc.get("parent") is None else int(doc["parent"]),
                raw_bytes=int(doc.get("raw_bytes", 0)),
                stored_bytes=int(doc.get("stored_bytes", 0)),
                chunk_bytes=int(doc.get("chunk_bytes", 0)),
                plugins=dict(doc.get("plugins", {})),
                meta=dict(doc.get("meta", {})),
                schema=schema,
                seq=None if doc.get("seq") is None else int(doc["seq"]),
                run=str(doc.get("run", "")),
            )
        except SchemaError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise fail(f"malformed ({type(exc).__name__}: {exc})") from None
