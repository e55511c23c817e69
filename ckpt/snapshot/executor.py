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

import concurrent.futures
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
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


_cores: dict[int, threading.BoundedSemaphore] = {}
_cores_lock = threading.Lock()
_thread_state = threading.local()


def core_slots() -> threading.BoundedSemaphore:
    """The process's :func:`cpu_threads` slots (see :func:`core_slot`)."""
    n = cpu_threads()
    with _cores_lock:
        slots = _cores.get(n)
        if slots is None:
            slots = _cores[n] = threading.BoundedSemaphore(n)
    return slots


def core_slot() -> contextlib.AbstractContextManager[Any]:
    """One of :func:`core_slots`, held around a job's step that is CPU work alone, waits on
    nothing and takes no other slot (a save's encode): an I/O pool has more threads than
    cores so that waits overlap, but its CPU steps run better one per core. All 8 writing
    threads encoding at once finish their first objects together, late, and the device waits
    meanwhile; one encode per core finishes the first object in a core's time and its write
    starts then. Measured on this project's 2-core machine, saving the 1.2 GB benchmark state
    (five saves per run, alternated): medians of 494-517 ms with 2 slots against 585-618 ms
    without; the MiniLM saves did not change.

    A demoted thread (:func:`lower_priority`: the Checkpointer's background encodes) takes
    none: holding a core's slot at low priority would make a save of normal priority wait
    for it while training keeps the cores busy; the scheduler already serves it last."""
    if getattr(_thread_state, "demoted", False):
        return contextlib.nullcontext()
    return core_slots()


def new_io_pool(name: str = "ckpt-io", *, nice: int = 0, workers: int | None = None) -> ThreadPoolExecutor:
    """A pool for encode/write or read/decode work; ``nice`` demotes its threads (Linux)."""
    if nice:
        return ThreadPoolExecutor(
            workers or io_threads(), thread_name_prefix=name, initializer=lower_priority, initargs=(nice,)
        )
    return ThreadPoolExecutor(workers or io_threads(), thread_name_prefix=name)


class _CallPool(ThreadPoolExecutor):
    """An :func:`io_pool`'s executor, whose every worker can be made to wait at one gate."""

    def __init__(self, workers: int, name: str) -> None:
        super().__init__(workers, thread_name_prefix=name)
        self.workers = workers
        self.closed = False

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.closed = True
        super().shutdown(wait=wait, cancel_futures=cancel_futures)

    def gather_workers(self, each: Callable[[], None] | None = None) -> None:
        """Return once every worker has run ``each`` and waits at one gate, so has finished
        all the work given before (its futures' callbacks included: they run on the worker
        that finished it). Starts the workers of a new pool, before any work is given to
        it. On any failure (a thread that cannot start, an interrupt) the pool is shut down."""

        def arrive() -> None:
            if each is not None:
                each()
            gate.wait()

        gate = threading.Barrier(self.workers + 1)
        try:
            for _ in range(self.workers):
                self.submit(arrive)
            gate.wait()
        except BaseException:
            # the threads already waiting must not wait forever, with the shutdown waiting on them
            gate.abort()
            self.shutdown(wait=True)
            raise


#: pools of :func:`io_pool` between calls, by (name, workers): one each, 64 threads in all
_idle: dict[tuple[str, int], _CallPool] = {}
_idle_lock = threading.Lock()
IDLE_THREADS = 64


def _forget_threads() -> None:
    """In a forked child: the idle pools' threads are not there (only the forking one is),
    nor are the threads that held core slots (which the child would wait on forever)."""
    global _idle_lock, _cores_lock
    _idle.clear()
    _idle_lock = threading.Lock()
    _cores.clear()
    _cores_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_threads)


def shut_idle_pools() -> None:
    """Shut down the pools :func:`io_pool` keeps between calls (their threads end)."""
    with _idle_lock:
        pools = list(_idle.values())
        _idle.clear()
    for pool in pools:
        pool.shutdown(wait=True)


def _take_idle(key: tuple[str, int]) -> _CallPool | None:
    with _idle_lock:
        pool = _idle.pop(key, None)
    return pool if pool is not None and not pool.closed else None


def _keep_idle(key: tuple[str, int], pool: _CallPool) -> bool:
    with _idle_lock:
        if key in _idle or sum(p.workers for p in _idle.values()) + pool.workers > IDLE_THREADS:
            return False
        _idle[key] = pool
        return True


def _release_thread_state() -> None:
    """What a worker lets go of before it idles: its zstd contexts (a compressor at
    ``CKPT_ZSTD_LEVEL=19`` holds 90 MiB), made again by the next call that needs one."""
    from ckpt.codecs.zstd import release_thread_contexts

    release_thread_contexts()


@contextlib.contextmanager
def io_pool(name: str = "ckpt-io", workers: int | None = None) -> Iterator[ThreadPoolExecutor]:
    """A pool for one call (save, restore, verify, export), its own for the call.

    Its threads are started before any work is given to it: a thread started while its
    siblings already decode waits milliseconds for the GIL to report itself started (a
    restore of a 90 MB model spent a third of its time starting threads that way).

    When the call ends, every worker finishes the work it was given (its callbacks
    included) and drops its zstd contexts; the pool is then kept, idle, for the next call
    of that name and size, which starts no thread (starting and stopping a restore's pools
    took a fifth of a 31 ms restore of bf16 MiniLM). A call ending by an error shuts its
    pool down instead, waiting for its work.
    """
    n = workers or io_threads()
    key = (name, n)
    pool = _take_idle(key)
    if pool is None:
        pool = _CallPool(n, name)
        pool.gather_workers()
    kept = False
    try:
        yield pool
        pool.gather_workers(_release_thread_state)
        kept = _keep_idle(key, pool)
    finally:
        if not kept:
            with _idle_lock:  # (an interrupt may have come after it was kept)
                if _idle.get(key) is pool:
                    del _idle[key]
            pool.shutdown(wait=True)


def lower_priority(nice: int) -> None:
    """Demote the calling thread by ``nice`` (Linux schedules threads separately; elsewhere a no-op)."""
    # only Linux schedules threads by their own id; elsewhere the id could name another process
    if not nice:
        return
    _thread_state.demoted = True  # (see core_slot)
    if not sys.platform.startswith("linux") or not hasattr(os, "setpriority"):
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


def wait_all(futures: Iterable[Future[Any]], *, cancel_on_error: bool = False) -> None:
    """Wait for every future, then raise the first error (never leaves work running).

    ``cancel_on_error``: once one fails, those a pool has not started are cancelled (their
    work would be thrown away), and only the running ones are waited for. Only for futures
    a pool's ``submit`` gave: one that code sets itself must not be cancelled under it."""
    futures = list(futures)
    cancelled: set[int] = set()
    if cancel_on_error:
        _, pending = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        if any(f.done() and not f.cancelled() and f.exception() is not None for f in futures):
            cancelled = {id(f) for f in pending if f.cancel()}
        concurrent.futures.wait(futures)
    first: BaseException | None = None
    for f in futures:
        if id(f) in cancelled:
            continue
        try:
            f.result()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others finish
            if first is None:
                first = exc
    if first is not None:
        raise first
