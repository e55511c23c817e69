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
    for ref in view.tensors[path].chunks:
        flip(url, ref.key)


def flip(url: str, key: str) -> None:
    """Flip a byte in the middle of object ``key``."""
    p = Path(Store(url).object_path(key))
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def refused(url: str, state: dict, step: int, rank: int, tag: str = "RAISED") -> None:
    """A restore of ``step`` that must raise a CheckpointError (printed for the test after ``tag``)."""
    try:
        ckpt.restore(url, state, step=step)
    except ckpt.CheckpointError as exc:
        print(tag, rank, type(exc).__name__, str(exc)[:400].replace("\n", " "))
    else:
        raise AssertionError("no error")


def fsdp_state(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))  # 1 MiB shards: not packed
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 512)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def locals_of(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model/{n}": p.to_local() for n, p in model.named_parameters()}
    for i, s in enumerate(opt.state.values()):
        out.update({f"optim/state/{i}/{k}": v.to_local() for k, v in s.items() if k != "step"})
    return out


def fsdp(url: str, rank: int, *, damaged: bool, where: str) -> None:
    import ckpt.state.in_place as in_place_mod

    model, opt = fsdp_state(1)
    ckpt.save(url, {"model": model, "optim": opt}, step=1)
    want = {k: v.clone() for k, v in locals_of(model, opt).items()}
    live_model, live_opt = fsdp_state(2)
    live = locals_of(live_model, live_opt)
    before = {k: v.clone() for k, v in live.items()}
    ptrs = {k: v.data_ptr() for k, v in live.items()}
    boxes: list[str] = []
    real = in_place_mod.read_box

    def spy(reader, entry, path, offsets, shape, **kw):  # type: ignore[no-untyped-def]
        boxes.append(path)
        return real(reader, entry, path, offsets, shape, **kw)

    in_place_mod.read_box = spy  # type: ignore[assignment]
    state = {"model": live_model, "optim": live_opt}
    if damaged:  # an object only rank 1's box reads: every rank raises, nothing live changes
        if rank == 0:
            view = rank_view(ckpt.read_manifest(url, step=1), 1, warn=False)
            flip(url, view.tensors["model/0.weight"].shards[1].chunks[0].key)
        dist.barrier()
        refused(url, state, 1, rank)
        assert not boxes, boxes
        now = locals_of(live_model, live_opt)
        assert all(torch.equal(now[k], before[k]) for k in before), "live changed"
        return
    assert ckpt.restore(url, state).step == 1
    now = locals_of(live_model, live_opt)
    for k, v in want.items():
        assert torch.equal(now[k], v), k
    # the weights' boxes and their moments' (the biases' are small: packed, read into fresh memory)
    assert {"model/0.weight", "model/1.weight", "optim/state/0/exp_avg", "optim/state/2/exp_avg_sq"} <= set(boxes)
    moved = sorted(k for k, v in now.items() if v.data_ptr() != ptrs[k] and k in boxes)
    assert not moved, f"local shards replaced, not filled: {moved}"
    live_model(torch.randn(4, 512)).sum().backward()  # still trains
    live_opt.step()


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
        refused(url, live, 2, rank)
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
        refused(url, live, 2, rank, "LATE")
    elif scenario == "load_fails_on_one_rank":  # an adapter raising on rank 1 after every gather
        import ckpt.distributed.restore as dist_restore

        real_load = dist_restore.load_into

        def failing(obj, value, path, plugins, *, strict):  # type: ignore[no-untyped-def]
            if path == "mine":
                raise (ckpt.StateMismatchError if strict else RuntimeError)("the adapter of 'mine' refused it")
            return real_load(obj, value, path, plugins, strict=strict)

        if rank == 1:
            dist_restore.load_into = failing  # type: ignore[assignment]
        fill(live, 7.0)
        refused(url, live, 2, rank, "LOADFAIL")
        if rank == 0:  # its own values were loaded before the ranks agreed
            assert same(live, two)
        try:  # an error of no ckpt class: a CheckpointError on every rank
            ckpt.restore(url, live, step=2, strict=False)
        except ckpt.CheckpointError as exc:
            print("LOADFAIL2", rank, type(exc).__name__, str(exc)[:400].replace("\n", " "))
        else:
            raise AssertionError("no error")
        dist_restore.load_into = real_load  # type: ignore[assignment]
        info = ckpt.restore(url, live, step=2)  # and the next restore works on both
        assert info.step == 2 and same(live, two)
    elif scenario in ("fsdp", "fsdp_damaged"):  # FSDP2 shards: each rank's box into its local tensors
        fsdp(url, rank, damaged=scenario == "fsdp_damaged", where=where)
    elif scenario == "loader_refused_on_one_rank":  # rank 1's model misfits: rank 0 untracks its loader too
        url = os.path.join(where, "l")
        data = list(range(16))
        saved = ckpt.track(torch.utils.data.DataLoader(data, batch_size=4))
        ckpt.save(url, {"m": torch.nn.Linear(4, 4), "loader": saved}, step=1)
        loader = torch.utils.data.DataLoader(data, batch_size=4)
        refused(url, {"m": torch.nn.Linear(4 if rank == 0 else 3, 4), "loader": loader}, 1, rank)
        assert type(loader) is torch.utils.data.DataLoader, f"rank {rank}: {type(loader).__name__}"
        assert ckpt.restore(url, {"m": torch.nn.Linear(4, 4), "loader": loader}).step == 1
        assert type(loader) is not torch.utils.data.DataLoader, "a restore that fits tracks it"
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
