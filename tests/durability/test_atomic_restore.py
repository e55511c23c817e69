"""Restore is all or nothing: live objects are never left half-overwritten.

Every case damages a checkpoint in a way that is only noticed late (a flipped bit in one
tensor's object, a tampered RNG or optimizer value that only the last adapter would
reject) and checks that every live object still holds exactly what it held before.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

import ckpt
from ckpt.storage.store import Store
from ckpt.testing import assert_same_state, clone_state, corrupt_object, make_training_state


def _snapshot(state):
    """A bit-exact copy of everything restore could change in ``state``."""
    return {
        "model": clone_state(state["model"].state_dict()),
        "optim": clone_state(state["optim"].state_dict()),
        "sched": clone_state(state["sched"].state_dict()),
        "rng": torch.get_rng_state().clone(),
    }


def _assert_untouched(state, before):
    assert_same_state(clone_state(state["model"].state_dict()), before["model"])
    assert_same_state(clone_state(state["optim"].state_dict()), before["optim"])
    assert_same_state(clone_state(state["sched"].state_dict()), before["sched"])
    assert torch.equal(torch.get_rng_state(), before["rng"])


def _two_steps(url):
    ckpt.save(url, make_training_state(seed=1), step=1)
    ckpt.save(url, make_training_state(seed=2), step=2)


def _tamper(url, step, edit):
    store = Store(url)
    doc = json.loads(store.read_manifest(step))
    edit(doc)
    store.write(store.manifest_path(step), json.dumps(doc).encode())


def _last_object_of(url, step, prefix):
    manifest = ckpt.read_manifest(url, step)
    paths = [p for p in manifest.tensors if p.startswith(prefix)]
    return manifest.tensors[paths[-1]].chunks[-1].key


def test_corrupt_tensor_of_an_explicit_step_changes_nothing(store_url):
    _two_steps(store_url)
    # the module's *last* tensor is damaged: a restore decoding in place would already
    # have overwritten the others when it noticed
    key = _last_object_of(store_url, 2, "model/")
    corrupt_object(Store(store_url), key)
    state = make_training_state(seed=3)
    before = _snapshot(state)
    with pytest.raises(ckpt.CorruptCheckpointError, match=key):
        ckpt.restore(store_url, state, step=2)
    _assert_untouched(state, before)


def test_corrupt_latest_falls_back_to_the_newest_intact_checkpoint(store_url, caplog):
    _two_steps(store_url)
    corrupt_object(Store(store_url), _last_object_of(store_url, 2, "optim/"))
    state = make_training_state(seed=3)
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        info = ckpt.restore(store_url, state)
    assert info.step == 1
    assert "step 2" in caplog.text
    expected = make_training_state(seed=1)
    assert_same_state(clone_state(state["model"].state_dict()), clone_state(expected["model"].state_dict()))
    assert_same_state(clone_state(state["optim"].state_dict()), clone_state(expected["optim"].state_dict()))


def test_corrupt_only_checkpoint_raises_and_changes_nothing(store_url):
    ckpt.save(store_url, make_training_state(seed=1), step=1)
    corrupt_object(Store(store_url), _last_object_of(store_url, 1, "model/"))
    state = make_training_state(seed=3)
    before = _snapshot(state)
    with pytest.raises(ckpt.CorruptCheckpointError):
        ckpt.restore(store_url, state)
    _assert_untouched(state, before)


@pytest.mark.parametrize(
    "what,edit",
    [
        ("python rng", lambda doc: doc["tree"]["rng"].__setitem__("python", [1, 2, 3])),
        ("torch rng", lambda doc: doc["tree"]["rng"].__setitem__("torch", "not a state")),
        ("numpy rng", lambda doc: doc["tree"]["rng"]["numpy"].__setitem__("state", {"key": 1})),
        ("optimizer groups", lambda doc: doc["tree"]["optim"]["param_groups"].append({"params": [99]})),
        ("optimizer params", lambda doc: doc["tree"]["optim"]["param_groups"][0]["params"].pop()),
        ("scheduler state", lambda doc: doc["tree"].__setitem__("sched", [1, 2])),
    ],
)
def test_tampered_values_are_refused_before_any_load(tmp_path, what, edit):
    """The RNG and optimizer come after the model in the state: their values are checked
    before the model's weights are written."""
    url = f"file://{tmp_path}/s"
    ckpt.save(url, make_training_state(seed=1), step=1)
    _tamper(url, 1, edit)
    state = make_training_state(seed=3)
    before = _snapshot(state)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.restore(url, state, step=1)
    _assert_untouched(state, before)


def test_scaler_enabled_state_must_match(tmp_path):
    url = f"file://{tmp_path}/s"
    ckpt.save(url, {"scaler": torch.amp.GradScaler("cpu", enabled=False)}, step=1)
    with pytest.raises(ckpt.StateMismatchError, match="disabled"):
        ckpt.restore(url, {"scaler": torch.amp.GradScaler("cpu", enabled=True)})
    ckpt.save(url, {"scaler": torch.amp.GradScaler("cpu", init_scale=8.0)}, step=2)
    with pytest.raises(ckpt.StateMismatchError, match="enabled"):
        ckpt.restore(url, {"scaler": torch.amp.GradScaler("cpu", enabled=False)}, step=2)
    live = torch.amp.GradScaler("cpu")
    ckpt.restore(url, {"scaler": live}, step=2)
    assert live.get_scale() == 8.0


def test_generator_state_of_another_size_is_refused(tmp_path):
    url = f"file://{tmp_path}/s"
    ckpt.save(url, {"g": torch.Generator().manual_seed(5), "w": torch.ones(3)}, step=1)
    _tamper(url, 1, lambda doc: doc["tree"]["g"].__setitem__("state", {"$tensor": "w"}))
    g = torch.Generator().manual_seed(9)
    w = torch.zeros(3)
    before = g.get_state().clone()
    with pytest.raises(ckpt.StateMismatchError, match="generator"):
        ckpt.restore(url, {"w": w, "g": g})
    assert torch.equal(g.get_state(), before)
    assert torch.equal(w, torch.zeros(3))


def test_plain_tensors_in_the_state_are_restored_in_place(store_url):
    t = torch.arange(6, dtype=torch.float32)
    ckpt.save(store_url, {"t": t, "nested": {"u": t * 2}}, step=1)
    live = {"t": torch.zeros(6), "nested": {"u": torch.zeros(6)}}
    keep = live["t"], live["nested"]["u"]
    ckpt.restore(store_url, live)
    assert live["t"] is keep[0] and live["nested"]["u"] is keep[1]
    assert torch.equal(keep[0], t) and torch.equal(keep[1], t * 2)


def test_module_tree_missing_a_name_changes_nothing(tmp_path):
    url = f"file://{tmp_path}/s"
    ckpt.save(url, {"model": torch.nn.Linear(3, 2)}, step=1)

    def edit(doc):
        doc["tree"]["model"].pop("bias")
        doc["tree"]["model"]["junk"] = 1

    _tamper(url, 1, edit)
    live = torch.nn.Linear(3, 2)
    before = clone_state(live.state_dict())
    with pytest.raises(ckpt.StateMismatchError, match="bias"):
        ckpt.restore(url, {"model": live}, step=1)
    assert_same_state(clone_state(live.state_dict()), before)


def test_scheduler_value_its_load_refuses_changes_nothing(tmp_path):
    url = f"file://{tmp_path}/s"
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    ckpt.save(url, {"sched": torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=3)}, step=1)
    _tamper(url, 1, lambda doc: doc["tree"]["sched"].update(mode="bogus", patience=99))
    live = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=3)
    with pytest.raises(ckpt.StateMismatchError, match="scheduler"):
        ckpt.restore(url, {"sched": live}, step=1)
    assert live.patience == 3 and live.mode == "min"
    _tamper(url, 1, lambda doc: doc["tree"]["sched"].update(mode="min", patience=3, optimizer=1))
    with pytest.raises(ckpt.StateMismatchError, match="optimizer"):
        ckpt.restore(url, {"sched": live}, step=1)


def test_a_resume_that_cannot_restore_gives_the_store_back(tmp_path):
    url = f"file://{tmp_path}/s"
    ckpt.save(url, {"model": torch.nn.Linear(3, 2)}, step=1)
    ck = ckpt.Checkpointer(url)

    @ck.resume(model=torch.nn.Linear(4, 2))
    def train(start):
        raise AssertionError("never reached")

    with pytest.raises(ckpt.StateMismatchError):
        train()
    ckpt.save(url, {"model": torch.nn.Linear(3, 2)}, step=2)  # no live writer is left behind
