"""The public entry points: save, restore, load, and reading what a store holds.

``state`` is a mapping of names to stateful objects (anything an adapter handles),
tensors, NumPy arrays, JSON values and nested mappings/lists of those. Each function
composes the stages of the data flow: capture (:mod:`ckpt.state`), write
(:mod:`ckpt.io.writer`), commit (:mod:`ckpt.storage.commit`); and back: manifest, read
plan (:mod:`ckpt.io.plan`), decode (:mod:`ckpt.io.reader`), load into live objects.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Container, Iterable, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ckpt import config
from ckpt.errors import CheckpointError, StateMismatchError
from ckpt.hooks.manager import Plugins, get_plugins
from ckpt.io.plan import ReadPlan
from ckpt.io.reader import read_tensors
from ckpt.io.writer import write_objects
from ckpt.snapshot.executor import io_pool
from ckpt.state import tree as treemod
from ckpt.state.capture import as_numpy, capture, check_fits, live_tensors, load_into
from ckpt.storage.commit import commit, load_manifest, new_manifest, parent_for_save
from ckpt.storage.manifest import Manifest, check_step
from ckpt.storage.store import Store
from ckpt.types import CheckpointInfo

log = logging.getLogger("ckpt")


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
    """Write objects, then the manifest, then the ref: the one save path of ckpt.

    See :func:`ckpt.io.writer.write_objects` for ``tensors``, ``on_tensor_written``,
    ``parent_tensors``, ``delta`` and ``delta_skip``; ``max_chain`` bounds delta chains
    (``CKPT_DELTA_MAX_CHAIN``, default 8: a full object at least every 8 saves of a chunk).
    """
    chunk_bytes = config.chunk_bytes()
    entries, stats = write_objects(
        store,
        plugins.codecs,
        tensors,
        pool=pool,
        chunk_bytes=chunk_bytes,
        parent=parent,
        parent_tensors=parent_tensors,
        delta=delta,
        max_chain=config.delta_max_chain() if max_chain is None else max_chain,
        delta_skip=delta_skip,
        on_tensor_written=on_tensor_written,
    )
    manifest = new_manifest(
        step=step,
        tree=json_tree,
        adapters=adapters,
        tensors=entries,
        parent=parent,
        raw_bytes=stats.raw_bytes,
        written_bytes=stats.written_bytes,
        chunk_bytes=chunk_bytes,
        plugins=plugins.versions(),
        meta=meta,
    )
    commit(store, manifest)
    info = dataclasses.replace(CheckpointInfo.from_manifest(manifest, store.url), write_stats=stats)
    plugins.after_commit(info=info)
    return info


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
    check_step(step)
    plugins = get_plugins()
    store = Store(url, storage_options)
    tree, adapters = capture(state, plugins)
    plugins.before_save(url=store.url, step=step, tree=tree)
    tensors: dict[str, torch.Tensor] = {}
    json_tree = treemod.encode(tree, tensors, set())
    parent = parent_for_save(store)
    with io_pool() as pool:
        return write_checkpoint(
            store, plugins, step=step, json_tree=json_tree, adapters=adapters, tensors=tensors, parent=parent, pool=pool
        )


# -- restore / load ------------------------------------------------------------------------


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


def restore_manifest(
    store: Store, plugins: Plugins, manifest: Manifest, state: MutableMapping[str, Any]
) -> CheckpointInfo:
    """Load ``manifest``'s checkpoint into ``state``'s live objects (see :func:`restore`)."""
    stored_tree = manifest.tree
    if not isinstance(stored_tree, dict):
        raise CheckpointError(f"checkpoint step {manifest.step} of {store.url} has no state mapping")
    missing = [k for k in state if k not in stored_tree]
    if missing:
        raise StateMismatchError(
            f"checkpoint step {manifest.step} of {store.url} has no {', '.join(map(repr, missing))}; "
            f"it holds {', '.join(map(repr, stored_tree))}"
        )
    from ckpt.state.dataloader import track_all

    track_all(state)  # a restored DataLoader must replay its position on the next iter()
    live_tree, live_adapters = capture(state, plugins)
    for path, name in live_adapters.items():
        saved = manifest.adapters.get(path)
        if saved != name:
            raise StateMismatchError(
                f"{path!r} was saved {'by adapter ' + repr(saved) if saved else 'as plain data'}, "
                f"but the live object needs adapter {name!r}"
            )
    live: dict[str, torch.Tensor] = {}
    for key in state:
        live_tensors(live_tree[key], treemod.escape(key), live)
    exact = [p for p, name in live_adapters.items() if getattr(plugins.adapters.get(name), "exact_tensors", False)]
    check_fits(manifest, live, list(state), exact)
    wanted = [p for key in state for p in treemod.tensor_paths(stored_tree[key])]
    tensors = read_tensors(store, plugins.codecs, ReadPlan.for_paths(manifest, wanted), destinations=live)
    for key in list(state):
        value = treemod.decode(stored_tree[key], lambda p, is_np: as_numpy(tensors[p], is_np), treemod.escape(key))
        state[key] = load_into(state[key], value, treemod.escape(key), plugins)
    info = CheckpointInfo.from_manifest(manifest, store.url)
    plugins.after_restore(info=info, state=state)
    return info


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
    tensors = read_tensors(store, plugins.codecs, ReadPlan.for_paths(manifest, treemod.tensor_paths(manifest.tree)))

    def leaf(path: str, is_numpy: bool) -> Any:
        # NumPy arrays live in host memory whatever map_location says
        t = tensors[path]
        if is_numpy:
            return t.numpy()
        return t if map_location is None or str(map_location) == "cpu" else t.to(map_location)

    return treemod.decode(manifest.tree, leaf)


# -- inspection ------------------------------------------------------------------------------


def steps(url: str, storage_options: dict[str, Any] | None = None) -> list[int]:
    """Steps of every committed checkpoint in the store at ``url``, ascending."""
    return Store(url, storage_options).steps()


def latest_step(url: str, storage_options: dict[str, Any] | None = None) -> int | None:
    """The newest committed step of the store at ``url`` (None when it holds none)."""
    return Store(url, storage_options).latest_step()


def read_manifest(url: str, step: int | None = None, storage_options: dict[str, Any] | None = None) -> Manifest:
    """The validated manifest of checkpoint ``step`` (newest when None): what it holds and how it is stored.

    Reads no tensor data. See :class:`ckpt.Manifest` for the fields.
    """
    if step is not None:
        check_step(step)
    return load_manifest(Store(url, storage_options), step)
