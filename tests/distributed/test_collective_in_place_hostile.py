"""Hostile checks of the collective restore decoding whole tensors into the live ones (two
ranks, gloo on the CPU; tests/distributed/in_place_hostile_worker.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import assert_ok, run_ranks

WORKER = Path(__file__).with_name("in_place_hostile_worker.py")


@pytest.mark.parametrize(
    "scenario",
    [
        "damaged_on_one_rank",
        "sets_differ",
        "rewritten_between",
        "load_fails_on_one_rank",
        "loader_refused_on_one_rank",
        "map_location",
        "fsdp",
        "fsdp_damaged",
    ],
)
def test_collective_in_place_restore(tmp_path, scenario):
    """Damage of one rank's own value: an explicit step raises on both ranks with nothing
    live changed, the latest falls back to the older step on both (no stale second pass);
    ranks decoding different sets in place; an object rewritten between the passes on rank 0
    raises on both, saying the live tensors may be partly overwritten; map_location; FSDP2
    shards decoded straight into each rank's local tensors, and a damaged shard object that
    one rank reads failing every rank with nothing live changed; an adapter failing on one
    rank after every gather failing every rank, not only its own; a loader a restore tracked
    untracked again on every rank when one rank refuses."""
    results = run_ranks(scenario, 2, tmp_path, worker=WORKER)
    assert_ok(results)
    if scenario in ("damaged_on_one_rank", "fsdp_damaged"):
        assert all(f"RAISED {r} CorruptCheckpointError" in text for r, (_, text) in enumerate(results))
    if scenario == "loader_refused_on_one_rank":
        assert all(f"RAISED {r} StateMismatchError" in text for r, (_, text) in enumerate(results))
    if scenario == "rewritten_between":
        late = [line for _, text in results for line in text.splitlines() if line.startswith("LATE")]
        assert len(late) == 2 and all("may be partly overwritten" in line for line in late), late
        assert "rank 0 failed" in late[1]
    if scenario == "load_fails_on_one_rank":
        lines = [line for _, text in results for line in text.splitlines() if line.startswith("LOADFAIL")]
        assert len(lines) == 4, lines
        # the failing rank's own error class on every rank
        assert any(line.startswith("LOADFAIL 0 StateMismatchError") and "rank 1 failed" in line for line in lines)
        assert any(line.startswith("LOADFAIL 1 StateMismatchError") and "refused it" in line for line in lines)
        # an error of no ckpt class: wrapped on the failing rank, named on the other
        assert any(line.startswith("LOADFAIL2 0 CheckpointError") and "RuntimeError" in line for line in lines)
        assert any(line.startswith("LOADFAIL2 1 CheckpointError") and "refused it" in line for line in lines)
