"""CUDA paths: side-stream staging into pinned memory, CUDA RNG states. Skipped without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

import ckpt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cuda_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.BatchNorm1d(256), torch.nn.Linear(256, 8)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(32, 256, device="cuda")).square().mean().backward()
    opt.step()
    return model, opt


def _step(model, opt):
    model(torch.randn(32, 256, device="cuda")).square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_cuda_round_trip_in_place(tmp_path):
    model, opt = _cuda_state()
    ckpt.save(str(tmp_path), {"model": model, "optim": opt}, step=1)
    expected = copy.deepcopy(model.state_dict())
    model2, opt2 = _cuda_state()
    _step(model2, opt2)
    ckpt.restore(str(tmp_path), {"model": model2, "optim": opt2})
    for k, v in expected.items():
        assert model2.state_dict()[k].is_cuda and torch.equal(model2.state_dict()[k], v), k
    assert ckpt.load(str(tmp_path), map_location="cuda")["model"]["0.weight"].is_cuda


def test_cuda_torn_snapshot(tmp_path):
    model, opt = _cuda_state()
    expected = copy.deepcopy(model.state_dict())
    expected_opt = copy.deepcopy(opt.state_dict())
    with ckpt.Checkpointer(str(tmp_path)) as ck:
        h = ck.save({"model": model, "optim": opt}, step=1)
        for _ in range(3):
            _step(model, opt)
        h.wait()
        assert any(buf.is_pinned() for bufs in ck._pool._free.values() for buf in bufs)
    tree = ckpt.load(str(tmp_path))
    for k, v in expected.items():
        assert torch.equal(tree["model"][k], v.cpu()), k
    for i, st in expected_opt["state"].items():
        for k, v in st.items():
            assert torch.equal(tree["optim"]["state"][i][k], v.cpu() if isinstance(v, torch.Tensor) else v)


def test_cuda_rng_states_restored(tmp_path):
    torch.cuda.manual_seed_all(3)
    ckpt.save(str(tmp_path), {"rng": ckpt.RNG()}, step=1)
    a = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(99)
    ckpt.restore(str(tmp_path), {"rng": ckpt.RNG()})
    assert torch.equal(torch.rand(4, device="cuda"), a)
    assert len(ckpt.load(str(tmp_path))["rng"]["cuda"]) == torch.cuda.device_count()
