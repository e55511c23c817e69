"""Async section (issue 3): ckpt.Checkpointer.save() vs DCP async_save on the MLP + AdamW state.

Three measurements on the same live state:

1. the time the training thread spends in the save call: ``Checkpointer.save()`` vs
   ``torch.distributed.checkpoint.async_save`` (default, and with DCP's ``DefaultStager``
   options that run on a CPU) vs cloning every tensor of the state once;
2. a real training loop (forward, backward, AdamW step on random data) with no
   checkpoints, and with a checkpoint every 5 steps (20 steps, 2 rounds) and every 50 steps
   (100 steps, 1 round) by ckpt, DCP async_save (default and with DefaultStager async
   staging) and a synchronous torch.save + fsync: overhead against no checkpoints and the
   loop-time ratio against DCP async_save with async staging (issue 17's reference);
3. the time from ``save()`` returning to the commit vs a synchronous ``ckpt.save``.
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import common, report
from benchmarks.common import median, now

EVERY = 5


def _dirs(workdir: str, prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix, dir=workdir)


def _dcp_sd(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


class Trainer:
    """The MLP + AdamW and a fixed random batch; ``step(before_opt)`` runs one training step."""

    def __init__(self, layers: int, width: int, batch: int) -> None:
        self.model = common.make_mlp(layers, width, seed=0)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(batch, width, generator=g)

    @property
    def state(self) -> dict[str, Any]:
        return {"model": self.model, "optim": self.opt}

    def step(self, before_opt: Callable[[], None] | None = None) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.model(self.x).square().mean().backward()
        if before_opt is not None:
            before_opt()
        self.opt.step()


# -- 1 + 3: the save call, staging and commit -------------------------------------------


def bench_calls(tr: Trainer, repeats: int, workdir: str, log) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    import ckpt

    out: dict[str, Any] = {}
    tensors = common.state_tensors(tr.state)

    # one memcpy of the state: clone every tensor once (what a naive snapshot does)
    clone_s, copy_s = [], []
    for _ in range(repeats + 1):
        gc.collect()
        t0 = now()
        copies = [t.clone() for t in tensors]
        clone_s.append(now() - t0)
        t0 = now()
        for c, t in zip(copies, tensors):
            c.copy_(t)
        copy_s.append(now() - t0)
        del copies
    out["memcpy_clone"] = {"label": "clone every tensor once", "call_s": median(clone_s[1:]), "all": clone_s[1:]}
    out["memcpy_prealloc"] = {
        "label": "copy into preallocated buffers",
        "call_s": median(copy_s[1:]),
        "all": copy_s[1:],
    }
    log(
        f"  memcpy: clone {out['memcpy_clone']['call_s']:.3f}s, into preallocated {out['memcpy_prealloc']['call_s']:.3f}s"
    )

    # ckpt: one Checkpointer, a warm-up save (allocates the reused staging pool), then
    # per repeat: a training step (everything changes, so nothing dedups), save(), commit
    url = _dirs(workdir, "async-ckpt-")
    call, staged, after, total = [], [], [], []
    with ckpt.Checkpointer(url, keep_last=2) as ck:
        tr.step()
        ck.save(tr.state, step=1).wait()
        for r in range(repeats):
            tr.step()
            gc.collect()
            t0 = now()
            h = ck.save(tr.state, step=r + 2)
            t1 = now()
            h.wait_staged()
            t2 = now()
            h.wait()
            t3 = now()
            call.append(t1 - t0)
            staged.append(t2 - t0)
            after.append(t3 - t1)
            total.append(t3 - t0)
            log(f"  ckpt save(): call {t1 - t0:.4f}s staged {t2 - t0:.3f}s commit after return {t3 - t1:.3f}s")
        last_step = repeats + 1
    # the checkpoint holds the state as it was at the call (no training happened since)
    fresh = {"model": common.make_mlp(len(tr.model), tr.x.shape[1], seed=9)}
    fresh["optim"] = torch.optim.AdamW(fresh["model"].parameters(), lr=1e-4)
    ckpt.restore(url, fresh, step=last_step)
    problem = common.state_diff(tr.state, fresh)
    assert problem is None, f"async ckpt checkpoint is not bit-exact: {problem}"
    del fresh
    common.rmtree(url)
    out["ckpt"] = {
        "label": "ckpt Checkpointer.save()",
        "call_s": median(call),
        "staged_s": median(staged),
        "commit_after_return_s": median(after),
        "total_s": median(total),
        "all": call,
        "bit_exact": True,
    }

    # synchronous ckpt.save of the same (changing) state: into one store, step after step, as
    # the Checkpointer does (so with the same parent checkpoint, dedup and delta work), and
    # each to a fresh store (a full checkpoint, as in the core section)
    sync, fresh_sync = [], []
    url = _dirs(workdir, "sync-ckpt-")
    tr.step()
    ckpt.save(url, tr.state, step=1)
    for r in range(repeats):
        tr.step()
        gc.collect()
        t0 = now()
        ckpt.save(url, tr.state, step=r + 2)
        sync.append(now() - t0)
    common.rmtree(url)
    for _ in range(repeats):
        tr.step()
        path = _dirs(workdir, "sync-fresh-")
        os.rmdir(path)
        gc.collect()
        t0 = now()
        ckpt.save(path, tr.state, step=1)
        fresh_sync.append(now() - t0)
        common.rmtree(path)
    out["ckpt_sync"] = {
        "label": "ckpt.save (synchronous, next step into the same store)",
        "call_s": median(sync),
        "total_s": median(sync),
        "all": sync,
    }
    out["ckpt_sync_fresh"] = {
        "label": "ckpt.save (synchronous, fresh store: full checkpoint)",
        "call_s": median(fresh_sync),
        "total_s": median(fresh_sync),
        "all": fresh_sync,
    }
    log(f"  ckpt.save sync {median(sync):.3f}s")

    # DCP async_save: the default (a fresh DefaultStager per call, synchronous staging) and
    # the DefaultStager options available without CUDA, each stager reused across saves.
    variants: list[tuple[str, str, Callable[[], Any] | None]] = [
        ("dcp_default", "DCP async_save (default)", None),
        (
            "dcp_stager_reused",
            "DCP async_save, DefaultStager reused (cached staging buffers)",
            lambda: DefaultStager(StagingOptions(False, False, False, False)),
        ),
        (
            "dcp_async_staging",
            "DCP async_save, DefaultStager(use_async_staging=True)",
            lambda: DefaultStager(StagingOptions(False, False, True, False)),
        ),
        (
            "dcp_shared_memory",
            "DCP async_save, DefaultStager(use_shared_memory=True)",
            lambda: DefaultStager(StagingOptions(False, True, False, False)),
        ),
    ]
    for key, label, make in variants:
        stager = make() if make else None
        call, staged, total = [], [], []
        for r in range(repeats + (1 if stager else 0)):  # reused stagers get a warm-up save
            tr.step()
            path = _dirs(workdir, f"{key}-")
            gc.collect()
            t0 = now()
            res = dcp.async_save(
                _dcp_sd(tr.model, tr.opt), storage_writer=dcp.FileSystemWriter(path), async_stager=stager
            )
            t1 = now()
            if hasattr(res, "staging_completion"):
                res.staging_completion.result()
                t2 = now()
                res.upload_completion.result()
            else:
                t2 = t1
                res.result()
            t3 = now()
            common.rmtree(path)
            if stager is not None and r == 0:
                continue
            call.append(t1 - t0)
            staged.append(t2 - t0)
            total.append(t3 - t0)
        if stager is not None:
            stager.close()
        out[key] = {
            "label": label,
            "call_s": median(call),
            "staged_s": median(staged),
            "total_s": median(total),
            "all": call,
        }
        log(f"  {key}: call {median(call):.3f}s staged {median(staged):.3f}s committed {median(total):.3f}s")
        gc.collect()
    return out


# -- 2: the training loop ----------------------------------------------------------------

#: loop configurations: key -> label (``{every}`` is filled in)
LOOP_KINDS = {
    "none": "no checkpoints",
    "ckpt": "ckpt Checkpointer.save every {every} steps",
    "dcp_default": "DCP async_save (default) every {every} steps",
    "dcp_async_staging": "DCP async_save + DefaultStager(use_async_staging=True) every {every} steps",
    "torch_save": "torch.save + fsync (synchronous) every {every} steps",
}


def loop_once(tr: Trainer, kind: str, steps: int, workdir: str, every: int = EVERY) -> dict[str, Any]:
    """Run ``steps`` training steps, checkpointing after every ``every``-th (not the last);
    the time includes waiting for the last checkpoint to commit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    import ckpt

    url = _dirs(workdir, f"loop-{kind}-")
    saves = [s for s in range(every, steps, every)]
    ck = ckpt.Checkpointer(url, keep_last=2) if kind == "ckpt" else None
    stager = DefaultStager(StagingOptions(False, False, True, False)) if kind == "dcp_async_staging" else None
    pending: list[Any] = []  # DCP futures / responses not yet waited for
    staging: list[Any] = []
    gc.collect()

    def before_opt() -> None:
        # DCP with async staging: the state must not change before staging is done
        while staging:
            staging.pop().result()

    t0 = now()
    for s in range(1, steps + 1):
        tr.step(before_opt if stager is not None else None)
        if s in saves:
            if kind == "ckpt":
                ck.save(tr.state, step=s)
            elif kind == "torch_save":
                with open(f"{url}/{s}.pt", "wb") as f:
                    torch.save({"model": tr.model.state_dict(), "optim": tr.opt.state_dict()}, f)
                    f.flush()
                    os.fsync(f.fileno())
                common.fsync_path(url)
            elif kind.startswith("dcp"):
                while pending:  # one DCP checkpoint in flight, as its docs recommend
                    p = pending.pop()
                    (p.upload_completion if hasattr(p, "upload_completion") else p).result()
                res = dcp.async_save(
                    _dcp_sd(tr.model, tr.opt), storage_writer=dcp.FileSystemWriter(f"{url}/{s}"), async_stager=stager
                )
                pending.append(res)
                if hasattr(res, "staging_completion"):
                    staging.append(res.staging_completion)
    if ck is not None:
        ck.wait()
    for p in pending:
        (p.upload_completion if hasattr(p, "upload_completion") else p).result()
    elapsed = now() - t0
    if ck is not None:
        ck.close()
    if stager is not None:
        stager.close()
    common.rmtree(url)
    return {"total_s": elapsed, "checkpoints": len(saves)}


def bench_loop(tr: Trainer, steps: int, rounds: int, workdir: str, log, every: int = EVERY) -> dict[str, Any]:
    """Every loop configuration, ``rounds`` times in alternating order; overhead against the
    loop without checkpoints and the time ratio against DCP async_save with async staging."""
    runs: dict[str, list[float]] = {k: [] for k in LOOP_KINDS}
    checkpoints = 0
    for r in range(rounds):
        order = list(LOOP_KINDS)
        if r % 2:
            order.reverse()
        for kind in order:
            res = loop_once(tr, kind, steps, workdir, every)
            checkpoints = max(checkpoints, res["checkpoints"])
            runs[kind].append(res["total_s"])
            log(f"  loop every {every:<3} {kind:<18} {steps} steps: {res['total_s']:.2f}s")
    base = median(runs["none"])
    ref = median(runs["dcp_async_staging"])
    out: dict[str, Any] = {"steps": steps, "every": every, "checkpoints": checkpoints, "rounds": rounds, "configs": {}}
    for kind, label in LOOP_KINDS.items():
        t = median(runs[kind])
        out["configs"][kind] = {
            "label": label.format(every=every),
            "total_s": t,
            "all": runs[kind],
            "step_s": t / steps,
            "overhead": (t - base) / base,
            "vs_dcp_async_staging": t / ref,
        }
    return out


# -- section -----------------------------------------------------------------------------


def targets(calls: dict[str, Any], loops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    loop = loops[0]
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, op: str, threshold: float, unit: str = "x") -> None:
        ok = value <= threshold if op == "<=" else value < threshold
        out.append({"target": name, "value": value, "op": op, "threshold": threshold, "unit": unit, "pass": bool(ok)})

    c = calls["ckpt"]["call_s"]
    add("save() call / DCP async_save (default) call", c / calls["dcp_default"]["call_s"], "<=", 0.05)
    add("save() call / one memcpy of the state (clone)", c / calls["memcpy_clone"]["call_s"], "<=", 0.25)
    for lp in loops:
        cfg, every = lp["configs"], lp["every"]
        add(
            f"loop time, a checkpoint every {every} steps: ckpt / DCP async_save + async staging",
            cfg["ckpt"]["vs_dcp_async_staging"],
            "<=",
            1.0,
        )
        add(
            f"loop overhead, every {every} steps: ckpt - DCP async_save + async staging, percentage points",
            100 * (cfg["ckpt"]["overhead"] - cfg["dcp_async_staging"]["overhead"]),
            "<=",
            0.0,
            unit="pp",
        )
    add(
        "loop overhead of ckpt, one checkpoint per 5 steps",
        100 * loop["configs"]["ckpt"]["overhead"],
        "<=",
        3.0,
        unit="%",
    )
    add(
        "commit after save() returns / synchronous ckpt.save of the same step",
        calls["ckpt"]["commit_after_return_s"] / calls["ckpt_sync"]["call_s"],
        "<=",
        1.5,
    )
    return out


#: checkpoint intervals of the loop measurement (issue 17: every 5 and every 50 steps)
INTERVALS = (EVERY, 50)


def run(*, smoke: bool, workdir: str, log=print, mlp_layers: int = 24) -> dict[str, Any]:
    import ckpt

    if not hasattr(ckpt, "Checkpointer"):
        raise RuntimeError("ckpt.Checkpointer is not available: the async section needs it")
    if smoke:
        layers, width, batch, repeats, steps, rounds = 4, 64, 8, 1, 2 * EVERY, 1
    else:
        layers, width, batch, repeats, steps, rounds = mlp_layers, 2048, 64, 3, 4 * EVERY, 2
    tr = Trainer(layers, width, batch)
    for _ in range(2):  # the first steps allocate gradients and optimizer state
        tr.step()
    raw = common.raw_bytes(tr.state)
    log(f"[async] MLP {layers} x Linear({width}, {width}) + AdamW, {raw / 1e6:.1f} MB of state, batch {batch}")
    other = common.OtherCpu()
    calls = bench_calls(tr, repeats, workdir, log)
    calls_other = round(other.cores(), 2)
    loops = []
    for every in INTERVALS:
        other = common.OtherCpu()
        # every 5: 4 checkpoints in 20 steps, 2 rounds; every 50: one checkpoint in 100 steps, 1 round
        n = steps if every == EVERY else 2 * every
        loop = bench_loop(tr, n, rounds if every == EVERY else 1, workdir, log, every=every)
        loop["other_cpu_cores"] = round(other.cores(), 2)
        loops.append(loop)
    return {
        "workload": {
            "title": f"MLP {layers} x Linear({width}, {width}) + AdamW",
            "raw_bytes": raw,
            "batch": batch,
            "layers": layers,
            "width": width,
        },
        "repeats": repeats,
        "calls": calls,
        "calls_other_cpu_cores": calls_other,
        "loop": loops[0],
        "loops": loops,
        "targets": targets(calls, loops),
        "systems": ["ckpt", *[k for k in calls if k.startswith("dcp")]],
    }


def markdown(res: dict[str, Any]) -> str:
    w = res["workload"]
    lines = report.header(
        "ckpt async benchmark: save() stall, training-loop overhead, time to commit",
        res["machine"],
        res["smoke"],
        res.get("other_cpu_cores"),
    )
    lines += [
        f"- State: {w['title']}, {report.mb(w['raw_bytes'])} MB (parameters + AdamW moments), CPU tensors.",
        "- Local directory stores; fsync on for every system. Medians of "
        f"{res['repeats']} repeat(s) after a warm-up save; a training step runs before every save so nothing dedups.",
        "- DefaultStager options that need CUDA (pinned memory, non-blocking copies) cannot run here; the async-staging",
        "  variant returns at once but the state must not change until its staging is done (the loop waits for it",
        "  right before the next `optimizer.step()`).",
        "",
        "## The save call (time the training thread is held)",
        "",
        f"Other processes used {res.get('calls_other_cpu_cores', 0):.2f} cores meanwhile.",
        "",
        "| what | call (s) | staged (s) | committed (s) | call vs DCP default | call vs one clone |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    calls = res["calls"]
    dcp_call = calls["dcp_default"]["call_s"]
    clone = calls["memcpy_clone"]["call_s"]
    for c in calls.values():
        lines.append(
            f"| {c['label']} | {report.secs(c['call_s'])} | {report.secs(c.get('staged_s'))} | "
            f"{report.secs(c.get('total_s'))} | {report.ratio(c['call_s'] / dcp_call)} | {report.ratio(c['call_s'] / clone)} |"
        )
    ck = calls["ckpt"]
    lines += [
        "",
        f"ckpt: commit {report.secs(ck['commit_after_return_s'])} after `save()` returned vs synchronous "
        f"`ckpt.save` of the next step into the same store {report.secs(calls['ckpt_sync']['call_s'])} "
        f"({report.ratio(ck['commit_after_return_s'] / calls['ckpt_sync']['call_s'])}; vs a full checkpoint into a fresh "
        f"store {report.secs(calls['ckpt_sync_fresh']['call_s'])}: "
        f"{report.ratio(ck['commit_after_return_s'] / calls['ckpt_sync_fresh']['call_s'])}); "
        "the async checkpoint restores bit-exact.",
        "",
    ]
    for loop in res.get("loops", [res["loop"]]):
        lines += [
            f"## Training loop: {loop['steps']} steps, one checkpoint every {loop['every']} steps "
            f"({loop['checkpoints']} checkpoint(s)), batch {w['batch']}",
            "",
            f"Time until the last step is done and every checkpoint committed; median of {loop['rounds']} round(s); "
            f"other processes used {loop.get('other_cpu_cores', 0):.2f} cores meanwhile. "
            "Overhead against the loop without checkpoints; ratio = loop time / the DCP async_save + async staging loop.",
            "",
            "| configuration | total (s) | per step (s) | overhead | vs DCP async + staging |",
            "|---|---:|---:|---:|---:|",
        ]
        for c in loop["configs"].values():
            lines.append(
                f"| {c['label']} | {c['total_s']:.2f} | {c['step_s']:.3f} | {100 * c['overhead']:+.1f}% | "
                f"{report.ratio(c.get('vs_dcp_async_staging'))} |"
            )
        lines.append("")
    lines += [
        "",
        "## Targets (issues 3 and 17)",
        "",
        "```",
        *report.target_lines(res["targets"], res.get("other_cpu_cores")),
        "```",
        "",
    ]
    return "\n".join(lines)
