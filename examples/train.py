"""A small but complete training run checkpointed with ckpt's decorator.

It uses everything a real loop has: a model with dropout (RNG), AdamW, an LR scheduler,
a shuffled DataLoader (its own generator, optional workers), and ``ckpt.RNG()``.
Kill it at any moment (SIGKILL, SIGTERM to it or to its whole process group) and run it
again: it resumes from the last checkpoint and ends bit-identical to an uninterrupted run.

The loader setups the tests cover: ``--workers N``, ``--persistent`` (persistent
workers), ``--no-generator`` (shuffled from torch's global RNG), ``--stateful``
(torchdata's StatefulDataLoader) and ``--augment`` (random noise drawn in the dataset's
``__getitem__``, i.e. inside the workers).

    python examples/train.py --store /tmp/run --steps 60 --every 5 --digest out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import ckpt


class Augmented(Dataset):
    """Random augmentation drawn where the sample is loaded (in a worker when there are any)."""

    def __init__(self, data: torch.Tensor, target: torch.Tensor) -> None:
        self.data, self.target = data, target

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        noise = 0.1 * torch.randn(self.data.shape[1]) + random.uniform(-0.01, 0.01)
        return self.data[i] + noise, self.target[i]


def build(
    workers: int,
    width: int,
    *,
    persistent: bool = False,
    generator: bool = True,
    stateful: bool = False,
    augment: bool = False,
):
    torch.manual_seed(1234)
    random.seed(1234)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(width, 1)
    )
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=10, gamma=0.7)
    data = torch.randn(200, 16, generator=torch.Generator().manual_seed(7))
    target = data.sum(dim=1, keepdim=True).sin()
    if stateful:
        from torchdata.stateful_dataloader import StatefulDataLoader as loader_class
    else:
        loader_class = DataLoader
    loader = loader_class(
        Augmented(data, target) if augment else TensorDataset(data, target),
        batch_size=16,
        shuffle=True,
        generator=torch.Generator().manual_seed(99) if generator else None,
        num_workers=workers,
        persistent_workers=persistent,
    )
    return model, optim, sched, loader


def digest(model, optim, sched) -> dict:
    """Bit-level fingerprint of the final state (parameters, optimizer, scheduler, RNG)."""
    h = hashlib.sha256()
    for t in list(model.state_dict().values()):
        h.update(t.numpy().tobytes())
    for state in optim.state_dict()["state"].values():
        for v in state.values():
            h.update(v.numpy().tobytes() if isinstance(v, torch.Tensor) else repr(v).encode())
    h.update(json.dumps(sched.state_dict(), sort_keys=True).encode())
    h.update(torch.get_rng_state().numpy().tobytes())
    return {"state_sha256": h.hexdigest()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--store", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--persistent", action="store_true", help="persistent_workers=True (needs --workers)")
    p.add_argument("--no-generator", action="store_true", help="shuffle from torch's global RNG")
    p.add_argument("--stateful", action="store_true", help="torchdata's StatefulDataLoader")
    p.add_argument("--augment", action="store_true", help="random augmentation in the dataset")
    p.add_argument("--storage-options", type=json.loads, default=None, help="fsspec options (JSON)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per step (gives a kill time to land)")
    p.add_argument("--log", help="append 'step loss-hex' lines here")
    p.add_argument("--digest", help="write the final state's fingerprint (JSON) here")
    args = p.parse_args(argv)

    model, optim, sched, loader = build(
        args.workers,
        args.width,
        persistent=args.persistent,
        generator=not args.no_generator,
        stateful=args.stateful,
        augment=args.augment,
    )
    ck = ckpt.Checkpointer(args.store, every=args.every, keep_last=3, storage_options=args.storage_options)

    @ck.resume(model=model, optim=optim, sched=sched, loader=loader, rng=ckpt.RNG())
    def train(start_step: int) -> None:
        print(f"starting at step {start_step}", flush=True)
        batches = iter(loader)
        for step in range(start_step, args.steps):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            loss = torch.nn.functional.mse_loss(model(x), y)
            optim.zero_grad()
            loss.backward()
            optim.step()
            sched.step()
            if args.log:
                with open(args.log, "a") as f:
                    f.write(f"{step} {loss.item().hex()}\n")
            if args.sleep:
                time.sleep(args.sleep)
            ck.step(step + 1)

    train()
    if args.digest:
        with open(args.digest, "w") as f:
            json.dump(digest(model, optim, sched), f)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
