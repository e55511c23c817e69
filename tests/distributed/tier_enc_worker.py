"""One rank of the encrypted local-tier scenarios: ``python tier_enc_worker.py enc <dir>``
(see ``conftest.run_ranks``). Saves with ``local=`` and ``encryption=``, restores from the
local tiers, with rank 1's local tier gone, after the durable tier was deleted, and refuses
a foreign or plain local tier, or a wrong key, on rank 1. Prints ``PHASE <name>`` before each phase and
``OK`` last on success."""

from __future__ import annotations

import logging
import os
import shutil
import sys

import torch
import torch.distributed as dist

import ckpt
from ckpt.errors import EncryptionError

KEY = bytes(range(32))


def known(rank: int, step: int) -> torch.Tensor:
    """A tensor whose raw bytes the test looks for in the stores' files."""
    return torch.arange(256, dtype=torch.float32) * 1.25 + 1000.0 * step + rank


def make() -> dict:
    return {"w": torch.zeros(256), "r": {"rank": -1, "step": -1}}


def fill(state: dict, rank: int, step: int) -> None:
    state["w"] = known(rank, step)
    state["r"] = {"rank": rank, "step": step}


def check(state: dict, rank: int, step: int) -> None:
    assert torch.equal(state["w"], known(rank, step)), (rank, step)
    assert state["r"] == {"rank": rank, "step": step}, state["r"]


def enc(where: str, rank: int) -> None:
    url, local = os.path.join(where, "durable"), os.path.join(where, "local")
    mine = os.path.join(local, f"rank-{rank:05d}")
    key = ckpt.Encryption(KEY)

    def open_(state: dict) -> ckpt.Checkpointer:
        return ckpt.Checkpointer(url, local=local, persist_every=2, encryption=key, state=state)

    print("PHASE save", flush=True)
    state = make()
    with open_(state) as ck:
        for step in (1, 2, 3):
            fill(state, rank, step)
            ck.save(step=step)
        ck.wait_persisted()
    # close persisted step 3: the durable tier holds 2 and 3, each local tier 2 and 3

    print("PHASE local", flush=True)
    state = make()
    with open_(state) as ck:
        assert ck.restore().step == 3
        check(state, rank, 3)

    print("PHASE gone", flush=True)
    dist.barrier()
    if rank == 1:
        shutil.rmtree(mine)
    dist.barrier()
    state = make()
    with open_(state) as ck:
        assert ck.restore().step == 3
        check(state, rank, 3)
        fill(state, rank, 4)  # rank 1's new local tier takes the descriptor at its first commit
        ck.save(step=4)
        ck.wait_persisted()

    print("PHASE redurable", flush=True)  # a new durable tier takes the local tiers' descriptor
    dist.barrier()
    if rank == 0:
        shutil.rmtree(url)
    dist.barrier()
    state = make()
    with open_(state) as ck:
        assert ck.restore().step == 4
        check(state, rank, 4)
        fill(state, rank, 5)
        ck.save(step=5)
    # close persisted step 5 to the new durable tier

    for phase in ("foreign", "plain"):
        print(f"PHASE {phase}", flush=True)
        dist.barrier()
        if rank == 1:
            os.rename(mine, f"{mine}.kept")
            shutil.copytree(os.path.join(where, phase), mine)
        dist.barrier()
        try:
            open_(make())
            raise AssertionError(f"a {phase} local tier on rank 1 was accepted")
        except EncryptionError as exc:
            print("REFUSED", phase, exc, flush=True)
        dist.barrier()
        if rank == 1:
            shutil.rmtree(mine)
            os.rename(f"{mine}.kept", mine)

    print("PHASE wrongkey", flush=True)  # rank 1 cannot unwrap the data key: refused on every rank
    try:
        ckpt.Checkpointer(url, local=local, encryption=ckpt.Encryption(bytes(32)) if rank else key)
        raise AssertionError("a wrong key on rank 1 was accepted")
    except EncryptionError as exc:
        print("REFUSED wrongkey", exc, flush=True)

    print("PHASE after", flush=True)  # the local tiers are still usable
    state = make()
    with open_(state) as ck:
        assert ck.restore().step == 5
        check(state, rank, 5)


def main() -> None:
    scenario, where = sys.argv[1], sys.argv[2]
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
    if os.environ["RANK"] == "1":
        # one-process stores (before the group: ckpt.save is collective under it) planted
        # later as rank 1's local tier: another encrypted store, plain checkpoints
        ckpt.save(os.path.join(where, "foreign"), make(), step=1, encryption=ckpt.Encryption(KEY))
        ckpt.save(os.path.join(where, "plain"), make(), step=1)
    dist.init_process_group("gloo")
    {"enc": enc}[scenario](where, dist.get_rank())
    dist.barrier()
    print("OK")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
