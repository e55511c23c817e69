"""Which of the parent checkpoint's objects a save may cite instead of writing them again.

Entries only cite objects that are in the store: before reusing the parent checkpoint's
objects, :func:`ckpt.io.writer.write_objects` confirms (:func:`reusable`) that the parent is
still committed and that each object it would reuse is present, and writes again every
chunk whose object is gone. With the writer's lease naming the parent first, no garbage
collection can remove them afterwards (the argument is in :mod:`ckpt.storage.retention`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from ckpt.codecs import delta as deltamod
from ckpt.storage.manifest import ChunkRef, Manifest
from ckpt.storage.store import Store

log = logging.getLogger("ckpt")


def reusable(store: Store, parent: Manifest, pool: ThreadPoolExecutor) -> tuple[dict[str, ChunkRef], frozenset[str]]:
    """The chunks of ``parent`` a save may cite without writing them (raw hash -> ref), and the
    keys ``parent`` cites that the store no longer holds.

    Nothing is reusable when ``parent``'s manifest is gone: a collection that removed it may
    be sweeping its objects. Otherwise a chunk is reusable when every object it needs (its
    own, and a delta's base) is present; the others are written again, healing the store.
    """
    if not store.exists(store.manifest_path(parent.step)):
        log.warning(
            "step %d of %s was removed before the save continuing from it could reuse its objects; "
            "writing every chunk in full",
            parent.step,
            store.url,
        )
        return {}, frozenset()
    needs = {ref.hash: (ref, frozenset(deltamod.referenced_keys(ref.to_json()))) for ref in parent.chunk_refs()}
    wanted = frozenset().union(*(keys for _ref, keys in needs.values()))
    absent = wanted - present_objects(store, wanted, pool)
    if absent:
        log.warning(
            "%d object(s) of step %d of %s are missing (e.g. %s); the chunks that need them are written again",
            len(absent),
            parent.step,
            store.url,
            min(absent),
        )
    return {h: ref for h, (ref, keys) in needs.items() if absent.isdisjoint(keys)}, absent


#: keys of one 2-hex prefix from which one listing of it costs less than a request per key
_LIST_FROM = 8


def present_objects(store: Store, keys: Iterable[str], pool: ThreadPoolExecutor) -> set[str]:
    """Which of ``keys`` the store holds, in parallel on ``pool``.

    A local disk answers an existence check in microseconds; an object store answers a
    listing of a thousand keys for the price of one request, so prefixes holding many of
    the keys are listed and the others checked key by key.
    """
    keys = set(keys)
    if store.local:  # no retries needed: a local disk has no transient errors worth them
        return {k for k in keys if os.path.isfile(store.object_path(k))}
    by_prefix: dict[str, set[str]] = {}
    for key in keys:
        by_prefix.setdefault(key[:2], set()).add(key)

    def listed(prefix: str) -> set[str]:
        base = store.path("objects", prefix)

        def ls() -> set[str]:
            store.fs.invalidate_cache(base)  # other processes write the store
            return {p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(base, detail=False)}

        try:
            return store._io(f"listing {base}", ls, "list")
        except FileNotFoundError:
            return set()

    def check(prefix: str) -> set[str]:
        wanted = by_prefix[prefix]
        if len(wanted) >= _LIST_FROM:
            return wanted & listed(prefix)
        return {k for k in wanted if store.has_object(k)}

    found: set[str] = set()
    for part in pool.map(check, sorted(by_prefix)):
        found |= part
    return found
