"""The XOR delta codec: changed chunks stored against the parent checkpoint's chunk,
bounded chains, bit-exact restore at every link, verification of every link."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import ckpt
from ckpt.api import write_checkpoint
from ckpt.codecs import EncodeContext
from ckpt.codecs import delta as deltamod
from ckpt.io.reader import Reader
from ckpt.io.writer import Writer
from ckpt.storage.store import Store
from ckpt.testing import assert_same_state, clone_state, corrupt_object, get_plugins, stored_objects


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 64)).to(dtype)


def _nudge(model: torch.nn.Module, scale: float = 1e-3) -> None:
    """A small update, like one optimizer step: low mantissa bits change."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale * p.abs().mean())


def _delta_depths(manifest) -> list[int]:
    return [deltamod.chain_depth(c.codec) for c in manifest.chunk_refs()]


# -- the codec itself ---------------------------------------------------------------------


# (round trips, damage and wrong parameters: tests/codecs/test_conformance.py)


def test_xor_codec_declines_without_a_matching_parent():
    codec = deltamod.XorDeltaCodec()
    data = memoryview(b"12345678")
    assert codec.encode(data, EncodeContext(dtype="uint8", itemsize=1)) is None
    short = EncodeContext(dtype="uint8", itemsize=1, parent=memoryview(b"1234"), parent_ref={"hash": "a"})
    assert codec.encode(data, short) is None


def test_delta_codec_is_registered_as_a_builtin():
    codecs = get_plugins().codecs
    assert "xor" in codecs
    assert codecs.owner("xor") == "ckpt.hooks.defaults"


def test_chain_depth_and_referenced_keys_follow_nested_parents():
    full = ckpt.ChunkRef(hash="a" * 32, key="a" * 32, size=8, stored=8, codec=())
    d1 = ckpt.ChunkRef(
        hash="b" * 32,
        key=deltamod.delta_key("b" * 32, "a" * 32),
        size=8,
        stored=3,
        codec=({"name": "xor", "parent": full.to_json()}, {"name": "zstd"}),
    )
    d2 = ckpt.ChunkRef(
        hash="c" * 32,
        key=deltamod.delta_key("c" * 32, "b" * 32),
        size=8,
        stored=3,
        codec=({"name": "xor", "parent": d1.to_json()},),
    )
    assert [deltamod.chain_depth(r.codec) for r in (full, d1, d2)] == [0, 1, 2]
    assert list(deltamod.referenced_keys(d2.to_json())) == [d2.key, d1.key, full.key]
    assert d1.key != d1.hash and d1.key.startswith(d1.hash)


# -- deltas in saves ----------------------------------------------------------------------


def test_small_update_is_stored_as_a_much_smaller_delta(store_url):
    model = _model(torch.bfloat16)
    full = ckpt.save(store_url, {"model": model}, step=0)
    _nudge(model)
    second = ckpt.save(store_url, {"model": model}, step=1)
    manifest = ckpt.read_manifest(store_url, 1)
    depths = _delta_depths(manifest)
    assert max(depths) == 1, "changed chunks should be deltas against step 0"
    for ref in manifest.chunk_refs():
        if deltamod.chain_depth(ref.codec):
            assert ref.key.endswith(".x" + deltamod.parent_record(ref.codec)["key"][:16])
            assert [s["name"] for s in ref.codec] == ["xor", "bgzstd"]
    # delta keys are object keys like any other: listed, so GC and `ckpt du` see them
    assert {r.key for r in manifest.chunk_refs()} <= set(stored_objects(Store(store_url)))
    assert second.stored_bytes * 3 < full.stored_bytes, (second.stored_bytes, full.stored_bytes)
    assert_same_state(ckpt.load(store_url, step=1)["model"], clone_state(model.state_dict()))


def test_delta_is_kept_only_when_smaller(store_url):
    model = _model(torch.float32)
    ckpt.save(store_url, {"model": model}, step=0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))  # unrelated values: XOR helps nothing
    ckpt.save(store_url, {"model": model}, step=1)
    manifest = ckpt.read_manifest(store_url, 1)
    assert _delta_depths(manifest) == [0] * len(manifest.chunk_refs())
    assert all(".x" not in r.key for r in manifest.chunk_refs())


def test_delta_false_writes_full_objects(store_url):
    model = _model(torch.bfloat16)
    ckpt.save(store_url, {"model": model}, step=0)
    _nudge(model)
    store = Store(store_url)
    plugins = get_plugins()
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    with ThreadPoolExecutor(4) as pool:
        info = write_checkpoint(
            store,
            plugins,
            step=1,
            json_tree={},
            adapters={},
            tensors=tensors,
            parent=ckpt.read_manifest(store.url, 0),
            pool=pool,
            delta=False,
        )
    manifest = ckpt.read_manifest(store.url, 1)
    assert _delta_depths(manifest) == [0] * len(manifest.chunk_refs())
    assert info.stored_bytes > 0


def test_chains_are_bounded_and_every_link_restores_bit_exact(store_url, monkeypatch):
    _chain_run(store_url, 3, monkeypatch)


def test_max_chain_1_turns_deltas_off(tmp_path, monkeypatch):
    _chain_run(f"file://{tmp_path}/store", 1, monkeypatch)


def _chain_run(store_url, max_chain, monkeypatch):
    monkeypatch.setenv("CKPT_DELTA_MAX_CHAIN", str(max_chain))
    monkeypatch.setenv("CKPT_CHUNK_BYTES", "65536")  # several chunks per weight
    model = _model(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    expected = {}
    store = Store(store_url)
    for step in range(7):
        model(torch.randn(4, 256)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ckpt.save(store_url, {"model": model, "opt": opt}, step=step)
        expected[step] = clone_state({"model": model.state_dict(), "opt": opt.state_dict()})
        depths = _delta_depths(ckpt.read_manifest(store.url, step))
        assert max(depths) <= min(1, max_chain - 1), "a delta cites a full object, never another delta"
        if max_chain == 1:
            assert all(".x" not in r.key for r in ckpt.read_manifest(store.url, step).chunk_refs())
    if max_chain > 1:
        # deltas happened, each citing the run's full object, and a full object came back
        # once a delta would have been max_chain saves old
        weight = [ckpt.read_manifest(store.url, s).tensors["model/0.weight"].chunks[0] for s in range(7)]
        assert [deltamod.delta_age(c.codec) for c in weight] == [0, 1, 2, 0, 1, 2, 0]
        for s, c in enumerate(weight):
            if deltamod.delta_age(c.codec):
                base = weight[s - deltamod.delta_age(c.codec)]
                assert deltamod.parent_record(c.codec)["key"] == base.key and ".x" not in base.key
    for step, state in expected.items():
        tree = ckpt.load(store_url, step=step)
        assert_same_state(tree["model"], state["model"])
        fresh = _model(torch.float32)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
        ckpt.restore(store_url, {"model": fresh, "opt": fresh_opt}, step=step)
        assert_same_state(clone_state(fresh_opt.state_dict()), state["opt"])


def test_max_chain_keyword_and_bad_values(store_url):
    model = _model(torch.bfloat16)
    store = Store(store_url)
    plugins = get_plugins()

    def save(step, **kw):
        tensors = {f"m/{k}": v for k, v in model.state_dict().items()}
        parent = ckpt.read_manifest(store.url, step - 1) if step else None
        with ThreadPoolExecutor(2) as pool:
            return write_checkpoint(
                store, plugins, step=step, json_tree={}, adapters={}, tensors=tensors, parent=parent, pool=pool, **kw
            )

    save(0)
    for step in (1, 2, 3):
        _nudge(model)
        save(step, max_chain=2)
        assert max(_delta_depths(ckpt.read_manifest(store.url, step))) == (1 if step % 2 else 0)
    with pytest.raises(ckpt.CheckpointError, match="max_chain"):
        save(4, max_chain=0)


def test_parent_tensors_spare_the_read_back(store_url, monkeypatch):
    monkeypatch.setenv("CKPT_PACK_BYTES", "0")  # chunk by chunk (packs: tests/io/test_packing.py)
    model = _model(torch.bfloat16)
    ckpt.save(store_url, {"model": model}, step=0)
    previous = {f"model/{k}": v.clone() for k, v in model.state_dict().items()}
    _nudge(model)
    store = Store(store_url)
    parent = ckpt.read_manifest(store.url, 0)
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    plugins = get_plugins()

    def write(parent_tensors):
        with ThreadPoolExecutor(4) as pool:
            writer = Writer(
                store,
                plugins.codecs,
                pool,
                known={},
                chunk_bytes=1 << 20,
                parent=parent,
                parent_tensors=parent_tensors,
                delta=True,
            )
            entries = {p: writer.submit(p, t).result() for p, t in tensors.items()}
        return writer.stats, entries

    stats, entries = write(previous)
    assert stats.parent_reads == 0 and stats.delta_objects > 0
    # A provider whose bytes no longer match the parent's hash is not trusted.
    wrong = {p: torch.zeros_like(t) for p, t in previous.items()}
    stats2, entries2 = write(wrong)
    assert stats2.parent_reads == stats2.objects_written  # every changed chunk read its parent back
    assert entries2 == entries
    # The delta objects decode to the new values.
    reader = Reader(store, plugins.codecs)
    for path, entry in entries.items():
        out = torch.empty_like(tensors[path])
        _decode(reader, path, entry, out)
        assert torch.equal(out.view(torch.int16), tensors[path].view(torch.int16))


def test_restore_reads_each_link_once_and_caches_parents(store_url, monkeypatch):
    monkeypatch.setenv("CKPT_DELTA_MAX_CHAIN", "8")
    x = torch.randn(4096, dtype=torch.float32)
    twin = {"a": x, "b": x.clone()}
    for step in range(4):
        ckpt.save(store_url, {"t": twin}, step=step)
        x.add_(1e-6 * torch.randn_like(x))
        twin["b"] = x.clone()
    store = Store(store_url)
    manifest = ckpt.read_manifest(store.url, 3)
    assert _delta_depths(manifest) == [1, 1]
    assert [deltamod.delta_age(c.codec) for c in manifest.chunk_refs()] == [3, 3]
    plugins = get_plugins()
    reader = Reader(store, plugins.codecs)
    for path, entry in manifest.tensors.items():
        out = torch.empty(4096)
        _decode(reader, path, entry, out)
    # both tensors cite the same full object of step 0: decoded once
    assert reader.parent_decodes == 1


def test_corrupt_or_missing_parent_is_reported_with_its_key(store_url):
    model = _model(torch.bfloat16)
    ckpt.save(store_url, {"model": model}, step=0)
    _nudge(model)
    ckpt.save(store_url, {"model": model}, step=1)
    store = Store(store_url)
    child = next(r for r in ckpt.read_manifest(store.url, 1).chunk_refs() if deltamod.chain_depth(r.codec))
    parent_key = deltamod.parent_record(child.codec)["key"]
    original = corrupt_object(store, parent_key)
    with pytest.raises(ckpt.CorruptCheckpointError, match=parent_key):
        ckpt.load(store_url, step=1)
    store.put_object(parent_key, original)
    ckpt.load(store_url, step=1)
    store.delete(store.object_path(parent_key))
    with pytest.raises(ckpt.MissingObjectError, match=parent_key):
        ckpt.load(store_url, step=1)


def test_missing_parent_at_save_time_falls_back_to_full_objects(store_url):
    model = _model(torch.bfloat16)
    ckpt.save(store_url, {"model": model}, step=0)
    store = Store(store_url)
    for info in list(store.list_objects()):
        store.delete(store.object_path(info.key))
    _nudge(model)
    ckpt.save(store_url, {"model": model}, step=1)
    manifest = ckpt.read_manifest(store.url, 1)
    assert _delta_depths(manifest) == [0] * len(manifest.chunk_refs())
    assert_same_state(ckpt.load(store_url, step=1)["model"], clone_state(model.state_dict()))


def test_manifest_records_parent_so_no_other_manifest_is_needed(store_url):
    model = _model(torch.bfloat16)
    ckpt.save(store_url, {"model": model}, step=0)
    _nudge(model)
    ckpt.save(store_url, {"model": model}, step=1)
    expected = clone_state(model.state_dict())
    store = Store(store_url)
    doc = json.loads(store.read_manifest(1))
    first = doc["tensors"]["model/0.weight"]["chunks"][0]
    assert first["codec"][0]["name"] == "xor"
    assert set(first["codec"][0]["parent"]) == {"hash", "key", "size", "stored", "codec", "stored_hash"}
    store.delete_manifest(0)
    assert_same_state(ckpt.load(store_url, step=1)["model"], expected)


@pytest.mark.parametrize("kind", ["nudged", "unrelated"])
def test_large_chunks_choose_delta_or_full_from_samples(tmp_path, kind):
    """A chunk of several MiB is encoded one way only, chosen by encoding samples both ways."""
    url = str(tmp_path / "store")
    torch.manual_seed(1)
    big = {"w": torch.randn(1024, 1024)}  # 4 MiB: one chunk >= 4 x PROBE_BYTES
    assert big["w"].nbytes >= 4 * deltamod.PROBE_BYTES
    first = ckpt.save(url, big, step=0)
    with torch.no_grad():
        if kind == "nudged":
            big["w"].add_(torch.randn_like(big["w"]) * 1e-5)
        else:
            big["w"].copy_(torch.randn_like(big["w"]))
    store = Store(url)
    plugins = get_plugins()
    with ThreadPoolExecutor(2) as pool:
        writer = Writer(
            store,
            plugins.codecs,
            pool,
            known={},
            chunk_bytes=16 << 20,
            parent=ckpt.read_manifest(store.url, 0),
            delta=True,
        )
        entry = writer.submit("w", big["w"]).result()
    assert writer.stats.probes == 1
    (ref,) = entry.chunks
    if kind == "nudged":
        assert deltamod.chain_depth(ref.codec) == 1
        assert ref.stored * 2 < first.stored_bytes
    else:
        assert deltamod.chain_depth(ref.codec) == 0 and ".x" not in ref.key
    out = torch.empty_like(big["w"])
    _decode(Reader(store, plugins.codecs), "w", entry, out)
    assert torch.equal(out.view(torch.int32), big["w"].view(torch.int32))


def test_stores_with_deltas_of_deltas_still_read_and_extend(store_url, monkeypatch):
    """Deltas citing the previous delta (nested parent records) decode link by link."""
    monkeypatch.setenv("CKPT_DELTA_MAX_CHAIN", "8")
    # write the older layout: every delta cites the previous checkpoint's object
    monkeypatch.setattr(
        deltamod,
        "delta_base",
        lambda parent, max_chain: (
            (parent, deltamod.chain_depth(parent["codec"]) + 1) if parent is not None else (None, 0)
        ),
    )
    model = _model(torch.float32)
    expected = {}
    for step in range(3):
        ckpt.save(store_url, {"model": model}, step=step)
        expected[step] = clone_state(model.state_dict())
        _nudge(model)
    store = Store(store_url)
    assert max(_delta_depths(ckpt.read_manifest(store.url, 2))) == 2
    monkeypatch.undo()
    monkeypatch.setenv("CKPT_DELTA_MAX_CHAIN", "8")
    ckpt.save(store_url, {"model": model}, step=3)  # the new writer extends such a chain
    expected[3] = clone_state(model.state_dict())
    assert max(_delta_depths(ckpt.read_manifest(store.url, 3))) == 3
    for step, state in expected.items():
        assert_same_state(ckpt.load(store_url, step=step)["model"], state)


def _decode(reader: Reader, path: str, entry, out: torch.Tensor) -> None:
    """Decode ``entry``'s chunks one by one into ``out`` through ``reader``."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    offset = 0
    for ref in entry.chunks:
        reader.read_chunk(ref, view[offset : offset + ref.size], what=f"tensor {path!r}")
        offset += ref.size


# -- large chunks: the base decoded whole only for a delta that is written ---------------


def _two_big(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # 4 MiB each: one chunk apiece, large enough to be probed (>= 4 x PROBE_BYTES)
    return {"nudged": torch.randn(1024, 1024, generator=g), "replaced": torch.randn(1024, 1024, generator=g)}


def _step(state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        state["nudged"].add_(torch.randn_like(state["nudged"]) * 1e-5)
        state["replaced"].copy_(torch.randn_like(state["replaced"]))


def test_probe_decodes_whole_only_the_bases_a_delta_is_written_against(store_url):
    state = _two_big()
    assert state["nudged"].nbytes >= 4 * deltamod.PROBE_BYTES
    ckpt.save(store_url, state, step=0)
    _step(state)
    stats = ckpt.save(store_url, state, step=1).write_stats
    assert stats is not None
    # both bases fetched, both chunks probed from their bases' first bytes; only the base
    # of the delta that was written was decoded whole (and verified)
    assert (stats.parent_reads, stats.probes, stats.parent_decodes, stats.delta_objects) == (2, 2, 1, 1)
    assert stats.delta_outcome == {"nudged": True, "replaced": False}
    chains = {p: deltamod.chain_depth(e.chunks[0].codec) for p, e in ckpt.read_manifest(store_url, 1).tensors.items()}
    assert chains == {"nudged": 1, "replaced": 0}
    assert_same_state(ckpt.load(store_url, step=1), clone_state(state))


@pytest.mark.parametrize("damage", ["middle", "header", "truncated"])
def test_a_damaged_base_costs_compression_only(tmp_path, caplog, damage):
    """A base whose first bytes decode but whose whole does not verify ("middle"), or whose
    plane table or length is wrong, is written against by nobody: the chunk is stored in
    full, the log names the object, and the checkpoint restores bit-exact."""
    url = str(tmp_path / "store")
    state = _two_big()
    ckpt.save(url, state, step=0)
    store = Store(url)
    base = ckpt.read_manifest(url, 0).tensors["nudged"].chunks[0]
    if damage == "truncated":
        with open(store.object_path(base.key), "r+b") as f:
            f.truncate(base.stored - 100)
    else:
        corrupt_object(store, base.key, offset=3 if damage == "header" else None)
    _step(state)
    with caplog.at_level("WARNING", logger="ckpt"):
        stats = ckpt.save(url, state, step=1).write_stats
    assert stats is not None and stats.delta_objects == 0
    assert any(base.key in r.getMessage() and "writing it in full" in r.getMessage() for r in caplog.records)
    assert all(deltamod.chain_depth(r.codec) == 0 for r in ckpt.read_manifest(url, 1).chunk_refs())
    assert_same_state(ckpt.load(url, step=1), clone_state(state))


def test_a_chunk_that_paid_a_delta_is_not_judged_by_its_first_bytes_alone(tmp_path):
    """A chunk whose parent is a delta (a delta paid at its last change) and whose first
    rows now change wholesale while the rest does not: the base's first bytes say "full",
    spread samples of the whole base say "delta", and the delta is what pays."""
    url = str(tmp_path / "store")
    g = torch.Generator().manual_seed(5)
    n = 4 * deltamod.PROBE_BYTES // 4  # float32 elements: the smallest probed chunk
    w = torch.randn(n, generator=g) * 0.02
    state = {"emb": w.clone()}
    ckpt.save(url, state, step=0)
    rows = torch.randperm(n, generator=g)[: n // 20]
    state["emb"][rows] += torch.randn(len(rows), generator=g) * 1e-5  # a few rows: a delta pays
    assert ckpt.save(url, state, step=1).write_stats.delta_objects == 1
    head = deltamod.PROBE_BYTES // 4
    state["emb"][:head] = torch.randn(head, generator=g) * 0.02  # the first rows replaced
    stats = ckpt.save(url, state, step=2).write_stats
    assert stats is not None
    full = ckpt.read_manifest(url, 0).tensors["emb"].chunks[0].stored
    assert (stats.probes, stats.delta_objects, stats.delta_outcome) == (1, 1, {"emb": True})
    assert stats.written_bytes < 0.5 * full
    assert_same_state(ckpt.load(url, step=2), clone_state(state))


@pytest.mark.parametrize("changed", ["first rows", "everywhere"])
def test_a_full_base_past_its_first_bytes_is_judged_by_its_raw_planes(tmp_path, monkeypatch, changed):
    """The first delta of a chunk whose first rows changed and the rest did not: its base is
    a full object, whose first bytes say "full"; its raw (low mantissa) planes, read in place,
    show the rest unchanged, so the whole base is decoded and the delta written. A chunk
    changed everywhere shows no such thing and its base is never decoded whole."""
    url = str(tmp_path / "store")
    g = torch.Generator().manual_seed(7)
    state = {"emb": torch.randn(512, 2048, generator=g) * 0.02}  # 4 MiB of float32: probed
    ckpt.save(url, state, step=0)
    with torch.no_grad():
        rows = state["emb"][:100] if changed == "first rows" else state["emb"]
        rows.copy_(torch.randn(rows.shape, generator=g) * 0.02)  # replaced: no delta pays there
    stats = ckpt.save(url, state, step=1).write_stats
    assert stats is not None and stats.probes == 1
    full = ckpt.read_manifest(url, 0).tensors["emb"].chunks[0].stored
    if changed == "first rows":
        assert (stats.parent_decodes, stats.delta_objects) == (1, 1)
        assert stats.written_bytes < 0.5 * full
    else:
        assert (stats.parent_decodes, stats.delta_objects) == (0, 0)
    assert_same_state(ckpt.load(url, step=1), clone_state(state))


def test_a_tree_citing_a_delta_tensor_twice_loads_it_once(tmp_path):
    """A manifest whose tree names one tensor in two places (hostile, or hand-edited): the
    tensor is read once, not twice into the same memory at once (a delta decodes in place,
    and two decodes racing in one buffer made an intact object fail verification)."""
    from ckpt.io.plan import ReadPlan

    url = str(tmp_path / "store")
    model = _model(torch.float32)
    ckpt.save(url, {"model": model}, step=0)
    _nudge(model)
    ckpt.save(url, {"model": model}, step=1)
    manifest = ckpt.read_manifest(url, 1)
    path = next(p for p, e in manifest.tensors.items() if deltamod.chain_depth(e.chunks[0].codec))
    plan = ReadPlan.for_paths(manifest, [path, "model/1.bias", path])
    assert plan.paths == (path, "model/1.bias")
    assert len(plan.reads) == len(manifest.tensors[path].chunks) + len(manifest.tensors["model/1.bias"].chunks)
    store = Store(url)
    doc = json.loads(store.read_manifest(1))
    doc["tree"]["model"]["extra"] = {"$tensor": path}  # the delta tensor cited a second time
    store.write(store.path("manifests", "1.json"), json.dumps(doc).encode())
    loaded = ckpt.load(url, step=1)
    assert torch.equal(loaded["model"]["extra"], model.state_dict()[path.split("/", 1)[1]])


@pytest.mark.parametrize("change", ["nudged", "replaced"])
def test_a_delta_the_samples_overrate_is_kept_but_not_counted_as_paid(change):
    """The probe sees the base's first bytes equal to the chunk's (a perfect delta there).
    Past them the chunk is its base nudged (a delta that pays) or replaced by other values
    of the same scale: a delta that is still smaller than the raw chunk (kept, so the
    encoding is not wasted) but saves less than MIN_GAIN asks of the full encoding, so it
    does not count as paid and a Checkpointer stops trying it for a while."""
    g = torch.Generator().manual_seed(5)
    n = 16 * deltamod.PROBE_BYTES // 4  # the probed head is 1/16 of it
    new = torch.randn(n, generator=g) * 0.02
    old = new + 1e-6 * torch.randn(n, generator=g) if change == "nudged" else torch.randn(n, generator=g) * 0.02
    old[: deltamod.PROBE_BYTES // 4] = new[: deltamod.PROBE_BYTES // 4]
    data = memoryview(new.numpy().view("uint8"))
    base_bytes = memoryview(old.numpy().view("uint8"))
    record = {"hash": "0" * 32, "size": len(data)}
    base = deltamod.DeltaBase(record, 1, whole=lambda: base_bytes, prefix=lambda k: base_bytes[:k])
    registry = get_plugins().codecs
    ctx = EncodeContext(dtype="float32", itemsize=4)
    choice = deltamod.choose(registry, data, ctx, base)
    full = len(deltamod.encode_chain(registry, deltamod.default_chain("float32"), data, ctx)[0])
    assert choice.delta and choice.tried and choice.probed and len(choice.payload) < len(data)
    assert choice.paid == (len(choice.payload) < full * deltamod.MIN_GAIN) == (change == "nudged")
    learner = deltamod.DeltaLearner(retry_after=2)
    learner.learn({"w": choice.paid})
    assert ("w" in learner.skip()) == (change == "replaced")
