"""A save's encodes run one per core (ckpt.snapshot.executor.core_slot) while its writes
overlap on the I/O pool's other threads; an encode waiting on the store for its delta base
takes no slot; a forked child does not inherit slots held by its parent's threads."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch

import ckpt
from ckpt.codecs import delta as deltamod
from ckpt.snapshot import executor
from ckpt.testing import assert_same_state, clone_state


def _state(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # each tensor above the pack threshold and below a chunk: one object each
    return {f"t{i}": torch.randn(512 * 1024, generator=g) * 0.02 for i in range(n)}


@contextlib.contextmanager
def _every_slot_held() -> Iterator[None]:
    """Every core slot of this process held by the test's thread for the block."""
    slots = executor.core_slots()
    held = 0
    try:
        for _ in range(executor.cpu_threads()):
            assert slots.acquire(timeout=5)
            held += 1
        yield
    finally:
        for _ in range(held):
            slots.release()


def _assert_restores(url: str, state: dict[str, torch.Tensor], step: int | None = None) -> None:
    restored = {"state": {k: torch.zeros_like(v) for k, v in state.items()}}
    ckpt.restore(url, restored, step=step)
    assert_same_state(restored["state"], state)


def test_encodes_run_one_per_core_while_the_pool_has_more_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_THREADS", "8")
    real = deltamod.choose
    lock = threading.Lock()
    running = 0
    most = 0
    threads: set[str] = set()

    def choose(*args, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            threads.add(threading.current_thread().name)
        try:
            time.sleep(0.02)  # long enough for every pool thread to arrive meanwhile
            return real(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(deltamod, "choose", choose)
    state = _state()
    ckpt.save(str(tmp_path / "store"), {"state": state}, step=1)
    cores = executor.cpu_threads()
    assert 1 <= most <= cores, (most, cores)
    if cores > 1:
        assert len(threads) > 1  # still spread over the pool's threads
    _assert_restores(str(tmp_path / "store"), state)


def test_an_encode_reading_its_base_from_the_store_takes_no_core_slot(tmp_path):
    """A delta against the stored parent (a plain save after a plain save) reads the base
    from the store, which waits on I/O (a GET on a remote store): it must not hold a core
    meanwhile. Every slot is held here; such a save still completes."""
    url = str(tmp_path / "store")
    state = _state(4)
    ckpt.save(url, {"state": state}, step=1)
    changed = clone_state(state)
    for v in changed.values():
        v[:1024] += 1.0  # a small change: each chunk is a delta candidate of its stored parent
    done = threading.Event()
    failure: list[BaseException] = []

    def save() -> None:
        try:
            info = ckpt.save(url, {"state": changed}, step=2)
            assert info.write_stats is not None and info.write_stats.parent_reads == len(changed)
        except BaseException as exc:  # reported below
            failure.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=save, daemon=True)
    with _every_slot_held():
        worker.start()
        finished = done.wait(timeout=60)
    worker.join(timeout=60)
    assert finished, "a save of deltas against stored bases waited for a core slot"
    assert not failure, failure
    _assert_restores(url, changed, step=2)


def test_a_checkpointers_background_encodes_take_no_core_slot(tmp_path):
    """The Checkpointer's encodes run demoted (CKPT_BACKGROUND_NICE): holding a core's slot
    at low priority would make a save of normal priority wait behind them while training
    keeps the cores busy. Every slot is held here; a background save still commits."""
    state = _state(4)
    # (the slots go back before the Checkpointer waits for its save on exit)
    with ckpt.Checkpointer(str(tmp_path / "store")) as ck, _every_slot_held():
        pending = ck.save({"state": state}, step=1)
        try:
            info = pending.wait(timeout=60)
        except ckpt.CheckpointError:
            info = None
    assert info is not None and info.step == 1, "the background save waited for a core slot"
    _assert_restores(str(tmp_path / "store"), state)


@pytest.mark.skipif(not hasattr(os, "fork") or not sys.platform.startswith("linux"), reason="fork is POSIX's")
def test_a_forked_child_does_not_wait_on_slots_its_parent_held(tmp_path):
    state = _state(2)  # made before the fork: torch's own thread pool is not the subject here
    with _every_slot_held():
        pid = os.fork()
        if pid == 0:  # the child: the threads holding the slots are not here
            try:
                torch.set_num_threads(1)
                ckpt.save(str(tmp_path / "child"), {"state": state}, step=1)
                ok = True
            except BaseException:
                ok = False
            os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not done:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert done, "the forked child's save waited on core slots its parent's threads held"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    _assert_restores(str(tmp_path / "child"), state)
