"""FSDP2 (fully_shard) state saved at one world size, restored at others; consolidated reads."""

from __future__ import annotations

import json

import torch

import ckpt

from .conftest import assert_ok, run_ranks
from .dist_worker import mlp


def _check_full(url, ref, step=1):
    got = ckpt.load(url, step=step)
    for k, v in ref["model"].items():
        assert torch.equal(got["model"][k], v), k
    for i, s in ref["optim"].items():
        for k, v in s.items():
            assert torch.equal(got["optim"]["state"][i][k], v), (i, k)


def test_fsdp2_saved_at_2_restored_at_3_and_1(tmp_path):
    assert_ok(run_ranks("fsdp_save", 2, tmp_path))
    url = str(tmp_path / "store")
    m = ckpt.read_manifest(url, 1)
    entry = m.tensors["model/0.weight"]  # 10x6 over 2 ranks: two row boxes
    assert entry.chunks == () and [s.offsets for s in entry.shards] == [(0, 0), (5, 0)]
    assert m.tensors["optim/state/0/exp_avg"].shards  # FSDP2 optimizer moments are DTensors
    ref = torch.load(tmp_path / "ref.pt")
    _check_full(url, ref)  # ckpt.load: full tensors, one process
    # at 3 ranks: uneven shards (10 rows -> 4, 4, 2) read from the 2 stored boxes
    assert_ok(run_ranks("fsdp_restore", 3, tmp_path))
    # at 1: a plain module takes the consolidated state
    model = mlp(5)
    ckpt.restore(url, {"model": model}, step=1, strict=False)  # rank 0's view
    for k, v in ref["model"].items():
        assert torch.equal(model.state_dict()[k], v), k
    # export of the sharded checkpoint: full tensors
    from click.testing import CliRunner

    from ckpt.cli import build_cli

    out = tmp_path / "full.safetensors"
    res = CliRunner().invoke(build_cli(), ["export", url, str(out), "--step", "1"])
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    exported = load_file(str(out))
    w = next(v for k, v in exported.items() if k.endswith("0.weight") and "model" in k)
    assert torch.equal(w, ref["model"]["0.weight"])
    res = CliRunner().invoke(build_cli(), ["verify", url])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(build_cli(), ["show", url, "--step", "1", "--json"])
    layouts = {t["name"]: t["layout"] for t in json.loads(res.output)["tensors"]}
    assert layouts["model.0.weight"] == "sharded:2" and layouts["optim.state.0.step"] == "replicated"
    res = CliRunner().invoke(build_cli(), ["diff", url, "1", "2"])
    assert res.exit_code == 0 and "0 unchanged tensors" in res.output, res.output


def test_hsdp_2d_mesh_saved_at_4_restored_at_2(tmp_path):
    """HSDP on a 2x2 mesh (replicate x shard): each box is held by two ranks and written once;
    restored into plain FSDP2 at 2 ranks."""
    assert_ok(run_ranks("hsdp_save", 4, tmp_path))
    url = str(tmp_path / "store")
    m = ckpt.read_manifest(url, 1)
    assert m.world_size == 4
    assert [s.offsets for s in m.tensors["model/0.weight"].shards] == [(0, 0), (5, 0)]
    _check_full(url, torch.load(tmp_path / "ref.pt"))
    assert_ok(run_ranks("fsdp_restore", 2, tmp_path))
