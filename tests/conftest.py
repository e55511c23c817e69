"""Shared fixtures. ``store_url`` runs a test on every store kind the machine offers."""

from __future__ import annotations

import uuid

import pytest
import torch

import ckpt
from ckpt.plugins import reset_plugins

STORE_KINDS = ["file", "memory"]


@pytest.fixture(autouse=True)
def _fresh_plugins():
    reset_plugins()
    yield
    reset_plugins()


@pytest.fixture(params=STORE_KINDS)
def store_url(request, tmp_path):
    """A fresh, empty store URL of each kind."""
    kind = request.param
    if kind == "file":
        yield f"file://{tmp_path}/store"
    elif kind == "memory":
        import fsspec

        url = f"memory://ckpt-test-{uuid.uuid4().hex}"
        yield url
        fs = fsspec.filesystem("memory")
        path = url.removeprefix("memory://")
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        raise AssertionError(kind)


def make_training_state(seed: int = 0, width: int = 32):
    """A small model + AdamW + scheduler + scaler, stepped so optimizer state exists."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.LayerNorm(width), torch.nn.Linear(width, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(2):
        model(torch.randn(8, width)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return {"model": model, "optim": opt, "sched": sched, "rng": ckpt.RNG()}
