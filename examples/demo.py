"""`make demo`: train with checkpoints, kill the run, resume bit-exactly, inspect the store.

1. an uninterrupted reference run of examples/train.py;
2. the same run killed with SIGKILL part-way (no chance to clean up);
3. rerun: it resumes from the last committed checkpoint and must end with the very same
   bits (parameters, optimizer, scheduler, RNG, data order);
4. the CLI shows what is in the store.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "examples" / "train.py"), "--steps", "60", "--every", "5", "--width", "256"]
CLI = [sys.executable, "-m", "ckpt.cli"]


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="ckpt-demo-"))
    try:
        banner("reference run, uninterrupted")
        subprocess.run([*TRAIN, "--store", str(work / "ref"), "--digest", str(work / "ref.json")], check=True)

        banner("same run, killed with SIGKILL part-way")
        store = work / "store"
        log = work / "log"
        proc = subprocess.Popen(
            [*TRAIN, "--store", str(store), "--digest", str(work / "run.json"), "--log", str(log), "--sleep", "0.03"]
        )
        while proc.poll() is None and (not log.exists() or len(log.read_text().splitlines()) < 33):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        print(f"killed after {len(log.read_text().splitlines())} steps (exit {proc.returncode})")

        banner("rerun: resumes from the last committed checkpoint")
        subprocess.run([*TRAIN, "--store", str(store), "--digest", str(work / "run.json")], check=True)

        ref = json.loads((work / "ref.json").read_text())
        run = json.loads((work / "run.json").read_text())
        same = ref == run
        print(f"final state identical to the uninterrupted run: {same} ({run['state_sha256'][:16]}...)")

        banner(f"ckpt ls {store}")
        subprocess.run([*CLI, "ls", str(store)], check=True)
        banner(f"ckpt show {store} (latest)")
        subprocess.run([*CLI, "show", str(store)], check=True)
        banner(f"ckpt verify {store}")
        subprocess.run([*CLI, "verify", str(store)], check=True)
        return 0 if same else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
