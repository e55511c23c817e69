"""Launching ranks: real processes with gloo on the CPU (tests/distributed/dist_worker.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    scenario: str,
    world: int,
    where: Path,
    *,
    timeout: float = 120,
    env: dict | None = None,
    worker: Path = WORKER,
) -> list[tuple[int, str]]:
    """Run ``scenario`` of ``worker`` on ``world`` ranks; returns (exit code, output) of each rank."""
    port = free_port()
    procs = []
    for rank in range(world):
        e = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "CKPT_THREADS": "2",
            **(env or {}),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), scenario, str(where)],
                env=e,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=timeout)
            out.append((p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def assert_ok(results: list[tuple[int, str]]) -> None:
    for rank, (code, text) in enumerate(results):
        assert code == 0 and text.rstrip().endswith("OK"), f"rank {rank} exited {code}:\n{text[-3000:]}"
