"""Deltas decoded straight into the live tensors (see test_in_place_restore.py) against
hostile manifests: whatever a delta's parent records say, damage is refused before
anything live changes, or the restore is exact."""

from __future__ import annotations

import json

import pytest
import torch

import ckpt
from ckpt.storage.store import Store


@pytest.fixture(autouse=True)
def _chunks(monkeypatch):
    monkeypatch.setenv("CKPT_CHUNK_BYTES", str(512 * 1024))


def _shared_parent(url: str) -> dict[str, torch.Tensor]:
    """A store whose step 2 holds two deltas citing one parent object (two tensors equal at
    step 1, changed differently at step 2); returns the state at step 2."""
    torch.manual_seed(0)
    w = torch.randn(1 << 17) * 0.02
    state = {"a": w.clone(), "b": w.clone()}
    with ckpt.Checkpointer(url) as ck:
        ck.save(state, step=1).wait()
        state["a"][::97] += 1e-3
        state["b"][::89] += 1e-3
        ck.save(state, step=2).wait()
    return state


def _lie(url: str, edit) -> dict[str, dict]:
    """Step 2's manifest with ``edit(parents)`` applied to its deltas' parent records (by
    tensor), written back; returns those records as edited."""
    store = Store(url)
    doc = json.loads(store.read_manifest(2))
    parents = {p: e["chunks"][0]["codec"][0]["parent"] for p, e in doc["tensors"].items()}
    edit(parents)
    store.write(store.manifest_path(2), json.dumps(doc).encode())
    return parents


def _refused_before_anything_live_changes(url: str, key: str) -> None:
    live = {"a": torch.zeros(1 << 17), "b": torch.zeros(1 << 17)}
    with pytest.raises(ckpt.CorruptCheckpointError, match=key) as err:
        ckpt.restore(url, live, step=2)
    assert "partly overwritten" not in str(err.value)
    assert not live["a"].any() and not live["b"].any()


def test_a_shared_parent_whose_second_record_lies_about_its_stored_size_changes_nothing_live(tmp_path, monkeypatch):
    """The first pass hashes a parent cited by two deltas once: a second record of it naming
    another stored size was passed unchecked, and failed only while decoding into the live
    tensors, after the first delta had overwritten its own."""
    monkeypatch.setenv("CKPT_THREADS", "1")  # the deltas verified in plan order: "a" first
    url = str(tmp_path / "store")
    _shared_parent(url)

    def edit(parents: dict[str, dict]) -> None:
        assert parents["a"]["key"] == parents["b"]["key"] and parents["a"]["stored"] > 0
        parents["b"]["stored"] += 7

    _refused_before_anything_live_changes(url, _lie(url, edit)["b"]["key"])


@pytest.mark.parametrize("lie", ["stored", "codec"])
def test_a_parent_verified_by_decoding_for_one_delta_does_not_vouch_for_anothers_record_of_it(
    tmp_path, monkeypatch, lie
):
    """The first pass decodes a delta whose parent's stored bytes are not as recorded (an
    encrypted object sealed again, here a stale stored hash): its verifying reader kept that
    parent, and served it to a second delta whose record of it says another stored size or
    codec chain, which the decode into the live tensors then refused, after the first delta
    had overwritten its tensor."""
    monkeypatch.setenv("CKPT_THREADS", "1")  # the deltas verified in plan order: "a" first
    url = str(tmp_path / "store")
    _shared_parent(url)

    def edit(parents: dict[str, dict]) -> None:
        parents["a"]["stored_hash"] = "0" * 32  # "a" is verified by decoding it (and its parent)
        if lie == "stored":
            parents["b"]["stored"] += 7
        else:
            # (its stored hash not the bytes' either: a record the first pass must decode)
            parents["b"].update(codec=[{"name": "bgzstd", "itemsize": 2}], stored_hash="1" * 32)

    _refused_before_anything_live_changes(url, _lie(url, edit)["b"]["key"])
