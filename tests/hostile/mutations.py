"""Hypothesis strategies that damage a real store: manifest JSON by type, manifest bytes,
object bytes, and (local stores) what sits at a path: FIFOs, devices, symlinks, folders.

A mutation is drawn with ``draw(data, base)``, applied to the store, and undone with
:meth:`Mutation.undo`, which puts back exactly what was there.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zstandard
from hostile_env import Base
from hypothesis import strategies as st

#: the values a field is replaced with: every JSON type, edges of every range, hostile strings
BIG_INTS = [-1, 0, 1, 2, 3, 7, 255, 4096, 2**31, 2**32, 2**40, 2**53 + 1, 2**62, 2**63, 2**64, 10**12, 10**30]
HOSTILE_TEXT = [
    "",
    "x",
    "../canary.bin",
    "../../canary.bin",
    "../../../canary.bin",
    "/etc/passwd",
    "/dev/zero",
    "..",
    ".",
    "a/../../b",
    "%2e%2e%2fcanary",
    "\x00",
    "ab\ncd",
    "_dynamo",
    "float128",
    "qint8",
    "bgzstd",
    "xor",
    "zstd",
    "$tensor",
    "0" * 32,
    "f" * 32 + ".x" + "0" * 16,
    "é" * 40,
    "nan",
    "inf",
]
KNOWN_KEYS = [
    "hash",
    "key",
    "size",
    "stored",
    "codec",
    "name",
    "itemsize",
    "parent",
    "in",
    "age",
    "dtype",
    "shape",
    "nbytes",
    "chunks",
    "$tensor",
    "$map",
    "$tuple",
    "$float",
    "$dtype",
    "$bytes",
    "numpy",
    "seq",
    "run",
    "step",
    "schema",
    "format",
    "tree",
    "tensors",
    "chunk_bytes",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(BIG_INTS),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(HOSTILE_TEXT),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=10,
)

NEST_MARK = "@@hostile-nest@@"


@dataclass
class Mutation:
    """One applied damage to the store, read at ``step``: ``what`` describes it."""

    what: str
    target: str  # "manifest-json" | "manifest-bytes" | "object" | "fs"
    step: int
    body: bytes = b""  # the manifest file written, for manifest targets
    touched: list[str] = field(default_factory=list)  # store-relative paths to put back
    undo_extra: list[Callable[[], None]] = field(default_factory=list)

    def undo(self, base: Base) -> None:
        for fn in self.undo_extra:
            fn()
        for rel in self.touched:
            put_back(base, rel)


# -- low-level file helpers -------------------------------------------------------------------


def rel_object(key: str) -> str:
    return f"objects/{key[:2]}/{key}"


def original(base: Base, rel: str) -> bytes | None:
    if rel.startswith("objects/"):
        return base.objects.get(rel.rsplit("/", 1)[-1])
    if rel.startswith("manifests/"):
        return base.manifests.get(int(rel.split("/")[1].split(".")[0]))
    if rel == "refs/latest":
        return base.ref_latest
    return None


def _remove(path: str) -> None:
    if os.path.islink(path) or (os.path.exists(path) and not os.path.isdir(path)):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def put_back(base: Base, rel: str) -> None:
    """Restore ``rel`` (a file, or a folder of the store) exactly as the base store had it."""
    store = base.store
    if not base.root:
        data = original(base, rel)
        path = store.path(*rel.split("/"))
        if data is None:
            store.delete(path)
        else:
            store.fs.pipe_file(path, data)
        return
    path = os.path.join(base.root, rel)
    _remove(path)
    if rel in ("objects", "manifests", "refs") or (rel.startswith("objects/") and rel.count("/") == 1):
        os.makedirs(path)
        if rel == "refs":
            put_back(base, "refs/latest")
        elif rel == "manifests":
            for step in base.manifests:
                put_back(base, f"manifests/{step}.json")
        else:
            for key in base.objects:
                if rel == "objects" or key[:2] == rel.rsplit("/", 1)[-1]:
                    os.makedirs(os.path.join(base.root, "objects", key[:2]), exist_ok=True)
                    put_back(base, rel_object(key))
        return
    data = original(base, rel)
    if data is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def write_rel(base: Base, rel: str, data: bytes) -> None:
    store = base.store
    path = store.path(*rel.split("/"))
    if base.root:
        _remove(path)
        with open(path, "wb") as f:
            f.write(data)
    else:
        store.fs.pipe_file(path, data)


def delete_rel(base: Base, rel: str) -> None:
    if base.root:
        _remove(os.path.join(base.root, rel))
    else:
        base.store.delete(base.store.path(*rel.split("/")))


# -- manifest JSON --------------------------------------------------------------------------


def node_paths(doc: Any, limit: int = 5000) -> list[tuple[Any, ...]]:
    """Every node of ``doc`` as a path of keys and indexes (the root is ``()``)."""
    out: list[tuple[Any, ...]] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), doc)]
    while stack and len(out) < limit:
        path, node = stack.pop()
        out.append(path)
        if isinstance(node, dict):
            stack.extend(((*path, k), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend(((*path, i), v) for i, v in enumerate(node))
    return sorted(out, key=lambda p: [str(x) for x in p])


def get_at(doc: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def set_at(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    get_at(doc, path[:-1])[path[-1]] = value
    return doc


def tweaks(value: Any, doc_strings: list[str]) -> st.SearchStrategy[Any]:
    """Type-aware damage of one value."""
    if isinstance(value, bool):
        return st.sampled_from([not value, int(value), str(value).lower(), None])
    if isinstance(value, int):
        near = [value + 1, value - 1, -value, value * 2, value // 2, value + 4096, float(value), str(value)]
        return st.sampled_from(near + BIG_INTS)
    if isinstance(value, float):
        return st.sampled_from([-value, 0.0, 1e308, float("nan"), float("inf"), int(value), str(value)])
    if isinstance(value, str):
        edits = [value + "0", value[:-1], value.upper(), "../" + value, value + "/..", value[::-1], value + "\x00"]
        if len(value) > 3:
            mid = len(value) // 2
            edits.append(value[:mid] + ("0" if value[mid] != "0" else "1") + value[mid + 1 :])
        return st.sampled_from(edits) | st.sampled_from(HOSTILE_TEXT) | st.sampled_from(doc_strings or ["x"])
    if isinstance(value, list):
        variants: list[Any] = [[], value + value[:1], value[::-1], [value]]
        if value:
            variants += [value[1:], value[:-1]]
        return st.sampled_from(variants)
    if isinstance(value, dict):
        return st.sampled_from([{}, {**value, "extra": 1}, dict(list(value.items())[:-1]) if value else {"x": 1}])
    return json_values


def manifest_json(data: st.DataObject, base: Base) -> Mutation:
    step = data.draw(st.sampled_from(sorted(base.manifests)), label="step")
    doc = json.loads(base.manifests[step])
    paths = node_paths(doc)
    strings = sorted({v for p in paths if isinstance(v := get_at(doc, p), str)})[:200]
    op = data.draw(
        st.sampled_from(["tweak", "tweak", "tweak", "replace", "delete", "insert", "swap", "copy", "nest"]), label="op"
    )
    path = data.draw(st.sampled_from(paths), label="path")
    value = get_at(doc, path)
    nest = 0
    if op == "tweak":
        new = data.draw(tweaks(value, strings), label="new")
        doc = set_at(doc, path, new)
        what = f"tweak {path}: {short(value)} -> {short(new)}"
    elif op == "replace":
        new = data.draw(json_values, label="new")
        doc = set_at(doc, path, new)
        what = f"replace {path} with {short(new)}"
    elif op == "delete" and path:
        parent = get_at(doc, path[:-1])
        del parent[path[-1]]
        what = f"delete {path}"
    elif op == "insert" and isinstance(value, dict):
        key = data.draw(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), label="key")
        new = data.draw(json_values, label="new")
        value[key] = new
        what = f"insert {path}[{key!r}] = {short(new)}"
    elif op in ("swap", "copy"):
        other = data.draw(st.sampled_from(paths), label="other")
        a, b = copy.deepcopy(get_at(doc, path)), copy.deepcopy(get_at(doc, other))
        if _within(path, other) or _within(other, path):
            doc = set_at(doc, path, b)
            what = f"copy {other} over {path}"
        elif op == "swap":
            doc = set_at(doc, path, b)
            doc = set_at(doc, other, a)
            what = f"swap {path} <-> {other}"
        else:
            doc = set_at(doc, path, b)
            what = f"copy {other} over {path}"
    else:  # nest (also delete of the root / insert into a non-mapping)
        nest = data.draw(st.sampled_from([2, 8, 65, 130, 1000, 5000, 100_000]), label="depth")
        doc = set_at(doc, path, NEST_MARK)
        what = f"nest {path} {nest} levels deep"
    body = json.dumps(doc, allow_nan=True, separators=(",", ":")).encode()
    if nest:
        inner = json.dumps(value, allow_nan=True).encode()
        kind = data.draw(st.sampled_from(["list", "dict"]), label="nest kind")
        head, tail = (b"[" * nest, b"]" * nest) if kind == "list" else (b'{"a":' * nest, b"}" * nest)
        body = body.replace(json.dumps(NEST_MARK).encode(), head + inner + tail, 1)
    write_rel(base, f"manifests/{step}.json", body)
    return Mutation(what, "manifest-json", step, body=body, touched=[f"manifests/{step}.json"])


def _within(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def manifest_bytes(data: st.DataObject, base: Base, limit: int) -> Mutation:
    step = data.draw(st.sampled_from(sorted(base.manifests)), label="step")
    body = base.manifests[step]
    op = data.draw(st.sampled_from(["truncate", "flip", "insert", "garbage", "huge", "utf16", "deep", "empty"]))
    pos = data.draw(st.integers(0, len(body) - 1), label="pos")
    if op == "truncate":
        new = body[:pos]
    elif op == "flip":
        bit = data.draw(st.integers(0, 7), label="bit")
        new = body[:pos] + bytes([body[pos] ^ (1 << bit)]) + body[pos + 1 :]
    elif op == "insert":
        new = body[:pos] + data.draw(st.binary(min_size=1, max_size=16), label="bytes") + body[pos:]
    elif op == "garbage":
        new = data.draw(st.binary(max_size=64), label="bytes")
    elif op == "huge":
        new = body + b" " * (limit + 1 - len(body) + data.draw(st.integers(0, 10), label="extra"))
    elif op == "utf16":
        new = body.decode().encode("utf-16")
    elif op == "deep":
        n = data.draw(st.sampled_from([1000, 100_000]), label="depth")
        new = b"[" * n + b"]" * n
    else:
        new = b""
    write_rel(base, f"manifests/{step}.json", new)
    what = f"manifest bytes {op} at {pos} ({len(body)} -> {len(new)} bytes)"
    return Mutation(what, "manifest-bytes", step, body=new, touched=[f"manifests/{step}.json"])


# -- objects ----------------------------------------------------------------------------------


def object_bytes(data: st.DataObject, base: Base) -> Mutation:
    step = data.draw(st.sampled_from(sorted(base.manifests)), label="step")
    keys = sorted(base.objects)
    key = data.draw(st.sampled_from(keys), label="key")
    body = base.objects[key]
    op = data.draw(
        st.sampled_from(["flip", "flip", "truncate", "extend", "random", "empty", "delete", "swap", "zstd-bomb"])
    )
    rel = rel_object(key)
    if op == "delete":
        delete_rel(base, rel)
        return Mutation(f"delete object {key}", "object", step, touched=[rel])
    if op == "flip" and body:
        pos = data.draw(st.integers(0, len(body) - 1), label="pos")
        bit = data.draw(st.integers(0, 7), label="bit")
        new = body[:pos] + bytes([body[pos] ^ (1 << bit)]) + body[pos + 1 :]
        what = f"flip bit {bit} of byte {pos} of object {key}"
    elif op == "truncate" and body:
        n = data.draw(st.integers(0, len(body) - 1), label="n")
        new, what = body[:n], f"truncate object {key} to {n} of {len(body)} bytes"
    elif op == "extend":
        extra = data.draw(st.binary(min_size=1, max_size=64), label="extra")
        new, what = body + extra, f"extend object {key} by {len(extra)} bytes"
    elif op == "random":
        new = data.draw(st.binary(min_size=len(body), max_size=len(body)), label="bytes")
        what = f"random bytes in object {key}"
    elif op == "swap":
        other = data.draw(st.sampled_from(keys), label="other")
        write_rel(base, rel_object(other), body)
        write_rel(base, rel, base.objects[other])
        return Mutation(f"swap objects {key} <-> {other}", "object", step, touched=[rel, rel_object(other)])
    elif op == "zstd-bomb":
        # a valid frame declaring far more content than the chunk holds, where the object was
        fake = data.draw(st.sampled_from([1 << 20, 1 << 30, 1 << 40]), label="declared")
        new = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 64)
        new = new[:4] + bytes([0xE0]) + fake.to_bytes(8, "little") + new[4 + 1 + 1 :]
        what = f"object {key} replaced by a zstd frame declaring {fake} bytes"
    else:
        new, what = b"", f"empty object {key}"
    write_rel(base, rel, new)
    return Mutation(what, "object", step, touched=[rel])


# -- what sits at a path (local stores) ----------------------------------------------------------


def fs_special(data: st.DataObject, base: Base) -> Mutation:
    step = data.draw(st.sampled_from(sorted(base.manifests)), label="step")
    keys = sorted(base.objects)
    where = data.draw(
        st.sampled_from(["object", "object", "object", "manifest", "ref", "objects-dir", "shard-dir", "manifests-dir"])
    )
    if where == "object":
        rel = rel_object(data.draw(st.sampled_from(keys), label="key"))
    elif where == "manifest":
        rel = f"manifests/{step}.json"
    elif where == "ref":
        rel = "refs/latest"
    elif where == "objects-dir":
        rel = "objects"
    elif where == "manifests-dir":
        rel = "manifests"
    else:
        rel = "objects/" + data.draw(st.sampled_from(sorted({k[:2] for k in keys})), label="shard")
    path = os.path.join(base.root, rel)
    folder = rel in ("objects", "manifests") or rel.count("/") == 1 and rel.startswith("objects/")
    if folder:
        op = data.draw(st.sampled_from(["symlink-outside-copy", "file", "fifo", "symlink-dev-zero"]))
    else:
        op = data.draw(
            st.sampled_from(
                ["fifo", "dev-zero", "canary", "outside-copy", "directory", "sparse", "inside-link", "dangling"]
            )
        )
    outside = os.path.join(base.tmp, "outside")
    undo: list[Callable[[], None]] = [lambda: _remove(outside)]
    _remove(outside)
    if op == "symlink-outside-copy":
        shutil.copytree(path, outside, symlinks=True)
        _remove(path)
        os.symlink(outside, path)
    elif op == "file":
        _remove(path)
        with open(path, "wb") as f:
            f.write(b"not a folder")
    elif op == "fifo":
        _remove(path)
        os.mkfifo(path)
    elif op in ("dev-zero", "symlink-dev-zero"):
        _remove(path)
        os.symlink("/dev/zero", path)
    elif op == "canary":
        _remove(path)
        os.symlink(base.canary, path)
    elif op == "outside-copy":
        with open(path, "rb") as f:
            body = f.read()
        with open(outside, "wb") as f:
            f.write(body)
        _remove(path)
        os.symlink(outside, path)
    elif op == "directory":
        _remove(path)
        os.makedirs(os.path.join(path, "sub"))
    elif op == "sparse":
        size = data.draw(st.sampled_from([1 << 20, 6 << 30]), label="size")
        with open(path, "r+b") as f:
            f.truncate(size)
    elif op == "inside-link":
        other = rel_object(data.draw(st.sampled_from(keys), label="other"))
        _remove(path)
        os.symlink(os.path.join(base.root, other), path)
    else:
        _remove(path)
        os.symlink(os.path.join(base.tmp, "no-such-file"), path)
    return Mutation(f"{op} at {rel}", "fs", step, touched=[rel], undo_extra=undo)


def draw(data: st.DataObject, base: Base, manifest_limit: int) -> Mutation:
    kinds = ["manifest-json"] * 6 + ["manifest-bytes"] * 2 + ["object"] * 3
    if base.root:
        kinds += ["fs"] * 2
    kind = data.draw(st.sampled_from(kinds), label="kind")
    if kind == "manifest-json":
        return manifest_json(data, base)
    if kind == "manifest-bytes":
        return manifest_bytes(data, base, manifest_limit)
    if kind == "object":
        return object_bytes(data, base)
    return fs_special(data, base)


def short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."
