"""ckpt-peft: discovered through its entry point, wins over core's nn.Module adapter,
round-trips a LoRA MiniLM bit-exact into a fresh get_peft_model(...), and writes
LoRA-sized checkpoints once the frozen base is stored."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from peft_helpers import lora_config, train_step

import ckpt
from ckpt.testing import AdapterConformance, assert_same_state, clone_state, get_plugins


def test_plugin_is_listed_by_ckpt_plugins():
    infos = {p.name: p for p in get_plugins().info()}
    assert "ckpt-peft" in infos, sorted(infos)
    import ckpt_peft

    assert infos["ckpt-peft"].version == ckpt_peft.__version__
    assert infos["ckpt-peft"].hooks == ("ckpt_register_adapters",)
    (ep,) = [ep for ep in entry_points(group="ckpt") if ep.name == "ckpt-peft"]
    assert ep.value == "ckpt_peft" and ep.dist.name == "ckpt-peft"


def test_ckpt_plugins_cli_lists_it():
    exe = Path(sys.executable).with_name("ckpt")
    cmd = [str(exe)] if exe.exists() else [shutil.which("ckpt") or "ckpt"]
    out = subprocess.run([*cmd, "plugins", "--json"], capture_output=True, text=True, timeout=120, check=True)
    names = [p["name"] for p in json.loads(out.stdout)["plugins"]]
    assert "ckpt-peft" in names and "ckpt.hooks.defaults" in names


def test_disabling_the_plugin_falls_back_to_the_module_adapter(make_lora_minilm, monkeypatch):
    model, _ = make_lora_minilm()
    assert get_plugins().adapters.for_object(model).name == "peft.PeftModel"
    monkeypatch.setenv("CKPT_DISABLE_PLUGINS", "ckpt-peft")
    assert "ckpt-peft" not in {p.name for p in get_plugins().info()}
    assert get_plugins().adapters.for_object(model).name == "torch.nn.Module"


def test_lora_minilm_round_trips_bit_exact_and_resumes_identically(make_lora_minilm, tmp_path):
    store_url = f"file://{tmp_path}/run"  # every store kind runs the conformance suite below
    model, opt = make_lora_minilm()
    for s in range(2):
        train_step(model, opt, s)
    info = ckpt.save(store_url, {"model": model, "opt": opt}, step=2)
    assert ckpt.read_manifest(store_url, 2).adapters["model"] == "peft.PeftModel"
    tree = ckpt.load(store_url)["model"]
    assert tree["peft"]["adapters"]["default"]["r"] == 8
    assert tree["peft"]["adapters"]["default"]["target_modules"] == ["query", "value"]
    assert all(".lora_" in k for k in tree["adapter"]) and len(tree["adapter"]) == 24
    assert not any("lora_" in k for k in tree["base"])

    fresh, fresh_opt = make_lora_minilm()  # a fresh get_peft_model(...) on freshly loaded weights
    restored = ckpt.restore(store_url, {"model": fresh, "opt": fresh_opt})
    assert restored.step == info.step == 2
    assert_same_state(clone_state(fresh.state_dict()), clone_state(model.state_dict()))
    assert_same_state(clone_state(fresh_opt.state_dict()), clone_state(opt.state_dict()))
    # training continues bit-identically
    train_step(model, opt, 99)
    train_step(fresh, fresh_opt, 99)
    assert_same_state(clone_state(fresh.state_dict()), clone_state(model.state_dict()))


def test_lora_checkpoints_after_the_first_are_lora_sized(make_lora_minilm, tmp_path):
    """r=8 on query/value: each later checkpoint writes <= 1.1 x (adapter params + AdamW
    moments) + 128 KiB; the frozen base is written by the first one only."""
    url = f"file://{tmp_path}/run"
    model, opt = make_lora_minilm()
    adapter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert adapter_bytes == 73_728 * 4
    budget = 1.1 * 3 * adapter_bytes + 128 * 1024
    sizes = []
    for step in range(1, 5):
        train_step(model, opt, step)
        sizes.append(ckpt.save(url, {"model": model, "opt": opt}, step=step).stored_bytes)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert sizes[0] > 0.7 * base_bytes  # the base, compressed a little, once
    assert all(s <= budget for s in sizes[1:]), (sizes, budget)
    first = ckpt.read_manifest(url, 1)
    for step in (2, 3, 4):
        later = ckpt.read_manifest(url, step)
        for path, entry in later.tensors.items():
            if path.startswith("model/base/"):
                assert entry.chunks == first.tensors[path].chunks, f"{path} rewritten at step {step}"
    fresh, fresh_opt = make_lora_minilm()
    ckpt.restore(url, {"model": fresh, "opt": fresh_opt})
    assert_same_state(clone_state(fresh.state_dict()), clone_state(model.state_dict()))


def test_restore_into_a_different_lora_config_is_refused(make_lora_minilm, minilm_weights, tmp_path):
    from peft import LoraConfig, get_peft_model
    from peft_helpers import build_minilm

    url = f"file://{tmp_path}/run"
    model, opt = make_lora_minilm(r=8)
    ckpt.save(url, {"model": model}, step=1)
    # same shapes, different scaling: only the saved config can tell
    other = get_peft_model(
        build_minilm(minilm_weights),
        LoraConfig(r=8, lora_alpha=32, target_modules=["query", "value"], lora_dropout=0.0),
    )
    with pytest.raises(ckpt.StateMismatchError, match=r"adapter 'default' was saved with lora_alpha=16.*lora_alpha=32"):
        ckpt.restore(url, {"model": other})
    # a different rank changes the adapter's shapes: refused before anything is loaded
    smaller, _ = make_lora_minilm(r=4)
    before = clone_state(smaller.state_dict())
    with pytest.raises(ckpt.StateMismatchError, match="lora_A.default.weight"):
        ckpt.restore(url, {"model": smaller})
    assert_same_state(clone_state(smaller.state_dict()), before)


# -- the adapter conformance suite, on a tiny random BERT ----------------------------------


def _tiny_lora():
    from peft import get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return get_peft_model(BertModel(config), lora_config(r=2))


def _mutate(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))


class TestPeftConformance(AdapterConformance):
    adapter_name = "peft.PeftModel"

    @pytest.fixture
    def make_object(self):
        return _tiny_lora

    @pytest.fixture
    def mutate(self):
        return _mutate
