"""Remote stores: save and restore throughput to S3 (moto) and Azure Blob (azurite).

``python -m benchmarks.bench_remote [--smoke] [--out DIR] [--repeats N]``

The same live state (an MLP + AdamW after one step) is saved and restored, in one
process run, by ckpt and by torch.distributed.checkpoint's fsspec writer/reader
(``FsspecWriter``/``FsspecReader`` with the same ``storage_options``), once with its
default single I/O thread and once with as many threads as ckpt uses. Every save goes
to a fresh prefix (no dedup against an earlier save); every restore goes into fresh
objects and is checked bit-exact. Writes ``remote.json`` and ``remote.md``.

Both servers run on this machine (moto as its own process, azurite under Node.js), so
the figures measure client + server CPU on loopback, not a real network: they compare
the clients, they do not predict cloud throughput.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from benchmarks import common, report

ROOT = Path(__file__).resolve().parent.parent


# -- the systems ----------------------------------------------------------------------------


class CkptRemote:
    name = "ckpt"
    label = "ckpt"

    def save(self, objs: Mapping[str, Any], url: str, so: dict[str, Any]) -> None:
        import ckpt

        ckpt.save(url, dict(objs), step=1, storage_options=so)

    def restore(self, objs: Mapping[str, Any], url: str, so: dict[str, Any]) -> None:
        import ckpt

        ckpt.restore(url, dict(objs), storage_options=so)


class DCPFsspec:
    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.name = "dcp-fsspec" if threads == 1 else f"dcp-fsspec-{threads}t"
        self.label = f"DCP FsspecWriter ({threads} thread{'s' if threads > 1 else ''})"

    def save(self, objs: Mapping[str, Any], url: str, so: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        from benchmarks.systems import _dcp_state

        dcp.save(_dcp_state(objs), storage_writer=FsspecWriter(url, thread_count=self.threads, **so))

    def restore(self, objs: Mapping[str, Any], url: str, so: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        from benchmarks.systems import _dcp_apply, _dcp_state

        sd = _dcp_state(objs)
        dcp.load(sd, storage_reader=FsspecReader(url, **so))
        _dcp_apply(objs, sd)


def stored_bytes(url: str, so: dict[str, Any]) -> int:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **so)
    fs.invalidate_cache()
    return int(sum(info["size"] for info in fs.find(path, detail=True).values()))


# -- the run --------------------------------------------------------------------------------


def run(smoke: bool, repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from servers import Azurite, MotoS3Process, ServerUnavailable

    from ckpt import config

    workload = common.mlp_workload(layers=2, width=128, repeats=1) if smoke else common.mlp_workload(8, 1024, repeats)
    src = workload.build()
    raw = common.raw_bytes(src)
    systems = [CkptRemote(), DCPFsspec(1), DCPFsspec(config.io_threads())]
    results: list[dict[str, Any]] = []
    servers: list[dict[str, Any]] = []
    for factory in (MotoS3Process, Azurite):
        try:
            server = factory().start()
        except ServerUnavailable as exc:
            log(f"skipping {factory.kind}: {exc}")
            servers.append({"kind": factory.kind, "skipped": str(exc)})
            continue
        servers.append({"kind": server.kind, "endpoint": getattr(server, "endpoint", "") or f"127.0.0.1:{server.port}"})
        try:
            so = server.storage_options
            for system in systems:  # warm-up: connections, client set-up, server-side first writes
                warm = server.new_url(f"warm-{system.name}")
                system.save(src, warm, so)
                system.restore(workload.fresh(), warm, so)
            for system in systems:
                saves, restores, sizes, problems = [], [], [], []
                for rep in range(workload.repeats):
                    url = server.new_url(f"bench-{system.name}-{rep}-{uuid.uuid4().hex[:6]}")
                    t, _ = common.timed(lambda system=system, url=url, so=so: system.save(src, url, so))
                    saves.append(t)
                    sizes.append(stored_bytes(url, so))
                    dst = workload.fresh()
                    t, _ = common.timed(lambda system=system, dst=dst, url=url, so=so: system.restore(dst, url, so))
                    restores.append(t)
                    problem = common.state_diff(src, dst)
                    if problem:
                        problems.append(problem)
                row = {
                    "store": server.kind,
                    "system": system.name,
                    "label": system.label,
                    "save_s": common.median(saves),
                    "restore_s": common.median(restores),
                    "save_mb_s": raw / common.median(saves) / 1e6,
                    "restore_mb_s": raw / common.median(restores) / 1e6,
                    "stored_bytes": int(common.median(sizes)),
                    "saves": saves,
                    "restores": restores,
                    "bit_exact": not problems,
                    "problem": problems[0] if problems else None,
                }
                results.append(row)
                log(
                    f"{server.kind:3} {system.label:32} save {row['save_s']:.3f}s ({row['save_mb_s']:.0f} MB/s)  "
                    f"restore {row['restore_s']:.3f}s ({row['restore_mb_s']:.0f} MB/s)  "
                    f"stored {row['stored_bytes'] / 1e6:.1f} MB  {'bit-exact' if row['bit_exact'] else 'MISMATCH'}"
                )
        finally:
            server.stop()
    for row in results:
        base = next((r for r in results if r["store"] == row["store"] and r["system"] == "dcp-fsspec"), None)
        row["save_speedup_vs_dcp"] = base["save_s"] / row["save_s"] if base else None
        row["restore_speedup_vs_dcp"] = base["restore_s"] / row["restore_s"] if base else None
    return {
        "workload": {"name": workload.name, "title": workload.title, "raw_bytes": raw, "repeats": workload.repeats},
        "servers": servers,
        "io_threads": config.io_threads(),
        "results": results,
    }


def markdown(res: dict[str, Any]) -> str:
    lines = report.header(
        "ckpt remote-store benchmark: S3 (moto) and Azure Blob (azurite)",
        res["machine"],
        res["smoke"],
        res.get("other_cpu_cores"),
    )
    w = res["workload"]
    lines += [
        f"- State: {w['title']}, {report.mb(w['raw_bytes'])} MB of tensors; median of {w['repeats']} run(s)",
        "- Every save to a fresh prefix; every restore into fresh objects, checked bit-exact; one untimed warm-up each",
        "- Servers on this machine (moto in its own process, azurite under Node.js), loopback HTTP:",
        "  the figures compare clients sharing the cores with the server, not cloud throughput",
        f"- ckpt: CKPT_THREADS={res['io_threads']} I/O threads, zstd level 1, retries on; DCP: FsspecWriter/Reader "
        "(torch.distributed.checkpoint._fsspec_filesystem) with the same storage_options",
        "",
        "| store | system | save s | save MB/s | restore s | restore MB/s | stored MB | save vs DCP | restore vs DCP | exact |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["results"]:
        lines.append(
            f"| {r['store']} | {r['label']} | {report.secs(r['save_s'])} | {r['save_mb_s']:.0f} | "
            f"{report.secs(r['restore_s'])} | {r['restore_mb_s']:.0f} | {report.mb(r['stored_bytes'])} | "
            f"{report.ratio(r['save_speedup_vs_dcp'])} | {report.ratio(r['restore_speedup_vs_dcp'])} | "
            f"{'yes' if r['bit_exact'] else 'NO'} |"
        )
    for s in res["servers"]:
        if "skipped" in s:
            lines.append(f"\n{s['kind']} skipped: {s['skipped']}")
    lines.append("")
    lines.append("Speed-ups are DCP (1 thread) time / this system's time on the same store; > 1 is faster.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_remote", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny state, one repeat (checks the harness, not speed)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)

    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed.*")
    logging.getLogger("ckpt").setLevel(logging.ERROR)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    other = common.OtherCpu()
    t0 = time.perf_counter()
    res = run(args.smoke, max(1, args.repeats), lambda m: print(m, flush=True))
    res.update(
        section="remote", smoke=args.smoke, machine=common.machine_info(), other_cpu_cores=round(other.cores(), 2)
    )
    res["wall_s"] = time.perf_counter() - t0
    report.write_json(out / "remote.json", res)
    md = markdown(res)
    (out / "remote.md").write_text(md)
    print()
    print(md)
    return 0 if all(r["bit_exact"] for r in res["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
