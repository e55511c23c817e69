"""Small tensors packed into shared objects (manifest schema 2: chunk records with at/of).

Round trips through save/restore/load/verify/export/gc, object counts, dedup of an
unchanged set of small tensors across steps, deltas of a changed pack, damage named by
tensor, and hostile at/of values refused by the manifest validator.
"""

from __future__ import annotations

import json

import pytest
import torch

import ckpt
from ckpt.errors import NewerSchemaError, SchemaError
from ckpt.hooks.manager import get_plugins
from ckpt.io.packing import parent_packs
from ckpt.io.verify import verify_manifest
from ckpt.storage.manifest import SCHEMA_VERSION, Manifest
from ckpt.storage.store import Store
from ckpt.testing import assert_same_state, clone_state, stored_objects
from ckpt.testing.state import corrupt_object

H32 = "ab" * 16


def _state(seed: int = 0, n_small: int = 40) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {f"b{i:02d}": torch.randn(17 + i, generator=g) for i in range(n_small)}
    state["ints"] = torch.arange(33)
    state["half"] = torch.randn(5, 7, generator=g).bfloat16()
    state["scalar"] = torch.tensor(1.5)
    state["empty"] = torch.zeros(0, 3)
    state["big"] = torch.randn(96 * 1024, generator=g)  # 384 KiB: above the threshold below
    return state


@pytest.fixture
def small_packs(monkeypatch):
    monkeypatch.setenv("CKPT_PACK_BYTES", str(64 * 1024))
    monkeypatch.setenv("CKPT_CHUNK_BYTES", str(128 * 1024))


def test_round_trip_and_object_counts(store_url, small_packs):
    state = _state()
    expected = clone_state(state)
    ckpt.save(store_url, state, step=1)
    manifest = ckpt.read_manifest(store_url, 1)
    # 40 float32 + int64 + bfloat16 + scalar float32 share three packs (one per dtype); big is
    # three 128 KiB chunks; the empty tensor has no object
    assert len(stored_objects(Store(store_url))) == 3 + 3
    packed = [p for p, e in manifest.tensors.items() if e.chunks and e.chunks[0].packed]
    assert sorted(packed) == sorted(k for k in state if k not in ("big", "empty"))
    assert json.loads(Store(store_url).read_manifest(1))["schema"] == 2
    assert_same_state(ckpt.load(store_url), expected)
    live = {k: torch.zeros_like(v) for k, v in state.items()}
    ckpt.restore(store_url, live)
    assert_same_state(live, expected)
    assert verify_manifest(Store(store_url), get_plugins().codecs, manifest) == []


def test_without_packing_schema_stays_1(store_url, monkeypatch):
    monkeypatch.setenv("CKPT_PACK_BYTES", "0")
    state = _state(n_small=5)
    ckpt.save(store_url, state, step=1)
    assert json.loads(Store(store_url).read_manifest(1))["schema"] == 1
    assert len(stored_objects(Store(store_url))) == 5 + 3 + 1  # each small tensor its own object
    assert_same_state(ckpt.load(store_url), state)


def test_unchanged_small_tensors_dedup_across_steps(tmp_path, small_packs):
    url = f"file://{tmp_path}/s"
    state = _state()
    ckpt.save(url, state, step=1)
    before = set(stored_objects(Store(url)))
    info = ckpt.save(url, state, step=2)
    assert set(stored_objects(Store(url))) == before
    assert info.write_stats.objects_written == 0
    # one small tensor changes: its pack is written again with step 1's layout, as a delta
    # of step 1's object, where the unchanged members cost nothing; they keep citing step
    # 1's object (frozen tensors never move); the other packs (int64, bfloat16) are
    # unchanged and still cited
    state["b07"][3] += 1.0
    info = ckpt.save(url, state, step=3)
    stats = info.write_stats
    assert stats.objects_written == 1 and stats.delta_objects == 1 and stats.written_bytes < 200
    m1, m3 = ckpt.read_manifest(url, 1), ckpt.read_manifest(url, 3)
    assert m3.tensors["b06"] == m1.tensors["b06"]
    r1, r3 = m1.tensors["b07"].chunks[0], m3.tensors["b07"].chunks[0]
    assert (r3.at, r3.size, r3.of) == (r1.at, r1.size, r1.of) and r3.key not in before
    assert r3.codec[0]["name"] == "xor" and r3.codec[0]["parent"]["key"] == r1.key
    assert m3.tensors["ints"] == m1.tensors["ints"] and m3.tensors["half"] == m1.tensors["half"]
    assert_same_state(ckpt.load(url, step=3), state)
    # the same tensors change again: packs of the same layouts as the parent's, stored as deltas
    for i in range(40):
        state[f"b{i:02d}"] += 1e-3
    ckpt.save(url, state, step=4)
    for i in range(40):
        state[f"b{i:02d}"][0] += 1e-6
    info = ckpt.save(url, state, step=5)
    # (b07, packed alone at step 4, is written in full: a delta of 92 bytes does not pay)
    assert info.write_stats.objects_written == 2 and info.write_stats.delta_objects == 1
    ref = ckpt.read_manifest(url, 5).tensors["b00"].chunks[0]
    assert ref.packed and ref.codec[0]["name"] == "xor"
    assert_same_state(ckpt.load(url), state)
    assert_same_state(ckpt.load(url, step=1)["b07"], _state()["b07"])


def _sound(url: str, step: int, expected: dict) -> None:
    assert_same_state(ckpt.load(url, step=step), expected)
    assert verify_manifest(Store(url), get_plugins().codecs, ckpt.read_manifest(url, step)) == []


def test_twins_that_split_are_stored_apart(tmp_path, small_packs):
    # two equal tensors share one slot; later one of them changes: it takes the slot of the
    # parent's object, the other (unchanged) keeps citing the parent's, and both read back right
    url = f"file://{tmp_path}/s"
    state = _state()
    state["b01"] = state["b00"].clone()
    ckpt.save(url, state, step=1)
    m1 = ckpt.read_manifest(url, 1)
    assert m1.tensors["b00"].chunks[0] == m1.tensors["b01"].chunks[0]
    state["b00"] += 1.0
    info = ckpt.save(url, state, step=2)
    assert info.write_stats.objects_written == 1 and info.write_stats.delta_objects == 1
    m2 = ckpt.read_manifest(url, 2)
    assert m2.tensors["b00"].chunks[0].key != m2.tensors["b01"].chunks[0].key
    assert m2.tensors["b01"] == m1.tensors["b01"]
    _sound(url, 2, clone_state(state))
    state["b01"] += 2.0  # the twin packed apart: still read right the save after
    ckpt.save(url, state, step=3)
    _sound(url, 3, clone_state(state))
    _sound(url, 1, {**_state(), "b01": _state()["b00"]})


def test_a_removed_member_leaves_its_slot_and_later_saves_stay_deltas(tmp_path, small_packs):
    url = f"file://{tmp_path}/s"
    state = _state()
    ckpt.save(url, state, step=1)
    of = ckpt.read_manifest(url, 1).tensors["b05"].chunks[0].of
    del state["b05"]
    state["b06"] += 1.0
    info = ckpt.save(url, state, step=2)
    assert info.write_stats.objects_written == 1 and info.write_stats.delta_objects == 1
    m2 = ckpt.read_manifest(url, 2)
    assert "b05" not in m2.tensors and m2.tensors["b06"].chunks[0].of == of
    _sound(url, 2, clone_state(state))
    state["b07"] += 1.0  # the object with a gap is still filled again, as a delta
    info = ckpt.save(url, state, step=3)
    assert info.write_stats.objects_written == 1 and info.write_stats.delta_objects == 1
    assert ckpt.read_manifest(url, 3).tensors["b07"].chunks[0].of == of
    _sound(url, 3, clone_state(state))


def test_a_chain_of_repacks_reads_back_every_step(tmp_path, small_packs, monkeypatch):
    monkeypatch.setenv("CKPT_DELTA_MAX_CHAIN", "4")
    url = f"file://{tmp_path}/s"
    state = _state()
    saved = {}
    for step in range(1, 12):
        if step > 1:
            state[f"b{step:02d}"] += float(step)
        info = ckpt.save(url, state, step=step)
        saved[step] = clone_state(state)
        if step > 1:
            # one object a save, a delta of step 1's object (the tensors that did not change
            # keep citing theirs: every delta's parent is that full object, never a chain)
            assert info.write_stats.objects_written == 1 and info.write_stats.delta_objects == 1, step
            ref = ckpt.read_manifest(url, step).tensors[f"b{step:02d}"].chunks[0]
            assert ref.codec[0]["parent"]["key"] == ckpt.read_manifest(url, 1).tensors["b00"].chunks[0].key
    for step, expected in saved.items():
        _sound(url, step, expected)


@pytest.mark.parametrize("damage", ["overlap", "sparse"])
def test_a_hostile_parent_layout_is_packed_anew(tmp_path, small_packs, damage):
    # the parent's manifest puts two slots partly over each other, or gives a pack an object
    # mostly of gaps: the next save packs those tensors anew (nothing filled again, no
    # buffer of the hostile size) and what it saves reads back right
    url = f"file://{tmp_path}/s"
    state = _state()
    ckpt.save(url, state, step=1)
    assert "b06" in parent_packs(ckpt.read_manifest(url, 1), 128 * 1024)
    path = tmp_path / "s" / "manifests" / "1.json"
    doc = json.loads(path.read_bytes())
    recs = [e["chunks"][0] for e in doc["tensors"].values() if e["chunks"] and "at" in e["chunks"][0]]
    if damage == "overlap":
        doc["tensors"]["b06"]["chunks"][0]["at"] = doc["tensors"]["b05"]["chunks"][0]["at"] + 4
    else:
        for rec in recs:
            if rec["key"] == doc["tensors"]["b06"]["chunks"][0]["key"]:
                rec["of"] = 64 * 1024  # at the cap the validator allows: mostly gaps
    path.write_text(json.dumps(doc))
    assert "b06" not in parent_packs(ckpt.read_manifest(url, 1), 128 * 1024)
    state["b07"] += 1.0
    info = ckpt.save(url, state, step=2)
    assert info.write_stats.delta_objects == 0
    refs = ckpt.read_manifest(url, 2).tensors
    assert refs["b07"].chunks[0].key != doc["tensors"]["b07"]["chunks"][0]["key"]
    _sound(url, 2, clone_state(state))


@pytest.mark.parametrize("field", ["stored", "codec"])
def test_a_damaged_parent_record_of_one_packed_member_is_refused_by_verify_and_load(tmp_path, small_packs, field):
    # Every member of a packed delta carries its own copy of the parent's record. The copy
    # of one member is damaged: verify must refuse it as load does, even though the other
    # members' intact copies decode the same parent object first (no cached parent may
    # vouch for a record that promises something else).
    url = f"file://{tmp_path}/s"
    state = _state()
    ckpt.save(url, state, step=1)
    for i in range(40):  # every member changes (a little: a delta): each cites the parent
        state[f"b{i:02d}"][0] += 1e-6
    ckpt.save(url, state, step=2)
    path = tmp_path / "s" / "manifests" / "2.json"
    doc = json.loads(path.read_bytes())
    parent = doc["tensors"]["b06"]["chunks"][0]["codec"][0]["parent"]
    if field == "stored":
        parent["stored"] += 1
    else:
        parent["codec"] = [{"name": "zstd", "level": 3}]
    path.write_text(json.dumps(doc))
    manifest = ckpt.read_manifest(url, 2)
    problems = verify_manifest(Store(url), get_plugins().codecs, manifest)
    assert len(problems) == 1 and problems[0].tensor == "b06", problems
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(url, step=2)
    live = {k: torch.zeros_like(v) for k, v in state.items()}
    with pytest.raises(ckpt.CheckpointError):
        ckpt.restore(url, live, step=2)
    assert all(not v.any() for v in live.values())


def test_a_new_tensor_packs_apart_and_the_old_pack_keeps_its_layout(tmp_path, small_packs):
    url = f"file://{tmp_path}/s"
    state = _state()
    ckpt.save(url, state, step=1)
    state["extra"] = torch.ones(9)  # a new small tensor: packed in a new object, in full
    state["b00"] += 1  # the float32 pack: written again in step 1's layout, as a delta
    info = ckpt.save(url, state, step=2)
    assert info.write_stats.objects_written == 2 and info.write_stats.delta_objects == 1
    m1, m2 = ckpt.read_manifest(url, 1), ckpt.read_manifest(url, 2)
    assert m2.tensors["b00"].chunks[0].of == m1.tensors["b00"].chunks[0].of
    assert all(step["name"] != "xor" for step in m2.tensors["extra"].chunks[0].codec)
    assert_same_state(ckpt.load(url), state)


def test_damaged_pack_names_its_tensors_and_leaves_live_state(tmp_path, small_packs):
    url = f"file://{tmp_path}/s"
    state = _state()
    ckpt.save(url, state, step=1)
    manifest = ckpt.read_manifest(url, 1)
    key = manifest.tensors["b05"].chunks[0].key
    store = Store(url)
    corrupt_object(store, key)
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"tensor 'b\d\d' \(packed with 'b\d\d', .*" + key):
        ckpt.load(url)
    live = {k: torch.zeros_like(v) for k, v in state.items()}
    with pytest.raises(ckpt.CorruptCheckpointError, match=key):
        ckpt.restore(url, live)
    assert all(not v.any() for v in live.values())  # nothing live was changed
    problems = verify_manifest(store, get_plugins().codecs, manifest)
    assert len(problems) == 1 and problems[0].key == key and "'b05'" in problems[0].error


def test_export_and_gc_see_packed_objects(tmp_path, small_packs):
    from safetensors.torch import load_file

    from ckpt.interop.export import export_checkpoint
    from ckpt.storage.retention import collect

    url = f"file://{tmp_path}/s"
    state = _state()
    ckpt.save(url, state, step=1)
    state["b01"] += 1
    ckpt.save(url, state, step=2)
    out = tmp_path / "x.safetensors"
    export_checkpoint(url, out, step=2)
    exported = load_file(str(out))
    for k, v in state.items():
        assert torch.equal(exported[k], v), k
    collect(url, keep_last=1, grace_seconds=0)
    assert_same_state(ckpt.load(url), state)
    assert verify_manifest(Store(url), get_plugins().codecs, ckpt.read_manifest(url, 2)) == []


# -- manifest validation (schema 2, at/of) -------------------------------------------------


def _doc(**chunk: object) -> dict:
    rec = {"hash": H32, "key": H32, "size": 16, "stored": 40, "codec": [], "at": 8, "of": 40}
    rec.update(chunk)
    rec = {k: v for k, v in rec.items() if v is not None}
    return {
        "format": "ckpt",
        "schema": 2,
        "step": 3,
        "chunk_bytes": 64,
        "tree": {"$tensor": "w"},
        "tensors": {"w": {"dtype": "float32", "shape": [2, 2], "nbytes": 16, "chunks": [rec]}},
    }


def _parse(doc: dict) -> Manifest:
    return Manifest.from_json_bytes(json.dumps(doc).encode(), where="test")


def test_a_packed_record_parses_and_round_trips():
    m = _parse(_doc())
    ref = m.tensors["w"].chunks[0]
    assert (ref.at, ref.of, ref.size, ref.object_size) == (8, 40, 16, 40)
    assert ref.object_ref().size == 40 and not ref.object_ref().packed
    again = Manifest.from_json_bytes(m.to_json_bytes(), where="again")
    assert again.tensors == m.tensors and json.loads(m.to_json_bytes())["schema"] == 2


@pytest.mark.parametrize(
    ("chunk", "words"),
    [
        ({"at": 30}, "outside its packed object"),  # at + size > of
        ({"at": -1}, "packed offset"),
        ({"at": 41}, "packed offset"),
        ({"at": True}, "packed offset"),
        ({"at": 1.0}, "packed offset"),
        ({"of": 65, "stored": 65}, "packed object size"),  # of > chunk cap
        ({"of": 10}, "outside its packed object"),  # at > of
        ({"of": "40"}, "packed object size"),
        ({"of": None}, "both 'at' and 'of'"),
        ({"at": None}, "both 'at' and 'of'"),
        ({"stored": 41}, "cannot store"),  # a raw object stores exactly of bytes
        ({"codec": [{"name": "zstd"}], "stored": 40 + 40 // 8 + 65 * 1024}, "stored size"),
    ],
)
def test_hostile_packed_records(chunk, words):
    with pytest.raises(SchemaError, match=words):
        _parse(_doc(**chunk))


def test_a_delta_parent_record_cannot_be_packed():
    parent = {"hash": H32, "key": H32, "size": 40, "at": 0, "of": 40}
    doc = _doc(codec=[{"name": "xor", "parent": parent}], key=H32 + ".x" + "0" * 16)
    with pytest.raises(SchemaError, match="cannot be packed"):
        _parse(doc)
    # a parent of the whole packed object's size is what a packed delta cites
    parent = {"hash": H32, "key": H32, "size": 40}
    _parse(_doc(codec=[{"name": "xor", "parent": parent}], key=H32 + ".x" + "0" * 16))
    with pytest.raises(SchemaError, match="delta parent of 16 bytes"):
        _parse(_doc(codec=[{"name": "xor", "parent": {**parent, "size": 16}}], key=H32 + ".x" + "0" * 16))


def test_schema_versions():
    assert SCHEMA_VERSION == 2
    unpacked = _doc(at=None, of=None, stored=16)
    assert _parse({**unpacked, "schema": 1}).tensors["w"].chunks[0].of == -1
    assert json.loads(_parse(unpacked).to_json_bytes())["schema"] == 1  # written as the oldest that fits
    with pytest.raises(NewerSchemaError, match="upgrade"):
        _parse({**unpacked, "schema": 3})


def test_parent_tensors_give_a_pack_delta_its_parent_bytes(tmp_path, small_packs):
    from concurrent.futures import ThreadPoolExecutor

    from ckpt.io.writer import Writer

    url = f"file://{tmp_path}/s"
    state = _state()
    ckpt.save(url, state, step=1)
    previous = clone_state(state)
    state["b03"][0] += 1.0
    store = Store(url)

    def write(parent_tensors):
        with ThreadPoolExecutor(4) as pool:
            writer = Writer(
                store,
                get_plugins().codecs,
                pool,
                chunk_bytes=128 * 1024,
                parent=ckpt.read_manifest(url, 1),
                parent_tensors=parent_tensors,
                delta=True,
                pack_bytes=64 * 1024,
            )
            futures = [writer.submit(p, t) for p, t in state.items()]
            writer.flush()
            entries = [f.result() for f in futures]
        return writer.stats, entries

    stats, entries = write(previous)  # known={}: every chunk and pack is written (as a delta)
    assert stats.parent_reads == 0 and stats.delta_outcome["b00"]  # the float32 pack, named by its first
    stats, entries2 = write({p: torch.zeros_like(t) for p, t in previous.items()})  # not the parent's bytes
    assert stats.parent_reads == stats.objects_written and entries2 == entries
