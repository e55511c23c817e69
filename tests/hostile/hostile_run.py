"""Running hostile-store workers (tests/hostile/worker.py): subprocesses under a memory limit, watched for hangs and RSS."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
_numbers = itertools.count()
#: the address-space limit of a worker (RLIMIT_AS). A worker that has loaded torch, ckpt
#: and hypothesis and run every reader peaks at about 0.9 GB of address space (measured,
#: with MALLOC_ARENA_MAX=2), so 2 GiB holds a normal load and refuses any bomb.
MEMORY_LIMIT = 2 << 30
#: peak resident memory a worker may reach
MAX_RSS = 2_000_000_000
#: one mutation (all its reads) may take this long before the worker counts as hung
HANG_SECONDS = 30


@dataclass
class Worker:
    args: list[str]
    out: Path
    proc: subprocess.Popen[bytes]
    stderr: Path
    started: float


def start_worker(args: list[str], tmp: Path) -> Worker:
    out = tmp / f"result-{next(_numbers)}.json"
    stderr = out.with_suffix(".stderr")
    env = {
        **os.environ,
        "MALLOC_ARENA_MAX": "2",  # glibc's per-thread arenas reserve address space, not memory
        "CKPT_THREADS": "4",
        "PYTHONHASHSEED": "0",
    }
    cmd = [
        sys.executable,
        str(HERE / "worker.py"),
        *args,
        "--out",
        str(out),
        "--memory",
        str(MEMORY_LIMIT),
        "--hang",
        str(HANG_SECONDS),
    ]
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent.parent)
    return Worker(args, out, proc, stderr, time.monotonic())


def finish_worker(w: Worker, timeout: float) -> dict[str, Any]:
    """The worker's result, after checking it exited cleanly in time and within MAX_RSS."""
    deadline = w.started + timeout
    while True:
        pid, status, usage = os.wait4(w.proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            w.proc.kill()
            pid, status, usage = os.wait4(w.proc.pid, 0)
            break
        time.sleep(0.2)
    w.proc.returncode = os.waitstatus_to_exitcode(status)
    tail = w.stderr.read_bytes()[-6000:].decode(errors="replace")
    current = Path(str(w.out) + ".current")
    doing = current.read_text() if current.exists() else "?"
    if time.monotonic() > deadline:
        pytest.fail(f"worker {w.args} ran past {timeout:.0f}s (last: {doing}):\n{tail}")
    if w.proc.returncode != 0 or not w.out.exists():
        pytest.fail(f"worker {w.args} died (exit {w.proc.returncode}) while running: {doing}\n{tail}")
    result = json.loads(w.out.read_text())
    rss = usage.ru_maxrss * 1024
    assert rss < MAX_RSS, f"worker {w.args} reached {rss / 1e9:.2f} GB of resident memory"
    result["maxrss_bytes"] = rss
    return result


def run_workers(jobs: list[list[str]], tmp: Path, timeout: float, parallel: int = 2) -> list[dict[str, Any]]:
    """Run ``jobs`` (worker argument lists), ``parallel`` at a time; their results in order."""
    results: list[dict[str, Any]] = []
    for i in range(0, len(jobs), parallel):
        batch = [start_worker(args, tmp) for args in jobs[i : i + parallel]]
        results.extend(finish_worker(w, timeout) for w in batch)
    return results
