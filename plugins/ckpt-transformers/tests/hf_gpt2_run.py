"""A small GPT-2 training run for ckpt-transformers' tests: dropout on, shuffled data, AdamW
with a warm-up/linear schedule, two epochs.

As a script (the tests run it in a subprocess, kill it and resume it)::

    python hf_gpt2_run.py OUT_DIR --store URL [--resume] [--pause-at N] [--kill-in-save N]

``--pause-at N`` prints ``paused N`` after step N and sleeps (the test kills it there);
``--kill-in-save N`` sends itself SIGKILL right after the save of step N was taken, while
it is still being written. A run that finishes writes ``OUT_DIR/final.pt``: model,
optimizer and scheduler state, the per-step losses and the torch RNG state.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

STEPS_PER_EPOCH = 12
EPOCHS = 2
BATCH = 4
SEQ = 32
VOCAB = 256


def tiny_config() -> Any:
    from transformers import GPT2Config

    # dropout stays on (GPT2Config's 0.1): a resume must restore the RNG exactly
    return GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)


class TokenData(torch.utils.data.Dataset):
    """Fixed pseudo-random token sequences (the same in every process)."""

    def __init__(self, n: int = STEPS_PER_EPOCH * BATCH) -> None:
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_trainer(
    out_dir: str | Path,
    store: str | None,
    *,
    callbacks: list[Any] | None = None,
    epochs: int = EPOCHS,
    save_steps: int = 4,
    save_total_limit: int | None = None,
    **args: Any,
) -> Any:
    """A CkptTrainer (``store`` given) or a plain Trainer (``store=None``) on the tiny GPT-2."""
    import transformers
    from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

    from ckpt_transformers import CkptTrainer

    transformers.logging.set_verbosity_error()
    transformers.set_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    targs = TrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-3,
        weight_decay=0.01,
        warmup_steps=3,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        seed=42,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        **args,
    )
    evals = TokenData(2 * BATCH) if args.get("eval_strategy", "no") != "no" else None
    kw: dict[str, Any] = {"model": model, "args": targs, "train_dataset": TokenData(), "eval_dataset": evals}
    kw["callbacks"] = callbacks
    if store is None:
        return Trainer(**kw)
    return CkptTrainer(**kw, ckpt_url=store)


def final_state(trainer: Any) -> dict[str, Any]:
    """What two runs must agree on, bit for bit."""
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return {
        "model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scheduler": trainer.lr_scheduler.state_dict(),
        "losses": {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e},
        "global_step": trainer.state.global_step,
        "torch_rng": torch.get_rng_state(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--store", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--pause-at", type=int)
    p.add_argument("--kill-in-save", type=int)
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # the same reduction order in every process

    from transformers import TrainerCallback

    class Control(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            print(f"step {state.global_step}", flush=True)
            if state.global_step == a.pause_at:
                print(f"paused {state.global_step}", flush=True)
                time.sleep(600)

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == a.kill_in_save:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer = build_trainer(a.out_dir, a.store, callbacks=[Control()])
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    restored = trainer.ckpt_restored.step if trainer.ckpt_restored is not None else None
    torch.save({**final_state(trainer), "restored": restored}, Path(a.out_dir, "final.pt"))
    print(json.dumps({"done": trainer.state.global_step, "restored": restored}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
