"""A store's files on a local disk (:class:`LocalFiles`, mixed into :class:`ckpt.storage.store.Store`).

Writes are atomic and durable: a file is written to a temporary name, fsynced and renamed
into place; the directories renamed into, and the parent of every directory made on the
way (``objects/ab/`` in ``objects/``, ``objects/`` in the root...), are fsynced by
:meth:`LocalFiles.sync_dirs` before a manifest commits, so a crash at any instant leaves
the last commit loadable. ``CKPT_FSYNC=0`` skips the fsyncs (not durable across power loss).

Reads are bounded and stay in the store: only a regular file under the store's root is
opened (symlinks resolved); a FIFO, a device or a path leading outside is a
:class:`~ckpt.errors.CorruptCheckpointError` naming it, never a hang or a read. Objects
are hashed or read straight into memory the caller gives, without a buffer their size.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import fsspec
import xxhash

from ckpt import config
from ckpt.errors import CorruptCheckpointError, MissingObjectError, StoreError
from ckpt.storage import direct_io

T = TypeVar("T")
log = logging.getLogger("ckpt")

#: what an interrupted atomic write leaves behind (see :func:`temporary_name`): harmless
TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{12}$")
#: piece size of :meth:`LocalFiles.hash_object` (stays in the CPU's cache)
_HASH_PIECE = 256 << 10
#: each thread's buffer for :meth:`LocalFiles.hash_object`: a fresh one per object cost a
#: page fault per page of it, every object (0.6 ms per MiB on this project's VMs)
_hash_buffers = threading.local()
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)


def temporary_name(path: str) -> str:
    """Where ``path`` is written before it is renamed into place (matches :data:`TEMPORARY`)."""
    return f"{path}.tmp-{uuid.uuid4().hex[:12]}"


class LocalFiles:
    """Atomic writes, directory fsyncs and confined reads of a local store."""

    # set by ckpt.storage.store.Store (fs, root and local when its filesystem is made)
    url: str
    fs: fsspec.AbstractFileSystem
    root: str
    local: bool
    _dirs_lock: threading.Lock
    #: directories whose entries changed since the last sync_dirs
    _dirty_dirs: set[str]
    #: directories this store has made (or found) already
    _made_dirs: set[str]
    #: the root with symlinks resolved, once it exists: local reads stay under it
    _real_root: str | None
    #: objects of :data:`ckpt.storage.direct_io.MIN_BYTES` or more are written around the page cache
    direct_writes: bool

    if TYPE_CHECKING:  # provided by Store

        def _io(self, what: str, fn: Callable[[], T], kind: str = "read") -> T: ...

        def object_path(self, key: str) -> str: ...

    # -- writing -------------------------------------------------------------------------
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
        root = (self.root or os.sep).rstrip(os.sep)
        if missing and (below == root or below.startswith(root + os.sep)):
            self._check_inside(below)  # what is made under a folder inside the store stays inside
        self.fs.makedirs(directory, exist_ok=True)
        self._check_inside(directory)
        if missing:
            with self._dirs_lock:
                self._dirty_dirs.update(os.path.dirname(d) for d in missing)
        self._made_dirs.add(directory)

    def _write_local(self, path: str, data: bytes | memoryview) -> None:
        directory = os.path.dirname(path)
        self._mkdir(directory)
        tmp = temporary_name(path)
        sync = config.fsync()
        # fsynced anyway and not read until a restore: large objects skip the page cache
        direct = sync and self.direct_writes and memoryview(data).nbytes >= direct_io.MIN_BYTES
        try:
            if not (direct and self._in_directory(directory, lambda: self._write_direct(tmp, data))):
                with self._in_directory(directory, lambda: open(tmp, "wb")) as f:
                    f.write(data)
                    if sync:
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

    def _write_direct(self, tmp: str, data: bytes | memoryview) -> bool:
        """``tmp`` written around the page cache and fsynced; False when this filesystem
        refuses ``O_DIRECT`` (then never tried again by this store: write it buffered)."""
        try:
            direct_io.write_file(tmp, data, sync=True)
        except direct_io.Refused as exc:
            self.direct_writes = False
            log.info("%s: writing through the page cache (%s)", self.url, exc.strerror)
            return False
        return True

    def _in_directory(self, directory: str, fn: Callable[[], T]) -> T:
        """``fn()``, which creates a file in ``directory``; a directory this store made that
        someone removed since (a cleaner of empty folders) is made again, its parent marked
        for :meth:`sync_dirs`, and ``fn`` called again. A store whose root is gone is not
        made again: that raises."""
        try:
            return fn()
        except FileNotFoundError:
            if directory not in self._made_dirs or not os.path.isdir(self.root):
                raise
        self._made_dirs.discard(directory)
        self._mkdir(directory)
        return fn()

    def sync_dirs(self) -> None:
        """Make renames and new directories done so far durable (local files only)."""
        if not (self.local and config.fsync()):
            return
        with self._dirs_lock:
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        ordered = sorted(dirs)
        for i, directory in enumerate(ordered):
            try:
                fd = os.open(directory, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                with self._dirs_lock:  # not durable yet: the next sync tries them again
                    self._dirty_dirs.update(ordered[i:])
                raise StoreError(
                    f"cannot make the folder {directory} of {self.url} durable (fsync): {exc}; "
                    "the commit waiting on it does not happen"
                ) from exc

    # -- reading -------------------------------------------------------------------------
    def _read_local(self, path: str, limit: int | None) -> bytes:
        with self._open_local(path) as (f, size):
            want = size + 1 if limit is None else min(limit, size + 1)
            return f.read(want)

    def _check_inside(self, folder: str) -> None:
        """Refuse to write in ``folder`` when it leads out of the store (a symlink): reads
        refuse what lies there, so a write must not land there."""
        real = os.path.realpath(folder)
        if not self._inside(real):
            raise CorruptCheckpointError(
                f"the folder {folder} of {self.url} leads to {real}, outside the store: refusing to write there"
            )

    def _inside(self, real: str) -> bool:
        """Whether resolved path ``real`` lies under the store's root (symlinks resolved too)."""
        root = self._real_root
        if root is None:
            root = os.path.realpath(self.root or "/")
            if os.path.isdir(root):
                self._real_root = root
        return real == root or real.startswith(root.rstrip(os.sep) + os.sep)

    @contextlib.contextmanager
    def _open_local(self, path: str) -> Iterator[tuple[io.BufferedReader, int]]:
        """A local file of the store opened for reading, and its size: only a regular file
        under the store's root (symlinks resolved), never a FIFO or a device."""
        real = os.path.realpath(path)
        if not self._inside(real):
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
            view: memoryview | None = getattr(_hash_buffers, "view", None)
            if view is None:
                view = _hash_buffers.view = memoryview(bytearray(_HASH_PIECE))
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
            raise self._missing(key, what) from None

    def with_object_file(self, key: str, fn: Callable[[int, int], T], *, what: str = "") -> T | None:
        """``fn(fd, size)`` on object ``key`` opened for reading (positional reads only: the
        descriptor is closed after it), with this store's retries and errors; None where this
        store cannot (remote stores)."""
        if not self.local:
            return None

        def run() -> T:
            with self._open_local(self.object_path(key)) as (f, size):
                return fn(f.fileno(), size)

        try:
            return self._io(f"reading object {key}", run)
        except FileNotFoundError:
            raise self._missing(key, what) from None

    def read_object_into(self, key: str, buf: memoryview, *, what: str = "") -> int | None:
        """Object ``key`` read into ``buf``: how many bytes it has, ``len(buf) + 1`` when it
        has more than fit (``buf`` then holds its first bytes), or None when this store cannot
        read into memory it is given (remote stores: call ``get_object``). Saves the
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
            raise self._missing(key, what) from None

    def _missing(self, key: str, what: str) -> MissingObjectError:
        where = f" (needed by {what})" if what else ""
        return MissingObjectError(f"object {key} is missing from {self.url}{where}")
