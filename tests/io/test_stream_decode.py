"""The streamed bgzstd decode of a restore's second pass (``Reader._stream``): an object on
local disk decoded a block of elements at a time straight into the live tensor, the same
bytes as the whole decode, and damage refused as the whole decode refuses it."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
import xxhash
import zstandard

import ckpt
import ckpt.codecs.zstd as zstd_mod
import ckpt.io.reader as reader_mod
from ckpt.codecs.zstd import ByteGroupZstdCodec
from ckpt.errors import CorruptCheckpointError
from ckpt.io.memory import Scatter
from ckpt.storage.commit import load_manifest
from ckpt.storage.store import Store


class _Ctx:
    def __init__(self, itemsize: int) -> None:
        self.itemsize = itemsize


def _floats(dtype: torch.dtype, n: int, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(n, generator=g) * 0.02).to(dtype)
    return t.view(torch.uint8).numpy().copy()


def _payload_file(tmp_path, data: np.ndarray, itemsize: int) -> tuple[str, bytes, dict]:
    encoded = ByteGroupZstdCodec().encode(data.data, _Ctx(itemsize))
    assert encoded is not None
    payload, params = bytes(encoded[0]), encoded[1]
    path = str(tmp_path / "payload")
    with open(path, "wb") as f:
        f.write(payload)
    return path, payload, params


def _stream(path: str, size: int, params: dict, out: np.ndarray) -> tuple[bool, str]:
    digest = xxhash.xxh3_128()
    fd = os.open(path, os.O_RDONLY)
    try:
        done = ByteGroupZstdCodec().decode_file(fd, size, out.data, params, digest, "test")
    finally:
        os.close(fd)
    return done, digest.hexdigest()


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(zstd_mod, "_STREAM_MAX_BLOCK", 4096)  # many blocks, and a short last one


@pytest.mark.parametrize(
    "dtype,itemsize", [(torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4), (torch.float64, 8)]
)
def test_streamed_decode_is_the_whole_decode(tmp_path, small_blocks, dtype, itemsize):
    data = _floats(dtype, 50_001)
    path, payload, params = _payload_file(tmp_path, data, itemsize)
    out = np.full(data.size, 0xAB, dtype=np.uint8)
    done, digest = _stream(path, len(payload), params, out)
    assert done
    assert out.tobytes() == data.tobytes()
    assert digest == xxhash.xxh3_128_hexdigest(data.tobytes())


def test_a_frame_with_a_larger_window_than_allowed_is_left_to_the_whole_decode(tmp_path, monkeypatch):
    data = _floats(torch.float32, 40_000)
    path, payload, params = _payload_file(tmp_path, data, 4)
    monkeypatch.setattr(zstd_mod, "PREFIX_WINDOW", 1024)  # every frame's window is larger
    out = np.full(data.size, 0xAB, dtype=np.uint8)
    assert _stream(path, len(payload), params, out)[0] is False
    assert not (out != 0xAB).any()  # nothing written


def test_a_plane_table_the_decode_refuses_is_left_to_it(tmp_path):
    data = _floats(torch.float32, 40_000)
    path, payload, params = _payload_file(tmp_path, data, 4)
    out = np.full(data.size, 0xAB, dtype=np.uint8)
    assert _stream(path, len(payload) + 1, params, out)[0] is False  # the planes do not fill the payload
    assert _stream(path, len(payload), {"itemsize": 3}, out)[0] is False
    assert not (out != 0xAB).any()


def _zstd_plane(payload: bytes, params: dict, size: int) -> tuple[int, int]:
    table = zstd_mod._plane_table(lambda a, b: payload[a:b], len(payload), size, params)
    assert table is not None
    return next((pos, length) for mode, pos, length in table[2] if mode == zstd_mod._ZSTD)


def test_a_damaged_compressed_plane_is_corrupt(tmp_path, small_blocks):
    data = _floats(torch.bfloat16, 60_000)
    path, payload, params = _payload_file(tmp_path, data, 2)
    pos, length = _zstd_plane(payload, params, data.size)
    bad = bytearray(payload)
    for at in range(pos + 20, pos + length - 4, 97):
        bad[at] ^= 0x5A
    with open(path, "wb") as f:
        f.write(bad)
    out = np.empty(data.size, dtype=np.uint8)
    try:
        done, digest = _stream(path, len(bad), params, out)
    except CorruptCheckpointError:
        return
    # zstd may decode damaged literals without noticing: the content hash does
    assert done and digest != xxhash.xxh3_128_hexdigest(data.tobytes())


def test_a_file_cut_short_after_it_was_sized_is_corrupt(tmp_path, small_blocks):
    data = _floats(torch.float32, 60_000)
    path, payload, params = _payload_file(tmp_path, data, 4)
    with open(path, "r+b") as f:
        f.truncate(len(payload) - 5000)  # the size the caller gives is the recorded one
    out = np.empty(data.size, dtype=np.uint8)
    with pytest.raises(CorruptCheckpointError):
        _stream(path, len(payload), params, out)


# -- in a restore ----------------------------------------------------------------------------


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, 512)).pow(2).mean().backward()
    optim.step()
    return {"model": model, "optim": optim}


def _weights(state: dict) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v.detach().clone() for k, v in state["model"].state_dict().items()}
    for i, s in enumerate(state["optim"].state.values()):
        out |= {f"optim/{i}/{k}": v.clone() for k, v in s.items()}
    return out


@pytest.fixture
def streamed(monkeypatch):
    """Sizes of the objects a restore streamed (every bgzstd object: no size threshold)."""
    monkeypatch.setattr(reader_mod, "STREAM_MIN_BYTES", 0)
    sizes: list[int] = []
    real = ByteGroupZstdCodec.decode_file

    def spy(self, fd, stored, out, params, digest, what):
        done = real(self, fd, stored, out, params, digest, what)
        if done:
            sizes.append(len(out))
        return done

    monkeypatch.setattr(ByteGroupZstdCodec, "decode_file", spy)
    return sizes


def test_a_restore_in_place_streams_its_encoded_objects_bit_exact(tmp_path, streamed, small_blocks):
    url = str(tmp_path / "store")
    state = _state()
    ckpt.save(url, state, step=1)
    fresh = _state(seed=3)
    assert ckpt.restore(url, fresh).step == 1
    want, got = _weights(state), _weights(fresh)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert streamed  # the weights and the moments are bgzstd objects


def test_objects_of_a_mebibyte_or_more_are_streamed_by_default(tmp_path, monkeypatch):
    sizes: list[int] = []
    real = ByteGroupZstdCodec.decode_file

    def spy(self, fd, stored, out, params, digest, what):
        sizes.append(len(out))
        return real(self, fd, stored, out, params, digest, what)

    monkeypatch.setattr(ByteGroupZstdCodec, "decode_file", spy)
    url = str(tmp_path / "store")
    big = {"w": torch.randn(1024, 512) * 0.02, "small": torch.randn(1000) * 0.02}
    ckpt.save(url, big, step=1)
    live = {"w": torch.zeros(1024, 512), "small": torch.zeros(1000)}
    ckpt.restore(url, live)
    assert torch.equal(live["w"], big["w"]) and torch.equal(live["small"], big["small"])
    assert sizes and all(s >= reader_mod.STREAM_MIN_BYTES for s in sizes)


def test_stored_bytes_forged_to_hash_as_recorded_are_found_by_the_streamed_decode(tmp_path, streamed):
    """Bytes that pass the first pass (a stored hash forged to match) but do not decode to the
    content are refused in the second: the error says the live tensors may have changed."""
    url = str(tmp_path / "store")
    ckpt.save(url, _state(), step=1)
    store = Store(url)
    m = load_manifest(store, 1)
    ref = next(c for e in m.tensors.values() for c in e.chunks if c.codec and not c.packed)
    bad = bytearray(store.get_object(ref.key))
    pos, length = _zstd_plane(bytes(bad), dict(ref.codec[0]), ref.size)
    bad[pos + length // 2] ^= 0xFF
    with open(store.object_path(ref.key), "wb") as f:
        f.write(bad)
    forged = xxhash.xxh3_128_hexdigest(bytes(bad))
    doc = json.loads(store.read_manifest(1))
    for entry in doc["tensors"].values():
        for chunk in entry["chunks"]:
            if chunk["key"] == ref.key:
                chunk["stored_hash"] = forged
    store.write(store.manifest_path(1), json.dumps(doc).encode())
    with pytest.raises(ckpt.CorruptCheckpointError, match="partly overwritten"):
        ckpt.restore(url, _state(seed=3), step=1)


_PLANE = struct.Struct("<BQ")
_EXTRA = {
    "an empty frame after it": lambda frame: frame + zstandard.ZstdCompressor().compress(b""),
    "a skippable frame after it": lambda frame: frame + struct.pack("<II", 0x184D2A50, 4) + b"junk",
    "a skippable frame before it": lambda frame: struct.pack("<II", 0x184D2A50, 4) + b"junk" + frame,
    "a byte after it": lambda frame: frame + b"\x00",
}


def _with_extra(payload: bytes, k: int, extra) -> bytes:
    """``payload`` with its (first) zstd plane changed by ``extra``, the plane table to match."""
    planes, pos = [], _PLANE.size * k
    for i in range(k):
        mode, length = _PLANE.unpack_from(payload, i * _PLANE.size)
        planes.append([mode, payload[pos : pos + length]])
        pos += length
    plane = next(p for p in planes if p[0] == 1)
    plane[1] = extra(plane[1])
    return b"".join(_PLANE.pack(m, len(b)) for m, b in planes) + b"".join(b for _, b in planes)


@pytest.mark.parametrize("extra", list(_EXTRA))
def test_a_plane_that_is_not_exactly_one_frame_is_left_to_the_whole_decode(tmp_path, extra):
    data = _floats(torch.float32, 40_000)
    path, payload, params = _payload_file(tmp_path, data, 4)
    bad = _with_extra(payload, 4, _EXTRA[extra])
    with open(path, "wb") as f:
        f.write(bad)
    out = np.full(data.size, 0xAB, dtype=np.uint8)
    assert _stream(path, len(bad), params, out)[0] is False
    assert not (out != 0xAB).any()
    with pytest.raises(CorruptCheckpointError):  # which refuses it
        ByteGroupZstdCodec().decode(memoryview(bad), out.data, params, None)


@pytest.mark.parametrize("extra", ["an empty frame after it", "a skippable frame before it"])
def test_a_restore_in_place_refuses_extra_frames_as_a_restore_into_fresh_memory_does(tmp_path, extra):
    """Stored bytes forged to hash as recorded, whose plane holds a frame that decodes to
    nothing besides the right one: refused in place as through fresh memory."""
    torch.manual_seed(0)
    w = torch.randn(1 << 20) * 0.02  # 4 MiB: streamed by default
    url = str(tmp_path / "store")
    ckpt.save(url, {"w": w}, step=1)
    store = Store(url)
    ref = next(c for e in load_manifest(store, 1).tensors.values() for c in e.chunks)
    bad = _with_extra(store.get_object(ref.key), ref.codec[0]["itemsize"], _EXTRA[extra])
    with open(store.object_path(ref.key), "wb") as f:
        f.write(bad)
    doc = json.loads(store.read_manifest(1))
    chunk = doc["tensors"]["w"]["chunks"][0]
    chunk["stored"], chunk["stored_hash"] = len(bad), xxhash.xxh3_128_hexdigest(bad)
    store.write(store.manifest_path(1), json.dumps(doc).encode())
    for live in (torch.zeros(1 << 20), torch.zeros(2 << 20)[::2]):  # in place; through fresh memory
        with pytest.raises(ckpt.CorruptCheckpointError, match=ref.key):
            ckpt.restore(url, {"w": live}, step=1)


def test_a_decode_error_of_the_stream_is_corruption_not_a_store_failure(tmp_path, monkeypatch):
    """What the whole decode calls corrupt (a ValueError out of a codec) is corrupt in the
    streamed decode too: not a StoreError, and not retried as an I/O failure would be."""
    url = str(tmp_path / "store")
    w = torch.randn(1 << 20) * 0.02
    ckpt.save(url, {"w": w}, step=1)
    calls = []

    def broken(planes, out):
        calls.append(1)
        raise ValueError("planes of unequal length")

    monkeypatch.setattr(zstd_mod.byte_planes, "join", broken)
    with pytest.raises(ckpt.CorruptCheckpointError, match="ValueError") as err:
        ckpt.restore(url, {"w": torch.zeros(1 << 20)}, step=1)
    assert not isinstance(err.value, ckpt.StoreError) and "partly overwritten" in str(err.value)
    assert len(calls) == 1


def _tiny_block_frame(data: bytes) -> bytes:
    """A valid zstd frame of ``data`` made of one raw block per byte (RFC 8878)."""
    assert len(data) < 256
    head = zstd_mod._ZSTD_MAGIC + bytes([0x20, len(data)])  # single segment, a 1-byte content size
    blocks = b"".join(
        ((1 << 3) | (i == len(data) - 1)).to_bytes(3, "little") + data[i : i + 1] for i in range(len(data))
    )
    return head + blocks


def test_a_frame_of_more_blocks_than_its_content_needs_is_left_to_the_whole_decode(tmp_path):
    """Walking a frame's block headers costs a read each: a frame of tiny blocks (hostile:
    ckpt's frames hold blocks of up to 128 KiB) is left to the whole decode, which runs
    through them in C."""
    data = _floats(torch.bfloat16, 200)
    planes = data.reshape(-1, 2).T.copy()
    frame = _tiny_block_frame(planes[1].tobytes())
    assert zstandard.ZstdDecompressor().decompress(frame) == planes[1].tobytes()  # a valid frame
    payload = _PLANE.pack(0, 200) + _PLANE.pack(1, len(frame)) + planes[0].tobytes() + frame
    path = str(tmp_path / "payload")
    with open(path, "wb") as f:
        f.write(payload)
    out = np.full(data.size, 0xAB, dtype=np.uint8)
    assert _stream(path, len(payload), {"itemsize": 2}, out)[0] is False
    assert not (out != 0xAB).any()
    ByteGroupZstdCodec().decode(memoryview(payload), out.data, {"itemsize": 2}, None)
    assert out.tobytes() == data.tobytes()


# -- packed objects: streamed into their tensors (a Scatter), no buffer of the object's size --


def test_a_scattered_decode_copies_each_range_and_hashes_the_whole_object(tmp_path, small_blocks):
    data = _floats(torch.float32, 50_001)
    path, payload, params = _payload_file(tmp_path, data, 4)
    ranges = [(0, 10), (4095, 9000), (8000, 20_000), (123_456, 76_548)]  # across blocks; overlapping; to the end
    dests = [np.full(size, 0xAB, dtype=np.uint8) for _, size in ranges]
    out = Scatter(data.size, [(at, d.data) for (at, _), d in zip(ranges, dests)])
    digest = xxhash.xxh3_128()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert ByteGroupZstdCodec().decode_file(fd, len(payload), out, params, digest, "test")
    finally:
        os.close(fd)
    for (at, size), d in zip(ranges, dests):
        assert d.tobytes() == data[at : at + size].tobytes()
    assert digest.hexdigest() == xxhash.xxh3_128_hexdigest(data.tobytes())


def test_a_scatter_refuses_a_range_past_the_object():
    with pytest.raises(ValueError):
        Scatter(100, [(90, memoryview(bytearray(11)))])
    with pytest.raises(ValueError):
        Scatter(100, [(-1, memoryview(bytearray(1)))])


def _small_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i:02d}": torch.randn(30_000, generator=g) * 0.02 for i in range(68)}  # 120 kB each: two full packs


def test_a_restore_in_place_streams_packed_objects_into_their_tensors(tmp_path, monkeypatch):
    url = str(tmp_path / "store")
    state = _small_state(0)
    ckpt.save(url, state, step=1)
    packs = {c.key: c.object_size for e in load_manifest(Store(url), 1).tensors.values() for c in e.chunks}
    assert all(c.packed for e in load_manifest(Store(url), 1).tensors.values() for c in e.chunks)
    assert len(packs) > 1 and min(packs.values()) >= reader_mod.STREAM_MIN_BYTES
    lent: list[int] = []
    real = reader_mod.scratch.lend
    monkeypatch.setattr(reader_mod.scratch, "lend", lambda n, **kw: lent.append(n) or real(n, **kw))
    live = _small_state(1)
    assert ckpt.restore(url, live).step == 1
    assert all(torch.equal(live[k], state[k]) for k in state)
    assert not [n for n in lent if n in packs.values()]  # no buffer of a packed object's size


def test_a_packed_object_forged_to_pass_the_first_pass_is_refused_in_the_second(tmp_path):
    url = str(tmp_path / "store")
    ckpt.save(url, _small_state(0), step=1)
    store = Store(url)
    ref = next(c for e in load_manifest(store, 1).tensors.values() for c in e.chunks)
    bad = bytearray(store.get_object(ref.key))
    pos, length = _zstd_plane(bytes(bad), dict(ref.codec[0]), ref.object_size)
    bad[pos + length // 2] ^= 0xFF
    with open(store.object_path(ref.key), "wb") as f:
        f.write(bad)
    doc = json.loads(store.read_manifest(1))
    for entry in doc["tensors"].values():
        for chunk in entry["chunks"]:
            if chunk["key"] == ref.key:
                chunk["stored_hash"] = xxhash.xxh3_128_hexdigest(bytes(bad))
    store.write(store.manifest_path(1), json.dumps(doc).encode())
    with pytest.raises(ckpt.CorruptCheckpointError, match="partly overwritten"):
        ckpt.restore(url, _small_state(1), step=1)


def _rle_zeros(n: int) -> bytes:
    """One zstd frame of ``n`` zero bytes made of run-length blocks (RFC 8878): 4 bytes a 128 KiB."""
    block = 128 * 1024
    head = zstd_mod._ZSTD_MAGIC + bytes([0xC0, (17 - 10) << 3]) + n.to_bytes(8, "little")
    full, last = divmod(n, block)
    sizes = [block] * full + ([last] if last else [])
    return head + b"".join(
        ((s << 3) | (1 << 1) | (i == len(sizes) - 1)).to_bytes(3, "little") + b"\0" for i, s in enumerate(sizes)
    )


@pytest.mark.parametrize("read", ["restore", "load"])
def test_a_packed_object_forged_to_declare_a_huge_size_is_refused_at_once(tmp_path, read):
    """Runs of zeros store 4 GiB in 128 KiB: a packed object declaring far more bytes than
    its tensors read is refused, not decoded (nor allocated) for a few small tensors."""
    url = str(tmp_path / "store")
    state = _small_state(0)
    ckpt.save(url, state, step=1)
    store = Store(url)
    key = next(c.key for e in load_manifest(store, 1).tensors.values() for c in e.chunks)
    of = 4 << 30
    frame = _rle_zeros(of // 4)
    payload = _PLANE.pack(1, len(frame)) * 4 + frame * 4
    with open(store.object_path(key), "wb") as f:
        f.write(payload)
    doc = json.loads(store.read_manifest(1))
    doc["chunk_bytes"] = of
    for entry in doc["tensors"].values():
        for chunk in entry["chunks"]:
            if chunk["key"] == key:
                chunk.update(of=of, stored=len(payload), stored_hash=xxhash.xxh3_128_hexdigest(payload))
    store.write(store.manifest_path(1), json.dumps(doc).encode())
    with pytest.raises(ckpt.CorruptCheckpointError, match=f"packed object {key} declares {of} bytes"):
        if read == "restore":
            ckpt.restore(url, _small_state(1), step=1)
        else:
            ckpt.load(url, step=1)


@pytest.mark.parametrize("n", [30_000, 3_000])  # a pack streamed, a pack decoded whole
def test_a_packed_record_of_no_bytes_reads_nothing(tmp_path, n):
    url = str(tmp_path / "store")
    state = {f"t{i:02d}": torch.randn(n) for i in range(68)}
    ckpt.save(url, state, step=1)
    store = Store(url)
    doc = json.loads(store.read_manifest(1))
    entry = doc["tensors"]["t05"]
    entry["shape"], entry["nbytes"], entry["chunks"][0]["size"] = [0], 0, 0
    store.write(store.manifest_path(1), json.dumps(doc).encode())
    state["t05"] = torch.zeros(0)
    live = {k: torch.zeros_like(v) for k, v in state.items()}
    ckpt.restore(url, live, step=1)
    loaded = ckpt.load(url, step=1)
    assert all(torch.equal(live[k], state[k]) and torch.equal(loaded[k], state[k]) for k in state)
