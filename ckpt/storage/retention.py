"""Retention and garbage collection: which checkpoints to keep, and sweeping what they no longer need.

**Retention** ranks the committed steps by what it keeps first (:func:`ranked_steps`, newest
first) and keeps the first ``keep_last``, every step divisible by ``keep_every``, the steps
named in ``protect``, every step a live lease holds (:mod:`ckpt.storage.leases`), and always
the first. The manifests of the other steps are deleted.

**Collection** is mark-and-sweep: every object named by a retained manifest is marked,
following delta parents through the codec parameters (:func:`ckpt.codecs.delta.referenced_keys`);
unmarked objects are deleted, except those younger than the grace period
(``CKPT_GC_GRACE_SECONDS``, 15 min), which may belong to a save without a lease still in
flight, and those written since a live writer's save in flight began. Nothing is deleted
when a retained manifest cannot be read: GC cannot know what it needs.

**Prompt frees.** The store's writer itself prunes after each commit (``Checkpointer(keep_last=)``,
:func:`prune` with ``writer=``). No other process may write the store while it holds the
writer lease, so an object that only the pruned manifests reference can serve no save in
flight: it is deleted at once, whatever its age. Without that, two 30 MB checkpoints would
hold every save of the last 15 minutes.

**Why a committed checkpoint never references a swept object.** A save reuses objects of
its parent checkpoint P without rewriting them. The writer, in this order: (W) names P
and the step in flight in its lease (:meth:`WriterLease.saving`), (E) confirms that P's
manifest and every object it reuses are present, dropping from reuse whatever is not
(:func:`ckpt.io.writer.write_objects`), writes its new objects, and commits. GC, in this
order: lists the manifests (S1), reads the leases (L1), marks the retained and held
checkpoints, deletes the dropped manifests (D), then reads the leases (L2) and lists the
manifests (S2) again and marks every held checkpoint and every manifest new or changed
since S1, and only then sweeps. Take an object k that the save reuses from P and that GC
sweeps: k is unmarked and old, and present at E.

- If L2 came after W, GC saw P held: it marked P (k with it), or P's manifest was gone
  (deleted by this GC at D, or by another) and then GC sweeps nothing at all. If the
  writer released its lease before L2 (a ``ckpt.save`` that returned), its commit
  preceded L2, so S2 found its manifest and marked k.
- If L2 came before W, every deletion of a manifest by this GC came before E; P's
  manifest was present at E, so GC did not delete it: P was either retained and marked
  at S1, or committed after S1 and found by S2.

Objects the save writes are younger than its start, which the lease records: GC sweeps
nothing written since a live writer's save began (less ``CKPT_CLOCK_SKEW_SECONDS``), nor,
while any writer is live, since GC itself started. A ``grace_seconds`` of 0 with no live
writer asserts that no save starts during the collection. The argument holds for every
GC that honours leases (this one); an operator deleting files by hand, or a writer whose
lease was taken over, is outside it: the writer's presence check (E) still keeps a
checkpoint from citing an object already gone when its save began.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ckpt import config
from ckpt.codecs.delta import referenced_keys
from ckpt.errors import CheckpointError, CorruptCheckpointError, NoCheckpointError, StoreError
from ckpt.security.envelope import open_store
from ckpt.security.keys import Encryption
from ckpt.storage.leases import WRITER, LeaseRecord, delete_if_expired, lease_files, live_leases
from ckpt.storage.lineage import parse_manifest, read_lineage
from ckpt.storage.store import Store
from ckpt.storage.writer_lease import WriterLease

log = logging.getLogger("ckpt")

#: ``progress(phase, done, total)``; phases: ``"mark"`` (manifests read), ``"sweep"`` (objects checked)
Progress = Callable[[str, int, int], None]
#: object stores report modification times in whole seconds, rounded down
_MTIME_SLACK = 2.0


@dataclass(frozen=True)
class GCResult:
    """What a collection kept and removed (or, with ``dry_run``, would remove)."""

    kept_steps: tuple[int, ...]
    removed_steps: tuple[int, ...]
    removed_objects: int
    #: bytes of the removed objects and manifests
    freed_bytes: int
    dry_run: bool
    #: kept steps that a live lease holds (a writer's parent, a reader's checkpoint)
    held_steps: tuple[int, ...] = ()
    #: why no object was swept this time (None: the sweep ran)
    sweep_skipped: str | None = None


# -- retention ----------------------------------------------------------------------------


def ranked_steps(store: Store, steps: Iterable[int]) -> list[int]:
    """The committed ``steps`` of ``store`` (from one listing) in the order retention keeps them:
    the newest first, so ``keep_last=N`` keeps the first N and the first is always kept.

    The one place that decides what "newest" means for retention: the store's lineage
    (:mod:`ckpt.storage.lineage`): the latest commit, the checkpoints it continues from,
    then abandoned ones (a rollback left them behind), so a rollback's new steps are never
    pruned in favour of abandoned higher ones. A step left out of the order (unreadable)
    is kept, and stops the collection before it deletes.
    """
    wanted = set(steps)
    return [s for s in read_lineage(store)[0].ranked if s in wanted]


def retained(
    ranked: Sequence[int],
    *,
    keep_last: int | None,
    keep_every: int | None = None,
    protect: Iterable[int] = (),
) -> set[int]:
    """The steps a policy keeps of ``ranked`` (newest first, see :func:`ranked_steps`).
    With neither ``keep_last`` nor ``keep_every``, all of them."""
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise CheckpointError(
            f"keep_last must be an int >= 1 (the newest checkpoint is always kept), got {keep_last!r}"
        )
    if keep_every is not None and (isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1):
        raise CheckpointError(f"keep_every must be an int >= 1, got {keep_every!r}")
    ranked = list(dict.fromkeys(ranked))
    if keep_last is None and keep_every is None:
        return set(ranked)
    keep = set(ranked[:keep_last]) if keep_last else set()
    if keep_every:
        keep.update(s for s in ranked if s % keep_every == 0)
    present = set(ranked)
    keep.update(s for s in protect if s in present)
    if ranked:
        keep.add(ranked[0])
    return keep


def retained_steps(
    steps: Iterable[int],
    *,
    keep_last: int | None,
    keep_every: int | None = None,
    protect: Iterable[int] = (),
) -> set[int]:
    """:func:`retained` with the steps ranked by number (the highest is the newest)."""
    return retained(sorted(set(steps), reverse=True), keep_last=keep_last, keep_every=keep_every, protect=protect)


# -- mark and sweep -----------------------------------------------------------------------


def _keys_of(store: Store, step: int, raw: bytes | None = None) -> set[str]:
    """Every object key checkpoint ``step`` (its manifest ``raw``, else read) needs;
    NoCheckpointError when it is gone."""
    manifest = parse_manifest(store.read_manifest(step) if raw is None else raw, step, store.url)
    keys: set[str] = set()
    for ref in manifest.chunk_refs():
        keys.update(referenced_keys(ref.to_json()))
    return keys


def marked_keys(store: Store, steps: Iterable[int], progress: Progress | None = None) -> set[str]:
    """Every object key the manifests of ``steps`` need, delta parents included."""
    steps = list(steps)
    marked: set[str] = set()
    for i, step in enumerate(steps):
        try:
            marked |= _keys_of(store, step)
        except StoreError:
            raise
        except CheckpointError as exc:
            raise CorruptCheckpointError(
                f"garbage collection stopped, nothing deleted: retained checkpoint {store.url} step {step} "
                f"is unreadable ({exc})"
            ) from None
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
    return float(mtime) if isinstance(mtime, (int, float)) else None


def _held(leases: Iterable[LeaseRecord]) -> set[int]:
    return {s for r in leases for s in r.protect}


class _Marks:
    """What one collection has marked, and why it may not sweep (``skip``)."""

    def __init__(self, store: Store, keys: set[str], steps: Iterable[int]) -> None:
        self.store = store
        self.keys = keys
        self.steps = set(steps)
        self.skip: str | None = None

    def add(self, step: int, why: str, *, required: bool) -> None:
        """Mark checkpoint ``step``. Once objects may be swept, a checkpoint that cannot be
        read stops the sweep, not the collection (manifests may be gone already); one that
        is gone stops it only when ``required`` (a lease holds it)."""
        try:
            keys = _keys_of(self.store, step)
        except StoreError:
            raise
        except NoCheckpointError as exc:
            if required:
                self.skip = self.skip or f"{why} step {step}, which is not in the store ({exc})"
            return
        except CheckpointError as exc:
            self.skip = self.skip or f"{why} step {step}, which cannot be read ({exc})"
            return
        self.keys |= keys
        self.steps.add(step)


def _gc(
    store: Store,
    *,
    keep_last: int | None,
    keep_every: int | None,
    protect: Iterable[int],
    grace_seconds: float | None,
    dry_run: bool,
    progress: Progress | None,
    writer: WriterLease | None = None,
) -> GCResult:
    grace = config.gc_grace_seconds() if grace_seconds is None else float(grace_seconds)
    if grace < 0:
        raise CheckpointError(f"grace_seconds must be >= 0, got {grace_seconds!r}")
    started = time.time()
    if not store.local:
        store.fs.invalidate_cache()  # a listing cached by the filesystem object would be stale
    if writer is not None:
        writer.check()  # prompt frees are for the store's one writer only
    listing = store.manifest_listing()  # S1
    leases = live_leases(store, now=started, grace=grace)  # L1
    held = _held(leases)
    ranked = ranked_steps(store, listing)
    keep = retained(ranked, keep_last=keep_last, keep_every=keep_every, protect=[*protect, *held])
    keep |= set(listing) - set(ranked)  # a step the order leaves out (unreadable) is never deleted unread
    marks = _Marks(store, marked_keys(store, sorted(keep), progress), keep)
    for step in sorted(held - marks.steps):
        marks.add(step, "a lease holds", required=True)
    removed = [s for s in sorted(listing) if s not in keep]

    sizes: dict[int, int] = {}
    pruned: dict[int, set[str]] = {}
    for step in removed:
        try:
            raw = store.read_manifest(step)
            sizes[step] = len(raw)
            if writer is not None:
                pruned[step] = _keys_of(store, step, raw)
        except NoCheckpointError:
            continue
        except StoreError:
            raise
        except CheckpointError:
            pass  # unreadable: its objects wait for the grace period like any orphan's
    if not dry_run and removed:
        # A writer may have re-saved one of these steps, or a lease taken one, since S1.
        now_held = _held(live_leases(store, grace=grace))
        again = store.manifest_listing()
        removed = [s for s in removed if s not in now_held and s in again and again[s] == listing[s]]
        # Manifests first: a checkpoint disappears whole before any object it needs does.
        for step in removed:
            store.delete_manifest(step)
        if removed:
            store.sync_dirs()
            store.latest_step(repair=True)
    freed = sum(sizes.get(s, 0) for s in removed)

    # Second look (L2, S2): whatever a lease holds or a manifest names now is marked.
    leases2 = live_leases(store, grace=grace)
    for step in sorted(_held(leases2) - marks.steps):
        if step in removed and not dry_run:
            marks.skip = marks.skip or f"a lease took step {step} while this collection removed it"
        else:
            marks.add(step, "a lease holds", required=True)
    gone = set(removed)
    for step, mtime in sorted(store.manifest_listing().items()):
        if step in gone:
            continue  # a dry run's removed steps
        if step not in marks.steps or mtime != listing.get(step) or mtime is None or mtime >= started - _MTIME_SLACK:
            marks.add(step, "the store holds", required=False)  # new, or re-saved since it was marked

    cutoff = _cutoff(store, started, grace, [*leases, *leases2], writer)
    pruned_keys = set().union(*[pruned[s] for s in removed if s in pruned]) if not dry_run else set()
    removed_objects = 0
    if marks.skip is not None:
        log.warning("gc of %s swept no objects: %s", store.url, marks.skip)
    else:
        candidates = [o for o in store.list_objects() if o.key not in marks.keys]
        for i, obj in enumerate(candidates):
            if obj.key in pruned_keys:
                store.delete(store.object_path(obj.key))  # only pruned checkpoints needed it: no grace
                removed_objects += 1
                freed += obj.size
            elif obj.mtime is None or obj.mtime > cutoff:
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
        for path in set(lease_files(store)) - {r.path for r in leases}:
            delete_if_expired(store, path, started)
    result = GCResult(
        kept_steps=tuple(sorted(keep)),
        removed_steps=tuple(removed),
        removed_objects=removed_objects,
        freed_bytes=freed,
        dry_run=dry_run,
        held_steps=tuple(sorted(held & keep)),
        sweep_skipped=marks.skip,
    )
    log.info(
        "gc of %s: kept %d checkpoints, %s %d checkpoints and %d objects (%d bytes)",
        store.url,
        len(keep),
        "would remove" if dry_run else "removed",
        len(removed),
        removed_objects,
        freed,
    )
    return result


def _cutoff(
    store: Store, started: float, grace: float, leases: Sequence[LeaseRecord], writer: WriterLease | None
) -> float:
    """Objects modified after this may belong to a save in flight: never swept by age."""
    skew = config.clock_skew_seconds()
    # Object stores report LastModified to the second (rounded down): one more second of
    # margin, unless the caller said no save is in flight (grace 0, no live writer).
    rounding = 0.0 if store.local else 1.0
    cutoff = started - grace - (rounding if grace > 0 else 0.0)
    others = [r for r in leases if r.kind == WRITER and (writer is None or r.id != writer.id)]
    if others:
        # a live writer may start a save at any moment of this collection
        cutoff = min(cutoff, started - skew - rounding)
    for r in others:
        if r.in_flight_since is not None:
            cutoff = min(cutoff, r.in_flight_since - skew - rounding)
    return cutoff


def collect(
    url: str,
    *,
    keep_last: int | None = None,
    keep_every: int | None = None,
    dry_run: bool = False,
    grace_seconds: float | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    encryption: Encryption | None = None,
) -> GCResult:
    """Apply a retention policy to the store at ``url`` and sweep unreferenced objects.

    Not a writer: it takes no lease and refuses nothing, but keeps every step a live lease
    holds and every object a live writer's save may need (see the module docstring).

    :param keep_last: keep the newest N checkpoints (N >= 1).
    :param keep_every: also keep every checkpoint whose step is divisible by M.
        With neither, every checkpoint is kept and only orphaned objects are swept
        (objects of crashed saves, of checkpoints deleted by hand).
    :param dry_run: report what would be removed; delete nothing.
    :param grace_seconds: objects younger than this are never deleted
        (default ``CKPT_GC_GRACE_SECONDS``, 900).
    :param progress: ``progress(phase, done, total)`` with phase ``"mark"`` or ``"sweep"``.
    :param encryption: the key of an encrypted store (without it, an EncryptionError: nothing is
        collected from a store whose manifests cannot be read).
    """
    store = Store(url, storage_options)
    open_store(store, encryption)
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
    writer: WriterLease | None = None,
) -> GCResult:
    """:func:`collect` on an open store, keeping the steps in ``protect`` as well.

    :param writer: the store's writer lease, held by the caller (the Checkpointer after a
        commit): objects that only the pruned checkpoints reference are deleted at once,
        not after the grace period. A lease that is no longer held raises, deleting nothing.
    """
    return _gc(
        store,
        keep_last=keep_last,
        keep_every=keep_every,
        protect=tuple(protect),
        grace_seconds=grace_seconds,
        dry_run=False,
        progress=None,
        writer=writer,
    )
