"""A small Lightning run checkpointing through CkptCheckpointIO, for the kill-and-resume tests.

    python train_script.py --store URL --dir DIR --out FILE [--resume] [--hang-at STEP] ...

Trains a dropout MLP with AdamW and a per-step StepLR on shuffled data, saving with
``ModelCheckpoint(every_n_train_steps=...)``. ``--hang-at S`` prints ``HANG <S>`` at the
end of step S (after its checkpoint was handed over, not waited for) and sleeps, so the
test can SIGKILL it there. ``--resume`` passes ``ckpt_path="last"`` (or ``--ckpt-path``).
At the end it writes the final model, optimizer and scheduler states and the loss of every
step it ran (step -> loss) to ``--out`` with ``torch.save`` (read back weights-only).
"""

from __future__ import annotations

import argparse
import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckpt_lightning import CkptCheckpointIO


class Net(L.LightningModule):
    def __init__(self, width: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(8, width),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(width, width),
            nn.Dropout(0.3),
            nn.Linear(width, 1),
        )
        self.losses: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.net(x) - y) ** 2).mean()
        self.losses[self.trainer.global_step + 1] = float(loss.detach())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", ((self.net(x) - y) ** 2).mean())

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class HangAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            print(f"HANG {self.step}", flush=True)
            time.sleep(600)


def make_loader(kind: str = "stateful") -> DataLoader:
    """40 shuffled samples in batches of 8: 5 steps an epoch."""
    data = TensorDataset(torch.randn(40, 8), torch.randn(40, 1))
    if kind == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(data, batch_size=8, shuffle=True)
    return DataLoader(data, batch_size=8, shuffle=True)


def make_trainer(
    store: str,
    dirpath: str,
    *,
    max_steps: int = 14,
    every: int = 3,
    top_k: int = -1,
    monitor: str | None = None,
    save_last: bool = False,
    callbacks: list[Callback] | None = None,
    io: CkptCheckpointIO | None = None,
) -> L.Trainer:
    checkpoint = ModelCheckpoint(
        dirpath=dirpath, every_n_train_steps=every, save_top_k=top_k, monitor=monitor, save_last=save_last
    )
    return L.Trainer(
        max_steps=max_steps,
        plugins=[io or CkptCheckpointIO(store)],
        callbacks=[checkpoint, *(callbacks or [])],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-steps", type=int, default=14)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=-1)
    ap.add_argument("--monitor", default=None)
    ap.add_argument("--save-last", action="store_true")
    ap.add_argument("--loader", choices=["stateful", "plain"], default="stateful")
    ap.add_argument("--hang-at", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--ckpt-path", default=None)
    args = ap.parse_args(argv)

    L.seed_everything(1234, verbose=False)
    loader = make_loader(args.loader)
    model = Net()
    trainer = make_trainer(
        args.store,
        args.dir,
        max_steps=args.max_steps,
        every=args.every,
        top_k=args.top_k,
        monitor=args.monitor,
        save_last=args.save_last,
        callbacks=[HangAt(args.hang_at)] if args.hang_at is not None else [],
    )
    ckpt_path = args.ckpt_path or ("last" if args.resume else None)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    opt = trainer.optimizers[0]
    sched = trainer.lr_scheduler_configs[0].scheduler
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "losses": model.losses,
            "global_step": trainer.global_step,
            "rng": torch.get_rng_state(),
        },
        args.out,
    )
    print("DONE", trainer.global_step, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
