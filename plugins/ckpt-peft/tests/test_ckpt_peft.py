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
from typing import Any

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


def _tiny_lora_with_adam(seed: int, layers: int = 1, **lora: Any):
    """A tiny random BERT with LoRA on query/value (``lora`` overrides the config's fields)
    and an AdamW that has taken one step, so both hold state a restore could overwrite."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    fields = {"r": 2, "lora_alpha": 16, "target_modules": ["query", "value"], "lora_dropout": 0.0, **lora}
    model = get_peft_model(BertModel(config), LoraConfig(init_lora_weights=False, **fields))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 5))
    model(input_ids=ids).last_hidden_state.sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(
    ("field", "saved", "live"), [("lora_alpha", 8, 16), ("lora_dropout", 0.0, 0.1)], ids=["alpha", "dropout"]
)
def test_a_refused_config_leaves_every_live_tensor_unchanged(tmp_path, field, saved, live, strict):
    """A config that differs in a same-shape field is refused in the restore's first pass:
    from a local store the tensors are decoded straight into the live ones before the
    adapters load, so a refusal in load() would come after the model (frozen base weights
    too) and the optimizer had changed."""
    url = str(tmp_path / "run")  # local disk: the restore decodes in place
    model, opt = _tiny_lora_with_adam(0, **{field: saved})
    ckpt.save(url, {"model": model, "opt": opt}, step=1)

    other, other_opt = _tiny_lora_with_adam(1, **{field: live})
    model_before = clone_state(other.state_dict())
    opt_before = clone_state(other_opt.state_dict())
    assert any(not torch.equal(t, model.state_dict()[k]) for k, t in model_before.items())  # the restore would show
    with pytest.raises(ckpt.StateMismatchError, match=rf"adapter 'default' was saved with {field}={saved!r}"):
        ckpt.restore(url, {"model": other, "opt": other_opt}, strict=strict)
    assert_same_state(clone_state(other.state_dict()), model_before)
    assert_same_state(clone_state(other_opt.state_dict()), opt_before)


@pytest.mark.parametrize("saved_layers, live_layers", [(1, 2), (2, 1)], ids=["missing", "unexpected"])
def test_strict_false_loads_what_matches_and_reports_the_rest(tmp_path, saved_layers, live_layers):
    """Same LoRA config, a base with another number of layers: strict refuses before
    anything changes; strict=False loads the tensors both have and reports the others."""
    saved, _ = _tiny_lora_with_adam(0, layers=saved_layers)
    live, _ = _tiny_lora_with_adam(1, layers=live_layers)
    url = str(tmp_path / "run")
    ckpt.save(url, {"model": saved}, step=1)
    before = clone_state(live.state_dict())
    with pytest.raises(ckpt.StateMismatchError, match="layer.1"):
        ckpt.restore(url, {"model": live})
    assert_same_state(clone_state(live.state_dict()), before)

    info = ckpt.restore(url, {"model": live}, strict=False)
    reported = info.missing_keys if live_layers > saved_layers else info.unexpected_keys
    assert reported and all(".layer.1." in k for k in reported)
    assert not (info.unexpected_keys if live_layers > saved_layers else info.missing_keys)
    mine, theirs = live.state_dict(), saved.state_dict()
    common = set(mine) & set(theirs)
    assert common and all(torch.equal(mine[k], theirs[k]) for k in common)
    assert all(torch.equal(mine[k], before[k]) for k in set(mine) - common)


_BAD_TREES = {
    "unknown active adapter": lambda t: {**t, "peft": {**t["peft"], "active": ["nope"]}},
    "missing key": lambda t: {**t, "base": dict(list(t["base"].items())[1:])},
    "unexpected key": lambda t: {**t, "adapter": {**t["adapter"], "extra.weight": torch.zeros(1)}},
    "wrong shape": lambda t: {**t, "base": {k: v[..., :1] for k, v in t["base"].items()}},
    "no configs": lambda t: {**t, "peft": {"active": ["default"]}},
    "other adapter name": lambda t: {**t, "peft": {**t["peft"], "adapters": {"x": t["peft"]["adapters"]["default"]}}},
}


@pytest.mark.parametrize("what", sorted(_BAD_TREES))
def test_check_refuses_what_load_would(what):
    """The adapter's check() takes every ground load() has to refuse; load() refuses the
    same before it writes anything (a direct call has no first pass)."""
    from ckpt_peft.adapter import PeftModelAdapter

    adapter = PeftModelAdapter()
    model, _ = _tiny_lora_with_adam(0)
    tree = adapter.state(model)
    adapter.check(model, tree)  # its own state fits
    other, _ = _tiny_lora_with_adam(1)
    before = clone_state(other.state_dict())
    bad = _BAD_TREES[what](tree)
    with pytest.raises(ckpt.StateMismatchError):
        adapter.check(other, bad)
    with pytest.raises(ckpt.StateMismatchError):
        adapter.load(other, bad)
    assert_same_state(clone_state(other.state_dict()), before)
    adapter.load(other, tree)
    assert_same_state(clone_state(other.state_dict()), clone_state(model.state_dict()))


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
