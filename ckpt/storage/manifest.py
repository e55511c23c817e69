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
whole (:mod:`ckpt.storage.manifest_check`, by the bounds named there) before anything is
read or allocated for it, and every violation is a :class:`~ckpt.SchemaError` naming the
manifest and the field, tensor or object:

- size: at most ``CKPT_MAX_MANIFEST_BYTES`` (256 MiB), checked before parsing; nesting:
  the state tree and ``meta`` at most ``CKPT_MAX_TREE_DEPTH`` levels (128), delta parent
  records at most ``manifest_check.MAX_DELTA_DEPTH`` links (or ``CKPT_DELTA_MAX_CHAIN`` when larger),
  without any cycle; deeper JSON than the parser can take is refused, never a RecursionError;
- object keys: ``<32 hex>`` (the xxh3-128 content address) or ``<32 hex>.x<16 hex>`` (a
  delta, :func:`ckpt.codecs.delta.delta_key`); hashes: 32 hex; tensor paths: JSON-pointer
  escaped components without control characters;
- every number an int (never a bool or float) within its range; ``dtype`` from
  :data:`~ckpt.storage.records.DTYPE_ITEMSIZE`; ``nbytes == prod(shape) * itemsize == sum(chunk sizes)``; each
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
  element: the boxes' cut points give a grid of at most ``manifest_check.MAX_SHARD_CELLS`` cells, each
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

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckpt import config
from ckpt.errors import SchemaError, UnsupportedValueError
from ckpt.storage.manifest_check import Validator, tiling_problem, too_deep
from ckpt.storage.records import (
    BASE_SCHEMA_VERSION,
    DTYPE_ITEMSIZE,
    DTYPE_NAMES,
    HASH_NAME,
    MAX_PATH_CHARS,
    PATH_RE,
    RANK_TAG,
    SCHEMA_VERSION,
    ChunkRef,
    Shard,
    TensorEntry,
    check_step,
    short,
)

# the names readers of manifests import from here, wherever they are defined
__all__ = [
    "BASE_SCHEMA_VERSION",
    "DTYPE_ITEMSIZE",
    "DTYPE_NAMES",
    "HASH_NAME",
    "RANK_TAG",
    "SCHEMA_VERSION",
    "ChunkRef",
    "Manifest",
    "Shard",
    "TensorEntry",
    "check_step",
    "tiling_problem",
]


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
            doc = json.loads(data, parse_constant=_no_constant, parse_float=_finite)
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
        return cls(**Validator(where).manifest(doc))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: non-finite floats are tagged in trees


def _finite(text: str) -> float:
    """A JSON number with a fraction or exponent, which must be a finite float: ``1e999``
    overflows to infinity, a value no writer stores untagged."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of a float's range")
    return value


def _check_writable(manifest: Manifest) -> None:
    depth = config.max_tree_depth()
    if too_deep(manifest.tree, depth):
        raise UnsupportedValueError(
            f"the state of step {manifest.step} nests deeper than {depth} levels (CKPT_MAX_TREE_DEPTH), "
            "which loading refuses"
        )
    for path in manifest.tensors:
        if len(path) > MAX_PATH_CHARS or not PATH_RE.fullmatch(path):
            raise UnsupportedValueError(
                f"tensor path {short(path)} has control characters or over {MAX_PATH_CHARS} characters, "
                "which loading refuses; rename the key"
            )
