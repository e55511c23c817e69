"""The store: ckpt's storage contract on top of any fsspec filesystem.

::

    <root>/objects/<2 hex>/<key>   immutable, content-addressed, encoded
    <root>/manifests/<step>.json   one per committed checkpoint
    <root>/refs/latest             names the newest committed manifest, written after it

Commit order is objects, then the manifest, then ``refs/latest``; a checkpoint without a
manifest does not exist. Local files are written to a temporary name, fsynced and
renamed, and their directories fsynced before the manifest, so a crash at any instant
leaves the last commit loadable. Object stores get whole-object PUTs, which are atomic
(large objects go up in parts, in parallel, and appear only when the upload completes);
nothing relies on rename or on fsync there.

Every call to the backend goes through :class:`ckpt.storage.retry.Retrier`: transient errors
(connection resets, timeouts, throttling, 5xx) are retried with backoff and jitter; a
call that keeps failing raises :class:`StoreError` naming the URL. Listings and
existence checks bypass fsspec's listing cache, because other processes write the
same store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ckpt import config
from ckpt.codecs.base import CodecContext
from ckpt.errors import CheckpointError, MissingObjectError, NoCheckpointError, StoreError
from ckpt.storage.retry import GaveUp, Retrier

log = logging.getLogger("ckpt")

T = TypeVar("T")

_STEP_FILE = re.compile(r"^(\d+)\.json$")
_KEY = re.compile(r"^[0-9a-f]{8,}(\.[0-9a-z.]+)?$")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float | None


class Store:
    """One checkpoint store at ``url`` (an fsspec URL or a local path)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        if not isinstance(url, (str, os.PathLike)) or not str(url):
            raise CheckpointError(f"store URL must be a non-empty string or path, got {url!r}")
        self.url = os.fspath(url)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except ImportError as exc:
            raise StoreError(f"cannot open {self.url}: {exc}") from None
        except (ValueError, TypeError) as exc:
            raise StoreError(f"cannot open {self.url}: {exc}") from None
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self.local = isinstance(self.fs, LocalFileSystem)
        self._dirs_lock = threading.Lock()
        self._dirty_dirs: set[str] = set()
        self._made_dirs: set[str] = set()
        self.retrier = Retrier(where=self.url)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self._s3 = any(p in ("s3", "s3a") for p in protocols)
        #: what this store gives its codecs (see ckpt.codecs.base.CodecContext)
        self.codec_context = CodecContext(url=self.url)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- paths ---------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) if self.root else "/".join(parts)

    def object_path(self, key: str) -> str:
        return self.path("objects", key[:2], key)

    def manifest_path(self, step: int) -> str:
        return self.path("manifests", f"{int(step)}.json")

    # -- low-level I/O -------------------------------------------------------------------
    def _wrap(self, exc: Exception, what: str) -> CheckpointError:
        if isinstance(exc, CheckpointError):
            return exc
        if isinstance(exc, GaveUp):
            err = exc.error
            return StoreError(
                f"{what} failed on {self.url} after {exc.attempts} attempt(s) in {exc.seconds:.1f}s: "
                f"{type(err).__name__}: {err}"
            )
        return StoreError(f"{what} failed on {self.url}: {type(exc).__name__}: {exc}")

    def _io(self, what: str, fn: Callable[[], T], kind: str = "read") -> T:
        """``fn()`` with retries; FileNotFoundError passes through, other failures become StoreError.

        ``kind`` (read, write, list) groups calls that fail together in an outage.
        """
        try:
            return self.retrier.call(fn, what, kind)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - every backend failure becomes a StoreError naming the URL
            raise self._wrap(exc, what) from (exc.error if isinstance(exc, GaveUp) else exc)

    def _mkdir(self, directory: str) -> None:
        if directory in self._made_dirs:
            return
        self.fs.makedirs(directory, exist_ok=True)
        self._made_dirs.add(directory)

    def _write_local(self, path: str, data: bytes | memoryview) -> None:
        directory = os.path.dirname(path)
        self._mkdir(directory)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if config.fsync():
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        with self._dirs_lock:
            self._dirty_dirs.add(directory)

    def _put_options(self, size: int) -> dict[str, Any]:
        # s3fs uploads in parts (in parallel, then CompleteMultipartUpload) from two
        # parts' worth on; below that one PUT. Other backends decide themselves.
        return {"chunksize": config.part_bytes()} if self._s3 else {}

    def write(self, path: str, data: bytes | memoryview) -> None:
        """Write one whole file atomically (temp + fsync + rename locally; one upload remotely)."""
        what = f"writing {path}"
        try:
            if self.local:
                self._io(what, lambda: self._write_local(path, data), "write")
                return
            body = bytes(data) if isinstance(data, memoryview) else data
            options = self._put_options(len(body))
            self._io(what, lambda: self.fs.pipe_file(path, body, **options), "write")
        except FileNotFoundError as exc:  # a missing bucket or container: not "not there" for a write
            raise self._wrap(exc, what) from exc

    def sync_dirs(self) -> None:
        """Make renames done so far durable (local files only)."""
        if not (self.local and config.fsync()):
            return
        with self._dirs_lock:
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        for directory in dirs:
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def read(self, path: str) -> bytes:
        """A whole file; FileNotFoundError when it is not there."""
        if self.local:

            def read_local() -> bytes:
                with open(path, "rb") as f:
                    return f.read()

            return self._io(f"reading {path}", read_local)
        return self._io(f"reading {path}", lambda: self.fs.cat_file(path))

    def _uncached(self, path: str) -> None:
        # fsspec backends cache listings per filesystem instance, and instances are
        # shared; another process (or Store) may have written since.
        if not self.local:
            try:
                self.fs.invalidate_cache(path)
            except Exception:  # noqa: BLE001 - a cache that cannot be cleared is no reason to fail
                pass

    def exists(self, path: str) -> bool:
        def check() -> bool:
            self._uncached(path)
            return self.fs.exists(path)

        return self._io(f"checking {path}", check)

    def delete(self, path: str) -> None:
        try:
            self._io(f"deleting {path}", lambda: self.fs.rm_file(path), "write")
        except FileNotFoundError:
            pass

    # -- objects -------------------------------------------------------------------------
    def put_object(self, key: str, payload: bytes | memoryview) -> None:
        self.write(self.object_path(key), payload)

    def get_object(self, key: str, *, what: str = "") -> bytes:
        try:
            return self.read(self.object_path(key))
        except FileNotFoundError:
            where = f" (needed by {what})" if what else ""
            raise MissingObjectError(f"object {key} is missing from {self.url}{where}") from None

    def has_object(self, key: str) -> bool:
        return self.exists(self.object_path(key))

    def list_objects(self) -> Iterator[ObjectInfo]:
        base = self.path("objects")

        def find() -> dict[str, Any]:
            self._uncached(base)
            return self.fs.find(base, detail=True)

        try:
            entries = self._io(f"listing objects under {base}", find, "list")
        except FileNotFoundError:
            return
        for path, info in entries.items():
            key = path.rsplit("/", 1)[-1]
            if not _KEY.match(key):
                continue  # temporaries and foreign files
            mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            out_size = info.get("size") or 0
            yield ObjectInfo(key=key, size=int(out_size), mtime=float(mtime) if mtime is not None else None)

    # -- manifests and refs --------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps of every committed manifest, ascending."""
        base = self.path("manifests")

        def listing() -> list[str]:
            if self.local:
                return os.listdir(base) if os.path.isdir(base) else []
            self._uncached(base)
            return [p.rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]

        try:
            names = self._io("listing manifests", listing, "list")
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _STEP_FILE.match(n)))

    def read_manifest(self, step: int) -> bytes:
        try:
            return self.read(self.manifest_path(step))
        except FileNotFoundError:
            raise NoCheckpointError(f"no checkpoint at step {step} in {self.url}") from None

    def commit(self, step: int, manifest: bytes) -> None:
        """Make a checkpoint visible: objects durable, then the manifest, then the ref."""
        self.sync_dirs()
        self.write(self.manifest_path(step), manifest)
        self.sync_dirs()
        self.write_latest(step)
        self.sync_dirs()

    def read_latest(self) -> int | None:
        try:
            raw = self.read(self.path("refs", "latest"))
        except FileNotFoundError:
            return None
        except CheckpointError:
            raise
        try:
            return int(json.loads(raw)["step"])
        except (ValueError, KeyError, TypeError):
            log.warning("refs/latest in %s is unreadable; scanning manifests", self.url)
            return None

    def write_latest(self, step: int) -> None:
        body = json.dumps({"step": int(step), "manifest": f"manifests/{int(step)}.json"}).encode()
        self.write(self.path("refs", "latest"), body)

    def latest_step(self, *, repair: bool = False) -> int | None:
        """The newest committed step: the highest manifest, whatever ``refs/latest`` says.

        ``refs/latest`` is a hint that a crash between manifest and ref can leave stale, or
        that can be lost; with ``repair`` it is rewritten when it disagrees.
        """
        steps = self.steps()
        if not steps:
            return None
        newest = steps[-1]
        if repair:
            ref = self.read_latest()
            if ref != newest:
                log.warning("refs/latest of %s says %s, newest manifest is %d: repairing", self.url, ref, newest)
                self.write_latest(newest)
                self.sync_dirs()
        return newest

    def delete_manifest(self, step: int) -> None:
        self.delete(self.manifest_path(step))
