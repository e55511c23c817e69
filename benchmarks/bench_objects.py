"""Objects section (issue 17): how many objects a model of many small tensors costs, locally and on S3.

``python -m benchmarks.bench_objects [--smoke] [--out DIR] [--workdir DIR]``

The real all-MiniLM-L6-v2 weights (about 100 tensors, most of them small), in fp32 and bf16,
saved and restored by ckpt, torch.save / torch.load and DCP, to a local directory (fsync
on) and to S3 (moto in its own process on this machine, loopback HTTP, as
benchmarks/bench_remote.py does). The table shows the objects (files) each save wrote next
to the times, so packing small tensors into shared objects shows up as fewer objects and
less per-object time. Every save goes to a fresh location; every restore goes into fresh
objects and is checked bit-exact. Restores run as the core section's warm ones do: a local
store's files are read into the page cache first (ckpt writes large objects around it), and
memory is as a fresh process has it (:func:`benchmarks.common.fresh_memory`). Medians of the
repeats; ratios against torch.save / torch.load on the same store in the same run.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from benchmarks import cache, common, report

ROOT = Path(__file__).resolve().parent.parent


def _fs(url: str, so: Mapping[str, Any]) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **so)
    return fs, path


def count_objects(url: str, so: Mapping[str, Any], *, ckpt_layout: bool) -> tuple[int, int]:
    """(objects, bytes) under ``url``: for ckpt the content objects under ``objects/`` only
    (the manifest and ref are counted apart), for the others every file."""
    fs, path = _fs(url, so)
    fs.invalidate_cache()
    found = fs.find(path, detail=True)
    n = size = 0
    for name, info in found.items():
        if ckpt_layout and "/objects/" not in "/" + name[len(path) :].lstrip("/").replace("\\", "/"):
            continue
        n += 1
        size += int(info["size"])
    return n, size


class CkptSys:
    name = "ckpt"
    label = "ckpt"

    def save(self, objs: Mapping[str, Any], url: str, so: dict[str, Any]) -> None:
        import ckpt

        ckpt.save(url, dict(objs), step=1, storage_options=so)

    def restore(self, objs: Mapping[str, Any], url: str, so: dict[str, Any]) -> None:
        import ckpt

        ckpt.restore(url, dict(objs), storage_options=so)


class TorchSys:
    name = "torch.save"
    label = "torch.save / torch.load"

    def save(self, objs: Mapping[str, Any], url: str, so: dict[str, Any]) -> None:
        sd = {k: o.state_dict() for k, o in objs.items()}
        if "://" not in url:
            os.makedirs(url, exist_ok=True)
            with open(os.path.join(url, "state.pt"), "wb") as f:
                torch.save(sd, f)
                f.flush()
                os.fsync(f.fileno())
            common.fsync_path(url)
            return
        import fsspec

        with fsspec.open(url + "/state.pt", "wb", **so) as f:
            torch.save(sd, f)

    def restore(self, objs: Mapping[str, Any], url: str, so: dict[str, Any]) -> None:
        if "://" not in url:
            sd = torch.load(os.path.join(url, "state.pt"), map_location="cpu", weights_only=True)
        else:
            import fsspec

            with fsspec.open(url + "/state.pt", "rb", **so) as f:
                sd = torch.load(f, map_location="cpu", weights_only=True)
        for k, o in objs.items():
            o.load_state_dict(sd[k])


class DcpSys:
    name = "dcp"
    label = "torch.distributed.checkpoint"

    def save(self, objs: Mapping[str, Any], url: str, so: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        from benchmarks.systems import _dcp_state

        if "://" not in url:
            writer: Any = dcp.FileSystemWriter(url)
        else:
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

            writer = FsspecWriter(url, **so)
        dcp.save(_dcp_state(objs), storage_writer=writer)

    def restore(self, objs: Mapping[str, Any], url: str, so: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        from benchmarks.systems import _dcp_apply, _dcp_state

        if "://" not in url:
            reader: Any = dcp.FileSystemReader(url)
        else:
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

            reader = FsspecReader(url, **so)
        sd = _dcp_state(objs)
        dcp.load(sd, storage_reader=reader)
        _dcp_apply(objs, sd)


SYSTEMS = (CkptSys, TorchSys, DcpSys)


def bench_store(
    store: str,
    new_url: Callable[[str], str],
    so: dict[str, Any],
    workloads: list[common.Workload],
    log: Callable[[str], None],
    cleanup: Callable[[str], None],
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    systems = [cls() for cls in SYSTEMS]
    for w in workloads:
        src = w.build()
        raw = common.raw_bytes(src)
        for system in systems:  # untimed warm-up: imports, connections, first writes
            url = new_url(f"warm-{system.name}")
            system.save(src, url, so)
            system.restore(w.fresh(), url, so)
            cleanup(url)
        per: dict[str, dict[str, Any]] = {
            s.name: {"save": [], "restore": [], "objects": [], "bytes": []} for s in systems
        }
        problems: dict[str, str] = {}
        for rep in range(w.repeats):
            order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
            for system in order:
                url = new_url(f"{w.name}-{system.name}-{rep}-{uuid.uuid4().hex[:6]}")
                gc.collect()
                t, _ = common.timed(lambda system=system, url=url, src=src: system.save(src, url, so))
                per[system.name]["save"].append(t)
                n, size = count_objects(url, so, ckpt_layout=system.name == "ckpt")
                per[system.name]["objects"].append(n)
                per[system.name]["bytes"].append(size)
                dst = w.fresh()
                if store == "file":
                    cache.load([url])  # every system's files in the page cache, as the core section's warm restore
                with common.fresh_memory():  # as a resumed job's process: no pages an earlier restore freed
                    t, _ = common.timed(lambda system=system, url=url, dst=dst: system.restore(dst, url, so))
                per[system.name]["restore"].append(t)
                problem = common.state_diff(src, dst)
                if problem:
                    problems[system.name] = problem
                cleanup(url)
        base = per["torch.save"]
        for system in systems:
            rec = per[system.name]
            row = {
                "store": store,
                "workload": w.name,
                "title": w.title,
                "tensors": len(common.state_tensors(src)),
                "raw_bytes": raw,
                "system": system.name,
                "label": system.label,
                "objects": int(common.median([float(x) for x in rec["objects"]])),
                "stored_bytes": int(common.median([float(x) for x in rec["bytes"]])),
                "save_s": common.median(rec["save"]),
                "restore_s": common.median(rec["restore"]),
                "saves": rec["save"],
                "restores": rec["restore"],
                "bit_exact": system.name not in problems,
                "problem": problems.get(system.name),
            }
            row["save_vs_torch"] = row["save_s"] / common.median(base["save"])
            row["restore_vs_torch"] = row["restore_s"] / common.median(base["restore"])
            rows.append(row)
            log(
                f"  {store:5} {w.name:12} {system.name:10} objects {row['objects']:4}  save {row['save_s']:.3f}s "
                f"({row['save_vs_torch']:.2f}x)  restore {row['restore_s']:.3f}s ({row['restore_vs_torch']:.2f}x)"
                f"{'' if row['bit_exact'] else '  NOT BIT-EXACT: ' + str(row['problem'])}"
            )
        del src
        gc.collect()
    return rows


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 17's MiniLM targets on the local store (reported, never asserted)."""
    out = []
    for r in rows:
        if r["system"] != "ckpt" or r["store"] != "file":
            continue
        for key, what in (
            ("save_vs_torch", "save / (torch.save + fsync)"),
            ("restore_vs_torch", "restore / torch.load"),
        ):
            out.append(
                {
                    "target": f"{r['workload']} (local): ckpt {what}",
                    "value": r[key],
                    "op": "<=",
                    "threshold": 1.0,
                    "unit": "x",
                    "pass": bool(r[key] <= 1.0),
                }
            )
    return out


def run(*, smoke: bool, workdir: str, log: Callable[[str], None] = print, s3: bool = True) -> dict[str, Any]:
    limit = 2 * 2**20 if smoke else None
    repeats = 1 if smoke else 3
    workloads = [
        common.minilm_workload(torch.float32, repeats=repeats, limit_bytes=limit),
        common.minilm_workload(torch.bfloat16, repeats=repeats, limit_bytes=limit),
    ]
    log(f"[objects] MiniLM fp32 and bf16, {repeats} repeat(s), local store and {'moto S3' if s3 else 'no S3'}")
    rows: list[dict[str, Any]] = []
    servers: list[dict[str, Any]] = []

    def local_url(label: str) -> str:
        path = tempfile.mkdtemp(prefix=f"objects-{label[:20]}-", dir=workdir)
        os.rmdir(path)
        return path

    rows += bench_store("file", local_url, {}, workloads, log, common.rmtree)
    if s3:
        sys.path.insert(0, str(ROOT / "tests"))
        from servers import MotoS3Process, ServerUnavailable

        try:
            server = MotoS3Process().start()
        except ServerUnavailable as exc:
            log(f"  S3 skipped: {exc}")
            servers.append({"kind": "s3", "skipped": str(exc)})
        else:
            servers.append({"kind": "s3", "endpoint": getattr(server, "endpoint", "")})
            try:
                so = server.storage_options

                def rm(url: str) -> None:
                    fs, path = _fs(url, so)
                    fs.rm(path, recursive=True)

                rows += bench_store("s3", server.new_url, so, workloads, log, rm)
            finally:
                server.stop()
    return {
        "repeats": repeats,
        "rows": rows,
        "servers": servers,
        "targets": targets(rows),
        "ckpt_version": __import__("ckpt").__version__,
    }


def markdown(res: dict[str, Any]) -> str:
    lines = report.header(
        "ckpt objects benchmark: MiniLM (many small tensors), object counts, local and S3",
        res["machine"],
        res["smoke"],
        res.get("other_cpu_cores"),
    )
    lines += [
        f"- Real all-MiniLM-L6-v2 weights, fp32 and bf16; median of {res['repeats']} run(s) after an untimed warm-up;",
        "  every save to a fresh location, every restore into fresh objects, checked bit-exact.",
        "- Restores as the core section's warm ones: local files read into the page cache first, memory",
        "  as a fresh process has it (ckpt's buffer pool emptied, the C heap's free pages given back).",
        "- objects: files the save wrote (ckpt: content objects under `objects/`, without manifest and ref;",
        "  the others: every file). S3 is moto in its own process on this machine (loopback): it compares",
        "  clients and per-object costs, it does not predict cloud throughput. torch.save on S3 writes one",
        "  object through fsspec; DCP uses FsspecWriter/FsspecReader; locally every system fsyncs.",
        "",
        "| store | state | tensors | system | objects | stored (MB) | save (s) | restore (s) | save vs torch.save "
        "| restore vs torch.load | bit-exact |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['store']} | {r['workload']} | {r['tensors']} | {r['label']} | {r['objects']} | "
            f"{report.mb(r['stored_bytes'])} | {report.secs(r['save_s'])} | {report.secs(r['restore_s'])} | "
            f"{report.ratio(r['save_vs_torch'])} | {report.ratio(r['restore_vs_torch'])} | "
            f"{'yes' if r['bit_exact'] else 'NO'} |"
        )
    for s in res["servers"]:
        if "skipped" in s:
            lines += ["", f"{s['kind']} skipped: {s['skipped']}"]
    lines += [
        "",
        "## Targets (issue 17, MiniLM, local store)",
        "",
        "```",
        *report.target_lines(res["targets"], res.get("other_cpu_cores")),
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed.*")

    def run_with_machine(*, smoke: bool, workdir: str, log: Callable[[str], None]) -> dict[str, Any]:
        other = common.OtherCpu()
        res = run(smoke=smoke, workdir=workdir, log=log)
        res.update(
            section="objects", smoke=smoke, machine=common.machine_info(), other_cpu_cores=round(other.cores(), 2)
        )
        return res

    return report.standalone("benchmarks.bench_objects", "objects", __doc__, run_with_machine, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
