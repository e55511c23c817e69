"""Large objects written around the page cache (``O_DIRECT``, ckpt.storage.direct_io): the
same bytes at every size and alignment, not left in the page cache, buffered where the
platform or ``CKPT_DIRECT_WRITES=0`` says so and for a tiers' local tier, and whole across
a restore."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt
from benchmarks.cache import resident_fraction
from ckpt.storage import direct_io
from ckpt.storage.store import Store
from ckpt.testing import assert_same_state

pytestmark = pytest.mark.skipif(not direct_io.O_DIRECT, reason="no O_DIRECT on this platform")

A = direct_io.ALIGN
SIZES = [0, 1, A - 1, A, A + 1, direct_io.PIECE - 1, direct_io.PIECE, direct_io.PIECE + A + 3, 2 * direct_io.PIECE + 5]


def _aligned(n: int, offset: int) -> memoryview:
    buf = np.empty(n + 2 * A, np.uint8)
    start = (-buf.ctypes.data) % A + offset
    return memoryview(buf)[start : start + n]


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/self/mounts)."""
    best, kind = "", ""
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mount = parts[1].replace("\\040", " ")
            if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best, kind = mount, parts[2]
    return kind


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("offset", [0, 1, 64])
def test_write_file_bytes_at_every_size_and_alignment(tmp_path, size, offset):
    data = os.urandom(size)
    src = _aligned(size, offset)
    src[:] = data
    path = tmp_path / "f"
    direct_io.write_file(str(path), src, sync=True)
    assert path.read_bytes() == data


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 3 * A + 17), offset=st.integers(0, A - 1), kind=st.sampled_from(["bytes", "view", "typed"]))
def test_write_file_any_buffer(tmp_path_factory, size, offset, kind):
    data = os.urandom(size)
    if kind == "bytes":
        src: bytes | memoryview = data
    else:
        src = _aligned(size, offset)
        src[:] = data
        if kind == "typed" and size % 4 == 0:
            src = src.cast("f")  # a typed view: written as its bytes
    path = tmp_path_factory.mktemp("w") / "f"
    direct_io.write_file(str(path), src, sync=False)
    assert path.read_bytes() == data


def test_write_file_replaces_a_longer_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * (3 * direct_io.PIECE))
    data = os.urandom(direct_io.MIN_BYTES + 7)
    direct_io.write_file(str(path), data, sync=True)
    assert path.read_bytes() == data


def test_write_file_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        direct_io.write_file(str(tmp_path / "gone" / "f"), b"x" * A, sync=True)


def _store_object(store: Store, nbytes: int) -> Path:
    key = "ab" + "0" * 30
    store.put_object(key, os.urandom(nbytes))
    return Path(store.object_path(key))


def test_large_objects_bypass_the_page_cache(tmp_path):
    if _filesystem(tmp_path) in ("tmpfs", "ramfs", ""):
        pytest.skip("files in memory are always resident")
    store = Store(str(tmp_path / "s"))
    big = _store_object(store, 4 * direct_io.MIN_BYTES + 123)
    assert store.direct_writes
    # its whole blocks went to the device, not the page cache (the last partial page may be cached)
    resident = resident_fraction([big])
    if resident is None:
        pytest.skip("mincore is not available")
    assert resident < 0.01, resident
    small = Store(str(tmp_path / "t"))
    path = _store_object(small, direct_io.MIN_BYTES - 1)
    assert resident_fraction([path]) == 1.0  # below the threshold: written buffered


def test_switched_off_writes_through_the_page_cache(tmp_path, monkeypatch):
    if _filesystem(tmp_path) in ("tmpfs", "ramfs", ""):
        pytest.skip("files in memory are always resident")
    monkeypatch.setenv("CKPT_DIRECT_WRITES", "0")
    store = Store(str(tmp_path / "s"))
    assert not store.direct_writes
    assert resident_fraction([_store_object(store, 4 * direct_io.MIN_BYTES)]) == 1.0


def test_fsync_off_writes_through_the_page_cache(tmp_path, monkeypatch):
    if _filesystem(tmp_path) in ("tmpfs", "ramfs", ""):
        pytest.skip("files in memory are always resident")
    monkeypatch.setenv("CKPT_FSYNC", "0")
    store = Store(str(tmp_path / "s"))
    assert resident_fraction([_store_object(store, 4 * direct_io.MIN_BYTES)]) == 1.0


def test_a_platform_without_o_direct_writes_buffered(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(direct_io, "O_DIRECT", 0)
    store = Store(str(tmp_path / "s"))
    with caplog.at_level("INFO", logger="ckpt"):
        data = os.urandom(2 * direct_io.MIN_BYTES + 1)
        store.put_object("cd" + "1" * 30, data)
    assert store.get_object("cd" + "1" * 30) == data
    assert not store.direct_writes  # not tried again
    assert "writing through the page cache" in caplog.text
    assert not [p for p in (tmp_path / "s").rglob("*.tmp-*")]  # no temporary left behind


def test_removed_object_folder_is_made_again(tmp_path):
    store = Store(str(tmp_path / "s"))
    path = _store_object(store, 2 * direct_io.MIN_BYTES)
    path.unlink()
    path.parent.rmdir()  # a cleaner of empty folders
    again = _store_object(store, 2 * direct_io.MIN_BYTES)
    assert again == path and path.stat().st_size == 2 * direct_io.MIN_BYTES


def test_tiers_local_tier_keeps_the_page_cache(tmp_path):
    ck = ckpt.Checkpointer(str(tmp_path / "durable"), local=str(tmp_path / "local"), persist_every=1)
    try:
        assert not ck.store.direct_writes
        assert ck.tiers is not None and ck.tiers.durable.store.direct_writes
    finally:
        ck.close()


def test_save_and_restore_written_direct_are_bit_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "big": torch.randn(3 * (1 << 20) // 4 + 5, generator=g),  # several MiB, not a block multiple
        "bf16": torch.randn(1 << 20, generator=g).to(torch.bfloat16),
        "ints": torch.randint(0, 1 << 30, (1 << 19,), generator=g, dtype=torch.int64),
        "small": torch.arange(10),
    }
    url = str(tmp_path / "s")
    ckpt.save(url, state, step=1)
    state["big"].add_(1e-3)
    info = ckpt.save(url, state, step=2)
    assert info.write_stats.parent_reads >= 1  # a delta was weighed against a base written direct
    out = {k: torch.empty_like(v) for k, v in state.items()}
    ckpt.restore(url, out)
    assert_same_state(out, state)


@pytest.mark.parametrize("offset", [0, 1])
def test_multidimensional_byte_view_is_written_as_its_bytes(tmp_path, offset):
    # a 2-D uint8 view (format "B", ndim 2) whose size is not a whole number of blocks:
    # slicing it by bytes would slice its rows
    flat = _aligned(1024 * 4097, offset)
    flat[:] = os.urandom(flat.nbytes)
    src = flat.cast("B", (1024, 4097))
    direct_io.write_file(str(tmp_path / "f"), src, sync=True)
    assert (tmp_path / "f").read_bytes() == flat.tobytes()
    store = Store(str(tmp_path / "s"))
    path = Path(store.object_path("ab" + "2" * 30))
    store.put_object("ab" + "2" * 30, src)
    assert path.read_bytes() == flat.tobytes()
    assert store.direct_writes


def test_forked_child_does_not_share_the_bounce_buffer(tmp_path):
    # a process that forks after writing (a zygote of savers, a fork-started pool): parent
    # and child writing at once through the buffer the child inherited mix their files
    def write(name: str, fill: int) -> bool:
        src = _aligned(2 * direct_io.PIECE, 1)  # unaligned: goes through the buffer
        src[:] = bytes([fill]) * src.nbytes
        direct_io.write_file(str(tmp_path / name), src, sync=False)
        return (tmp_path / name).read_bytes() == src.tobytes()

    def forked(fn) -> int:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = fn()
            finally:
                os._exit(code)
        return pid

    assert write("warm", 0)  # this thread's buffer exists before the fork
    before = bytes(direct_io._bounce()[:4096])
    _, status = os.waitpid(forked(lambda: 0 if write("child", 7) else 2), 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert bytes(direct_io._bounce()[:4096]) == before  # the child's bytes are not in our buffer
    pid = forked(lambda: 0 if all([write(f"child-{i}", 7) for i in range(15)]) else 2)
    mine = [write(f"parent-{i}", 1) for i in range(15)]
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert all(mine)


def test_writes_past_the_kernels_per_call_limit_stay_direct(tmp_path, monkeypatch):
    # Linux writes at most 2 GiB - 4 KiB per call (MAX_RW_COUNT): an aligned short write;
    # the rest of a larger object must not fall back to the page cache
    if _filesystem(tmp_path) in ("tmpfs", "ramfs", ""):
        pytest.skip("files in memory are always resident")
    write = os.write
    monkeypatch.setattr(direct_io.os, "write", lambda fd, b: write(fd, memoryview(b)[: direct_io.MIN_BYTES]))
    src = _aligned(4 * direct_io.MIN_BYTES, 0)
    src[:] = os.urandom(src.nbytes)
    path = tmp_path / "f"
    direct_io.write_file(str(path), src, sync=True)
    resident = resident_fraction([path])
    assert path.read_bytes() == src.tobytes()
    if resident is None:
        pytest.skip("mincore is not available")
    assert resident < 0.01, resident


def test_a_bgzstd_payload_is_written_direct_without_a_copy(tmp_path, monkeypatch):
    # bgzstd builds its payload on a page: O_DIRECT sends it as it is, not through the
    # per-thread aligned buffer (a copy of every byte of every compressed chunk)
    from ckpt.codecs import EncodeContext
    from ckpt.codecs.zstd import ByteGroupZstdCodec

    weights = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(3)) * 0.02).numpy()
    payload, _ = ByteGroupZstdCodec().encode(
        memoryview(weights.view(np.uint8)), EncodeContext(dtype="float32", itemsize=4)
    )
    assert np.frombuffer(payload, np.uint8).ctypes.data % A == 0
    assert payload.nbytes > direct_io.MIN_BYTES

    def no_copy() -> memoryview:
        raise AssertionError("an aligned payload went through the bounce buffer")

    monkeypatch.setattr(direct_io, "_bounce", no_copy)
    path = tmp_path / "obj"
    try:
        direct_io.write_file(str(path), payload, sync=False)
    except direct_io.Refused:
        pytest.skip("this filesystem does not take O_DIRECT")
    assert path.read_bytes() == bytes(payload)
