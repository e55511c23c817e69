"""Markdown tables, target lines and the plot of the benchmark results."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def secs(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}" if x >= 0.1 else f"{x * 1000:.1f} ms"


def ratio(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.2f}x"


def target_lines(targets: list[dict[str, Any]], other_cpu: float | None = None) -> list[str]:
    """One PASS/FAIL line per target; timing targets are flagged when the machine was shared."""
    lines = []
    shared = other_cpu is not None and other_cpu > 0.2
    for t in targets:
        unit = t.get("unit", "x")
        # four digits for ratios: 1.1797x must not print as a passing-looking 1.180x
        value = f"{t['value']:.4f}{unit}" if unit == "x" else f"{t['value']:.3f} {unit}"
        thr = f"{t['threshold']}{unit}" if unit == "x" else f"{t['threshold']} {unit}"
        note = ""
        if shared and t.get("timing", True):
            note = f"  [shared machine: other processes used {other_cpu:.2f} cores]"
        lines.append(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {value} (target {t['op']} {thr}){note}")
    return lines


def header(title: str, machine: dict[str, Any], smoke: bool, other_cpu: float | None = None) -> list[str]:
    lines = [f"# {title}", ""]
    if smoke:
        lines += ["**Smoke run: tiny sizes, one repeat. Timings mean nothing.**", ""]
    lines += [
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM "
        f"(torch uses {machine['torch_threads']} threads)",
        f"- Software: torch {machine['torch']}, ckpt {machine['ckpt']}, Python {machine['python']}, {machine['platform']}",
        f"- Date: {machine['date']}",
    ]
    if machine.get("source"):
        lines.append(f"- Source: commit {machine['source']}")
    if other_cpu is not None:
        lines.append(
            f"- Other processes used {other_cpu:.2f} of the {machine['cores']} cores on average during this section"
            + (" (a shared machine: timings are pessimistic and noisier)" if other_cpu > 0.2 else "")
        )
    return lines


def cold_sentence(res: dict[str, Any]) -> str:
    cold = res.get("cold")
    if not cold:
        return "not measured (results written before cold restores were added)"
    return str(cold["note"])


def core_markdown(res: dict[str, Any]) -> str:
    lines = header(
        "ckpt core benchmark: save to durable commit, restore ready to train",
        res["machine"],
        res["smoke"],
        res.get("other_cpu_cores"),
    )
    lines += [
        "- Every system saves the same live objects in one process to a fresh local directory and restores",
        "  into fresh pre-built model/optimizer objects (optimizer state materialised, different values);",
        "  restore time ends when the values are in the objects (load_state_dict included), not at a lazy mmap.",
        "  Each system's restore is compared byte-for-byte with the saved state (`bit-exact`); ckpt's is asserted.",
        "- Save time includes fsync for every system (ckpt fsyncs objects, directories, manifest and ref; torch.save",
        "  and safetensors are followed by fsync of the file and directory; DCP's FileSystemWriter fsyncs by default).",
        "- Fresh memory: each workload runs in a process of its own, and every restore starts with the memory "
        "of a fresh process (ckpt's buffer pool emptied, the C heap's free pages given back with malloc_trim), "
        "as a resumed job restores: no system reads into pages an earlier restore freed.",
        "- Warm restore: after the save, every system's files are read once so the page cache holds them all "
        "(ckpt writes objects of 1 MiB or more around the page cache, so right after its save they are not cached).",
        f"- Cold restore: {cold_sentence(res)}.",
        "- cached: share of the files' pages still in the page cache after eviction (mincore), the largest",
        "  over the repeats (0% means the cold restore read everything from the device).",
        "- Times are the median of the repeats; the order of the systems rotates every repeat.",
        "- ratio = logical tensor bytes / bytes on disk (every file the system wrote). Speed ratios: < 1 is faster",
        "  than the reference.",
        "",
    ]
    for name, w in res["workloads"].items():
        other = w.get("other_cpu_cores")
        busy = "" if other is None else f"; other processes used {other:.2f} cores meanwhile"
        lines += [
            f"## {w['title']}",
            "",
            f"`{name}`: {mb(w['raw_bytes'])} MB of tensors, median of {w['repeats']} run(s){busy}.",
            "",
            "| system | save (s) | restore (s) | cold restore (s) | stored (MB) | ratio | save vs torch.save "
            "| restore vs torch.load | restore vs DCP load | cold vs torch.load | cold vs DCP load | cached | bit-exact |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
        ]
        for s in w["systems"].values():
            resident = s.get("resident_after_evict")
            lines.append(
                f"| {s['label']} | {secs(s['save_s'])} | {secs(s['restore_s'])} | {secs(s.get('restore_cold_s'))} | "
                f"{mb(s['stored_bytes'])} | {ratio(s['ratio'])} | {ratio(s.get('save_vs_torch'))} | "
                f"{ratio(s.get('restore_vs_torch'))} | {ratio(s.get('restore_vs_dcp'))} | "
                f"{ratio(s.get('restore_cold_vs_torch'))} | {ratio(s.get('restore_cold_vs_dcp'))} | "
                f"{'n/a' if resident is None else f'{100 * resident:.0f}%'} | {'yes' if s['bit_exact'] else 'NO'} |"
            )
        if w.get("ckpt_groups"):
            lines += [
                "",
                "ckpt compression by kind of tensor (object payloads, without the manifest):",
                "",
                "| tensors | raw (MB) | stored (MB) | ratio |",
                "|---|---:|---:|---:|",
            ]
            for g, v in w["ckpt_groups"].items():
                lines.append(f"| {g} | {mb(v['raw_bytes'])} | {mb(v['stored_bytes'])} | {ratio(v['ratio'])} |")
        lines.append("")
    lines += ["## Systems", ""]
    first = next(iter(res["workloads"].values()))
    for s in first["systems"].values():
        lines.append(f"- **{s['label']}**: {s['notes']}")
    lines += [
        "",
        "## Targets (issues 2 and 17)",
        "",
        "```",
        *target_lines(res["targets"], res.get("other_cpu_cores")),
        "```",
        "",
    ]
    return "\n".join(lines)


def core_plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = list(res["workloads"].items())
    metrics = [
        ("save_s", "save to durable commit (s)"),
        ("restore_s", "restore ready to train (s)"),
        ("stored_bytes", "stored (MB)"),
    ]
    fig, axes = plt.subplots(len(loads), len(metrics), figsize=(15, 3.6 * len(loads)), squeeze=False)
    for row, (name, w) in enumerate(loads):
        names = list(w["systems"])
        colors = ["#d62728" if n == "ckpt" else "#7f7f7f" for n in names]
        for col, (key, label) in enumerate(metrics):
            ax = axes[row][col]
            vals = [w["systems"][n][key] / (1e6 if key == "stored_bytes" else 1) for n in names]
            bars = ax.bar(range(len(names)), vals, color=colors)
            ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
            ax.set_title(f"{name}: {label}", fontsize=9)
            for b, v in zip(bars, vals):
                ax.annotate(
                    f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7
                )
    fig.suptitle("ckpt vs peers (median; lower is better)" + (" - SMOKE" if res["smoke"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def standalone(
    module: str,
    name: str,
    doc: str | None,
    run: Callable[..., dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
    argv: list[str] | None = None,
) -> int:
    """``python -m <module> [--smoke] [--out DIR] [--workdir DIR]`` for one benchmark section:
    runs it, prints its table, and with ``--out`` writes ``<name>.json`` and ``<name>.md``."""
    import argparse
    import tempfile

    p = argparse.ArgumentParser(prog=f"python -m {module}", description=(doc or name).splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round (checks the harness, not speed)")
    p.add_argument("--out", default=None, help=f"also write {name}.json and {name}.md here")
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix=f"ckpt-bench-{name}-", dir=a.workdir) as workdir:
        res = run(smoke=a.smoke, workdir=workdir, log=lambda m: print(m, flush=True))
    md = markdown(res)
    print(md)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / f"{name}.json", res)
        (out / f"{name}.md").write_text(md)
    return 0
