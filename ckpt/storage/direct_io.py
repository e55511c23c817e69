"""Large files written around the page cache (``O_DIRECT``), for local stores.

A checkpoint object is written once, fsynced, and not read again until a restore, often
by another process on another day: copying it into the page cache first only costs CPU
(the kernel's copy of every byte, taken from the training loop during a background save)
and evicts pages that the job does use (its dataset, its code). ``O_DIRECT`` writes go
from the process's memory to the device. On this project's 2-core VM, where page-cache
pages are handed back to the host when freed and must be faulted in again, writing and
fsyncing 1 GiB in 16 MiB files on 4 threads took 8.2-9.5 s (13.6-16.0 CPU-s in the
kernel) buffered and 1.4-1.6 s (0.9 CPU-s) direct. The price: the first read of such an
object comes from the device, not from memory (1 GiB read cold in 0.73 s there, against
0.09 s from the page cache), so a store that a restart reads at once (a tiers' local
tier) keeps buffered writes (``Store.direct_writes``).

``O_DIRECT`` wants the memory address, the file offset and the length aligned to the
device's logical block: whole :data:`ALIGN` blocks go from the caller's buffer when it is
aligned, else through a reused aligned buffer per thread; the last partial block is
written buffered. A filesystem that refuses ``O_DIRECT`` (tmpfs before Linux 6.6, some
FUSE and network filesystems) gets an ordinary buffered write, the same bytes.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

import numpy as np

from ckpt.io.memory import copy_into

#: alignment of memory, offsets and lengths (covers 512-byte and 4 KiB logical blocks)
ALIGN = 4096
#: files smaller than this are written buffered: one block more or less is not worth a second path
MIN_BYTES = 1 << 20
#: size of the aligned buffer each writing thread keeps for unaligned data
PIECE = 4 << 20
#: the platform's flag (0 where there is none: macOS, Windows)
O_DIRECT: int = getattr(os, "O_DIRECT", 0)

_local = threading.local()
#: what a filesystem that does not take O_DIRECT answers (EINVAL on Linux; some FUSE and
#: network filesystems say "not supported")
_REFUSALS = frozenset({errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)})


class Refused(OSError):
    """The filesystem does not take ``O_DIRECT`` writes: write the file buffered instead."""


def _bounce() -> memoryview:
    """This thread's aligned buffer (mmap memory starts on a page; private, not mmap's
    default shared mapping, which a forked child would write into)."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = mmap.mmap(-1, PIECE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return memoryview(buf)


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if view.nbytes else 0


def write_file(path: str, data: bytes | bytearray | memoryview, *, sync: bool) -> None:
    """Create ``path`` (truncated if it exists) holding ``data``, its whole blocks written
    with ``O_DIRECT``; fsynced when ``sync``. :class:`Refused` when the filesystem does not
    take such writes (the caller writes the file again, buffered); any other OSError as raised."""
    if not O_DIRECT:
        raise Refused(errno.EINVAL, "O_DIRECT is not available on this platform", path)
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":  # offsets below are bytes: a flat byte view
        view = view.cast("B")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | O_DIRECT, 0o666)
    except OSError as exc:
        if exc.errno in _REFUSALS:
            raise Refused(exc.errno, f"O_DIRECT refused: {exc.strerror}", path) from exc
        raise
    try:
        whole = view.nbytes - view.nbytes % ALIGN
        done = _write_blocks(fd, view[:whole], path)
        if done < view.nbytes:  # the tail (and anything a short write left) is written buffered
            import fcntl  # POSIX only, as O_DIRECT is

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)
            _write_all(fd, view[done:])
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_blocks(fd: int, view: memoryview, path: str) -> int:
    """Write whole blocks of ``view`` with ``O_DIRECT``: how many bytes were written (a
    short write of whole blocks, as Linux makes of any write over 2 GiB - 4 KiB, goes on;
    one that is not stops here, leaving the rest to buffered writes)."""
    done = 0
    direct = _address(view) % ALIGN == 0
    bounce = None if direct else _bounce()
    while done < view.nbytes:
        if direct:
            piece = view[done:]
        else:
            assert bounce is not None
            n = min(PIECE, view.nbytes - done)
            copy_into(bounce[:n], view[done : done + n])
            piece = bounce[:n]
        try:
            wrote = os.write(fd, piece)
        except OSError as exc:
            if exc.errno in _REFUSALS and done == 0:
                raise Refused(exc.errno, f"O_DIRECT write refused: {exc.strerror}", path) from exc
            raise
        done += wrote
        if wrote == 0 or wrote % ALIGN:
            break
    return done


def _write_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < view.nbytes:
        done += os.write(fd, view[done:])
