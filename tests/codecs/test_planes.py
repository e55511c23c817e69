"""Byte planes both ways (:mod:`ckpt.codecs.planes`): the compiled loops and numpy's give
the same bytes for every element size, length and block boundary, and refuse what does not fit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.codecs import planes
from ckpt.codecs.zstd import ByteGroupZstdCodec

BACKENDS = ["native", "numpy"]


def _compiled():
    """The compiled loops, whatever CKPT_NATIVE_PLANES says; pip builds them wherever it finds
    a C compiler (they are optional for installs without one)."""
    try:
        from ckpt.codecs import _planes
    except ImportError:
        if shutil.which("cc") is None and shutil.which("gcc") is None:
            pytest.skip("no C compiler on this machine: the numpy planes serve")
        raise
    return _planes


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setattr(planes, "native", _compiled() if request.param == "native" else None)
    return request.param


def test_the_extension_is_built_and_used():
    native = _compiled()
    assert planes.native is (native if planes.config.native_planes() else None)


def _reference(data: bytes, k: int) -> np.ndarray:
    return np.frombuffer(data, np.uint8).reshape(-1, k).T.copy()


@settings(max_examples=60, deadline=None)
@given(k=st.sampled_from([1, 2, 3, 4, 8, 16]), n=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1))
def test_split_and_join_are_inverse_and_agree_with_a_transpose(k, n, seed):
    data = np.random.default_rng(seed).integers(0, 256, n * k, dtype=np.uint8).tobytes()
    want = _reference(data, k)
    for native in (_compiled(), None):
        saved = planes.native
        planes.native = native
        try:
            out = np.full((k, n), 0xA5, np.uint8)
            planes.split(memoryview(data), out)
            assert np.array_equal(out, want), f"split, native={native is not None}"
            back = bytearray(n * k)
            planes.join([out[i] for i in range(k)], memoryview(back))
            assert bytes(back) == data, f"join, native={native is not None}"
        finally:
            planes.native = saved


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_numpy_split_block_by_block(monkeypatch, dtype):
    # the numpy split goes block by block (cache-sized); small blocks here, the last one ragged
    monkeypatch.setattr(planes, "native", None)
    monkeypatch.setattr(planes, "_SPLIT_BLOCK", 1000)
    t = (torch.randn(5001, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    data = t.view(torch.uint8).numpy().tobytes()
    k = t.element_size()
    out = np.empty((k, 5001), np.uint8)
    planes.split(memoryview(data), out)
    assert np.array_equal(out, _reference(data, k))


def test_the_codec_stores_the_same_bytes_either_way(backend):
    t = (torch.randn(300_000, generator=torch.Generator().manual_seed(2)) * 0.02).to(torch.float32)
    data = memoryview(t.numpy().tobytes())
    from ckpt.codecs import EncodeContext

    payload, params = ByteGroupZstdCodec().encode(data, EncodeContext(dtype="float32", itemsize=4))
    payload = bytes(payload)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(planes, "native", None)
        reference, _ = ByteGroupZstdCodec().encode(data, EncodeContext(dtype="float32", itemsize=4))
    assert payload == bytes(reference)
    out = bytearray(len(data))
    ByteGroupZstdCodec().decode(memoryview(payload), memoryview(out), params, None)
    assert out == data


def test_the_compiled_loops_refuse_what_does_not_fit():
    native = _compiled()
    buf = bytearray(64)
    with pytest.raises(ValueError, match="itemsize"):
        native.split(bytes(63), bytearray(63), 4)  # not whole elements
    with pytest.raises(ValueError, match="itemsize"):
        native.split(bytes(64), bytearray(60), 4)  # out of another size
    with pytest.raises(ValueError, match="itemsize"):
        native.split(bytes(64), bytearray(64), 0)
    with pytest.raises(ValueError, match="itemsize"):
        native.split(bytes(64), bytearray(64), 65)
    with pytest.raises(ValueError, match="overlap"):
        native.split(memoryview(buf)[:32], memoryview(buf)[16:48], 4)
    with pytest.raises(ValueError, match="planes"):
        native.join([bytes(16)] * 3, bytearray(64), 4)
    with pytest.raises(ValueError, match="plane 1 has 15 bytes"):
        native.join([bytes(16), bytes(15), bytes(16), bytes(16)], bytearray(64), 4)
    with pytest.raises(ValueError, match="plane 2 overlaps"):
        native.join([bytes(16), bytes(16), memoryview(buf)[8:24], bytes(16)], memoryview(buf), 4)
    with pytest.raises(TypeError):
        native.join([bytes(16), 7, bytes(16), bytes(16)], bytearray(64), 4)
    with pytest.raises(TypeError):
        native.join([bytes(16)] * 4, bytes(64), 4)  # out must be writable
    with pytest.raises(TypeError):
        native.join(5, bytearray(64), 4)
