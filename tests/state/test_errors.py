"""Bad input: clear errors naming the key, tensor or URL, and live state left untouched."""

from __future__ import annotations

import pytest
import torch

import ckpt
from ckpt.testing import assert_same_state, clone_state


def test_error_hierarchy():
    for cls in (
        ckpt.CorruptCheckpointError,
        ckpt.NoCheckpointError,
        ckpt.MissingObjectError,
        ckpt.SchemaError,
        ckpt.UnknownCodecError,
        ckpt.StateMismatchError,
        ckpt.UnsupportedValueError,
        ckpt.PluginError,
        ckpt.StoreError,
    ):
        assert issubclass(cls, ckpt.CheckpointError), cls
    assert issubclass(ckpt.MissingObjectError, ckpt.CorruptCheckpointError)
    assert issubclass(ckpt.SchemaError, ckpt.CorruptCheckpointError)


class Opaque:
    pass


@pytest.mark.parametrize(
    "state, where",
    [
        ({"thing": Opaque()}, "thing"),
        ({"cfg": {"nested": [1, {"fn": len}]}}, "cfg/nested/1/fn"),
        ({"cfg": {"a/b": object()}}, "cfg/a~1b"),
        ({"s": {1, 2}}, "s"),
    ],
    ids=["top", "nested", "escaped", "set"],
)
def test_unsupported_value_names_key_and_suggests_adapter(store_url, state, where):
    with pytest.raises(ckpt.UnsupportedValueError) as exc:
        ckpt.save(store_url, state, step=1)
    msg = str(exc.value)
    assert msg.startswith(where + ":"), msg
    assert "adapter plugin" in msg and "pickle" in msg
    from ckpt.storage.store import Store

    assert Store(store_url).steps() == [], "nothing is committed for a refused state"


def test_unsupported_keys_and_state(store_url):
    with pytest.raises(ckpt.UnsupportedValueError, match="cfg"):
        ckpt.save(store_url, {"cfg": {(1, 2): "tuple key"}}, step=1)
    with pytest.raises(ckpt.UnsupportedValueError, match="3"):
        ckpt.save(store_url, {3: torch.ones(1)}, step=1)
    with pytest.raises(ckpt.UnsupportedValueError, match=r"\$x"):
        ckpt.save(store_url, {"$x": torch.ones(1)}, step=1)
    with pytest.raises(ckpt.CheckpointError, match="mapping"):
        ckpt.save(store_url, [torch.ones(1)], step=1)
    import numpy as np

    with pytest.raises(ckpt.UnsupportedValueError, match="arr"):
        ckpt.save(store_url, {"arr": np.array([object()])}, step=1)
    with pytest.raises(ckpt.UnsupportedValueError, match="sparse"):
        ckpt.save(store_url, {"sparse": torch.eye(3).to_sparse()}, step=1)


@pytest.mark.parametrize("step", [-1, 1.0, "3", True, None])
def test_bad_step(store_url, step):
    with pytest.raises(ckpt.CheckpointError, match="step"):
        ckpt.save(store_url, {"x": 1}, step=step)


def test_key_collision_is_refused(store_url):
    # int key 1 and str key "1" would share the tensor path "m/1": refuse, never mix them up
    with pytest.raises(ckpt.UnsupportedValueError, match="m/1"):
        ckpt.save(store_url, {"m": {1: torch.zeros(2), "1": torch.ones(2)}}, step=1)


def test_no_checkpoint(store_url):
    with pytest.raises(ckpt.NoCheckpointError, match="no checkpoint"):
        ckpt.load(store_url)
    with pytest.raises(ckpt.NoCheckpointError):
        ckpt.restore(store_url, {"x": torch.zeros(1)})
    ckpt.save(store_url, {"x": torch.zeros(1)}, step=5)
    with pytest.raises(ckpt.NoCheckpointError, match="step 6"):
        ckpt.load(store_url, step=6)


def test_bad_url():
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load("")
    with pytest.raises(ckpt.StoreError, match="nosuchproto"):
        ckpt.save("nosuchproto://bucket/x", {"x": 1}, step=1)


def test_missing_state_key(store_url):
    ckpt.save(store_url, {"model": torch.nn.Linear(2, 2), "epoch": 3}, step=1)
    with pytest.raises(ckpt.StateMismatchError) as exc:
        ckpt.restore(store_url, {"model": torch.nn.Linear(2, 2), "optimizer": {}})
    msg = str(exc.value)
    assert "'optimizer'" in msg and "'model'" in msg and "'epoch'" in msg


def _model(width=8, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.BatchNorm1d(width), torch.nn.Linear(width, 3)
    ).to(dtype)


@pytest.mark.parametrize("kind", ["shape", "dtype", "extra-param"])
def test_mismatch_leaves_live_state_untouched(store_url, kind):
    saved_model = _model()
    saved_model[0].weight.data.fill_(7.0)
    ckpt.save(store_url, {"model": saved_model, "step_t": torch.ones(3)}, step=1)

    if kind == "shape":
        live = _model(width=9)
        bad = "model/0.weight"
    elif kind == "dtype":
        live = _model(dtype=torch.float64)
        bad = "model/0.weight"
    else:
        live = torch.nn.Sequential(*_model(), torch.nn.Linear(3, 3))
        bad = "model/3.weight"
    live_step = torch.zeros(3)
    before = clone_state(live.state_dict())
    with pytest.raises(ckpt.StateMismatchError) as exc:
        ckpt.restore(store_url, {"step_t": live_step, "model": live})
    assert repr(bad) in str(exc.value)
    assert_same_state(clone_state(live.state_dict()), before)
    assert torch.equal(live_step, torch.zeros(3)), "no tensor may be written before the check"


def test_missing_param_in_live_module_leaves_it_untouched(store_url):
    # the checkpoint has a bias the live module lacks: refused before anything is written
    ckpt.save(store_url, {"lin": torch.nn.Linear(4, 4)}, step=1)
    live = torch.nn.Linear(4, 4, bias=False)
    before = live.weight.detach().clone()
    with pytest.raises(ckpt.StateMismatchError, match="bias"):
        ckpt.restore(store_url, {"lin": live})
    assert torch.equal(live.weight, before)


def test_wrong_kind_of_object(store_url):
    ckpt.save(store_url, {"obj": torch.nn.Linear(2, 2), "plain": {"a": torch.ones(2)}}, step=1)
    with pytest.raises(ckpt.StateMismatchError, match="torch.optim.Optimizer"):
        ckpt.restore(store_url, {"obj": torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)})
    with pytest.raises(ckpt.StateMismatchError, match="plain data"):
        ckpt.restore(store_url, {"plain": torch.nn.Linear(2, 2)})


def test_optimizer_of_a_different_model(store_url):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpt.save(store_url, {"optim": opt}, step=1)
    other_model = torch.nn.Linear(5, 4)
    other = torch.optim.AdamW(other_model.parameters())
    other_model(torch.randn(2, 5)).sum().backward()
    other.step()
    before = clone_state(other.state_dict())
    with pytest.raises(ckpt.StateMismatchError, match="optim/state/0/exp_avg"):
        ckpt.restore(store_url, {"optim": other})
    assert_same_state(clone_state(other.state_dict()), before)
