"""ckpt-lightning: listed as a plugin; Lightning's checkpoint dict round-trips exactly through an
asynchronous save; save_top_k and remove_checkpoint prune the store; paths, "last" and
map_location resolve as Lightning expects; the store is an ordinary ckpt store."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from click.testing import CliRunner
from train_script import Net, make_loader, make_trainer

import ckpt
from ckpt.cli import build_cli
from ckpt.testing import assert_same_state, clone_state, get_plugins
from ckpt_lightning import CkptCheckpointIO
from ckpt_lightning.paths import MARKER_NAME


class RecordingIO(CkptCheckpointIO):
    """Keeps a copy of every dict Lightning hands over, taken before the save call returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.saved: dict[str, dict[str, Any]] = {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.saved[str(path)] = clone_state(checkpoint)
        super().save_checkpoint(checkpoint, path, storage_options)


def cli(*args: str) -> str:
    result = CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def fit(trainer: L.Trainer, ckpt_path: str | None = None, loader: str = "stateful") -> Net:
    L.seed_everything(1234, verbose=False)
    data = make_loader(loader)
    model = Net()
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model


# -- the plugin -------------------------------------------------------------------------------


def test_plugin_is_listed_by_ckpt_plugins():
    infos = {p.name: p for p in get_plugins().info()}
    assert "ckpt-lightning" in infos, sorted(infos)
    import ckpt_lightning

    assert infos["ckpt-lightning"].version == ckpt_lightning.__version__
    assert infos["ckpt-lightning"].hooks == ("ckpt_after_commit",)
    (ep,) = [ep for ep in entry_points(group="ckpt") if ep.name == "ckpt-lightning"]
    assert ep.value == "ckpt_lightning" and ep.dist is not None and ep.dist.name == "ckpt-lightning"
    names = [p["name"] for p in json.loads(cli("plugins", "--json"))["plugins"]]
    assert "ckpt-lightning" in names


def test_with_its_hook_disabled_pruning_and_the_marker_wait_for_teardown(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_DISABLE_PLUGINS", "ckpt-lightning")
    assert "ckpt-lightning" not in {p.name for p in get_plugins().info()}
    url = f"file://{tmp_path}/store"
    fit(make_trainer(url, str(tmp_path / "ck"), max_steps=7, every=2, top_k=1))
    assert ckpt.steps(url) == [6]
    assert (tmp_path / "ck" / MARKER_NAME).is_file()


def test_loading_the_plugin_does_not_import_lightning():
    code = "import sys, ckpt; from ckpt.testing import get_plugins; get_plugins(); print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


# -- save and load ------------------------------------------------------------------------------


def test_every_checkpoint_loads_back_as_the_dict_lightning_saved(store_url, tmp_path):
    io = RecordingIO(store_url)
    fit(make_trainer(store_url, str(tmp_path / "ck"), max_steps=7, every=3, save_last=True, io=io))
    assert ckpt.steps(store_url) == [3, 6]
    paths = sorted(io.saved)
    assert [Path(p).name for p in paths] == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "last.ckpt"]
    manifest = ckpt.read_manifest(store_url, 6)
    # the optimizer went in as the live object: guarded, staged in the background
    assert manifest.adapters["optimizer_states/0"] == "torch.optim.Optimizer"
    # "last.ckpt", saved right after the top-k checkpoint of step 6, only names it: one commit
    assert manifest.seq == ckpt.read_manifest(store_url, 3).seq + 1  # type: ignore[operator]
    for path in paths:
        loaded, saved = io.load_checkpoint(path), io.saved[path]
        if Path(path).name == "last.ckpt":  # all but ModelCheckpoint's own state (its last_model_path)
            loaded.pop("callbacks"), saved.pop("callbacks")
        assert_same_state(loaded, saved)
    io.teardown()


def test_a_weights_only_save_names_the_full_checkpoint_of_its_step(tmp_path):
    url, ck_dir = f"file://{tmp_path}/store", tmp_path / "ck"
    trainer = make_trainer(url, str(ck_dir), max_steps=4, every=4)
    model = fit(trainer)
    trainer.save_checkpoint(str(ck_dir / "weights.ckpt"), weights_only=True)  # after fit, same step
    io = trainer.strategy.checkpoint_io
    io.teardown()
    assert ckpt.steps(url) == [4]
    full = io.load_checkpoint(ck_dir / "weights.ckpt")
    assert "optimizer_states" in full  # the full checkpoint of step 4 was not replaced
    assert_same_state(full["state_dict"], clone_state(model.state_dict()))

    # once the weights changed, a weights-only save is a checkpoint of its own
    with torch.no_grad():
        model.net[0].weight.add_(1.0)
    trainer.save_checkpoint(str(ck_dir / "changed.ckpt"), weights_only=True)
    io.teardown()
    changed = io.load_checkpoint(ck_dir / "changed.ckpt")
    assert "optimizer_states" not in changed and "loops" in changed
    assert_same_state(changed["state_dict"], clone_state(model.state_dict()))
    # Lightning loads it for evaluation; reading takes no writer lease
    tester = make_trainer(url, str(ck_dir), io=io)
    tester.validate(Net(), make_loader(), ckpt_path=str(ck_dir / "changed.ckpt"), verbose=False)
    assert io._ck is None


def test_save_returns_before_the_next_step_can_change_what_it_saved(tmp_path):
    url = f"file://{tmp_path}/store"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)

    def train_step() -> None:
        model(torch.randn(16, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    io = CkptCheckpointIO(url)
    train_step()
    checkpoint = {"global_step": 1, "state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}
    expected = clone_state(checkpoint)
    io.save_checkpoint(checkpoint, tmp_path / "ck" / "a.ckpt")
    for _ in range(3):  # the optimizer waits for the background copy; BatchNorm's buffers were copied
        train_step()
    loaded = io.load_checkpoint(tmp_path / "ck" / "a.ckpt")
    assert_same_state({k: loaded[k] for k in expected}, expected)
    assert not torch.equal(loaded["state_dict"]["0.weight"], model.state_dict()["0.weight"])
    io.teardown()


def test_save_top_k_and_remove_checkpoint_prune_the_store(tmp_path):
    url = f"file://{tmp_path}/store"
    trainer = make_trainer(
        url, str(tmp_path / "ck"), max_steps=10, every=1, top_k=2, monitor="train_loss", save_last=True
    )
    fit(trainer)
    mc = trainer.checkpoint_callback
    io = CkptCheckpointIO(url)
    kept = sorted(io._resolve(p) for p in mc.best_k_models)
    assert len(kept) == 2 and ckpt.steps(url) == sorted({*kept, 10})
    # a new process knows the live paths (the latest manifest's record, less deleted steps)
    assert set(io._paths().paths) == {*mc.best_k_models, mc.last_model_path}
    # nothing but the kept checkpoints' objects is left
    gc = json.loads(cli("gc", url, "--keep-last", "3", "--grace-seconds", "0", "--dry-run", "--json"))
    assert gc["removed_steps"] == [] and gc["removed_objects"] == 0, gc

    # save_top_k=1 (the default): only the newest remains; remove_checkpoint of a path forgets it
    url1 = f"file://{tmp_path}/store1"
    fit(make_trainer(url1, str(tmp_path / "ck1"), max_steps=7, every=2, top_k=1))
    assert ckpt.steps(url1) == [6]
    io1 = CkptCheckpointIO(url1)
    io1.remove_checkpoint(str(tmp_path / "ck1" / "epoch=1-step=6.ckpt"))
    assert io1._paths().paths == {}
    io1.teardown()
    assert ckpt.steps(url1) == [6]  # the store's latest checkpoint is always kept


class Config:
    """A hyper-parameter object (module level: Lightning drops hyper-parameters it cannot pickle)."""


class WithObject(Net):
    def __init__(self, cfg: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters()


def test_unstorable_hyper_parameter_names_its_key(tmp_path):
    url = f"file://{tmp_path}/store"
    trainer = make_trainer(url, str(tmp_path / "ck"), max_steps=3, every=3)
    with pytest.raises(ckpt.UnsupportedValueError, match=r"hyper_parameters/cfg") as err:
        trainer.fit(WithObject(Config()), make_loader())
    assert "epoch=0-step=3.ckpt" in str(err.value)


def test_load_honours_map_location(tmp_path):
    url = f"file://{tmp_path}/store"
    fit(make_trainer(url, str(tmp_path / "ck"), max_steps=3, every=3))
    io = CkptCheckpointIO(url)
    on_meta = io.load_checkpoint(io.path(3), map_location="meta")
    assert on_meta["state_dict"]["net.0.weight"].device.type == "meta"
    assert on_meta["optimizer_states"][0]["state"][0]["exp_avg"].device.type == "meta"
    same = io.load_checkpoint(io.path(3), map_location=lambda storage, loc: storage)
    assert same["state_dict"]["net.0.weight"].device.type == "cpu"
    io.teardown()


# -- paths, "last" and resuming -------------------------------------------------------------------


def test_resume_by_generated_path_step_path_and_last(tmp_path):
    url, ck_dir = f"file://{tmp_path}/store", tmp_path / "ck"
    fit(make_trainer(url, str(ck_dir), max_steps=7, every=3))
    marker = json.loads((ck_dir / MARKER_NAME).read_text())
    assert marker["url"] == url and marker["checkpoint"] == "latest"

    # a new process resolves the path ModelCheckpoint generated from the store's own record
    trainer = make_trainer(url, str(ck_dir), max_steps=8, every=3)
    fit(trainer, ckpt_path=str(ck_dir / "epoch=0-step=3.ckpt"))
    assert trainer.global_step == 8
    assert ckpt.latest_step(url) == 6 and ckpt.read_manifest(url, 6).parent == 3  # lineage: 6 continues 3

    trainer = make_trainer(url, str(ck_dir), max_steps=9, every=3)
    fit(trainer, ckpt_path=CkptCheckpointIO(url).path(6))
    assert trainer.global_step == 9 and ckpt.steps(url) == [3, 6, 9]

    trainer = make_trainer(url, str(ck_dir), max_steps=10, every=5)
    fit(trainer, ckpt_path="last")  # Lightning finds the marker, the marker names the latest: 9
    assert trainer.global_step == 10 and ckpt.read_manifest(url, 10).parent == 9

    with pytest.raises(ckpt.CheckpointError, match="points at the ckpt store"):
        CkptCheckpointIO(f"file://{tmp_path}/other").load_checkpoint(ck_dir / MARKER_NAME)
    with pytest.raises(ckpt.CheckpointError, match="names no checkpoint"):
        CkptCheckpointIO(url).load_checkpoint(ck_dir / "epoch=0-whatever.ckpt")


def _process_rngs() -> tuple[Any, torch.Tensor, Any]:
    import numpy as np

    return random.getstate(), torch.get_rng_state(), np.random.get_state()


def _assert_same_rngs(a: tuple[Any, torch.Tensor, Any], b: tuple[Any, torch.Tensor, Any]) -> None:
    assert a[0] == b[0], "Python's random changed"
    assert torch.equal(a[1], b[1]), "torch's RNG changed"
    assert a[2][0] == b[2][0] and np_equal(a[2][1], b[2][1]) and a[2][2:] == b[2][2:], "NumPy's RNG changed"


def np_equal(a: Any, b: Any) -> bool:
    import numpy as np

    return bool(np.array_equal(a, b))


@pytest.mark.parametrize("every", [3, 5], ids=["mid-epoch", "epoch-end"])
def test_a_resume_lightning_refuses_changes_no_rng_and_the_model_as_its_own_io_does(tmp_path, every):
    """A module whose layers have other shapes: Lightning refuses the checkpoint after
    load_checkpoint returned. The process RNGs (Python, NumPy, torch) end as they were, as
    with Lightning's own TorchCheckpointIO (which restores none), and the model as that IO
    leaves it (torch's load_state_dict copies the tensors whose shapes match before it
    reports the others: Lightning's doing, the same with any CheckpointIO)."""
    import numpy as np
    from lightning.pytorch.callbacks import ModelCheckpoint

    url, ck_dir, torch_dir = f"file://{tmp_path}/store", tmp_path / "ck", tmp_path / "torch"
    fit(make_trainer(url, str(ck_dir), max_steps=every, every=every))  # 5 steps an epoch
    assert ckpt.steps(url) == [every]
    # the same run, checkpointed by Lightning's default TorchCheckpointIO
    fit(
        L.Trainer(
            max_steps=every,
            callbacks=[ModelCheckpoint(dirpath=torch_dir, every_n_train_steps=every, save_top_k=-1)],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
            default_root_dir=tmp_path,
        )
    )
    (torch_path,) = torch_dir.glob("*.ckpt")
    saved = ckpt.load(url, step=every)["state_dict"]
    refused = [k for k, t in Net(width=16).state_dict().items() if t.shape != saved[k].shape]
    assert len(refused) == 5  # all but net.5.bias, which torch copies before it raises

    left: dict[str, dict[str, torch.Tensor]] = {}
    for io in ("ckpt", "torch"):
        random.seed(7)
        np.random.seed(7)
        torch.manual_seed(7)
        other = Net(width=16)  # net.0 is (16, 8), the checkpoint's (32, 8)
        data = make_loader()
        weights, before = clone_state(other.state_dict()), _process_rngs()
        if io == "ckpt":
            trainer = make_trainer(url, str(ck_dir), max_steps=every + 2, every=every)
            path = "last"
        else:
            trainer = L.Trainer(
                max_steps=every + 2,
                logger=False,
                enable_progress_bar=False,
                accelerator="cpu",
                default_root_dir=tmp_path,
            )
            path = str(torch_path)
        with pytest.raises(RuntimeError, match="size mismatch for net.0.weight"):
            trainer.fit(other, data, ckpt_path=path)
        _assert_same_rngs(_process_rngs(), before)
        left[io] = clone_state(other.state_dict())
        assert all(torch.equal(left[io][k], weights[k]) for k in refused)
        if io == "ckpt":  # nothing left armed that a later step would apply
            assert not trainer.strategy.checkpoint_io._rng.armed
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1).step()
            _assert_same_rngs(_process_rngs(), before)
    assert_same_state(left["ckpt"], left["torch"])


def test_a_successful_load_applies_the_rng_states_and_keeps_them(tmp_path):
    """The states applied at load stay once training resumed (the first optimizer step),
    and after a run ending without an error, even one that never stepped."""
    url, ck_dir = f"file://{tmp_path}/store", tmp_path / "ck"
    fit(make_trainer(url, str(ck_dir), max_steps=5, every=5))
    io = CkptCheckpointIO(url)
    saved = ckpt.load(url, step=5)["ckpt_lightning"]["rng"]
    torch.manual_seed(7)
    io.load_checkpoint(io.path(5))
    assert torch.equal(torch.get_rng_state(), saved["torch"])
    io.teardown()  # no exception being handled: a run that ended
    assert torch.equal(torch.get_rng_state(), saved["torch"])

    torch.manual_seed(7)
    io.load_checkpoint(io.path(5))
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1).step()  # training resumed
    after_step = torch.get_rng_state()
    try:
        raise ValueError("a failure in training, after the load")
    except ValueError:
        io.teardown()
    assert torch.equal(torch.get_rng_state(), after_step)


def test_the_tuner_restoring_its_own_checkpoint_keeps_its_rng_states(tmp_path, monkeypatch):
    """Lightning's learning-rate finder saves a checkpoint, trains a few steps, loads the
    checkpoint back and ends its fit with an exception it swallows: not a failed run, so
    the states loaded stay (the process RNGs are as at the tuner's save)."""
    from lightning.pytorch.tuner import Tuner

    monkeypatch.chdir(tmp_path)  # the tuner saves its checkpoint under the trainer's root directory, the cwd
    url = f"file://{tmp_path}/store"
    trainer = make_trainer(url, str(tmp_path / "ck"), max_steps=20, every=50)
    L.seed_everything(1234, verbose=False)
    Tuner(trainer).lr_find(Net(), train_dataloaders=make_loader("plain"), num_training=3)
    (step,) = ckpt.steps(url)
    saved = ckpt.load(url, step=step)["ckpt_lightning"]["rng"]
    assert torch.equal(torch.get_rng_state(), saved["torch"])
    assert random.getstate() == saved["python"]


def test_rng_states_that_do_not_fit_change_none_of_the_rngs(tmp_path):
    url = f"file://{tmp_path}/store"
    io = CkptCheckpointIO(url)
    random.seed(3)
    torch.manual_seed(3)
    before = _process_rngs()
    bad = {"python": random.Random(5).getstate(), "torch": torch.zeros(3, dtype=torch.uint8)}
    with pytest.raises(ckpt.StateMismatchError, match="RNG states"):
        io._restore_rng({}, {"rng": bad}, "x")
    _assert_same_rngs(_process_rngs(), before)
    io.teardown()


def test_last_without_any_checkpoint_starts_fresh(tmp_path):
    url = f"file://{tmp_path}/store"
    trainer = make_trainer(url, str(tmp_path / "ck"), max_steps=3, every=3)
    with pytest.warns(UserWarning, match="no last checkpoint"):
        fit(trainer, ckpt_path="last")
    assert trainer.global_step == 3 and ckpt.steps(url) == [3]


def test_the_store_is_an_ordinary_ckpt_store(store_url, tmp_path):
    fit(make_trainer(store_url, str(tmp_path / "ck"), max_steps=6, every=3))
    assert "3" in cli("ls", store_url) and "latest" in cli("ls", store_url)
    shown = json.loads(cli("show", store_url, "--step", "6", "--json"))
    assert shown["step"] == 6
    verified = json.loads(cli("verify", store_url, "--json"))
    assert verified["ok"], verified
    assert verified["steps"] == [3, 6]
    diff = json.loads(cli("diff", store_url, "3", "6", "--json"))
    assert "state_dict/net.0.weight" in {c["tensor"] for c in diff["changed"]}
    assert not diff["added"] and not diff["removed"]
