"""Validation of a manifest as read from a store, which is untrusted input: every rule of
:mod:`ckpt.storage.manifest`'s docstring, each violation a :class:`~ckpt.SchemaError`
naming the manifest and the field, tensor or object, before anything is read or allocated
for it.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ckpt import config
from ckpt.codecs.base import INPUT_SIZE, max_encoded_size
from ckpt.errors import NewerSchemaError, SchemaError
from ckpt.storage.records import (
    DTYPE_ITEMSIZE,
    HASH_NAME,
    MAX_PATH_CHARS,
    MAX_STEP,
    PATH_RE,
    RANK_TAG,
    SCHEMA_VERSION,
    ChunkRef,
    Shard,
    TensorEntry,
    short,
)

#: bound of the grid of cells a sharded tensor's boxes cut its shape into (see :mod:`ckpt.storage.manifest`)
MAX_SHARD_CELLS = 1 << 22
#: bound of a manifest's world size
MAX_WORLD_SIZE = 1 << 20
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
MAX_TEXT_CHARS = 256

HASH_RE = re.compile(r"[0-9a-f]{32}")
KEY_RE = re.compile(r"[0-9a-f]{32}(?:\.x[0-9a-f]{16})?")
_TEXT_RE = re.compile(r"[^\x00-\x1f\x7f]*")
_CODEC_NAME_RE = re.compile(r"[A-Za-z0-9_.:+-]{1,64}")
_XOR, _BGZSTD = "xor", "bgzstd"  # ckpt.codecs.delta.NAME, ckpt.codecs.zstd.ByteGroupZstdCodec.name
_BG_ITEMSIZES = (2, 4, 8, 16)
_RECORD_KEYS = frozenset({"hash", "key", "size", "stored", "codec", "at", "of", "stored_hash"})


def too_deep(node: Any, limit: int) -> bool:
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


class Validator:
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
            raise self.fail(f"{what} must be an int in {lo}..{hi}, got {short(value)}")
        return value

    def text(self, value: Any, what: str, limit: int = MAX_TEXT_CHARS) -> str:
        if not isinstance(value, str) or len(value) > limit or not _TEXT_RE.fullmatch(value):
            raise self.fail(f"{what} must be a string of at most {limit} printable characters, got {short(value)}")
        return value

    def names(self, value: Any, what: str) -> dict[str, str]:
        if not isinstance(value, dict):
            raise self.fail(f"{what} must be a mapping, got {short(value)}")
        for k, v in value.items():
            self.text(k, f"{what} key", MAX_PATH_CHARS)
            self.text(v, f"{what}[{short(k)}]", MAX_PATH_CHARS)
        return dict(value)

    def manifest(self, doc: Any) -> dict[str, Any]:
        if not isinstance(doc, dict) or doc.get("format") != "ckpt":
            raise self.fail("not a ckpt manifest (missing format: ckpt)")
        schema = doc.get("schema")
        if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
            raise self.fail(f"bad schema version {short(schema)}")
        if schema > SCHEMA_VERSION:
            raise NewerSchemaError(
                f"manifest {self.where}: "
                f"written by schema version {schema}, this ckpt reads up to {SCHEMA_VERSION}; upgrade ckpt to read it"
            )
        if doc.get("hash", HASH_NAME) != HASH_NAME:
            raise self.fail(f"unknown hash function {short(doc.get('hash'))}")
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
            raise self.fail(f"tensors must be a mapping, got {short(tensors)}")
        entries = {self.path(path): self.entry(path, e) for path, e in tensors.items()}
        self.tree(doc["tree"], entries)
        meta = doc.get("meta", {})
        if not isinstance(meta, dict) or too_deep(meta, self.tree_depth):
            raise self.fail(f"meta must be a mapping nested at most {self.tree_depth} levels")
        return dict(
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
            raise self.fail(f"bad tensor path {short(path)}")
        return str(path)

    def entry(self, path: str, e: Any) -> TensorEntry:
        what = f"tensor {short(path)}"
        if not isinstance(e, dict):
            raise self.fail(f"{what} is not a mapping")
        dtype = e.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPE_ITEMSIZE:
            raise self.fail(f"{what} has unknown dtype {short(dtype)}")
        shape = e.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS:
            raise self.fail(f"{what}: shape must be a list of at most {MAX_DIMS} ints, got {short(shape)}")
        size = DTYPE_ITEMSIZE[dtype]
        for i, n in enumerate(shape):
            size *= self.int_(n, f"{what} shape[{i}]")
            if size > MAX_SIZE:
                raise self.fail(f"{what}: shape {short(shape)} holds more than {MAX_SIZE} bytes")
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
            raise self.fail(f"{what}: malformed: chunks must be a list, got {short(chunks)}")
        refs = tuple(self.chunk(c, f"{what} chunk {i}") for i, c in enumerate(chunks))
        if sum(c.size for c in refs) != nbytes:
            raise self.fail(f"{what}: chunk sizes do not add up to {nbytes} bytes")
        return TensorEntry(dtype=dtype, shape=tuple(shape), nbytes=nbytes, chunks=refs)

    def shards(self, recs: Any, what: str, shape: tuple[int, ...], itemsize: int) -> tuple[Shard, ...]:
        """The boxes of a sharded tensor: inside ``shape``, disjoint, covering it."""
        if not isinstance(recs, list):
            raise self.fail(f"{what}: malformed: shards must be a list, got {short(recs)}")
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
                raise self.fail(f"{at}: malformed: chunks must be a list, got {short(chunks)}")
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
            raise self.fail(f"{what}: a chunk record must be a mapping, got {short(rec)}")
        digest = rec.get("hash")
        if not isinstance(digest, str) or not HASH_RE.fullmatch(digest):
            raise self.fail(f"{what}: bad content hash {short(digest)}")
        key = rec.get("key", digest)
        if not isinstance(key, str) or not KEY_RE.fullmatch(key):
            raise self.fail(f"{what}: bad object key {short(key)}")
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
            if k not in _RECORD_KEYS and isinstance(v, (dict, list)) and too_deep(v, MAX_PARAM_DEPTH):
                raise self.fail(f"{what}: field {short(k)} nests too deeply")
        chain = rec.get("codec", [])
        if not isinstance(chain, list) or len(chain) > MAX_CHAIN_STEPS:
            raise self.fail(f"{what}: codec must be a list of at most {MAX_CHAIN_STEPS} steps")
        steps = tuple(self.codec_step(s, what, obj, depth, (*ancestors, key)) for s in chain)
        if not steps and stored not in (-1, obj):
            raise self.fail(f"{what}: a raw object of {obj} bytes cannot store {stored}")
        stored_hash = rec.get("stored_hash", "")
        if not isinstance(stored_hash, str) or (stored_hash and not HASH_RE.fullmatch(stored_hash)):
            raise self.fail(f"{what}: bad stored hash {short(stored_hash)}")
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
            raise self.fail(f"{what}: codec step {short(step)} is not a mapping with a name")
        name = step["name"]
        if not _CODEC_NAME_RE.fullmatch(name):
            raise self.fail(f"{what}: bad codec name {short(name)}")
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
                    raise self.fail(f"{what}: itemsize must be one of {_BG_ITEMSIZES}, got {short(v)}")
            elif name == _XOR and k == "age":
                self.int_(v, f"{what} age", lo=1, hi=2**31)
            elif isinstance(v, (dict, list)) and too_deep(v, MAX_PARAM_DEPTH):
                raise self.fail(f"{what}: parameter {short(k)} nests too deeply")
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
                raise self.fail(f"tree at {short(at or '/')}: malformed tagged node with keys {short(sorted(node))}")
        if RANK_TAG in node:
            values = node[RANK_TAG]
            where = f"tree at {short(at or '/')}"
            if len(node) != 1 or not isinstance(values, list) or len(values) != self.world_size:
                raise self.fail(
                    f"{where}: a {RANK_TAG} node must hold a list of world_size ({self.world_size}) values only"
                )
            if any(has_rank_node(v) for v in values):
                raise self.fail(f"{where}: {RANK_TAG} nodes nest")
        if "$tensor" in node:
            ref = node["$tensor"]
            if not isinstance(ref, str) or ref not in tensors:
                where = f"tree at {short(at or '/')}"
                raise self.fail(f"{where} references tensor {short(ref)}, which is not listed")


#: the keys each tag node of an encoded tree may hold (:mod:`ckpt.state.tree`, ``$rank`` nodes)
_TAG_KEYS: dict[str, frozenset[str]] = {
    "$tensor": frozenset({"$tensor", "numpy", "byteorder", "param", "requires_grad"}),
    "$np": frozenset({"$np", "v", "hex"}),
    **{
        tag: frozenset({tag})
        for tag in ("$tuple", "$map", "$float", "$dtype", "$bytes", "$bytearray", "$size", RANK_TAG)
    },
}


def has_rank_node(node: Any) -> bool:
    """Whether a ``$rank`` node lies anywhere in ``node`` (without recursion)."""
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
