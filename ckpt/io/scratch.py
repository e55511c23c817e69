"""Buffers reused from one object to the next instead of fresh memory for each.

Fresh memory is costly where the host takes freed pages back (this project's VMs): writing
16 MiB into a new mapping took 8.4-9.9 ms there, into one already used 0.7 ms. An encode
builds each object's payload in a buffer of its size, a restore reads each payload and
decodes each packed object into one: :func:`scratch` lends such buffers from a pool the
whole process shares, so that a training job's later checkpoints (and the later chunks of
one) find them mapped in already.

A buffer taken with :func:`scratch` inside a :func:`scope` goes back to the pool when the
scope ends, on the thread that opened it: nothing built in it may be used after that. Out
of a scope, :func:`scratch` gives fresh memory that nothing reuses.

The pool keeps as much as was ever lent at once (a save's threads each encoding a chunk, its
open packs), at least :data:`KEEP_BYTES` and at most :data:`MOST_BYTES`; what does not fit is
left to the garbage collector. A fixed bound below what one save uses at once made every
save fault part of its buffers in afresh: with 64 MiB kept, a save of all-MiniLM-L6-v2
(91 MB, 83 MiB of buffers at once) allocated ~40 MB anew each time and took 107 ms instead
of 80 (this project's 2-core VM).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np

from ckpt.errors import CheckpointError
from ckpt.io.memory import page_aligned

#: bytes the pool keeps between uses even where fewer were lent at once (four 16 MiB chunks' payloads)
KEEP_BYTES = 64 << 20
#: the most it keeps, however much was lent at once (a hostile manifest's object sizes included)
MOST_BYTES = 1 << 30
#: capacities are rounded up to this, so payloads of nearly one size share buffers
_ROUND = 1 << 20


class _Pool:
    def __init__(self, keep: int, most: int = MOST_BYTES) -> None:
        self.keep, self.most = keep, max(keep, most)
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        #: the bytes of each buffer lent and not given back, by id (one that :func:`release`
        #: took out, or that was never lent, counts for nothing when given), and the most
        #: bytes that ever were lent at once
        self._lent_ids: dict[int, int] = {}
        self._peak = 0

    def bound(self) -> int:
        """Bytes the pool keeps now: what was lent at once at most, within its bounds."""
        return min(self.most, max(self.keep, self._peak))

    def _lent(self, buf: np.ndarray) -> np.ndarray:
        self._lent_ids[id(buf)] = buf.nbytes
        self._peak = max(self._peak, sum(self._lent_ids.values()))
        return buf

    def take(self, nbytes: int, what: str = "a buffer") -> np.ndarray:
        if nbytes < 0:
            raise CheckpointError(f"{what}: cannot allocate {nbytes} bytes for it (a negative size)")
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.nbytes >= nbytes]
            if fits:
                return self._lent(self._free.pop(min(fits, key=lambda i: self._free[i].nbytes)))
        try:
            buf = page_aligned(-(-nbytes // _ROUND) * _ROUND)
        except (MemoryError, ValueError) as exc:  # numpy's _ArrayMemoryError; a negative size
            # a size a manifest gave (an object's payload): the host cannot have it
            raise CheckpointError(f"{what}: cannot allocate {nbytes} bytes for it ({type(exc).__name__})") from None
        with self._lock:
            return self._lent(buf)

    def give(self, bufs: list[np.ndarray]) -> None:
        with self._lock:
            for b in bufs:
                self._lent_ids.pop(id(b), None)
            free = sorted(self._free + bufs, key=lambda b: b.nbytes, reverse=True)
            kept, total, keep = [], 0, self.bound()
            for b in free:  # the largest first: they serve any smaller payload too
                if total + b.nbytes <= keep:
                    kept.append(b)
                    total += b.nbytes
            self._free = kept

    def held(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._free)


_pool = _Pool(KEEP_BYTES)
_local = threading.local()


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Buffers :func:`scratch` lends on this thread inside the block return to the pool at its end."""
    outer = getattr(_local, "lent", None)
    lent: list[np.ndarray] = []
    _local.lent = lent
    try:
        yield
    finally:
        _local.lent = outer
        _pool.give(lent)


def scratch(nbytes: int) -> np.ndarray:
    """An uninitialised, page-aligned byte buffer of ``nbytes``: reused, and given back to the
    pool when this thread's :func:`scope` ends; fresh outside of one."""
    lent: list[np.ndarray] | None = getattr(_local, "lent", None)
    if lent is None:
        return page_aligned(nbytes)
    buf = _pool.take(nbytes)
    lent.append(buf)
    return buf[:nbytes]


def lend(nbytes: int, *, what: str = "a buffer") -> np.ndarray:
    """A page-aligned buffer of at least ``nbytes`` from the pool, whatever thread or scope:
    the caller gives it back with :func:`give_back` once nothing uses it (one never given
    back is left to the garbage collector). A size the host cannot allocate (one a hostile
    manifest gave) is a CheckpointError naming ``what``."""
    return _pool.take(nbytes, what)


def give_back(buf: np.ndarray) -> None:
    """Return a buffer :func:`lend` gave: nothing may use it any more."""
    _pool.give([buf])


def release() -> list[np.ndarray]:
    """Take every buffer out of the pool, as at the start of a process: dropping them gives
    their memory back (once nothing else uses them); :func:`give_back` returns them."""
    with _pool._lock:
        taken, _pool._free = _pool._free, []
    return taken


def held() -> int:
    """Bytes the pool holds for reuse."""
    return _pool.held()
