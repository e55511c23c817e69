"""Retention and garbage collection: which checkpoints to keep, and sweeping what they no longer need.

Retention picks the steps to keep: the newest ``keep_last``, every step divisible by
``keep_every``, the steps named in ``protect``, every step held by an unexpired
:class:`Lease`, and always the newest step. The manifests of the other steps are deleted.

Collection is mark-and-sweep: every object named by a retained manifest is marked,
following delta parents recursively through the codec parameters (see
:func:`ckpt.codecs.delta.referenced_keys`); every unmarked object is deleted, except objects
younger than the grace period (``CKPT_GC_GRACE_SECONDS``, 15 min): those may belong to a
save still in flight, whose manifest does not exist yet. A save must therefore finish
within the grace period.

Nothing is deleted when a retained manifest cannot be read: GC cannot know what it needs.

Leases (:mod:`ckpt.storage.leases`) keep the checkpoint a live run resumed from (or
depends on) alive.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ckpt import config
from ckpt.codecs.delta import referenced_keys
from ckpt.errors import CheckpointError, CorruptCheckpointError
from ckpt.storage.leases import delete_if_expired, lease_files, live_leases
from ckpt.storage.manifest import Manifest
from ckpt.storage.store import Store

log = logging.getLogger("ckpt")

#: ``progress(phase, done, total)``; phases: ``"mark"`` (manifests read), ``"sweep"`` (objects checked)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class GCResult:
    """What a collection kept and removed (or, with ``dry_run``, would remove)."""

    kept_steps: tuple[int, ...]
    removed_steps: tuple[int, ...]
    removed_objects: int
    #: bytes of the removed objects and manifests
    freed_bytes: int
    dry_run: bool


# -- retention ----------------------------------------------------------------------------


def retained_steps(
    steps: Iterable[int],
    *,
    keep_last: int | None,
    keep_every: int | None = None,
    protect: Iterable[int] = (),
) -> set[int]:
    """The steps a policy keeps. With neither ``keep_last`` nor ``keep_every``, all of them."""
    steps = sorted(set(steps))
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise CheckpointError(
            f"keep_last must be an int >= 1 (the newest checkpoint is always kept), got {keep_last!r}"
        )
    if keep_every is not None and (isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1):
        raise CheckpointError(f"keep_every must be an int >= 1, got {keep_every!r}")
    if keep_last is None and keep_every is None:
        return set(steps)
    keep = set(steps[-keep_last:]) if keep_last else set()
    if keep_every:
        keep.update(s for s in steps if s % keep_every == 0)
    keep.update(s for s in protect if s in steps)
    if steps:
        keep.add(steps[-1])
    return keep


# -- mark and sweep -----------------------------------------------------------------------


def marked_keys(store: Store, steps: Iterable[int], progress: Progress | None = None) -> set[str]:
    """Every object key the manifests of ``steps`` need, delta parents included."""
    steps = list(steps)
    marked: set[str] = set()
    for i, step in enumerate(steps):
        where = f"{store.url} step {step}"
        try:
            manifest = Manifest.from_json_bytes(store.read_manifest(step), where=where)
        except CheckpointError as exc:
            raise CorruptCheckpointError(
                f"garbage collection stopped, nothing deleted: retained checkpoint {where} is unreadable ({exc})"
            ) from None
        for ref in manifest.chunk_refs():
            marked.update(referenced_keys(ref.to_json()))
        if progress is not None:
            progress("mark", i + 1, len(steps))
    return marked


def _object_mtime(store: Store, key: str) -> float | None:
    try:
        info = store.fs.info(store.object_path(key))
    except FileNotFoundError:
        return None
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return float(mtime) if mtime is not None else None


def _gc(
    store: Store,
    *,
    keep_last: int | None,
    keep_every: int | None,
    protect: Iterable[int],
    grace_seconds: float | None,
    dry_run: bool,
    progress: Progress | None,
) -> GCResult:
    grace = config.gc_grace_seconds() if grace_seconds is None else float(grace_seconds)
    if grace < 0:
        raise CheckpointError(f"grace_seconds must be >= 0, got {grace_seconds!r}")
    started = time.time()
    if not store.local:
        store.fs.invalidate_cache()  # a listing cached by the filesystem object would be stale
    steps = store.steps()
    leases = live_leases(store, now=started)
    keep = retained_steps(steps, keep_last=keep_last, keep_every=keep_every, protect=[*protect, *leases.values()])
    removed_steps = [s for s in steps if s not in keep]
    marked = marked_keys(store, sorted(keep), progress)

    freed = 0
    for step in removed_steps:
        try:
            freed += len(store.read_manifest(step))
        except CheckpointError:
            pass
    if not dry_run:
        # Manifests first: a checkpoint disappears whole before any object it needs does.
        for step in removed_steps:
            store.delete_manifest(step)
        if removed_steps:
            store.sync_dirs()
            store.latest_step(repair=True)

    # Objects written after `cutoff` may belong to a save in flight: never swept. Object
    # stores report LastModified to the second (rounded down): one more second of margin,
    # unless the caller said no save is in flight (grace 0).
    cutoff = started - grace - (1.0 if grace > 0 and not store.local else 0.0)
    candidates = [o for o in store.list_objects() if o.key not in marked]
    removed_objects = 0
    for i, obj in enumerate(candidates):
        if obj.mtime is None or obj.mtime > cutoff:
            pass  # unknown age counts as young
        elif dry_run:
            removed_objects += 1
            freed += obj.size
        else:
            # Re-check right before deleting: a save may have just rewritten this key.
            mtime = _object_mtime(store, obj.key)
            if mtime is not None and mtime <= cutoff:
                store.delete(store.object_path(obj.key))
                removed_objects += 1
                freed += obj.size
        if progress is not None:
            progress("sweep", i + 1, len(candidates))

    if not dry_run:
        for path in set(lease_files(store)) - set(leases):
            delete_if_expired(store, path, started)
    result = GCResult(
        kept_steps=tuple(sorted(keep)),
        removed_steps=tuple(removed_steps),
        removed_objects=removed_objects,
        freed_bytes=freed,
        dry_run=dry_run,
    )
    log.info(
        "gc of %s: kept %d checkpoints, %s %d checkpoints and %d objects (%d bytes)",
        store.url,
        len(keep),
        "would remove" if dry_run else "removed",
        len(removed_steps),
        removed_objects,
        freed,
    )
    return result


def collect(
    url: str,
    *,
    keep_last: int | None = None,
    keep_every: int | None = None,
    dry_run: bool = False,
    grace_seconds: float | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> GCResult:
    """Apply a retention policy to the store at ``url`` and sweep unreferenced objects.

    :param keep_last: keep the newest N checkpoints (N >= 1).
    :param keep_every: also keep every checkpoint whose step is divisible by M.
        With neither, every checkpoint is kept and only orphaned objects are swept
        (objects of crashed saves, of checkpoints deleted by hand).
    :param dry_run: report what would be removed; delete nothing.
    :param grace_seconds: objects younger than this are never deleted
        (default ``CKPT_GC_GRACE_SECONDS``, 900).
    :param progress: ``progress(phase, done, total)`` with phase ``"mark"`` or ``"sweep"``.
    """
    store = Store(url, storage_options)
    return _gc(
        store,
        keep_last=keep_last,
        keep_every=keep_every,
        protect=(),
        grace_seconds=grace_seconds,
        dry_run=dry_run,
        progress=progress,
    )


def prune(
    store: Store,
    *,
    keep_last: int | None,
    keep_every: int | None = None,
    protect: Iterable[int] = (),
    grace_seconds: float | None = None,
) -> GCResult:
    """:func:`collect` on an open store, keeping the steps in ``protect`` as well (for Checkpointer)."""
    return _gc(
        store,
        keep_last=keep_last,
        keep_every=keep_every,
        protect=tuple(protect),
        grace_seconds=grace_seconds,
        dry_run=False,
        progress=None,
    )
