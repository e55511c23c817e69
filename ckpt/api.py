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
from ckpt.errors import CheckpointError
from ckpt.hooks.manager import Plugins, get_plugins
from ckpt.io.plan import ReadPlan
from ckpt.io.reader import read_tensors
from ckpt.io.writer import write_objects
from ckpt.security.envelope import before_write, open_store
from ckpt.security.keys import Encryption
from ckpt.snapshot.executor import io_pool
from ckpt.state import tree as treemod
from ckpt.state.capture import capture
from ckpt.state.placement import DEFAULT_LOCATION, placer
from ckpt.state.restore import as_mapping, gc_paused, restore_latest, restore_manifest
from ckpt.storage.commit import commit, latest_for_save, load_manifest, new_manifest, next_seq, process_run_id
from ckpt.storage.manifest import Manifest, check_step
from ckpt.storage.store import Store
from ckpt.storage.writer_lease import WriterLease
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
    seq: int | None = None,
    run: str | None = None,
    classes: Mapping[str, str] | None = None,
    devices: Mapping[str, str] | None = None,
    lease: WriterLease | None = None,
) -> CheckpointInfo:
    """Write objects, then the manifest, then the ref: the one save path of ckpt.

    See :func:`ckpt.io.writer.write_objects` for ``tensors``, ``on_tensor_written``,
    ``parent_tensors``, ``delta`` and ``delta_skip``; ``max_chain`` bounds delta chains
    (``CKPT_DELTA_MAX_CHAIN``, default 8: a full object at least every 8 saves of a chunk).
    ``parent`` is the checkpoint this one continues from; ``seq`` its commit sequence (default:
    one more than the store's highest) and ``run`` the writer's id (default: this process's).
    """
    chunk_bytes = config.chunk_bytes()
    before_write(store)  # an encrypted store's descriptor goes first; plain into encrypted is refused
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
    if seq is None:
        seq = next_seq(store)
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
        seq=seq,
        run=process_run_id() if run is None else run,
        classes=classes,
        devices=devices,
    )
    if lease is not None:
        lease.check()  # a writer that lost the store meanwhile must not commit over the new one
    manifest = commit(store, manifest, written_bytes=stats.written_bytes)
    info = dataclasses.replace(CheckpointInfo.from_manifest(manifest, store.url), write_stats=stats)
    plugins.after_commit(info=info)
    return info


def save(
    url: str,
    state: Any,
    *,
    step: int,
    storage_options: dict[str, Any] | None = None,
    encryption: Encryption | None = None,
) -> CheckpointInfo:
    """Save ``state`` as checkpoint ``step`` of the store at ``url``; returns after the commit.

    ``state`` maps names to live objects, tensors and plain values; one object an adapter
    handles (a module, an optimizer...) may be passed on its own: it is saved under the
    key ``"state"`` (``ckpt.state.restore.SINGLE_KEY``) and ``restore(url, obj)`` takes it back.

    The checkpoint continues from the store's latest (its parent): chunks that one stored
    are referenced, not written again. Saving a step that exists replaces it atomically
    (logged).

    Under an initialized ``torch.distributed`` default group of several ranks, every rank
    calls it with its own state: a collective save (:mod:`ckpt.distributed.coordinator`).

    ``encryption`` (a :class:`ckpt.Encryption`) encrypts the store: objects and manifests
    (AES-256-GCM, see :mod:`ckpt.security`). A store is encrypted from its first save on, or
    never: mixing is refused, and so is a wrong key.
    """
    check_step(step)
    if _distributed():
        from ckpt.distributed.coordinator import save as collective_save

        return collective_save(url, state, step=step, storage_options=storage_options, encryption=encryption)
    plugins = get_plugins()
    store = Store(url, storage_options)
    open_store(store, encryption, create=True)
    classes: dict[str, str] = {}
    tree, adapters = capture(as_mapping(state, plugins)[0], plugins, classes)
    plugins.before_save(url=store.url, step=step, tree=tree)
    tensors: dict[str, torch.Tensor] = {}
    json_tree = treemod.encode(tree, tensors, set())
    return save_tree(
        store,
        plugins,
        step=step,
        json_tree=json_tree,
        adapters=adapters,
        tensors=tensors,
        classes=classes,
        devices=devices_of(tensors),
    )


def devices_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Where each tensor lives, for those not on the CPU (recorded for ``map_location``)."""
    return {p: str(t.device) for p, t in tensors.items() if t.device.type != "cpu"}


def save_tree(
    store: Store,
    plugins: Plugins,
    *,
    step: int,
    json_tree: Any,
    adapters: Mapping[str, str],
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    what: str = "ckpt.save",
    meta: Mapping[str, Any] | None = None,
    on_tensor_written: Callable[[str], None] | None = None,
    classes: Mapping[str, str] | None = None,
    devices: Mapping[str, str] | None = None,
) -> CheckpointInfo:
    """One synchronous save of an encoded tree: take the writer lease (``what`` names the
    writer in a refusal), continue from the store's latest, write, commit, release."""
    with WriterLease(store, what=what) as lease, io_pool() as pool:
        latest = latest_for_save(store)
        lease.saving(step, latest.manifest)
        return write_checkpoint(
            store,
            plugins,
            step=step,
            json_tree=json_tree,
            adapters=adapters,
            tensors=tensors,
            parent=latest.manifest,
            pool=pool,
            meta=meta,
            on_tensor_written=on_tensor_written,
            seq=latest.top_seq + 1,
            classes=classes,
            devices=devices,
            lease=lease,
        )


# -- restore / load ------------------------------------------------------------------------


def restore(
    url: str,
    state: Any,
    *,
    step: int | None = None,
    strict: bool = True,
    map_location: Any = None,
    storage_options: dict[str, Any] | None = None,
    encryption: Encryption | None = None,
) -> CheckpointInfo:
    """Load checkpoint ``step`` (the newest when None) into the live objects of ``state``.

    All or nothing: every object is read, decoded and verified, and every value checked
    against its live object, before the first live object changes. A checkpoint that
    does not fit, or whose data fails verification, raises and leaves ``state`` as it
    was; without ``step`` a damaged newest checkpoint is skipped for the newest intact
    one (logged). Plain values (ints, lists...) in ``state`` are replaced.

    ``state`` is a mapping of names to live objects, or one object an adapter handles
    (saved with ``save(url, obj, step=...)``). With ``strict`` (the default) every key of
    ``state`` and every tensor of a live module must be in the checkpoint; with
    ``strict=False`` what matches is loaded and ``info.missing_keys`` /
    ``info.unexpected_keys`` say what did not (as ``load_state_dict`` does). Keys only in
    the checkpoint are not read. ``map_location`` (as ``torch.load`` takes it) places the
    decoded tensors before the adapters load them; a device this machine lacks is an
    error before any data is read.

    Under an initialized ``torch.distributed`` default group of several ranks it is
    collective (:mod:`ckpt.distributed.restore`): DTensors resharded to the live layout.

    An encrypted store needs its ``encryption`` (a missing or wrong key is an
    :class:`ckpt.EncryptionError` before any data is read).
    """
    if _distributed():
        from ckpt.distributed.restore import restore as collective_restore

        return collective_restore(
            url,
            state,
            step=step,
            strict=strict,
            map_location=map_location,
            storage_options=storage_options,
            encryption=encryption,
        )
    plugins = get_plugins()
    place = placer(map_location)
    live, _ = as_mapping(state, plugins)
    store = Store(url, storage_options)
    open_store(store, encryption)
    if not isinstance(live, MutableMapping):
        raise CheckpointError(
            f"restore needs a mutable mapping (plain values in it are replaced), got {type(live).__name__}"
        )
    target = live
    with gc_paused():
        if step is not None:
            return restore_manifest(store, plugins, load_manifest(store, step), target, strict=strict, place=place)
        return restore_latest(store, plugins, target, strict=strict, place=place)[0]


def load(
    url: str,
    *,
    step: int | None = None,
    keys: Iterable[str] | None = None,
    map_location: Any = "cpu",
    storage_options: dict[str, Any] | None = None,
    rank: int = 0,
    encryption: Encryption | None = None,
) -> dict[str, Any]:
    """Read checkpoint ``step`` (newest when None) as a plain tree of fresh tensors.

    Modules come back as their state-dict mapping, optimizers as their state-dict
    structure; no live object is needed and no code from storage runs. ``keys`` reads
    only those top-level entries (``keys=["model"]``: no optimizer bytes are read).
    ``map_location`` is taken as ``torch.load`` takes it (a device, a dict of saved to
    new locations, or a callable); NumPy arrays stay in host memory.

    A checkpoint of a collective save comes back as full tensors (shards put together)
    with the per-rank values of ``rank`` (see :func:`ckpt.distributed.sharding.rank_view`);
    it never communicates. ``encryption``: as :func:`restore` takes it.
    """
    from ckpt.distributed.sharding import rank_view

    plugins = get_plugins()
    place = placer(map_location)
    store = Store(url, storage_options)
    open_store(store, encryption)
    manifest = rank_view(load_manifest(store, step), rank)
    tree = manifest.tree
    if keys is not None:
        if not isinstance(tree, dict):
            raise CheckpointError(f"checkpoint step {manifest.step} of {store.url} has no state mapping")
        keys = list(keys)
        unknown = [k for k in keys if k not in tree]
        if unknown:
            raise CheckpointError(
                f"checkpoint step {manifest.step} of {store.url} has no {', '.join(map(repr, unknown))}; "
                f"it holds {', '.join(map(repr, tree))}"
            )
        tree = {k: tree[k] for k in keys}
    tensors = read_tensors(store, plugins.codecs, ReadPlan.for_paths(manifest, treemod.tensor_paths(tree)))

    def leaf(path: str, is_numpy: bool) -> Any:
        t = tensors[path]
        if is_numpy:
            return t.numpy()
        return t if place is None else place(t, manifest.devices.get(path, DEFAULT_LOCATION))

    return treemod.decode(tree, leaf)


def _distributed() -> bool:
    """Whether this process is one rank of several of an initialized default group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# -- inspection ------------------------------------------------------------------------------


def steps(url: str, storage_options: dict[str, Any] | None = None) -> list[int]:
    """Steps of every committed checkpoint in the store at ``url``, ascending."""
    return Store(url, storage_options).steps()


def latest_step(
    url: str, storage_options: dict[str, Any] | None = None, encryption: Encryption | None = None
) -> int | None:
    """The latest committed step of the store at ``url`` (None when it holds none): the one its
    writer committed last, so after a rollback (restore 20 of 30, save 21) 21, not 30."""
    store = Store(url, storage_options)
    open_store(store, encryption)
    return store.latest_step()


def read_manifest(
    url: str,
    step: int | None = None,
    storage_options: dict[str, Any] | None = None,
    encryption: Encryption | None = None,
) -> Manifest:
    """The validated manifest of checkpoint ``step`` (newest when None): what it holds and how it is stored.

    Reads no tensor data. See :class:`ckpt.Manifest` for the fields.
    """
    if step is not None:
        check_step(step)
    store = Store(url, storage_options)
    open_store(store, encryption)
    return load_manifest(store, step)
