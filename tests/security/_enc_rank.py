"""One rank of the encrypted collective test: ``python _enc_rank.py <dir>`` with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Prints ``OK`` last on success."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import ckpt
from ckpt.errors import EncryptionError

KEY = bytes(range(32))


def main() -> None:
    where = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    enc = ckpt.Encryption(KEY)
    url = os.path.join(where, "store")
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)  # replicated: the same on every rank
    per_rank = torch.full((64,), 1000.0 + rank)
    first = model.weight.detach().clone()
    ckpt.save(url, {"model": model, "mine": {"t": per_rank, "r": rank}}, step=1, encryption=enc)
    # the async Checkpointer under the group, encrypted too: continues the same store
    with ckpt.Checkpointer(url, encryption=enc) as ck:
        with torch.no_grad():
            model.weight.add_(1.0)
        ck.save({"model": model, "mine": {"t": per_rank * 2, "r": rank}}, step=2).result()
        fresh_model = torch.nn.Linear(16, 8)
        state = {"model": fresh_model, "mine": {"t": torch.zeros(64), "r": -1}}
        assert ck.restore(state).step == 2
        assert torch.equal(fresh_model.weight, model.weight) and torch.equal(state["mine"]["t"], per_rank * 2)
        assert state["mine"]["r"] == rank
    fresh_model = torch.nn.Linear(16, 8)
    state = {"model": fresh_model, "mine": {"t": torch.zeros(64), "r": -1}}
    assert ckpt.restore(url, state, step=1, encryption=enc).step == 1
    assert torch.equal(fresh_model.weight, first) and torch.equal(state["mine"]["t"], per_rank)
    try:
        ckpt.restore(url, state)
    except EncryptionError as exc:
        assert "encrypted" in str(exc)
    else:
        raise AssertionError("a collective restore without the key was not refused")
    dist.barrier()
    print("OK")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
