"""The zstandard codecs: ``bgzstd``'s byte planes (layout, raw planes for incompressible
bytes, tuned settings vs CKPT_ZSTD_LEVEL), every float dtype and odd sizes, and decoders
bounded by the expected size whatever a payload claims. The corruption battery every
codec passes is in test_conformance.py."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt
from ckpt.codecs import EncodeContext
from ckpt.codecs import planes as byte_planes
from ckpt.codecs import zstd as zstd_codecs
from ckpt.codecs.base import decode_prefix, default_chain
from ckpt.codecs.zstd import PLANE_PARAMS, ByteGroupZstdCodec, ZstdCodec
from ckpt.testing import get_plugins

PLANE = struct.Struct("<BQ")  # the plane table entry: mode (0 raw, 1 zstd), stored length
RAW, ZSTD = 0, 1


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy().tobytes())


def _encode(codec, t: torch.Tensor):
    ctx = EncodeContext(dtype=str(t.dtype).removeprefix("torch."), itemsize=t.element_size())
    return codec.encode(_bytes(t), ctx)


def _decode(codec, payload, params, size: int) -> bytes:
    out = bytearray(size)
    codec.decode(memoryview(payload), memoryview(out), params, None)
    return bytes(out)


def _planes(payload, k: int) -> list[tuple[int, bytes]]:
    """The (mode, body) of each byte plane of a bgzstd payload."""
    payload = bytes(payload)
    table = [PLANE.unpack_from(payload, i * PLANE.size) for i in range(k)]
    pos, planes = PLANE.size * k, []
    for mode, length in table:
        planes.append((mode, payload[pos : pos + length]))
        pos += length
    assert pos == len(payload)
    return planes


def _weights(n: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Weight-like values: few distinct exponents, near-random mantissas."""
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


# -- byte planes -----------------------------------------------------------------------


def test_plane_k_holds_byte_k_of_every_element():
    t = _weights(5001)
    payload, params = _encode(ByteGroupZstdCodec(), t)
    assert params == {"itemsize": 4}
    grid = np.frombuffer(bytes(_bytes(t)), np.uint8).reshape(-1, 4)
    for k, (mode, body) in enumerate(_planes(payload, 4)):
        plane = body if mode == RAW else zstandard.ZstdDecompressor().decompress(body)
        assert plane == grid[:, k].tobytes(), f"plane {k}"


def test_mantissa_planes_stay_raw_and_the_exponent_plane_compresses():
    t = _weights(200_000)
    payload, _ = _encode(ByteGroupZstdCodec(), t)
    modes = [mode for mode, _ in _planes(payload, 4)]
    assert modes[0] == modes[1] == RAW, "low mantissa bytes are noise: stored raw, not inflated"
    assert modes[3] == ZSTD
    exponent = _planes(payload, 4)[3][1]
    assert len(exponent) * 2 < 200_000, "the sign/exponent plane compresses well on weight-like data"
    assert len(payload) < t.numel() * 4


def test_incompressible_data_is_declined_whole():
    noise = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ctx = EncodeContext(dtype="float32", itemsize=4)
    assert ByteGroupZstdCodec().encode(memoryview(noise.numpy().tobytes()), ctx) is None
    assert ZstdCodec().encode(memoryview(noise.numpy().tobytes()), ctx) is None


def test_large_random_planes_are_judged_from_a_sample():
    # planes above 4 x 128 KiB are judged by compressing their first 128 KiB only
    t = _weights(700_000)
    payload, params = _encode(ByteGroupZstdCodec(), t)
    assert [mode for mode, _ in _planes(payload, 4)][:2] == [RAW, RAW]
    assert _decode(ByteGroupZstdCodec(), payload, params, t.numel() * 4) == bytes(_bytes(t))


def test_tuned_plane_settings_unless_a_level_is_set(monkeypatch):
    monkeypatch.delenv("CKPT_ZSTD_LEVEL", raising=False)
    t = _weights(300_000, torch.bfloat16)
    tuned = ByteGroupZstdCodec()
    assert tuned.level is None
    tuned_payload, params = _encode(tuned, t)
    # the tuned frames are standard zstd: a plain decompressor reads them
    exponent = _planes(tuned_payload, 2)[1][1]
    assert len(zstandard.ZstdDecompressor().decompress(exponent)) == t.numel()
    level1 = ByteGroupZstdCodec(level=1)
    level1_payload, _ = _encode(level1, t)
    assert len(tuned_payload) <= len(level1_payload) * 1.02, "the tuned settings are meant to beat level 1"

    monkeypatch.setenv("CKPT_ZSTD_LEVEL", "3")
    forced = ByteGroupZstdCodec()
    assert forced.level == 3 and ZstdCodec().level == 3
    forced_payload, forced_params = _encode(forced, t)
    assert bytes(forced_payload) != bytes(tuned_payload)
    for payload, p in ((tuned_payload, params), (forced_payload, forced_params)):
        assert _decode(ByteGroupZstdCodec(), payload, p, t.numel() * 2) == bytes(_bytes(t))
    assert set(PLANE_PARAMS) >= {"strategy", "window_log"}


@pytest.mark.parametrize(
    "dtype",
    [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128],
)
@pytest.mark.parametrize("n", [1, 3, 1001, 65_537])
def test_every_float_dtype_round_trips_at_odd_sizes(dtype, n):
    g = torch.Generator().manual_seed(n)
    if dtype.is_complex:
        t = torch.view_as_complex(torch.randn(n, 2, generator=g) * 0.02).to(dtype)
    else:
        t = (torch.randn(n, generator=g) * 0.02).to(dtype)
    assert default_chain(str(dtype).removeprefix("torch.")) == ["bgzstd"]
    result = _encode(ByteGroupZstdCodec(), t)
    if result is None:
        assert n < 16, "only tiny chunks may be left raw"
        return
    payload, params = result
    assert params == {"itemsize": t.element_size()}
    assert _decode(ByteGroupZstdCodec(), payload, params, t.numel() * t.element_size()) == bytes(_bytes(t))


def test_single_byte_and_ragged_chunks_are_declined():
    data = memoryview(bytes(4099))  # not a whole number of float32s
    assert ByteGroupZstdCodec().encode(data, EncodeContext(dtype="float32", itemsize=4)) is None
    fp8 = memoryview(bytes(4096))  # byte planes of 1-byte elements are the bytes themselves
    assert ByteGroupZstdCodec().encode(fp8, EncodeContext(dtype="float8_e4m3fn", itemsize=1)) is None
    assert default_chain("int64") == ["zstd"] and default_chain("uint8") == ["zstd"]


def test_saved_floats_use_bgzstd_and_ints_zstd(tmp_path):
    url = f"file://{tmp_path}/s"
    state = {"w": _weights(10_000), "h": _weights(10_000, torch.bfloat16), "ids": torch.arange(10_000) % 13}
    ckpt.save(url, state, step=0)
    tensors = ckpt.read_manifest(url, 0).tensors
    assert [s["name"] for s in tensors["w"].chunks[0].codec] == ["bgzstd"]
    assert tensors["h"].chunks[0].codec[0] == {"name": "bgzstd", "itemsize": 2}
    assert [s["name"] for s in tensors["ids"].chunks[0].codec] == ["zstd"]
    loaded = ckpt.load(url)
    assert all(torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)) for k, v in state.items())


# -- decoding is bounded by the expected size ----------------------------------------------


def _frame_claiming(claim: int, body: bytes = b"a" * 10) -> bytes:
    """A zstd frame whose header declares ``claim`` content bytes but holds ``body``."""
    block = (1 | (len(body) << 3)).to_bytes(3, "little")  # last block, raw
    return b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", claim) + block + body


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("claim", [1 << 40, 256 << 20, 11])
def test_a_frame_claiming_a_huge_size_is_refused_before_allocating(claim):
    out = memoryview(bytearray(10))

    def decode():
        with pytest.raises(ckpt.CorruptCheckpointError, match="zstd"):
            ZstdCodec().decode(memoryview(_frame_claiming(claim)), out, {}, None)

    assert _peak(decode) < 1 << 20


def test_a_bgzstd_plane_claiming_a_huge_size_is_refused_before_allocating():
    n = 1000
    frame = _frame_claiming(1 << 40, b"\x01" * n)
    payload = PLANE.pack(ZSTD, len(frame)) + PLANE.pack(RAW, n) + frame + b"\x02" * n
    out = memoryview(bytearray(2 * n))

    def decode():
        with pytest.raises(ckpt.CorruptCheckpointError, match="plane 0"):
            ByteGroupZstdCodec().decode(memoryview(payload), out, {"itemsize": 2}, None)

    assert _peak(decode) < 1 << 20


def test_a_plane_table_claiming_huge_planes_is_refused():
    payload = PLANE.pack(RAW, 1 << 62) + PLANE.pack(RAW, 4) + b"\0" * 8
    with pytest.raises(ckpt.CorruptCheckpointError, match="plane 0"):
        ByteGroupZstdCodec().decode(memoryview(payload), memoryview(bytearray(8)), {"itemsize": 2}, None)


def test_a_frame_without_a_declared_size_is_bounded_by_the_expected_size():
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20))
    assert zstandard.get_frame_parameters(streamed).content_size == zstandard.CONTENTSIZE_UNKNOWN
    with pytest.raises(ckpt.CorruptCheckpointError):
        ZstdCodec().decode(memoryview(streamed), memoryview(bytearray(1000)), {}, None)
    out = bytearray(1 << 20)
    ZstdCodec().decode(memoryview(streamed), memoryview(out), {}, None)
    assert not any(out)


def _plane_alone(t: torch.Tensor, byte: int, params: dict) -> int:
    """The size of byte plane ``byte`` of ``t`` compressed with ``params`` on its own."""
    k = t.element_size()
    plane = np.ascontiguousarray(t.contiguous().view(torch.uint8).numpy().reshape(-1, k)[:, byte])
    c = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(**params))
    return len(c.compress(plane.data))


def test_a_plane_with_long_repeats_is_compressed_with_a_large_window_and_others_are_not():
    """A one-sample gradient of a linear layer (an outer product) repeats each row's exponent
    pattern in every row of the same scale, rows apart: the sample picks REPEAT_PARAMS for it,
    and keeps PLANE_PARAMS for weights, where they are better."""
    from ckpt.codecs.zstd import REPEAT_PARAMS

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, generator=g)
    scale = 2.0 ** torch.randint(-30, -10, (2048,), generator=g) * torch.sign(torch.randn(2048, generator=g))
    grad = torch.outer(scale, x)  # 8 MiB: a 2 MiB exponent plane
    codec = ByteGroupZstdCodec()
    payload, params = _encode(codec, grad)
    stored_exponent = len(_planes(payload, 4)[3][1])
    assert stored_exponent == _plane_alone(grad, 3, REPEAT_PARAMS)
    assert stored_exponent * 10 < _plane_alone(grad, 3, PLANE_PARAMS)  # (39x smaller here)
    assert _decode(ByteGroupZstdCodec(), payload, params, grad.nbytes) == bytes(_bytes(grad))

    weights = _weights(2 * 1024 * 1024)
    payload, _ = _encode(codec, weights)
    assert len(_planes(payload, 4)[3][1]) == _plane_alone(weights, 3, PLANE_PARAMS)


def test_a_prefix_is_decoded_only_from_frames_with_a_bounded_window():
    """Decoding a frame in part allocates its window: a frame declaring a window over
    PREFIX_WINDOW gets no prefix (the writer decodes it whole, bounded by the chunk size)."""
    data = bytes(range(256)) * (64 * 1024)  # 16 MiB
    registry = get_plugins().codecs
    wide = zstandard.ZstdCompressionParameters(window_log=27, write_content_size=True)
    frame = zstandard.ZstdCompressor(compression_params=wide).compress(data)
    assert zstandard.get_frame_parameters(frame).window_size > zstd_codecs.PREFIX_WINDOW
    assert decode_prefix(registry, [{"name": "zstd"}], memoryview(frame), len(data), 4096) is None
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)
    got = decode_prefix(registry, [{"name": "zstd"}], memoryview(frame), len(data), 4096)
    assert got is not None and bytes(got) == data[:4096]


def test_a_plane_random_only_at_its_start_is_compressed():
    """The XOR delta of a tensor whose first rows changed and the rest did not: random
    bytes at the start of every plane, zeros after. The start's sample alone would store
    the planes raw; the middle and end samples show they compress."""
    g = torch.Generator().manual_seed(0)
    n = 1024 * 1024  # planes of 1 MiB: decided from samples
    xor = torch.zeros(n, dtype=torch.int32)
    xor[: n // 5] = torch.randint(-(2**31), 2**31 - 1, (n // 5,), generator=g, dtype=torch.int32)
    codec = ByteGroupZstdCodec()
    payload, params = _encode(codec, xor.view(torch.float32))
    assert [mode for mode, _ in _planes(payload, 4)] == [ZSTD] * 4
    assert len(payload) < 0.25 * 4 * n
    assert _decode(codec, payload, params, 4 * n) == bytes(_bytes(xor))


# -- planes split straight into the payload -------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 8])
def test_a_raw_plane_after_compressed_ones_moves_down_intact(k):
    """The low bytes zero (compressed to almost nothing), the high bytes random (raw): each
    raw plane is moved down over the space the compressed ones left, and holds byte k."""
    n = 300_001
    grid = np.zeros((n, k), dtype=np.uint8)
    grid[:, k // 2 :] = np.random.default_rng(k).integers(0, 256, (n, k - k // 2), dtype=np.uint8)
    data = memoryview(grid.reshape(-1).tobytes())
    payload, params = ByteGroupZstdCodec().encode(data, EncodeContext(dtype=f"x{k}", itemsize=k))
    planes = _planes(payload, k)
    assert [mode for mode, _ in planes] == [ZSTD] * (k // 2) + [RAW] * (k - k // 2)
    for i, (mode, body) in enumerate(planes):
        plane = body if mode == RAW else zstandard.ZstdDecompressor().decompress(body)
        assert plane == grid[:, i].tobytes(), f"plane {i}"
    assert _decode(ByteGroupZstdCodec(), payload, params, len(data)) == bytes(data)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_encodes_on_many_threads_at_once_each_decode_to_their_own_data(dtype):
    """Planes are split into each encode's own payload, raw ones left in place: chunks encoded
    at once on many threads must each hold their own bytes."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = [_weights(100_000 + 17 * i, dtype, seed=i) for i in range(24)]
    codec = ByteGroupZstdCodec()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda t: _encode(codec, t), chunks))
    for t, (payload, params) in zip(chunks, results):
        assert any(mode == RAW for mode, _ in _planes(payload, t.element_size())), "a raw plane is exercised"
        assert _decode(codec, payload, params, t.numel() * t.element_size()) == bytes(_bytes(t))


@settings(max_examples=150, deadline=None)
@given(
    k=st.sampled_from(sorted(zstd_codecs.ITEMSIZES)),
    n=st.integers(0, 2000),
    at=st.integers(0, 15),
    distinct=st.integers(1, 256),
    seed=st.integers(0, 2**32 - 1),
)
def test_planes_split_by_shifts_hold_byte_i_of_each_element_at_any_alignment(k, n, at, distinct, seed):
    """The split (compiled loops and numpy's word shifts) against a strided byte copy, on
    views at any offset (words read unaligned); every size round-trips, whole and by prefix."""
    raw = np.random.default_rng(seed).integers(0, distinct, at + n * k, dtype=np.uint16).astype(np.uint8)
    data = memoryview(raw)[at:]
    grid = raw[at:].reshape(n, k)
    for native in {byte_planes.native, None}:
        planes = np.empty((k, n), dtype=np.uint8)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(byte_planes, "native", native)
            byte_planes.split(data, planes)
        assert np.array_equal(planes, grid.T), f"native={native is not None}"
    codec = ByteGroupZstdCodec()
    result = codec.encode(data, EncodeContext(dtype="float32", itemsize=k))
    if result is None:
        return
    payload, params = result
    out = np.zeros(1 + n * k + 1, dtype=np.uint8)  # decoded at an odd offset, guarded on both sides
    codec.decode(memoryview(payload), out.data[1:-1], params, None)
    assert out[1:-1].tobytes() == raw[at:].tobytes() and out[0] == out[-1] == 0
    prefix = codec.decode_prefix(memoryview(payload), n * k, n * k // 2 + 1, params)
    assert prefix is not None and bytes(prefix) == raw[at:].tobytes()[: len(prefix)]
