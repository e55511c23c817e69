"""One rank of test_collective's directory-fsync check: ``python fsync_worker.py <scenario> <dir>``
(see ``conftest.run_ranks``). Records which directories this rank fsyncs and what it renames
(with the time) during one collective ``ckpt.save`` to a local store, into ``events-<rank>.json``."""

from __future__ import annotations

import json
import os
import stat
import sys
import time

import torch
import torch.distributed as dist

import ckpt


def record(events: list) -> None:
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace
    dirs: dict[int, str] = {}

    def open_(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            dirs[fd] = os.path.realpath(path)
        return fd

    def fsync(fd):
        real_fsync(fd)
        if stat.S_ISDIR(os.fstat(fd).st_mode) and fd in dirs:
            events.append(("fsync", dirs[fd], time.time_ns()))

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        events.append(("replace", os.path.realpath(dst), time.time_ns()))

    os.open, os.fsync, os.replace = open_, fsync, replace


def main() -> None:
    where = sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    events: list = []
    record(events)
    # per-rank tensors over the pack size: each rank writes objects of its own, in new objects/<xx>/
    state = {"rank": {f"w{i}": torch.full((300_000,), float(10 * rank + i)) for i in range(4)}}
    ckpt.save(os.path.join(where, "store"), state, step=1)
    with open(os.path.join(where, f"events-{rank}.json"), "w") as f:
        json.dump(events, f)
    dist.barrier()
    print("OK")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
