"""A store's manifests and ``refs/latest`` (:class:`ManifestsAndRefs`, mixed into
:class:`ckpt.storage.store.Store`).

::

    <root>/manifests/<step>.json   one per committed checkpoint (canonical names only)
    <root>/refs/latest             step and seq of the latest commit, written after it: a hint

Commit order is objects, then the manifest, then ``refs/latest``; a checkpoint without a
manifest does not exist, and a ref that cannot be written does not undo a commit (which
checkpoint is the latest is decided in :mod:`ckpt.storage.lineage`). Only canonical
manifest names count; anything else in ``manifests/`` is listed as stray and ignored.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import fsspec

from ckpt.codecs.base import CodecContext
from ckpt.codecs.crypto import manifest_json
from ckpt.errors import CheckpointError, CorruptCheckpointError, NoCheckpointError
from ckpt.storage.lineage import Ref, find_latest
from ckpt.storage.store_local import TEMPORARY

log = logging.getLogger("ckpt")

T = TypeVar("T")

# Canonical manifest names only: "0009.json" or "+9.json" would alias step 9, and a
# step of thousands of digits would not even convert to an int.
_STEP_FILE = re.compile(r"^(0|[1-9][0-9]{0,17})\.json$")
# A ref is a few dozen bytes; anything longer is not one.
_REF_BYTES = 4096


def entry_mtime(info: Mapping[str, Any]) -> float | None:
    """Modification time of a listing entry in Unix seconds, whatever the backend calls it."""
    mtime: Any = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return float(mtime) if isinstance(mtime, (int, float)) else None


class ManifestsAndRefs:
    """Listing, reading and committing manifests; reading and writing ``refs/latest``."""

    # set by ckpt.storage.store.Store (fs and local when its filesystem is made)
    url: str
    fs: fsspec.AbstractFileSystem
    local: bool
    codec_context: CodecContext

    if TYPE_CHECKING:  # provided by Store

        def _io(self, what: str, fn: Callable[[], T], kind: str = "read") -> T: ...

        def _uncached(self, path: str) -> None: ...

        def path(self, *parts: str) -> str: ...

        def manifest_path(self, step: int) -> str: ...

        def _inside(self, real: str) -> bool: ...

        def read(self, path: str, *, limit: int | None = None) -> bytes: ...

        def write(self, path: str, data: bytes | memoryview) -> None: ...

        def delete(self, path: str) -> None: ...

        def sync_dirs(self) -> None: ...

    def _manifest_entries(self) -> list[tuple[str, float | None, bool]]:
        """``(name, mtime, is a file)`` of everything in ``manifests/`` ([] when it does not exist)."""
        base = self.path("manifests")

        def damaged() -> CorruptCheckpointError:
            return CorruptCheckpointError(
                f"manifests/ of {self.url} is a file, not a folder: the store is damaged and no checkpoint can be listed"
            )

        def listing() -> list[tuple[str, float | None, bool]]:
            if self.local:
                if not os.path.lexists(base):
                    return []
                if not os.path.isdir(base):
                    raise damaged()
                out: list[tuple[str, float | None, bool]] = []
                with os.scandir(base) as it:
                    for e in it:
                        try:
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue  # removed while listing
                        out.append((e.name, st.st_mtime, stat.S_ISREG(st.st_mode)))
                return out
            self._uncached(base)
            infos = self.fs.ls(base, detail=True)
            if len(infos) == 1 and infos[0].get("type") == "file" and infos[0]["name"].strip("/") == base.strip("/"):
                raise damaged()
            return [(i["name"].rstrip("/").rsplit("/", 1)[-1], entry_mtime(i), i.get("type") == "file") for i in infos]

        try:
            return self._io("listing manifests", listing, "list")
        except FileNotFoundError:
            return []

    def manifest_listing(self) -> dict[int, float | None]:
        """Step -> modification time (None: unknown) of every committed manifest.

        Only canonical names count (``<step>.json``, no leading zeros or signs, a regular
        file); see :meth:`stray_manifests` for the rest.
        """
        return {int(m.group(1)): mtime for n, mtime, f in self._manifest_entries() if f and (m := _STEP_FILE.match(n))}

    def steps(self) -> list[int]:
        """Steps of every committed manifest, ascending."""
        return sorted(self.manifest_listing())

    def stray_manifests(self) -> list[str]:
        """Names in ``manifests/`` that are not a committed manifest and are ignored: what
        ``ckpt verify`` reports. Temporaries of interrupted local writes are not listed."""
        return sorted(
            n + ("" if f else "/")
            for n, _t, f in self._manifest_entries()
            if not (f and _STEP_FILE.match(n)) and not (f and TEMPORARY.search(n))
        )

    def read_manifest(self, step: int) -> bytes:
        """The manifest JSON of ``step`` (an encrypted store's opened and authenticated).

        On local disk a symbolic link at a manifest's name is not one: the listing skips it
        (:meth:`steps`, so gc does not protect the objects it names), and so does this. (One
        leading out of the store, or any other file that is not a regular one, the read refuses.)"""
        path = self.manifest_path(step)
        if self.local and os.path.islink(path) and self._inside(os.path.realpath(path)):
            raise CorruptCheckpointError(
                f"manifests/{step}.json of {self.url} is a symbolic link within it, not a committed manifest "
                "(ckpt never writes one; the listing and gc skip it): refusing to read it"
            )
        try:
            return manifest_json(self.codec_context, step, self.read(path))
        except FileNotFoundError:
            pass
        hint = ""
        alias = [
            n for n in self.stray_manifests() if (m := re.match(r"^[+]?0*(\d{1,18})\.json$", n)) and int(m[1]) == step
        ]
        if alias:
            hint = f" (ignored, not manifest names: {', '.join(f'manifests/{n}' for n in alias)})"
        raise NoCheckpointError(f"no checkpoint at step {step} in {self.url}{hint}") from None

    def commit(self, step: int, manifest: bytes, *, seq: int | None = None) -> None:
        """Make a checkpoint visible: objects durable, then the manifest, then the ref.

        The manifest is the commit. ``refs/latest`` is a hint: when it cannot be written the
        save still stands (logged), and readers find the checkpoint by its manifest.
        """
        self.sync_dirs()
        self.write(self.manifest_path(step), manifest)
        self.sync_dirs()
        try:
            self.write_latest(step, seq)
            self.sync_dirs()
        except CheckpointError as exc:
            log.warning(
                "step %d is committed to %s, but refs/latest could not be written (%s); "
                "readers find the checkpoint by scanning manifests",
                step,
                self.url,
                exc,
            )

    def read_ref(self) -> Ref | None:
        """What ``refs/latest`` says; None when it is missing or unreadable (logged: it is a hint)."""
        try:
            raw = self.read(self.path("refs", "latest"), limit=_REF_BYTES)
        except FileNotFoundError:
            return None
        except CheckpointError as exc:
            log.warning("refs/latest of %s cannot be read (%s); scanning manifests", self.url, exc)
            return None
        try:
            doc = json.loads(raw)
            step, seq = doc["step"], doc.get("seq")
            if not _is_count(step) or not (seq is None or _is_count(seq)):
                raise ValueError(f"step {step!r}, seq {seq!r}")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            log.warning("refs/latest of %s is unreadable (%s); scanning manifests", self.url, exc)
            return None
        return Ref(step, seq)

    def read_latest(self) -> int | None:
        """The step ``refs/latest`` names (None: missing or unreadable). A hint: see :meth:`latest_step`."""
        ref = self.read_ref()
        return None if ref is None else ref.step

    def write_latest(self, step: int, seq: int | None = None) -> None:
        body: dict[str, Any] = {"step": int(step), **({"seq": int(seq)} if seq is not None else {})}
        body["manifest"] = f"manifests/{int(step)}.json"
        self.write(self.path("refs", "latest"), json.dumps(body).encode())

    def latest_step(self, *, repair: bool = False) -> int | None:
        """The latest committed step: the readable manifest with the highest commit sequence
        (see :mod:`ckpt.storage.lineage`), whatever ``refs/latest`` says.

        ``refs/latest`` is a hint that a crash between manifest and ref can leave stale, or
        that can be lost; with ``repair`` it is rewritten when it disagrees.
        """
        return find_latest(self, repair=repair).step

    def delete_manifest(self, step: int) -> None:
        self.delete(self.manifest_path(step))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**18
