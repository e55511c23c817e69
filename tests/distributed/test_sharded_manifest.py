"""Sharded tensor entries (manifest schema 2): validation, region reads, load/verify/export."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt
from ckpt.distributed.sharding import read_region
from ckpt.errors import SchemaError
from ckpt.hooks.manager import get_plugins
from ckpt.io.writer import write_objects
from ckpt.snapshot.executor import io_pool
from ckpt.storage.commit import commit, new_manifest
from ckpt.storage.manifest import Manifest, Shard, TensorEntry
from ckpt.storage.store import Store


def _boxes(shape, splits):
    """Grid boxes of ``shape``: ``splits[d]`` sorted cut points inside dim d."""
    import itertools

    cuts = [[0, *s, n] for s, n in zip(splits, shape)]
    for idx in itertools.product(*[range(len(c) - 1) for c in cuts]):
        yield (
            tuple(cuts[d][i] for d, i in enumerate(idx)),
            tuple(cuts[d][i + 1] - cuts[d][i] for d, i in enumerate(idx)),
        )


def save_sharded(url, full: torch.Tensor, boxes, *, step=1, chunk_bytes=64) -> Manifest:
    """Commit ``full`` as a sharded entry of boxes (what a collective save writes)."""
    store = Store(url)
    plugins = get_plugins()
    parts = {}
    for i, (o, s) in enumerate(boxes):
        sl = tuple(slice(a, a + n) for a, n in zip(o, s))
        parts[f"b{i}"] = full[sl].contiguous()
    with io_pool() as pool:
        entries, stats = write_objects(store, plugins.codecs, parts, pool=pool, chunk_bytes=chunk_bytes)
    shards = tuple(Shard(tuple(o), tuple(s), entries[f"b{i}"].chunks) for i, (o, s) in enumerate(boxes))
    entry = TensorEntry(str(full.dtype).removeprefix("torch."), tuple(full.shape), full.nbytes, (), shards)
    m = new_manifest(
        step=step,
        tree={"w": {"$tensor": "w"}},
        adapters={},
        tensors={"w": entry},
        parent=None,
        raw_bytes=stats.raw_bytes,
        written_bytes=stats.written_bytes,
        chunk_bytes=chunk_bytes,
        plugins={},
        seq=step,
    )
    return commit(store, m, written_bytes=stats.written_bytes)


def test_sharded_entry_round_trips_and_reads_full(tmp_path):
    url = str(tmp_path / "s")
    full = torch.arange(7 * 5, dtype=torch.float32).reshape(7, 5)
    boxes = list(_boxes((7, 5), [[3], [2]])) + [((7, 0), (0, 5))][:0]
    m = save_sharded(url, full, boxes)
    doc = json.loads(m.to_json_bytes())
    assert doc["schema"] == 2 and "shards" in doc["tensors"]["w"] and "chunks" not in doc["tensors"]["w"]
    back = ckpt.read_manifest(url)
    assert len(back.tensors["w"].shards) == 4 and back.tensors["w"].chunks == ()
    assert len(back.chunk_refs()) == sum(len(s.chunks) for s in back.tensors["w"].shards)
    assert torch.equal(ckpt.load(url)["w"], full)
    box = read_region(Store(url), get_plugins().codecs, back, "w", (2, 1), (4, 3))
    assert torch.equal(box, full[2:6, 1:4])


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 6),
    data=st.data(),
)
def test_read_region_any_box_of_any_grid(tmp_path_factory, rows, cols, data):
    url = str(tmp_path_factory.mktemp("r"))
    full = torch.randn(rows, cols, dtype=torch.float64)
    rs = sorted(set(data.draw(st.lists(st.integers(1, rows), max_size=3))) - {rows})
    cs = sorted(set(data.draw(st.lists(st.integers(1, cols), max_size=2))) - {cols})
    m = save_sharded(url, full, list(_boxes((rows, cols), [rs, cs])), chunk_bytes=24)
    r0 = data.draw(st.integers(0, rows - 1))
    c0 = data.draw(st.integers(0, cols - 1))
    r1 = data.draw(st.integers(r0, rows))
    c1 = data.draw(st.integers(c0, cols))
    out = torch.full((r1 - r0 + 2, c1 - c0 + 2), -1.0, dtype=torch.float64)
    view = out[1 : 1 + r1 - r0, 1 : 1 + c1 - c0]  # a strided destination
    read_region(Store(url), get_plugins().codecs, m, "w", (r0, c0), (r1 - r0, c1 - c0), out=view)
    assert torch.equal(view, full[r0:r1, c0:c1])
    assert (out[0] == -1).all() and (out[:, 0] == -1).all()


def test_a_box_that_is_a_stored_piece_is_decoded_straight_into_a_contiguous_destination(tmp_path, monkeypatch):
    """A shard's own box (FSDP at the saved layout), a whole plain tensor (DDP, through
    ckpt.dcp) or whole tensor of row shards, into contiguous memory: no buffer of its own,
    no copy; a piece cut by the box, or a strided destination, goes through one, with the
    same result."""
    import ckpt.io.region as region

    url = str(tmp_path / "s")
    full = torch.randn(8, 6, dtype=torch.float32)
    m = save_sharded(url, full, list(_boxes((8, 6), [[4], []])), chunk_bytes=40)
    real, buffers = region.payload_buffer, []

    def counted(n, **kw):
        buffers.append(n)
        return real(n, **kw)

    monkeypatch.setattr(region, "payload_buffer", counted)
    codecs = get_plugins().codecs
    out = torch.full((4, 6), -1.0)
    assert read_region(Store(url), codecs, m, "w", (4, 0), (4, 6), out=out) is out
    assert torch.equal(out, full[4:]) and buffers == []
    strided = torch.full((6, 4), -1.0).t()  # the same box into a transposed (non-contiguous) view
    read_region(Store(url), codecs, m, "w", (4, 0), (4, 6), out=strided)
    assert torch.equal(strided, full[4:]) and buffers
    buffers.clear()
    whole = torch.empty(8, 6)  # both pieces: each is whole rows of it
    read_region(Store(url), codecs, m, "w", (0, 0), (8, 6), out=whole)
    assert torch.equal(whole, full) and buffers == []
    cols = torch.empty(8, 3)  # part of each piece's rows: through buffers
    read_region(Store(url), codecs, m, "w", (0, 3), (8, 3), out=cols)
    assert torch.equal(cols, full[:, 3:]) and buffers


def test_region_of_plain_entry_reads_only_overlapping_chunks(tmp_path):
    url = str(tmp_path / "p")
    full = torch.arange(64, dtype=torch.int32).reshape(16, 4)  # 16 bytes a row
    store = Store(url)
    with io_pool() as pool:
        entries, stats = write_objects(store, get_plugins().codecs, {"w": full}, pool=pool, chunk_bytes=64)
    m = new_manifest(
        step=1,
        tree={"w": {"$tensor": "w"}},
        adapters={},
        tensors=entries,
        parent=None,
        raw_bytes=stats.raw_bytes,
        written_bytes=stats.written_bytes,
        chunk_bytes=64,
        plugins={},
        seq=1,
    )
    commit(store, m, written_bytes=stats.written_bytes)
    store = Store(url)
    m = ckpt.read_manifest(url)
    assert len(m.tensors["w"].chunks) == 4
    got = []
    orig, orig_into = store.get_object, store.read_object_into

    def spy(key, **kw):
        got.append(key)
        return orig(key, **kw)

    def spy_into(key, buf, **kw):
        got.append(key)
        return orig_into(key, buf, **kw)

    store.get_object = spy  # type: ignore[method-assign]
    store.read_object_into = spy_into  # type: ignore[method-assign]
    box = read_region(store, get_plugins().codecs, m, "w", (5, 1), (2, 2))
    assert torch.equal(box, full[5:7, 1:3])
    assert got == [m.tensors["w"].chunks[1].key]


def _doc_with(tmp_path, mutate):
    url = str(tmp_path / "h")
    full = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    m = save_sharded(url, full, [((0, 0), (2, 3)), ((2, 0), (2, 3))])
    doc = json.loads(m.to_json_bytes())
    mutate(doc["tensors"]["w"])
    return doc


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e["shards"][1].update(offsets=[1, 0]), "overlap"),  # overlapping, volume still right
        (lambda e: e["shards"][1].update(offsets=[3, 0]), "out of bounds"),
        (lambda e: e["shards"].pop(), "add up to"),
        (lambda e: e["shards"][0].update(offsets=[0]), "lists of 2 ints"),
        (lambda e: e.update(chunks=[]), "both chunks and shards"),
        (lambda e: e["shards"][0]["chunks"].pop(), "chunk sizes"),
        (lambda e: e["shards"][0].update(offsets=[-1, 0]), "offsets"),
        (lambda e: e["shards"][0].update(shape=[True, 3]), "shape"),
    ],
)
def test_hostile_shards_are_schema_errors(tmp_path, mutate, message):
    doc = _doc_with(tmp_path, mutate)
    with pytest.raises(SchemaError, match=message):
        Manifest.from_doc(doc, where="test")


def test_undercover_with_equal_volume_is_refused(tmp_path):
    # two 2x2 boxes on a 2x4 tensor: one shifted so they overlap by a column and leave one uncovered
    url = str(tmp_path / "u")
    full = torch.zeros(2, 4)
    m = save_sharded(url, full, [((0, 0), (2, 2)), ((0, 2), (2, 2))])
    doc = json.loads(m.to_json_bytes())
    doc["tensors"]["w"]["shards"][1]["offsets"] = [0, 1]
    with pytest.raises(SchemaError, match="overlap|uncovered"):
        Manifest.from_doc(doc, where="test")


def test_rank_nodes_need_a_world_size(tmp_path):
    doc = _doc_with(tmp_path, lambda e: None)
    doc["tree"] = {"w": {"$tensor": "w"}, "r": {"$rank": [1, 2]}}
    with pytest.raises(SchemaError, match=r"\$rank"):
        Manifest.from_doc(doc, where="test")
    doc["world_size"] = 2
    assert Manifest.from_doc(doc, where="test").world_size == 2
    doc["tree"]["r"] = {"$rank": [1, {"$rank": [1, 2]}]}
    with pytest.raises(SchemaError, match="nest"):
        Manifest.from_doc(doc, where="test")


def test_plain_manifests_stay_schema_1(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_PACK_BYTES", "0")  # a packed small tensor is a schema-2 record
    url = str(tmp_path / "p1")
    ckpt.save(url, {"w": torch.ones(3)}, step=1)
    assert json.loads(Store(url).fs.cat_file(Store(url).manifest_path(1)))["schema"] == 1


def test_rank_view_resolves_per_rank_values_and_refuses_collisions(tmp_path):
    import dataclasses

    from ckpt.distributed.sharding import rank_view

    url = str(tmp_path / "v")
    ckpt.save(url, {"w": torch.ones(2), "x": torch.zeros(1)}, step=1)
    m = ckpt.read_manifest(url)
    e = m.tensors["x"]
    tree = {
        "w": {"$tensor": "w"},
        "x": {"$rank": [{"$tensor": "$rank/0/x"}, {"$tensor": "$rank/1/x"}]},
        "n": {"$rank": [5, 6]},
    }
    dm = dataclasses.replace(m, world_size=2, tree=tree, tensors={"w": m.tensors["w"], "$rank/0/x": e, "$rank/1/x": e})
    back = Manifest.from_json_bytes(dm.to_json_bytes(), where="test")
    v1 = rank_view(back, 1)
    assert v1.tree == {"w": {"$tensor": "w"}, "x": {"$tensor": "x"}, "n": 6} and set(v1.tensors) == {"w", "x"}
    with pytest.warns(UserWarning, match="rank 1"):
        assert rank_view(back, 3).tree["n"] == 6  # rank % world size
    bad = dataclasses.replace(back, tensors={**back.tensors, "x": e})
    with pytest.raises(SchemaError, match="both shared"):
        rank_view(bad, 0)
