"""Checkpointer(url, local=..., persist_every=K): the local tier takes every save, the durable
tier receives every K-th, and restore takes the newest intact copy of either (every store kind
as the durable tier)."""

from __future__ import annotations

import logging
import threading
import uuid

import pytest
import torch
from _tiers_util import corrupt, keys_of, make_state, run_steps, same, train_step, weights

import ckpt
from ckpt.storage.store import Store


@pytest.fixture
def local_url(tmp_path):
    return str(tmp_path / "local")


def test_persist_cadence_and_per_tier_retention(store_url, local_url):
    state = make_state()
    ck = ckpt.Checkpointer(store_url, local=local_url, persist_every=3, keep_last=1, keep_every=6)
    try:
        for s in range(1, 8):
            train_step(state, s)
            ck.save(state, step=s).wait()
            if s == 3:
                ck.tiers.wait()
                assert ckpt.steps(store_url) == [3]
        ck.tiers.wait()
        assert ckpt.steps(store_url) == [6]  # keep_last=1 on the durable tier; 3 pruned, 6 kept
        assert ckpt.steps(local_url) == [6, 7]  # local_keep_last=2
    finally:
        ck.close()
    # close persists the newest local checkpoint; keep_every=6 keeps 6 beside it
    assert ckpt.steps(store_url) == [6, 7]
    assert ckpt.latest_step(store_url) == 7


def test_restore_prefers_the_local_tier_and_is_bit_exact(store_url, local_url, caplog):
    seen = run_steps(store_url, local_url, range(1, 5), persist_every=2)
    fresh = make_state(seed=1)
    caplog.set_level(logging.INFO, logger="ckpt")
    with ckpt.Checkpointer(store_url, local=local_url, persist_every=2) as ck:
        assert ck.restore(fresh).step == 4
    assert same(weights(fresh), seen[4])
    assert "restored step 4 from the local tier" in caplog.text


def test_deleted_local_tier_restores_from_the_durable_tier(store_url, tmp_path, caplog):
    local = f"memory://tiers-lost-{uuid.uuid4().hex}"
    seen = run_steps(store_url, local, range(1, 6), persist_every=2)  # durable: 2, 4 and 5 (on close)
    Store(local).fs.rm(Store(local).root, recursive=True)  # the node is gone
    fresh = make_state(seed=1)
    caplog.set_level(logging.INFO, logger="ckpt")
    with ckpt.Checkpointer(store_url, local=str(tmp_path / "new-node"), persist_every=2) as ck:
        assert ck.restore(fresh).step == 5
    assert same(weights(fresh), seen[5])
    assert "from the durable tier" in caplog.text and "holds no checkpoint" in caplog.text


def test_corrupt_local_newest_falls_back_to_the_durable_copy(store_url, local_url, caplog):
    seen = run_steps(store_url, local_url, range(1, 5), persist_every=2)  # durable 2, 4; local 3, 4
    corrupt(Store(local_url), 4)
    fresh = make_state(seed=1)
    caplog.set_level(logging.INFO, logger="ckpt")
    with ckpt.Checkpointer(store_url, local=local_url, persist_every=2) as ck:
        assert ck.restore(fresh).step == 4
    assert same(weights(fresh), seen[4])
    assert "step 4 of the local tier" in caplog.text and "corrupt" in caplog.text
    assert "restored step 4 from the durable tier" in caplog.text


def test_corrupt_local_newest_falls_back_to_an_older_intact_local_one(store_url, local_url, caplog):
    seen = run_steps(store_url, local_url, range(1, 5), persist_every=None)  # durable: only 4 (close)
    local = Store(local_url)
    corrupt(local, 4, keys_of(local, 4) - keys_of(local, 3))
    corrupt(Store(store_url), 4)  # the durable copy of 4 is damaged too
    fresh = make_state(seed=1)
    caplog.set_level(logging.INFO, logger="ckpt")
    with ckpt.Checkpointer(store_url, local=local_url) as ck:
        assert ck.restore(fresh).step == 3
    assert same(weights(fresh), seen[3])
    assert "step 4 of the local tier" in caplog.text and "step 4 of the durable tier" in caplog.text


def test_newer_durable_checkpoint_beats_a_stale_local_tier(store_url, local_url):
    # a stale local tier of an earlier session of this run (another run's local tier is refused:
    # test_copy_hostile.py::test_a_local_tier_left_by_another_run_is_never_restored)
    run_steps(store_url, local_url, range(1, 3))
    seen = run_steps(store_url, f"memory://tiers-{uuid.uuid4().hex}", range(1, 6), persist_every=5)
    fresh = make_state(seed=1)
    with ckpt.Checkpointer(store_url, local=local_url) as ck:
        assert ck.restore(fresh).step == 5
    assert same(weights(fresh), seen[5])


def test_restore_of_a_step_missing_locally_reads_the_durable_tier(store_url, local_url):
    seen = run_steps(store_url, local_url, range(1, 7), persist_every=2)  # durable 2, 4, 6; local 5, 6
    fresh = make_state(seed=1)
    with ckpt.Checkpointer(store_url, local=local_url) as ck:
        assert ck.restore(fresh, step=2).step == 2
    assert same(weights(fresh), seen[2])


def test_the_durable_tier_has_one_writer(store_url, tmp_path):
    with ckpt.Checkpointer(store_url, local=str(tmp_path / "a")) as first:
        first.tiers.lease  # noqa: B018 - taken in the background: wait for it
        second = ckpt.Checkpointer(store_url, local=str(tmp_path / "b"))
        second.save({"x": torch.ones(2)}, step=1).wait()  # the local commit stands ...
        with pytest.raises(ckpt.CheckpointError, match="live writer"):
            second.close()  # ... and nothing of it reaches the durable tier
        assert ckpt.steps(store_url) == [] and ckpt.steps(str(tmp_path / "b")) == [1]
    ckpt.Checkpointer(str(tmp_path / "b")).close()  # the refused one left no lease behind


def test_resume_persists_the_final_step(store_url, local_url):
    state = make_state()
    ck = ckpt.Checkpointer(store_url, local=local_url, persist_every=100, every=2)

    @ck.resume(state)
    def train(start):
        for s in range(start + 1, 6):
            train_step(state, s)
            ck.step(s)

    train()
    assert ckpt.latest_step(store_url) == 5
    assert ckpt.steps(local_url)[-1] == 5


@pytest.fixture
def slow_durable_head(monkeypatch):
    """The durable tier's latest answers only after the local tier's checkpoint was read (as a
    fresh process's S3 client does), so the restore loads the local one before the ranking;
    records the steps loaded before it answered (armed by calling it)."""
    import ckpt.snapshot.checkpointer as ckmod
    from ckpt.storage.tiers import Tiers

    latest = Tiers._durable_latest
    prepared = threading.Event()
    loaded: list[int] = []

    answered = threading.Event()

    def slow(self):
        prepared.wait(30)
        try:
            return latest(self)
        finally:
            answered.set()

    prepare, apply = ckmod.prepare_restore, ckmod.apply_restore

    def prepare_then_answer(*a, **k):
        try:
            return prepare(*a, **k)
        finally:
            prepared.set()

    def apply_early(p, **kw):
        early = not answered.is_set()
        info = apply(p, **kw)
        if early:
            loaded.append(info.step)
        return info

    def arm() -> list[int]:  # for the restoring Checkpointer only (the saving ones never prepare)
        monkeypatch.setattr(Tiers, "_durable_latest", slow)
        monkeypatch.setattr(ckmod, "prepare_restore", prepare_then_answer)
        monkeypatch.setattr(ckmod, "apply_restore", apply_early)
        return loaded

    return arm


def test_local_checkpoint_loaded_before_the_durable_tier_answers(tmp_path, slow_durable_head, after_restore_calls):
    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    seen = run_steps(durable, local, range(1, 4), persist_every=2)
    fresh, loaded = make_state(seed=1), slow_durable_head()
    with ckpt.Checkpointer(durable, local=local) as ck:
        assert ck.restore(fresh).step == 3
    assert same(weights(fresh), seen[3]) and loaded == [3]
    # the hooks run once, after the ranking kept the early load
    assert [s for s, _w in after_restore_calls] == [3] and same(after_restore_calls[0][1], seen[3])


def test_a_newer_durable_checkpoint_answering_late_is_restored_over_the_early_load(
    tmp_path, slow_durable_head, after_restore_calls
):
    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    run_steps(durable, local, range(1, 3))  # this node's local tier: steps 1-2
    seen = run_steps(durable, str(tmp_path / "other-node"), range(1, 6), persist_every=5)
    fresh, loaded = make_state(seed=1), slow_durable_head()
    with ckpt.Checkpointer(durable, local=local) as ck:
        assert ck.restore(fresh).step == 5
    assert loaded == [2]  # loaded early, then step 5 over it
    assert same(weights(fresh), seen[5])
    # the hooks never hear of the early load: only of step 5, which the live objects hold
    assert [s for s, _w in after_restore_calls] == [5] and same(after_restore_calls[0][1], seen[5])


def test_a_damaged_newer_durable_checkpoint_answering_late_keeps_the_early_load(
    tmp_path, slow_durable_head, caplog, after_restore_calls
):
    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    mine = run_steps(durable, local, range(1, 3))
    run_steps(durable, str(tmp_path / "other-node"), range(3, 6), persist_every=5)
    corrupt(Store(durable), 5)
    fresh, loaded = make_state(seed=1), slow_durable_head()
    with caplog.at_level(logging.WARNING, logger="ckpt"), ckpt.Checkpointer(durable, local=local) as ck:
        assert ck.restore(fresh).step == 2
    assert "step 5 of the durable tier" in caplog.text and "corrupt" in caplog.text
    assert same(weights(fresh), mine[2]) and loaded == [2]  # read once, not again
    assert [s for s, _w in after_restore_calls] == [2]


def test_a_newer_durable_checkpoint_that_does_not_fit_is_raised_after_an_early_load(
    tmp_path, slow_durable_head, caplog
):
    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    mine = run_steps(durable, local, range(1, 3))
    other = {"model": torch.nn.Linear(16, 5)}  # the run changed its model
    with ckpt.Checkpointer(durable, local=str(tmp_path / "other-node"), persist_every=1) as ck:
        ck.save(other, step=7).wait()
    fresh, loaded = make_state(seed=1), slow_durable_head()
    with (
        caplog.at_level(logging.WARNING, logger="ckpt"),
        ckpt.Checkpointer(durable, local=local) as ck,
        pytest.raises(ckpt.CheckpointError),
    ):
        ck.restore(fresh)
    assert "the live objects hold step 2 of the local tier" in caplog.text
    assert same(weights(fresh), mine[2]) and loaded == [2]  # whole, never half of either


def test_an_early_load_damaged_in_place_then_a_durable_misfit_says_the_live_objects_are_damaged(
    tmp_path, slow_durable_head, caplog, monkeypatch
):
    """The raw local tier is read straight into the live tensors; an object rewritten between its
    verification and that read is found after they changed. Without the early load a newer
    durable checkpoint ranked first would have left them untouched: now, when that one cannot
    be restored either, the live objects are partly overwritten and the log must say so."""
    import ckpt.state.restore as restoremod

    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    torch.manual_seed(0)
    with ckpt.Checkpointer(durable, local=local) as ck:
        for s in (1, 2):
            ck.save({"model": torch.nn.Linear(1024, 512)}, step=s).wait()  # 2 MiB: read in place
    with ckpt.Checkpointer(durable, local=str(tmp_path / "other-node"), persist_every=1) as ck:
        ck.save({"other": torch.nn.Linear(16, 5)}, step=7).wait()  # the run changed its state
    fresh, loaded = {"model": torch.nn.Linear(1024, 512)}, slow_durable_head()
    before = {k: v.detach().clone() for k, v in fresh["model"].state_dict().items()}
    prepare = restoremod._prepare

    def prepare_then_rewrite(store, plugins, m, live, **kw):
        prepared = prepare(store, plugins, m, live, **kw)
        if prepared[3] is not None:
            corrupt(store, m.step)  # rewritten in place between the two reads
        return prepared

    monkeypatch.setattr(restoremod, "_prepare", prepare_then_rewrite)
    with (
        caplog.at_level(logging.WARNING, logger="ckpt"),
        ckpt.Checkpointer(durable, local=local) as ck,
        pytest.raises(ckpt.CheckpointError, match="has no 'model'"),
    ):
        ck.restore(fresh)
    assert loaded == []  # the early load failed, after the live tensors changed
    assert not same({k: v.detach() for k, v in fresh["model"].state_dict().items()}, before)
    assert "partly overwritten" in caplog.text and "step 7 of the durable tier" in caplog.text


def test_a_loader_saved_before_its_first_epoch_restored_over_the_early_load_starts_afresh(tmp_path, slow_durable_head):
    """The early load gives a DataLoader the local checkpoint's position to replay; a newer
    durable checkpoint restored over it, saved before its loader's first epoch, must leave the
    loader starting from the beginning, not replaying the local one's position."""
    from torch.utils.data import DataLoader, TensorDataset

    def state():
        torch.manual_seed(0)
        loader = ckpt.track(DataLoader(TensorDataset(torch.arange(32)), batch_size=4))
        return {"model": torch.nn.Linear(4, 4), "loader": loader}

    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    mine = state()
    it = iter(mine["loader"])
    for _ in range(3):
        next(it)
    with ckpt.Checkpointer(durable, local=local) as ck:
        ck.save(mine, step=2).wait()  # three batches into epoch 0
    with ckpt.Checkpointer(durable, local=str(tmp_path / "other-node"), persist_every=5) as ck:
        ck.save(state(), step=5).wait()  # a newer run's, before its loader's first epoch
    fresh, loaded = state(), slow_durable_head()
    with ckpt.Checkpointer(durable, local=local) as ck:
        assert ck.restore(fresh).step == 5
    assert loaded == [2]
    (first,) = next(iter(fresh["loader"]))
    assert first.tolist() == [0, 1, 2, 3]
