"""Host memory helpers: copies that let other threads run."""

from __future__ import annotations

import numpy as np
import pytest

from ckpt.io import memory
from ckpt.io.memory import RELEASE_GIL_BYTES, copy_into


@pytest.mark.parametrize("n", [0, 7, RELEASE_GIL_BYTES - 1, RELEASE_GIL_BYTES, 5 * RELEASE_GIL_BYTES + 3])
@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview"])
def test_copy_into_copies_every_byte(n, kind):
    src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    source = {"bytes": src.tobytes(), "bytearray": bytearray(src.tobytes()), "memoryview": src.data}[kind]
    dst = np.zeros(n + 2, dtype=np.uint8)
    copy_into(dst.data[1 : n + 1], source)
    assert dst[1 : n + 1].tobytes() == src.tobytes()
    assert dst[0] == 0 and dst[-1] == 0, "nothing written outside the destination"


def test_a_large_copy_goes_through_numpy_which_releases_the_gil(monkeypatch):
    calls: list[int] = []
    original = memory.np.copyto

    def spy(dst, src, *args, **kwargs):
        calls.append(dst.nbytes)
        return original(dst, src, *args, **kwargs)

    monkeypatch.setattr(memory.np, "copyto", spy)
    small, big = bytearray(RELEASE_GIL_BYTES - 1), bytearray(4 * RELEASE_GIL_BYTES)
    copy_into(memoryview(small), b"a" * len(small))
    copy_into(memoryview(big), b"b" * len(big))
    assert calls == [len(big)]
    assert bytes(small) == b"a" * len(small) and bytes(big) == b"b" * len(big)


def test_sizes_that_differ_are_refused():
    with pytest.raises(ValueError):
        copy_into(memoryview(bytearray(RELEASE_GIL_BYTES)), bytes(RELEASE_GIL_BYTES + 1))
    with pytest.raises(ValueError):
        copy_into(memoryview(bytearray(10)), bytes(11))


@pytest.mark.parametrize("n", [RELEASE_GIL_BYTES - 1, RELEASE_GIL_BYTES, 4 * RELEASE_GIL_BYTES])
@pytest.mark.parametrize("src", [b"\x07", b""], ids=["one-byte", "empty"])
def test_a_source_of_another_size_is_refused_not_broadcast(n, src):
    """numpy broadcasts a one-element source over the whole destination: a short source
    must be refused at every size, never copied as a fill of its one byte."""
    dst = bytearray(n)
    with pytest.raises(ValueError):
        copy_into(memoryview(dst), src)
    assert dst == bytearray(n), "nothing written"


@pytest.mark.parametrize("n", [1, 4095, memory.HUGE_BYTES - 1, memory.HUGE_BYTES, 3 * memory.HUGE_BYTES + 4097])
def test_page_aligned_buffers_start_on_a_page_and_large_ones_on_a_huge_page(n):
    buf = memory.page_aligned(n)
    assert buf.nbytes == n and buf.flags.writeable and buf.flags.c_contiguous
    assert buf.ctypes.data % 4096 == 0
    if memory._huge and n >= memory.HUGE_BYTES:
        assert buf.ctypes.data % memory.HUGE_BYTES == 0
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    buf[:] = data
    view = buf[n // 2 :]
    del buf
    import gc

    gc.collect()
    assert view.tobytes() == data[n // 2 :].tobytes(), "the mapping outlives the buffer while a view uses it"


def test_a_large_buffer_the_host_cannot_map_is_a_memory_error():
    with pytest.raises(MemoryError):
        memory.page_aligned(1 << 62)
    with pytest.raises((MemoryError, ValueError)):
        memory.page_aligned(1 << 64)
