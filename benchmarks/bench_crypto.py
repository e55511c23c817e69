"""Encryption section (issue 15): the cost of an encrypted store, measured against a plain one.

The 1.2 GB state of the core section (an MLP of 24 x Linear(2048, 2048) and its AdamW state
after one step) is saved by ``ckpt.save`` to a fresh local store, plain and with
``encryption=ckpt.Encryption(key)``, and restored into fresh objects, in one run and
alternating which goes first each repeat. Reported: median save time (to the durable
commit), bytes stored, median restore time, the encrypted / plain ratios against the
targets (save <= 1.10x, bytes <= 1.02x, restore <= 1.10x; PASS/FAIL, never asserted), and
the machine and the CPU other processes used meanwhile. Each restore is checked bit-exact.

``python -m benchmarks.bench_crypto [--smoke] [--out DIR]`` runs it standalone;
``python -m benchmarks.run --section encryption`` as part of the harness.
"""

from __future__ import annotations

import gc
import os
import tempfile
from typing import Any

from benchmarks import common, report
from benchmarks.common import median, now

TARGETS = {"save": 1.10, "stored_bytes": 1.02, "restore": 1.10}
MODES = ("plain", "encrypted")


def _measure(w: common.Workload, workdir: str, repeats: int, log) -> dict[str, Any]:
    import ckpt

    key = os.urandom(32)
    src = w.build()
    raw = common.raw_bytes(src)
    log(f"[encryption] {w.name}: {w.title}, {raw / 1e6:.1f} MB raw, {repeats} repeat(s)")
    per: dict[str, dict[str, list[float]]] = {m: {"save_s": [], "restore_s": [], "stored_bytes": []} for m in MODES}
    for r in range(repeats):
        for mode in MODES if r % 2 == 0 else tuple(reversed(MODES)):
            enc = ckpt.Encryption(key) if mode == "encrypted" else None
            path = tempfile.mkdtemp(prefix=f"crypto-{mode}-", dir=workdir)
            os.rmdir(path)
            gc.collect()
            t0 = now()
            ckpt.save(path, dict(src), step=1, encryption=enc)
            t_save = now() - t0
            stored = common.dir_bytes(path)
            dst = w.fresh()
            gc.collect()
            t0 = now()
            ckpt.restore(path, dict(dst), encryption=ckpt.Encryption(key) if enc else None)
            t_restore = now() - t0
            problem = common.state_diff(src, dst)
            assert problem is None, f"{mode} restore is not bit-exact: {problem}"
            rec = per[mode]
            rec["save_s"].append(t_save)
            rec["restore_s"].append(t_restore)
            rec["stored_bytes"].append(stored)
            log(f"  {mode:<10} save {t_save:7.3f}s  restore {t_restore:7.3f}s  stored {stored / 1e6:9.1f} MB")
            del dst
            common.rmtree(path)
    del src
    gc.collect()
    out: dict[str, Any] = {"title": w.title, "raw_bytes": raw, "repeats": repeats, "modes": {}}
    for mode, rec in per.items():
        out["modes"][mode] = {
            "save_s": median(rec["save_s"]),
            "restore_s": median(rec["restore_s"]),
            "stored_bytes": int(median(rec["stored_bytes"])),
            "save_s_best": min(rec["save_s"]),
            "restore_s_best": min(rec["restore_s"]),
            "save_s_all": rec["save_s"],
            "restore_s_all": rec["restore_s"],
        }
    return out


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    plain, enc = res["modes"]["plain"], res["modes"]["encrypted"]
    out = []
    for name, field, what in (
        ("save", "save_s", "encrypted save / plain save"),
        ("stored_bytes", "stored_bytes", "encrypted stored bytes / plain stored bytes"),
        ("restore", "restore_s", "encrypted restore / plain restore"),
    ):
        value = enc[field] / plain[field] if plain[field] else float("nan")
        out.append(
            {
                "target": what,
                "value": value,
                "op": "<=",
                "threshold": TARGETS[name],
                "unit": "x",
                "pass": bool(value <= TARGETS[name]),
                "timing": name != "stored_bytes",
            }
        )
    return out


def run(
    *, smoke: bool, workdir: str, log=print, layers: int | None = None, repeats: int | None = None
) -> dict[str, Any]:
    """The section's results; ``layers`` shrinks the MLP (24 layers = the 1.2 GB state)."""
    if smoke:
        w = common.mlp_workload(layers=layers or 4, width=64, repeats=1, batch=4)
        repeats = repeats or 1
    else:
        common.warm_memory(4.0)
        repeats = repeats or 3
        w = common.mlp_workload(layers=layers or 24, width=2048, repeats=repeats)
    other = common.OtherCpu()
    res = _measure(w, workdir, repeats, log)
    return {
        "section": "encryption",
        "smoke": smoke,
        "workload": res,
        "targets": targets(res),
        "machine": common.machine_info(),
        "other_cpu_cores": round(other.cores(), 2),
    }


def markdown(res: dict[str, Any]) -> str:
    w = res["workload"]
    lines = report.header(
        "Encryption: AES-256-GCM store vs plain store", res["machine"], res["smoke"], res.get("other_cpu_cores")
    )
    lines += [
        "",
        f"Workload: {w['title']}, {report.mb(w['raw_bytes'])} MB raw; median of {w['repeats']} repeat(s), "
        "plain and encrypted alternating. Times to the durable commit (save) and into the live objects (restore).",
        "",
        "| store | save (s) median | save (s) best | stored (MB) | restore (s) median | restore (s) best |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        m = w["modes"][mode]
        lines.append(
            f"| {mode} | {report.secs(m['save_s'])} | {report.secs(m['save_s_best'])} | {report.mb(m['stored_bytes'])} "
            f"| {report.secs(m['restore_s'])} | {report.secs(m['restore_s_best'])} |"
        )
    p, e = w["modes"]["plain"], w["modes"]["encrypted"]
    lines.append(
        f"| **encrypted / plain** | {report.ratio(e['save_s'] / p['save_s'])} "
        f"| {report.ratio(e['save_s_best'] / p['save_s_best'])} "
        f"| {report.ratio(e['stored_bytes'] / p['stored_bytes'])} | {report.ratio(e['restore_s'] / p['restore_s'])} "
        f"| {report.ratio(e['restore_s_best'] / p['restore_s_best'])} |"
    )
    lines += [
        "",
        "Targets (on the medians; best-of-repeats ratios shown too, less sensitive to other processes):",
        "",
        "```",
        *report.target_lines(res["targets"], res.get("other_cpu_cores")),
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return report.standalone("benchmarks.bench_crypto", "encryption", __doc__, run, markdown, argv)


if __name__ == "__main__":
    raise SystemExit(main())
