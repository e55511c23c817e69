"""Crash consistency: a process saving in a loop is SIGKILLed at random instants.

After every kill the newest checkpoint loads whole (every tensor carries the step it was
saved at, and all agree with the manifest's step) or the store holds no checkpoint at
all. A stale or missing ``refs/latest`` is repaired by scanning manifests.

Starting Python and importing torch takes longer than the kill window, so a "zygote"
subprocess imports everything once and forks one saver per trial; the test kills that
saver with SIGKILL 50-400 ms after it has connected to the store and starts saving. ``CKPT_CRASH_TRIALS`` sets the trials of
the slow run (200 by default).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt.errors import NoCheckpointError
from ckpt.storage.store import Store

ROOT = Path(__file__).resolve().parents[2]

#: (name, dtype, elements): values encode the step exactly in every dtype used
LAYOUT = [
    ("w0", torch.float32, 3000),
    ("w1", torch.float64, 2500),
    ("i0", torch.int64, 2000),
    ("i1", torch.int32, 5000),
]

ZYGOTE = r"""
import os, sys, json, time
import torch, ckpt
from ckpt.storage.store import Store
from ckpt.hooks.manager import get_plugins

url, options = sys.argv[1], json.loads(sys.argv[2])
LAYOUT = [("w0", torch.float32, 3000), ("w1", torch.float64, 2500), ("i0", torch.int64, 2000), ("i1", torch.int32, 5000)]

def state_for(step):
    # distinct values in every chunk (no dedup), the step recoverable from any element
    return {
        "t": {n: (torch.arange(k, dtype=torch.int64) + step * 10000).to(dt) for n, dt, k in LAYOUT},
        "step": step,
    }

get_plugins()  # entry points scanned once, before forking
os.write(1, b"ready\n")
for line in sys.stdin:
    if line.strip() != "trial":
        break
    pid = os.fork()
    if pid == 0:
        try:
            last = Store(url, options).latest_step()  # connects (S3: client set-up, ~0.5 s)
            step = 0 if last is None else last + 1
            os.write(1, f"go {os.getpid()}\n".encode())
            deadline = time.monotonic() + 60  # never outlive a test that died without killing us
            while time.monotonic() < deadline:
                ckpt.save(url, state_for(step), step=step, storage_options=options)
                step += 1
        finally:
            os._exit(3)
    os.write(1, f"pid {pid}\n".encode())  # one write: the saver writes to the same pipe
    _, status = os.waitpid(pid, 0)
    os.write(1, f"reaped {status}\n".encode())
"""


class Zygote:
    def __init__(self, url: str, options: dict, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, url, json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, **env},
            start_new_session=True,  # its own process group: close() can end it and any saver left
        )
        assert self._line() == "ready"

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"crash zygote exited ({self.proc.wait()})")
        return line.strip()

    def trial(self, rng: random.Random, window: tuple[float, float]) -> None:
        self.proc.stdin.write("trial\n")
        self.proc.stdin.flush()
        got: dict[str, str] = {}
        while len(got) < 2:  # "pid N" (zygote) and "go N" (saver, once connected), either order
            line = self._line()
            word, _, value = line.partition(" ")
            assert word in ("pid", "go") and word not in got, f"unexpected line {line!r} (after {got})"
            got[word] = value
        assert got["pid"] == got["go"], got
        pid = int(got["pid"])
        time.sleep(rng.uniform(*window))
        os.kill(pid, signal.SIGKILL)
        reaped = self._line().split()
        assert reaped[0] == "reaped"
        # killed by our signal, not dead of its own error (that would be a bug, not a crash)
        assert os.WIFSIGNALED(int(reaped[1])) and os.WTERMSIG(int(reaped[1])) == signal.SIGKILL, reaped

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # a test failed with a saver still running
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def check_whole(url: str, options: dict) -> int | None:
    """The newest checkpoint loads whole, from one step; returns that step (None: empty store)."""
    store = Store(url, options)
    newest = store.latest_step(repair=True)
    if newest is None:
        with pytest.raises(NoCheckpointError):
            ckpt.load(url, storage_options=options)
        return None
    assert store.read_latest() == newest, "refs/latest was not repaired"
    out = ckpt.load(url, storage_options=options)
    assert out["step"] == newest
    for name, dtype, n in LAYOUT:
        t = out["t"][name]
        assert t.dtype == dtype and t.shape == (n,), name
        expected = (torch.arange(n, dtype=torch.int64) + newest * 10000).to(dtype)
        assert torch.equal(t, expected), f"tensor {name} of step {newest} holds another step's values"
    return newest


def run_trials(
    url: str,
    options: dict,
    env: dict[str, str],
    trials: int,
    seed: int,
    window: tuple[float, float] = (0.05, 0.4),
    interrupted: list[int] | None = None,
) -> list[int | None]:
    """Kill a saver ``trials`` times; returns the newest step after each kill.

    With ``interrupted``, appends after each kill how many stored objects no manifest
    references (> 0: the kill cut a save short). Counted at once, because the next
    trial saves that step again, with the same values, and so references them again.
    """
    rng = random.Random(seed)
    zygote = Zygote(url, options, {"CKPT_CHUNK_BYTES": "4096", **env})  # ~12 objects per save
    seen = []
    try:
        for _ in range(trials):
            zygote.trial(rng, window)
            seen.append(check_whole(url, options))
            if interrupted is not None:
                interrupted.append(_interrupted_saves(url, options))
    finally:
        zygote.close()
    return seen


@pytest.fixture
def crash_url(tmp_path):
    """A local store, removed afterwards (thousands of small files: keep pytest's tmp cheap)."""
    yield f"file://{tmp_path}/store"
    shutil.rmtree(tmp_path / "store", ignore_errors=True)


def _assert_progress(seen: list[int | None], trials: int, min_saves: int) -> None:
    assert len(seen) == trials
    steps = [s for s in seen if s is not None]
    assert steps == sorted(steps), "the newest checkpoint went backwards"
    assert steps and steps[-1] + 1 >= min_saves, f"saves barely progressed: {seen}"


def _interrupted_saves(url: str, options: dict) -> int:
    """Objects no manifest references: written by saves that a kill cut short."""

    store = Store(url, options)
    referenced = {c.key for step in store.steps() for c in ckpt.read_manifest(store.url, step).chunk_refs()}
    return sum(1 for o in store.list_objects() if o.key not in referenced)


def test_sigkill_during_saves_leaves_the_latest_checkpoint_whole(crash_url):
    trials = 50
    url = crash_url
    interrupted: list[int] = []
    seen = run_trials(url, {}, {}, trials, seed=1, interrupted=interrupted)
    _assert_progress(seen, trials, min_saves=trials // 5)
    assert sum(1 for n in interrupted if n) >= 1, f"no kill landed in the middle of a save: {interrupted}"


@pytest.mark.server
def test_sigkill_during_saves_to_s3_leaves_the_latest_checkpoint_whole(s3_server):
    trials = 12
    url = s3_server.new_url("crash")
    # a save to moto (in this process, on 2 cores) takes a few hundred ms: a wider window;
    # how far the saves get depends on the machine's load, so only some progress is required
    seen = run_trials(url, s3_server.storage_options, {}, trials, seed=2, window=(0.05, 0.9))
    _assert_progress(seen, trials, min_saves=2)


@pytest.mark.slow
def test_sigkill_many_trials(crash_url):
    trials = int(os.environ.get("CKPT_CRASH_TRIALS", "200"))
    seen = run_trials(crash_url, {}, {}, trials, seed=3)
    _assert_progress(seen, trials, min_saves=trials // 5)
