"""A small training run with a local tier, run as a subprocess by the kill/preemption tests.

    python _tierrun.py DURABLE LOCAL --steps N --persist-every K --sleep S --log FILE

Saves every step to LOCAL, persists every K-th to DURABLE, appends each finished step to
FILE, and logs (INFO, stderr) which tier it restored from.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tiers_util import make_state, train_step

import ckpt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("durable")
    p.add_argument("local")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--persist-every", type=int, default=4)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--log", required=True)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    state = make_state()
    ck = ckpt.Checkpointer(a.durable, local=a.local, persist_every=a.persist_every, every=1)

    @ck.resume(state)
    def train(start: int) -> None:
        print(f"START {start}", flush=True)
        for s in range(start + 1, a.steps + 1):
            train_step(state, s)
            time.sleep(a.sleep)
            ck.step(s)
            with open(a.log, "a") as f:
                f.write(f"{s}\n")

    train()


if __name__ == "__main__":
    main()
