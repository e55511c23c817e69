"""A restore from local disk decodes encoded objects straight into the live tensors.

Their stored bytes are hashed first (the manifest records that hash), so damage is found
before anything live changes; no fresh memory the size of the state is taken, nor a copy
of it into the live tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
import xxhash

import ckpt
import ckpt.state.in_place as in_place_mod
import ckpt.state.restore as restore_mod
from ckpt.storage.commit import load_manifest
from ckpt.storage.store import Store
from ckpt.testing import corrupt_object


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optim.zero_grad()
    model(torch.randn(8, 512)).pow(2).mean().backward()
    optim.step()  # moments exist: they are live tensors too
    return {"model": model, "optim": optim}


def _weights(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state["model"].state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _encoded(url: str, step: int) -> dict[str, list]:
    """The unpacked tensors stored encoded, with their chunk records."""
    m = load_manifest(Store(url), step)
    return {
        p: list(e.chunks) for p, e in m.tensors.items() if e.chunks and not e.chunks[0].packed and e.chunks[0].codec
    }


@pytest.fixture
def reads(monkeypatch):
    """(paths, destinations) of every read_tensors call of a restore."""
    calls: list[tuple[list[str], list[str]]] = []
    real = in_place_mod.read_tensors

    def spy(store, codecs, plan, **kw):
        calls.append((sorted(plan.paths), sorted(kw.get("destinations") or {})))
        return real(store, codecs, plan, **kw)

    monkeypatch.setattr(in_place_mod, "read_tensors", spy)
    return calls


@pytest.fixture
def saved(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_CHUNK_BYTES", str(512 * 1024))  # the large weights span several chunks
    url = str(tmp_path / "store")
    state = _state()
    ckpt.save(url, state, step=1)
    return url, state


def test_encoded_objects_record_the_hash_of_their_stored_bytes(saved):
    url, _ = saved
    store = Store(url)
    m = load_manifest(store, 1)
    records = [c for e in m.tensors.values() for c in e.chunks]
    encoded = [c for c in records if c.codec]
    assert encoded
    for c in encoded:
        with open(store.object_path(c.key), "rb") as f:
            assert c.stored_hash == xxhash.xxh3_128_hexdigest(f.read())
    assert all(not c.stored_hash for c in records if not c.codec)  # a raw object's bytes are its content


def test_encoded_tensors_are_decoded_into_the_live_tensors(saved, reads):
    url, state = saved
    want = _weights(state)
    fresh = _state(seed=3)
    ptrs = {n: p.data_ptr() for n, p in fresh["model"].named_parameters()}
    moments = [s["exp_avg"].data_ptr() for s in fresh["optim"].state.values() if s["exp_avg"].dim() == 2]
    assert ckpt.restore(url, fresh).step == 1
    assert _same(_weights(fresh), want)
    for a, b in zip(state["optim"].state.values(), fresh["optim"].state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    encoded = _encoded(url, 1)
    assert any(p.startswith("model/") for p in encoded) and any(p.startswith("optim/") for p in encoded)
    in_place = {p for _, dest in reads for p in dest}
    fresh_reads = {p for paths, dest in reads if not dest for p in paths}
    assert set(encoded) <= in_place and not (set(encoded) & fresh_reads)
    # the very same memory holds the restored values
    assert {n: p.data_ptr() for n, p in fresh["model"].named_parameters()} == ptrs
    assert [s["exp_avg"].data_ptr() for s in fresh["optim"].state.values() if s["exp_avg"].dim() == 2] == moments


def _packed(url: str, step: int) -> dict[str, str]:
    """The packed tensors, with the key of the object each is packed in."""
    m = load_manifest(Store(url), step)
    return {p: e.chunks[0].key for p, e in m.tensors.items() if e.chunks and e.chunks[0].packed}


def test_packed_tensors_are_copied_from_their_object_into_the_live_tensors(saved, reads):
    # the biases and their moments share packed objects: decoded once into a reused buffer,
    # then sliced into the live tensors (no fresh tensor, no load_state_dict copy)
    url, state = saved
    packed = _packed(url, 1)
    assert any(p.startswith("model/") for p in packed) and any(p.startswith("optim/") for p in packed)
    fresh = _state(seed=3)
    biases = {n: p.data_ptr() for n, p in fresh["model"].named_parameters() if n.endswith("bias")}
    assert ckpt.restore(url, fresh).step == 1
    assert _same(_weights(fresh), _weights(state))
    for a, b in zip(state["optim"].state.values(), fresh["optim"].state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    in_place = {p for _, dest in reads for p in dest}
    fresh_reads = {p for paths, dest in reads if not dest for p in paths}
    assert set(packed) <= in_place and not (set(packed) & fresh_reads)
    assert {n: p.data_ptr() for n, p in fresh["model"].named_parameters() if n.endswith("bias")} == biases


def test_a_damaged_packed_object_changes_nothing_live(saved):
    url, _ = saved
    packed = _packed(url, 1)
    key = packed[sorted(p for p in packed if p.startswith("model/"))[0]]
    corrupt_object(Store(url), key)
    fresh = _state(seed=3)
    before = _weights(fresh)
    moments = [s["exp_avg"].clone() for s in fresh["optim"].state.values()]
    with pytest.raises(ckpt.CorruptCheckpointError, match=key) as err:
        ckpt.restore(url, fresh, step=1)
    assert "partly overwritten" not in str(err.value)
    assert _same(_weights(fresh), before)
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, fresh["optim"].state.values()))


def test_live_tensors_are_not_mapped_in_again_but_fresh_memory_is(saved, monkeypatch):
    # prefault (madvise POPULATE_WRITE) maps fresh memory in at once; over live tensors,
    # resident already, it would only walk their pages
    import ckpt.io.memory as memory_mod
    import ckpt.io.reader as reader_mod

    url, state = saved
    faulted: list[int] = []
    real = memory_mod.prefault

    def spy(view: memoryview) -> None:
        faulted.append(memory_mod.tensor_span(torch.frombuffer(view, dtype=torch.uint8))[0] if len(view) else 0)
        real(view)

    monkeypatch.setattr(reader_mod, "prefault", spy)
    fresh = _state(seed=3)
    live = {t.data_ptr() for t in fresh["model"].parameters()}
    live |= {s[k].data_ptr() for s in fresh["optim"].state.values() for k in ("exp_avg", "exp_avg_sq")}
    assert ckpt.restore(url, fresh).step == 1
    assert _same(_weights(fresh), _weights(state))
    assert not live & set(faulted), "a live tensor was prefaulted"
    faulted.clear()
    loaded = ckpt.load(url, keys=["model"])  # into fresh memory: mapped in before it is decoded into
    assert _same(dict(loaded["model"]), _weights(state))
    assert faulted


@pytest.mark.parametrize("which", ["first", "last"])
def test_a_damaged_encoded_object_changes_nothing_live(saved, which):
    url, _ = saved
    encoded = _encoded(url, 1)
    path = sorted(p for p in encoded if p.startswith("model/") and len(encoded[p]) > 1)[0]
    ref = encoded[path][0 if which == "first" else -1]
    corrupt_object(Store(url), ref.key)
    fresh = _state(seed=3)
    before = _weights(fresh)
    with pytest.raises(ckpt.CorruptCheckpointError, match=ref.key) as err:
        ckpt.restore(url, fresh, step=1)
    assert "partly overwritten" not in str(err.value)
    assert _same(_weights(fresh), before)


def test_a_truncated_encoded_object_changes_nothing_live(saved):
    url, _ = saved
    store = Store(url)
    ref = next(iter(_encoded(url, 1).values()))[-1]
    path = store.object_path(ref.key)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-1])
    fresh = _state(seed=3)
    before = _weights(fresh)
    with pytest.raises(ckpt.CorruptCheckpointError, match="truncated"):
        ckpt.restore(url, fresh, step=1)
    assert _same(_weights(fresh), before)


def _edit_manifest(url: str, step: int, edit) -> None:
    store = Store(url)
    doc = json.loads(store.read_manifest(step))
    for entry in doc["tensors"].values():
        for chunk in entry["chunks"]:
            edit(chunk)
    store.write(store.manifest_path(step), json.dumps(doc).encode())


def test_a_manifest_without_stored_hashes_restores_through_fresh_memory(saved, reads):
    """An older writer's manifest has no stored hashes: its encoded objects are decoded and
    verified into fresh memory before anything live changes, as before."""
    url, state = saved
    _edit_manifest(url, 1, lambda c: c.pop("stored_hash", None))
    want = _weights(state)
    fresh = _state(seed=3)
    assert ckpt.restore(url, fresh).step == 1
    assert _same(_weights(fresh), want)
    assert not {p for _, dest in reads for p in dest} & set(_encoded(url, 1))
    # and damage is still found before anything changes
    ref = next(iter(_encoded(url, 1).values()))[-1]
    corrupt_object(Store(url), ref.key)
    fresh = _state(seed=4)
    before = _weights(fresh)
    with pytest.raises(ckpt.CorruptCheckpointError, match=ref.key):
        ckpt.restore(url, fresh, step=1)
    assert _same(_weights(fresh), before)


def test_a_stored_hash_forged_to_match_an_undecodable_object_is_refused_and_said_so(saved):
    """Stored bytes that hash as recorded but do not decode to the content hash (only a forger
    writes those) are found during the decode into the live tensors: the error says the live
    tensors may have changed, and a restore of an intact checkpoint repairs them."""
    url, state = saved
    store = Store(url)
    ref = next(iter(_encoded(url, 1).values()))[-1]
    bad = bytearray(store.get_object(ref.key))
    bad[len(bad) // 2] ^= 0xFF
    with open(store.object_path(ref.key), "wb") as f:
        f.write(bad)
    forged = xxhash.xxh3_128_hexdigest(bytes(bad))
    _edit_manifest(url, 1, lambda c: c.__setitem__("stored_hash", forged) if c["key"] == ref.key else None)
    fresh = _state(seed=3)
    with pytest.raises(ckpt.CorruptCheckpointError, match="partly overwritten"):
        ckpt.restore(url, fresh, step=1)


@pytest.mark.parametrize("value", ["x" * 32, 7, "ABCDEF" + "0" * 26, "0" * 31])
def test_a_malformed_stored_hash_is_a_schema_error(saved, value):
    url, _ = saved
    _edit_manifest(url, 1, lambda c: c.__setitem__("stored_hash", value) if c.get("codec") else None)
    with pytest.raises(ckpt.SchemaError, match="stored hash"):
        ckpt.read_manifest(url, 1)


@pytest.fixture
def deltas(tmp_path):
    """A store whose step 2 holds deltas of the model's weights against step 1's objects:
    (url, state at step 2, {path: the parent records its delta chunks cite})."""
    url = str(tmp_path / "store")
    state = _state()
    with ckpt.Checkpointer(url) as ck:
        ck.save(state, step=1).wait()
        with torch.no_grad():
            for p in state["model"].parameters():
                p.view(-1)[::97] += 1e-3  # a few elements change: deltas pay
        ck.save(state, step=2).wait()
    m = load_manifest(Store(url), 2)
    parents = {
        p: [s["parent"] for c in e.chunks for s in c.codec if s["name"] == "xor"]
        for p, e in m.tensors.items()
        if not e.chunks[0].packed
    }
    parents = {p: recs for p, recs in parents.items() if recs}
    assert parents, "the second save wrote no delta"
    return url, state, parents


def test_delta_objects_are_decoded_into_the_live_tensors(deltas, reads):
    """A delta's parent objects are verified by their stored bytes too: the delta is decoded
    straight into the live tensor, its parent into a reused buffer (not fresh memory)."""
    url, state, parents = deltas
    want = _weights(state)
    fresh = _state(seed=3)
    ptrs = {n: p.data_ptr() for n, p in fresh["model"].named_parameters()}
    assert ckpt.restore(url, fresh).step == 2
    assert _same(_weights(fresh), want)
    assert set(parents) <= {p for _, dest in reads for p in dest}
    assert {n: p.data_ptr() for n, p in fresh["model"].named_parameters()} == ptrs


@pytest.mark.parametrize("damage", ["corrupt", "missing", "truncated"])
def test_a_damaged_parent_of_a_delta_changes_nothing_live(deltas, damage):
    url, _, parents = deltas
    store = Store(url)
    key = next(iter(parents.values()))[0]["key"]
    if damage == "corrupt":
        corrupt_object(store, key)
    elif damage == "missing":
        store.fs.rm(store.object_path(key))
    else:
        with open(store.object_path(key), "r+b") as f:
            f.truncate(f.seek(0, 2) - 1)
    fresh = _state(seed=3)
    before = _weights(fresh)
    error = ckpt.MissingObjectError if damage == "missing" else ckpt.CorruptCheckpointError
    with pytest.raises(error, match=key) as err:
        ckpt.restore(url, fresh, step=2)
    assert "partly overwritten" not in str(err.value)
    assert _same(_weights(fresh), before)


def test_a_delta_whose_parent_records_no_stored_hash_restores_through_fresh_memory(deltas, reads):
    """An older writer's parent records carry no stored hash: those deltas are decoded and
    verified into fresh memory before anything live changes, as before."""
    url, state, parents = deltas

    def strip(chunk: dict) -> None:
        for step in chunk.get("codec", []):
            if step["name"] == "xor":
                step["parent"].pop("stored_hash", None)

    _edit_manifest(url, 2, strip)
    want = _weights(state)
    fresh = _state(seed=3)
    assert ckpt.restore(url, fresh, step=2).step == 2
    assert _same(_weights(fresh), want)
    assert not set(parents) & {p for _, dest in reads for p in dest}


def test_a_reader_caching_no_parents_lends_each_delta_its_parent(deltas):
    """``cache_bytes=0`` (the in-place decode): the parent is read into a reused buffer for
    its delta alone, never through the parent cache; the result is the same."""
    from ckpt.hooks.manager import get_plugins
    from ckpt.io.reader import Reader

    url, state, parents = deltas
    store = Store(url)
    m = load_manifest(store, 2)
    path = next(iter(parents))
    want = _weights(state)[path.removeprefix("model/")]
    for cache in (0, 64 << 20):
        reader = Reader(store, get_plugins().codecs, cache_bytes=cache)
        out = torch.empty_like(want)
        view = out.view(-1).view(torch.uint8).numpy().data
        at = 0
        for c in m.tensors[path].chunks:
            reader.read_chunk(c, view[at : at + c.size], what=path)
            at += c.size
        assert torch.equal(out, want)
        assert reader.parent_decodes == (0 if cache == 0 else len(parents[path]))


def test_a_remote_store_is_read_once_into_fresh_memory(reads):
    url = "memory://in-place-remote"
    state = _state()
    ckpt.save(url, state, step=1)
    try:
        fresh = _state(seed=3)
        assert ckpt.restore(url, fresh).step == 1
        assert _same(_weights(fresh), _weights(state))
        assert not any(dest for _, dest in reads)
    finally:
        Store(url).fs.rm("/in-place-remote", recursive=True)


def test_a_backward_pending_over_restored_tensors_sees_them_changed(saved):
    """Decoded into through NumPy, which autograd does not see: the live tensors' version
    counters are bumped, so a graph built before the restore refuses to backpropagate
    (an optimizer moment: no load copies it in, so only the restore can say so)."""
    url, _ = saved
    fresh = _state(seed=3)
    moment = next(s["exp_avg"] for s in fresh["optim"].state.values() if s["exp_avg"].dim() == 2)
    x = torch.ones_like(moment, requires_grad=True)
    pending = (x * moment).sum()  # saves the moment for its backward
    assert ckpt.restore(url, fresh).step == 1
    assert any(s["exp_avg"].data_ptr() == moment.data_ptr() for s in fresh["optim"].state.values())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        pending.backward()


@pytest.mark.parametrize("enabled", [True, False])
def test_the_cyclic_gc_is_paused_while_restoring_and_left_as_it_was(saved, monkeypatch, enabled):
    import gc

    url, _ = saved
    seen: list[bool] = []
    real = in_place_mod.read_tensors

    def spy(*a, **kw):
        seen.append(gc.isenabled())
        return real(*a, **kw)

    monkeypatch.setattr(in_place_mod, "read_tensors", spy)
    (gc.enable if enabled else gc.disable)()
    try:
        assert ckpt.restore(url, _state(seed=3)).step == 1
        with ckpt.Checkpointer(url) as ck:
            assert ck.restore(_state(seed=4)).step == 1
        assert gc.isenabled() is enabled
        with restore_mod.gc_paused():  # nested: the outer pause ends it
            with restore_mod.gc_paused():
                pass
            assert not gc.isenabled()
        assert gc.isenabled() is enabled
    finally:
        gc.enable()
    assert seen and not any(seen)
