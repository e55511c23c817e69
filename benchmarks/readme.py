"""``python -m benchmarks.readme``: copy the headline tables of ``benchmarks/results/*.md``
into README.md, between ``<!-- BENCH -->`` and ``<!-- /BENCH -->``, so the README shows
the figures of the last full run and the machine it ran on (never hand-typed numbers).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- BENCH -->", "<!-- /BENCH -->"


def section(md: str, heading: str) -> str:
    """The body of the section whose heading starts with ``heading`` (up to the next heading)."""
    m = re.search(rf"^#+ {re.escape(heading)}.*?$\n(.*?)(?=^#+ |\Z)", md, flags=re.S | re.M)
    if m is None:
        raise SystemExit(f"benchmarks/readme: no section {heading!r} in the results; run the benchmarks first")
    return m.group(1).strip()


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


def render() -> str:
    core = (RESULTS / "core.md").read_text()
    asyn = (RESULTS / "async.md").read_text()
    inc = (RESULTS / "incremental.md").read_text()
    remote = (RESULTS / "remote.md").read_text()
    parts = [
        START,
        "## Benchmarks",
        "",
        "`make bench` runs the core and async sections; `python -m benchmarks.bench_incremental` and",
        "`python -m benchmarks.bench_remote` the others; `python -m benchmarks.readme` copies the",
        "headline tables below from `benchmarks/results/` (full tables, JSON and notes there).",
        "Every peer runs on the same state in the same process run; ratios are against the peer",
        "named in the column. Targets are printed as PASS/FAIL by the benchmark itself.",
        "",
        line_with(core, "- Machine:"),
        line_with(core, "- Software:"),
        line_with(core, "- Date:"),
        "",
        "### Save and restore (local disk, fsync on, warm page cache)",
        "",
        "MLP 24 x Linear(2048, 2048) + AdamW after one step (1.2 GB):",
        "",
        tables(section(core, "MLP 24")),
        "",
        "all-MiniLM-L6-v2 real weights, bf16:",
        "",
        tables(section(core, "all-MiniLM-L6-v2 real weights, bf16")).split("\n\n")[0],
        "",
        tables(section(core, "Targets")),
        "",
        "### Asynchronous snapshots (same MLP + AdamW state)",
        "",
        tables(section(asyn, "The save call")),
        "",
        tables(section(asyn, "Training loop")),
        "",
        tables(section(asyn, "Targets")),
        "",
        "### Incremental checkpoints (real all-MiniLM-L6-v2 weights)",
        "",
        tables(section(inc, "LoRA r=8")),
        "",
        tables(section(inc, "Full fine-tune")),
        "",
        "Restore time against the saves since the chunk's full object:",
        "",
        tables(section(inc, "Restore time")),
        "",
        "### Remote stores (moto S3 and azurite on this machine)",
        "",
        tables(section(remote, "ckpt remote-store benchmark")),
        "",
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
