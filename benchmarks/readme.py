"""``python -m benchmarks.readme``: copy the headline tables of ``benchmarks/results/*.md``
into README.md, between ``<!-- BENCH -->`` and ``<!-- /BENCH -->``, so the README shows
the figures of the last full run and the machine it ran on (never hand-typed numbers).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- BENCH -->", "<!-- /BENCH -->"


def find_section(md: str | None, heading: str) -> str | None:
    """The body of the section whose heading starts with ``heading`` (up to the next heading)."""
    if md is None:
        return None
    m = re.search(rf"^#+ {re.escape(heading)}.*?$\n(.*?)(?=^#+ |\Z)", md, flags=re.S | re.M)
    return None if m is None else m.group(1).strip()


def section(md: str | None, heading: str) -> str:
    body = find_section(md, heading)
    if body is None:
        raise SystemExit(f"benchmarks/readme: no section {heading!r} in the results; run the benchmarks first")
    return body


def tables(text: str) -> str:
    """Only the Markdown tables and fenced blocks of ``text``."""
    out, block, fenced = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            block.append(line)
            continue
        if fenced or line.startswith("|"):
            block.append(line)
        elif block:
            out.append("\n".join(block))
            block = []
    if block:
        out.append("\n".join(block))
    return "\n\n".join(out)


def line_with(md: str, prefix: str) -> str:
    for line in md.splitlines():
        if line.startswith(prefix):
            return line
    return ""


#: README subsections: (title, [(results file, section heading, caption or "", first table only)
#: or, for results a full run has not produced yet, the same with a fifth item: what to say
#: (and which command to run) while the file or the section is missing])
LAYOUT: list[tuple[str, list[tuple[Any, ...]]]] = [
    (
        "Save and restore (local disk, fsync on)",
        [
            ("core", "MLP 24", "MLP 24 x Linear(2048, 2048) + AdamW after one step (1.2 GB):", False),
            ("core", "all-MiniLM-L6-v2 real weights, fp32", "all-MiniLM-L6-v2 real weights, fp32:", True),
            ("core", "all-MiniLM-L6-v2 real weights, bf16", "all-MiniLM-L6-v2 real weights, bf16:", True),
            ("core", "Targets", "", False),
        ],
    ),
    (
        "Asynchronous snapshots (same MLP + AdamW state)",
        [
            ("async", "The save call", "", False),
            ("async", "Training loop", "", False),
            (
                "async",
                "Training loop: 100 steps",
                "",
                False,
                "A checkpoint every 50 steps: not measured yet (`make bench` measures it).",
            ),
            ("async", "Targets", "", False),
        ],
    ),
    (
        "Many small tensors: objects per checkpoint (MiniLM, local and moto S3)",
        [
            (
                "objects",
                "ckpt objects benchmark",
                "",
                False,
                "Not measured yet: `python -m benchmarks.run --section objects` (part of `make bench`).",
            ),
            ("objects", "Targets", "", False, ""),
            (
                "objects-before-packing",
                "BEFORE small-tensor packing",
                "Before small tensors were packed (one object per tensor; a shared machine, the object counts are "
                "what to compare):",
                False,
                "",
            ),
        ],
    ),
    (
        "GPU: D2H staging, save() stall, loop overhead vs DCP async_save + DefaultStager",
        [
            ("gpu", "D2H copy", "", False, "No GPU figures yet: `make bench-gpu` on a machine with a CUDA device."),
            ("gpu", "The save() stall", "", False, ""),
            ("gpu", "Training loop", "", False, ""),
            ("gpu", "Targets", "", False, ""),
        ],
    ),
    (
        "Incremental checkpoints (real all-MiniLM-L6-v2 weights)",
        [
            ("incremental", "LoRA r=8", "", False),
            ("incremental", "Full fine-tune", "", False),
            ("incremental", "Restore time", "Restore time against the saves since the chunk's full object:", False),
        ],
    ),
    (
        "Remote stores (moto S3 and azurite on this machine)",
        [
            ("remote", "ckpt remote-store benchmark", "", False),
        ],
    ),
    (
        "Frameworks: each one's default checkpointing vs its ckpt plugin (~50 MB of state, 5 checkpoints)",
        [
            (
                "lightning",
                "Frameworks: Lightning",
                "Lightning ({when}):",
                False,
            ),
            (
                "transformers",
                "Frameworks: Hugging Face",
                "Hugging Face Trainer ({when}):",
                False,
            ),
        ],
    ),
]


def when(md: str | None) -> str:
    """Where and when a results file was measured, from its header: date, CPU and cores, and
    the load other processes put on the machine meanwhile."""
    text = md or ""
    date = line_with(text, "- Date:").removeprefix("- Date:").strip()
    machine = ", ".join(line_with(text, "- Machine:").removeprefix("- Machine:").strip().split(", ")[:2])
    load = re.search(r"^- Other processes used ([0-9.]+) of", text, flags=re.M)
    parts = [p for p in (date, machine) if p]
    out = ", ".join(parts) or "date and machine not recorded"
    return out + (f"; other processes used {load.group(1)} of the cores" if load else "")


def _blocks(title: str, picks: list[tuple[Any, ...]], docs: dict[str, str | None]) -> list[str]:
    out = [f"### {title}", ""]
    for name, heading, caption, first_only, *missing in picks:
        found = find_section(docs[name], heading)
        if found is None and missing:
            out += [missing[0], ""] if missing[0] else []
            continue
        body = tables(section(docs[name], heading))
        if first_only:
            body = body.split("\n\n")[0]
        caption = caption.replace("{when}", when(docs[name]))
        out += ([caption, ""] if caption else []) + [body, ""]
    return out


def render() -> str:
    names = (
        "core",
        "async",
        "objects",
        "objects-before-packing",
        "gpu",
        "incremental",
        "remote",
        "lightning",
        "transformers",
    )
    docs = {
        name: (RESULTS / f"{name}.md").read_text() if (RESULTS / f"{name}.md").is_file() else None for name in names
    }
    core = docs["core"] or ""
    parts = [
        START,
        "## Benchmarks",
        "",
        "`make bench` runs the core, async and objects sections, `make bench-frameworks` the frameworks one,",
        "`make bench-gpu` the CUDA tests and the GPU section (on a machine with a CUDA device);",
        "`python -m benchmarks.bench_incremental` and `python -m benchmarks.bench_remote` the others;",
        "`python -m benchmarks.readme` copies the",
        "headline tables below from `benchmarks/results/` (full tables, JSON and notes there).",
        "Every peer runs on the same state in the same process; ratios are against the peer",
        "named in the column. Targets are printed as PASS/FAIL by the benchmark itself.",
        "",
        line_with(core, "- Machine:"),
        line_with(core, "- Software:"),
        line_with(core, "- Date:"),
        *[
            line
            for line in (
                line_with(core, "- Fresh memory:"),
                line_with(core, "- Warm restore:"),
                line_with(core, "- Cold restore:"),
            )
            if line
        ],
        "",
        *[block for title, picks in LAYOUT for block in _blocks(title, picks, docs)],
        END,
    ]
    return "\n".join(parts)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text:
        raise SystemExit(f"README.md has no {START} marker")
    head, _, rest = text.partition(START)
    _, found, tail = rest.partition(END)
    readme.write_text(head + render() + (tail if found else "\n"))
    print("README.md benchmark section updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
