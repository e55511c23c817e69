"""The only owner of ckpt's thread pools: their sizing, names and priorities.

Every module that runs work in parallel asks here: :func:`io_pool` for a save, restore,
verify or export (2 x cores, within 8..32, ``CKPT_THREADS``; :func:`cpu_threads` for work
that waits on no I/O), :class:`Background` for the
Checkpointer's persistence (one committing thread plus a demoted I/O pool). Nothing else
in ckpt creates thread pools; the one other thread is the writer lease's heartbeat
(:mod:`ckpt.storage.writer_lease`), which must beat while saves and training run.

A call's :func:`io_pool` stays, idle, for the next call of its name and size (at most
:data:`IDLE_THREADS` threads in all; none in a forked child); :func:`shut_idle_pools` ends
those threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ckpt import config

log = logging.getLogger("ckpt")


def io_threads() -> int:
    """Worker threads of one I/O pool (see ``config.io_threads``)."""
    return config.io_threads()


def cpu_threads() -> int:
    """Worker threads for work bound by the CPU alone: the cores this process may run on
    (at most :func:`io_threads`). Decoding a restore whose objects were just read, so are in
    the page cache, is such work: on this project's 2-core machine the 1.2 GB benchmark
    state decoded into its live tensors in 0.70-0.91 s with 2 threads, 0.94-2.44 s with 8
    (three restores each in two processes; more threads each hold a buffer and thrash the
    caches)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, io_threads()))


def new_io_pool(name: str = "ckpt-io", *, nice: int = 0, workers: int | None = None) -> ThreadPoolExecutor:
    """A pool for encode/write or read/decode work; ``nice`` demotes its threads (Linux)."""
    if nice:
        return ThreadPoolExecutor(
            workers or io_threads(), thread_name_prefix=name, initializer=lower_priority, initargs=(nice,)
        )
    return ThreadPoolExecutor(workers or io_threads(), thread_name_prefix=name)


class _CallPool(ThreadPoolExecutor):
    """An :func:`io_pool`'s executor: counts the work given to it that has not finished,
    so that it is kept for a later call only when none is left."""

    def __init__(self, workers: int, name: str) -> None:
        super().__init__(workers, thread_name_prefix=name)
        self.workers = workers
        self._pending = 0
        self._pending_lock = threading.Lock()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        def run() -> Any:
            # counted off before its future is done: whoever waited on it finds it counted
            # (a cancelled job never is: its pool is then shut down, not kept)
            try:
                return fn(*args, **kwargs)
            finally:
                self._finished()

        with self._pending_lock:
            self._pending += 1
        try:
            return super().submit(run)
        except BaseException:
            self._finished()
            raise

    def start_threads(self) -> None:
        """Every worker started, waiting for work (not counted as work: see :func:`io_pool`)."""
        gate = threading.Barrier(self.workers + 1)
        try:
            for _ in range(self.workers):
                super().submit(gate.wait)
            gate.wait()
        except BaseException:
            # a thread that could not start (or an interrupt): the threads already waiting
            # must not wait forever, with the pool's shutdown waiting on them
            gate.abort()
            self.shutdown(wait=True)
            raise

    def _finished(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    def idle(self) -> bool:
        with self._pending_lock:
            return self._pending == 0


#: pools of :func:`io_pool` between calls, by (name, workers): one each, 64 threads in all
_idle: dict[tuple[str, int], _CallPool] = {}
_idle_lock = threading.Lock()
IDLE_THREADS = 64


def _forget_idle() -> None:
    """In a forked child: the idle pools' threads are not there (only the forking one is)."""
    global _idle_lock
    _idle.clear()
    _idle_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_idle)


def shut_idle_pools() -> None:
    """Shut down the pools :func:`io_pool` keeps between calls (their threads end)."""
    with _idle_lock:
        pools = list(_idle.values())
        _idle.clear()
    for pool in pools:
        pool.shutdown(wait=True)


def _keep_idle(key: tuple[str, int], pool: _CallPool) -> bool:
    with _idle_lock:
        if key in _idle or sum(p.workers for p in _idle.values()) + pool.workers > IDLE_THREADS:
            return False
        _idle[key] = pool
        return True


@contextlib.contextmanager
def io_pool(name: str = "ckpt-io", workers: int | None = None) -> Iterator[ThreadPoolExecutor]:
    """A pool for one call (save, restore, verify, export), its own for the call.

    Its threads are started before any work is given to it: a thread started while its
    siblings already decode waits milliseconds for the GIL to report itself started (a
    restore of a 90 MB model spent a third of its time starting threads that way). When
    the call ends with none of its work left, the pool is kept, idle, for the next call of
    that name and size, which starts none (creating and shutting down a restore's pools
    took a fifth of a 31 ms restore of bf16 MiniLM); else it is shut down, waiting for its
    work, as when the call ends by an error.
    """
    n = workers or io_threads()
    key = (name, n)
    with _idle_lock:
        pool = _idle.pop(key, None)
    if pool is None:
        pool = _CallPool(n, name)
        pool.start_threads()
    kept = False
    try:
        yield pool
        kept = pool.idle() and _keep_idle(key, pool)
    finally:
        if not kept:
            pool.shutdown(wait=True)


def lower_priority(nice: int) -> None:
    """Demote the calling thread by ``nice`` (Linux schedules threads separately; elsewhere a no-op)."""
    # only Linux schedules threads by their own id; elsewhere the id could name another process
    if not nice or not sys.platform.startswith("linux") or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:  # a sandbox that forbids it: run at normal priority
        log.debug("cannot lower the priority of %s: %s", threading.current_thread().name, exc)


def serial_pool(name: str) -> ThreadPoolExecutor:
    """One background thread that runs its jobs in order (the tiers' persisting copies)."""
    return ThreadPoolExecutor(1, thread_name_prefix=name)


class Background:
    """The Checkpointer's threads: one that runs each save's commit in order, and an I/O pool
    at lower priority (``CKPT_BACKGROUND_NICE``) for its encode and write work."""

    def __init__(self) -> None:
        self.commits = ThreadPoolExecutor(1, thread_name_prefix="ckpt-persist")
        self.io = new_io_pool("ckpt-io", nice=config.background_nice())

    def shutdown(self) -> None:
        self.commits.shutdown(wait=True)
        self.io.shutdown(wait=True)


def wait_all(futures: Iterable[Future[Any]]) -> None:
    """Wait for every future, then raise the first error (never leaves work running)."""
    first: BaseException | None = None
    for f in list(futures):
        try:
            f.result()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others finish
            if first is None:
                first = exc
    if first is not None:
        raise first
