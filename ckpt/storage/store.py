"""The store: ckpt's storage contract on top of any fsspec filesystem.

::

    <root>/objects/<2 hex>/<key>   immutable, content-addressed, encoded
    <root>/manifests/<step>.json   one per committed checkpoint (canonical names only)
    <root>/refs/latest             step and seq of the latest commit, written after it: a hint

Commit order is objects, then the manifest, then ``refs/latest``; a checkpoint without a
manifest does not exist, and a ref that cannot be written does not undo a commit (which
checkpoint is the latest is decided in :mod:`ckpt.storage.lineage`). Local files are written to a temporary name, fsynced and
renamed, and their directories fsynced before the manifest, so a crash at any instant
leaves the last commit loadable. Object stores get whole-object PUTs, which are atomic
(large objects go up in parts, in parallel, and appear only when the upload completes);
nothing relies on rename or on fsync there.

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
import io
import json
import logging
import os
import re
import stat
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import fsspec
import xxhash
from fsspec.implementations.local import LocalFileSystem

from ckpt import config
from ckpt.codecs.base import CodecContext
from ckpt.codecs.crypto import manifest_json
from ckpt.errors import CheckpointError, CorruptCheckpointError, MissingObjectError, NoCheckpointError, StoreError
from ckpt.storage.backends import tune_client
from ckpt.storage.lineage import Ref, find_latest
from ckpt.storage.retry import GaveUp, Retrier, unreachable_reason

log = logging.getLogger("ckpt")

T = TypeVar("T")

# Canonical manifest names only: "0009.json" or "+9.json" would alias step 9, and a
# step of thousands of digits would not even convert to an int.
_STEP_FILE = re.compile(r"^(0|[1-9][0-9]{0,17})\.json$")
# What an interrupted local atomic write leaves behind (see Store._write_local): harmless.
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{12}$")
# A ref is a few dozen bytes; anything longer is not one.
_REF_BYTES = 4096
_KEY = re.compile(r"^[0-9a-f]{8,}(\.[0-9a-z.]+)?$")
# What object_path accepts: one safe path component (manifests validate the strict key grammar).
_OBJECT_NAME = re.compile(r"[0-9a-f]{2}[0-9a-z._-]{0,254}")
#: piece size of :meth:`Store.hash_object` (stays in the CPU's cache)
_HASH_PIECE = 1 << 20
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)


def _mtime(info: Mapping[str, Any]) -> float | None:
    """Modification time of a listing entry in Unix seconds, whatever the backend calls it."""
    mtime: Any = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return float(mtime) if isinstance(mtime, (int, float)) else None


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float | None


class Store:
    """One checkpoint store at ``url`` (an fsspec URL or a local path)."""

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

    def _mkdir(self, directory: str) -> None:
        """Make ``directory`` and any missing above it. The parent of each one that was
        missing is marked for :meth:`sync_dirs`: a new directory (and every file under it)
        survives a crash only once its entry in its parent is durable."""
        if directory in self._made_dirs:
            return
        missing: list[str] = []
        below = directory
        while not os.path.isdir(below):
            missing.append(below)
            above = os.path.dirname(below)
            if above == below:
                break
            below = above
        self.fs.makedirs(directory, exist_ok=True)
        if missing:
            with self._dirs_lock:
                self._dirty_dirs.update(os.path.dirname(d) for d in missing)
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

    def _read_local(self, path: str, limit: int | None) -> bytes:
        with self._open_local(path) as (f, size):
            want = size + 1 if limit is None else min(limit, size + 1)
            return f.read(want)

    @contextlib.contextmanager
    def _open_local(self, path: str) -> Iterator[tuple[io.BufferedReader, int]]:
        """A local file of the store opened for reading, and its size: only a regular file
        under the store's root (symlinks resolved), never a FIFO or a device."""
        real = os.path.realpath(path)
        root = self._real_root
        if root is None:
            root = os.path.realpath(self.root or "/")
            if os.path.isdir(root):
                self._real_root = root
        if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
            raise CorruptCheckpointError(
                f"{path} of {self.url} leads to {real}, outside the store: refusing to read it"
            )
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
        try:
            fd = os.open(real, os.O_RDONLY | _O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY)
        except NotADirectoryError:
            raise CorruptCheckpointError(
                f"{path} of {self.url} cannot be read: a folder on its way is not a folder (a damaged store)"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptCheckpointError(f"{path} of {self.url} is not a regular file: refusing to read it")
            f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f, st.st_size

    def hash_object(self, key: str, limit: int, *, what: str = "") -> tuple[str, int] | None:
        """The content hash of object ``key`` as stored and its size (at most ``limit`` + 1
        bytes are read), streamed through a small buffer; None when this store cannot (remote
        stores). Verifies a raw object without a buffer its size."""
        if not self.local:
            return None

        def read() -> tuple[str, int]:
            digest = xxhash.xxh3_128()
            buf = bytearray(_HASH_PIECE)
            view = memoryview(buf)
            got = 0
            with self._open_local(self.object_path(key)) as (f, _size):
                while got <= limit:
                    n = f.readinto(view[: min(_HASH_PIECE, limit + 1 - got)])
                    if not n:
                        break
                    digest.update(view[:n])
                    got += n
            return digest.hexdigest(), got

        try:
            return self._io(f"reading object {key}", read)
        except FileNotFoundError:
            where = f" (needed by {what})" if what else ""
            raise MissingObjectError(f"object {key} is missing from {self.url}{where}") from None

    def read_object_into(self, key: str, buf: memoryview, *, what: str = "") -> int | None:
        """Object ``key`` read into ``buf``: how many bytes it has, ``len(buf) + 1`` when it
        has more than fit (``buf`` then holds its first bytes), or None when this store cannot
        read into memory it is given (remote stores: call :meth:`get_object`). Saves the
        allocation and the copy of a payload on local disk: a raw object goes straight into
        the tensor's memory."""
        if not self.local:
            return None

        def read() -> int:
            with self._open_local(self.object_path(key)) as (f, _size):
                got = 0
                while got < len(buf):
                    n = f.readinto(buf[got:])
                    if not n:
                        return got
                    got += n
                return got + len(f.read(1))

        try:
            return self._io(f"reading object {key}", read)
        except FileNotFoundError:
            where = f" (needed by {what})" if what else ""
            raise MissingObjectError(f"object {key} is missing from {self.url}{where}") from None

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
            out_size = info.get("size") or 0
            yield ObjectInfo(key=key, size=int(out_size), mtime=_mtime(info))

    # -- manifests and refs --------------------------------------------------------------
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
            return [(i["name"].rstrip("/").rsplit("/", 1)[-1], _mtime(i), i.get("type") == "file") for i in infos]

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
            if not (f and _STEP_FILE.match(n)) and not (f and _TEMPORARY.search(n))
        )

    def read_manifest(self, step: int) -> bytes:
        """The manifest JSON of ``step`` (an encrypted store's opened and authenticated)."""
        try:
            return manifest_json(self.codec_context, step, self.read(self.manifest_path(step)))
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
