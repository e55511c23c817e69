"""A refused restore changes nothing live: what the adapters' checks must catch before any
load (or in-place decode) happens, found by a hostile review, and what a restore says when
an adapter's load fails after the live objects began to change."""

from __future__ import annotations

import random

import pytest
import torch

import ckpt
from ckpt.state import dataloader as loadermod
from ckpt.state import torch_adapters
from ckpt.testing import assert_same_state, clone_state


class Warmup:
    """A callable-object lambda: LambdaLR saves (and loads into) its ``__dict__``."""

    def __init__(self, k: float) -> None:
        self.k = k

    def __call__(self, epoch: int) -> float:
        return 1.0 / (1 + self.k * epoch)


def _schedulers(kind: str, n: int = 2):
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    lr = torch.optim.lr_scheduler
    if kind == "sequential":
        subs = [lr.LinearLR(opt, start_factor=0.1, total_iters=3), *[lr.StepLR(opt, 2, 0.5) for _ in range(n - 1)]]
        return opt, lr.SequentialLR(opt, subs, milestones=[3 * (i + 1) for i in range(n - 1)])
    if kind == "chained":
        return opt, lr.ChainedScheduler([lr.ExponentialLR(opt, 0.9), lr.StepLR(opt, 2, 0.5)])
    return opt, lr.LambdaLR(opt, Warmup(1.0))


def _scheduler_state(sched) -> dict:
    """Everything loading could change: the scheduler's, its schedulers' and lambdas' own fields."""
    parts = [sched, *getattr(sched, "_schedulers", [])]
    fields = [{k: v for k, v in vars(p).items() if k not in ("optimizer", "_schedulers", "lr_lambdas")} for p in parts]
    lambdas = [dict(vars(f)) for f in getattr(sched, "lr_lambdas", [])]
    return clone_state({"fields": fields, "lambdas": lambdas})


@pytest.mark.parametrize("kind", ["sequential", "chained", "lambda"])
def test_a_refused_restore_leaves_schedulers_and_their_lambdas(tmp_path, kind):
    """The scheduler's check loads the checkpoint into a copy: it must not reach the live
    schedulers a SequentialLR or ChainedScheduler holds, nor a LambdaLR's lambda objects
    (the shallow copy it was shared them)."""
    url = str(tmp_path / "s")
    opt, sched = _schedulers(kind)
    if kind == "lambda":
        sched.lr_lambdas[0].k = 5.0
    for _ in range(6):
        opt.step()
        sched.step()
    # the scaler fails, after the scheduler's check passed: saved enabled, live disabled
    ckpt.save(url, {"sched": sched, "scaler": torch.amp.GradScaler("cpu")}, step=1)
    opt2, live = _schedulers(kind)
    opt2.step()
    live.step()
    before = _scheduler_state(live)
    with pytest.raises(ckpt.StateMismatchError, match="GradScaler"):
        ckpt.restore(url, {"sched": live, "scaler": torch.amp.GradScaler("cpu", enabled=False)})
    assert_same_state(_scheduler_state(live), before)
    ckpt.restore(url, {"sched": live})  # and a restore that fits still loads them all
    assert_same_state(_scheduler_state(live), _scheduler_state(sched))


def test_a_sequential_scheduler_of_other_length_is_refused_unchanged(tmp_path):
    url = str(tmp_path / "s")
    opt, sched = _schedulers("sequential", n=3)
    for _ in range(4):
        opt.step()
        sched.step()
    ckpt.save(url, {"sched": sched}, step=1)
    _, live = _schedulers("sequential", n=2)
    before = _scheduler_state(live)
    with pytest.raises(ckpt.StateMismatchError, match="SequentialLR"):
        ckpt.restore(url, {"sched": live})
    assert_same_state(_scheduler_state(live), before)


def test_a_fresh_optimizer_refuses_state_of_other_shapes(tmp_path):
    """torch's load_state_dict compares no shapes: an optimizer that has not stepped (the
    usual resume) took another model's moments and failed at its first step."""
    url = str(tmp_path / "s")
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    ckpt.save(url, {"optim": opt}, step=1)
    live = torch.optim.AdamW(torch.nn.Linear(3, 5).parameters())
    with pytest.raises(ckpt.StateMismatchError, match=r"state 0/exp_avg has shape \[4, 8\], its parameter \[5, 3\]"):
        ckpt.restore(url, {"optim": live})
    assert not live.state, "the live optimizer took no state"
    # the same shapes fit, and an optimizer whose state is not shaped like its parameters is
    # not held to it (LBFGS keeps flat history)
    same = torch.optim.AdamW(torch.nn.Linear(8, 4).parameters())
    ckpt.restore(url, {"optim": same})
    assert same.state_dict()["state"][0]["exp_avg"].shape == (4, 8)
    assert torch.optim.LBFGS not in torch_adapters._PARAM_SHAPED_STATE


def _invalid_mt19937() -> torch.Tensor:
    return torch.zeros_like(torch.get_rng_state())  # the right size, not a state torch takes


@pytest.mark.parametrize("what", ["rng", "generator"])
def test_rng_contents_torch_refuses_are_refused_before_anything_changes(tmp_path, monkeypatch, what):
    """A checkpoint (as a hostile store may hold) whose torch RNG state has the right size but
    contents torch refuses: refused by the check, not after the model was written in place."""
    url = str(tmp_path / "s")
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    adapter = torch_adapters.RNGAdapter if what == "rng" else torch_adapters.GeneratorAdapter
    real = adapter.state
    if what == "rng":
        monkeypatch.setattr(adapter, "state", lambda self, obj: {**real(self, obj), "torch": _invalid_mt19937()})
        obj = ckpt.RNG()
    else:
        monkeypatch.setattr(adapter, "state", lambda self, obj: {"device": "cpu", "state": _invalid_mt19937()})
        obj = torch.Generator().manual_seed(3)
    ckpt.save(url, {"model": model, "r": obj}, step=1)
    monkeypatch.setattr(adapter, "state", real)

    live_model = torch.nn.Linear(16, 16)
    before = clone_state(live_model.state_dict())
    live_gen = torch.Generator().manual_seed(4)
    gen_before, torch_before, py_before = live_gen.get_state(), torch.get_rng_state(), random.getstate()
    with pytest.raises(ckpt.StateMismatchError, match="Invalid mt19937 state"):
        ckpt.restore(url, {"model": live_model, "r": ckpt.RNG() if what == "rng" else live_gen})
    assert_same_state(clone_state(live_model.state_dict()), before)
    assert torch.equal(live_gen.get_state(), gen_before)
    assert torch.equal(torch.get_rng_state(), torch_before) and random.getstate() == py_before


def test_a_loader_position_without_generator_states_loads(tmp_path, monkeypatch):
    """check() took a position without ``start`` (a checkpoint taken before any epoch began
    records none), load() then failed on it after the model was written."""
    url = str(tmp_path / "s")
    data = list(range(64))
    loader = ckpt.track(torch.utils.data.DataLoader(data, batch_size=4, shuffle=True))
    next(iter(loader))
    real = loadermod.DataLoaderAdapter.state

    def without_start(self, obj):
        return {k: v for k, v in real(self, obj).items() if k != "start"}

    monkeypatch.setattr(loadermod.DataLoaderAdapter, "state", without_start)
    ckpt.save(url, {"model": torch.nn.Linear(4, 4), "loader": loader}, step=1)
    monkeypatch.setattr(loadermod.DataLoaderAdapter, "state", real)
    live = ckpt.track(torch.utils.data.DataLoader(data, batch_size=4, shuffle=True))
    ckpt.restore(url, {"model": torch.nn.Linear(4, 4), "loader": live})
    assert len(list(live)) == len(loader) - 1, "the position is replayed: one batch was consumed"


def test_a_refused_restore_leaves_an_untracked_loader_untracked(tmp_path):
    """Restoring tracks a loader (it replays its position on the next iter()); a refused
    restore must leave it as it was, or its workers' seeds, and so the data, change."""
    url = str(tmp_path / "s")
    data = list(range(32))
    saved = ckpt.track(torch.utils.data.DataLoader(data, batch_size=4))
    ckpt.save(url, {"model": torch.nn.Linear(4, 4), "loader": saved}, step=1)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    other = torch.utils.data.DataLoader(data, batch_size=4)  # not in the checkpoint
    with pytest.raises(ckpt.StateMismatchError, match="model/weight"):
        ckpt.restore(url, {"model": torch.nn.Linear(3, 3), "loader": loader, "other": other}, strict=False)
    assert type(loader) is torch.utils.data.DataLoader and type(other) is torch.utils.data.DataLoader
    assert not hasattr(loader, "_ckpt_position")
    ckpt.restore(url, {"model": torch.nn.Linear(4, 4), "loader": loader, "other": other}, strict=False)
    assert type(loader) is not torch.utils.data.DataLoader, "a restore that fits tracks it"
    assert type(other) is torch.utils.data.DataLoader, "a loader the checkpoint does not hold is left alone"


FAILING_LOAD_PLUGIN = '''
import ckpt


class Box:
    def __init__(self):
        self.value = 0


class BoxAdapter:
    """A third party's adapter whose check() lets through what its load() refuses."""

    name = "fake.Box"

    def handles(self, obj):
        return isinstance(obj, Box)

    def state(self, obj):
        return {"value": obj.value}

    def check(self, obj, tree):
        pass

    def load(self, obj, tree):
        raise ckpt.StateMismatchError("fake.Box: refused in load")


@ckpt.hookimpl
def ckpt_register_adapters(register):
    register(BoxAdapter())
'''


def test_a_load_failing_after_the_live_objects_changed_says_so(tmp_path, fake_plugin):
    import importlib

    from ckpt.hooks.manager import get_plugins

    module = fake_plugin("ckpt-fake-box", FAILING_LOAD_PLUGIN)
    get_plugins()
    Box = importlib.import_module(module).Box
    url = str(tmp_path / "s")
    ckpt.save(url, {"model": torch.nn.Linear(64, 64), "box": Box()}, step=1)
    with pytest.raises(ckpt.StateMismatchError) as exc:
        ckpt.restore(url, {"model": torch.nn.Linear(64, 64), "box": Box()})
    msg = str(exc.value)
    assert "fake.Box: refused in load" in msg
    assert "the live objects began to take step 1" in msg and "'model'" in msg, msg
    assert "the tensors decoded in place" in msg, msg  # a local store: decoded into the live tensors
    # nothing had changed yet when the first load fails: said as it is
    with pytest.raises(ckpt.StateMismatchError) as exc:
        ckpt.restore(url, {"box": Box()})
    assert "began to take" not in str(exc.value)


class Scale:
    """A callable-object ``scale_fn``: CyclicLR saves (and loads into) its ``__dict__``."""

    def __init__(self, a: float) -> None:
        self.a = a

    def __call__(self, x: float) -> float:
        return 1.0 / (self.a * x + 1)


class Uncopyable(Warmup):
    """A lambda object whose state saves (its ``__dict__``) but that refuses copying."""

    def __reduce_ex__(self, protocol):
        raise TypeError("Uncopyable objects cannot be copied")


def test_a_cyclic_schedulers_scale_fn_is_left_and_an_uncopyable_lambda_still_loads(tmp_path):
    url = str(tmp_path / "s")

    def cyclic(a: float):
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
        return opt, torch.optim.lr_scheduler.CyclicLR(opt, 0.01, 0.1, scale_fn=Scale(a))

    opt, sched = cyclic(5.0)
    opt.step()
    sched.step()
    ckpt.save(url, {"sched": sched, "scaler": torch.amp.GradScaler("cpu")}, step=1)
    _, live = cyclic(1.0)
    with pytest.raises(ckpt.StateMismatchError, match="GradScaler"):
        ckpt.restore(url, {"sched": live, "scaler": torch.amp.GradScaler("cpu", enabled=False)})
    assert live._scale_fn_custom.a == 1.0, "the live scale_fn took the checkpoint's"

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    lam = torch.optim.lr_scheduler.LambdaLR(opt, Uncopyable(3.0))
    ckpt.save(str(tmp_path / "u"), {"sched": lam}, step=1)
    live_lam = torch.optim.lr_scheduler.LambdaLR(opt, Uncopyable(1.0))
    ckpt.restore(str(tmp_path / "u"), {"sched": live_lam})  # torch's own load takes it: so must ckpt's check
    assert live_lam.lr_lambdas[0].k == 3.0


FAILING_LOAD_OWN_ERROR = FAILING_LOAD_PLUGIN.replace(
    '        raise ckpt.StateMismatchError("fake.Box: refused in load")',
    """        class BoxError(ckpt.StateMismatchError):
            def __init__(self, key, detail):
                super().__init__(f"{key}: {detail}")

        raise BoxError("fake.Box", "refused in load")""",
)


def test_a_late_load_failure_of_an_error_class_built_otherwise_is_still_a_checkpoint_error(tmp_path, fake_plugin):
    """Rewording the error by its own class failed on one whose __init__ takes other
    arguments: a TypeError reached the caller instead."""
    import importlib

    from ckpt.hooks.manager import get_plugins

    assert FAILING_LOAD_OWN_ERROR != FAILING_LOAD_PLUGIN
    module = fake_plugin("ckpt-fake-box2", FAILING_LOAD_OWN_ERROR)
    get_plugins()
    Box = importlib.import_module(module).Box
    url = str(tmp_path / "s")
    ckpt.save(url, {"model": torch.nn.Linear(64, 64), "box": Box()}, step=1)
    with pytest.raises(ckpt.StateMismatchError, match="fake.Box: refused in load .*may hold it already") as exc:
        ckpt.restore(url, {"model": torch.nn.Linear(64, 64), "box": Box()})
    assert type(exc.value.__cause__).__name__ == "BoxError"
