"""One rank of the local-tier scenarios: ``python tier_worker.py tiers <dir>`` (see
``conftest.run_ranks``). FSDP2 state and per-rank values (an RNG, a tensor) through one
run persisting every 2 steps, then restarts: rank 1's local tier gone, a local tier newer
than the durable one, a corrupt local object on rank 1 (of a persisted step, then of a
step only the local tiers hold). Prints ``OK`` last on success."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys

import torch
import torch.distributed as dist

import ckpt
from ckpt.storage.store import Store

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from dist_worker import fsdp_model, full, train_step
from tiers._tiers_util import corrupt, keys_of


def make(rank: int, seed: int) -> tuple[dict, torch.nn.Module, torch.optim.Optimizer, torch.Generator]:
    model, opt = fsdp_model(seed)
    train_step(model, opt)  # the optimizer holds its state, as after any resume
    gen = torch.Generator().manual_seed(1000 + seed)
    state = {"model": model, "optim": opt, "gen": gen, "r": {"rank": -1, "t": torch.zeros(3)}}
    return state, model, opt, gen


def snap(state: dict) -> dict:
    return {
        "model": full(state["model"].state_dict()),
        "optim": full(state["optim"].state_dict()["state"]),
        "gen": state["gen"].get_state().clone(),
        "t": state["r"]["t"].clone(),
        "rank": state["r"]["rank"],
    }


def check(state: dict, ref: dict, what: str) -> None:
    got = snap(state)
    for k, v in ref["model"].items():
        assert torch.equal(got["model"][k], v), (what, k)
    for i, s in ref["optim"].items():
        for k, v in s.items():
            assert torch.equal(got["optim"][i][k], v), (what, i, k)
    assert torch.equal(got["gen"], ref["gen"]) and torch.equal(got["t"], ref["t"]), what
    assert got["rank"] == ref["rank"], what


def advance(state: dict, rank: int, step: int) -> None:
    train_step(state["model"], state["optim"])
    torch.randn(2, generator=state["gen"])
    state["r"]["t"] = torch.full((3,), float(10 * step + rank))
    state["r"]["rank"] = rank


def tiers(where: str, rank: int) -> None:
    url, local = os.environ.get("TIER_DURABLE") or os.path.join(where, "durable"), os.path.join(where, "local")
    mine = os.path.join(local, f"rank-{rank:05d}")
    refs: dict[int, dict] = {}

    def restart(persist_every: int | None, want: int, tag: str) -> tuple:
        state, *_ = make(rank, 9)  # other values everywhere
        ck = ckpt.Checkpointer(url, local=local, persist_every=persist_every, state=state)
        print(f"PHASE {tag}", flush=True)
        info = ck.restore()
        assert info.step == want, (tag, info.step)
        check(state, refs[want], tag)
        return state, ck

    # run 1: every save to the local tiers, steps 2 and 4 to the durable one, 5 at close
    state, *_ = make(rank, 0)
    ck = ckpt.Checkpointer(url, local=local, persist_every=2, local_keep_last=2, state=state)
    assert type(ck).__name__ == "DistributedCheckpointer"
    for step in range(1, 6):
        advance(state, rank, step)
        refs[step] = snap(state)
        t = torch.ones(1)
        dist.all_reduce(t)  # training collectives while the tiers commit and persist
        ck.save(step=step)
        if step == 3:  # a persist still running when the next one is due would skip it
            ck.wait_persisted()
    ck.wait()
    assert Store(mine).steps() == [4, 5], Store(mine).steps()
    ck.close()
    assert ckpt.steps(url) == [2, 4, 5], ckpt.steps(url)

    # restart with rank 1's local tier gone: rank 1 reads the durable tier, rank 0 its own
    if rank == 1:
        shutil.rmtree(mine)
    dist.barrier()
    state, ck = restart(10, 5, "gone")
    for step in (6, 7):  # not persisted (persist_every=10); the run dies without closing
        advance(state, rank, step)
        refs[step] = snap(state)
        ck.save(step=step)
    ck.close(raise_errors=False)  # an error path: nothing is persisted
    assert ckpt.steps(url) == [2, 4, 5], ckpt.steps(url)

    # the local tiers are newer than the durable one: they win; close persists step 7
    state, ck = restart(10, 7, "newer")
    ck.close()
    assert ckpt.steps(url) == [2, 4, 5, 7], ckpt.steps(url)

    # a corrupt local object on rank 1: rank 1 reads step 7 from the durable tier, rank 0 locally
    if rank == 1:
        corrupt(Store(mine), 7, only=set(sorted(keys_of(Store(mine), 7))[:1]))
    dist.barrier()
    state, ck = restart(10, 7, "corrupt")
    advance(state, rank, 8)
    refs[8] = snap(state)
    ck.save(step=8)
    ck.close(raise_errors=False)
    # step 8 exists only in the local tiers, damaged on rank 1: every rank falls back to 7
    if rank == 1:
        corrupt(Store(mine), 8)
    dist.barrier()
    state, ck = restart(10, 7, "fallback")
    # an explicit step: only that step's copies (5: the durable tier, on every rank)
    print("PHASE step", flush=True)
    assert ck.restore(step=5).step == 5
    check(state, refs[5], "step 5")
    try:
        ck.restore(step=6)  # pruned from the local tiers, never persisted
        raise AssertionError("step 6 restored")
    except ckpt.NoCheckpointError as exc:
        assert "no checkpoint of step 6 in either tier" in str(exc), exc
    check(state, refs[5], "step 6 refused")
    ck.close()
    if rank == 0:
        torch.save({s: {"model": refs[s]["model"], "optim": refs[s]["optim"]} for s in refs}, f"{where}/ref.pt")
    # the refused arguments stay refused; the tiers' ones need a local tier
    for bad, why in (
        ({"local": local, "max_host_memory": 1 << 20}, "not supported with several ranks yet"),
        ({"persist_every": 5}, "persist_every needs a local tier"),
        ({"local": local, "persist_every": 0}, "persist_every must be a positive int"),
    ):
        try:
            ckpt.Checkpointer(url, **bad)
            raise AssertionError(f"{bad} accepted")
        except ckpt.CheckpointError as exc:
            assert why in str(exc), exc
    busy(where, rank)
    failing(where, rank)


def busy(where: str, rank: int) -> None:
    """A persist still running (slowed down on rank 1) when the next one falls due: every rank
    skips that one, training goes on; close persists the newest."""
    import time

    import ckpt.distributed.checkpointer as dck

    real = dck.commit_collective

    def slow(*args, **kwargs):
        if rank == 1 and kwargs["step"] == 1:
            time.sleep(1.5)
        return real(*args, **kwargs)

    dck.commit_collective = slow  # type: ignore[assignment]
    url = os.path.join(where, "busy")
    state = {"w": torch.zeros(4), "r": {"rank": rank}}
    ck = ckpt.Checkpointer(url, local=os.path.join(where, "busy-local"), persist_every=1, state=state)
    print("PHASE busy", flush=True)
    for step in (1, 2):
        state["w"].fill_(step)
        ck.save(step=step)
        ck.wait()  # the local commit, not the slow persist
    ck.close()
    dck.commit_collective = real  # type: ignore[assignment]
    assert ckpt.steps(url) == [1, 2], ckpt.steps(url)
    assert torch.equal(ckpt.load(url, step=2)["w"], torch.full((4,), 2.0))


def failing(where: str, rank: int) -> None:
    """A durable tier that cannot be written: the local saves go on, the failed persist raises
    on every rank at the next save, and close() raises it again after a failed last persist."""
    url = os.path.join(where, "not-a-dir")
    if rank == 0:
        with open(url, "w") as f:
            f.write("a file where the durable tier should be")
    dist.barrier()
    state = {"w": torch.zeros(4), "r": {"rank": rank}}
    ck = ckpt.Checkpointer(url, local=os.path.join(where, "failing-local"), persist_every=1, state=state)
    print("PHASE failing", flush=True)
    ck.save(step=1)
    ck.wait()
    try:
        ck.wait_persisted()
        raise AssertionError("persist did not fail")
    except ckpt.CheckpointError as exc:
        print("RAISED persist", type(exc).__name__, flush=True)
    ck.save(step=2).result()  # the local tier still takes every save (2 is persisted at close)
    assert Store(os.path.join(where, "failing-local", f"rank-{rank:05d}")).steps() == [1, 2]
    try:
        ck.close()
        raise AssertionError("close did not raise")
    except ckpt.CheckpointError as exc:
        print("RAISED close", type(exc).__name__, flush=True)


def resize(where: str, rank: int) -> None:
    """At 3 ranks after :func:`tiers` at 2: the local tiers are ignored (saved by another world
    size), the durable tier reshards; a preemption on one rank saves and persists at 3 ranks."""
    url, local = os.environ["TIER_DURABLE"], os.path.join(where, "local")
    ref = torch.load(os.path.join(where, "ref.pt"))
    state, model, opt, gen = make(rank, 9)
    ck = ckpt.Checkpointer(url, local=local, persist_every=100, local_keep_last=None, keep_last=2, preempt_deadline=0)

    @ck.resume(state)
    def train(start: int) -> None:
        assert start == 7, start
        got = full(model.state_dict())
        for k, v in ref[7]["model"].items():
            assert torch.equal(got[k], v), k
        got = full(opt.state_dict()["state"])
        for i, s in ref[7]["optim"].items():
            for k, v in s.items():
                assert torch.equal(got[i][k], v), (i, k)
        assert state["r"]["rank"] == rank % 2  # per-rank values of rank % saved world size
        for step in range(8, 20):
            advance(state, rank, step)
            if step == 9 and rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # one rank: every rank saves 9, persists it, exits
            ck.step(step)
        raise AssertionError("not preempted")

    try:
        train()
    except SystemExit as exc:
        assert exc.code == 0, exc.code
    mine = Store(os.path.join(local, f"rank-{rank:05d}"))
    assert 9 in mine.steps(), mine.steps()
    assert ckpt.read_manifest(url, 9).world_size == 3


def loader(where: str, rank: int) -> None:
    """A restore refused on rank 1 only (its model misfits) after rank 0 prepared its local
    tier's copy: rank 0's DataLoader is left untracked, as it was."""
    url, local = os.path.join(where, "durable"), os.path.join(where, "local")
    data = list(range(16))
    saved = ckpt.track(torch.utils.data.DataLoader(data, batch_size=4))
    ck = ckpt.Checkpointer(url, local=local, persist_every=1, state={"m": torch.nn.Linear(4, 4), "loader": saved})
    ck.save(step=1)
    ck.wait()
    ck.close()
    plain = torch.utils.data.DataLoader(data, batch_size=4)
    live = {"m": torch.nn.Linear(4 if rank == 0 else 3, 4), "loader": plain}
    ck = ckpt.Checkpointer(url, local=local, state=live)
    try:
        ck.restore()
        raise AssertionError(f"rank {rank}: restored a model of another shape")
    except ckpt.CheckpointError as exc:
        print(f"REFUSED {type(exc).__name__}", flush=True)
    assert type(plain) is torch.utils.data.DataLoader, f"rank {rank}: {type(plain).__name__}"
    ck.close()


def interrupted_close(where: str, rank: int) -> None:
    """Rank 1 interrupted in its last save leaves its ``with`` block (close without raising,
    nothing persisted); rank 0 closes as usual: neither persists alone, and rank 0 does not
    wait for rank 1 in the persist's gathers until CKPT_DIST_TIMEOUT."""
    import time

    import ckpt.distributed.checkpointer as dist_checkpointer

    durable, local = os.path.join(where, "durable"), os.path.join(where, "local")
    state = {"x": torch.full((4,), float(rank))}
    real = dist_checkpointer.capture_local

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    try:
        with ckpt.Checkpointer(durable, local=local, state=state) as ck:
            ck.save(step=1).result(timeout=60)
            if rank == 1:
                dist_checkpointer.capture_local = interrupt  # type: ignore[assignment]
            try:
                ck.save(step=2)
            except KeyboardInterrupt:
                print("INTERRUPTED", flush=True)
                raise
            t0 = time.monotonic()
    except KeyboardInterrupt:
        pass
    except ckpt.CheckpointError as exc:  # rank 0: the failed save of step 2, raised at close
        print(f"CLOSED {time.monotonic() - t0:.1f}s {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    finally:
        dist_checkpointer.capture_local = real  # type: ignore[assignment]
    assert ckpt.steps(durable) == [], ckpt.steps(durable)
    assert 1 in Store(os.path.join(local, f"rank-{rank:05d}")).steps()  # what a restart restores stands


def persisted_on_one_rank(where: str, rank: int) -> None:
    """The last persist recorded on rank 0 only (rank 1's after-commit hook failed after it):
    at close, rank 0 has nothing to persist and rank 1 has; they agree instead of rank 1
    waiting for rank 0 in a persist of its own."""
    import time

    from ckpt.hooks.manager import get_plugins

    durable, local = os.path.join(where, "durable"), os.path.join(where, "local")

    class FailingOnRank1:
        @ckpt.hookimpl
        def ckpt_after_commit(self, info):
            if rank == 1 and info.url == durable:
                raise RuntimeError("after-commit hook failed on rank 1 (test)")

    hook = FailingOnRank1()
    get_plugins().pm.register(hook, name="failing-after-commit")
    try:
        ck = ckpt.Checkpointer(durable, local=local, state={"x": torch.ones(4)}, persist_every=1)
        ck.save(step=1).result(timeout=60)
        try:
            ck.wait_persisted()
        except ckpt.CheckpointError:
            assert rank == 1
        t0 = time.monotonic()
        ck.close()
        print(f"AGREED {time.monotonic() - t0:.1f}s", flush=True)
    finally:
        get_plugins().pm.unregister(hook)
    assert ckpt.steps(durable) == [1]


def sigint_tiers(where: str, rank: int) -> None:
    """Real SIGINTs on rank 1. While it waits for rank 0 (slow to open its local tier) to
    build a Checkpointer: every rank raises, and neither holds its local tier after. While it
    closes, a persist due and rank 0 slow to read it back: the second Ctrl-C stops rank 1 at
    once and releases its local tier; the persist still completes."""
    import threading
    import time

    import ckpt.distributed.tier_run as tier_run

    durable, local = os.path.join(where, "durable"), os.path.join(where, "local")
    state = {"x": torch.full((4,), float(rank))}
    real_tier, real_part = tier_run.RankTier, tier_run.part_from_local

    def sigint_at(*seconds: float) -> None:
        for s in seconds:
            threading.Timer(s, lambda: os.kill(os.getpid(), signal.SIGINT)).start()

    def slow_tier(*a, **k):
        time.sleep(2.5)
        return real_tier(*a, **k)

    def slow_part(*a, **k):
        time.sleep(4)
        return real_part(*a, **k)

    def open_interrupted(label: str) -> None:
        """Build a Checkpointer, rank 0 slow to open its local tier, rank 1 SIGINT at 1 s."""
        if rank == 0:
            tier_run.RankTier = slow_tier  # type: ignore[assignment, misc]
        else:
            sigint_at(1.0)
        t0 = time.monotonic()
        try:
            ckpt.Checkpointer(durable, local=local, state=state)
        except KeyboardInterrupt:
            print(f"SIGTIER {label} {rank} KeyboardInterrupt {time.monotonic() - t0:.1f}s", flush=True)
        except ckpt.CheckpointError as exc:
            print(f"SIGTIER {label} {rank} CheckpointError {time.monotonic() - t0:.1f}s {str(exc)[:200]}", flush=True)
        else:
            raise AssertionError("the Checkpointer was built on every rank")
        finally:
            tier_run.RankTier = real_tier  # type: ignore[misc]

    open_interrupted("open")

    # the job's own handler, which raises: every rank raises there too (rank 1 its error)
    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop("stop (test)")

    previous = signal.signal(signal.SIGINT, stop)
    try:
        open_interrupted("handler")
    finally:
        signal.signal(signal.SIGINT, previous)
    ck = ckpt.Checkpointer(durable, local=local, state=state)  # no tier left held: no take_over needed
    ck.save(step=1).result(timeout=60)
    if rank == 0:
        tier_run.part_from_local = slow_part  # type: ignore[assignment]
    else:
        sigint_at(1.0, 1.5)
    t0 = time.monotonic()
    try:
        ck.close()
    except KeyboardInterrupt:
        print(f"SIGTIER close {rank} KeyboardInterrupt {time.monotonic() - t0:.1f}s", flush=True)
    else:
        print(f"SIGTIER close {rank} closed {time.monotonic() - t0:.1f}s", flush=True)
    finally:
        tier_run.part_from_local = real_part  # type: ignore[assignment]
    ck = ckpt.Checkpointer(durable, local=local, state=state)  # rank 1's local tier released
    assert ck.restore().step == 1 and torch.equal(state["x"], torch.full((4,), float(rank)))
    ck.close()
    assert ckpt.steps(durable) == [1], ckpt.steps(durable)


def closing(where: str, rank: int) -> None:
    interrupted_close(os.path.join(where, "interrupted"), rank)
    persisted_on_one_rank(os.path.join(where, "persisted"), rank)
    sigint_tiers(os.path.join(where, "sigint"), rank)


def main() -> None:
    scenario, where = sys.argv[1], sys.argv[2]
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
    dist.init_process_group("gloo")
    scenarios = {"tiers": tiers, "resize": resize, "loader": loader, "closing": closing}
    scenarios[scenario](where, dist.get_rank())
    dist.barrier()
    print("OK")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
