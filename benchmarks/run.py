"""Entry point: ``python -m benchmarks.run [--smoke] [--section core|async|objects|frameworks|tiers|distributed|encryption|all] [--out DIR]``.

Writes ``core.json``/``core.md``/``core.png``, ``async.json``/``async.md``,
``objects.json``/``objects.md`` (MiniLM object counts, local and S3) and, for the
frameworks section, ``lightning.*`` and ``transformers.*`` (each framework's default
checkpointing against its ckpt plugin, same model, one run) under ``--out`` and prints the
tables and the PASS/FAIL lines of the targets (never asserted). ``all`` is core, async and
objects; the frameworks section needs the ckpt-lightning and ckpt-transformers plugins
installed. ``--cold`` picks how the core section empties the page cache before its cold
restores (see benchmarks/cache.py); ``--mlp-layers`` shrinks the 24-layer MLP for a quick,
reduced-size run (its figures are not the issue's 1.2 GB ones).
``tiers`` (:mod:`benchmarks.bench_tiers`: restart from a local tier vs S3, loop overhead)
and ``distributed`` (``distributed.*``: 2 and 4 gloo processes) run on their own, like
frameworks. The encryption section (``encryption.*``) compares an encrypted store with a plain one.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import cache, common, report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (checks the harness, not speed)")
    p.add_argument(
        "--section",
        choices=["core", "async", "objects", "frameworks", "tiers", "distributed", "encryption", "all"],
        default="all",
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results directory")
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    p.add_argument(
        "--cold",
        choices=cache.METHODS,
        default="auto",
        help="page-cache eviction before the cold restores: auto = fadvise (only the benchmark's files), "
        "drop_caches (root, whole machine; falls back to fadvise), off",
    )
    p.add_argument("--mlp-layers", type=int, default=24, help="layers of the MLP state (24: the 1.2 GB state)")
    args = p.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed.*")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = common.machine_info()

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.perf_counter()
    summary: list[str] = []  # every section's PASS/FAIL lines, printed again at the end
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-", dir=args.workdir) as workdir:
        if args.section in ("core", "all"):
            from benchmarks import core

            other = common.OtherCpu()
            res = core.run(smoke=args.smoke, workdir=workdir, log=log, cold=args.cold, mlp_layers=args.mlp_layers)
            res.update(section="core", smoke=args.smoke, machine=machine, other_cpu_cores=round(other.cores(), 2))
            report.write_json(out / "core.json", res)
            summary += [f"[core] {line}" for line in report.target_lines(res["targets"], res["other_cpu_cores"])]
            md = report.core_markdown(res)
            (out / "core.md").write_text(md)
            report.core_plot(res, out / "core.png")
            log("")
            log(md)
            gc.collect()
        if args.section in ("async", "all"):
            from benchmarks import async_bench

            other = common.OtherCpu()
            res = async_bench.run(smoke=args.smoke, workdir=workdir, log=log, mlp_layers=args.mlp_layers)
            res.update(section="async", smoke=args.smoke, machine=machine, other_cpu_cores=round(other.cores(), 2))
            report.write_json(out / "async.json", res)
            summary += [f"[async] {line}" for line in report.target_lines(res["targets"], res["other_cpu_cores"])]
            md = async_bench.markdown(res)
            (out / "async.md").write_text(md)
            log("")
            log(md)
        if args.section in ("objects", "all"):
            from benchmarks import bench_objects

            other = common.OtherCpu()
            res = bench_objects.run(smoke=args.smoke, workdir=workdir, log=log)
            res.update(section="objects", smoke=args.smoke, machine=machine, other_cpu_cores=round(other.cores(), 2))
            report.write_json(out / "objects.json", res)
            summary += [f"[objects] {line}" for line in report.target_lines(res["targets"], res["other_cpu_cores"])]
            md = bench_objects.markdown(res)
            (out / "objects.md").write_text(md)
            log("")
            log(md)
            gc.collect()
        if args.section == "distributed":  # multi-process (gloo): not part of "all"
            from benchmarks import bench_distributed

            res = bench_distributed.run(smoke=args.smoke, workdir=workdir, log=log)
            res.update(section="distributed", smoke=args.smoke)
            report.write_json(out / "distributed.json", res)
            md = bench_distributed.markdown(res)
            (out / "distributed.md").write_text(md)
            log("")
            log(md)
        if args.section == "encryption":
            from benchmarks import bench_crypto

            res = bench_crypto.run(smoke=args.smoke, workdir=workdir, log=log)
            report.write_json(out / "encryption.json", res)
            md = bench_crypto.markdown(res)
            (out / "encryption.md").write_text(md)
            log("")
            log(md)
        if args.section == "frameworks":
            from benchmarks import bench_lightning, bench_transformers

            for name, mod in (("lightning", bench_lightning), ("transformers", bench_transformers)):
                other = common.OtherCpu()
                res = mod.run(smoke=args.smoke, workdir=workdir, log=log)
                res.update(section=name, smoke=args.smoke, machine=machine, other_cpu_cores=round(other.cores(), 2))
                report.write_json(out / f"{name}.json", res)
                md = mod.markdown(res)
                (out / f"{name}.md").write_text(md)
                log("")
                log(md)
                gc.collect()
        if args.section == "tiers":
            from benchmarks import bench_tiers

            res = bench_tiers.run(smoke=args.smoke, workdir=workdir, log=log)
            report.write_json(out / "tiers.json", res)
            md = bench_tiers.markdown(res)
            (out / "tiers.md").write_text(md)
            log("")
            log(md)
    if summary:
        log("\nTargets (PASS/FAIL, never asserted):")
        for line in summary:
            log("  " + line)
    log(f"benchmark finished in {time.perf_counter() - t_start:.0f}s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
