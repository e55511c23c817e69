"""Loading a checkpoint into live objects, all or nothing.

Every object is verified, and every value is checked against its live object (shapes and
dtypes against the manifest, the rest by each adapter's optional ``check``), before the
first live object changes. Only then do the adapters load, so a damaged checkpoint or one
that does not fit leaves the live objects exactly as they were. An object is verified by
decoding it into fresh host memory, or, on local disk, by hashing its stored bytes and
decoding it afterwards straight into its live tensor (see :func:`prepare_restore`).
Restoring "the latest" may instead fall back to the newest intact checkpoint, which is
then restored completely.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from ckpt.distributed.sharding import rank_view
from ckpt.errors import CheckpointError, CorruptCheckpointError, StateMismatchError
from ckpt.hooks.manager import Plugins
from ckpt.state import tree as treemod
from ckpt.state.capture import as_numpy, capture, check_into, live_tensors, load_into, qualified_name
from ckpt.state.dataloader import track_all, untracked_if_refused
from ckpt.state.in_place import InPlace, decode_in_place, read_verified
from ckpt.state.placement import DEFAULT_LOCATION, Placer
from ckpt.storage.commit import load_manifest
from ckpt.storage.lineage import read_lineage
from ckpt.storage.manifest import Manifest
from ckpt.storage.store import Store
from ckpt.types import CheckpointInfo

log = logging.getLogger("ckpt")

#: the key a single stateful object is saved under when ``save`` is given it instead of a mapping
SINGLE_KEY = "state"


def as_mapping(state: Any, plugins: Plugins) -> tuple[Mapping[str, Any], bool]:
    """``state`` as a mapping of names to objects, and whether it was one object on its own.

    A lone module, optimizer or other object an adapter handles stands for
    ``{SINGLE_KEY: obj}``, so ``ckpt.save(url, model, step=n)`` and
    ``ckpt.restore(url, model)`` work without a dict.
    """
    if isinstance(state, Mapping):
        return state, False
    if plugins.adapters.for_object(state) is not None:
        return {SINGLE_KEY: state}, True
    raise CheckpointError(
        f"state must be a mapping of names to objects, or one object an adapter handles; got {type(state).__name__}"
    )


_gc_lock = threading.Lock()
_gc_pause = {"depth": 0, "was_enabled": True}


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration (reference counting still
    frees what a restore drops), then as it was before; nested and concurrent pauses end
    with the last.

    A full collection walks every object of the process holding the GIL, and a restore
    allocates enough (a remote tier's client imports its SDK meanwhile) to set one off:
    on this project's machine one took 0.11 s of a 0.75 s local-tier restart, stopping
    the threads reading the checkpoint (0.63-0.74 s without collections against 0.77-0.89 s,
    three alternated runs each).
    """
    with _gc_lock:
        if _gc_pause["depth"] == 0:
            _gc_pause["was_enabled"] = gc.isenabled()
            gc.disable()
        _gc_pause["depth"] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pause["depth"] -= 1
            if _gc_pause["depth"] == 0 and _gc_pause["was_enabled"]:
                gc.enable()


def _dotted(path: str) -> str:
    return ".".join(treemod.unescape(p) for p in path.split("/"))


def restore_manifest(
    store: Store,
    plugins: Plugins,
    manifest: Manifest,
    state: MutableMapping[str, Any],
    *,
    strict: bool = True,
    place: Placer | None = None,
) -> CheckpointInfo:
    """Load ``manifest``'s checkpoint into ``state``'s live objects (see ``ckpt.restore``)."""
    return apply_restore(prepare_restore(store, plugins, manifest, state, strict=strict, place=place))


@dataclass
class Prepared:
    """A checkpoint read, verified and checked against the live objects, not loaded yet."""

    store_url: str
    plugins: Plugins
    manifest: Manifest
    state: MutableMapping[str, Any]
    values: dict[str, Any]
    missing: list[str]
    unexpected: list[str]
    strict: bool
    in_place: InPlace | None = None


def prepare_restore(
    store: Store,
    plugins: Plugins,
    manifest: Manifest,
    state: MutableMapping[str, Any],
    *,
    strict: bool = True,
    place: Placer | None = None,
    in_place: bool | None = None,
) -> Prepared:
    """The first half of :func:`restore_manifest`: everything read and checked, nothing live changed.

    ``in_place`` (default: when ``store`` is on local disk, where a second read of an object
    costs a copy from the page cache, not a transfer): tensors whose objects reading alone
    verifies (raw ones, and encoded ones whose manifest records the hash of their stored
    bytes, a delta's parents too; see :func:`ckpt.io.verify.stored_digests`) and whose live tensor is contiguous CPU
    memory are verified here by streaming their objects through a small buffer, and decoded
    by :func:`apply_restore` straight into the live tensors, where they are verified once
    more. No fresh memory the size of the state is needed, nor a copy of it into the live
    tensors. A damaged object is found here, before anything live changes; only an object
    rewritten between the two reads (by someone who can write the store), or a manifest
    forged to record stored bytes that do not decode to its content, is found after the
    live tensors changed: that raises a CorruptCheckpointError saying so.
    """
    values, missing, unexpected, deferred = _prepare(
        store, plugins, manifest, state, strict=strict, place=place, in_place=in_place
    )
    return Prepared(store.url, plugins, manifest, state, values, missing, unexpected, strict, deferred)


def apply_restore(prepared: Prepared, *, hooks: bool = True) -> CheckpointInfo:
    """The second half of :func:`restore_manifest`: the live objects take the prepared values.

    ``hooks=False`` leaves the ``ckpt_after_restore`` hooks to the caller (the tiers load a
    local checkpoint early and may restore another over it: the hooks run once, for the
    checkpoint the live objects end up holding)."""
    state, plugins, strict = prepared.state, prepared.plugins, prepared.strict
    if prepared.in_place is not None:  # verified already: now into the live tensors, verified again
        decode_in_place(prepared.in_place, plugins.codecs)
    # Everything is read, verified and checked: from here on only loads that fit.
    loaded: list[str] = []
    try:
        for key, value in prepared.values.items():
            state[key] = load_into(state[key], value, treemod.escape(key), plugins, strict=strict)
            loaded.append(key)
    except CheckpointError as exc:
        changed = [*(["the tensors decoded in place"] if prepared.in_place is not None else []), *map(repr, loaded)]
        if not changed:
            raise
        # (an adapter whose check() let through what its load() refuses)
        said = (
            f"{exc} (after the live objects began to take step {prepared.manifest.step}: "
            f"{', '.join(changed[:6])} may hold it already; restore another checkpoint)"
        )
        try:
            reworded = type(exc)(said)
        except Exception:  # noqa: BLE001 - a plugin's error class built otherwise: the nearest of ckpt's
            reworded = (StateMismatchError if isinstance(exc, StateMismatchError) else CheckpointError)(said)
        raise reworded from exc
    info = CheckpointInfo.from_manifest(prepared.manifest, prepared.store_url)
    if not strict:
        info = info.with_keys(missing=prepared.missing, unexpected=prepared.unexpected)
    if hooks:
        plugins.after_restore(info=info, state=state)
    return info


def restore_latest(
    store: Store,
    plugins: Plugins,
    state: MutableMapping[str, Any],
    *,
    strict: bool = True,
    place: Placer | None = None,
) -> tuple[CheckpointInfo, Manifest]:
    """Restore the newest checkpoint whose data is intact; returns it and its manifest.

    A newest checkpoint whose objects are missing or corrupt is skipped for the one before
    it, with a warning naming what was skipped: nothing live changed, so the fallback is a
    clean restore of the older checkpoint. A misfit (the live objects cannot take it) is
    not skipped: an older checkpoint of the same run would not fit either.
    """
    manifest = load_manifest(store, None)
    skipped: list[str] = []
    while True:
        try:
            info = restore_manifest(store, plugins, manifest, state, strict=strict, place=place)
            break
        except CorruptCheckpointError as exc:
            skipped.append(f"step {manifest.step} ({exc})")
            manifest = _older_intact(store, manifest.step, skipped, exc)
    if skipped:
        log.warning("restored step %d of %s after skipping %s", manifest.step, store.url, "; ".join(skipped))
    return info, manifest


def _older_intact(store: Store, step: int, skipped: list[str], exc: CorruptCheckpointError) -> Manifest:
    """The newest readable checkpoint ``step`` continues from (its lineage, never an
    abandoned step); re-raises ``exc`` when there is none."""
    lineage, manifests = read_lineage(store)
    for older in lineage.before(step):
        if older in manifests:
            log.warning("restoring %s: %s is damaged; trying step %d", store.url, skipped[-1], older)
            return manifests[older]
    raise exc


def _prepare(
    store: Store,
    plugins: Plugins,
    manifest: Manifest,
    state: Mapping[str, Any],
    *,
    strict: bool,
    place: Placer | None,
    in_place: bool | None = None,
) -> tuple[dict[str, Any], list[str], list[str], InPlace | None]:
    """The values ``state``'s keys take from ``manifest`` (read, verified and checked against
    the live objects, nothing live changed yet), the missing and unexpected keys, and the
    tensors :func:`apply_restore` reads in place (see :func:`prepare_restore`)."""
    manifest = rank_view(manifest, 0)  # a collective save's checkpoint in one process: rank 0's values
    refused: set[str] = set()
    with untracked_if_refused() as tracked:  # refused: nothing live changed, loaders included
        keys, live, wanted, missing, unexpected = fit_live(
            store, plugins, manifest, state, strict=strict, not_in_place=refused, tracked=tracked
        )
        in_place = (store.local if in_place is None else in_place) and place is None
        tensors, later = read_verified(store, plugins.codecs, manifest, live, wanted, refused, in_place=in_place)
        if place is not None:
            tensors = {p: place(t, manifest.devices.get(p, DEFAULT_LOCATION)) for p, t in tensors.items()}
        if later is not None:
            tensors.update(later.values())
        values = decode_values(manifest, state, keys, tensors, plugins, strict=strict)
    return values, missing, unexpected, later


def fit_live(
    store: Store,
    plugins: Plugins,
    manifest: Manifest,
    state: Mapping[str, Any],
    *,
    strict: bool,
    not_in_place: set[str] | None = None,
    tracked: list[Any] | None = None,
) -> tuple[list[str], dict[str, torch.Tensor], list[str], list[str], list[str]]:
    """Check ``state``'s live objects against ``manifest`` before anything is read: the keys
    restored, the live tensors by path, the stored tensor paths to read, and the missing and
    unexpected keys (shared by the one-process and the collective restore).

    ``not_in_place`` receives the live tensors a restore must not decode into (see
    :func:`prepare_restore`): NumPy arrays, which a restore replaces, never writes (one may
    be read-only, a memory map, or held elsewhere), and the tensors of objects whose
    adapter's ``check`` may read their values (it must see the checkpoint's, not the live
    ones the decode overwrites after it: see ``checks_tensor_values`` in
    :class:`ckpt.state.adapters.Adapter`). ``tracked`` receives the DataLoaders tracked for
    this restore, for the caller to untrack when it refuses the checkpoint later
    (:func:`~ckpt.state.dataloader.untracked_if_refused`)."""
    stored_tree = manifest.tree
    if not isinstance(stored_tree, dict):
        raise CheckpointError(f"checkpoint step {manifest.step} of {store.url} has no state mapping")
    absent = [k for k in state if k not in stored_tree]
    if absent and strict:
        raise StateMismatchError(
            f"checkpoint step {manifest.step} of {store.url} has no {', '.join(map(repr, absent))}; "
            f"it holds {', '.join(map(repr, stored_tree))} (restore with strict=False to load what matches)"
        )
    keys = [k for k in state if k in stored_tree]
    # a restored DataLoader must replay its position on the next iter(); one tracked for this
    # restore alone is untracked again if it is refused (here, or by the caller: ``tracked``)
    with untracked_if_refused() as newly:
        newly.extend(track_all({k: state[k] for k in keys}))
        if tracked is not None:
            tracked.extend(newly)
        live_tree, live_adapters = capture({k: state[k] for k in keys}, plugins)
        for path, name in live_adapters.items():
            saved = manifest.adapters.get(path)
            if saved != name:
                raise StateMismatchError(
                    f"{path!r} was saved {'by adapter ' + repr(saved) if saved else 'as plain data'}, "
                    f"but the live object needs adapter {name!r}"
                )
            _check_class(manifest, path, state, plugins, name)
        live: dict[str, torch.Tensor] = {}
        for key in keys:
            live_tensors(live_tree[key], treemod.escape(key), live, not_in_place)
        if not_in_place is not None:
            valued = [p for p, name in live_adapters.items() if _checks_values(plugins.adapters.get(name))]
            not_in_place.update(p for p in live for a in valued if p == a or p.startswith(a + "/"))
        exact = [p for p, name in live_adapters.items() if getattr(plugins.adapters.get(name), "exact_tensors", False)]
        missing, unexpected = _fit(manifest, live, exact, strict)
        missing = [*map(str, absent), *missing]
        wanted = [p for key in keys for p in treemod.tensor_paths(stored_tree[key])]
        return keys, live, wanted, missing, unexpected


def _checks_values(adapter: Any) -> bool:
    """Whether ``adapter``'s optional ``check`` may read the values of the tensors it is given."""
    return getattr(adapter, "check", None) is not None and getattr(adapter, "checks_tensor_values", True)


def decode_values(
    manifest: Manifest,
    state: Mapping[str, Any],
    keys: list[str],
    tensors: Mapping[str, torch.Tensor],
    plugins: Plugins,
    *,
    strict: bool,
) -> dict[str, Any]:
    """The values of ``keys`` decoded from ``manifest`` with ``tensors``, each checked against its live object."""
    values = {}
    for key in keys:
        path = treemod.escape(key)
        values[key] = treemod.decode(manifest.tree[key], lambda p, is_np: as_numpy(tensors[p], is_np), path)
        check_into(state[key], values[key], path, plugins, strict=strict)
    return values


def _check_class(manifest: Manifest, path: str, state: Mapping[str, Any], plugins: Plugins, name: str) -> None:
    """An adapter with ``exact_class`` (optimizers, schedulers) refuses another class's state."""
    adapter = plugins.adapters.get(name)
    saved = getattr(manifest, "classes", {}).get(path)
    if saved is None or not getattr(adapter, "exact_class", False):
        return
    obj = _resolve(state, path)
    live = qualified_name(type(obj))
    if saved != live:
        raise StateMismatchError(f"{path!r} was saved from a {saved}; the live object is a {live}")


def _resolve(state: Mapping[str, Any], path: str) -> Any:
    """The live object at a tree path of ``state`` (escaped keys joined by ``/``)."""
    node: Any = state
    for part in path.split("/"):
        key = treemod.unescape(part)
        if isinstance(node, Mapping):
            node = node[next(k for k in node if str(k) == key)]
        else:
            node = node[int(key)]
    return node


def _fit(
    manifest: Manifest, live: Mapping[str, torch.Tensor], exact: list[str], strict: bool
) -> tuple[list[str], list[str]]:
    """Check the live tensors against the checkpoint before anything is read.

    Shapes and dtypes must agree. A tensor only on one side is an error when ``strict``;
    otherwise it is reported: live tensors the checkpoint lacks are *missing*, tensors the
    checkpoint holds under an exact-tensors object (a module) that it lacks are *unexpected*.
    """
    unexpected = [
        p for prefix in exact for p in manifest.tensors if (p == prefix or p.startswith(prefix + "/")) and p not in live
    ]
    missing = [p for p in live if p not in manifest.tensors]
    if strict and (unexpected or missing):
        if unexpected:
            where = next(pre for pre in exact if unexpected[0] == pre or unexpected[0].startswith(pre + "/"))
            problem = f"tensor {unexpected[0]!r} (and {len(unexpected) - 1} more) is in checkpoint step {manifest.step} but not in the live object at {where!r}"
        else:
            problem = f"tensor {missing[0]!r} (and {len(missing) - 1} more) is in the live state but not in checkpoint step {manifest.step}"
        raise StateMismatchError(
            problem + _compile_hint(manifest, live) + " (restore with strict=False to load what matches)"
        )
    for path, t in live.items():
        entry = manifest.tensors.get(path)
        if entry is None:
            continue
        dtype = str(t.dtype).removeprefix("torch.")
        if tuple(t.shape) != entry.shape or dtype != entry.dtype:
            raise StateMismatchError(
                f"tensor {path!r}: checkpoint has {entry.dtype}{list(entry.shape)}, live object has {dtype}{list(t.shape)}"
            )
    return [_dotted(p) for p in missing], [_dotted(p) for p in unexpected]


def _compile_hint(manifest: Manifest, live: Mapping[str, torch.Tensor]) -> str:
    stored = any("/_orig_mod." in p for p in manifest.tensors)
    living = any("/_orig_mod." in p for p in live)
    if stored != living:
        return (
            "; the checkpoint's module keys carry torch.compile's '_orig_mod.' prefix"
            if stored
            else "; the live module's keys carry torch.compile's '_orig_mod.' prefix"
        ) + " (ckpt saves compiled modules without it: re-save, or restore into the matching module)"
    return ""
