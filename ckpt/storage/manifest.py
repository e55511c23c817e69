"""The manifest: one JSON document per checkpoint, written last; its existence is the commit.

Schema (version 1; version 2 adds what is listed below)::

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
(equal to ``hash`` for full objects). An encoded object's record may carry ``"stored_hash"``,
the content hash of its stored bytes (optional, any schema: older readers ignore it), which a
restore checks before it decodes the object into live memory. Readers accept every schema version up to
:data:`SCHEMA_VERSION` and refuse newer ones with a clear error.

Schema 2, packed small tensors: a chunk record may carry ``"at": int, "of": int``; its
object (``key``/``hash``/``codec``, ``stored``) holds ``of`` raw bytes shared by several
small tensors, and the chunk is bytes ``[at, at + size)`` of it (valid: ``0 <= at``,
``at + size <= of <= chunk cap``; the stored-size bound and the codec steps use ``of``).
A writer writes ``"schema": 2`` only when a record is packed (:meth:`Manifest.written_schema`),
so a schema-1 reader refuses such a manifest instead of misreading it.

A store is untrusted input, so :meth:`Manifest.from_json_bytes` validates a manifest
whole before anything is read or allocated for it, and every violation is a
:class:`~ckpt.SchemaError` naming the manifest and the field, tensor or object:

- size: at most ``CKPT_MAX_MANIFEST_BYTES`` (256 MiB), checked before parsing; nesting:
  the state tree and ``meta`` at most ``CKPT_MAX_TREE_DEPTH`` levels (128), delta parent
  records at most :data:`MAX_DELTA_DEPTH` links (or ``CKPT_DELTA_MAX_CHAIN`` when larger),
  without any cycle; deeper JSON than the parser can take is refused, never a RecursionError;
- object keys: ``<32 hex>`` (the xxh3-128 content address) or ``<32 hex>.x<16 hex>`` (a
  delta, :func:`ckpt.codecs.delta.delta_key`); hashes: 32 hex; tensor paths: JSON-pointer
  escaped components without control characters;
- every number an int (never a bool or float) within its range; ``dtype`` from
  :data:`DTYPE_ITEMSIZE`; ``nbytes == prod(shape) * itemsize == sum(chunk sizes)``; each
  chunk at most ``chunk_bytes`` raw bytes and its ``stored`` size within what a codec chain
  can produce (:func:`ckpt.codecs.base.max_encoded_size`); a raw object stores its size;
- codec chains: steps are mappings with a string ``name``; ``bgzstd`` has an ``itemsize``
  in {2, 4, 8, 16}, ``xor`` a parent record of the same size (validated the same way) and
  an optional int ``age``; ``in`` is an int within the same bound; other parameters of
  third-party codecs are JSON values;
- every ``{"$tensor": path}`` of the tree names a listed tensor (other tags of the tree are
  checked by :func:`ckpt.state.tree.decode`).

Saves refuse what loads would refuse (a tree too deep, a path with control characters).

Schema 2 (distributed checkpoints, written by :mod:`ckpt.distributed`; a writer writes
``"schema": 2`` only when a manifest uses one of these, else 1):

- **sharded tensors**: an entry may carry ``"shards"`` instead of ``"chunks"``::

      {"dtype": "float32", "shape": [G0, G1], "nbytes": G0*G1*4,
       "shards": [{"offsets": [o0, o1], "shape": [s0, s1], "chunks": [<chunk records>]}, ...]}

  ``shape`` is the GLOBAL shape; a shard's chunks hold the row-major bytes of the box
  ``tensor[o0:o0+s0, o1:o1+s1]``. Boxes lie inside the global shape, are pairwise disjoint
  and cover it (volumes sum to numel; empty boxes allowed). Checked without allocating per
  element: the boxes' cut points give a grid of at most :data:`MAX_SHARD_CELLS` cells, each
  of which exactly one box must cover. :class:`TensorEntry` has ``chunks == ()`` and
  ``shards`` (:class:`Shard`); :attr:`TensorEntry.refs` and :meth:`Manifest.chunk_refs`
  list every chunk of either kind (gc, verify and copy see them).
- **world size**: ``"world_size": W`` (an int >= 1) records the number of ranks of a
  collective save (absent: a single-process save; :attr:`Manifest.world_size` is then 0).
- **per-rank values**: a leaf of the state tree whose encoded value differs between ranks
  (RNG states, loader positions, rank-local values) is stored once per rank as
  ``{"$rank": [v_0, ..., v_{W-1}]}`` at the smallest subtree where the ranks differ (a tensor
  reference ``{"$tensor": ...}`` is one leaf). ``$rank`` nodes only appear in a manifest with
  a ``world_size``, hold exactly ``W`` values and never nest. A tensor held per rank is
  stored under the path ``"$rank/<r>/<tree path>"`` (a top-level state key never starts
  with ``$``, so it cannot collide with a tree path) and referenced from ``v_r``. Values
  equal on every rank (DDP parameters, optimizer moments, step) are stored once, as in a
  single-process save; DTensor leaves are sharded entries, referenced like any tensor.
  :func:`ckpt.distributed.sharding.rank_view` turns such a manifest into what rank ``r``
  saved (``$rank`` nodes resolved, its per-rank tensors under their tree paths), which
  every reader then reads like a single-process checkpoint.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ckpt import config
from ckpt.codecs.base import INPUT_SIZE, max_encoded_size
from ckpt.errors import CheckpointError, NewerSchemaError, SchemaError, UnsupportedValueError

SCHEMA_VERSION = 2
#: what a manifest without any schema-2 addition is written as (older readers read it)
BASE_SCHEMA_VERSION = 1
#: tag of a per-rank node of the state tree, and the path prefix of per-rank tensors
RANK_TAG = "$rank"
#: bound of the grid of cells a sharded tensor's boxes cut its shape into (see the docstring)
MAX_SHARD_CELLS = 1 << 22
#: bound of a manifest's world size
MAX_WORLD_SIZE = 1 << 20
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
#: bound of every byte count and shape entry: more than any machine holds
MAX_SIZE = 2**62
#: bound of ``chunk_bytes``, and of a chunk's raw size when a manifest records no chunk_bytes
MAX_CHUNK_BYTES = 2**40
#: delta parent records a chunk may nest (a writer cites the last full object: one link)
MAX_DELTA_DEPTH = 64
MAX_DIMS = 64
MAX_CHAIN_STEPS = 16
#: nesting of a third-party codec's own parameters
MAX_PARAM_DEPTH = 16
MAX_PATH_CHARS = 4096
MAX_TEXT_CHARS = 256

HASH_RE = re.compile(r"[0-9a-f]{32}")
KEY_RE = re.compile(r"[0-9a-f]{32}(?:\.x[0-9a-f]{16})?")
#: JSON-pointer escaped components (``~`` only as ``~0``/``~1``), no control characters
PATH_RE = re.compile(r"(?:[^~\x00-\x1f\x7f]|~[01])*")
_TEXT_RE = re.compile(r"[^\x00-\x1f\x7f]*")
_CODEC_NAME_RE = re.compile(r"[A-Za-z0-9_.:+-]{1,64}")
_XOR, _BGZSTD = "xor", "bgzstd"  # ckpt.codecs.delta.NAME, ckpt.codecs.zstd.ByteGroupZstdCodec.name
_BG_ITEMSIZES = (2, 4, 8, 16)
_RECORD_KEYS = frozenset({"hash", "key", "size", "stored", "codec", "at", "of", "stored_hash"})


def check_step(value: Any, what: str = "step") -> int:
    """``value`` when it is a valid step number (an int in 0..10**18-1), else a CheckpointError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STEP:
        raise CheckpointError(f"{what} must be a non-negative int below 10**18, got {_short(value)}")
    return value


def _short(value: Any, n: int = 60) -> str:
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
    #: class of each object an adapter saved, by tree path (``"optim": "torch.optim.adamw.AdamW"``):
    #: restore refuses another class where the adapter asks for it (absent in older manifests)
    classes: Mapping[str, str] = field(default_factory=dict)
    #: device each tensor was saved from, by path, where it was not the CPU (``"cuda:1"``):
    #: the location ``map_location`` maps, as ``torch.load``'s does
    devices: Mapping[str, str] = field(default_factory=dict)
    #: ranks of the collective save that wrote it (0: a single-process save); see the docstring
    world_size: int = 0

    @property
    def written_schema(self) -> int:
        """The schema version this manifest is written as: 2 only when it uses a schema-2 addition."""
        if (
            self.world_size
            or any(e.shards for e in self.tensors.values())
            or any(c.of >= 0 for c in self.chunk_refs())  # packed small tensors
        ):
            return max(2, self.schema)
        return BASE_SCHEMA_VERSION if self.schema <= 2 else self.schema

    def to_json_bytes(self) -> bytes:
        """The manifest file; a tree or path that loading would refuse is an UnsupportedValueError."""
        _check_writable(self)
        doc = {
            "format": "ckpt",
            "schema": self.written_schema,
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
            **({"classes": dict(self.classes)} if self.classes else {}),
            **({"devices": dict(self.devices)} if self.devices else {}),
            **({"world_size": self.world_size} if self.world_size else {}),
            "tree": self.tree,
            "tensors": {p: e.to_json() for p, e in self.tensors.items()},
        }
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()

    def chunk_refs(self) -> list[ChunkRef]:
        return [c for e in self.tensors.values() for c in e.refs]

    @classmethod
    def from_json_bytes(cls, data: bytes, *, where: str, step: int | None = None) -> Manifest:
        """Parse and validate a manifest file; ``step``: the step its name says (checked)."""
        limit = config.max_manifest_bytes()
        if len(data) > limit:
            raise SchemaError(
                f"manifest {where} is larger than {limit} bytes (CKPT_MAX_MANIFEST_BYTES); refusing to parse it"
            )
        try:
            doc = json.loads(data, parse_constant=_no_constant)
        except RecursionError:
            raise SchemaError(f"manifest {where} is nested too deeply to parse") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise SchemaError(f"manifest {where} is not valid JSON: {str(exc)[:200]}") from None
        manifest = cls.from_doc(doc, where=where)
        if step is not None and manifest.step != step:
            raise SchemaError(f"manifest {where} holds step {manifest.step}: a manifest of another step")
        return manifest

    @classmethod
    def from_doc(cls, doc: Any, *, where: str) -> Manifest:
        """A manifest from its parsed JSON, validated (see the module docstring)."""
        return _Validator(where).manifest(doc)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: non-finite floats are tagged in trees


def _too_deep(node: Any, limit: int) -> bool:
    """Whether containers nest more than ``limit`` levels in ``node`` (without recursion)."""
    stack = [(node, 1)]
    while stack:
        n, depth = stack.pop()
        children = n.values() if isinstance(n, dict) else n if isinstance(n, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _check_writable(manifest: Manifest) -> None:
    depth = config.max_tree_depth()
    if _too_deep(manifest.tree, depth):
        raise UnsupportedValueError(
            f"the state of step {manifest.step} nests deeper than {depth} levels (CKPT_MAX_TREE_DEPTH), "
            "which loading refuses"
        )
    for path in manifest.tensors:
        if len(path) > MAX_PATH_CHARS or not PATH_RE.fullmatch(path):
            raise UnsupportedValueError(
                f"tensor path {_short(path)} has control characters or over {MAX_PATH_CHARS} characters, "
                "which loading refuses; rename the key"
            )


class _Validator:
    """Checks one parsed manifest; every failure is a SchemaError naming it and the field."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.tree_depth = config.max_tree_depth()
        self.delta_depth = max(MAX_DELTA_DEPTH, config.delta_max_chain())
        self.chunk_cap = MAX_CHUNK_BYTES
        self.world_size = 0

    def fail(self, msg: str) -> SchemaError:
        return SchemaError(f"manifest {self.where}: {msg}")

    def int_(self, value: Any, what: str, lo: int = 0, hi: int = MAX_SIZE) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(f"{what} must be an int in {lo}..{hi}, got {_short(value)}")
        return value

    def text(self, value: Any, what: str, limit: int = MAX_TEXT_CHARS) -> str:
        if not isinstance(value, str) or len(value) > limit or not _TEXT_RE.fullmatch(value):
            raise self.fail(f"{what} must be a string of at most {limit} printable characters, got {_short(value)}")
        return value

    def names(self, value: Any, what: str) -> dict[str, str]:
        if not isinstance(value, dict):
            raise self.fail(f"{what} must be a mapping, got {_short(value)}")
        for k, v in value.items():
            self.text(k, f"{what} key", MAX_PATH_CHARS)
            self.text(v, f"{what}[{_short(k)}]", MAX_PATH_CHARS)
        return dict(value)

    def manifest(self, doc: Any) -> Manifest:
        if not isinstance(doc, dict) or doc.get("format") != "ckpt":
            raise self.fail("not a ckpt manifest (missing format: ckpt)")
        schema = doc.get("schema")
        if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
            raise self.fail(f"bad schema version {_short(schema)}")
        if schema > SCHEMA_VERSION:
            raise NewerSchemaError(
                f"manifest {self.where}: "
                f"written by schema version {schema}, this ckpt reads up to {SCHEMA_VERSION}; upgrade ckpt to read it"
            )
        if doc.get("hash", HASH_NAME) != HASH_NAME:
            raise self.fail(f"unknown hash function {_short(doc.get('hash'))}")
        if "step" not in doc or "tree" not in doc or "tensors" not in doc:
            missing = [k for k in ("step", "tree", "tensors") if k not in doc]
            raise self.fail(f"malformed: no {', '.join(missing)}")
        step = self.int_(doc["step"], "step", hi=MAX_STEP)
        parent, seq = doc.get("parent"), doc.get("seq")
        chunk_bytes = self.int_(doc.get("chunk_bytes", 0), "chunk_bytes", hi=MAX_CHUNK_BYTES)
        self.chunk_cap = chunk_bytes or MAX_CHUNK_BYTES
        world = doc.get("world_size")
        self.world_size = 0 if world is None else self.int_(world, "world_size", lo=1, hi=MAX_WORLD_SIZE)
        tensors = doc["tensors"]
        if not isinstance(tensors, dict):
            raise self.fail(f"tensors must be a mapping, got {_short(tensors)}")
        entries = {self.path(path): self.entry(path, e) for path, e in tensors.items()}
        self.tree(doc["tree"], entries)
        meta = doc.get("meta", {})
        if not isinstance(meta, dict) or _too_deep(meta, self.tree_depth):
            raise self.fail(f"meta must be a mapping nested at most {self.tree_depth} levels")
        return Manifest(
            step=step,
            created=self.text(doc.get("created", ""), "created"),
            tree=doc["tree"],
            adapters=self.names(doc.get("adapters", {}), "adapters"),
            tensors=entries,
            parent=None if parent is None else self.int_(parent, "parent", hi=MAX_STEP),
            raw_bytes=self.int_(doc.get("raw_bytes", 0), "raw_bytes"),
            stored_bytes=self.int_(doc.get("stored_bytes", 0), "stored_bytes"),
            chunk_bytes=chunk_bytes,
            plugins=self.names(doc.get("plugins", {}), "plugins"),
            meta=meta,
            schema=schema,
            seq=None if seq is None else self.int_(seq, "seq", lo=1),
            run=self.text(doc.get("run", ""), "run"),
            classes=self.names(doc.get("classes", {}), "classes"),
            devices=self.names(doc.get("devices", {}), "devices"),
            world_size=self.world_size,
        )

    def path(self, path: str) -> str:
        if len(path) > MAX_PATH_CHARS or not PATH_RE.fullmatch(path) or path.count("/") >= self.tree_depth:
            raise self.fail(f"bad tensor path {_short(path)}")
        return str(path)

    def entry(self, path: str, e: Any) -> TensorEntry:
        what = f"tensor {_short(path)}"
        if not isinstance(e, dict):
            raise self.fail(f"{what} is not a mapping")
        dtype = e.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPE_ITEMSIZE:
            raise self.fail(f"{what} has unknown dtype {_short(dtype)}")
        shape = e.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS:
            raise self.fail(f"{what}: shape must be a list of at most {MAX_DIMS} ints, got {_short(shape)}")
        size = DTYPE_ITEMSIZE[dtype]
        for i, n in enumerate(shape):
            size *= self.int_(n, f"{what} shape[{i}]")
            if size > MAX_SIZE:
                raise self.fail(f"{what}: shape {_short(shape)} holds more than {MAX_SIZE} bytes")
        nbytes = self.int_(e.get("nbytes"), f"{what} nbytes")
        if nbytes != size:
            raise self.fail(f"{what}: sizes do not add up: shape {shape} of {dtype} is {size} bytes, nbytes {nbytes}")
        if "shards" in e:
            if "chunks" in e:
                raise self.fail(f"{what}: has both chunks and shards")
            shards = self.shards(e["shards"], what, tuple(shape), DTYPE_ITEMSIZE[dtype])
            return TensorEntry(dtype=dtype, shape=tuple(shape), nbytes=nbytes, chunks=(), shards=shards)
        chunks = e.get("chunks")
        if not isinstance(chunks, list):
            raise self.fail(f"{what}: malformed: chunks must be a list, got {_short(chunks)}")
        refs = tuple(self.chunk(c, f"{what} chunk {i}") for i, c in enumerate(chunks))
        if sum(c.size for c in refs) != nbytes:
            raise self.fail(f"{what}: chunk sizes do not add up to {nbytes} bytes")
        return TensorEntry(dtype=dtype, shape=tuple(shape), nbytes=nbytes, chunks=refs)

    def shards(self, recs: Any, what: str, shape: tuple[int, ...], itemsize: int) -> tuple[Shard, ...]:
        """The boxes of a sharded tensor: inside ``shape``, disjoint, covering it."""
        if not isinstance(recs, list):
            raise self.fail(f"{what}: malformed: shards must be a list, got {_short(recs)}")
        out = []
        for i, rec in enumerate(recs):
            at = f"{what} shard {i}"
            if not isinstance(rec, dict):
                raise self.fail(f"{at} is not a mapping")
            offsets, box = rec.get("offsets"), rec.get("shape")
            if not isinstance(offsets, list) or not isinstance(box, list) or not len(offsets) == len(box) == len(shape):
                raise self.fail(f"{at}: offsets and shape must be lists of {len(shape)} ints (the tensor's dims)")
            for d, (o, n) in enumerate(zip(offsets, box)):
                self.int_(o, f"{at} offsets[{d}]")
                self.int_(n, f"{at} shape[{d}]")
                if o + n > shape[d]:
                    raise self.fail(f"{at}: box {offsets}+{box} is out of bounds of shape {list(shape)} in dim {d}")
            chunks = rec.get("chunks")
            if not isinstance(chunks, list):
                raise self.fail(f"{at}: malformed: chunks must be a list, got {_short(chunks)}")
            refs = tuple(self.chunk(c, f"{at} chunk {j}") for j, c in enumerate(chunks))
            shard = Shard(offsets=tuple(offsets), shape=tuple(box), chunks=refs)
            if sum(c.size for c in refs) != shard.numel * itemsize:
                raise self.fail(f"{at}: chunk sizes do not add up to {shard.numel * itemsize} bytes")
            out.append(shard)
        problem = tiling_problem(shape, [(s.offsets, s.shape) for s in out])
        if problem:
            raise self.fail(f"{what}: {problem}")
        return tuple(out)

    def chunk(
        self, rec: Any, what: str, *, size: int | None = None, depth: int = 0, ancestors: tuple[str, ...] = ()
    ) -> ChunkRef:
        """A chunk record (``depth`` 0) or a delta's parent record (``size``: the delta's)."""
        if not isinstance(rec, dict):
            raise self.fail(f"{what}: a chunk record must be a mapping, got {_short(rec)}")
        digest = rec.get("hash")
        if not isinstance(digest, str) or not HASH_RE.fullmatch(digest):
            raise self.fail(f"{what}: bad content hash {_short(digest)}")
        key = rec.get("key", digest)
        if not isinstance(key, str) or not KEY_RE.fullmatch(key):
            raise self.fail(f"{what}: bad object key {_short(key)}")
        what = f"{what} (object {key})"
        if key in ancestors:
            raise self.fail(f"{what}: delta chain cites object {key} again (a cycle)")
        n = self.int_(rec.get("size"), f"{what} size", hi=self.chunk_cap)
        at, of = self.packing(rec, what, n, depth)
        if of >= 0:
            what = f"{what} (bytes {at}..{at + n} of {of})"
        obj = of if of >= 0 else n  # raw bytes of the object: what its hash and chain cover
        if size is not None and obj != size:
            raise self.fail(f"{what}: delta parent of {obj} bytes for a {size}-byte delta")
        stored = -1
        if depth == 0 or "stored" in rec:
            stored = self.int_(rec.get("stored"), f"{what} stored size", hi=max_encoded_size(obj))
        for k, v in rec.items():  # kept with parent records and written again by later saves
            if k not in _RECORD_KEYS and isinstance(v, (dict, list)) and _too_deep(v, MAX_PARAM_DEPTH):
                raise self.fail(f"{what}: field {_short(k)} nests too deeply")
        chain = rec.get("codec", [])
        if not isinstance(chain, list) or len(chain) > MAX_CHAIN_STEPS:
            raise self.fail(f"{what}: codec must be a list of at most {MAX_CHAIN_STEPS} steps")
        steps = tuple(self.codec_step(s, what, obj, depth, (*ancestors, key)) for s in chain)
        if not steps and stored not in (-1, obj):
            raise self.fail(f"{what}: a raw object of {obj} bytes cannot store {stored}")
        stored_hash = rec.get("stored_hash", "")
        if not isinstance(stored_hash, str) or (stored_hash and not HASH_RE.fullmatch(stored_hash)):
            raise self.fail(f"{what}: bad stored hash {_short(stored_hash)}")
        return ChunkRef(hash=digest, key=key, size=n, stored=stored, codec=steps, at=at, of=of, stored_hash=stored_hash)

    def packing(self, rec: dict[str, Any], what: str, size: int, depth: int) -> tuple[int, int]:
        """``(at, of)`` of a packed chunk record (schema 2), ``(-1, -1)`` for a whole object.

        Valid: both or neither; ``0 <= at``, ``at + size <= of <= chunk cap``. Only a tensor's
        own chunk records are packed: a delta's parent record names a whole object.
        """
        if "at" not in rec and "of" not in rec:
            return -1, -1
        if "at" not in rec or "of" not in rec:
            raise self.fail(f"{what}: a packed chunk record needs both 'at' and 'of'")
        if depth:
            raise self.fail(f"{what}: a delta parent record cannot be packed (at/of)")
        of = self.int_(rec["of"], f"{what} packed object size (of)", hi=self.chunk_cap)
        at = self.int_(rec["at"], f"{what} packed offset (at)", hi=of)
        if at + size > of:
            raise self.fail(f"{what}: bytes {at}..{at + size} lie outside its packed object of {of} bytes")
        return at, of

    def codec_step(self, step: Any, what: str, size: int, depth: int, ancestors: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(step, dict) or not isinstance(step.get("name"), str):
            raise self.fail(f"{what}: codec step {_short(step)} is not a mapping with a name")
        name = step["name"]
        if not _CODEC_NAME_RE.fullmatch(name):
            raise self.fail(f"{what}: bad codec name {_short(name)}")
        what = f"{what} codec {name}"
        for k, v in step.items():
            if k == "name":
                continue
            if k == INPUT_SIZE:
                self.int_(v, f"{what} input size", hi=max_encoded_size(size))
            elif k == "parent":  # any codec citing a parent (GC follows them all)
                if depth + 1 > self.delta_depth:
                    raise self.fail(f"{what}: delta chain deeper than {self.delta_depth} links")
                parent_size = size if name == _XOR else None
                self.chunk(v, f"{what} parent", size=parent_size, depth=depth + 1, ancestors=ancestors)
            elif name == _BGZSTD and k == "itemsize":
                if type(v) is not int or v not in _BG_ITEMSIZES:
                    raise self.fail(f"{what}: itemsize must be one of {_BG_ITEMSIZES}, got {_short(v)}")
            elif name == _XOR and k == "age":
                self.int_(v, f"{what} age", lo=1, hi=2**31)
            elif isinstance(v, (dict, list)) and _too_deep(v, MAX_PARAM_DEPTH):
                raise self.fail(f"{what}: parameter {_short(k)} nests too deeply")
        needed = {_XOR: "parent", _BGZSTD: "itemsize"}.get(name)
        if needed is not None and needed not in step:
            raise self.fail(f"{what}: no {needed}")
        return step

    def tree(self, tree: Any, tensors: Mapping[str, TensorEntry]) -> None:
        """Nesting bounded and every tensor reference listed (without recursion)."""
        stack: list[tuple[Any, int, str]] = [(tree, 1, "")]
        while stack:
            node, depth, at = stack.pop()
            if not isinstance(node, (dict, list)):
                continue
            if depth > self.tree_depth:
                raise self.fail(f"the state tree nests deeper than {self.tree_depth} levels (CKPT_MAX_TREE_DEPTH)")
            if isinstance(node, dict):
                self.tagged(node, at, tensors)
            # every child, tagged or not: whatever walks the tree later must find it shallow
            kids = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend((kid, depth + 1, f"{at}/{k}") for k, kid in kids if isinstance(kid, (dict, list)))

    def tagged(self, node: dict[str, Any], at: str, tensors: Mapping[str, TensorEntry]) -> None:
        """A ``$tensor`` reference names a listed tensor (what is read, and allocated, for it).

        Other tags are checked where they are decoded (:func:`ckpt.state.tree.decode`, a
        SchemaError naming the path), which owns their meaning.
        """
        marked = [k for k in node if isinstance(k, str) and k.startswith("$")]
        if marked:
            # The encoder writes a mapping with a "$" key only as a tag node (a plain mapping
            # with such keys becomes a $map): anything else is a hostile mix that restoring
            # one key would accept and decoding the whole tree would refuse.
            allowed = _TAG_KEYS.get(marked[0])
            if len(marked) != 1 or allowed is None or not set(node) <= allowed:
                raise self.fail(f"tree at {_short(at or '/')}: malformed tagged node with keys {_short(sorted(node))}")
        if RANK_TAG in node:
            values = node[RANK_TAG]
            where = f"tree at {_short(at or '/')}"
            if len(node) != 1 or not isinstance(values, list) or len(values) != self.world_size:
                raise self.fail(
                    f"{where}: a {RANK_TAG} node must hold a list of world_size ({self.world_size}) values only"
                )
            if any(_has_rank_node(v) for v in values):
                raise self.fail(f"{where}: {RANK_TAG} nodes nest")
        if "$tensor" in node:
            ref = node["$tensor"]
            if not isinstance(ref, str) or ref not in tensors:
                where = f"tree at {_short(at or '/')}"
                raise self.fail(f"{where} references tensor {_short(ref)}, which is not listed")


#: the keys each tag node of an encoded tree may hold (:mod:`ckpt.state.tree`, ``$rank`` nodes)
_TAG_KEYS: dict[str, frozenset[str]] = {
    "$tensor": frozenset({"$tensor", "numpy", "byteorder", "param", "requires_grad"}),
    "$np": frozenset({"$np", "v", "hex"}),
    **{
        tag: frozenset({tag})
        for tag in ("$tuple", "$map", "$float", "$dtype", "$bytes", "$bytearray", "$size", RANK_TAG)
    },
}


def _has_rank_node(node: Any) -> bool:
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            if RANK_TAG in n:
                return True
            stack.extend(v for v in n.values() if isinstance(v, (dict, list)))
        elif isinstance(n, list):
            stack.extend(v for v in n if isinstance(v, (dict, list)))
    return False


def tiling_problem(shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> str:
    """What is wrong with ``boxes`` (offsets, shape) as a tiling of ``shape`` ("" when they
    lie inside it, are disjoint and cover it).

    The boxes' cut points split every dim into intervals; the grid of cells they make (at
    most :data:`MAX_SHARD_CELLS`) is painted box by box, after checking that the boxes
    paint exactly as many cells as the grid has (so hostile overlaps cost no more).
    """
    boxes = [(o, b) for o, b in boxes if all(n > 0 for n in b)]  # empty boxes cover nothing
    numel = 1
    for n in shape:
        numel *= n
    volume = 0
    for offsets, box in boxes:
        if len(offsets) != len(shape) or len(box) != len(shape):
            return f"a box of {len(box)} dims in a tensor of {len(shape)}"
        v = 1
        for d, (o, n) in enumerate(zip(offsets, box)):
            if o < 0 or o + n > shape[d]:
                return f"box {list(offsets)}+{list(box)} is out of bounds of shape {list(shape)}"
            v *= n
        volume += v
    if volume != numel:
        return (
            f"the shards' volumes add up to {volume} elements, the shape holds {numel} (overlapping or missing boxes)"
        )
    if numel == 0:
        return ""
    cuts = [sorted({0, n, *(o[d] for o, _ in boxes), *(o[d] + b[d] for o, b in boxes)}) for d, n in enumerate(shape)]
    cells = 1
    for c in cuts:
        cells *= len(c) - 1
    if cells > MAX_SHARD_CELLS:
        return f"the shards cut the tensor into more than {MAX_SHARD_CELLS} cells; refusing to check them"
    spans = []
    painted = 0
    for offsets, box in boxes:
        span = []
        n_cells = 1
        for d in range(len(shape)):
            lo = _index(cuts[d], offsets[d])
            hi = _index(cuts[d], offsets[d] + box[d])
            span.append(slice(lo, hi))
            n_cells *= hi - lo
        spans.append(span)
        painted += n_cells
    if painted != cells:
        return "the shards overlap or leave parts of the tensor uncovered"
    grid = np.zeros([len(c) - 1 for c in cuts], dtype=np.uint8)
    for span in spans:
        view = grid[tuple(span)]
        if view.any():
            return "the shards overlap"
        view += 1
    if not grid.all():
        return "the shards leave parts of the tensor uncovered"
    return ""


def _index(cuts: list[int], value: int) -> int:
    return bisect.bisect_left(cuts, value)
