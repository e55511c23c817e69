"""Buffers reused from one object to the next (ckpt.io.scratch): lent within a scope and
taken back at its end, bounded, never showing a former user's bytes in what is saved."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import ckpt
from ckpt.hooks.manager import get_plugins
from ckpt.io import scratch
from ckpt.io.reader import Reader
from ckpt.storage.store import Store
from ckpt.testing import assert_same_state, clone_state


def _address(a: np.ndarray) -> int:
    return int(a.ctypes.data)


@pytest.fixture
def pool(monkeypatch):
    """A pool of this test's own (the process's is shared by every save)."""
    fresh = scratch._Pool(scratch.KEEP_BYTES)
    monkeypatch.setattr(scratch, "_pool", fresh)
    return fresh


def test_a_buffer_lent_in_a_scope_is_lent_again_after_it(pool):
    with scratch.scope():
        a = scratch.scratch(3 << 20)
        first = _address(a)
        assert a.nbytes == 3 << 20 and first % 4096 == 0
    assert pool.held() >= 3 << 20
    with scratch.scope():
        b = scratch.scratch((3 << 20) - 5)  # nearly the same size: the same buffer
        assert _address(b) == first
        c = scratch.scratch(1 << 20)  # a second one at once: another buffer
        assert _address(c) != first


def test_out_of_a_scope_memory_is_fresh(pool):
    a = scratch.scratch(1 << 20)
    b = scratch.scratch(1 << 20)
    assert _address(a) != _address(b)
    assert pool.held() == 0


def test_nested_scopes_give_back_their_own_buffers(pool):
    with scratch.scope():
        outer = scratch.scratch(1 << 20)
        with scratch.scope():
            inner = scratch.scratch(1 << 20)
        assert pool.held() == 1 << 20  # the inner scope's buffer, back
        # the outer buffer is still lent: the inner one is handed out again, not it
        assert _address(scratch.scratch(1 << 20)) == _address(inner) != _address(outer)
    assert pool.held() == 2 << 20


def test_scopes_are_per_thread(pool):
    addresses: list[int] = []
    barrier = threading.Barrier(2)

    def work() -> None:
        with scratch.scope():
            addresses.append(_address(scratch.scratch(1 << 20)))
            barrier.wait()  # both hold theirs at once: two different buffers

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(addresses)) == 2
    assert pool.held() >= 2 << 20


def test_the_pool_keeps_what_was_lent_at_once_within_its_bounds(monkeypatch):
    small = scratch._Pool(4 << 20, most=6 << 20)
    monkeypatch.setattr(scratch, "_pool", small)
    with scratch.scope():
        for _ in range(5):
            scratch.scratch(1 << 20)
        scratch.scratch(3 << 20)
    # 8 MiB were lent at once: more than the 4 it keeps anyway, less than the 6 at most
    assert small.held() == 6 << 20
    # the largest are kept first: they serve any smaller payload too
    assert max(b.nbytes for b in small._free) == 3 << 20


def test_the_pool_keeps_all_that_one_use_lent_at_once(monkeypatch):
    pool = scratch._Pool(2 << 20)
    monkeypatch.setattr(scratch, "_pool", pool)
    with scratch.scope():
        first = sorted(_address(scratch.scratch(n << 20)) for n in (3, 1, 1, 2))
    assert pool.held() == 7 << 20  # over its 2 MiB: that use needed them all
    fresh: list[int] = []
    real = scratch.page_aligned
    monkeypatch.setattr(scratch, "page_aligned", lambda n: fresh.append(n) or real(n))
    with scratch.scope():  # the same use again finds every buffer
        again = sorted(_address(scratch.scratch(n << 20)) for n in (3, 1, 1, 2))
    assert fresh == [] and again == first


def test_a_later_save_of_the_same_state_allocates_no_buffer_anew(tmp_path, monkeypatch):
    # more buffers at once than the pool keeps anyway: 1 MiB chunks and packs, encoded by
    # one thread (how many are lent at once with more depends on how they interleave)
    monkeypatch.setenv("CKPT_CHUNK_BYTES", str(1 << 20))
    monkeypatch.setenv("CKPT_THREADS", "1")
    pool = scratch._Pool(1 << 20)
    monkeypatch.setattr(scratch, "_pool", pool)
    g = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.randn(1 << 20, generator=g) for i in range(4)}
    state.update({f"b{i:02d}": torch.randn(999, generator=g) for i in range(40)})
    ckpt.save(f"file://{tmp_path}/a", state, step=1)
    assert pool.held() > 2 << 20
    fresh: list[int] = []
    real = scratch.page_aligned
    monkeypatch.setattr(scratch, "page_aligned", lambda n: fresh.append(n) or real(n))
    ckpt.save(f"file://{tmp_path}/b", state, step=1)
    assert fresh == []
    assert_same_state(ckpt.load(f"file://{tmp_path}/b", step=1), clone_state(state))


def test_lend_and_give_back_cross_threads(pool):
    buf = scratch.lend(2 << 20)
    assert buf.nbytes >= 2 << 20
    done = threading.Thread(target=scratch.give_back, args=(buf,))
    done.start()
    done.join()
    assert _address(scratch.lend(1 << 20)) == _address(buf)


def _dirty(pool: scratch._Pool) -> None:
    """Fill the pool with buffers of 0xFF: what a former user left there."""
    bufs = [pool.take(1 << 20) for _ in range(6)] + [pool.take(17 << 20) for _ in range(2)]
    for b in bufs:
        b.fill(0xFF)
    pool.give(bufs)


def test_a_gap_in_a_pack_filled_again_holds_the_parents_bytes_not_a_former_buffers(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_PACK_BYTES", str(64 * 1024))
    monkeypatch.setattr("ckpt.io.writer.PACK_CAPACITY", 128 * 1024)
    pool = scratch._Pool(scratch.KEEP_BYTES)
    monkeypatch.setattr(scratch, "_pool", pool)
    url = f"file://{tmp_path}/s"
    g = torch.Generator().manual_seed(0)
    state = {f"b{i:02d}": torch.randn(2048, generator=g) for i in range(8)}
    ckpt.save(url, state, step=1)
    of = ckpt.read_manifest(url, 1).tensors["b05"].chunks[0]
    removed = state["b05"].clone()
    del state["b05"]
    state["b06"] += 1.0
    _dirty(pool)
    ckpt.save(url, state, step=2)
    assert_same_state(ckpt.load(url, step=2), clone_state(state))
    obj = ckpt.read_manifest(url, 2).tensors["b06"].chunks[0].object_ref()
    raw = np.empty(obj.size, np.uint8)
    Reader(Store(url), get_plugins().codecs).read_object(obj, raw.data, what="test")
    # the object filled again starts as its parent: the removed member's slot keeps its bytes
    # (nothing to store in the delta there), never what a former user left in the buffer
    assert raw[of.at : of.at + of.size].tobytes() == removed.numpy().tobytes()


def test_saves_after_a_dirty_pool_store_the_same_objects(tmp_path, monkeypatch):
    # the same state saved with fresh buffers and with reused, dirty ones: equal objects
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(300_000, generator=g) * 0.02, "small": torch.randn(999, generator=g)}
    clean = scratch._Pool(scratch.KEEP_BYTES)
    monkeypatch.setattr(scratch, "_pool", clean)
    ckpt.save(f"file://{tmp_path}/a", state, step=1)
    dirty = scratch._Pool(scratch.KEEP_BYTES)
    _dirty(dirty)
    monkeypatch.setattr(scratch, "_pool", dirty)
    ckpt.save(f"file://{tmp_path}/b", state, step=1)
    a, b = ckpt.read_manifest(f"file://{tmp_path}/a", 1), ckpt.read_manifest(f"file://{tmp_path}/b", 1)
    assert {p: e.chunks for p, e in a.tensors.items()} == {p: e.chunks for p, e in b.tensors.items()}
    assert dirty.held() > 0  # the buffers were used and given back


def test_release_takes_what_the_pool_holds(monkeypatch):
    pool = scratch._Pool(scratch.KEEP_BYTES)
    monkeypatch.setattr(scratch, "_pool", pool)
    a, b = scratch.lend(3 << 20), scratch.lend(1 << 20)
    scratch.give_back(a)
    scratch.give_back(b)
    assert scratch.held() == (3 << 20) + (1 << 20)
    taken = scratch.release()
    assert sorted(b.nbytes for b in taken) == [1 << 20, 3 << 20]
    assert scratch.held() == 0
    fresh = scratch.lend(1 << 20)  # a later lend allocates again
    assert fresh is not a and fresh is not b
    for buf in taken:  # and what was taken can be given back
        scratch.give_back(buf)
    assert scratch.held() == (4 << 20)


def test_buffers_taken_by_release_and_dropped_do_not_count_as_lent(monkeypatch):
    pool = scratch._Pool(1 << 20)
    monkeypatch.setattr(scratch, "_pool", pool)
    for _ in range(5):
        scratch.give_back(scratch.lend(8 << 20))
        del scratch.release()[:]  # dropped, as its docstring allows
    assert pool.bound() == 8 << 20  # what was lent at once, not 40 MiB


def test_a_save_of_many_small_subtrees_leaves_the_pool_what_its_data_needs(tmp_path, monkeypatch):
    # one open pack per top-level key: each lent as much as it holds, not a pack's capacity
    pool = scratch._Pool(1 << 20)
    monkeypatch.setattr(scratch, "_pool", pool)
    g = torch.Generator().manual_seed(0)
    state = {f"k{i:02d}": {"w": torch.randn(20_000, generator=g)} for i in range(48)}  # 3.8 MB
    ckpt.save(f"file://{tmp_path}/s", state, step=1)
    assert pool.held() <= 64 << 20  # 48 packs of 4 MiB lent at once kept 192 MiB
    assert_same_state(ckpt.load(f"file://{tmp_path}/s", step=1), clone_state(state))
