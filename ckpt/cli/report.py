"""What the ``ckpt`` command line reports about a store, as plain JSON-ready dicts.

The CLI renders these (rich on a terminal, plain text when piped, as-is with ``--json``);
their keys are the documented ``--json`` schemas, so change them only by adding keys.
Objects "referenced" by a checkpoint include the parents of its delta objects, which a
reader needs too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ckpt.codecs.delta import chunk_records
from ckpt.errors import CheckpointError, NoCheckpointError
from ckpt.state import paths as treemod
from ckpt.storage.commit import load_manifest
from ckpt.storage.lineage import lineage_of, parse_manifest
from ckpt.storage.manifest import RANK_TAG, ChunkRef, Manifest, TensorEntry
from ckpt.storage.store import Store

if TYPE_CHECKING:
    import torch

    from ckpt.hooks.manager import Plugins

# -- manifests and the objects they reference -------------------------------------------


def read_manifests(store: Store) -> tuple[dict[int, Manifest], dict[int, str], dict[int, int]]:
    """Every committed manifest: ``(manifests, errors, manifest sizes)`` by step.

    A manifest that cannot be read lands in ``errors`` instead of failing the others.
    """
    manifests: dict[int, Manifest] = {}
    errors: dict[int, str] = {}
    sizes: dict[int, int] = {}
    for step in store.steps():
        try:
            body = store.read_manifest(step)
            manifests[step] = parse_manifest(body, step, store.url)
            sizes[step] = len(body)
        except CheckpointError as exc:
            errors[step] = str(exc)
    return manifests, errors, sizes


def require_steps(store: Store, manifests: Mapping[int, Manifest], errors: Mapping[int, str]) -> None:
    if not manifests and not errors:
        raise NoCheckpointError(f"no checkpoint in {store.url}")


def manifest_for(
    store: Store, manifests: Mapping[int, Manifest], errors: Mapping[int, str], step: int | None
) -> Manifest:
    """The manifest of ``step`` (the latest readable one when None), raising what reading it raised."""
    require_steps(store, manifests, errors)
    if step is None:
        latest = lineage_of(manifests).latest
        if latest is None:
            return load_manifest(store, None)  # raises, naming every unreadable manifest
        step = latest
    if step in manifests:
        return manifests[step]
    return load_manifest(store, step)  # raises NoCheckpointError / SchemaError naming the step


def is_delta(ref: ChunkRef) -> bool:
    return any(isinstance(s, Mapping) and "parent" in s for s in ref.codec)


def _closure(ref: ChunkRef) -> Iterator[ChunkRef]:
    """``ref`` and every parent object its delta chain needs (malformed records skipped:
    verify and restore name them; a report does not)."""
    yield ref
    for rec in list(chunk_records(ref.to_json()))[1:]:
        try:
            yield ChunkRef.from_json({"size": 0, "stored": 0, **rec})
        except (KeyError, TypeError, ValueError):
            continue


def referenced(manifest: Manifest) -> dict[str, ChunkRef]:
    """Objects a checkpoint needs, by key (delta parents included)."""
    out: dict[str, ChunkRef] = {}
    for entry in manifest.tensors.values():
        for ref in entry.refs:
            for r in _closure(ref):
                out.setdefault(r.key, r)
    return out


def _ratio(raw: int, stored: int) -> float | None:
    return round(raw / stored, 3) if stored else None


# -- ls --------------------------------------------------------------------------------------


def ls_report(store: Store) -> dict[str, Any]:
    manifests, errors, sizes = read_manifests(store)
    require_steps(store, manifests, errors)
    lineage = lineage_of(manifests, errors)
    abandoned = set(lineage.abandoned)
    rows = []
    for step, m in sorted(manifests.items()):
        objs = referenced(m)
        stored = sum(r.stored for r in objs.values())
        rows.append(
            {
                "step": step,
                "created": m.created,
                "parent": m.parent,
                "seq": m.seq,
                "run": m.run or None,
                "latest": step == lineage.latest,
                "abandoned": step in abandoned,
                "tensors": len(m.tensors),
                "raw_bytes": m.raw_bytes,
                "stored_bytes": stored,
                "ratio": _ratio(sum(r.size for r in objs.values()), stored),
                "new_bytes": m.stored_bytes,
                "manifest_bytes": sizes[step],
            }
        )
    return {
        "url": store.url,
        "latest": lineage.latest,
        "checkpoints": rows,
        "errors": [{"step": s, "error": e} for s, e in sorted(errors.items())],
    }


# -- show ------------------------------------------------------------------------------------


def codec_label(chain: Any) -> str:
    names = [str(s.get("name")) for s in chain if isinstance(s, Mapping)]
    return "+".join(names) if names else "raw"


def _layout(m: Manifest, path: str, entry: TensorEntry) -> str:
    """How a tensor of a collective save is held: "sharded:N" (N boxes), "rank:R" (per
    rank), "replicated" (equal on every rank, stored once); "" in a single-process save."""
    if entry.shards:
        return f"sharded:{len(entry.shards)}"
    if path.startswith(RANK_TAG + "/"):
        return "rank:" + path.split("/", 2)[1]
    return "replicated" if m.world_size else ""


def show_report(store: Store, step: int | None) -> dict[str, Any]:
    manifests, errors, _ = read_manifests(store)
    m = manifest_for(store, manifests, errors, step)
    users: dict[str, set[int]] = {}
    for s, other in manifests.items():
        for e in other.tensors.values():
            for ref in e.refs:
                users.setdefault(ref.key, set()).add(s)
    seen_here: set[str] = set()
    tensors = []
    for path, entry in m.tensors.items():
        chunks: list[dict[str, Any]] = []
        for ref in entry.refs:
            others = sorted(users.get(ref.key, set()) - {m.step})
            dedup = ref.key in seen_here or any(s < m.step for s in others)
            seen_here.add(ref.key)
            chunks.append(
                {
                    "key": ref.key,
                    "size": ref.size,
                    "stored": ref.stored,
                    "codec": [str(s.get("name")) for s in ref.codec],
                    "dedup": dedup,
                    "delta": is_delta(ref),
                    "shared_with": others,
                }
            )
        n_dedup = sum(c["dedup"] for c in chunks)
        if any(c["delta"] for c in chunks):
            status = "delta"
        elif chunks and n_dedup == len(chunks):
            status = "dedup"
        elif n_dedup:
            status = "partial"
        else:
            status = "new"
        labels = sorted({codec_label(r.codec) for r in entry.refs}) or ["-"]
        tensors.append(
            {
                "path": path,
                "name": treemod.dotted(path),
                "dtype": entry.dtype,
                "shape": list(entry.shape),
                "nbytes": entry.nbytes,
                "stored": sum(r.stored for r in entry.refs),
                "codec": ",".join(labels),
                "status": status,
                "layout": _layout(m, path, entry),
                "chunks": chunks,
            }
        )
    objs = referenced(m)
    return {
        "url": store.url,
        "step": m.step,
        "created": m.created,
        "parent": m.parent,
        "world_size": m.world_size,
        "seq": m.seq,
        "run": m.run or None,
        "abandoned": m.step in lineage_of(manifests).abandoned,
        "raw_bytes": m.raw_bytes,
        "stored_bytes": sum(r.stored for r in objs.values()),
        "new_bytes": m.stored_bytes,
        "adapters": dict(m.adapters),
        "plugins": dict(m.plugins),
        "meta": dict(m.meta),
        "tree": m.tree,
        "tensors": tensors,
    }


# -- diff ------------------------------------------------------------------------------------


def json_leaves(node: Any, path: str = "") -> dict[str, Any]:
    """Non-tensor values of an encoded tree by path; lists of scalars count as one value."""
    out: dict[str, Any] = {}

    def walk(n: Any, p: str) -> None:
        kids = treemod.children(n)
        if kids is None:
            if not (isinstance(n, dict) and "$tensor" in n):
                out[p] = n
            return
        for k, v in kids:
            walk(v, treemod.join(p, k))

    walk(node, path)
    return out


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """max |a - b| over elements (NaN equal to NaN, equal infinities equal); None for bool."""
    import torch  # only diff compares tensors: the other commands start without torch

    if a.dtype == torch.bool or a.shape != b.shape:
        return None
    fa, fb = a.reshape(-1), b.reshape(-1)
    if not (a.dtype.is_floating_point or a.dtype.is_complex):
        fa, fb = fa.to(torch.float64), fb.to(torch.float64)
    best = 0.0
    step = 1 << 20
    for i in range(0, fa.numel(), step):
        x, y = fa[i : i + step], fb[i : i + step]
        if x.dtype.is_floating_point and x.dtype not in (torch.float32, torch.float64):
            x, y = x.to(torch.float32), y.to(torch.float32)
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))
        d = torch.where(same, torch.zeros((), dtype=torch.float64), (x - y).abs().to(torch.float64))
        d = torch.nan_to_num(d, nan=math.inf)
        if d.numel():
            best = max(best, float(d.max()))
    return best


def _same_content(ea: TensorEntry, eb: TensorEntry) -> bool:
    """Equal by their records: the same objects, and the same slices of packed ones."""
    return [(c.hash, c.at, c.size) for c in ea.refs] == [(c.hash, c.at, c.size) for c in eb.refs]


def _equal_bytes(ta: Any, tb: Any) -> bool:
    import torch  # here only, as for read_tensors below

    a = ta.contiguous().reshape(-1).view(torch.uint8)
    b = tb.contiguous().reshape(-1).view(torch.uint8)
    return a.shape == b.shape and bool(torch.equal(a, b))


def diff_report(store: Store, plugins: Plugins, a: int, b: int) -> dict[str, Any]:
    ma, mb = load_manifest(store, a), load_manifest(store, b)
    changed, added, removed = [], [], []
    unchanged = 0
    for path, eb in mb.tensors.items():
        ea = ma.tensors.get(path)
        if ea is None:
            added.append({"tensor": path, "dtype": eb.dtype, "shape": list(eb.shape)})
        elif _same_content(ea, eb) and ea.shards == eb.shards and ea.dtype == eb.dtype and ea.shape == eb.shape:
            unchanged += 1
        else:
            item: dict[str, Any] = {
                "tensor": path,
                "a": {"dtype": ea.dtype, "shape": list(ea.shape)},
                "b": {"dtype": eb.dtype, "shape": list(eb.shape)},
                "max_abs_diff": None,
            }
            if ea.dtype == eb.dtype and ea.shape == eb.shape:
                # Tensor by tensor: at most two tensors in memory at once.
                # here only: reading tensors imports torch, which the rest of the CLI never needs
                from ckpt.io.plan import ReadPlan
                from ckpt.io.reader import read_tensors

                ta = read_tensors(store, plugins.codecs, ReadPlan.for_paths(ma, [path]))[path]
                tb = read_tensors(store, plugins.codecs, ReadPlan.for_paths(mb, [path]))[path]
                if any(c.packed for c in (*ea.chunks, *eb.chunks)) and _equal_bytes(ta, tb):
                    unchanged += 1  # a small tensor whose shared (packed) object changed around it
                    continue
                d = max_abs_diff(ta, tb)
                item["max_abs_diff"] = d if d is None or math.isfinite(d) else "inf"
            changed.append(item)
    for path, ea in ma.tensors.items():
        if path not in mb.tensors:
            removed.append({"tensor": path, "dtype": ea.dtype, "shape": list(ea.shape)})
    la, lb = json_leaves(ma.tree), json_leaves(mb.tree)
    values = []
    for p in sorted(set(la) | set(lb)):
        if la.get(p, ...) != lb.get(p, ...):
            v: dict[str, Any] = {"path": p}
            if p in la:
                v["a"] = la[p]
            if p in lb:
                v["b"] = lb[p]
            values.append(v)
    ra, rb = referenced(ma), referenced(mb)
    common = set(ra) & set(rb)
    return {
        "url": store.url,
        "a": a,
        "b": b,
        "changed": changed,
        "added": added,
        "removed": removed,
        "unchanged": unchanged,
        "values_changed": values,
        "shared": {"objects": len(common), "stored_bytes": sum(ra[k].stored for k in common)},
        "stored_bytes": {"a": sum(r.stored for r in ra.values()), "b": sum(r.stored for r in rb.values())},
    }


# -- verify ------------------------------------------------------------------------------------


def _identity(ref: ChunkRef) -> tuple[str, str, int, int, str]:
    return (ref.key, ref.hash, ref.object_size, ref.stored, repr(ref.codec))


def verify_report(
    store: Store, plugins: Plugins, step: int | None, progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """Read and verify every object of ``step`` (every step when None), each object once."""
    from ckpt.io.verify import verify_manifest

    manifests, errors, _ = read_manifests(store)
    strays: list[str] = []
    if step is not None:
        m = manifest_for(store, manifests, errors, step)
        manifests, errors = {step: m}, {}
    else:
        strays = store.stray_manifests()
        if not strays:
            require_steps(store, manifests, errors)
    # Objects shared between checkpoints are checked once, under the first step using them;
    # "shared" means the whole record agrees: a record reusing a key with another hash, size
    # or codec chain (a damaged or hostile manifest) is checked on its own.
    users: dict[str, list[dict[str, Any]]] = {}
    todo: dict[int, Manifest] = {}
    seen: set[tuple[str, str, int, int, str]] = set()
    total = 0
    for s, m in sorted(manifests.items()):
        keep = {}
        for path, entry in m.tensors.items():
            for ref in entry.refs:
                users.setdefault(ref.key, []).append({"step": s, "tensor": path})
            fresh = tuple(r for r in entry.refs if _identity(r) not in seen)
            seen.update(_identity(r) for r in fresh)
            total += sum(r.object_size for r in fresh)
            if fresh:
                keep[path] = dataclasses.replace(entry, chunks=fresh)
        todo[s] = dataclasses.replace(m, tensors=keep)
    problems: list[dict[str, Any]] = []
    checked = 0
    for _s, m in sorted(todo.items()):
        checked += sum(len(e.refs) for e in m.tensors.values())
        tick = (lambda n: progress(n, total)) if progress is not None else None
        for p in verify_manifest(store, plugins.codecs, m, progress=tick):
            problems.append({"key": p.key, "error": p.error, "references": users.get(p.key, [])})
    for s, e in sorted(errors.items()):
        problems.append({"key": None, "error": e, "references": [{"step": s, "tensor": None}]})
    for name in strays:
        what = "a folder" if name.endswith("/") else "not a manifest name (<step>.json, no leading zeros or signs)"
        problems.append(
            {
                "key": None,
                "error": f"manifests/{name} in {store.url} is {what}: ignored, it is no checkpoint",
                "references": [],
            }
        )
    return {
        "url": store.url,
        "steps": sorted([*manifests, *errors]),
        "objects": checked,
        "bytes": total,
        "ok": not problems,
        "problems": problems,
    }


# -- du ----------------------------------------------------------------------------------------


def du_report(store: Store, gc_estimate: Mapping[str, Any] | None) -> dict[str, Any]:
    manifests, errors, sizes = read_manifests(store)
    require_steps(store, manifests, errors)
    refs = {s: referenced(m) for s, m in manifests.items()}
    count: dict[str, int] = {}
    for objs in refs.values():
        for k in objs:
            count[k] = count.get(k, 0) + 1
    rows = []
    for s in sorted(refs):
        objs = refs[s]
        unique = sum(r.stored for k, r in objs.items() if count[k] == 1)
        total = sum(r.stored for r in objs.values())
        rows.append(
            {
                "step": s,
                "objects": len(objs),
                "stored_bytes": total,
                "unique_bytes": unique,
                "shared_bytes": total - unique,
                "manifest_bytes": sizes[s],
            }
        )
    listed = {o.key: o.size for o in store.list_objects()}
    union: dict[str, ChunkRef] = {k: r for objs in refs.values() for k, r in objs.items()}
    unref = {k: n for k, n in listed.items() if k not in union}
    return {
        "url": store.url,
        "checkpoints": rows,
        "store": {
            "objects": len(listed),
            "bytes": sum(listed.values()),
            "manifest_bytes": sum(sizes.values()),
            "referenced_objects": len(union),
            "referenced_bytes": sum(r.stored for r in union.values()),
            "unreferenced_objects": len(unref),
            "unreferenced_bytes": sum(unref.values()),
            "missing_objects": sum(1 for k in union if k not in listed),
        },
        "gc": dict(gc_estimate) if gc_estimate is not None else None,
        "errors": [{"step": s, "error": e} for s, e in sorted(errors.items())],
    }
