"""One rank of a multi-process test: ``python dist_worker.py <scenario> <dir>`` with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (see ``conftest.run_ranks``). Prints ``OK`` last
on success; an assertion failing exits non-zero."""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

import ckpt


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 5))


def fsdp_model(seed: int, hsdp: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """FSDP2 over every rank, or HSDP (a 2-D mesh: replicate x shard) with ``hsdp``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = mlp(seed)
    world = dist.get_world_size()
    mesh = (
        init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("rep", "shard"))
        if hsdp
        else init_device_mesh("cpu", (world,))
    )
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    torch.manual_seed(123)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    opt.zero_grad()


def full(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out[k] = full(v)
        elif hasattr(v, "full_tensor"):
            out[k] = v.full_tensor()
        elif isinstance(v, torch.Tensor):
            out[k] = v.detach().clone()  # optimizers update "step" in place
        else:
            out[k] = v
    return out


def main() -> None:
    scenario, where = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if scenario == "suite":  # several scenarios in one launch (process start-up is the cost)
        for name in ("ddp", "fail", "async", "in_place", "hooks", "interrupt"):
            run(name, os.path.join(where, name), rank)
    else:
        run(scenario, where, rank)
    dist.barrier()
    print("OK")
    sys.stdout.flush()
    os._exit(0)


def run(scenario: str, where: str, rank: int) -> None:
    url = os.path.join(where, "store")
    if scenario == "ddp":
        model = mlp(0)
        gen = torch.Generator().manual_seed(100 + rank)
        state = {"model": model, "rank": {"value": rank, "t": torch.full((3,), float(rank))}, "rng": gen, "step": 7}
        info = ckpt.save(url, state, step=1)
        assert info.step == 1
        expected_rng = gen.get_state().clone()
        gen.manual_seed(999)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        state["rank"] = {"value": -1, "t": torch.zeros(3)}
        ckpt.restore(url, state)
        assert state["rank"]["value"] == rank and torch.equal(state["rank"]["t"], torch.full((3,), float(rank)))
        assert torch.equal(gen.get_state(), expected_rng)
        assert torch.equal(model[0].weight, mlp(0)[0].weight)
    elif scenario in ("fsdp_save", "hsdp_save"):
        model, opt = fsdp_model(0, hsdp=scenario == "hsdp_save")
        train_step(model, opt)
        ckpt.save(url, {"model": model, "optim": opt, "r": {"v": rank}}, step=1)
        ref = {"model": full(model.state_dict()), "optim": full(opt.state_dict()["state"])}
        train_step(model, opt)  # a second save: deltas and dedup per shard
        ckpt.save(url, {"model": model, "optim": opt}, step=2)
        if rank == 0:
            torch.save(ref, os.path.join(where, "ref.pt"))
    elif scenario == "fsdp_restore":
        model, opt = fsdp_model(1)  # other values
        train_step(model, opt)  # optimizer state exists, as after any resume
        import warnings

        per_rank = {"v": -1}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ckpt.restore(url, {"model": model, "optim": opt, "r": per_rank}, step=1)
        saved_world = ckpt.read_manifest(url, 1).world_size
        assert per_rank["v"] == rank % saved_world, per_rank  # the documented rule
        assert any("rank %" in str(w.message) for w in caught) == (rank >= saved_world)
        ref = torch.load(os.path.join(where, "ref.pt"))
        got = full(model.state_dict())
        for k, v in ref["model"].items():
            assert torch.equal(got[k], v), k
        state = full(opt.state_dict()["state"])
        for i, s in ref["optim"].items():
            for k, v in s.items():
                assert torch.equal(state[i][k], v), (i, k)
        train_step(model, opt)  # the model still trains
    elif scenario == "fail":
        ckpt.save(url, {"x": torch.ones(3)}, step=1)
        bad = object() if rank == 1 else 0
        try:
            ckpt.save(url, {"x": torch.ones(3), "bad": bad}, step=2)
        except ckpt.CheckpointError as exc:
            print("RAISED", type(exc).__name__, exc)
        else:
            raise AssertionError("no error")
        assert ckpt.steps(url) == [1], ckpt.steps(url)
    elif scenario == "kill":
        ckpt.save(url, {"x": torch.ones(3)}, step=1)
        if rank == 1:
            import ckpt.distributed.coordinator as coord

            def die(*a, **k):
                os.kill(os.getpid(), signal.SIGKILL)

            coord.write_objects = die  # type: ignore[assignment]
        try:
            ckpt.save(url, {"x": torch.full((3,), 2.0), "r": rank}, step=2)
        except ckpt.CheckpointError as exc:
            print("RAISED", type(exc).__name__, str(exc)[:200])
            sys.stdout.flush()
            os._exit(0)
        raise AssertionError("no error")
    elif scenario == "async":
        model = mlp(0)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        state = {"model": model, "optim": opt, "rank": {"r": rank}}
        ck = ckpt.Checkpointer(url, every=2, state=state)
        assert type(ck).__name__ == "DistributedCheckpointer"
        snapshots = {}
        for step in range(1, 7):
            torch.manual_seed(step)
            ddp(torch.randn(4, 6)).sum().backward()  # DDP's all_reduce of gradients
            opt.step()
            opt.zero_grad()
            t = torch.ones(1)
            dist.all_reduce(t)  # training collectives while the background commits run
            assert t.item() == dist.get_world_size()
            if step % 2 == 0:
                snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
            ck.step(step)
        ck.close()
        assert ckpt.steps(url) == [2, 4, 6], ckpt.steps(url)
        for step, sd in snapshots.items():
            got = ckpt.load(url, step=step, rank=rank)
            assert got["rank"]["r"] == rank
            for k, v in sd.items():
                assert torch.equal(got["model"][k], v), (step, k)
    elif scenario == "in_place":  # whole tensors on local disk: decoded straight into the live ones
        import ckpt.distributed.restore as dist_restore
        import ckpt.state.in_place as in_place_mod

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 8))  # 2 MiB: not packed
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        model(torch.randn(4, 512)).sum().backward()
        opt.step()
        state = {"model": model, "optim": opt, "mine": {"t": torch.full((300_000,), float(rank))}}
        ckpt.save(url, state, step=1)
        want = full({"model": model.state_dict(), "optim": opt.state_dict()["state"]})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
            for s in opt.state.values():
                s["exp_avg"].zero_()
        state["mine"]["t"].zero_()
        filled: list[str] = []
        read = in_place_mod.read_tensors

        def spy(store, codecs, plan, **kw):
            if kw.get("destinations"):
                filled.extend(plan.paths)
            return read(store, codecs, plan, **kw)

        in_place_mod.read_tensors = spy  # type: ignore[assignment]
        ptr = model[0].weight.data_ptr()
        ckpt.restore(url, state)
        got = full({"model": model.state_dict(), "optim": opt.state_dict()["state"]})
        for k, v in want["model"].items():
            assert torch.equal(got["model"][k], v), k
        for i, moments in want["optim"].items():
            for k, v in moments.items():
                assert torch.equal(got["optim"][i][k], v), (i, k)
        assert torch.equal(state["mine"]["t"], torch.full((300_000,), float(rank)))
        assert {"model/0.weight", "optim/state/0/exp_avg", "mine/t"} <= set(filled), filled
        assert model[0].weight.data_ptr() == ptr
        decode_in_place = dist_restore.decode_in_place
        if rank == 1:  # the second pass fails on one rank (an object rewritten in between): every rank raises

            def rewritten(ip, codecs):
                raise ckpt.CorruptCheckpointError("object rewritten after it was verified (test)")

            dist_restore.decode_in_place = rewritten  # type: ignore[assignment]
        try:
            ckpt.restore(url, state)
        except ckpt.CheckpointError as exc:
            print("LATE", rank, type(exc).__name__, str(exc)[:300])
        else:
            raise AssertionError("no error")
        finally:
            dist_restore.decode_in_place = decode_in_place  # type: ignore[assignment]
            in_place_mod.read_tensors = read  # type: ignore[assignment]
    elif scenario == "hooks":
        after_restore_collective(url, rank)
    elif scenario == "interrupt":
        interrupted_rank(url, rank)
    elif scenario == "interrupt_wait":
        report_keeps_to_its_group(os.path.join(where, "group"), rank)
        interrupt_while_waiting(url, rank)
    elif scenario == "sigint":
        sigint_anywhere(url, rank)
    elif scenario == "checkpointer":  # refusals, retention, resume, preemption, damaged newest
        checkpointer_features(where, rank)
    else:
        raise SystemExit(f"unknown scenario {scenario}")


def after_restore_collective(url: str, rank: int) -> None:
    """An after-restore hook with a collective of its own runs on every rank once every rank
    has loaded, and on none when one rank's load fails (which raises on every rank)."""
    import datetime

    import ckpt.distributed.restore as dist_restore
    from ckpt.hooks.manager import get_plugins

    calls: list[float] = []

    class CollectiveHook:
        @ckpt.hookimpl
        def ckpt_after_restore(self, info, state):
            t = torch.ones(1)
            dist.all_reduce(t, async_op=True).wait(timeout=datetime.timedelta(seconds=20))
            calls.append(t.item())

    hook = CollectiveHook()
    pm = get_plugins().pm
    pm.register(hook, name="collective-hook")
    real = dist_restore.load_into
    try:
        ckpt.save(url, {"x": torch.ones(3)}, step=1)
        state = {"x": torch.zeros(3)}
        ckpt.restore(url, state)
        assert calls == [2.0] and torch.equal(state["x"], torch.ones(3)), calls
        if rank == 1:

            def broken(*a, **k):
                raise RuntimeError("adapter failed (test)")

            dist_restore.load_into = broken  # type: ignore[assignment]
        try:
            ckpt.restore(url, state)
        except Exception as exc:  # printed for the test to check
            print("HOOKS", rank, type(exc).__name__, str(exc)[:300])
        else:
            raise AssertionError("no error")
        assert calls == [2.0], calls  # no rank ran the hook after a failed load
    finally:
        dist_restore.load_into = real  # type: ignore[assignment]
        pm.unregister(hook)


def interrupted_rank(url: str, rank: int) -> None:
    """A KeyboardInterrupt on rank 1 in the middle of a collective save and of a restore: it
    reaches rank 1 as it is, rank 0 raises at once naming it, nothing is committed, and the
    ranks' collectives still line up afterwards (the next save and restore work)."""
    import time

    import ckpt.distributed.coordinator as coord
    import ckpt.distributed.restore as dist_restore

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    ckpt.save(url, {"x": torch.ones(3)}, step=1)
    state = {"x": torch.zeros(3)}
    for what, module, name, call in (
        ("save", coord, "write_objects", lambda: ckpt.save(url, {"x": torch.full((3,), 2.0)}, step=2)),
        ("restore", dist_restore, "load_into", lambda: ckpt.restore(url, state)),
    ):
        real = getattr(module, name)
        if rank == 1:
            setattr(module, name, interrupt)
        t0 = time.monotonic()
        try:
            call()
        except KeyboardInterrupt:
            print("INTERRUPT", what, rank, "KeyboardInterrupt")
        except ckpt.CheckpointError as exc:
            print("INTERRUPT", what, rank, type(exc).__name__, f"{time.monotonic() - t0:.1f}s", str(exc)[:300])
        else:
            raise AssertionError(f"{what}: no error")
        finally:
            setattr(module, name, real)
    # the Checkpointer: interrupted while it stages; rank 0's background commit learns of it
    import ckpt.distributed.checkpointer as dist_checkpointer

    real = dist_checkpointer.capture_local
    if rank == 1:
        dist_checkpointer.capture_local = interrupt  # type: ignore[assignment]
    ck = ckpt.Checkpointer(url + "-async", state={"x": torch.ones(3)})
    t0 = time.monotonic()
    try:
        ck.save(step=1).result(timeout=60)
    except KeyboardInterrupt:
        print("INTERRUPT checkpointer", rank, "KeyboardInterrupt")
    except ckpt.CheckpointError as exc:
        print("INTERRUPT checkpointer", rank, type(exc).__name__, f"{time.monotonic() - t0:.1f}s", str(exc)[:300])
    else:
        raise AssertionError("checkpointer: no error")
    finally:
        dist_checkpointer.capture_local = real  # type: ignore[assignment]
        ck.close(raise_errors=False)
    assert ckpt.steps(url + "-async") == []
    # interrupted while save() waits for the last commit (before it stages): the step's commit
    # still goes out, failed, so the ranks stay in step: the next save raises that failure on
    # every rank, the one after commits every rank's own values
    real_wait = dist_checkpointer.DistributedCheckpointer._wait_inflight

    def wait_then_interrupt(self):
        real_wait(self)
        raise KeyboardInterrupt

    mine = {"shared": torch.zeros(2), "mine": torch.zeros(2)}
    ck = ckpt.Checkpointer(url + "-waiting", state=mine)
    for s in (1, 2, 3, 4):
        mine["shared"].fill_(s)
        mine["mine"].fill_(10 * s + rank)
        if rank == 1 and s == 2:
            dist_checkpointer.DistributedCheckpointer._wait_inflight = wait_then_interrupt  # type: ignore[method-assign]
        try:
            ck.save(step=s)
        except (KeyboardInterrupt, ckpt.CheckpointError) as exc:
            print("WAITING", s, rank, type(exc).__name__, flush=True)
        finally:
            dist_checkpointer.DistributedCheckpointer._wait_inflight = real_wait  # type: ignore[method-assign]
    ck.close()
    assert ckpt.steps(url + "-waiting") == [1, 4], ckpt.steps(url + "-waiting")
    got = {"shared": torch.zeros(2), "mine": torch.zeros(2)}
    ckpt.restore(url + "-waiting", got, step=4)
    assert got["shared"].tolist() == [4.0, 4.0] and got["mine"].tolist() == [40.0 + rank] * 2, got
    assert ckpt.steps(url) == [1], ckpt.steps(url)
    ckpt.save(url, {"x": torch.full((3,), 3.0)}, step=3)
    ckpt.restore(url, state)
    assert ckpt.steps(url) == [1, 3] and torch.equal(state["x"], torch.full((3,), 3.0))
    # a rank that missed a save (interrupted before it staged) is one step ahead of the others:
    # its values are never committed under their step, by ckpt.save or the Checkpointer
    try:
        ckpt.save(url, {"x": torch.full((3,), 9.0)}, step=4 + rank)
    except ckpt.CheckpointError as exc:
        print("MISSED save", rank, str(exc)[:300])
    else:
        raise AssertionError("steps 4 and 5 committed as one")
    ck = ckpt.Checkpointer(url + "-missed", state={"x": torch.ones(3)})
    try:
        ck.save(step=2 + rank).result(timeout=60)
    except ckpt.CheckpointError as exc:
        print("MISSED checkpointer", rank, str(exc)[:300])
    else:
        raise AssertionError("steps 2 and 3 committed as one")
    finally:
        ck.close(raise_errors=False)
    assert ckpt.steps(url) == [1, 3] and ckpt.steps(url + "-missed") == []


def interrupt_while_waiting(url: str, rank: int) -> None:
    """Rank 0 interrupted in a save while rank 1 is slow: a second Ctrl-C ends rank 0's wait
    for rank 1 at once; and when rank 1 dies instead, rank 0 still gets its KeyboardInterrupt."""
    import threading
    import time

    import ckpt.distributed.coordinator as coord

    ckpt.save(url, {"x": torch.ones(3)}, step=1)
    real = coord.write_objects

    def slow(*a, **k):
        time.sleep(6)
        return real(*a, **k)

    def interrupt_twice(*a, **k):
        threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        raise KeyboardInterrupt

    coord.write_objects = interrupt_twice if rank == 0 else slow  # type: ignore[assignment]
    t0 = time.monotonic()
    try:
        ckpt.save(url, {"x": torch.full((3,), 2.0)}, step=2)
    except KeyboardInterrupt:
        print("WAIT second", rank, f"{time.monotonic() - t0:.1f}s")
    except ckpt.CheckpointError as exc:
        print("WAIT second", rank, type(exc).__name__, str(exc)[:200])
    # rank 0's report still reaches rank 1 once it answers: rank 0's next gather waits for it

    def die(*a, **k):
        print("WAIT rank 1 exits")
        sys.stdout.flush()
        os._exit(0)

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    coord.write_objects = interrupt if rank == 0 else die  # type: ignore[assignment]
    try:
        ckpt.save(url, {"x": torch.full((3,), 3.0)}, step=3)
    except KeyboardInterrupt:
        print("WAIT dead", rank, "KeyboardInterrupt")
    except ckpt.CheckpointError as exc:
        print("WAIT dead", rank, type(exc).__name__, str(exc)[:200])
    coord.write_objects = real  # type: ignore[assignment]
    assert ckpt.steps(url) == [1], ckpt.steps(url)
    print("OK")
    sys.stdout.flush()
    os._exit(0)


def _outcome(what: str, rank: int, call) -> None:
    """Print how ``call`` ended on this rank: ``SIGINT <what> <rank> <outcome> <seconds>s ...``."""
    import time

    t0 = time.monotonic()
    try:
        got = call()
    except KeyboardInterrupt:
        print("SIGINT", what, rank, "KeyboardInterrupt", f"{time.monotonic() - t0:.1f}s", flush=True)
    except ckpt.CheckpointError as exc:
        print("SIGINT", what, rank, type(exc).__name__, f"{time.monotonic() - t0:.1f}s", str(exc)[:300], flush=True)
    else:
        print("SIGINT", what, rank, "returned", f"{time.monotonic() - t0:.1f}s", got, flush=True)


def sigint_anywhere(url: str, rank: int) -> None:
    """Real SIGINTs, landing where a Ctrl-C does: while the rank waits for a slow one inside
    ckpt's gathers, and right after rank 0 wrote the manifest. The interrupted rank gets its
    KeyboardInterrupt, the others a CheckpointError naming it (or, once the step is committed,
    the step), and the ranks stay in step: every later save and restore works. Last, two
    SIGINTs: the second stops the waiting rank at once."""
    import threading
    import time

    import ckpt.distributed.coordinator as coord
    import ckpt.distributed.restore as dist_restore

    def sigint_at(seconds: float) -> None:
        threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT)).start()

    def x(v: float) -> dict:
        return {"x": torch.full((3,), v), "r": {"rank": torch.full((2,), float(10 * v + rank))}}

    ckpt.save(url, x(1.0), step=1)
    real_capture, real_commit, real_first = coord.capture_local, coord.commit, dist_restore._first

    def slow_capture(*a, **k):
        time.sleep(2.5)
        return real_capture(*a, **k)

    # 1. rank 1 waits in the save's first gather for rank 0 (slow to capture) and gets a SIGINT
    if rank == 0:
        coord.capture_local = slow_capture  # type: ignore[assignment]
    else:
        sigint_at(1.0)
    _outcome("save", rank, lambda: ckpt.save(url, x(2.0), step=2).step)
    coord.capture_local = real_capture  # type: ignore[assignment]
    assert ckpt.steps(url) == [1], ckpt.steps(url)

    # 2. rank 0 gets a SIGINT right after it wrote step 3's manifest: step 3 is committed and
    # every rank is told so; rank 0 raises the interrupt afterwards
    def commit_then_sigint(*a, **k):
        out = real_commit(*a, **k)
        os.kill(os.getpid(), signal.SIGINT)
        return out

    if rank == 0:
        coord.commit = commit_then_sigint  # type: ignore[assignment]
    _outcome("committed", rank, lambda: ckpt.save(url, x(3.0), step=3).step)
    coord.commit = real_commit  # type: ignore[assignment]
    assert ckpt.steps(url) == [1, 3], ckpt.steps(url)

    # 3. rank 1 waits in the restore's first gather for rank 0 (slow to pick the step)
    def slow_first(*a, **k):
        time.sleep(2.5)
        return real_first(*a, **k)

    live = x(0.0)
    if rank == 0:
        dist_restore._first = slow_first  # type: ignore[assignment]
    else:
        sigint_at(1.0)
    _outcome("restore", rank, lambda: ckpt.restore(url, live).step)
    dist_restore._first = real_first  # type: ignore[assignment]
    assert torch.equal(live["x"], torch.zeros(3)) and torch.equal(live["r"]["rank"], torch.full((2,), float(rank)))

    # still in step: a save and a restore of every rank's own values
    ckpt.save(url, x(4.0), step=4)
    assert ckpt.restore(url, live).step == 4
    assert torch.equal(live["x"], torch.full((3,), 4.0)), live
    assert torch.equal(live["r"]["rank"], torch.full((2,), 40.0 + rank)), live
    print("SIGINT in step", rank, flush=True)

    # 4. two SIGINTs on rank 1, the second ending its wait in the save's first gather, where
    # rank 0 (slow) sends a failure of its own: every rank ends the save there, in step
    def slow_failing_capture(*a, **k):
        time.sleep(2.5)
        raise ValueError("capture failed on rank 0 (test)")

    if rank == 0:
        coord.capture_local = slow_failing_capture  # type: ignore[assignment]
    else:
        sigint_at(0.5)
        sigint_at(1.0)
    _outcome("failed", rank, lambda: ckpt.save(url, x(5.0), step=5).step)
    coord.capture_local = real_capture  # type: ignore[assignment]
    _outcome("after", rank, lambda: ckpt.save(url, x(6.0), step=6).step)
    assert ckpt.steps(url) == [1, 3, 4, 6], ckpt.steps(url)
    assert ckpt.restore(url, live).step == 6 and torch.equal(live["r"]["rank"], torch.full((2,), 60.0 + rank))

    # 5. the job's own SIGINT handler, which does not raise (it asks the loop to stop after
    # the next checkpoint): rank 1's save is not failed for it, the handler runs once after
    calls: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    if rank == 0:
        coord.capture_local = slow_capture  # type: ignore[assignment]
    else:
        sigint_at(1.0)
    _outcome("handled", rank, lambda: (ckpt.save(url, x(7.0), step=7).step, len(calls)))
    coord.capture_local = real_capture  # type: ignore[assignment]
    assert signal.getsignal(signal.SIGINT) is not previous and len(calls) == rank, calls  # the job's handler back
    signal.signal(signal.SIGINT, previous)
    assert ckpt.steps(url) == [1, 3, 4, 6, 7], ckpt.steps(url)

    # 6. two SIGINTs on rank 1 while a Checkpointer's restore waits for the commit in flight
    # (rank 0's is slow), before the restore's first gather: that gather still carries rank
    # 1's failure, so rank 0 raises there, and the next restore is in step
    real_write = coord.write_objects

    def slow_write(*a, **k):
        time.sleep(3)
        return real_write(*a, **k)

    ck = ckpt.Checkpointer(url + "-ck", state=x(1.0))
    ck.save(step=1).result(timeout=60)
    if rank == 0:
        coord.write_objects = slow_write  # type: ignore[assignment]
    ck.save(state=x(2.0), step=2)
    if rank == 1:
        sigint_at(0.5)
        sigint_at(1.0)
    _outcome("waiting", rank, lambda: ck.restore(x(0.0)).step)
    coord.write_objects = real_write  # type: ignore[assignment]
    mine = x(0.0)
    assert ck.restore(mine).step == 2 and torch.equal(mine["r"]["rank"], torch.full((2,), 20.0 + rank)), mine
    ck.close()

    # 7. two SIGINTs on rank 1 in the save's first gather, whose values rank 0 goes on with:
    # rank 1's next call refuses (out of step) instead of meeting rank 0's next gather; rank 0
    # raises once rank 1 exits
    if rank == 0:
        coord.capture_local = slow_capture  # type: ignore[assignment]
        _outcome("twice", rank, lambda: ckpt.save(url, x(8.0), step=8).step)
        coord.capture_local = real_capture  # type: ignore[assignment]
        assert ckpt.steps(url) == [1, 3, 4, 6, 7], ckpt.steps(url)
    else:
        sigint_at(0.5)
        sigint_at(1.0)
        _outcome("twice", rank, lambda: ckpt.save(url, x(8.0), step=8).step)
        _outcome("refused", rank, lambda: ckpt.save(url, x(9.0), step=9).step)
    print("OK", flush=True)
    os._exit(0)  # rank 1 out of step: no barrier


def report_keeps_to_its_group(where: str, rank: int) -> None:
    """Rank 0 interrupted (a real SIGINT) in a synchronous save while its Checkpointer's commit,
    on the Checkpointer's own group, still waits for rank 1, which reaches the synchronous save
    only after that commit: the interrupt's report orders ckpt's group, not the Checkpointer's."""
    import threading
    import time

    from ckpt.hooks.manager import get_plugins

    a, b = os.path.join(where, "A"), os.path.join(where, "B")
    ckpt.save(b, {"x": torch.zeros(4)}, step=0)
    ck = ckpt.Checkpointer(a, state={"x": torch.ones(4)})
    ck.save(step=1).result(timeout=60)

    class Slow:
        @ckpt.hookimpl
        def ckpt_before_save(self, url, step, tree):
            if url == b and step == 1:
                time.sleep(2)

    t0 = time.monotonic()
    if rank == 0:
        get_plugins().pm.register(Slow(), name="slow-before-save")
        ck.save(step=2)
        threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            ckpt.save(b, {"x": torch.ones(4)}, step=1)
        except KeyboardInterrupt:
            print(f"GROUP 0 KeyboardInterrupt {time.monotonic() - t0:.1f}s", flush=True)
        ck.wait()
    else:
        time.sleep(3)
        ck.save(step=2)
        ck.wait()
        try:
            ckpt.save(b, {"x": torch.ones(4)}, step=1)
        except ckpt.CheckpointError as exc:
            print(f"GROUP 1 {time.monotonic() - t0:.1f}s {str(exc)[:200]}", flush=True)
    ck.close()
    assert ckpt.steps(a) == [1, 2] and ckpt.steps(b) == [0]


def checkpointer_features(where: str, rank: int) -> None:
    from ckpt.errors import CorruptCheckpointError

    refused = (
        {"max_host_memory": 1 << 20},
        {"if_busy": "skip"},
    )
    for bad in refused:
        try:
            ckpt.Checkpointer(os.path.join(where, "refused"), **bad)
            raise AssertionError(f"{bad} accepted")
        except ckpt.CheckpointError as exc:
            assert "not supported with several ranks yet" in str(exc), exc
            print("REFUSED", list(bad)[0])
    # retention: keep_last=2 and keep_every=4 after each collective commit
    url = os.path.join(where, "kept")
    state = {"w": torch.zeros(3), "r": {"rank": rank}}
    with ckpt.Checkpointer(url, every=1, keep_last=2, keep_every=4, state=state) as ck:
        for step in range(1, 7):
            state["w"].fill_(step)
            ck.step(step)
    assert ckpt.steps(url) == [4, 5, 6], ckpt.steps(url)
    # resume: a fresh run starts at 0 and saves its last step; a second one resumes from it
    url = os.path.join(where, "resumed")
    model = mlp(rank)  # per-rank weights: each rank gets its own back
    ck = ckpt.Checkpointer(url, every=2)

    @ck.resume(model=model, extra={"rank": rank})
    def train(start: int) -> int:
        assert start == 0
        for step in range(1, 4):
            with torch.no_grad():
                model[0].weight.add_(1.0)
            ck.step(step)
        return start

    train()
    assert ckpt.steps(url) == [2, 3], ckpt.steps(url)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    model2 = mlp(7)
    ck = ckpt.Checkpointer(url, every=100, preempt_deadline=0)

    @ck.resume(model=model2, extra={"rank": rank})
    def train2(start: int) -> None:
        assert start == 3, start
        assert all(torch.equal(model2.state_dict()[k], v) for k, v in want.items())
        for step in range(start + 1, 10):
            if step == 5 and rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # one rank only: every rank stops at step 5
            ck.step(step)
        raise AssertionError("not preempted")

    try:
        train2()
    except SystemExit as exc:
        assert exc.code == 0, exc.code
        print("PREEMPTED")
    assert ckpt.steps(url) == [2, 3, 5], ckpt.steps(url)
    # a damaged newest (an object only rank 1 reads) falls back on every rank to the one before
    url = os.path.join(where, "damaged")
    for step in (1, 2):
        ckpt.save(url, {"t": torch.full((4,), float(10 * step + rank))}, step=step)
    if rank == 1:
        store = ckpt.storage.store.Store(url)
        ref = ckpt.read_manifest(url, step=2).tensors["$rank/1/t"].chunks[0]
        store.delete(store.object_path(ref.key))
    dist.barrier()
    live = {"t": torch.zeros(4)}
    try:
        ckpt.restore(url, live, step=2)
        raise AssertionError("damaged step 2 restored")
    except CorruptCheckpointError as exc:
        print("RAISED", type(exc).__name__)
    assert torch.equal(live["t"], torch.zeros(4))  # nothing live changed on any rank
    info = ckpt.restore(url, live)
    assert info.step == 1 and torch.equal(live["t"], torch.full((4,), float(10 + rank))), (info.step, live)


if __name__ == "__main__":
    main()
