"""The commit: a manifest built from a save's entries, written after its objects, then the ref.

A checkpoint exists once its manifest does. :func:`new_manifest` settles the manifest's
own size into ``stored_bytes``; :func:`commit` makes the objects durable, writes the
manifest, then ``refs/latest``. :func:`load_manifest` is the one way back in.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
from collections.abc import Mapping
from typing import Any

from ckpt.errors import CheckpointError, NoCheckpointError
from ckpt.storage.manifest import Manifest, TensorEntry
from ckpt.storage.store import Store

log = logging.getLogger("ckpt")


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_manifest(
    *,
    step: int,
    tree: Any,
    adapters: Mapping[str, str],
    tensors: Mapping[str, TensorEntry],
    parent: Manifest | None,
    raw_bytes: int,
    written_bytes: int,
    chunk_bytes: int,
    plugins: Mapping[str, str],
    meta: Mapping[str, Any] | None = None,
) -> Manifest:
    """The manifest of a save whose objects took ``written_bytes``; ``stored_bytes`` counts
    the manifest itself too."""
    manifest = Manifest(
        step=step,
        created=utcnow(),
        tree=tree,
        adapters=dict(adapters),
        tensors=dict(tensors),
        parent=parent.step if parent is not None else None,
        raw_bytes=raw_bytes,
        stored_bytes=0,
        chunk_bytes=chunk_bytes,
        plugins=dict(plugins),
        meta=dict(meta or {}),
    )
    # The manifest's own digits change its length, so settle it.
    stored = written_bytes + len(manifest.to_json_bytes())
    for _ in range(3):
        manifest = dataclasses.replace(manifest, stored_bytes=stored)
        now = written_bytes + len(manifest.to_json_bytes())
        if now == stored:
            break
        stored = now
    return manifest


def commit(store: Store, manifest: Manifest) -> None:
    """Make ``manifest``'s checkpoint visible: objects durable, then the manifest, then the ref."""
    store.commit(manifest.step, manifest.to_json_bytes())
    log.info(
        "committed step %d to %s (%d raw bytes, %d stored)",
        manifest.step,
        store.url,
        manifest.raw_bytes,
        manifest.stored_bytes,
    )


def load_manifest(store: Store, step: int | None) -> Manifest:
    """The manifest of ``step`` (the newest committed one when None), validated."""
    if step is None:
        step = store.latest_step()
        if step is None:
            raise NoCheckpointError(f"no checkpoint in {store.url}")
    return Manifest.from_json_bytes(store.read_manifest(step), where=f"{store.url} step {step}")


def parent_for_save(store: Store) -> Manifest | None:
    """The newest committed manifest, which a new save deduplicates against (None: write in full)."""
    latest = store.latest_step(repair=True)
    if latest is None:
        return None
    try:
        return load_manifest(store, latest)
    except CheckpointError as exc:
        log.warning("cannot read the latest manifest of %s for dedup (%s); writing a full checkpoint", store.url, exc)
        return None
