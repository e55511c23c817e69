"""The store: ckpt's storage contract on top of any fsspec filesystem.

::

    <root>/objects/<2 hex>/<key>   immutable, content-addressed, encoded
    <root>/manifests/<step>.json   one per committed checkpoint (canonical names only)
    <root>/refs/latest             step and seq of the latest commit, written after it: a hint

:class:`Store` owns the paths, the retried calls to the backend and the objects; it is
made of two more ideas, each in its own module and mixed in:

* :mod:`ckpt.storage.store_local` (:class:`~ckpt.storage.store_local.LocalFiles`): local
  files are written to a temporary name, fsynced and renamed, and their directories (new
  ones in their parents) fsynced before the manifest, so a crash at any instant leaves the
  last commit loadable; local reads stay under the store's root.
* :mod:`ckpt.storage.store_manifests` (:class:`~ckpt.storage.store_manifests.ManifestsAndRefs`):
  commit order is objects, then the manifest, then ``refs/latest``; a checkpoint without a
  manifest does not exist, and a ref that cannot be written does not undo a commit (which
  checkpoint is the latest is decided in :mod:`ckpt.storage.lineage`).

Object stores get whole-object PUTs, which are atomic (large objects go up in parts, in
parallel, and appear only when the upload completes); nothing relies on rename or on
fsync there.

Every call to the backend goes through :class:`ckpt.storage.retry.Retrier`: transient errors
(connection resets, timeouts, throttling, 5xx) are retried with backoff and jitter; a
call that keeps failing raises :class:`StoreError` naming the URL. Listings and
existence checks bypass fsspec's listing cache, because other processes write the
same store.

A store is untrusted input: reads are bounded (an object by the stored size its manifest
records, any other file by ``CKPT_MAX_MANIFEST_BYTES``; remote reads are ranged GETs),
object keys are one safe path component, and a local read opens only a regular file
under the store's root, symlinks resolved: a FIFO, a device or a path leading outside
is a :class:`CorruptCheckpointError` naming it, never a hang or a read.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ckpt import config
from ckpt.codecs.base import CodecContext
from ckpt.errors import CheckpointError, CorruptCheckpointError, StoreError
from ckpt.storage.backends import tune_client
from ckpt.storage.retry import GaveUp, Retrier, unreachable_reason
from ckpt.storage.store_local import LocalFiles
from ckpt.storage.store_manifests import ManifestsAndRefs, entry_mtime

T = TypeVar("T")

_KEY = re.compile(r"^[0-9a-f]{8,}(\.[0-9a-z.]+)?$")
# What object_path accepts: one safe path component (manifests validate the strict key grammar).
_OBJECT_NAME = re.compile(r"[0-9a-f]{2}[0-9a-z._-]{0,254}")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float | None


class Store(LocalFiles, ManifestsAndRefs):
    """One checkpoint store at ``url`` (an fsspec URL or a local path).

    Local files (atomic writes, directory fsyncs, confined reads) are
    :class:`~ckpt.storage.store_local.LocalFiles`; manifests and ``refs/latest`` are
    :class:`~ckpt.storage.store_manifests.ManifestsAndRefs`.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, lazy: bool = False) -> None:
        """``lazy``: the filesystem is made (its package imported: s3fs and its clients take
        ~0.2 s) at the first use of the store rather than here, on whichever thread uses it
        first (a protocol fsspec does not know is refused here; any other failure to open
        there). The tiers open their durable tier so, on their own thread, while a restart
        restores from the local tier."""
        if not isinstance(url, (str, os.PathLike)) or not str(url):
            raise CheckpointError(f"store URL must be a non-empty string or path, got {url!r}")
        self.url = os.fspath(url)
        self._options = dict(storage_options or {})
        self._resolve_lock = threading.Lock()
        self._dirs_lock = threading.Lock()
        self._dirty_dirs: set[str] = set()
        self._made_dirs: set[str] = set()
        self.retrier = Retrier(where=self.url)
        #: what this store gives its codecs (see ckpt.codecs.base.CodecContext)
        self.codec_context = CodecContext(url=self.url)
        # the root with symlinks resolved, once it exists: local reads stay under it
        self._real_root: str | None = None
        #: whether objects written here are compressed (and deltas tried): a fast local tier
        #: stores them raw, so its restores read straight into memory (ckpt.storage.tiers)
        self.compress = True
        #: large objects written to a local disk bypass the page cache (``CKPT_DIRECT_WRITES``;
        #: ckpt.storage.direct_io): a fast local tier keeps them cached for a restart
        self.direct_writes = config.direct_writes()
        if not lazy:
            self._resolve()
            return
        # a protocol fsspec does not know (a typo) is refused now, not at the first use
        protocol = fsspec.core.split_protocol(self.url)[0]
        if protocol is not None and protocol not in fsspec.available_protocols():
            raise StoreError(f"cannot open {self.url}: fsspec knows no protocol {protocol!r}")

    #: attributes set by :meth:`_resolve` (a lazy store makes them on first use)
    _RESOLVED = frozenset({"fs", "root", "local", "_s3"})

    fs: fsspec.AbstractFileSystem
    root: str
    local: bool
    _s3: bool

    if not TYPE_CHECKING:  # (hidden from mypy, which would otherwise type every attribute Any)

        def __getattr__(self, name: str) -> Any:
            # only called for attributes not set yet: those of a lazy store's filesystem
            if name in Store._RESOLVED:
                self._resolve()
                return self.__dict__[name]
            raise AttributeError(name)

    def _resolve(self) -> None:
        with self._resolve_lock:
            if "fs" in self.__dict__:
                return
            try:
                fs, root = fsspec.core.url_to_fs(self.url, **self._options)
                tune_client(fs)  # ckpt's Retrier is the only one that retries
            except CheckpointError:
                raise
            except Exception as exc:  # noqa: BLE001 - fsspec raises what the filesystem raises (zip:: over a
                # missing file: FileNotFoundError); a lazy store raises it at first use, on whichever thread,
                # where only a CheckpointError naming the URL is expected (and an AttributeError out of
                # __getattr__ would read as a missing attribute)
                raise StoreError(f"cannot open {self.url}: {type(exc).__name__}: {exc}") from None
            self.root = root.rstrip("/") if root not in ("/", "") else root
            self.local = isinstance(fs, LocalFileSystem)
            protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
            self._s3 = any(p in ("s3", "s3a") for p in protocols)
            self.fs = fs  # last: its presence says the others are set

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- paths ---------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) if self.root else "/".join(parts)

    def object_path(self, key: str) -> str:
        # Keys come from manifests, which are untrusted: one path component, never "..".
        if not isinstance(key, str) or not _OBJECT_NAME.fullmatch(key):
            raise CorruptCheckpointError(f"{str(key)[:80]!r} is not an object key: refusing to use it in {self.url}")
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

    def read(self, path: str, *, limit: int | None = None) -> bytes:
        """A file, or its first ``limit`` bytes when it is longer; FileNotFoundError when it is not there.

        ``limit`` None is ``CKPT_MAX_MANIFEST_BYTES + 1``: every file of a store but an object
        (:meth:`get_object`) is a small JSON document, and one longer than a manifest may be is
        read only far enough to tell. Locally only a regular file under the store's root is
        opened (symlinks resolved): anything else is a CorruptCheckpointError, never a read of a
        FIFO, a device or a file outside the store.
        """
        return self._read(path, config.max_manifest_bytes() + 1 if limit is None else limit)

    def _read(self, path: str, limit: int | None) -> bytes:
        """At most ``limit`` bytes of ``path`` (None: all of it)."""
        if self.local:
            return self._io(f"reading {path}", lambda: self._read_local(path, limit))
        if limit is None:
            return self._io(f"reading {path}", lambda: self.fs.cat_file(path))
        # a ranged GET: a replaced object of gigabytes costs ``limit`` bytes, not its size
        return self._io(f"reading {path}", lambda: self._read_range(path, limit))

    def _read_range(self, path: str, limit: int) -> bytes:
        try:
            return self.fs.cat_file(path, start=0, end=limit)
        except FileNotFoundError:
            raise
        except Exception as exc:
            # S3 and Azure answer any range of an empty object with 416 (InvalidRange); an
            # endpoint that cannot be reached is not asked a second time
            if unreachable_reason(exc) is None and self.fs.info(path).get("size") == 0:
                return b""
            raise

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

    def get_object(self, key: str, *, what: str = "", limit: int | None = None) -> bytes:
        """Object ``key``, or its first ``limit`` bytes when it is longer (a reader passes the
        stored size + 1, so an object longer than recorded costs one byte more, not its size)."""
        try:
            return self._read(self.object_path(key), limit)
        except FileNotFoundError:
            raise self._missing(key, what) from None

    @contextlib.contextmanager
    def object_ranges(self, key: str, *, what: str = "") -> Iterator[Callable[[int, int], bytes]]:
        """``read(start, end)``: bytes ``[start, end)`` of object ``key`` (fewer when it is
        shorter), for as long as the block runs: locally the file opened once (confined as
        :meth:`read` is) and read with ``pread``, remotely a ranged GET each."""
        path = self.object_path(key)

        def check(start: int, end: int) -> None:
            if not 0 <= start <= end:
                raise ValueError(f"bad range [{start}, {end}) of object {key}")

        if self.local:
            with contextlib.ExitStack() as stack:
                try:
                    f, _size = self._io(f"opening object {key}", lambda: stack.enter_context(self._open_local(path)))
                except FileNotFoundError:
                    raise self._missing(key, what) from None
                fd = f.fileno()

                def pread(start: int, end: int) -> bytes:
                    check(start, end)
                    return self._io(f"reading object {key}", lambda: os.pread(fd, end - start, start))

                yield pread
            return

        def get(start: int, end: int) -> bytes:
            check(start, end)
            if start == end:
                return b""

            def ranged() -> bytes:
                try:
                    return self.fs.cat_file(path, start=start, end=end)
                except FileNotFoundError:
                    raise
                except Exception as exc:
                    # S3 and Azure answer a range past the end with 416 (InvalidRange)
                    if unreachable_reason(exc) is None and self.fs.info(path).get("size", 0) <= start:
                        return b""
                    raise

            try:
                return self._io(f"reading object {key}", ranged)
            except FileNotFoundError:
                raise self._missing(key, what) from None

        yield get

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
            out_size = info.get("size") or 0
            yield ObjectInfo(key=key, size=int(out_size), mtime=entry_mtime(info))
