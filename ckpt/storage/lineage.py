"""Lineage: which checkpoint is the latest, which ones it continues from, which were abandoned.

Every commit records ``parent`` (the step it continues from), ``seq`` (one more than the
highest commit sequence in the store) and ``run`` (the writer). The latest checkpoint is
the committed manifest with the highest ``seq``, not the highest step: after a rollback
(restore 20 of 30, save 21) step 21 is the latest and 30 is *abandoned*, never brought
back by a load, a resume or retention. Manifests written before lineage was recorded
have no ``seq``; they order before every manifest that has one, by step among themselves.

``refs/latest`` records the step and seq of the latest commit, but it is only a hint: a
crash between manifest and ref leaves it stale, an operator may delete it. So the
latest is found from the manifest listing: every manifest whose modification time is
not older than that of the manifest the ref names, less the clock's granularity (a commit
after the ref's was written after it), is read along with the ref's own, and the one with
the highest seq wins. A
missing, unreadable or seq-less ref, or one naming a manifest that is gone or holds
another seq, means reading every manifest. Manifests that cannot be parsed are skipped
with a warning naming them; the newest readable one is the latest. A backend failure
(:class:`StoreError`) is raised, not skipped: a network outage must not turn an older
checkpoint into the latest.

This module reads the store only through :class:`ManifestStore`, so that
:class:`ckpt.storage.store.Store` can use it without an import cycle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ckpt.errors import (
    CheckpointError,
    CorruptCheckpointError,
    EncryptionError,
    NewerSchemaError,
    NoCheckpointError,
    SchemaError,
    StoreError,
)
from ckpt.storage.manifest import Manifest

log = logging.getLogger("ckpt")

#: Seconds of modification-time uncertainty where times are whole seconds (object stores
#: round down to the second, some filesystems too)...
MTIME_SLACK = 2.0
#: ... and where they are finer (local filesystems: one clock, ticks of a few milliseconds).
FINE_MTIME_SLACK = 0.05


@dataclass(frozen=True)
class Ref:
    """What ``refs/latest`` says: the step and commit sequence of the latest commit (seq None:
    written before lineage was recorded)."""

    step: int
    seq: int | None


class ManifestStore(Protocol):
    """What lineage needs of a store (:class:`ckpt.storage.store.Store` provides it)."""

    url: str

    def manifest_listing(self) -> Mapping[int, float | None]: ...

    def read_manifest(self, step: int) -> bytes: ...

    def read_ref(self) -> Ref | None: ...

    def write_latest(self, step: int, seq: int | None = None) -> None: ...

    def sync_dirs(self) -> None: ...


def order_key(manifest: Manifest) -> tuple[int, int, int]:
    """Commit order: manifests without seq first (by step), then by seq (ties by step)."""
    if manifest.seq is None:
        return (0, manifest.step, 0)
    return (1, manifest.seq, manifest.step)


@dataclass(frozen=True)
class Latest:
    """The outcome of looking for the latest checkpoint."""

    #: the latest readable checkpoint (None: the store holds none that can be read)
    manifest: Manifest | None
    #: manifests passed over because they cannot be read, by step, with the error reading them raised
    skipped: Mapping[int, CheckpointError] = field(default_factory=dict)
    #: the highest commit sequence of the manifests read; the next commit takes one more
    top_seq: int = 0

    @property
    def step(self) -> int | None:
        return None if self.manifest is None else self.manifest.step


def parse_manifest(data: bytes, step: int, url: str) -> Manifest:
    """The validated manifest ``data`` read as ``manifests/<step>.json`` of the store at ``url``."""
    where = f"{url} step {step}"
    manifest = Manifest.from_json_bytes(data, where=where)
    if manifest.step != step:  # a copy under another name: which step would it be?
        raise SchemaError(f"manifest {where} says it is step {manifest.step}")
    return manifest


def _read(
    store: ManifestStore, steps: Iterable[int], good: dict[int, Manifest], bad: dict[int, CheckpointError]
) -> None:
    for step in steps:
        if step in good or step in bad:
            continue
        try:
            good[step] = parse_manifest(store.read_manifest(step), step, store.url)
        except (StoreError, NewerSchemaError, EncryptionError):
            # the backend failed, a newer ckpt wrote it, or it needs a key: none is a reason to pick an
            # older checkpoint (an older ckpt must not carry on behind a newer one's back)
            raise
        except NoCheckpointError:
            continue  # deleted since the listing (retention): not a checkpoint any more
        except CheckpointError as exc:
            bad[step] = exc


def _hinted(listing: Mapping[int, float | None], ref: Ref | None) -> list[int] | None:
    """The manifests that may be newer than the ref's commit, or None when the ref cannot narrow it."""
    if ref is None or ref.seq is None or ref.step not in listing:
        return None
    anchor = listing[ref.step]
    if anchor is None:
        return None
    since = anchor - (MTIME_SLACK if anchor == int(anchor) else FINE_MTIME_SLACK)
    return [s for s, mtime in listing.items() if s == ref.step or mtime is None or mtime >= since]


def _below_unreadable_newer(
    best: Manifest,
    good: Mapping[int, Manifest],
    bad: Mapping[int, object],
    listing: Mapping[int, float | None],
    ref: Ref | None,
) -> Manifest | None:
    """``best``, unless a manifest that cannot be read was committed after it: that one may be a
    rollback's new commit (restore 20 of 30, save 21, 21 damaged), whose parent nobody can
    read, so the latest is taken below its step (20), never from an abandoned line (30).

    "Committed after": the ref names it with a higher seq than ``best`` (the ref is written
    after each commit), or, without such a ref, its listing time is later than ``best``'s.
    """
    if ref is not None and ref.step in bad and (ref.seq is None or best.seq is None or ref.seq > best.seq):
        newer = [ref.step]
    else:
        anchor = listing.get(best.step)
        newer = [s for s in bad if anchor is not None and (listing.get(s) or 0.0) > anchor]
    if not newer:
        return best
    cap = min(newer)
    return max((m for m in good.values() if m.step < cap), key=order_key, default=None)


def describe(skipped: Mapping[int, object]) -> str:
    return "; ".join(f"step {s}: {why}" for s, why in sorted(skipped.items(), reverse=True))


def find_latest(store: ManifestStore, *, repair: bool = False) -> Latest:
    """The latest checkpoint of ``store`` (see the module docstring); logs what it skipped.

    With ``repair``, ``refs/latest`` is rewritten when it does not name the result (a ref
    that cannot be written is logged, not raised: it is a hint).
    """
    listing = store.manifest_listing()
    if not listing:
        return Latest(None)
    ref = store.read_ref()
    good: dict[int, Manifest] = {}
    bad: dict[int, CheckpointError] = {}
    hinted = _hinted(listing, ref)
    if hinted is not None and ref is not None:
        _read(store, hinted, good, bad)
        named = good.get(ref.step)
        if named is None or named.seq != ref.seq:  # the ref's own commit was replaced or is unreadable
            hinted = None
    if hinted is None:
        _read(store, sorted(listing, reverse=True), good, bad)
    best = max(good.values(), key=order_key, default=None)
    if best is not None:
        best = _below_unreadable_newer(best, good, bad, listing, ref)
    # The ref's own seq is not counted: when it is true, its manifest says the same.
    latest = Latest(best, dict(bad), max((m.seq for m in good.values() if m.seq is not None), default=0))
    if best is not None and bad:
        log.warning(
            "latest checkpoint of %s: skipped unreadable %s; using step %d", store.url, describe(bad), best.step
        )
    if repair and best is not None and (ref is None or (ref.step, ref.seq) != (best.step, best.seq)):
        if ref is not None and ref.step != best.step:
            log.warning(
                "refs/latest of %s names step %d, the latest is step %d: repairing", store.url, ref.step, best.step
            )
        try:
            store.write_latest(best.step, best.seq)
            store.sync_dirs()
        except CheckpointError as exc:
            log.warning("refs/latest of %s could not be repaired (%s); it is only a hint", store.url, exc)
    return latest


def require_latest(store: ManifestStore) -> Manifest:
    """The latest readable manifest; NoCheckpointError for an empty store only. When none can
    be read, the error reading the highest step (a CorruptCheckpointError) names them all."""
    latest = find_latest(store)
    if latest.manifest is not None:
        return latest.manifest
    if latest.skipped:
        kind = type(latest.skipped[max(latest.skipped)])
        if not issubclass(kind, CorruptCheckpointError):
            kind = CorruptCheckpointError
        raise kind(f"no readable checkpoint in {store.url}: {describe(latest.skipped)}")
    raise NoCheckpointError(f"no checkpoint in {store.url}")


# -- lineage --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lineage:
    """The checkpoints of a store by their place in its history."""

    #: the latest checkpoint (None: none readable)
    latest: int | None
    #: the latest, then the checkpoints it continues from, newest first
    line: tuple[int, ...]
    #: readable checkpoints off the line (a rollback left them behind), newest commit first
    abandoned: tuple[int, ...]
    #: manifests that cannot be read, with why: neither on the line nor abandoned
    unreadable: Mapping[int, str] = field(default_factory=dict)

    @property
    def ranked(self) -> tuple[int, ...]:
        """Every readable checkpoint by what retention keeps first: the line, then abandoned ones."""
        return self.line + self.abandoned

    def before(self, step: int) -> tuple[int, ...]:
        """The checkpoints ``step`` continues from, newest first (empty when it is off the line)."""
        return self.line[self.line.index(step) + 1 :] if step in self.line else ()


def lineage_of(manifests: Mapping[int, Manifest], unreadable: Mapping[int, str] | None = None) -> Lineage:
    """The lineage of a store holding ``manifests`` (readable ones, by step).

    The line follows ``parent`` links from the latest. A link is followed only to a
    checkpoint committed before the child (a parent step re-saved since is another
    checkpoint); when the parent is gone (pruned) or was replaced, the newest earlier
    commit below the parent's step stands in for it, because steps grow along a run.
    """
    if not manifests:
        return Lineage(None, (), (), dict(unreadable or {}))
    by_recency = sorted(manifests.values(), key=order_key, reverse=True)
    cur = by_recency[0]
    line = [cur.step]
    while cur.parent is not None:
        parent = manifests.get(cur.parent)
        if parent is None or parent.step in line or not order_key(parent) < order_key(cur):
            below = cur.parent
            key = order_key(cur)
            parent = next((m for m in by_recency if m.step < below and order_key(m) < key), None)
            if parent is None or parent.step in line:
                break
        line.append(parent.step)
        cur = parent
    on_line = set(line)
    abandoned = tuple(m.step for m in by_recency if m.step not in on_line)
    return Lineage(line[0], tuple(line), abandoned, dict(unreadable or {}))


def read_lineage(store: ManifestStore) -> tuple[Lineage, dict[int, Manifest]]:
    """Read every manifest of ``store``: its lineage and the readable manifests by step."""
    good: dict[int, Manifest] = {}
    bad: dict[int, CheckpointError] = {}
    _read(store, sorted(store.manifest_listing()), good, bad)
    return lineage_of(good, {s: str(e) for s, e in bad.items()}), good
