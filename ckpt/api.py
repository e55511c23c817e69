"""Synchronous save / restore / load: the public entry points of the core.

``state`` is a mapping of names to stateful objects (anything an adapter handles),
tensors, NumPy arrays, JSON values and nested mappings/lists of those.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Container, Iterable, Mapping, MutableMapping

import torch

from ckpt import config, tree as treemod
from ckpt.errors import CheckpointError, NoCheckpointError, StateMismatchError, UnsupportedValueError
from ckpt.manifest import ChunkRef, Manifest, TensorEntry
from ckpt.pipeline import Reader, Writer, empty_like_entry, wait_all
from ckpt.plugins import Plugins, get_plugins
from ckpt.store import Store

log = logging.getLogger("ckpt")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a save committed or a restore read."""

    step: int
    url: str
    #: logical bytes of every tensor in the checkpoint
    raw_bytes: int
    #: bytes this save wrote: new objects + the manifest (for a restore: the checkpoint's figure)
    stored_bytes: int
    created: str = ""
    parent: int | None = None
    tensors: int = 0
    #: the committed manifest itself
    manifest: Manifest | None = field(default=None, repr=False, compare=False)
    #: for a save: what its writer did (objects written and reused, deltas; ``ckpt.pipeline.SaveStats``)
    write_stats: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_manifest(cls, m: Manifest, url: str) -> CheckpointInfo:
        return cls(
            step=m.step,
            url=url,
            raw_bytes=m.raw_bytes,
            stored_bytes=m.stored_bytes,
            created=m.created,
            parent=m.parent,
            tensors=len(m.tensors),
            manifest=m,
        )


# -- capture: live objects -> state tree ---------------------------------------------------


def capture(state: Mapping[str, Any], plugins: Plugins) -> tuple[dict[str, Any], dict[str, str]]:
    """Turn the user's state into a plain tree; returns the tree and ``{path: adapter name}``."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"state must be a mapping of names to objects, got {type(state).__name__}")
    adapters: dict[str, str] = {}

    def walk(value: Any, path: str) -> Any:
        adapter = plugins.adapters.for_object(value)
        if adapter is not None:
            adapters[path] = adapter.name
            return adapter.state(value)
        if isinstance(value, Mapping):
            return {k: walk(v, treemod.join(path, k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [walk(v, treemod.join(path, i)) for i, v in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        return value

    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or key.startswith("$"):
            raise UnsupportedValueError(f"state keys must be strings not starting with '$', got {key!r}")
        out[key] = walk(value, treemod.escape(key))
    return out, adapters


def _utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pool(n: int | None = None) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=n or config.io_threads(), thread_name_prefix="ckpt-io")


def load_manifest(store: Store, step: int | None) -> Manifest:
    """The manifest of ``step`` (the newest committed one when None)."""
    if step is None:
        step = store.latest_step()
        if step is None:
            raise NoCheckpointError(f"no checkpoint in {store.url}")
    return Manifest.from_json_bytes(store.read_manifest(step), where=f"{store.url} step {step}")


def known_chunks(manifest: Manifest | None) -> dict[str, ChunkRef]:
    """Objects a new save can reference instead of writing (dedup index)."""
    if manifest is None:
        return {}
    return {c.hash: c for c in manifest.chunk_refs()}


def write_checkpoint(
    store: Store,
    plugins: Plugins,
    *,
    step: int,
    json_tree: Any,
    adapters: Mapping[str, str],
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    parent: Manifest | None,
    pool: ThreadPoolExecutor,
    meta: Mapping[str, Any] | None = None,
    on_tensor_written: Callable[[str], None] | None = None,
    parent_tensors: Mapping[str, torch.Tensor] | None = None,
    delta: bool = True,
    max_chain: int | None = None,
    delta_skip: Container[str] = (),
) -> CheckpointInfo:
    """Write objects, then the manifest, then the ref. The one commit path of ckpt.

    ``tensors`` may be a lazy iterable of ``(path, tensor)`` pairs: the async engine yields
    each tensor as soon as it is staged, and ``on_tensor_written(path)`` tells it when the
    tensor's bytes are no longer needed (its staging buffer can be reused).

    Chunks stored by ``parent`` are referenced, not written (dedup). With ``delta`` (the
    default), a changed chunk is also tried as an XOR delta against the parent's chunk and
    kept when smaller (:mod:`ckpt.delta`); its parent's raw bytes come from
    ``parent_tensors`` (the previous snapshot's host tensors by path, checked against the
    parent's hashes) or are read back from the store. ``max_chain`` bounds delta chains
    (``CKPT_DELTA_MAX_CHAIN``, default 8: a full object at least every 8 saves of a chunk).
    Tensors whose paths are in ``delta_skip`` are written without trying a delta.
    """
    writer = Writer(
        store,
        plugins.codecs,
        pool,
        known=known_chunks(parent),
        chunk_bytes=config.chunk_bytes(),
        parent=parent,
        parent_tensors=parent_tensors,
        delta=delta,
        max_chain=config.delta_max_chain() if max_chain is None else max_chain,
        delta_skip=delta_skip,
    )
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    futures: dict[str, Future[TensorEntry]] = {}
    try:
        for path, tensor in items:
            fut = writer.submit(path, tensor)
            if on_tensor_written is not None:
                fut.add_done_callback(lambda _f, p=path: on_tensor_written(p))
            futures[path] = fut
    finally:
        wait_all(futures.values())
    entries = {p: f.result() for p, f in futures.items()}
    manifest = Manifest(
        step=step,
        created=_utcnow(),
        tree=json_tree,
        adapters=dict(adapters),
        tensors=entries,
        parent=parent.step if parent is not None else None,
        raw_bytes=writer.stats.raw_bytes,
        stored_bytes=0,
        chunk_bytes=writer.chunk_bytes,
        plugins=plugins.versions(),
        meta=dict(meta or {}),
    )
    body = manifest.to_json_bytes()
    # stored_bytes counts the manifest itself; its own digits change its length, so settle it.
    stored = writer.stats.written_bytes + len(body)
    for _ in range(3):
        manifest = dataclasses.replace(manifest, stored_bytes=stored)
        body = manifest.to_json_bytes()
        if writer.stats.written_bytes + len(body) == stored:
            break
        stored = writer.stats.written_bytes + len(body)
    store.commit(step, body)
    info = dataclasses.replace(CheckpointInfo.from_manifest(manifest, store.url), write_stats=writer.stats.frozen())
    log.info("committed step %d to %s (%d raw bytes, %d stored)", step, store.url, info.raw_bytes, info.stored_bytes)
    plugins.after_commit(info=info)
    return info


def _parent_for_save(store: Store, step: int) -> Manifest | None:
    latest = store.latest_step(repair=True)
    if latest is None:
        return None
    try:
        return load_manifest(store, latest)
    except CheckpointError as exc:
        log.warning("cannot read the latest manifest of %s for dedup (%s); writing a full checkpoint", store.url, exc)
        return None


def save(
    url: str,
    state: Mapping[str, Any],
    *,
    step: int,
    storage_options: dict[str, Any] | None = None,
) -> CheckpointInfo:
    """Save ``state`` as checkpoint ``step`` of the store at ``url``; returns after the commit.

    Chunks already stored by the newest checkpoint are referenced, not written again.
    Saving a step that exists replaces it atomically.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step must be a non-negative int, got {step!r}")
    plugins = get_plugins()
    store = Store(url, storage_options)
    tree, adapters = capture(state, plugins)
    plugins.before_save(url=store.url, step=step, tree=tree)
    tensors: dict[str, torch.Tensor] = {}
    json_tree = treemod.encode(tree, tensors, set())
    parent = _parent_for_save(store, step)
    with _pool() as pool:
        return write_checkpoint(
            store, plugins, step=step, json_tree=json_tree, adapters=adapters, tensors=tensors, parent=parent, pool=pool
        )


# -- restore / load ------------------------------------------------------------------------


def _live_tensors(tree: Any, path: str, out: dict[str, torch.Tensor]) -> None:
    """Tensors of a captured live tree by path (the same paths :func:`tree.encode` uses)."""
    treemod.encode(tree, out, set(), path)


def _read_tensors(
    store: Store,
    plugins: Plugins,
    manifest: Manifest,
    paths: list[str],
    destinations: Mapping[str, torch.Tensor],
    map_location: Any = None,
) -> dict[str, torch.Tensor]:
    """Decode the tensors at ``paths``; in place into ``destinations`` where given."""
    result: dict[str, torch.Tensor] = {}
    staged: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (path, live, host copy)
    with _pool() as pool:
        reader = Reader(store, plugins.codecs, pool)
        futures = []
        try:
            for path in paths:
                entry = manifest.tensors.get(path)
                if entry is None:
                    raise CheckpointError(f"manifest of step {manifest.step} references tensor {path!r} it does not list")
                dest = destinations.get(path)
                if dest is not None and dest.device.type == "cpu" and dest.is_contiguous() and not dest.is_conj():
                    target = dest.detach()
                    result[path] = dest
                else:
                    target = empty_like_entry(entry, path)
                    if dest is not None:
                        staged.append((path, dest, target))
                        result[path] = dest
                    else:
                        result[path] = target
                futures.extend(reader.submit(path, entry, target))
        finally:
            wait_all(futures)
    with torch.no_grad():
        for path, dest, host in staged:
            dest.copy_(host)
    if map_location is not None and str(map_location) != "cpu":
        result = {p: t.to(map_location) for p, t in result.items()}
    return result


def _check_fits(
    manifest: Manifest,
    live: Mapping[str, torch.Tensor],
    keys: list[str],
    exact: list[str] = (),  # type: ignore[assignment]
) -> None:
    """Refuse before any byte is written when the live objects cannot take the checkpoint.

    ``exact``: paths of objects whose adapter needs exactly the stored tensors (a module's
    strict ``load_state_dict`` would refuse only after copying, so check here).
    """
    for prefix in exact:
        def under(p: str) -> bool:
            return p == prefix or p.startswith(prefix + "/")

        extra = sorted(p for p in manifest.tensors if under(p) and p not in live)
        if extra:
            raise StateMismatchError(
                f"tensor {extra[0]!r} (and {len(extra) - 1} more) is in checkpoint step {manifest.step} "
                f"but not in the live object at {prefix!r}"
            )
    for path, t in live.items():
        entry = manifest.tensors.get(path)
        if entry is None:
            raise StateMismatchError(f"tensor {path!r} is in the live state but not in checkpoint step {manifest.step}")
        dtype = str(t.dtype).removeprefix("torch.")
        if tuple(t.shape) != entry.shape or dtype != entry.dtype:
            raise StateMismatchError(
                f"tensor {path!r}: checkpoint has {entry.dtype}{list(entry.shape)}, live object has {dtype}{list(t.shape)}"
            )


def restore(
    url: str,
    state: MutableMapping[str, Any],
    *,
    step: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> CheckpointInfo:
    """Load checkpoint ``step`` (the newest when None) into the live objects of ``state``.

    Tensors are decoded in parallel straight into the destination tensors and every
    object is verified. Keys of ``state`` must be in the checkpoint; keys only in the
    checkpoint are not read. Plain values (ints, lists...) in ``state`` are replaced.
    """
    plugins = get_plugins()
    store = Store(url, storage_options)
    manifest = load_manifest(store, step)
    return restore_manifest(store, plugins, manifest, state)


def restore_manifest(store: Store, plugins: Plugins, manifest: Manifest, state: MutableMapping[str, Any]) -> CheckpointInfo:
    stored_tree = manifest.tree
    if not isinstance(stored_tree, dict):
        raise CheckpointError(f"checkpoint step {manifest.step} of {store.url} has no state mapping")
    missing = [k for k in state if k not in stored_tree]
    if missing:
        raise StateMismatchError(
            f"checkpoint step {manifest.step} of {store.url} has no {', '.join(map(repr, missing))}; "
            f"it holds {', '.join(map(repr, stored_tree))}"
        )
    from ckpt.dataloader import track_all

    track_all(state)  # a restored DataLoader must replay its position on the next iter()
    live_tree, live_adapters = capture(state, plugins)
    for path, name in live_adapters.items():
        saved = manifest.adapters.get(path)
        if saved != name:
            raise StateMismatchError(f"{path!r} was saved {'by adapter ' + repr(saved) if saved else 'as plain data'}, "
                                     f"but the live object needs adapter {name!r}")
    live: dict[str, torch.Tensor] = {}
    for key in state:
        _live_tensors(live_tree[key], treemod.escape(key), live)
    exact = [p for p, name in live_adapters.items() if getattr(plugins.adapters.get(name), "exact_tensors", False)]
    _check_fits(manifest, live, list(state), exact)
    wanted = [p for key in state for p in treemod.tensor_paths(stored_tree[key])]
    tensors = _read_tensors(store, plugins, manifest, wanted, live)
    for key in list(state):
        value = treemod.decode(stored_tree[key], lambda p, is_np: _as_numpy(tensors[p], is_np), treemod.escape(key))
        state[key] = _load_into(state[key], value, treemod.escape(key), plugins)
    info = CheckpointInfo.from_manifest(manifest, store.url)
    plugins.after_restore(info=info, state=state)
    return info


def _as_numpy(t: torch.Tensor, is_numpy: bool) -> Any:
    return t.numpy() if is_numpy else t


def _load_into(target: Any, value: Any, path: str, plugins: Plugins) -> Any:
    """Load ``value`` into ``target``; return what ``state`` should hold afterwards."""
    adapter = plugins.adapters.for_object(target)
    if adapter is not None:
        adapter.load(target, value)
        return target
    if isinstance(target, torch.Tensor):
        return target  # already decoded in place
    if isinstance(target, MutableMapping) and isinstance(value, Mapping):
        for k in list(target):
            if k in value:
                target[k] = _load_into(target[k], value[k], treemod.join(path, k), plugins)
        return target
    if isinstance(target, list) and isinstance(value, list) and len(target) == len(value):
        for i, item in enumerate(value):
            target[i] = _load_into(target[i], item, treemod.join(path, i), plugins)
        return target
    return value


def load(
    url: str,
    *,
    step: int | None = None,
    storage_options: dict[str, Any] | None = None,
    map_location: Any = "cpu",
) -> dict[str, Any]:
    """Read checkpoint ``step`` (newest when None) as a plain tree of fresh tensors.

    Modules come back as their state-dict mapping, optimizers as their state-dict
    structure; no live object is needed and no code from storage runs.
    """
    plugins = get_plugins()
    store = Store(url, storage_options)
    manifest = load_manifest(store, step)
    paths = treemod.tensor_paths(manifest.tree)
    tensors = _read_tensors(store, plugins, manifest, paths, {})

    def leaf(path: str, is_numpy: bool) -> Any:
        # NumPy arrays live in host memory whatever map_location says
        t = tensors[path]
        if is_numpy:
            return t.numpy()
        return t if map_location is None or str(map_location) == "cpu" else t.to(map_location)

    return treemod.decode(manifest.tree, leaf)
