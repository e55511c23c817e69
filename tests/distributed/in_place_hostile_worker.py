"""One rank of a hostile collective in-place restore test (see
test_collective_in_place_hostile.py): ``python in_place_hostile_worker.py <scenario> <dir>``.
Prints ``OK`` last on success; an assertion failing exits non-zero."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import ckpt
from ckpt.distributed.sharding import rank_view
from ckpt.storage.store import Store


def state_of(seed: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(512, 1024, generator=g)},  # 2 MiB: not packed, decoded in place
        "mine": {"t": torch.randn(300_000, generator=g) + 10 * rank},  # per-rank, 1.2 MB
    }


def fill(state: dict, value: float) -> None:
    with torch.no_grad():
        state["model"]["w"].fill_(value)
        state["mine"]["t"].fill_(value)


def same(state: dict, want: dict) -> bool:
    return all(torch.equal(state[k]["w" if k == "model" else "t"], want[k]["w" if k == "model" else "t"]) for k in want)


def damage(url: str, step: int, rank: int, path: str) -> None:
    """Flip a byte in the middle of every object of ``path`` in ``rank``'s view of ``step``."""
    view = rank_view(ckpt.read_manifest(url, step=step), rank, warn=False)
    store = Store(url)
    for ref in view.tensors[path].chunks:
        p = Path(store.object_path(ref.key))
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))


def main() -> None:
    scenario, where = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    url = os.path.join(where, "s")
    one, two = state_of(1, rank), state_of(2, rank)
    ckpt.save(url, one, step=1)
    ckpt.save(url, two, step=2)
    live = state_of(3, rank)
    if scenario == "damaged_on_one_rank":  # step 2 of rank 1's own value damaged
        if rank == 0:
            damage(url, 2, 1, "mine/t")
        dist.barrier()
        fill(live, 7.0)
        try:
            ckpt.restore(url, live, step=2)
        except ckpt.CheckpointError as exc:
            print("RAISED", rank, type(exc).__name__, str(exc)[:200])
        else:
            raise AssertionError("no error")
        assert (live["model"]["w"] == 7).all() and (live["mine"]["t"] == 7).all(), "live changed"
        info = ckpt.restore(url, live)  # the latest: falls back to step 1 on every rank
        assert info.step == 1, info.step
        assert same(live, one)
    elif scenario == "sets_differ":  # rank 1's own value is not contiguous: read into fresh memory
        if rank == 1:
            live["mine"]["t"] = torch.empty(600_000)[::2]
        info = ckpt.restore(url, live)
        assert info.step == 2 and same(live, two)
    elif scenario == "rewritten_between":  # rank 0's object rewritten after pass 1
        import ckpt.distributed.restore as dist_restore

        real = dist_restore.decode_in_place

        def rewritten(ip, codecs):  # type: ignore[no-untyped-def]
            damage(url, 2, 0, "mine/t")
            return real(ip, codecs)

        if rank == 0:
            dist_restore.decode_in_place = rewritten  # type: ignore[assignment]
        try:
            ckpt.restore(url, live, step=2)
        except ckpt.CheckpointError as exc:
            print("LATE", rank, type(exc).__name__, str(exc)[:400].replace("\n", " "))
        else:
            raise AssertionError("no error")
    elif scenario == "map_location":
        info = ckpt.restore(url, live, map_location="cpu")
        assert info.step == 2 and same(live, two)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    dist.barrier()
    print("OK")
    sys.stdout.flush()
    os._exit(0)  # as every multi-rank worker here: no teardown of the gloo groups (see test_dcp_backend)


if __name__ == "__main__":
    main()
