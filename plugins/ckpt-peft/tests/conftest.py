"""Fixtures for ckpt-peft's tests: MiniLM models built offline from real weights."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from peft_helpers import build_minilm, lora_config, minilm_dir, train_step  # noqa: F401 - used by fixtures here

from ckpt.testing import reset_plugins


@pytest.fixture(autouse=True)
def _fresh_plugins():
    reset_plugins()
    yield
    reset_plugins()


@pytest.fixture(scope="session")
def minilm_weights() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(minilm_dir() / "model.safetensors"))


@pytest.fixture
def make_lora_minilm(minilm_weights):
    """``make(r=8) -> (peft model, AdamW over its trainable parameters)``."""
    from peft import get_peft_model

    def make(r: int = 8):
        torch.manual_seed(0)
        model = get_peft_model(build_minilm(minilm_weights), lora_config(r))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        return model, opt

    return make
