"""The save plan every rank computes from the all-gathered parts (no processes needed)."""

from __future__ import annotations

import pytest

from ckpt.distributed.coordinator import LocalPart, merge_trees, plan_save
from ckpt.errors import CheckpointError


def plain(n, h="a" * 32):
    return ("plain", "float32", (n // 4,), n, h, "cpu")


def box(off, shape, gshape=(8, 4)):
    return ("box", "float32", gshape, off, shape, shape[0] * shape[1] * 4, "cpu")


def part(tree, tensors):
    return LocalPart(tree, {}, {}, tensors)


def test_replicated_written_once_spread_by_bytes_and_per_rank_kept():
    tensors = {f"w{i}": plain(1000 * (i + 1)) for i in range(6)}
    parts = [part({"w": 1, "r": {"$tensor": "r"}, "v": r}, {**tensors, "r": plain(8, str(r) * 32)}) for r in range(3)]
    plan = plan_save(parts)
    written = [w for r in plan.assign for w, *_ in plan.assign[r]]
    assert sorted(written) == sorted([*tensors, "$rank/0/r", "$rank/1/r", "$rank/2/r"])  # each once
    loads = [sum(int(parts[0].tensors[p][3]) for _, _, p, _ in plan.assign[r] if p in tensors) for r in range(3)]
    assert max(loads) <= 1.2 * (sum(loads) / 3)
    assert plan.tree == {
        "w": 1,
        "r": {"$rank": [{"$tensor": f"$rank/{r}/r"} for r in range(3)]},
        "v": {"$rank": [0, 1, 2]},
    }
    assert [w for w, *_ in plan.assign[1] if w.startswith("$rank")] == ["$rank/1/r"]


def test_dtensor_boxes_written_once_by_one_holder():
    # 4 ranks, 2 replicas x 2 shards (HSDP): boxes held by two ranks each
    boxes = [((0, 0), (4, 4)), ((4, 0), (4, 4)), ((0, 0), (4, 4)), ((4, 0), (4, 4))]
    parts = [part({"p": {"$tensor": "p"}}, {"p": box(*b)}) for b in boxes]
    plan = plan_save(parts)
    written = [(r, w) for r in plan.assign for w, *_ in plan.assign[r]]
    assert sorted(w for _, w in written) == ["p#0,0", "p#4,0"]
    assert len({r for r, _ in written}) == 2  # spread over two ranks
    assert plan.sharded["p"] == ("float32", (8, 4)) and plan.tree == {"p": {"$tensor": "p"}}


def test_boxes_that_do_not_tile_are_refused():
    parts = [part({}, {"p": box((0, 0), (4, 4))}), part({}, {"p": box((2, 0), (4, 4))})]
    with pytest.raises(CheckpointError, match="do not tile"):
        plan_save(parts)


def test_dtensor_on_some_ranks_only_is_refused():
    parts = [part({}, {"p": box((0, 0), (8, 4))}), part({}, {"p": plain(128)})]
    with pytest.raises(CheckpointError, match="DTensor on some ranks"):
        plan_save(parts)


def test_merge_trees_keeps_structure_where_ranks_agree():
    assert merge_trees([{"a": [1, 2]}, {"a": [1, 3]}]) == {"a": [1, {"$rank": [2, 3]}]}
    assert merge_trees([{"a": 1}, {"b": 1}]) == {"$rank": [{"a": 1}, {"b": 1}]}
    assert merge_trees([{"$tensor": "x"}, {"$tensor": "y"}]) == {"$rank": [{"$tensor": "x"}, {"$tensor": "y"}]}
