"""Fixtures for ckpt-transformers' tests: stores. The training run itself is hf_gpt2_run.py."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(params=["file", "memory"])
def any_store_url(request, tmp_path):
    """A fresh store URL of each kind the Trainer is tested on."""
    if request.param == "file":
        yield f"file://{tmp_path}/store"
        return
    import fsspec

    url = f"memory://ckpt-transformers-{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Training in this process on one thread, as the subprocess runs do: the machine is
    shared and oversubscribed threads make a tiny model's steps ten times slower. Module
    scope, so it is in place before module-scoped training fixtures (a run and its resume
    must reduce in the same order to agree bit for bit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
