"""ckpt-transformers: listed by ``ckpt plugins``; a CkptTrainer's store is an ordinary ckpt
store (ls/show/verify/diff), exports to a folder ``from_pretrained`` loads, prunes to
``save_total_limit``, resumes from a chosen step bit-exact, and refuses what it cannot
store or resume exactly with errors that say why.

Training runs in this process on the tiny GPT-2 of ``hf_gpt2_run.py``; the kill-and-resume
runs are in ``test_hf_resume.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from click.testing import CliRunner
from hf_gpt2_run import build_trainer, final_state

import ckpt
from ckpt.cli import build_cli
from ckpt.testing import assert_same_state


def cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)
    assert result.exit_code == code, (args, result.exit_code, result.output)
    return result.output


def test_plugin_is_listed_by_ckpt_plugins():
    import ckpt_transformers

    plugins = {p["name"]: p for p in json.loads(cli("plugins", "--json"))["plugins"]}
    assert "ckpt-transformers" in plugins, sorted(plugins)
    assert plugins["ckpt-transformers"]["version"] == ckpt_transformers.__version__
    assert plugins["ckpt-transformers"]["hooks"] == ["ckpt_register_adapters"]
    (ep,) = [ep for ep in entry_points(group="ckpt") if ep.name == "ckpt-transformers"]
    assert ep.value == "ckpt_transformers" and ep.dist is not None and ep.dist.name == "ckpt-transformers"


def test_loading_the_plugin_does_not_import_transformers():
    # every ckpt command loads every plugin: the Trainer classes must come on first use only
    code = "import sys, ckpt_transformers; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["False"], out
    import transformers

    import ckpt_transformers

    assert issubclass(ckpt_transformers.CkptTrainer, transformers.Trainer)
    assert issubclass(ckpt_transformers.CkptTrainer, ckpt_transformers.CkptTrainerMixin)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch (12 steps) with a save every 4 steps: the store holds 4, 8 and 12."""
    root = tmp_path_factory.mktemp("trained")
    url = f"file://{root}/store"
    trainer = build_trainer(root / "out", url, epochs=1, save_steps=4)
    trainer.train()
    return trainer, url, root


def test_train_saves_at_save_steps_into_the_store_only(trained):
    trainer, url, root = trained
    assert ckpt.steps(url) == [4, 8, 12]
    assert not list((root / "out").glob("checkpoint-*"))  # no Trainer checkpoint folders
    manifest = ckpt.read_manifest(url, 8)
    assert set(manifest.tree) == {"model", "optimizer", "scheduler", "rng", "trainer_state", "data", "model_config"}
    assert manifest.adapters["rng"] == "transformers.TrainerRNG"
    assert json.loads(manifest.tree["trainer_state"])["global_step"] == 8
    assert manifest.tree["data"]["seed"] == 42 and manifest.tree["data"]["examples"] == 48
    assert manifest.meta["framework"] == "transformers"


def test_store_is_an_ordinary_ckpt_store(trained):
    _, url, _ = trained
    listed = json.loads(cli("ls", url, "--json"))
    assert [c["step"] for c in listed["checkpoints"]] == [4, 8, 12] and listed["latest"] == 12
    shown = json.loads(cli("show", url, "--step", "8", "--json"))
    assert shown["adapters"]["optimizer"] == "torch.optim.Optimizer" and shown["meta"]["epoch"] == pytest.approx(2 / 3)
    assert "OK" in cli("verify", url)
    changed = {c["tensor"] for c in json.loads(cli("diff", url, "8", "12", "--json"))["changed"]}
    assert "model/transformer.wte.weight" in changed and "rng/torch" in changed


def test_export_loads_with_from_pretrained(trained, tmp_path):
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    from ckpt_transformers import export_pretrained

    trainer, url, _ = trained
    expected = {k: v for k, v in trainer.model.state_dict().items()}
    out = tmp_path / "exported"
    out.mkdir()
    cli("export", url, str(out / "model.safetensors"), "--key", "model")
    trainer.model.config.save_pretrained(out)
    loaded = GPT2LMHeadModel.from_pretrained(out)
    assert_same_state(loaded.state_dict(), expected)

    fresh = GPT2LMHeadModel(trainer.model.config)
    fresh.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    assert_same_state(fresh.state_dict(), expected)

    # the config is stored with every checkpoint: one call gives a from_pretrained folder
    folder = export_pretrained(url, tmp_path / "pretrained", step=12)
    assert_same_state(GPT2LMHeadModel.from_pretrained(folder).state_dict(), expected)


def test_resume_from_a_chosen_step_finishes_bit_identical(trained, tmp_path):
    trainer, url, root = trained
    copy = tmp_path / "store"
    shutil.copytree(root / "store", copy)
    again = build_trainer(tmp_path / "out", f"file://{copy}", epochs=1, save_steps=4)
    again.train(resume_from_checkpoint=8)
    assert again.ckpt_restored is not None and again.ckpt_restored.step == 8
    ref, got = final_state(trainer), final_state(again)
    for key in ("model", "optimizer", "scheduler", "losses", "global_step", "torch_rng"):
        assert_same_state(got[key], ref[key], key)


def test_save_total_limit_prunes(any_store_url, tmp_path):
    trainer = build_trainer(tmp_path / "out", any_store_url, epochs=1, save_steps=3, save_total_limit=2)
    trainer.train()
    assert ckpt.steps(any_store_url) == [9, 12]
    assert "OK" in cli("verify", any_store_url)  # what pruning collected is nothing they need
    restored = build_trainer(tmp_path / "again", any_store_url, epochs=1, save_steps=3, save_total_limit=2)
    restored.train(resume_from_checkpoint=9)
    assert restored.ckpt_restored is not None and restored.ckpt_restored.step == 9


def test_mixin_makes_any_trainer_subclass_checkpoint_through_ckpt(tmp_path):
    from transformers import Trainer

    from ckpt_transformers import CkptTrainerMixin

    calls = []

    class CountingTrainer(Trainer):  # stands for TRL's SFTTrainer & co.
        def compute_loss(self, model, inputs, *args, **kwargs):
            calls.append(1)
            return super().compute_loss(model, inputs, *args, **kwargs)

    class CkptCountingTrainer(CkptTrainerMixin, CountingTrainer):
        pass

    base = build_trainer(tmp_path / "out", None, save_steps=2, max_steps=4)
    url = f"file://{tmp_path}/store"
    mixed = CkptCountingTrainer(model=base.model, args=base.args, train_dataset=base.train_dataset, ckpt_url=url)
    mixed.train()
    assert len(calls) == 4 and ckpt.steps(url) == [2, 4]
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_non_json_trainer_state_is_an_error_naming_the_key(tmp_path):
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class Remembers(TrainerCallback, ExportableState):
        def state(self) -> dict:
            return {"args": {}, "attributes": {"best": torch.device("cpu")}}

    url = f"file://{tmp_path}/store"
    trainer = build_trainer(tmp_path / "out", url, callbacks=[Remembers()], save_steps=2, max_steps=4)
    with pytest.raises(ckpt.UnsupportedValueError) as err:
        trainer.train()
    assert "trainer_state/stateful_callbacks/Remembers/attributes/best" in str(err.value)
    assert "torch.device" in str(err.value) and "step 2" in str(err.value)
    assert ckpt.steps(url) == []


def test_resume_without_a_checkpoint_names_the_store(tmp_path):
    url = f"file://{tmp_path}/empty"
    trainer = build_trainer(tmp_path / "out", url, max_steps=2)
    with pytest.raises(ckpt.NoCheckpointError, match="empty holds no checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(ckpt.NoCheckpointError, match="holds no step 7"):
        trainer.train(resume_from_checkpoint=7)


def test_model_only_checkpoint_refuses_an_inexact_resume(tmp_path):
    url = f"file://{tmp_path}/store"
    build_trainer(tmp_path / "out", url, save_steps=2, max_steps=2, save_only_model=True).train()
    assert set(ckpt.read_manifest(url, 2).tree) == {"model", "trainer_state", "data", "model_config"}
    trainer = build_trainer(tmp_path / "out", url, save_steps=2, max_steps=4)
    with pytest.raises(ckpt.StateMismatchError, match="save_only_model=True"):
        trainer.train(resume_from_checkpoint=True)


def test_unsupported_setups_fail_at_construction(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="load_best_model_at_end"):
        build_trainer(
            tmp_path / "out",
            f"file://{tmp_path}/store",
            load_best_model_at_end=True,
            eval_strategy="steps",
            eval_steps=4,
            metric_for_best_model="loss",
        )


def test_resume_true_on_an_empty_store_takes_the_trainers_own_folder(tmp_path):
    # moving a run onto ckpt: its last checkpoint-N folder is loaded by the Trainer itself,
    # and the saves that follow go to the store
    plain = build_trainer(tmp_path / "out", None, epochs=1, save_steps=4)
    plain.train()
    for late in ("checkpoint-8", "checkpoint-12"):
        shutil.rmtree(tmp_path / "out" / late)
    url = f"file://{tmp_path}/store"
    moved = build_trainer(tmp_path / "out", url, epochs=1, save_steps=4)
    moved.train(resume_from_checkpoint=True)
    assert moved.ckpt_restored is None and ckpt.steps(url) == [8, 12]
    ref, got = final_state(plain), final_state(moved)
    for key in ("model", "optimizer", "scheduler", "losses", "global_step"):
        assert_same_state(got[key], ref[key], key)


def test_default_store_is_under_output_dir(tmp_path):
    from ckpt_transformers import CkptTrainer

    base = build_trainer(tmp_path / "out", None, save_steps=2, max_steps=2)
    trainer = CkptTrainer(model=base.model, args=base.args, train_dataset=base.train_dataset)
    assert trainer.ckpt_url == str(tmp_path / "out" / "ckpt")
    trainer.train()
    assert ckpt.steps(str(tmp_path / "out" / "ckpt")) == [2]
