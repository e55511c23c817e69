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


def _big_cuda_state(width: int = 2048, layers: int = 8):
    """About 400 MB of GPU state (parameters + AdamW moments) after one step."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, opt, width)
    return model, opt


def _train(model, opt, width):
    opt.zero_grad(set_to_none=True)
    model(torch.randn(16, width, device="cuda")).square().mean().backward()
    opt.step()


def _pool_ptrs(ck) -> set[int]:
    return {buf.data_ptr() for bufs in ck._pool._free.values() for buf in bufs}


def test_d2h_staging_into_pinned_pool_on_a_side_stream(tmp_path):
    """Guarded GPU tensors are copied into pinned pool buffers on the checkpointer's own stream,
    and the checkpoint holds the values of the save() call although training goes on at once."""
    model, opt = _big_cuda_state(width=1024, layers=4)
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with ckpt.Checkpointer(str(tmp_path)) as ck:
        h = ck.save({"model": model, "optim": opt}, step=1)
        side = ck._side_stream
        assert isinstance(side, torch.cuda.Stream) and side != torch.cuda.current_stream()
        _train(model, opt, 1024)  # waits on the staging event on the GPU, not on the CPU
        h.wait()
        # every CUDA tensor (parameters, moments) went through a pinned buffer; AdamW's CPU
        # `step` tensors use pageable ones
        cuda_bytes = sum(t.nbytes for t in model.parameters()) + sum(
            v.nbytes for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.is_cuda
        )
        pinned = sum(b.numel() for bs in ck._pool._free.values() for b in bs if b.is_pinned())
        assert pinned >= cuda_bytes > 0
    tree = ckpt.load(str(tmp_path))
    for k, v in expected.items():
        assert torch.equal(tree["model"][k], v), k
    assert not torch.equal(model.state_dict()["0.weight"].cpu(), expected["0.weight"])


def test_save_stall_is_below_one_blocking_d2h_copy(tmp_path):
    """save() returns before the guarded state is copied: its median call time is below one
    blocking copy of the same tensors into pageable host memory."""
    import time

    model, opt = _big_cuda_state()
    tensors = [p for p in model.parameters()] + [
        v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.is_cuda
    ]
    copies = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        [t.cpu() for t in tensors]
        copies.append(time.perf_counter() - t0)
    calls = []
    with ckpt.Checkpointer(str(tmp_path), keep_last=1) as ck:
        ck.save({"model": model, "optim": opt}, step=1).wait()  # warm-up: the pinned pool
        for step in range(2, 5):
            _train(model, opt, 2048)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            h = ck.save({"model": model, "optim": opt}, step=step)
            calls.append(time.perf_counter() - t0)
            h.wait()
    calls.sort()
    copies.sort()
    assert calls[1] < copies[1], f"save() stalled {calls[1]:.4f}s; one blocking D2H copy takes {copies[1]:.4f}s"


def test_pinned_pool_is_reused_across_saves(tmp_path):
    """After the first save the pool allocates nothing more: the same pinned buffers serve
    every later save of the same state."""
    model, opt = _big_cuda_state(width=512, layers=4)
    with ckpt.Checkpointer(str(tmp_path), keep_last=2) as ck:
        ck.save({"model": model, "optim": opt}, step=1).wait()
        allocated, ptrs = ck._pool.allocated_bytes, _pool_ptrs(ck)
        assert allocated > 0 and ptrs
        for step in range(2, 5):
            _train(model, opt, 512)
            ck.save({"model": model, "optim": opt}, step=step).wait()
            assert ck._pool.allocated_bytes == allocated
            assert _pool_ptrs(ck) == ptrs
    expected = {k: v.cpu() for k, v in model.state_dict().items()}
    tree = ckpt.load(str(tmp_path))
    assert all(torch.equal(tree["model"][k], v) for k, v in expected.items())
