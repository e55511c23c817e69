"""GPU section (issue 17): D2H staging into the pinned pool, save() stall, loop overhead vs DCP.

``python -m benchmarks.bench_gpu [--probe] [--dry-run] [--smoke] [--out DIR] [--workdir DIR]``

On a CUDA device, with an MLP + AdamW whose state lives on the GPU:

1. D2H bandwidth: one large tensor copied into pinned host memory on a side stream, and
   into pageable memory, GB/s (the ceiling for staging);
2. the ``save()`` stall: how long ``ckpt.Checkpointer.save()`` holds the training thread,
   the time until staging is done (D2H into the reused pinned pool on the checkpointer's
   side stream) and to the commit, against DCP ``async_save`` with ``DefaultStager()``
   (pinned memory, async staging, non-blocking copies: DCP's own defaults); the pool's
   allocated bytes before and after the repeats (reuse: no growth);
3. a training loop with a checkpoint every N steps: none, ckpt, DCP async_save +
   DefaultStager; overhead against no checkpoints and the loop-time ratio to DCP.

Without CUDA it says why and exits 0 (``make bench-gpu`` on a CPU machine). ``--dry-run``
runs the same measurement code on the CPU with tiny tensors (what CI checks: argument
parsing, the measurements end to end, the tables); its figures mean nothing.
``--probe`` only reports whether a CUDA device is usable (exit 0) or not (exit 3).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import common, report

NO_CUDA_EXIT = 3


@dataclass(frozen=True)
class Plan:
    """Sizes of one run."""

    device: str
    layers: int
    width: int
    batch: int
    repeats: int
    every: int
    steps: int
    d2h_mb: int

    @property
    def dry_run(self) -> bool:
        return self.device == "cpu"


def plan(*, dry_run: bool, smoke: bool) -> Plan:
    """The sizes: full (~1.2 GB of state, a few minutes), smoke (a GPU check in seconds) or the
    CPU dry run (tiny tensors)."""
    if dry_run:
        return Plan("cpu", layers=2, width=64, batch=4, repeats=2, every=2, steps=6, d2h_mb=4)
    if smoke:
        return Plan("cuda", layers=4, width=1024, batch=32, repeats=2, every=5, steps=10, d2h_mb=64)
    return Plan("cuda", layers=24, width=2048, batch=64, repeats=3, every=5, steps=20, d2h_mb=1024)


def cuda_status() -> str | None:
    """None when a CUDA device is usable, else why not."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        return f"torch is not importable: {exc}"
    if not torch.backends.cuda.is_built():
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no GPU or no driver)"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--probe", action="store_true", help="only say whether CUDA is usable (exit 0) or not (exit 3)")
    p.add_argument("--dry-run", action="store_true", help="run the measurement code on the CPU, tiny tensors")
    p.add_argument("--smoke", action="store_true", help="small GPU sizes (seconds)")
    p.add_argument("--out", default=None, help="write gpu.json and gpu.md here")
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    return p.parse_args(argv)


# -- helpers -----------------------------------------------------------------------------------


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class GpuTrainer:
    """MLP + AdamW on ``device`` and one fixed random batch."""

    def __init__(self, p: Plan) -> None:
        import torch

        self.device = p.device
        self.model = common.make_mlp(p.layers, p.width, seed=0).to(p.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(p.batch, p.width, generator=g).to(p.device)

    @property
    def state(self) -> dict[str, Any]:
        return {"model": self.model, "optim": self.opt}

    def step(self, before_opt: Callable[[], None] | None = None) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.model(self.x).square().mean().backward()
        if before_opt is not None:
            before_opt()
        self.opt.step()


def dcp_stager(device: str) -> Any:
    """DCP's DefaultStager: its defaults on CUDA; on the CPU only what runs there (async staging)."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    if device == "cuda":
        return DefaultStager()
    return DefaultStager(StagingOptions(False, False, True, False))


def _dcp_sd(tr: GpuTrainer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(tr.model, tr.opt)
    return {"model": msd, "optim": osd}


# -- 1: D2H bandwidth --------------------------------------------------------------------------


def bench_d2h(p: Plan, repeats: int) -> dict[str, Any]:
    import torch

    n = p.d2h_mb * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=p.device).fill_(7)
    cuda = p.device == "cuda"
    out: dict[str, Any] = {"bytes": n}
    for kind, pinned in (("pinned_side_stream", cuda), ("pageable", False)):
        dst = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
        stream = torch.cuda.Stream() if cuda and pinned else None
        times = []
        for _ in range(repeats + 1):
            _sync(p.device)
            t0 = time.perf_counter()
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)
                stream.synchronize()
            else:
                dst.copy_(src)
                _sync(p.device)
            times.append(time.perf_counter() - t0)
        assert bool((dst[:: max(1, n // 64)] == 7).all()), "D2H copy produced wrong bytes"
        t = common.median(times[1:])
        out[kind] = {"s": t, "gb_s": n / t / 1e9, "pinned": pinned}
        del dst
    return out


# -- 2: the save() stall -----------------------------------------------------------------------


def bench_stall(tr: GpuTrainer, p: Plan, workdir: str, log: Callable[[str], None]) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    import ckpt

    raw = common.raw_bytes(tr.state)
    out: dict[str, Any] = {"raw_bytes": raw}
    url = tempfile.mkdtemp(prefix="gpu-ckpt-", dir=workdir)
    call, staged, total = [], [], []
    with ckpt.Checkpointer(url, keep_last=2) as ck:
        tr.step()
        ck.save(tr.state, step=1).wait()  # warm-up: allocates the pinned pool
        pool_before = ck._pool.allocated_bytes
        for r in range(p.repeats):
            tr.step()
            _sync(p.device)
            gc.collect()
            t0 = time.perf_counter()
            h = ck.save(tr.state, step=r + 2)
            t1 = time.perf_counter()
            h.wait_staged()
            t2 = time.perf_counter()
            h.wait()
            t3 = time.perf_counter()
            call.append(t1 - t0)
            staged.append(t2 - t0)
            total.append(t3 - t0)
        pool_after = ck._pool.allocated_bytes
        pinned = any(b.is_pinned() for bufs in ck._pool._free.values() for b in bufs)
    last = p.repeats + 1
    fresh = GpuTrainer(p)
    fresh.step()
    ckpt.restore(url, fresh.state, step=last)
    problem = common.state_diff(tr.state, fresh.state)
    del fresh
    common.rmtree(url)
    out["ckpt"] = {
        "label": "ckpt Checkpointer.save()",
        "call_s": common.median(call),
        "staged_s": common.median(staged),
        "total_s": common.median(total),
        "staging_gb_s": raw / common.median(staged) / 1e9,
        "pool_bytes_before": pool_before,
        "pool_bytes_after": pool_after,
        "pool_reused": pool_after == pool_before,
        "pool_pinned": pinned,
        "bit_exact": problem is None,
        "problem": problem,
    }
    log(
        f"  ckpt save(): call {common.median(call) * 1e3:.1f} ms, staged {common.median(staged):.3f}s, "
        f"committed {common.median(total):.3f}s, pool {pool_before} -> {pool_after} bytes"
    )

    stager = dcp_stager(p.device)
    call, staged, total = [], [], []
    for r in range(p.repeats + 1):  # the first save warms the stager's cached buffers
        tr.step()
        path = tempfile.mkdtemp(prefix="gpu-dcp-", dir=workdir)
        _sync(p.device)
        gc.collect()
        t0 = time.perf_counter()
        res = dcp.async_save(_dcp_sd(tr), storage_writer=dcp.FileSystemWriter(path), async_stager=stager)
        t1 = time.perf_counter()
        if hasattr(res, "staging_completion"):
            res.staging_completion.result()
            t2 = time.perf_counter()
            res.upload_completion.result()
        else:
            t2 = t1
            res.result()
        t3 = time.perf_counter()
        common.rmtree(path)
        if r:
            call.append(t1 - t0)
            staged.append(t2 - t0)
            total.append(t3 - t0)
    stager.close()
    out["dcp"] = {
        "label": "DCP async_save + DefaultStager" + ("()" if p.device == "cuda" else "(use_async_staging=True)"),
        "call_s": common.median(call),
        "staged_s": common.median(staged),
        "total_s": common.median(total),
        "staging_gb_s": raw / common.median(staged) / 1e9,
    }
    log(f"  DCP async_save: call {common.median(call) * 1e3:.1f} ms, staged {common.median(staged):.3f}s")
    return out


# -- 3: the training loop ----------------------------------------------------------------------


def loop_once(tr: GpuTrainer, kind: str, p: Plan, workdir: str) -> float:
    import torch.distributed.checkpoint as dcp

    import ckpt

    url = tempfile.mkdtemp(prefix=f"gpu-loop-{kind}-", dir=workdir)
    saves = set(range(p.every, p.steps, p.every))
    ck = ckpt.Checkpointer(url, keep_last=2) if kind == "ckpt" else None
    stager = dcp_stager(p.device) if kind == "dcp" else None
    pending: list[Any] = []
    staging: list[Any] = []

    def before_opt() -> None:  # DCP: the state must not change before its staging is done
        while staging:
            staging.pop().result()

    _sync(p.device)
    gc.collect()
    t0 = time.perf_counter()
    for s in range(1, p.steps + 1):
        tr.step(before_opt if stager is not None else None)
        if s not in saves:
            continue
        if ck is not None:
            ck.save(tr.state, step=s)
        elif stager is not None:
            while pending:
                pending.pop().upload_completion.result()
            res = dcp.async_save(_dcp_sd(tr), storage_writer=dcp.FileSystemWriter(f"{url}/{s}"), async_stager=stager)
            pending.append(res)
            staging.append(res.staging_completion)
    if ck is not None:
        ck.wait()
    for r in pending:
        r.upload_completion.result()
    _sync(p.device)
    elapsed = time.perf_counter() - t0
    if ck is not None:
        ck.close()
    if stager is not None:
        stager.close()
    common.rmtree(url)
    return elapsed


LOOP_KINDS = {"none": "no checkpoints", "ckpt": "ckpt Checkpointer.save", "dcp": "DCP async_save + DefaultStager"}


def bench_loop(tr: GpuTrainer, p: Plan, workdir: str, log: Callable[[str], None]) -> dict[str, Any]:
    runs: dict[str, list[float]] = {k: [] for k in LOOP_KINDS}
    for r in range(2):
        for kind in list(LOOP_KINDS) if r == 0 else list(reversed(LOOP_KINDS)):
            t = loop_once(tr, kind, p, workdir)
            runs[kind].append(t)
            log(f"  loop {kind:<5} {p.steps} steps, every {p.every}: {t:.3f}s")
    base = common.median(runs["none"])
    ref = common.median(runs["dcp"])
    return {
        "steps": p.steps,
        "every": p.every,
        "configs": {
            k: {
                "label": label,
                "total_s": common.median(runs[k]),
                "all": runs[k],
                "overhead": (common.median(runs[k]) - base) / base,
                "vs_dcp": common.median(runs[k]) / ref,
            }
            for k, label in LOOP_KINDS.items()
        },
    }


# -- the section -------------------------------------------------------------------------------


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    st, loop = res["stall"], res["loop"]["configs"]
    rows = [
        ("save() stall: ckpt call / DCP async_save call", st["ckpt"]["call_s"] / st["dcp"]["call_s"], "<=", 1.0),
        (f"loop time, every {res['loop']['every']} steps: ckpt / DCP async_save", loop["ckpt"]["vs_dcp"], "<=", 1.0),
    ]
    return [
        {"target": name, "value": v, "op": op, "threshold": thr, "unit": "x", "pass": bool(v <= thr)}
        for name, v, op, thr in rows
    ]


def run(p: Plan, workdir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    tr = GpuTrainer(p)
    for _ in range(2):
        tr.step()
    raw = common.raw_bytes(tr.state)
    device_name = torch.cuda.get_device_name() if p.device == "cuda" else "cpu (dry run)"
    log(f"[gpu] {device_name}: MLP {p.layers} x Linear({p.width}) + AdamW, {raw / 1e6:.1f} MB of state")
    other = common.OtherCpu()
    res: dict[str, Any] = {
        "plan": asdict(p),
        "device_name": device_name,
        "workload": {"title": f"MLP {p.layers} x Linear({p.width}, {p.width}) + AdamW on {p.device}", "raw_bytes": raw},
    }
    res["d2h"] = bench_d2h(p, p.repeats)
    res["stall"] = bench_stall(tr, p, workdir, log)
    res["loop"] = bench_loop(tr, p, workdir, log)
    res["targets"] = targets(res)
    res["other_cpu_cores"] = round(other.cores(), 2)
    return res


def markdown(res: dict[str, Any]) -> str:
    p = res["plan"]
    dry = p["device"] == "cpu"
    lines = report.header(
        "ckpt GPU benchmark: D2H staging, save() stall, loop overhead vs DCP",
        res["machine"],
        res.get("smoke", False),
        res.get("other_cpu_cores"),
    )
    if dry:
        lines += ["", "**CPU dry run: the measurement code on tiny CPU tensors. No GPU figures.**"]
    lines += [
        f"- Device: {res['device_name']}; state: {res['workload']['title']}, {report.mb(res['workload']['raw_bytes'])} MB",
        f"- Medians of {p['repeats']} repeat(s) after a warm-up; local directory store, fsync on for both systems.",
        "",
        "## D2H copy",
        "",
        "| copy | size (MB) | time (s) | GB/s |",
        "|---|---:|---:|---:|",
    ]
    d = res["d2h"]
    for key, label in (
        ("pinned_side_stream", "into pinned memory on a side stream"),
        ("pageable", "into pageable memory"),
    ):
        r = d[key]
        lines.append(
            f"| {label}{'' if r['pinned'] else ' (not pinned)'} | {report.mb(d['bytes'])} | {report.secs(r['s'])} | {r['gb_s']:.2f} |"
        )
    st = res["stall"]
    lines += [
        "",
        "## The save() stall",
        "",
        "| system | call (s) | staged (s) | committed (s) | staging GB/s | call vs DCP |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key in ("ckpt", "dcp"):
        r = st[key]
        lines.append(
            f"| {r['label']} | {report.secs(r['call_s'])} | {report.secs(r['staged_s'])} | {report.secs(r['total_s'])} | "
            f"{r['staging_gb_s']:.2f} | {report.ratio(r['call_s'] / st['dcp']['call_s'])} |"
        )
    c = st["ckpt"]
    lines += [
        "",
        f"ckpt staging pool: {c['pool_bytes_before']:,} bytes after the warm-up save, {c['pool_bytes_after']:,} after "
        f"the repeats ({'reused, no growth' if c['pool_reused'] else 'GREW'}); pinned: {'yes' if c['pool_pinned'] else 'no'}; "
        f"the last checkpoint restores {'bit-exact' if c['bit_exact'] else 'NOT bit-exact: ' + str(c['problem'])}.",
        "",
    ]
    loop = res["loop"]
    lines += [
        f"## Training loop: {loop['steps']} steps, a checkpoint every {loop['every']} steps",
        "",
        "| configuration | total (s) | overhead | vs DCP |",
        "|---|---:|---:|---:|",
    ]
    for r in loop["configs"].values():
        lines.append(
            f"| {r['label']} | {r['total_s']:.3f} | {100 * r['overhead']:+.1f}% | {report.ratio(r['vs_dcp'])} |"
        )
    lines += [
        "",
        "## Targets (issue 17, GPU)",
        "",
        "```",
        *report.target_lines(res["targets"], res.get("other_cpu_cores")),
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    why = cuda_status()
    if args.probe:
        print(f"CUDA: {'usable' if why is None else 'not usable: ' + why}")
        return 0 if why is None else NO_CUDA_EXIT
    if why is not None and not args.dry_run:
        print(f"bench_gpu: no GPU benchmark ({why}); nothing measured. --dry-run runs the code on the CPU.")
        return 0
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed.*")
    p = plan(dry_run=args.dry_run, smoke=args.smoke)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-gpu-", dir=args.workdir) as workdir:
        res = run(p, workdir, lambda m: print(m, flush=True))
    res.update(section="gpu", smoke=args.smoke or args.dry_run, dry_run=p.dry_run, machine=common.machine_info())
    res["wall_s"] = time.perf_counter() - t0
    md = markdown(res)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report.write_json(out / "gpu.json", res)
        (out / "gpu.md").write_text(md)
    return 0 if res["stall"]["ckpt"]["bit_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
