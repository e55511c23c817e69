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


#: README subsections: (title, [(results file, section heading, caption or "", first table only)])
LAYOUT = [
    (
        "Save and restore (local disk, fsync on, warm page cache)",
        [
            ("core", "MLP 24", "MLP 24 x Linear(2048, 2048) + AdamW after one step (1.2 GB):", False),
            ("core", "all-MiniLM-L6-v2 real weights, bf16", "all-MiniLM-L6-v2 real weights, bf16:", True),
            ("core", "Targets", "", False),
        ],
    ),
    (
        "Asynchronous snapshots (same MLP + AdamW state)",
        [
            ("async", "The save call", "", False),
            ("async", "Training loop", "", False),
            ("async", "Targets", "", False),
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
                "Lightning (2026-12-02, Intel Xeon, 2 cores; other processes used 0.15 of them):",
                False,
            ),
            (
                "transformers",
                "Frameworks: Hugging Face",
                "Hugging Face Trainer (2026-12-02, Intel Xeon, 2 cores, shared: other processes used 1.62 of them; measured "
                "before the Checkpointer copied guarded tensors ahead of store I/O):",
                False,
            ),
        ],
    ),
]


def _blocks(title: str, picks: list[tuple[str, str, str, bool]], docs: dict[str, str]) -> list[str]:
    out = [f"### {title}", ""]
    for name, heading, caption, first_only in picks:
        body = tables(section(docs[name], heading))
        if first_only:
            body = body.split("\n\n")[0]
        out += ([caption, ""] if caption else []) + [body, ""]
    return out


def render() -> str:
    names = ("core", "async", "incremental", "remote", "lightning", "transformers")
    docs = {name: (RESULTS / f"{name}.md").read_text() for name in names}
    core = docs["core"]
    parts = [
        START,
        "## Benchmarks",
        "",
        "`make bench` runs the core and async sections, `make bench-frameworks` the frameworks one;",
        "`python -m benchmarks.bench_incremental` and `python -m benchmarks.bench_remote` the others;",
        "`python -m benchmarks.readme` copies the",
        "headline tables below from `benchmarks/results/` (full tables, JSON and notes there).",
        "Every peer runs on the same state in the same process run; ratios are against the peer",
        "named in the column. Targets are printed as PASS/FAIL by the benchmark itself.",
        "",
        line_with(core, "- Machine:"),
        line_with(core, "- Software:"),
        line_with(core, "- Date:"),
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
