"""Core section (issue 2): ckpt vs torch.save, DCP (+ZStandard), safetensors on the same state.

For each workload and repeat, every system in turn saves to a fresh directory (timed to
the durable commit), restores into fresh pre-built objects with its files in the page cache (read
once first: ckpt writes large objects around it; timed until the values are in the model
and optimizer) and is checked bit-exact against the saved state; then its
files leave the page cache (benchmarks/cache.py) and it restores again: the cold figure.
Each workload is measured in a fresh process of its own, and every restore starts with the
memory of a fresh process (:func:`benchmarks.common.fresh_memory`), as a resumed job restores
(see :func:`measure_isolated`).
"""

from __future__ import annotations

import gc
import os
import tempfile
from typing import Any

import ckpt
from benchmarks import cache, common
from benchmarks.common import Workload, median, now
from benchmarks.systems import DCP, System, TorchSave, all_systems


def _stored_share(chunk: Any) -> float:
    """The stored bytes of a chunk; for a packed chunk (a slice of an object several small
    tensors share, manifest schema 2) its share of the object, by raw size."""
    of = getattr(chunk, "of", -1)
    return chunk.stored * chunk.size / of if of and of > 0 else chunk.stored


def ckpt_groups(path: str) -> dict[str, dict[str, float]]:
    """ckpt's compression per kind of tensor, from the manifest it wrote."""
    manifest = ckpt.read_manifest(path)
    groups: dict[str, list[float]] = {}
    for tpath, entry in manifest.tensors.items():
        if tpath.startswith("model/"):
            group = "params/weights (" + entry.dtype + ")"
        elif tpath.endswith("/exp_avg_sq"):
            group = "Adam exp_avg_sq"
        elif tpath.endswith("/exp_avg"):
            group = "Adam exp_avg"
        else:
            group = "other"
        raw_stored = groups.setdefault(group, [0, 0])
        raw_stored[0] += entry.nbytes
        raw_stored[1] += sum(_stored_share(c) for c in entry.chunks)
    all_raw = sum(v[0] for v in groups.values())
    all_stored = sum(v[1] for v in groups.values())
    groups["all tensors"] = [all_raw, all_stored]
    moments = [v for k, v in groups.items() if k.startswith("Adam")]
    if moments:
        groups["Adam moments (both)"] = [sum(v[0] for v in moments), sum(v[1] for v in moments)]
    return {
        k: {"raw_bytes": raw, "stored_bytes": stored, "ratio": raw / stored if stored else float("nan")}
        for k, (raw, stored) in groups.items()
    }


def bench_workload(w: Workload, systems: list[System], workdir: str, log, cold: str = "off") -> dict[str, Any]:
    """Save, warm restore and (``cold`` a method of :mod:`benchmarks.cache`, not "off") cold
    restore of ``w`` by every system, ``w.repeats`` times in rotating order."""
    src = w.build()
    raw = common.raw_bytes(src)
    log(f"[core] {w.name}: {w.title}, {raw / 1e6:.1f} MB raw, {w.repeats} repeat(s)")
    per: dict[str, dict[str, Any]] = {
        s.name: {
            "label": s.label,
            "notes": s.notes,
            "save_s": [],
            "restore_s": [],
            "restore_cold_s": [],
            "resident_after_evict": [],
            "stored_bytes": [],
            "bit_exact": True,
        }
        for s in systems
    }
    groups: dict[str, Any] = {}
    other = common.OtherCpu()
    for r in range(w.repeats):
        # rotate the order each repeat so no system always runs first (or right after a big writer)
        order = systems[r % len(systems) :] + systems[: r % len(systems)]
        for s in order:
            path = tempfile.mkdtemp(prefix=f"{w.name}-{s.name}-", dir=workdir)
            os.rmdir(path)  # every system starts from a directory that does not exist
            gc.collect()
            t0 = now()
            s.save(src, path)
            t_save = now() - t0
            stored = common.dir_bytes(path)
            dst = w.fresh()
            warm = cache.load([path])  # every system's files in the page cache (see cache.load)
            with common.fresh_memory():  # no system restores into pages an earlier one freed
                t0 = now()
                s.restore(dst, path)
                t_restore = now() - t0
            problem = common.state_diff(src, dst)
            cold_note = ""
            if cold != "off":
                del dst
                dst = w.fresh()
                cache.evict([path], cold)
                resident = cache.resident_fraction([path])
                with common.fresh_memory():
                    t0 = now()
                    s.restore(dst, path)
                    t_cold = now() - t0
                problem = problem or common.state_diff(src, dst)
                per[s.name]["restore_cold_s"].append(t_cold)
                per[s.name]["resident_after_evict"].append(resident)
                cold_note = f"  cold {t_cold:7.3f}s" + ("" if resident is None else f" ({100 * resident:.0f}% cached)")
            if s.name == "ckpt":
                assert problem is None, f"ckpt restore of {w.name} is not bit-exact: {problem}"
                if not groups:
                    groups = ckpt_groups(path)
            rec = per[s.name]
            rec["save_s"].append(t_save)
            rec["restore_s"].append(t_restore)
            rec["stored_bytes"].append(stored)
            if problem is not None:
                rec["bit_exact"] = False
                rec["problem"] = problem
            log(
                f"  {s.name:<12} save {t_save:7.3f}s  restore {t_restore:7.3f}s"
                f"{'' if warm is None else f' ({100 * warm:.0f}% cached)'}{cold_note}  stored {stored / 1e6:9.1f} MB"
                f"{'' if problem is None else '  NOT BIT-EXACT: ' + problem}"
            )
            del dst
            common.rmtree(path)
    out: dict[str, Any] = {
        "name": w.name,
        "title": w.title,
        "raw_bytes": raw,
        "repeats": w.repeats,
        "params": w.extra.get("params"),
        "systems": {},
        "ckpt_groups": groups,
        "other_cpu_cores": round(other.cores(), 2),
    }
    for name, rec in per.items():
        stored = int(median([float(x) for x in rec["stored_bytes"]]))
        out["systems"][name] = {
            "label": rec["label"],
            "notes": rec["notes"],
            "save_s": median(rec["save_s"]),
            "restore_s": median(rec["restore_s"]),
            "save_s_all": rec["save_s"],
            "restore_s_all": rec["restore_s"],
            "restore_cold_s": median(rec["restore_cold_s"]) if rec["restore_cold_s"] else None,
            "restore_cold_s_all": rec["restore_cold_s"],
            "resident_after_evict": max((x for x in rec["resident_after_evict"] if x is not None), default=None),
            "stored_bytes": stored,
            "ratio": raw / stored if stored else float("nan"),
            "bit_exact": rec["bit_exact"],
            **({"problem": rec["problem"]} if "problem" in rec else {}),
        }
    base = out["systems"].get(TorchSave.name)
    dcp = out["systems"].get(DCP.name)
    for rec in out["systems"].values():
        if base:
            rec["save_vs_torch"] = rec["save_s"] / base["save_s"]
            rec["restore_vs_torch"] = rec["restore_s"] / base["restore_s"]
        if dcp:
            rec["restore_vs_dcp"] = rec["restore_s"] / dcp["restore_s"]
        if base and rec["restore_cold_s"] and base["restore_cold_s"]:
            rec["restore_cold_vs_torch"] = rec["restore_cold_s"] / base["restore_cold_s"]
        if dcp and rec["restore_cold_s"] and dcp["restore_cold_s"]:
            rec["restore_cold_vs_dcp"] = rec["restore_cold_s"] / dcp["restore_cold_s"]
    del src
    gc.collect()
    return out


def targets(workloads: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 2's compression and issue 17's speed targets, evaluated on the measured figures
    (reported, never asserted)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, op: str, threshold: float, unit: str = "x") -> None:
        ok = value >= threshold if op == ">=" else (value <= threshold if op == "<=" else value < threshold)
        out.append(
            {
                "target": name,
                "value": value,
                "op": op,
                "threshold": threshold,
                "unit": unit,
                "pass": bool(ok),
                "timing": "smaller than raw" not in name,
            }
        )

    bf16 = workloads.get("minilm_bf16")
    if bf16:
        add(
            "bf16 real weights (MiniLM) smaller than raw, ckpt tensor payload",
            bf16["ckpt_groups"]["all tensors"]["ratio"],
            ">=",
            1.45,
        )
    fp32 = workloads.get("minilm_fp32")
    if fp32:
        add(
            "fp32 real weights (MiniLM) smaller than raw, ckpt tensor payload",
            fp32["ckpt_groups"]["all tensors"]["ratio"],
            ">=",
            1.18,
        )
    mlp = workloads.get("mlp_adamw")
    if mlp and "Adam moments (both)" in mlp["ckpt_groups"]:
        add(
            "Adam moments (MLP, exp_avg + exp_avg_sq) smaller than raw",
            mlp["ckpt_groups"]["Adam moments (both)"]["ratio"],
            ">=",
            1.18,
        )
    # issue 17's speed targets
    for name, w in workloads.items():
        c = w["systems"].get("ckpt")
        if not c:
            continue
        if name.startswith("mlp"):
            if "save_vs_torch" in c:
                add(f"{name}: ckpt save / (torch.save + fsync)", c["save_vs_torch"], "<=", 0.6)
            if "restore_vs_dcp" in c:
                add(f"{name}: ckpt restore / dcp.load, warm page cache", c["restore_vs_dcp"], "<=", 1.0)
            if "restore_cold_vs_dcp" in c:
                add(f"{name}: ckpt restore / dcp.load, cold page cache", c["restore_cold_vs_dcp"], "<=", 1.0)
        else:
            if "save_vs_torch" in c:
                add(f"{name}: ckpt save / (torch.save + fsync)", c["save_vs_torch"], "<=", 1.0)
            if "restore_vs_torch" in c:
                add(f"{name}: ckpt restore / (torch.load + load_state_dict)", c["restore_vs_torch"], "<=", 1.0)
    return out


#: what each workload is built from, in the process that measures it (see :func:`run`)
WorkloadSpec = tuple[str, dict[str, Any]]


def workload_specs(smoke: bool, mlp_layers: int) -> list[WorkloadSpec]:
    if smoke:
        return [
            ("mlp", {"layers": 4, "width": 64, "repeats": 1, "batch": 4}),
            ("minilm", {"dtype": "float32", "repeats": 1, "limit_bytes": 2 * 2**20}),
            ("minilm", {"dtype": "bfloat16", "repeats": 1, "limit_bytes": 2 * 2**20}),
        ]
    return [
        ("mlp", {"layers": mlp_layers, "width": 2048, "repeats": 3}),
        ("minilm", {"dtype": "float32", "repeats": 5}),
        ("minilm", {"dtype": "bfloat16", "repeats": 5}),
    ]


def build_workload(spec: WorkloadSpec) -> Workload:
    import torch

    kind, kw = spec
    if kind == "mlp":
        return common.mlp_workload(**kw)
    return common.minilm_workload(getattr(torch, kw["dtype"]), kw["repeats"], kw.get("limit_bytes"))


def _measure_in_child(spec: WorkloadSpec, workdir: str, cold: str, warm_gib: float, out: Any) -> None:
    """One workload measured in this fresh process; log lines and the result go to ``out``."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed.*")
    try:
        if warm_gib:
            common.warm_memory(warm_gib)
        res = bench_workload(build_workload(spec), all_systems(), workdir, lambda m: out.put(("log", m)), cold=cold)
        out.put(("result", res))
    except BaseException as exc:  # reported by the parent, which raises it
        import traceback

        out.put(("error", "".join(traceback.format_exception(exc))))


def measure_isolated(spec: WorkloadSpec, workdir: str, log, cold: str, warm_gib: float) -> dict[str, Any]:
    """:func:`bench_workload` of ``spec`` in a fresh interpreter, as a resume runs.

    A process that has just loaded and freed another state keeps its heap mapped in: a
    torch.load of MiniLM after the 1.2 GB one in the same process took 16-17 ms instead of
    50-57 (fresh memory for every tensor it allocates costs page faults; ckpt and DCP fill
    the live tensors and allocate little). A resumed job loads into a fresh process, so
    each workload is measured in one of its own.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_measure_in_child, args=(spec, workdir, cold, warm_gib, out), daemon=True)
    child.start()
    try:
        while True:
            try:
                kind, value = out.get(timeout=5)
            except Exception:  # queue.Empty: is it still running?
                if not child.is_alive():
                    raise RuntimeError(f"core benchmark of {spec} died (exit code {child.exitcode})") from None
                continue
            if kind == "log":
                log(value)
            elif kind == "error":
                raise RuntimeError(f"core benchmark of {spec} failed:\n{value}")
            else:
                return value
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()


def run(*, smoke: bool, workdir: str, log=print, cold: str = "auto", mlp_layers: int = 24) -> dict[str, Any]:
    method, cold_note = cache.resolve(cold)
    log(f"[core] cold restores: {cold_note}; each workload measured in a fresh process")
    results: dict[str, Any] = {}
    for spec in workload_specs(smoke, mlp_layers):
        res = measure_isolated(spec, workdir, log, method, 0.0 if smoke else 4.0)
        results[res.pop("name")] = res
    systems = all_systems()
    return {
        "workloads": results,
        "targets": targets(results),
        "systems": [s.name for s in systems],
        "cold": {"method": method, "note": cold_note},
        "isolation": "each workload measured in a fresh process" + ("" if smoke else " (spawned, 4 GiB touched first)"),
    }
