"""Local tiers under torch.distributed: each rank's local tier, the durable global checkpoint
(tests/distributed/tier_worker.py runs the phases in one launch of 2 ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import ckpt
from ckpt.storage.store import Store

from .conftest import assert_ok, run_ranks

WORKER = Path(__file__).with_name("tier_worker.py")


def _phase(text: str, tag: str) -> str:
    after = text.split(f"PHASE {tag}\n", 1)[1]
    return after.split("PHASE ", 1)[0]


def test_rank_local_tiers_persist_restore_and_fall_back(tmp_path, s3_server):
    """The durable tier on S3 (moto), the local tiers in a directory."""
    url = s3_server.new_url("dtiers")
    env = {**s3_server.env, "TIER_DURABLE": url}
    results = run_ranks("tiers", 2, tmp_path, worker=WORKER, timeout=120, env=env)
    assert_ok(results)
    out0, out1 = results[0][1], results[1][1]
    # the durable tier holds the persisted steps only, as global checkpoints bit-exact in one process
    assert ckpt.steps(url) == [2, 4, 5, 7]
    ref = torch.load(tmp_path / "ref.pt")
    for step in (2, 4, 5, 7):
        m = ckpt.read_manifest(url, step)
        assert m.world_size == 2 and [s.offsets for s in m.tensors["model/0.weight"].shards] == [(0, 0), (5, 0)]
        got = ckpt.load(url, step=step)
        for k, v in ref[step]["model"].items():
            assert torch.equal(got["model"][k], v), (step, k)
        for i, s in ref[step]["optim"].items():
            for k, v in s.items():
                assert torch.equal(got["optim"]["state"][i][k], v), (step, i, k)
        got1 = ckpt.load(url, step=step, rank=1)
        assert got1["r"]["rank"] == 1 and torch.equal(got1["r"]["t"], torch.full((3,), 10.0 * step + 1))
    # each rank's local tier: its own single-process checkpoints, keep_last 2
    for r in (0, 1):
        local = Store(str(tmp_path / "local" / f"rank-{r:05d}"))
        assert local.steps() == [7, 8], (r, local.steps())
        assert ckpt.read_manifest(local.url, 8).world_size == 0
    # rank 1's local tier deleted: it reads the durable tier, rank 0 its local one
    assert "rank 0 restored step 5 from the local tier" in _phase(out0, "gone")
    assert "rank 1 restored step 5 from the durable tier" in _phase(out1, "gone")
    assert "its local tier does not hold it" in _phase(out1, "gone")
    # the local tiers newer than the durable one win
    for out, r in ((out0, 0), (out1, 1)):
        assert f"rank {r} restored step 7 from the local tier" in _phase(out, "newer")
    # a corrupt local object on rank 1 only: rank 1 reads the durable copy of the same save
    assert "rank 0 restored step 7 from the local tier" in _phase(out0, "corrupt")
    corrupt1 = _phase(out1, "corrupt")
    assert "rank 1 restored step 7 from the durable tier" in corrupt1 and "unusable" in corrupt1
    # a damaged step only the local tiers hold: every rank falls back to step 7
    for out in (out0, out1):
        fallback = _phase(out, "fallback")
        assert "step 8 (local) is damaged on rank 1" in fallback, fallback
    assert "rank 0 restored step 7 from the local tier" in _phase(out0, "fallback")
    assert "rank 1 restored step 7 from the durable tier" in _phase(out1, "fallback")
    for out, r in ((out0, 0), (out1, 1)):
        assert f"rank {r} restored step 5 from the durable tier" in _phase(out, "step")
    # a durable tier that cannot be written: raised on every rank, by the next wait and by close
    for out in (out0, out1):
        assert "RAISED persist" in _phase(out, "failing") and "RAISED close" in _phase(out, "failing")
    # a persist due while the one before still runs (slowed on rank 1): skipped on every rank
    for out in (out0, out1):
        assert "persisting step 2 to" in _phase(out, "busy") and "skipped" in _phase(out, "busy")

    # at 3 ranks: the local tiers (of 2 ranks) are ignored, the durable tier reshards; a SIGTERM
    # on one rank saves step 9 on every rank and persists it before they exit
    results = run_ranks("resize", 3, tmp_path, worker=WORKER, timeout=120, env=env)
    assert_ok(results)
    for r, (_, text) in enumerate(results):
        assert f"rank {r} restored step 7 from the durable tier" in text, text[-3000:]
        if r < 2:
            assert "saved by rank" in text and "of 2 ranks, this is rank" in text, text[-3000:]
    assert ckpt.steps(url) == [7, 9]  # keep_last=2: retention of the durable tier
    assert all(torch.equal(ckpt.load(url, step=7)["model"][k], v) for k, v in ref[7]["model"].items())
    mark = json.loads((tmp_path / "local" / "rank-00001" / "tier.json").read_text())
    assert mark == {"durable": url, "world_size": 3, "rank": 1}


def test_a_restore_refused_on_another_rank_leaves_the_loaders_untracked(tmp_path):
    """Rank 0 prepares its local tier's copy (its DataLoader tracked for it); rank 1's model
    does not fit: the restore is refused on both, and rank 0's loader is a plain DataLoader again."""
    results = run_ranks("loader", 2, tmp_path, worker=WORKER, timeout=90)
    assert_ok(results)
    for _, out in results:
        assert "REFUSED" in out


def test_ranks_that_disagree_about_persisting_at_close_agree_instead_of_waiting(tmp_path):
    """Rank 1 interrupted in its last save closes without persisting; rank 0's close, which
    would persist step 1, agrees with it instead of waiting for it until CKPT_DIST_TIMEOUT.
    Then the last persist recorded on rank 0 only: neither persists again, neither waits."""
    results = run_ranks("closing", 2, tmp_path, worker=WORKER, timeout=120, env={"CKPT_DIST_TIMEOUT": "60"})
    assert_ok(results)
    for _, out in results:
        (agreed,) = [line for line in out.splitlines() if line.startswith("AGREED")]
        assert float(agreed.split()[1].rstrip("s")) < 20, agreed
    assert "INTERRUPTED" in results[1][1]
    (closed,) = [line for line in results[0][1].splitlines() if line.startswith("CLOSED")]
    assert float(closed.split()[1].rstrip("s")) < 20 and "rank 1 failed: KeyboardInterrupt" in closed, closed
    assert "not persisted" in results[0][1] and "on another rank" in results[0][1], results[0][1][-2000:]
    # real SIGINTs on rank 1 (the worker checks that no local tier stays held and the persist completes)
    lines = {
        tuple(line.split()[1:3]): line.split()[3:]
        for _, out in results
        for line in out.splitlines()
        if line.startswith("SIGTIER")
    }
    assert lines[("open", "1")][0] == "KeyboardInterrupt", lines
    assert lines[("open", "0")][0] == "CheckpointError" and "rank 1 failed: KeyboardInterrupt" in " ".join(
        lines[("open", "0")]
    ), lines
    # (an error of no ckpt class reaches its own rank as a CheckpointError caused by it)
    assert lines[("handler", "1")][0] == "CheckpointError" and "Stop: stop (test)" in " ".join(lines[("handler", "1")])
    assert lines[("handler", "0")][0] == "CheckpointError" and "rank 1 failed: Stop: stop (test)" in " ".join(
        lines[("handler", "0")]
    )
    assert lines[("close", "1")][0] == "KeyboardInterrupt" and float(lines[("close", "1")][1].rstrip("s")) < 3, lines
    assert lines[("close", "0")][0] == "closed", lines
