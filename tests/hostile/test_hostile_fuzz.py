"""Hypothesis-driven damage to real stores: every mutated store is read by ``ckpt.load``,
``ckpt.restore``, verification, a safetensors export and (on a sample) ``ckpt verify``.

Workers (``worker.py``) run under a 2 GiB address-space limit, two at a time, each
drawing its mutations from a fixed seed (reproducible: the failure message names the
seed and the mutation). Asserted over every mutation:

- every error is a CheckpointError subclass (nothing else escapes);
- no file outside the store is opened (an audit hook on ``open``);
- no mutation hangs past 30 s, no worker passes 2 GB of resident memory;
- never silently different data: a read that succeeds returns exactly what the mutated
  manifest promises, each tensor from the verified bytes its chunk hashes name. For
  object damage that is the original data; a manifest edit that still describes
  verified bytes (a tree value, chunks reordered, a dtype of the same width) is what
  the manifest now says, since manifests carry no checksum of their own; such loads are
  counted as ``changed``;
- ``verify`` never says OK for a checkpoint whose load fails on its objects.

The default run draws 1,000 mutations (local file store and memory store); the slow
test draws ``CKPT_HOSTILE_MUTATIONS`` (10,000 unless set): about 4.5 minutes of CPU, so
2.5 minutes on 2 idle cores (measured; a loaded machine takes longer).
"""

from __future__ import annotations

import os

import pytest
from hostile_run import run_workers

SEED = int(os.environ.get("CKPT_HOSTILE_SEED", "20261"))


def _check(results: list[dict], jobs: list[list[str]], want: int) -> dict:
    total = sum(r["mutations"] for r in results)
    problems = [(job, p) for job, r in zip(jobs, results) for p in r["problems"]]
    counts = sum(r["problem_count"] for r in results)
    detail = "\n".join(f"{' '.join(job)}: [{p['op']}] {p['mutation']}\n    {p['problem']}" for job, p in problems[:20])
    assert counts == 0, f"{counts} problem(s) in {total} mutations:\n{detail}"
    assert total >= want, f"only {total} mutations ran"
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    summary = {
        "mutations": total,
        "by_target": {k: sum(r["by_target"].get(k, 0) for r in results) for k in results[0]["by_target"]},
        "changed": sum(r["changed"] for r in results),
        "outcomes": errors,
        "cpu_seconds": round(sum(r["cpu_seconds"] for r in results), 1),
        "max_rss_mb": max(r["maxrss_bytes"] for r in results) // 2**20,
    }
    print(summary)
    return summary


def _jobs(total: int, seed: int, parts: int) -> list[list[str]]:
    # local stores get the most: they alone have FIFOs, devices and symlinks
    kinds = ["file", "memory"] if parts == 2 else ["file", "file", "file", "memory"][:parts]
    share = -(-total // parts)
    return [["fuzz", "--kind", k, "--count", str(share), "--seed", str(seed + i)] for i, k in enumerate(kinds)]


def test_hostile_mutations(tmp_path):
    jobs = _jobs(1000, SEED, 2)
    _check(run_workers(jobs, tmp_path, timeout=600), jobs, want=1000)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # about 4 minutes on 2 idle cores; a shared machine takes longer
def test_hostile_mutations_many(tmp_path):
    want = int(os.environ.get("CKPT_HOSTILE_MUTATIONS", "10000"))
    jobs = _jobs(want, SEED + 100, 4)
    _check(run_workers(jobs, tmp_path, timeout=max(600, want * 0.5)), jobs, want=want)
