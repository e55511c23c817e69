"""A rank tier's local checkpoints are untrusted input too: their identity and DTensor boxes
(``meta``) are validated before anything is read (one process, no process group)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt
from ckpt.distributed.coordinator import capture_local
from ckpt.distributed.tiers import META, _boxes, identity, part_from_local, prepare_local, save_of
from ckpt.errors import CheckpointError, CorruptCheckpointError
from ckpt.hooks.manager import get_plugins
from ckpt.storage.commit import load_manifest
from ckpt.storage.store import Store


@pytest.fixture
def local(tmp_path):
    """A local checkpoint of rank 1 of 2, as a rank tier writes it (no DTensor leaves)."""
    url = str(tmp_path / "rank-00001")
    state = {"w": torch.arange(6.0).reshape(2, 3), "r": {"rank": 1, "t": torch.ones(2, dtype=torch.int64)}}
    with ckpt.Checkpointer(url) as ck:
        ck.save(state, step=3, meta={META: {"save": "run-1", "world_size": 2, "rank": 1, "boxes": {}}}).wait()
    store = Store(url)
    return store, load_manifest(store, 3), state


def test_identity_and_a_well_formed_local_checkpoint(local):
    store, m, state = local
    assert identity(m, 2, 1) == "run-1" and save_of(m) == "run-1"
    with pytest.raises(CheckpointError, match="saved by rank 1 of 2 ranks, this is rank 0 of 3") as exc:
        identity(m, 3, 0)  # another world size: not restored from, not damage either
    assert not isinstance(exc.value, CorruptCheckpointError)
    live = {"w": torch.zeros(2, 3), "r": {"rank": -1, "t": torch.zeros(2, dtype=torch.int64)}}
    values, missing, unexpected = prepare_local(store, get_plugins(), m, live)
    assert torch.equal(values["w"], state["w"]) and values["r"]["rank"] == 1 and not missing and not unexpected
    assert torch.equal(live["w"], torch.zeros(2, 3))  # nothing live changed
    # read back for a persist at close: the same descriptors as a capture of the live state
    part, tensors = part_from_local(store, get_plugins(), m)
    captured, _ = capture_local(state, get_plugins())
    assert part.tensors == captured.tensors and part.tree == captured.tree
    assert torch.equal(tensors["w"], state["w"])


@pytest.mark.parametrize(
    "doc",
    [None, "x", {"save": 3, "world_size": 2, "rank": 1}, {"world_size": 2, "rank": 1}],
)
def test_a_missing_or_malformed_identity_is_damage(local, doc):
    _, m, _ = local
    meta = {} if doc is None else {META: doc}
    with pytest.raises(CorruptCheckpointError, match="no rank tier identity"):
        identity(dataclasses.replace(m, meta=meta), 2, 1)
    assert save_of(dataclasses.replace(m, meta=meta)) is None


@pytest.mark.parametrize(
    "boxes",
    [
        [],
        {"w": [[0, 0]]},
        {"w": [[0, 0], [2]]},
        {"w": [[0, -1], [2, 3]]},
        {"w": [[0, True], [2, 3]]},
        {"w": [[0, 0.5], [2, 3]]},
        {"nope": [[0, 0], [2, 3]]},
        {"w": "[[0, 0], [2, 3]]"},
    ],
)
def test_malformed_boxes_are_refused_before_any_read(local, boxes):
    store, m, _ = local
    bad = dataclasses.replace(m, meta={META: {**m.meta[META], "boxes": boxes}})
    for key in [c.key for e in m.tensors.values() for c in e.refs]:
        store.delete(store.object_path(key))  # a read would raise MissingObjectError instead
    with pytest.raises(CorruptCheckpointError, match="malformed"):
        prepare_local(store, get_plugins(), bad, {"w": torch.zeros(2, 3)})


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["w", "r", "x"]), inner, max_size=2),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(boxes=_json, whole=st.booleans())
def test_any_boxes_validate_or_raise_corrupt(boxes, whole):
    doc = boxes if whole else {"save": "s", "boxes": boxes}
    m = ckpt.storage.manifest.Manifest(step=1, created="", tree={}, adapters={}, tensors={}, meta={META: doc})
    try:
        out = _boxes(m)
    except CorruptCheckpointError:
        return
    assert out == {} or all(len(o) == len(s) for o, s in out.values())


def _v(step, save, created, base=None):
    from ckpt.distributed.tiers import Version

    return Version(step, save, created, base)


def test_candidates_order_by_the_runs_own_count_and_base_before_the_clocks():
    from ckpt.distributed.tier_restore import _merge

    # one run: its count orders its saves, whatever the clocks (a node whose clock jumped back)
    locals_ = [{6: _v(6, "A-6", 100.0)}, {6: _v(6, "A-6", 101.0)}]
    order = _merge(locals_, _v(4, "A-4", 200.0), set())
    assert [(c.step, c.local, c.durable) for c in order] == [(6, True, False), (4, False, True)]
    # a run that restored from the durable checkpoint (base) is newer, whatever the clocks
    locals_ = [{9: _v(9, "B-2", 50.0, base="A-7")}, {9: _v(9, "B-2", 50.0, base="A-7")}]
    assert [c.step for c in _merge(locals_, _v(7, "A-7", 100.0), set())] == [9, 7]
    # unrelated runs: the clocks decide (a stale local tier of an older run loses)
    locals_ = [{9: _v(9, "B-2", 50.0)}, {9: _v(9, "B-2", 50.0)}]
    assert [c.step for c in _merge(locals_, _v(7, "C-1", 100.0), set())] == [7, 9]
    # a save held by every local tier and the durable one is one candidate; tried ones are gone
    locals_ = [{5: _v(5, "A-5", 10.0), 4: _v(4, "A-4", 9.0)}, {5: _v(5, "A-5", 10.0), 4: _v(4, "A-4", 9.0)}]
    order = _merge(locals_, _v(5, "A-5", 20.0), set())
    assert [(c.step, c.local, c.durable) for c in order] == [(5, True, True), (4, True, False)]
    assert [c.step for c in _merge(locals_, _v(5, "A-5", 20.0), {(5, "A-5")})] == [4]
    # a save only some ranks hold locally is no local candidate (never mixed across saves)
    locals_ = [{5: _v(5, "A-5", 10.0)}, {5: _v(5, "X-5", 10.0)}]
    assert _merge(locals_, None, set()) == []
