"""Delta bases read back from an untrusted store (ckpt.io.delta_bases): the probe decodes
only their first bytes, unverified, so a base whose first bytes lie must never be written
against, and stores whose bases cannot be cut short (sealed, packed) still get deltas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt
from ckpt.codecs import EncodeContext
from ckpt.codecs import delta as deltamod
from ckpt.codecs.base import decode_prefix, decode_prefix_from, default_chain, encode_chain
from ckpt.storage.store import Store
from ckpt.testing import assert_same_state, clone_state, get_plugins
from ckpt.testing.store_urls import store_url_fixture

store_url = store_url_fixture(["file", "s3"], servers={"s3": "s3_server"})

N = 4 * deltamod.PROBE_BYTES // 4  # float32 elements: the smallest chunk that is probed


def _weights(seed: int = 7, n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.02


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


def test_a_probe_that_favours_a_full_object_reads_ranges_of_the_base_not_all_of_it(store_url):
    """A chunk rewritten everywhere (every byte differs from its base's): the probe decides
    from the base's plane table, the first bytes of its planes and samples of its raw
    planes, read in ranges, and never reads or decodes the rest of it."""
    state = {"w": _weights(n=4 << 20)}  # one 16 MiB chunk
    ckpt.save(store_url, state, step=0)
    ref = ckpt.read_manifest(store_url, 0).tensors["w"].chunks[0]
    state["w"].copy_(_weights(seed=8, n=4 << 20))
    stats = ckpt.save(store_url, state, step=1).write_stats
    assert stats is not None
    assert (stats.probes, stats.parent_reads, stats.parent_decodes, stats.delta_objects) == (1, 1, 0, 0)
    if Store(store_url).local:
        assert 0 < stats.parent_bytes_read < ref.stored // 8
    else:  # a remote object is fetched whole once: one request, not one per range
        assert stats.parent_bytes_read == ref.stored
    assert_same_state(ckpt.load(store_url, step=1), clone_state(state))


def test_a_kept_delta_reads_its_base_whole_once(store_url):
    state = {"w": _weights(n=4 << 20)}
    ckpt.save(store_url, state, step=0)
    ref = ckpt.read_manifest(store_url, 0).tensors["w"].chunks[0]
    state["w"] += 1e-6
    stats = ckpt.save(store_url, state, step=1).write_stats
    assert stats is not None
    assert (stats.parent_reads, stats.parent_decodes, stats.delta_objects) == (1, 1, 1)
    if Store(store_url).local:
        assert ref.stored <= stats.parent_bytes_read < ref.stored * 1.1  # the ranges of the probe, then the whole
    else:
        assert stats.parent_bytes_read == ref.stored
    assert_same_state(ckpt.load(store_url, step=1), clone_state(state))


@settings(max_examples=60, deadline=None)
@given(
    k=st.sampled_from([2, 4, 8]),
    n=st.integers(min_value=1, max_value=70_000),
    head=st.integers(min_value=1, max_value=300_000),
    noise=st.floats(min_value=0.0, max_value=1.0),
    cut=st.integers(min_value=-64, max_value=64),
)
def test_a_prefix_read_in_ranges_is_the_prefix_of_the_whole_payload(k, n, head, noise, cut):
    """``decode_prefix_from`` (ranges) gives what ``decode_prefix`` gives on the whole payload,
    and the start of the chunk when the payload is intact; a payload cut short or padded
    (``cut``) gives the same answer both ways, never an exception."""
    rng = np.random.default_rng(n)
    data = (rng.standard_normal(n) * 0.02).astype({2: np.float16, 4: np.float32, 8: np.float64}[k])
    data[: int(n * noise)] = 0
    raw = memoryview(data.view(np.uint8).reshape(-1))
    registry = get_plugins().codecs
    dtype = {2: "float16", 4: "float32", 8: "float64"}[k]
    payload, chain = encode_chain(registry, default_chain(dtype), raw, EncodeContext(dtype=dtype, itemsize=k))
    payload = bytes(payload)
    if cut < 0:
        payload = payload[:cut]
    elif cut > 0:
        payload += bytes(cut)
    reads: list[tuple[int, int]] = []

    def read(a: int, b: int) -> bytes:
        reads.append((a, b))
        return payload[a:b]

    whole = decode_prefix(registry, chain, memoryview(payload), len(raw), head)
    ranged = decode_prefix_from(registry, chain, read, len(payload), len(raw), head)
    assert (whole is None) == (ranged is None)
    if ranged is not None:
        assert bytes(ranged) == bytes(whole)
    if cut == 0 and chain:
        assert ranged is not None and bytes(ranged[: min(head, len(raw))]) == bytes(raw[:head])
    if chain and len(raw) > 4 * head + 4 * 1024 * 1024:  # a prefix reads a small part of a large payload
        assert sum(b - a for a, b in reads) < len(payload) // 2


def test_object_ranges_read_what_lies_there_and_refuse_what_does_not(store_url):
    from ckpt.errors import MissingObjectError

    store = Store(store_url)
    body = bytes(range(256)) * 40
    store.put_object("ab" * 16, body)
    with store.object_ranges("ab" * 16) as read:
        assert read(0, 10) == body[:10]
        assert read(5000, 5300) == body[5000:5300]
        assert read(len(body) - 4, len(body) + 100) == body[-4:]  # short at the end
        assert read(len(body) + 10, len(body) + 20) == b""  # past it
        assert read(7, 7) == b""
    try:
        with store.object_ranges("cd" * 16, what="tensor 'w'") as read:
            read(0, 10)
    except MissingObjectError as exc:
        assert "cd" * 16 in str(exc) and "tensor 'w'" in str(exc)
    else:
        raise AssertionError("a missing object was read")


def test_the_probe_leaves_no_object_open(tmp_path, monkeypatch):
    """Each probed base is opened once for its ranges and closed once its chunk is encoded."""
    import os

    monkeypatch.setenv("CKPT_CHUNK_BYTES", str(N * 4))
    url = str(tmp_path / "store")
    w = torch.cat([_weights(seed=s) for s in range(6)])
    state = {"w": w}
    ckpt.save(url, state, step=0)
    fds = len(os.listdir("/proc/self/fd"))
    state["w"].copy_(torch.cat([_weights(seed=10 + s) for s in range(6)]))
    stats = ckpt.save(url, state, step=1).write_stats
    assert stats is not None and stats.probes == 6 and stats.parent_reads == 6
    assert len(os.listdir("/proc/self/fd")) <= fds


@pytest.mark.parametrize("keep", [0, 40, 300_000, -1])
@pytest.mark.parametrize("change", ["small", "everywhere"])
def test_a_base_cut_short_after_its_save_costs_compression_only(tmp_path, caplog, keep, change):
    """The base object truncated (to nothing, into its plane table, into its planes, by one
    byte): whatever ranges the probe can still read, the chunk is written in full, never
    against the damaged base, and restores bit-exact."""
    url = str(tmp_path / "store")
    state = {"w": _weights(n=1 << 20)}
    ckpt.save(url, state, step=0)
    ref = ckpt.read_manifest(url, 0).tensors["w"].chunks[0]
    path = Store(url).object_path(ref.key)
    with open(path, "r+b") as f:
        f.truncate(ref.stored - 1 if keep < 0 else keep)
    if change == "small":
        state["w"] += 1e-6
    else:
        state["w"].copy_(_weights(seed=9, n=1 << 20))
    with caplog.at_level("WARNING", logger="ckpt"):
        stats = ckpt.save(url, state, step=1).write_stats
    assert stats is not None and stats.delta_objects == 0
    assert all(deltamod.chain_depth(r.codec) == 0 for r in ckpt.read_manifest(url, 1).chunk_refs())
    assert_same_state(ckpt.load(url, step=1), clone_state(state))


def test_a_closed_base_reads_nothing_more(tmp_path):
    from ckpt.io.delta_bases import StoredBase
    from ckpt.io.reader import Reader

    url = str(tmp_path / "store")
    ckpt.save(url, {"w": _weights()}, step=0)
    ref = ckpt.read_manifest(url, 0).tensors["w"].chunks[0]
    store = Store(url)
    counts: dict[str, int] = {}

    def count(**kw: int) -> None:
        for k, v in kw.items():
            counts[k] = counts.get(k, 0) + v

    base = StoredBase(Reader(store, get_plugins().codecs), ref, "tensor 'w'", count).base(ref.to_json(), 1)
    head = base.prefix(4096)
    assert head is not None and bytes(head[:4096]) == bytes(_weights().numpy().view(np.uint8)[:4096])
    read = counts["parent_bytes_read"]
    base.close()
    assert base.prefix(4096) is None and counts["parent_bytes_read"] == read
