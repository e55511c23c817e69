"""A hostile review of ckpt.copy and the tiers: an untrusted source, a destination holding
another lineage, interrupted copies, and the tiers' failure modes. Every refusal is a
CheckpointError naming the step/object/URL, with nothing committed at the destination."""

from __future__ import annotations

import datetime
import json
import re

import pytest
import torch
from _tiers_util import corrupt, keys_of, make_state, same, train_step, weights

import ckpt
from ckpt.storage import tiers as tiers_mod
from ckpt.storage.copy import copy_stores
from ckpt.storage.store import Store


@pytest.fixture(autouse=True)
def _one_object_per_tensor(monkeypatch):
    """These attacks edit one tensor's own object record: small tensors are not packed here."""
    monkeypatch.setenv("CKPT_PACK_BYTES", "0")


def _save(url: str, steps, seed: int = 0) -> None:
    for s in steps:
        ckpt.save(url, {"head": torch.full((8,), float(s + seed)), "w": torch.randn(64)}, step=s)


def _edit(store: Store, step: int, fn) -> None:
    doc = json.loads(store.read_manifest(step))
    fn(doc)
    store.write(store.manifest_path(step), json.dumps(doc).encode())


def _nothing_at(url: str) -> None:
    assert ckpt.steps(url) == [] and not any(Store(url).list_objects())


def _raw_bomb(doc: dict) -> None:
    """A raw chunk claiming 1 TiB stored and raw (consistent: the validator accepts it)."""
    doc["chunk_bytes"] = 2**40
    t = doc["tensors"]["head"]
    t.update(shape=[2**38], nbytes=2**40)
    t["chunks"][0].update(size=2**40, stored=2**40)


def _missing_delta_parent(doc: dict) -> None:
    chunk = doc["tensors"]["head"]["chunks"][0]
    parent = {"hash": "0" * 32, "key": "0" * 32, "size": 32, "stored": 32, "codec": []}
    chunk["codec"] = [{"name": "xor", "parent": parent}]


@pytest.mark.parametrize(
    ("damage", "match"),
    [(_raw_bomb, "cad4b99211f416992baab582646646bd|bytes"), (_missing_delta_parent, "0{32}")],
    ids=["size-bomb", "delta-parent-missing"],
)
def test_copy_refuses_hostile_objects_before_writing_anything(tmp_path, damage, match):
    src = Store(str(tmp_path / "src"))
    ckpt.save(src.url, {"head": torch.ones(8), "w": torch.randn(64)}, step=1)
    _edit(src, 1, damage)
    dst = str(tmp_path / "dst")
    with pytest.raises(ckpt.CheckpointError, match=f"step 1 of {src.url}.*({match})"):
        ckpt.copy(src.url, dst)  # a 1 TiB buffer is never allocated: the fetched size is checked first
    _nothing_at(dst)


def test_copy_never_overwrites_a_different_checkpoint_at_the_same_step(store_url, tmp_path):
    a, b = store_url, str(tmp_path / "b")
    _save(a, [1, 2])
    _save(b, [1, 2, 3], seed=100)  # another lineage with colliding step numbers
    before = {s: ckpt.load(a, step=s)["head"] for s in (1, 2)}
    objects = {o.key for o in Store(a).list_objects()}
    for step in (2, None):
        with pytest.raises(ckpt.CheckpointError, match=rf"step \d of {re.escape(a)} is a different checkpoint"):
            ckpt.copy(b, a, step=step)
    assert ckpt.steps(a) == [1, 2] and ckpt.latest_step(a) == 2
    assert all(torch.equal(ckpt.load(a, step=s)["head"], v) for s, v in before.items())
    assert {o.key for o in Store(a).list_objects()} == objects  # refused before the first write
    ckpt.copy(b, a, step=3)  # a step the destination lacks is fine
    assert ckpt.steps(a) == [1, 2, 3]
    ckpt.copy(a, str(tmp_path / "c"))
    assert ckpt.copy(a, str(tmp_path / "c")).step == 3  # the same checkpoints: skipped, not refused


def test_copy_never_overwrites_an_unreadable_destination_step(tmp_path):
    src, dst = str(tmp_path / "src"), Store(str(tmp_path / "dst"))
    _save(src, [1])
    ckpt.copy(src, dst.url)
    _edit(dst, 1, lambda d: d.update(schema=99))  # written by a newer ckpt, say
    held = dst.read_manifest(1)
    with pytest.raises(ckpt.CheckpointError, match=f"step 1 of {dst.url} is unreadable"):
        ckpt.copy(src, dst.url, step=1)
    assert dst.read_manifest(1) == held


def test_copy_rerun_after_manifest_without_ref(tmp_path):
    """Killed between the manifest and the ref: the rerun finds the checkpoint complete."""
    src, dst = Store(str(tmp_path / "src")), Store(str(tmp_path / "dst"))
    _save(src.url, [1, 2])
    ckpt.copy(src.url, dst.url, step=1)
    for key in keys_of(src, 2):
        dst.put_object(key, src.get_object(key))
    doc = json.loads(src.read_manifest(2))
    doc["seq"] = 2
    dst.write(dst.manifest_path(2), json.dumps(doc).encode())  # the ref still names step 1
    assert ckpt.latest_step(dst.url) == 2
    res = copy_stores(src, dst)
    assert res.stats.already == 2 and res.stats.objects == 0 and res.info.step == 2
    assert torch.equal(ckpt.load(dst.url)["head"], ckpt.load(src.url)["head"])


# -- tiers ---------------------------------------------------------------------------------


def _train(durable: str, local: str, steps, **kw) -> dict:
    state = make_state()
    with ckpt.Checkpointer(durable, local=local, **kw) as ck:
        for s in steps:
            train_step(state, s)
            ck.save(state, step=s).wait()
    return weights(state)


def test_a_local_tier_left_by_another_run_is_never_restored(tmp_path):
    local = str(tmp_path / "local")
    _train(str(tmp_path / "job_a"), local, [1, 2, 3], persist_every=100)
    assert ckpt.steps(local) == [2, 3]
    with pytest.raises(ckpt.CheckpointError, match=f"local tier {local} belongs to the durable tier .*job_a"):
        ckpt.Checkpointer(str(tmp_path / "job_b"), local=local, persist_every=1)
    assert ckpt.steps(str(tmp_path / "job_b")) == []  # nothing of job a persisted into job b
    assert ckpt.steps(local) == [2, 3]  # and nothing of job a pruned
    # the same job restarting on that node keeps its local tier
    state = make_state(seed=1)
    with ckpt.Checkpointer(str(tmp_path / "job_a"), local=local, persist_every=100) as ck:
        assert ck.restore(state).step == 3
    # an emptied local tier may serve another job
    Store(local).fs.rm(Store(local).path("manifests"), recursive=True)
    ckpt.Checkpointer(str(tmp_path / "job_b"), local=local, persist_every=1).close()


def test_a_failed_background_persist_surfaces_at_the_next_save(tmp_path, monkeypatch):
    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    state = make_state()
    ck = ckpt.Checkpointer(durable, local=local, persist_every=1, local_keep_last=None)
    try:
        ck.save(state, step=1).wait()
        ck.tiers.wait()
        boom = RuntimeError("injected: the durable tier went away")

        def fail(*a, **k):
            raise boom

        monkeypatch.setattr(tiers_mod, "copy_stores", fail)  # a bug or a raw error in the thread
        monkeypatch.setattr(tiers_mod, "resave_step", fail)
        ck.save(state, step=2).wait()
        ck.tiers.wait()
        monkeypatch.undo()
        ck.save(state, step=3).wait()  # commits locally; the persist failure is the run's pending error
        with pytest.raises(ckpt.CheckpointError, match=f"persisting step 2 to the durable tier {durable}.*injected"):
            ck.wait()
        ck.save(state, step=4).wait()  # raised once; training goes on
    finally:
        ck.close()
    assert ckpt.latest_step(durable) == 4 and ckpt.steps(local) == [1, 2, 3, 4]


def test_close_during_a_background_persist_waits_for_it(tmp_path):
    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    state = {"w": torch.randn(256 * 1024)}
    ck = ckpt.Checkpointer(durable, local=local, persist_every=1)
    ck.save(state, step=1).wait()
    ck.close()  # while step 1 is being copied
    assert ckpt.latest_step(durable) == 1 and torch.equal(ckpt.load(durable)["w"], state["w"])
    assert not list(Store(durable).fs.glob(Store(durable).path("leases", "*")))  # the lease is released


def test_restore_when_both_tiers_are_corrupt_leaves_live_objects_untouched(tmp_path):
    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    _train(durable, local, [1, 2], persist_every=1)
    for url in (durable, local):
        for s in ckpt.steps(url):
            corrupt(Store(url), s)
    fresh = make_state(seed=7)
    before = weights(fresh)
    opt_before = {k: dict(v) for k, v in fresh["optim"].state_dict()["state"].items()}
    with (
        ckpt.Checkpointer(durable, local=local, persist_every=1) as ck,
        pytest.raises(ckpt.CorruptCheckpointError, match="no intact checkpoint in either tier"),
    ):
        ck.restore(fresh)
    assert same(before, weights(fresh))
    assert {k: dict(v) for k, v in fresh["optim"].state_dict()["state"].items()} == opt_before


def _skew(urls, steps, hours: float) -> None:
    """Rewrite the ``created`` of ``steps`` as a node whose clock is ``hours`` off would have."""
    stamp = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=hours)).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    )
    for url in urls:
        for s in steps:
            _edit(Store(url), s, lambda d: d.update(created=stamp))


def test_clock_skew_a_restart_on_a_node_whose_clock_is_behind(tmp_path):
    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    _train(durable, str(tmp_path / "node_a"), [1, 2, 3, 4], persist_every=4)
    _skew([durable], [4], hours=1)  # node a's clock was an hour ahead
    # node b restored step 4 from the durable tier and saved 5, 6 locally before dying
    seen = {}
    state = make_state(seed=3)
    ck = ckpt.Checkpointer(durable, local=local, persist_every=100)
    assert ck.restore(state).step == 4
    for s in (5, 6):
        train_step(state, s)
        ck.save(state, step=s).wait()
        seen[s] = weights(state)
    ck.tiers.close(persist=False)  # died before persisting: the durable tier still ends at step 4
    ck.tiers = None
    ck.close()
    assert ckpt.latest_step(durable) == 4 and ckpt.steps(local) == [5, 6]
    fresh = make_state(seed=1)
    with ckpt.Checkpointer(durable, local=local, persist_every=100) as again:
        assert again.restore(fresh).step == 6  # not step 4, whose clock says it is newer
    assert same(weights(fresh), seen[6])


def test_clock_skew_a_stale_local_tier_written_with_a_clock_ahead(tmp_path):
    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    _train(durable, local, [1, 2], persist_every=1)
    _skew([local, durable], [1, 2], hours=1)  # this node's clock was an hour ahead, in both copies
    # the job went on on another node (its own local tier), persisting 3, 4, 5
    state = make_state(seed=3)
    with ckpt.Checkpointer(durable, local=str(tmp_path / "node_b"), persist_every=1) as ck:
        assert ck.restore(state).step == 2
        for s in (3, 4, 5):
            train_step(state, s)
            ck.save(state, step=s).wait()
    want = weights(state)
    fresh = make_state(seed=1)
    with ckpt.Checkpointer(durable, local=local, persist_every=1) as ck:  # back on the first node
        assert ck.restore(fresh).step == 5  # not the stale step 2, whose clock says it is newer
    assert same(weights(fresh), want)


def test_copy_refuses_one_object_cited_with_two_different_hashes(tmp_path):
    src = Store(str(tmp_path / "src"))
    ckpt.save(src.url, {"a": torch.ones(8), "b": torch.zeros(8)}, step=1)

    def alias(doc):  # b's chunk points at a's object, with b's own hash
        doc["tensors"]["b"]["chunks"][0]["key"] = doc["tensors"]["a"]["chunks"][0]["key"]

    _edit(src, 1, alias)
    dst = str(tmp_path / "dst")
    with pytest.raises(ckpt.CheckpointError, match="step 1.*cited by records that disagree"):
        ckpt.copy(src.url, dst)
    _nothing_at(dst)
