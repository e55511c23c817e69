"""Fresh host memory, faulted in ahead of a decode that fills it.

A restore decodes into fresh memory (the live objects change only once everything has
been verified), so every page of it is first touched by the decode: one page fault per
4 KiB. ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+) maps a whole range in one call:
on this project's 2-core machine a 91 MB model restored in 106-123 ms instead of
123-146 ms with one thread. Elsewhere, or where the kernel refuses it, nothing happens
and the pages fault in as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import sys
import threading
from collections.abc import Iterable
from typing import Any, TypeVar

import numpy as np

from ckpt.errors import CheckpointError

log = logging.getLogger("ckpt")

K = TypeVar("K")

_MADV_POPULATE_WRITE = 23  # include/uapi/asm-generic/mman-common.h
_PAGE = mmap.PAGESIZE
#: populating pays off for ranges of at least this many bytes
MIN_BYTES = 1 << 20

_lock = threading.Lock()
_madvise: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
_usable = sys.platform.startswith("linux")


def _function() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    global _madvise, _usable
    with _lock:
        if _madvise is None and _usable:
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                _usable = False
        return _madvise


def prefault(view: memoryview) -> None:
    """Map the whole pages of writable ``view`` (at least :data:`MIN_BYTES`) in one call."""
    if not _usable or view.nbytes < MIN_BYTES or view.readonly:
        return
    fn = _function()
    if fn is None:
        return
    addr = np.frombuffer(view, dtype=np.uint8).ctypes.data
    start = -(-addr // _PAGE) * _PAGE
    end = (addr + view.nbytes) // _PAGE * _PAGE
    if end > start and fn(start, end - start, _MADV_POPULATE_WRITE) != 0:
        _disable(ctypes.get_errno())


def _disable(errno: int) -> None:
    global _usable
    if errno in (22, 38):  # EINVAL (kernel before 5.14), ENOSYS: never again
        _usable = False
        log.debug("madvise(MADV_POPULATE_WRITE) unavailable (errno %d): pages fault in one by one", errno)


#: copies (copy_into) and hashes (ckpt.io.hashing) of at least this many bytes release the GIL
RELEASE_GIL_BYTES = 64 * 1024


def copy_into(dst: memoryview, src: bytes | bytearray | memoryview) -> None:
    """``dst[:] = src`` for contiguous buffers of the same size, with the GIL released when
    it is large: a memoryview assignment copies holding it, stopping every other Python
    thread (the training loop during a background save) for the copy; numpy lets go."""
    if dst.nbytes < RELEASE_GIL_BYTES:
        dst[:] = src
        return
    to, source = np.frombuffer(dst, dtype=np.uint8), np.frombuffer(src, dtype=np.uint8)
    if to.shape != source.shape:  # numpy would broadcast a one-byte source over all of dst
        raise ValueError(f"copy_into: {source.nbytes} bytes into a {to.nbytes}-byte destination")
    np.copyto(to, source)


class Scatter:
    """Where a streamed decode (:meth:`ckpt.codecs.zstd.ByteGroupZstdCodec.decode_file`) puts
    an object's bytes when they are not one buffer: byte ranges of it, each copied into a
    destination of its own as the blocks come by (the tensors of a packed object), the rest
    only read. No buffer the object's size: a restore in a fresh process would fault one in.

    ``parts`` are ``(at, dest)``: bytes ``[at, at + len(dest))`` of the object go to ``dest``.
    A range past the object's ``nbytes`` is a ValueError (a manifest validated never has one).
    """

    def __init__(self, nbytes: int, parts: Iterable[tuple[int, memoryview]]) -> None:
        self.nbytes = nbytes
        self.parts = sorted(parts, key=lambda p: p[0])
        for at, dest in self.parts:
            if at < 0 or at + dest.nbytes > nbytes:
                raise ValueError(f"bytes [{at}, {at + dest.nbytes}) of an object of {nbytes}")

    def __len__(self) -> int:
        return self.nbytes

    def write(self, at: int, block: memoryview) -> None:
        """Bytes ``[at, at + len(block))`` of the object, given in increasing order."""
        end = at + block.nbytes
        for start, dest in self.parts:
            if start >= end:
                break
            lo, hi = max(at, start), min(end, start + dest.nbytes)
            if lo < hi:
                copy_into(dest[lo - start : hi - start], block[lo - at : hi - at])


def payload_buffer(nbytes: int, *, what: str) -> np.ndarray:
    """An uninitialised byte buffer of ``nbytes``, a size a manifest gave (an object's, a
    packed object's, a box's): one the host cannot allocate is a CheckpointError, as for a tensor."""
    try:
        return np.empty(nbytes, dtype=np.uint8)
    except (MemoryError, ValueError) as exc:  # numpy's _ArrayMemoryError; a negative size
        raise CheckpointError(f"{what}: cannot allocate {nbytes} bytes for it ({type(exc).__name__})") from None


#: buffers of at least this many bytes are mapped on huge-page boundaries (see page_aligned)
HUGE_BYTES = 2 << 20
_huge = sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")


def page_aligned(nbytes: int) -> np.ndarray:
    """An uninitialised byte buffer of ``nbytes`` starting on a page: what a local store
    writes around the page cache (``O_DIRECT``, :mod:`ckpt.storage.direct_io`) goes from it
    to the device as it is, not through a copy into an aligned buffer.

    One of :data:`HUGE_BYTES` or more is its own anonymous mapping, starting on a 2 MiB
    boundary and advised ``MADV_HUGEPAGE``: where transparent huge pages are on (``always``
    or ``madvise``), its first touch faults 2 MiB at a time instead of 4 KiB. On this
    project's VM, writing fresh memory cost 0.50-0.65 ms per MiB in 4 KiB pages and
    0.09-0.11 ms in huge pages; numpy advises only allocations of 4 MiB or more, and one
    not on a 2 MiB boundary gets a huge page only where one fits whole. Elsewhere (the
    advice refused, no huge pages) it is an ordinary mapping."""
    if _huge and nbytes >= HUGE_BYTES:
        try:
            region = mmap.mmap(-1, nbytes + HUGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, OverflowError) as exc:  # ENOMEM, a size past ssize_t: as numpy's MemoryError
            raise MemoryError(f"cannot map {nbytes} bytes ({exc})") from None
        with contextlib.suppress(OSError):
            region.madvise(mmap.MADV_HUGEPAGE)
        raw = np.frombuffer(region, dtype=np.uint8)  # keeps the mapping alive as long as any view of it
        skip = -raw.ctypes.data % HUGE_BYTES
        return raw[skip : skip + nbytes]
    raw = np.empty(nbytes + _PAGE, dtype=np.uint8)
    skip = -raw.ctypes.data % _PAGE
    return raw[skip : skip + nbytes]


def tensor_span(t: Any) -> tuple[int, int]:
    """The addresses ``[start, end)`` of the bytes of CPU tensor ``t`` (``(0, 0)`` for none):
    from its first element to its last, whatever its strides."""
    if t.device.type != "cpu" or t.numel() == 0:
        return 0, 0
    start = t.data_ptr()
    last = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def sharing_memory(tensors: Iterable[tuple[K, Any]]) -> list[list[tuple[int, int, K]]]:
    """The groups (two or more) of ``(key, tensor)`` whose memory spans (:func:`tensor_span`)
    overlap, each member as ``(start, end, key)`` in address order."""
    spans = sorted(((a, b, k) for k, t in tensors for a, b in [tensor_span(t)] if b > a), key=lambda s: s[:2])
    groups: list[list[tuple[int, int, K]]] = []
    end = -1
    for a, b, k in spans:
        if groups and a < end:
            groups[-1].append((a, b, k))
            end = max(end, b)
        else:
            groups.append([(a, b, k)])
            end = b
    return [g for g in groups if len(g) > 1]
