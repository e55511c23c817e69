"""Round trips: every built-in adapter, tensors of every dtype, NumPy, JSON values, and
training that resumes bit-identically after a restore. Each runs on every store kind.
What a store must do (dedup, refs, damage) is in tests/storage/test_store_conformance.py."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import ckpt
from ckpt.testing import AdapterConformance, assert_same_state, clone_state, make_training_state, tensor_bits

# -- the conformance suite, applied to the built-in adapters ------------------------------


class _OnEveryStore:
    @pytest.fixture
    def conformance_url(self, store_url):
        return store_url


def _step_model(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        for _, b in model.named_buffers():
            if b.is_floating_point():
                b.mul_(1.5).add_(0.25)
            else:
                b.add_(3)


class TestModuleConformance(_OnEveryStore, AdapterConformance):
    adapter_name = "torch.nn.Module"

    @pytest.fixture
    def make_object(self):
        return lambda: torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))

    @pytest.fixture
    def mutate(self):
        return _step_model


def _sgd_step(opt: torch.optim.Optimizer) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    sum((p * torch.arange(p.numel()).reshape(p.shape)).sum() for p in params).backward()
    opt.step()
    opt.zero_grad()


class TestOptimizerConformance(_OnEveryStore, AdapterConformance):
    adapter_name = "torch.optim.Optimizer"

    @pytest.fixture(params=["adamw", "sgd"])
    def make_object(self, request):
        def make():
            model = torch.nn.Linear(4, 3)
            if request.param == "adamw":
                return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
            return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)

        return make

    @pytest.fixture
    def mutate(self):
        return _sgd_step


class TestGeneratorConformance(_OnEveryStore, AdapterConformance):
    adapter_name = "torch.Generator"

    @pytest.fixture
    def make_object(self):
        return lambda: torch.Generator().manual_seed(7)

    @pytest.fixture
    def mutate(self):
        return lambda g: torch.rand(11, generator=g)


class TestRNGConformance(_OnEveryStore, AdapterConformance):
    adapter_name = "ckpt.RNG"

    @pytest.fixture
    def make_object(self):
        return ckpt.RNG

    @pytest.fixture
    def mutate(self):
        def draw(_rng):
            random.random()
            np.random.rand(3)
            torch.rand(3)

        return draw


class TestSchedulerConformance(_OnEveryStore, AdapterConformance):
    adapter_name = "torch.optim.lr_scheduler"

    @pytest.fixture
    def make_object(self):
        def make():
            opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=50)

        return make

    @pytest.fixture
    def mutate(self):
        def step(sched):
            sched.optimizer.step()
            sched.step()

        return step


# -- adapters, one by one ------------------------------------------------------------------


def _train_steps(model, opt, n, *, sched=None, scaler=None, width=8):
    for _ in range(n):
        loss = model(torch.randn(4, width)).square().mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def test_module_buffers_and_tied_weights(store_url):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Embedding(10, 6)
            self.norm = torch.nn.BatchNorm1d(6)
            self.dec = torch.nn.Linear(6, 10, bias=False)
            self.dec.weight = self.enc.weight

        def forward(self, x):
            return self.dec(self.norm(self.enc(x)))

    torch.manual_seed(0)
    model = Tied()
    model(torch.randint(0, 10, (16,))).sum().backward()  # BatchNorm running stats move
    assert int(model.norm.num_batches_tracked) == 1
    expected = clone_state(model.state_dict())
    ckpt.save(store_url, {"model": model}, step=1)

    torch.manual_seed(1)
    fresh = Tied()
    weight_before = fresh.enc.weight
    ckpt.restore(store_url, {"model": fresh})
    assert_same_state(clone_state(fresh.state_dict()), expected)
    assert fresh.dec.weight is fresh.enc.weight, "tied weights must stay tied"
    assert fresh.enc.weight is weight_before, "restore loads into the existing parameters"
    assert torch.equal(fresh.norm.running_var, model.norm.running_var)

    # both names of the tied weight are kept, as one stored object
    manifest_tensors = ckpt.read_manifest(store_url, 1).tensors
    assert manifest_tensors["model/enc.weight"].chunks == manifest_tensors["model/dec.weight"].chunks


@pytest.mark.parametrize("kind", ["sgd_momentum", "adamw"])
def test_optimizer_state_keyed_by_int(store_url, kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))

    def make_opt(m):
        if kind == "adamw":
            return torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.8, 0.99))
        return torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9, nesterov=True)

    opt = make_opt(model)
    _train_steps(model, opt, 3)
    expected = clone_state(opt.state_dict())
    assert set(expected["state"]) == {0, 1, 2, 3}
    ckpt.save(store_url, {"optim": opt}, step=3)

    loaded = ckpt.load(store_url)["optim"]
    assert set(loaded["state"]) == {0, 1, 2, 3}, "optimizer state keys must come back as ints"
    assert_same_state(loaded, expected)
    if kind == "adamw":
        assert isinstance(loaded["param_groups"][0]["betas"], tuple)

    fresh_opt = make_opt(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)))
    ckpt.restore(store_url, {"optim": fresh_opt})
    assert_same_state(clone_state(fresh_opt.state_dict()), expected)


@pytest.mark.parametrize("kind", ["step", "onecycle", "cosine", "plateau"])
def test_lr_schedulers(store_url, kind):
    def make():
        opt = torch.optim.SGD(torch.nn.Linear(3, 3).parameters(), lr=0.1, momentum=0.9)
        S = torch.optim.lr_scheduler
        if kind == "step":
            return opt, S.StepLR(opt, step_size=2, gamma=0.5)
        if kind == "onecycle":
            return opt, S.OneCycleLR(opt, max_lr=1.0, total_steps=40)
        if kind == "cosine":
            return opt, S.CosineAnnealingLR(opt, T_max=7, eta_min=1e-4)
        return opt, S.ReduceLROnPlateau(opt, patience=1, factor=0.3)

    def advance(opt, sched, n, start):
        lrs = []
        for i in range(start, start + n):
            opt.step()
            if kind == "plateau":
                sched.step(1.0 if i < 2 else 5.0 + i)  # gets worse: lr drops
            else:
                sched.step()
            lrs.append([g["lr"] for g in opt.param_groups])
        return lrs

    opt, sched = make()
    advance(opt, sched, 5, 0)
    expected = clone_state(sched.state_dict())
    ckpt.save(store_url, {"optim": opt, "sched": sched}, step=5)
    later = advance(opt, sched, 4, 5)

    opt2, sched2 = make()
    ckpt.restore(store_url, {"optim": opt2, "sched": sched2})
    assert_same_state(clone_state(sched2.state_dict()), expected)
    assert advance(opt2, sched2, 4, 5) == later
    if kind == "plateau":
        assert later[-1][0] < 0.1, "the plateau scheduler should have reduced the lr"


@pytest.mark.parametrize("enabled", [True, False])
def test_grad_scaler(store_url, enabled):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2, enabled=enabled)
    _train_steps(model, opt, 3, scaler=scaler)
    expected = scaler.state_dict()
    if enabled:
        assert expected["scale"] == 2048.0 and expected["_growth_tracker"] == 1
    else:
        assert expected == {}
    ckpt.save(store_url, {"scaler": scaler}, step=1)

    fresh = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=100, enabled=enabled)
    ckpt.restore(store_url, {"scaler": fresh})
    assert_same_state(fresh.state_dict(), expected)
    if enabled:
        assert fresh.get_scale() == 2048.0


def test_torch_generator(store_url):
    g = torch.Generator().manual_seed(1234)
    torch.rand(5, generator=g)
    ckpt.save(store_url, {"gen": g}, step=1)
    expected = torch.rand(100, generator=g)

    fresh = torch.Generator().manual_seed(99)
    ckpt.restore(store_url, {"gen": fresh})
    assert torch.equal(torch.rand(100, generator=fresh), expected)


def test_process_rngs(store_url):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)
    ckpt.save(store_url, {"rng": ckpt.RNG()}, step=1)

    def draw():
        return (
            [random.random() for _ in range(5)] + [random.getrandbits(64)],
            np.random.rand(5).tobytes(),
            tensor_bits(torch.randn(5)),
        )

    expected = draw()
    random.seed(100)
    np.random.seed(100)
    torch.manual_seed(100)
    assert draw() != expected
    ckpt.restore(store_url, {"rng": ckpt.RNG()})
    assert draw() == expected


# -- tensors, NumPy and JSON values -----------------------------------------------------------

DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


def _sample(dtype: torch.dtype, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(shape, generator=g, dtype=dtype)
        if t.numel() >= 4 and not dtype.is_complex:
            flat = t.view(-1)
            flat[0], flat[1], flat[2], flat[3] = float("nan"), float("inf"), float("-inf"), -0.0
        return t
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), shape, generator=g, dtype=dtype)


def _tensor_zoo():
    zoo = {}
    for i, dtype in enumerate(DTYPES):
        name = str(dtype).removeprefix("torch.")
        zoo[name] = _sample(dtype, (33, 7), i)
        zoo[f"{name}_scalar"] = _sample(dtype, (), 100 + i)
        zoo[f"{name}_empty"] = _sample(dtype, (0, 3), 200 + i)
    base = torch.randn(10, 12, generator=torch.Generator().manual_seed(5))
    zoo["transposed"] = base.t()  # non-contiguous
    zoo["strided"] = base[::3, 1::2]  # non-contiguous, offset into a bigger storage
    zoo["slice"] = base[2:4]  # contiguous view with a storage offset
    zoo["conj"] = torch.randn(4, 4, dtype=torch.complex64).conj()  # lazy conjugate bit
    zoo["expanded"] = torch.arange(3.0).expand(4, 3)  # stride 0
    zoo["nan_payloads"] = torch.tensor([0x7FC00001, 0xFFC12345 - 2**32, 0x00000001], dtype=torch.int32).view(
        torch.float32
    )
    return zoo


def test_tensors_of_every_dtype(store_url):
    zoo = _tensor_zoo()
    expected = clone_state(zoo)
    info = ckpt.save(store_url, {"t": zoo}, step=1)
    assert info.raw_bytes == sum(t.numel() * t.element_size() for t in zoo.values())

    loaded = ckpt.load(store_url)["t"]
    assert_same_state(loaded, expected)
    for name, t in loaded.items():
        assert t.is_contiguous() and not t.is_conj(), name

    # restore in place: contiguous destinations keep their memory, views get the values
    live = {k: torch.zeros_like(v) for k, v in zoo.items() if k != "expanded"}
    live["transposed"] = torch.zeros(10, 12).t()
    live["conj"] = torch.zeros(4, 4, dtype=torch.complex64).conj()
    ptrs = {k: v.data_ptr() for k, v in live.items()}
    state = {"t": dict(live)}
    with pytest.raises(ckpt.StateMismatchError):  # 'expanded' is in the checkpoint, so allowed...
        ckpt.restore(store_url, {"t": {**live, "extra": torch.zeros(1)}})  # ...but 'extra' is not
    ckpt.restore(store_url, state)
    for k, v in state["t"].items():
        assert v is live[k]
        assert v.data_ptr() == ptrs[k]
        assert_same_state(v, expected[k], k)


def test_numpy_arrays(store_url):
    rs = np.random.RandomState(0)
    arrays = {
        "f32": rs.randn(5, 4).astype(np.float32),
        "f16": rs.randn(9).astype(np.float16),
        "f64_fortran": np.asfortranarray(rs.randn(3, 5)),
        "i16": rs.randint(-1000, 1000, size=(7,)).astype(np.int16),
        "u8": rs.randint(0, 255, size=(2, 2, 2)).astype(np.uint8),
        "bool": rs.rand(6) > 0.5,
        "c128": rs.randn(3) + 1j * rs.randn(3),
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 4), dtype=np.int64),
        "strided": rs.randn(6, 6)[::2, ::3],
    }
    expected = {k: v.copy() for k, v in arrays.items()}
    ckpt.save(store_url, {"np": arrays, "mixed": [arrays["f32"], torch.ones(2)]}, step=1)
    loaded = ckpt.load(store_url)
    assert_same_state(loaded["np"], expected)
    assert isinstance(loaded["mixed"][0], np.ndarray) and isinstance(loaded["mixed"][1], torch.Tensor)

    state = {"np": {k: np.zeros_like(v) for k, v in arrays.items()}}
    ckpt.restore(store_url, state)
    assert_same_state(state["np"], expected)


def _json_values():
    return {
        "int": 3,
        "big": 2**70,
        "neg": -5,
        "float": 0.1,
        "negzero": -0.0,
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": float("-inf"),
        "none": None,
        "flag": True,
        "text": "ünï/cödé ~0 ~1",
        "tuple": (1, (2.5, "x"), [3, (4,)]),
        "empty": {"list": [], "tuple": (), "dict": {}},
        "int_keys": {0: "a", 1: {2: [float("nan")]}, -7: None},
        "mixed_keys": {"a": 1, 5: "five", 2.5: "float key", None: "none key", True: "bool key"},
        "dollar": {"$tensor": "not a tensor", "$map": [1, 2]},
        "slash/key": {"a/b": 1, "~": 2},
        "dtype": torch.bfloat16,
        "bytes": b"\x00\xffraw",
        "np_scalars": [np.float32(1.5), np.int64(-3), np.bool_(True)],
    }


def test_json_values(store_url):
    values = _json_values()
    ckpt.save(store_url, {"cfg": values, "epoch": 4}, step=1)
    expected = dict(values)  # NumPy scalars come back as NumPy scalars of their dtype
    loaded = ckpt.load(store_url)
    assert_same_state(loaded["cfg"], expected)
    assert loaded["epoch"] == 4

    state = {"cfg": {"int": 0}, "epoch": 0}
    ckpt.restore(store_url, state)
    assert state["epoch"] == 4
    assert state["cfg"]["int"] == 3 and set(state["cfg"]) == {"int"}, "restore fills the keys the live state has"


def test_load_returns_plain_trees(store_url):
    state = make_training_state()
    expected_model = clone_state(state["model"].state_dict())
    expected_optim = clone_state(state["optim"].state_dict())
    ckpt.save(store_url, state, step=2)

    tree = ckpt.load(store_url)
    assert type(tree) is dict and set(tree) == {"model", "optim", "sched", "rng"}
    assert type(tree["model"]) is dict and list(tree["model"]) == list(expected_model)
    assert_same_state(tree["model"], expected_model)
    assert_same_state(tree["optim"], expected_optim)
    assert tree["sched"]["last_epoch"] == 2
    assert set(tree["rng"]) >= {"python", "torch", "numpy"}

    def plain(x):
        if isinstance(x, dict):
            return all(plain(k) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, np.ndarray))

    assert plain(tree), "load must build nothing but plain values and tensors"

    # the plain trees load into live objects with torch's own API
    other = make_training_state(seed=5)
    other["model"].load_state_dict(tree["model"])
    other["optim"].load_state_dict(tree["optim"])
    assert_same_state(clone_state(other["optim"].state_dict()), expected_optim)

    meta = ckpt.load(store_url, map_location="meta")
    assert all(t.device.type == "meta" for t in meta["model"].values())
    assert meta["model"]["0.weight"].shape == expected_model["0.weight"].shape
    cpu = ckpt.load(store_url, map_location=torch.device("cpu"), step=2)
    assert_same_state(cpu["model"], expected_model)


def test_load_and_restore_a_chosen_step(store_url):
    for step, value in ((10, 1.0), (20, 2.0), (30, 3.0)):
        ckpt.save(store_url, {"x": torch.tensor([value])}, step=step)
    assert ckpt.load(store_url)["x"].item() == 3.0
    assert ckpt.load(store_url, step=10)["x"].item() == 1.0
    live = {"x": torch.zeros(1)}
    assert ckpt.restore(store_url, live, step=20).step == 20 and live["x"].item() == 2.0
    with pytest.raises(ckpt.NoCheckpointError, match="step 15"):
        ckpt.load(store_url, step=15)


def test_local_path_url(tmp_path):
    path = str(tmp_path / "plain path")
    info = ckpt.save(path, {"x": torch.arange(5)}, step=0)
    assert info.step == 0
    assert torch.equal(ckpt.load(path)["x"], torch.arange(5))
    assert torch.equal(ckpt.load(f"file://{path}")["x"], torch.arange(5))


# -- training resumes bit-identically ----------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(12, 32),
            torch.nn.BatchNorm1d(32),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.3),
            torch.nn.Linear(32, 3),
        )

    def forward(self, x):
        return self.body(x)


def _make_run(seed: int):
    torch.manual_seed(seed)
    model = _Net()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=100)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=3)
    data_gen = torch.Generator().manual_seed(seed + 1)
    return {
        "model": model,
        "optim": opt,
        "sched": sched,
        "scaler": scaler,
        "data": data_gen,
        "rng": ckpt.RNG(),
        "epoch": 0,
    }


def _train(run, steps: int):
    """A step draws from every RNG: data generator, torch (dropout), NumPy and Python."""
    model, opt, sched, scaler = run["model"], run["optim"], run["sched"], run["scaler"]
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 12, generator=run["data"])
        x = x + torch.from_numpy(np.random.standard_normal((16, 12)).astype(np.float32)) * 0.01
        target = torch.tensor([random.randrange(3) for _ in range(16)])
        loss = torch.nn.functional.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sched.step()
        run["epoch"] += 1
        losses.append(tensor_bits(loss))
    return losses


def test_resumed_training_is_bit_identical(store_url):
    run = _make_run(0)
    _train(run, 4)
    ckpt.save(store_url, run, step=4)
    expected_losses = _train(run, 5)
    expected_params = clone_state(run["model"].state_dict())
    expected_optim = clone_state(run["optim"].state_dict())

    resumed = _make_run(42)  # fresh objects, different init and different RNG positions
    random.seed(7)
    np.random.seed(7)
    _train(resumed, 1)
    ckpt.restore(store_url, resumed)
    assert resumed["epoch"] == 4
    assert _train(resumed, 5) == expected_losses
    assert_same_state(clone_state(resumed["model"].state_dict()), expected_params)
    assert_same_state(clone_state(resumed["optim"].state_dict()), expected_optim)
    assert resumed["scaler"].state_dict() == run["scaler"].state_dict()
    assert math.isclose(resumed["sched"].get_last_lr()[0], run["sched"].get_last_lr()[0], rel_tol=0, abs_tol=0)


def test_checkpoint_info_is_plain_data(tmp_path):
    """Plugins and users copy, pickle and serialise CheckpointInfo (after_commit hooks do)."""
    import copy
    import dataclasses
    import json
    import pickle

    info = ckpt.save(str(tmp_path / "s"), {"x": torch.randn(1000)}, step=3)
    assert info.write_stats.objects_written == 1 and info.write_stats.raw_bytes == 4000
    assert copy.deepcopy(info) == info
    assert pickle.loads(pickle.dumps(info)) == info
    doc = json.loads(json.dumps(dataclasses.asdict(info), default=str))
    assert doc["write_stats"]["written_bytes"] == info.write_stats.written_bytes
