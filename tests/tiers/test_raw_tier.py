"""The local tier stores objects raw; persisted checkpoints reach the durable tier compressed
(ckpt.storage.resave), and both copies are the same checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiers_util import make_state, same, train_step, weights

import ckpt
from ckpt.hooks.manager import get_plugins
from ckpt.io.verify import verify_manifest
from ckpt.storage.commit import load_manifest
from ckpt.storage.store import Store
from ckpt.testing import stored_objects


def _big_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 256))
    return {"model": model, "optim": torch.optim.AdamW(model.parameters(), lr=1e-3)}


def _step(state: dict, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    state["optim"].zero_grad()
    state["model"](torch.randn(4, 512, generator=g)).pow(2).mean().backward()
    state["optim"].step()


def _codecs(url: str, step: int) -> set[str]:
    m = load_manifest(Store(url), step)
    return {"+".join(s["name"] for s in c.codec) or "raw" for e in m.tensors.values() for c in e.chunks}


def test_local_raw_durable_compressed_and_both_restore_exactly(store_url, tmp_path):
    local = str(tmp_path / "local")
    state = _big_state()
    seen = {}
    with ckpt.Checkpointer(store_url, local=local, persist_every=2, local_keep_last=None) as ck:
        for s in (1, 2, 3, 4):
            _step(state, s)
            seen[s] = weights(state)
            ck.save(state, step=s).wait()
    assert ckpt.steps(store_url) == [2, 4]
    assert _codecs(local, 4) == {"raw"}  # nothing to decode on restore
    assert "bgzstd" in _codecs(store_url, 2)
    assert "xor" in _codecs(store_url, 4) or "bgzstd" in _codecs(store_url, 4)  # deltas against step 2 where smaller
    ml, md = load_manifest(Store(local), 4), load_manifest(Store(store_url), 4)
    assert md.stored_bytes < 0.95 * ml.stored_bytes
    assert (ml.created, ml.run, ml.parent, ml.tree) == (md.created, md.run, md.parent, md.tree)
    for s in (2, 4):
        assert verify_manifest(Store(store_url), get_plugins().codecs, load_manifest(Store(store_url), s)) == []
    for url in (local, store_url):
        fresh = _big_state(seed=9)
        assert ckpt.restore(url, fresh, step=4).step == 4
        assert same(weights(fresh), seen[4])


def test_persisting_again_moves_nothing_and_a_copy_sees_the_same_checkpoint(tmp_path):
    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    state = make_state()
    with ckpt.Checkpointer(durable, local=local, persist_every=1) as ck:
        train_step(state, 1)
        ck.save(state, step=1).wait()
        ck.tiers.wait()
        again = ck.tiers.persist_now(1)
    assert again.stats.already == 1 and again.stats.objects == 0
    # the raw local copy and the compressed durable one are one checkpoint: not a collision
    info = ckpt.copy(local, durable, step=1)
    assert info.step == 1


def test_local_compress_keeps_the_object_copy(tmp_path):
    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    state = _big_state()
    with ckpt.Checkpointer(durable, local=local, persist_every=1, local_compress=True) as ck:
        _step(state, 1)
        ck.save(state, step=1).wait()
    assert "bgzstd" in _codecs(local, 1)
    ml, md = load_manifest(Store(local), 1), load_manifest(Store(durable), 1)
    assert ml.tensors == md.tensors  # copied object for object


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_a_damaged_raw_local_object_falls_back_to_the_durable_tier(tmp_path, damage, caplog):
    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    state = _big_state()
    with ckpt.Checkpointer(durable, local=local, persist_every=1) as ck:
        _step(state, 1)
        ck.save(state, step=1).wait()
    want = weights(state)
    store = Store(local)
    m = load_manifest(store, 1)
    ref = max((c for e in m.tensors.values() for c in e.chunks), key=lambda c: c.size)
    path = store.object_path(ref.key)
    data = bytearray(Path(path).read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1
    elif damage == "truncate":
        del data[-1]
    else:
        data += b"\0"
    Path(path).write_bytes(bytes(data))
    fresh = _big_state(seed=3)
    before = weights(fresh)
    with pytest.raises(ckpt.CorruptCheckpointError, match=ref.key):
        ckpt.restore(local, fresh)  # the local tier alone: refused, nothing live changed
    assert same(weights(fresh), before)
    with ckpt.Checkpointer(durable, local=local) as ck:
        assert ck.restore(fresh).step == 1
    assert same(weights(fresh), want)
    assert "durable" in caplog.text


def test_restore_from_the_raw_local_tier_reads_into_the_live_tensors(tmp_path, monkeypatch):
    """The live tensors themselves take the local tier's raw objects (no fresh copy of the
    state), verified before anything changes and again after."""
    import ckpt.state.in_place as in_place_mod

    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    state = _big_state()
    with ckpt.Checkpointer(durable, local=local, persist_every=1) as ck:
        _step(state, 1)
        ck.save(state, step=1).wait()
    want = weights(state)
    fresh = _big_state(seed=4)
    _step(fresh, 9)  # optimizer state exists: it is written in place too
    params = {n: p.data_ptr() for n, p in fresh["model"].named_parameters()}
    calls = []
    read = in_place_mod.read_tensors

    def spy(store, codecs, plan, **kw):
        calls.append((sorted(plan.paths), sorted(kw.get("destinations") or {})))
        return read(store, codecs, plan, **kw)

    monkeypatch.setattr(in_place_mod, "read_tensors", spy)
    with ckpt.Checkpointer(durable, local=local) as ck:
        assert ck.restore(fresh).step == 1
    assert same(weights(fresh), want)
    saved = [s["exp_avg_sq"] for s in state["optim"].state.values()]
    live = [s["exp_avg_sq"] for s in fresh["optim"].state.values()]
    assert all(torch.equal(a, b) for a, b in zip(live, saved))
    big = {p for p, e in load_manifest(Store(local), 1).tensors.items() if not e.chunks[0].packed}
    fresh_reads = {p for paths, dest in calls if not dest for p in paths}
    in_place = {p for paths, dest in calls if dest for p in dest}
    assert big and big <= in_place and not (big & fresh_reads)  # no fresh copy of the large tensors
    assert {n: p.data_ptr() for n, p in fresh["model"].named_parameters()} == params


def test_a_local_object_rewritten_between_the_two_reads_is_restored_from_the_durable_tier(
    tmp_path, monkeypatch, caplog
):
    import ckpt.snapshot.checkpointer as ckmod

    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    state = _big_state()
    with ckpt.Checkpointer(durable, local=local, persist_every=1) as ck:
        _step(state, 1)
        ck.save(state, step=1).wait()
    want = weights(state)
    store = Store(local)
    ref = max((c for e in load_manifest(store, 1).tensors.values() for c in e.chunks), key=lambda c: c.size)
    prepare = ckmod.prepare_restore

    def then_rewrite(*a, **k):
        prepared = prepare(*a, **k)
        with open(store.object_path(ref.key), "r+b") as f:  # in place, after the first read
            f.seek(ref.size // 2)
            f.write(b"\xff\xff\xff\xff")
        return prepared

    monkeypatch.setattr(ckmod, "prepare_restore", then_rewrite)
    fresh = _big_state(seed=5)
    with ckpt.Checkpointer(durable, local=local) as ck:
        assert ck.restore(fresh).step == 1
    assert same(weights(fresh), want)  # the durable copy restored over the partly written tensors
    assert "changed after it was verified" in caplog.text


def test_the_durable_copy_counts_its_own_manifest(store_url, tmp_path):
    """stored_bytes of a persisted copy: its objects and its manifest as written, seq included."""
    state = _big_state()
    with ckpt.Checkpointer(store_url, local=str(tmp_path / "local"), persist_every=1) as ck:
        _step(state, 1)
        ck.save(state, step=1).wait()
    store = Store(store_url)
    m = load_manifest(store, 1)
    assert m.seq is not None
    assert m.stored_bytes == sum(stored_objects(store).values()) + len(store.read_manifest(1))
