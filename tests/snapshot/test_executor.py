"""ckpt.snapshot.executor.io_pool: a call's pool, kept idle for the next call once every
worker has finished the call's work and dropped its zstd contexts; shut down when the call
ends by an error."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from ckpt.snapshot import executor
from ckpt.snapshot.executor import io_pool


@pytest.fixture(autouse=True)
def _no_idle_pools():
    executor.shut_idle_pools()
    yield
    executor.shut_idle_pools()


def test_shut_idle_pools_ends_their_threads():
    with io_pool("t-shut", 2) as pool:
        pool.submit(lambda: 1).result()
    assert any(t.name.startswith("t-shut") for t in threading.enumerate())
    executor.shut_idle_pools()
    assert pool._shutdown and not any(t.name.startswith("t-shut") for t in threading.enumerate())


def _on_every_worker(pool, fn):
    """``fn()`` run once on every worker of ``pool`` (one job each, held at a barrier)."""
    n = pool._max_workers
    gate = threading.Barrier(n)

    def job():
        gate.wait(timeout=10)
        return threading.get_ident(), fn()

    return [f.result() for f in [pool.submit(job) for _ in range(n)]]


def _threads(pool) -> set[int]:
    return {ident for ident, _ in _on_every_worker(pool, lambda: None)}


def test_a_finished_call_leaves_its_pool_to_the_next_call_of_its_name_and_size():
    with io_pool("t-reuse", 3) as pool:
        first = _threads(pool)
    with io_pool("t-reuse", 3) as again:
        assert again is pool
        assert _threads(again) == first  # no thread started
    with io_pool("t-reuse", 2) as other:  # another size: another pool
        assert other is not pool


def test_calls_at_once_never_share_a_pool():
    with io_pool("t-nested", 2) as outer, io_pool("t-nested", 2) as inner:
        assert outer is not inner
        assert not (_threads(outer) & _threads(inner))
    # both idle again; one of them is kept, the other shut down
    assert sum(1 for key in executor._idle if key == ("t-nested", 2)) == 1


def test_a_call_ending_in_an_error_shuts_its_pool_down():
    with pytest.raises(KeyError), io_pool("t-error", 2) as pool:
        pool.submit(lambda: 1).result()
        raise KeyError("boom")
    assert pool._shutdown
    with io_pool("t-error", 2) as fresh:
        assert fresh is not pool


def test_work_left_running_is_waited_for_before_the_pool_is_kept():
    done = threading.Event()

    def slow() -> None:
        time.sleep(0.2)
        done.set()

    with io_pool("t-left", 2) as pool:
        pool.submit(slow)  # never waited on by the call
    assert done.is_set()  # the call's end waited for it
    assert executor._idle.get(("t-left", 2)) is pool  # then kept: nothing of the call runs on it


def test_a_failing_job_leaves_its_pool_to_be_kept():
    with io_pool("t-failing", 2) as pool, pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result()
    assert executor._idle.get(("t-failing", 2)) is pool


def test_idle_threads_stay_bounded():
    for i in range(executor.IDLE_THREADS):
        with io_pool(f"t-bound-{i}", 4):
            pass
    assert sum(p.workers for p in executor._idle.values()) <= executor.IDLE_THREADS
    with io_pool("t-big", executor.IDLE_THREADS + 1) as big:
        pass
    assert big._shutdown  # larger than all the idle threads allowed: never kept


@pytest.mark.skipif(not hasattr(os, "fork") or not sys.platform.startswith("linux"), reason="fork is POSIX's")
def test_a_forked_child_does_not_inherit_idle_pools_without_threads():
    """A DataLoader worker forked after a restore: the parent's idle pools have no threads in
    it, and work given to one would never run."""
    with io_pool("t-fork", 2) as pool:
        pool.submit(lambda: 1).result()
    assert executor._idle.get(("t-fork", 2)) is pool
    pid = os.fork()
    if pid == 0:  # the child: must finish its call, not hang
        signal.alarm(20)
        try:
            with io_pool("t-fork", 2) as child_pool:
                ok = child_pool is not pool and child_pool.submit(lambda: 41 + 1).result(timeout=10) == 42
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_the_call_returns_after_the_callbacks_of_its_work():
    """A progress callback (``add_done_callback``) runs on the worker after the job: the call
    must not return before it, as it did not when the pool was shut down at its end."""
    order = []

    def slow_callback(_future) -> None:
        time.sleep(0.2)
        order.append("callback")

    with io_pool("t-callbacks", 2) as pool:
        pool.submit(lambda: 1).add_done_callback(slow_callback)
    order.append("returned")
    assert order == ["callback", "returned"]


def test_an_interrupt_as_the_pool_is_kept_leaves_no_shut_pool_to_the_next_call(monkeypatch):
    kept = executor._keep_idle

    def interrupted(key, pool):
        kept(key, pool)
        raise KeyboardInterrupt

    monkeypatch.setattr(executor, "_keep_idle", interrupted)
    with pytest.raises(KeyboardInterrupt), io_pool("t-interrupt", 2) as pool:
        pass
    assert pool._shutdown
    monkeypatch.setattr(executor, "_keep_idle", kept)
    with io_pool("t-interrupt", 2) as fresh:
        assert fresh is not pool
        assert fresh.submit(lambda: 7).result(timeout=10) == 7
    # and one found shut down in the idle pools (any other way) is never handed out
    with executor._idle_lock:
        executor._idle[("t-interrupt", 2)] = pool
    with io_pool("t-interrupt", 2) as again:
        assert again is not pool


def test_idle_workers_hold_no_zstd_compressors():
    """A compressor at CKPT_ZSTD_LEVEL=19 holds 90 MiB: an idle worker must not keep one."""
    from ckpt.codecs import zstd

    with io_pool("t-contexts", 2) as pool:
        _on_every_worker(pool, lambda: zstd._compressor(3).compress(b"x" * 1000))
    with io_pool("t-contexts", 2) as again:
        assert again is pool
        held = _on_every_worker(
            again, lambda: (getattr(zstd._local, "cctx", None), getattr(zstd._local, "prefix_dctx", None))
        )
    assert [h for _, h in held] == [(None, None)] * 2


def test_wait_all_cancelling_on_error_runs_nothing_more_and_raises_the_error():
    ran: list[int] = []
    gate = threading.Event()

    def job(i: int) -> None:
        if i == 0:
            gate.wait(5)
            raise ValueError("object 0 refused")
        time.sleep(0.05)  # (the one that starts while the error is being seen)
        ran.append(i)

    with io_pool("test-cancel", 1) as pool:
        futures = [pool.submit(job, i) for i in range(20)]
        gate.set()
        with pytest.raises(ValueError, match="object 0 refused"):
            executor.wait_all(futures, cancel_on_error=True)
        assert all(f.done() for f in futures)  # nothing left running
    assert len(ran) <= 1  # one thread: of the 19 behind the failure, the one it started at most
    ran.clear()

    with io_pool("test-cancel", 1) as pool:  # without it, every job runs before the error
        futures = [pool.submit(job, i) for i in range(20)]
        with pytest.raises(ValueError):
            executor.wait_all(futures)
    assert ran == list(range(1, 20))
