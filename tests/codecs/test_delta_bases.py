"""Delta bases read back from an untrusted store (ckpt.io.delta_bases): the probe decodes
only their first bytes, unverified, so a base whose first bytes lie must never be written
against, and stores whose bases cannot be cut short (sealed, packed) still get deltas."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt
from ckpt.codecs import EncodeContext
from ckpt.codecs import delta as deltamod
from ckpt.codecs.base import decode_prefix, default_chain, encode_chain
from ckpt.storage.store import Store
from ckpt.testing import assert_same_state, clone_state, get_plugins
from ckpt.testing.store_urls import store_url_fixture

store_url = store_url_fixture(["file", "s3"], servers={"s3": "s3_server"})

N = 4 * deltamod.PROBE_BYTES // 4  # float32 elements: the smallest chunk that is probed


def _weights(seed: int = 7) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_a_base_whose_first_bytes_lie_is_never_written_against(store_url, caplog):
    """The base object is replaced by a well-formed encoding of the *new* chunk padded to
    the recorded length: its first bytes decode to exactly the new chunk's (the probe sees
    a perfect delta), the whole does not verify, and the chunk is written in full."""
    state = {"w": _weights()}
    ckpt.save(store_url, state, step=0)
    store = Store(store_url)
    ref = ckpt.read_manifest(store_url, 0).tensors["w"].chunks[0]
    state["w"][:1000] = 0.0  # compresses a little better: the lie fits the recorded length
    registry = get_plugins().codecs
    data = memoryview(state["w"].numpy().view(np.uint8).reshape(-1))
    lie, chain = encode_chain(registry, default_chain("float32"), data, EncodeContext(dtype="float32", itemsize=4))
    assert chain == list(ref.codec) and len(lie) < ref.stored
    lie = bytes(lie) + bytes(ref.stored - len(lie))
    head = decode_prefix(registry, chain, memoryview(lie), ref.size, deltamod.PROBE_BYTES)
    assert head is not None and bytes(head[: deltamod.PROBE_BYTES]) == bytes(data[: deltamod.PROBE_BYTES])
    store.fs.pipe_file(store.object_path(ref.key), lie)
    with caplog.at_level("WARNING", logger="ckpt"):
        stats = ckpt.save(store_url, state, step=1).write_stats
    assert stats is not None
    # probed from the lying first bytes, decoded whole, refused: written in full, and the
    # run does not learn that deltas of "w" do not pay (none was tried)
    assert (stats.probes, stats.parent_decodes, stats.delta_objects, stats.delta_outcome) == (1, 1, 0, {})
    assert any(ref.key in r.getMessage() and "writing it in full" in r.getMessage() for r in caplog.records)
    assert all(deltamod.chain_depth(r.codec) == 0 for r in ckpt.read_manifest(store_url, 1).chunk_refs())
    assert_same_state(ckpt.load(store_url, step=1), clone_state(state))


def test_sealed_bases_are_decoded_whole_for_the_probe_and_still_pay(tmp_path):
    """An encrypted store's objects are sealed: no prefix can be cut from them, so the base
    is decoded (and verified) whole and spread samples decide, as before."""
    url, enc = str(tmp_path / "store"), ckpt.Encryption(bytes(range(1, 33)))
    state = {"w": _weights()}
    ckpt.save(url, state, step=0, encryption=enc)
    state["w"] += torch.randn(N, generator=torch.Generator().manual_seed(1)) * 1e-6
    stats = ckpt.save(url, state, step=1, encryption=enc).write_stats
    assert stats is not None
    assert (stats.probes, stats.parent_reads, stats.parent_decodes, stats.delta_objects) == (1, 1, 1, 1)
    assert_same_state(ckpt.load(url, step=1, encryption=enc), clone_state(state))


def test_a_packed_parent_is_probed_from_its_first_bytes(tmp_path):
    """Small tensors packed into one probed object (ckpt.io.packing): its delta base is the
    parent's packed object, probed from its first bytes, and restores bit-exact."""
    url = str(tmp_path / "store")
    w = _weights()
    state = {f"t{i}": w[i * N // 4 : (i + 1) * N // 4].clone() for i in range(4)}  # 512 KiB each
    ckpt.save(url, state, step=0)
    assert len({r.key for r in ckpt.read_manifest(url, 0).chunk_refs()}) == 1
    for t in state.values():
        t += 1e-7 * torch.ones_like(t)
    stats = ckpt.save(url, state, step=1).write_stats
    assert stats is not None
    assert (stats.probes, stats.parent_decodes, stats.delta_objects) == (1, 1, 1)
    assert_same_state(ckpt.load(url, step=1), clone_state(state))


@settings(max_examples=300, deadline=None)
@given(
    payload=st.binary(max_size=600),
    itemsize=st.sampled_from([1, 2, 3, 4, 8, 16, -1]),
    elements=st.integers(min_value=0, max_value=64),
    head=st.integers(min_value=0, max_value=256),
)
def test_hostile_plane_tables_give_raw_planes_or_none_and_never_raise(payload, itemsize, elements, head):
    """``raw_planes`` and ``decode_prefix`` read untrusted bytes: whatever they hold, the
    answer is None or planes of exactly the chunk's length (and the probe's raw-plane check
    takes them without an error), never an exception."""
    codec = get_plugins().codecs.get("bgzstd")
    size = elements * max(itemsize, 1)
    params = {"name": "bgzstd", "itemsize": itemsize}
    planes = codec.raw_planes(memoryview(payload), size, params)
    if planes is not None:
        assert all(len(p) == elements for p in planes.values())
        data = memoryview(bytes(range(256)) * (size // 256 + 1))[:size]
        deltamod._first_bytes_understate(data, data[: head * itemsize], (itemsize, planes), 1)
    got = decode_prefix(get_plugins().codecs, [params], memoryview(payload), size, head)
    assert got is None or min(head, size) <= len(got) <= size


@st.composite
def _plane_tables(draw):
    """bgzstd payloads of ``elements`` elements whose tables are nearly right: each plane
    raw, zstd (random bytes) or an unknown mode, its recorded length off by a little or not."""
    import struct

    k = draw(st.sampled_from([2, 4, 8]))
    n = draw(st.integers(min_value=1, max_value=48))
    table, bodies = b"", b""
    for _ in range(k):
        mode = draw(st.sampled_from([0, 0, 1, 2]))
        body = draw(st.binary(min_size=n, max_size=n)) if mode == 0 else draw(st.binary(max_size=40))
        table += struct.pack("<BQ", mode, max(0, len(body) + draw(st.sampled_from([0, 0, 0, -1, 1]))))
        bodies += body
    return k, n, table + bodies + draw(st.sampled_from([b"", b"", b"\0"]))


@settings(max_examples=300, deadline=None)
@given(case=_plane_tables(), head=st.integers(min_value=0, max_value=64))
def test_nearly_valid_plane_tables_give_exact_raw_planes_or_none(case, head):
    k, n, payload = case
    codec = get_plugins().codecs.get("bgzstd")
    params = {"name": "bgzstd", "itemsize": k}
    planes = codec.raw_planes(memoryview(payload), n * k, params)
    if planes is not None:
        assert all(len(p) == n for p in planes.values())
        table = [payload[i * 9] for i in range(k)]
        assert sorted(planes) == [i for i, mode in enumerate(table) if mode == 0]
        data = memoryview(np.random.default_rng(0).bytes(n * k))
        deltamod._first_bytes_understate(data, data[: min(head, n // 2) * k], (k, planes), 1)
    got = decode_prefix(get_plugins().codecs, [params], memoryview(payload), n * k, head)
    assert got is None or min(head, n * k) <= len(got) <= n * k
