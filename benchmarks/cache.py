"""Cold page cache for restore figures: evict a checkpoint's files, and check that it worked.

Two methods:

* ``fadvise`` (portable, no privileges): fsync then ``posix_fadvise(POSIX_FADV_DONTNEED)`` on
  every file under the given paths. Only those files leave the page cache, so other
  processes on a shared machine are not disturbed.
* ``drop_caches`` (root only): ``sync`` then ``echo 3 > /proc/sys/vm/drop_caches``; the whole
  machine's page cache, dentries and inodes. Use it on an idle machine.

Either way, :func:`resident_fraction` (``mincore(2)`` on a mapping of each file) measures
what share of the files' pages is still in memory, so the report says whether the restore
really read from the device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable
from typing import Any

DROP_CACHES = "/proc/sys/vm/drop_caches"
METHODS = ("auto", "fadvise", "drop_caches", "off")


def files_under(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isfile(p):
            out.append(p)
            continue
        for root, _dirs, files in os.walk(p):
            out.extend(os.path.join(root, f) for f in files)
    return out


def can_drop_caches() -> str | None:
    """None when ``drop_caches`` is usable here, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root"
    if not os.access(DROP_CACHES, os.W_OK):
        return f"{DROP_CACHES} is not writable"
    return None


def can_fadvise() -> str | None:
    return None if hasattr(os, "posix_fadvise") else "os.posix_fadvise is not available on this platform"


def resolve(method: str) -> tuple[str, str]:
    """The method actually used for ``method`` and a sentence for the report.

    ``auto`` is ``fadvise`` (it evicts only the benchmark's own files, so it is safe on a
    shared machine); ``drop_caches`` falls back to ``fadvise`` when it cannot run; ``off``
    (or no method available) means the cold figures are not measured.
    """
    if method not in METHODS:
        raise ValueError(f"unknown page-cache method {method!r}; one of {METHODS}")
    if method == "off":
        return "off", "cold restores not measured (--cold off)"
    if method == "drop_caches":
        why = can_drop_caches()
        if why is None:
            return "drop_caches", f"page cache dropped before each cold restore (sync; echo 3 > {DROP_CACHES})"
        method = "fadvise"
        fallback = f"drop_caches unavailable ({why}); "
    else:
        fallback = ""
    why = can_fadvise()
    if why is not None:
        return "off", f"{fallback}cold restores not measured: {why}"
    return "fadvise", (
        f"{fallback}each system's files evicted before its cold restore with fsync + "
        "posix_fadvise(POSIX_FADV_DONTNEED) (no root needed; only those files)"
    )


def load(paths: Iterable[str | os.PathLike[str]]) -> float | None:
    """Read every file under ``paths`` once, so the page cache holds them (what a warm
    restore assumes: ckpt writes large objects around the page cache, so right after its
    save they are not cached, while other systems' files are); their resident share after."""
    files = files_under(paths)
    buf = bytearray(1 << 20)
    for name in files:
        with open(name, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return resident_fraction(files)


def evict(paths: Iterable[str | os.PathLike[str]], method: str) -> None:
    """Evict the files under ``paths`` from the page cache with a resolved ``method``."""
    files = files_under(paths)
    if method == "drop_caches":
        os.sync()
        with open(DROP_CACHES, "w") as f:
            f.write("3\n")
        return
    if method != "fadvise":
        return
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped by DONTNEED
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc: Any = None


def _mincore() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        _libc.mincore.restype = ctypes.c_int
    return _libc.mincore


def resident_fraction(paths: Iterable[str | os.PathLike[str]]) -> float | None:
    """Share of the pages of the files under ``paths`` that are in the page cache
    (``mincore``); None where that cannot be measured."""
    try:
        mincore = _mincore()
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    total = resident = 0
    for name in files_under(paths):
        size = os.path.getsize(name)
        if size == 0:
            continue
        pages = (size + page - 1) // page
        with open(name, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
            buf = (ctypes.c_ubyte * pages)()
            addr = _address(mm)
            if mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), buf) != 0:
                return None
            resident += sum(b & 1 for b in buf)
            total += pages
    return resident / total if total else None


def _address(mm: mmap.mmap) -> int:
    # The address of a read-only mapping (ctypes' from_buffer wants a writable buffer); the
    # temporary array is released at once, so the mapping can still be closed.
    import numpy as np

    arr = np.frombuffer(mm, dtype=np.uint8)
    addr = int(arr.ctypes.data)
    del arr
    return addr
