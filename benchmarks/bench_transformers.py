"""Frameworks section, Hugging Face half (issue 16): the Trainer's own checkpoints vs CkptTrainer.

The same GPT-2 (from a config, random init; about 50 MB of parameters + AdamW moments)
trains on the same shuffled random tokens three times in one process: without
checkpoints, with the Trainer's default checkpointing (a ``checkpoint-N`` folder every
``save_steps``: safetensors weights, ``torch.save`` optimizer, scheduler, RNG, trainer
state) and with ``ckpt_transformers.CkptTrainer`` into a local store, 5 checkpoints each.

Measured per run:

- **stall per save** (the target): the time the training loop is held by checkpointing,
  per save: the time in ``_save_checkpoint`` plus how much longer than a normal optimizer
  step the step after a save took (ckpt's guard waits there for the background copy of
  parameters and moments);
- **the wait for the last commit** when ``train()`` ends (ckpt only: the Trainer's last
  save is synchronous, so already in its stall), also reported folded into the stall;
- **end-to-end overhead per save**: (training time with checkpoints - without) / saves,
  which also counts background work competing with training for the CPU;
- **bytes stored**: every file the run left (5 folders; the ckpt store).

``python -m benchmarks.bench_transformers [--smoke] [--out DIR]`` runs it standalone.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from typing import Any

import torch

from benchmarks import common, report
from benchmarks.common import median, now

SAVES = 5

FULL = {"n_embd": 256, "n_layer": 4, "n_head": 4, "vocab": 4096, "seq": 64, "batch": 4, "save_steps": 10, "rounds": 3}
SMOKE = {"n_embd": 32, "n_layer": 1, "n_head": 2, "vocab": 128, "seq": 16, "batch": 2, "save_steps": 2, "rounds": 1}

SYSTEMS = {
    "none": "no checkpoints",
    "hf": "Trainer default (checkpoint-N folders)",
    "ckpt": "CkptTrainer (ckpt store, async)",
}


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer_classes() -> dict[str, type]:
    """The Trainer and CkptTrainer, timing what they hold the training thread for."""
    from transformers import PrinterCallback, Trainer, TrainerCallback

    from ckpt_transformers import CkptTrainer

    class OptClock(TrainerCallback):
        """Duration of every optimizer step (ckpt's save guard waits inside it)."""

        def __init__(self) -> None:
            self.steps: dict[int, float] = {}
            self._t = 0.0

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._t = now()

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.steps[state.global_step + 1] = now() - self._t

    def timed(base: type) -> type:
        class Timed(base):  # type: ignore[misc, valid-type]
            def __init__(self, *a: Any, **kw: Any) -> None:
                self.clock = OptClock()
                super().__init__(*a, callbacks=[self.clock], **kw)
                self.remove_callback(PrinterCallback)  # its end-of-training line would break the log
                self.save_s: dict[int, float] = {}
                self.close_s = 0.0

            def _save_checkpoint(self, model: Any, trial: Any) -> None:
                t = now()
                super()._save_checkpoint(model, trial)
                self.save_s[self.state.global_step] = now() - t

            def _ckpt_close(self, *, raise_errors: bool) -> None:  # CkptTrainer: waits for the last commit
                t = now()
                super()._ckpt_close(raise_errors=raise_errors)
                self.close_s += now() - t

        Timed.__name__ = f"Timed{base.__name__}"
        return Timed

    return {"none": timed(Trainer), "hf": timed(Trainer), "ckpt": timed(CkptTrainer)}


def _train_once(
    kind: str, cls: type, size: dict[str, Any], workdir: str, max_steps: int | None = None
) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments, set_seed

    out_dir = tempfile.mkdtemp(prefix=f"hf-{kind}-", dir=workdir)
    steps = max_steps or SAVES * size["save_steps"]
    set_seed(0)
    config = GPT2Config(
        vocab_size=size["vocab"],
        n_positions=2 * size["seq"],
        n_embd=size["n_embd"],
        n_layer=size["n_layer"],
        n_head=size["n_head"],
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=size["batch"],
        learning_rate=5e-4,
        warmup_steps=5,
        weight_decay=0.01,
        save_strategy="no" if kind == "none" or max_steps else "steps",
        save_steps=size["save_steps"],
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=42,
    )
    data = _Tokens(steps * size["batch"], size["seq"], size["vocab"])
    kw: dict[str, Any] = {"model": model, "args": args, "train_dataset": data}
    if kind == "ckpt":
        kw["ckpt_url"] = f"file://{out_dir}/store"
    trainer = cls(**kw)
    gc.collect()
    t0 = now()
    trainer.train()
    total = now() - t0
    opt = trainer.clock.steps
    after = {s + 1 for s in trainer.save_s}
    normal = median([t for s, t in opt.items() if s not in after and s > 1])
    # Not clipped at zero per step: noise then averages out instead of adding up.
    guard = max(0.0, sum(opt[s] - normal for s in after if s in opt))
    res = {
        "total_s": total,
        "saves": len(trainer.save_s),
        "save_call_s": sum(trainer.save_s.values()),
        "after_save_extra_s": guard,
        "final_commit_wait_s": trainer.close_s,
        "held_s": sum(trainer.save_s.values()) + guard,
        "bytes": common.dir_bytes(out_dir),
        "opt_step_s": normal,
        "train_step_s": total / steps,
        "raw_bytes": common.raw_bytes({"model": trainer.model, "optim": trainer.optimizer.optimizer}),
    }
    if kind == "ckpt":
        import ckpt

        res["steps_stored"] = ckpt.steps(kw["ckpt_url"])
    common.rmtree(out_dir)
    return res


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, value, threshold, timing in (
        ("training stall per save: CkptTrainer / Trainer default", res["stall_ratio"], 0.1, True),
        ("bytes stored over 5 checkpoints: CkptTrainer / Trainer default", res["bytes_ratio"], 0.5, False),
    ):
        ok = value <= threshold
        out.append(
            {"target": name, "value": value, "op": "<=", "threshold": threshold, "pass": bool(ok), "timing": timing}
        )
    return out


def run(*, smoke: bool, workdir: str, log=print) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
    size = SMOKE if smoke else FULL
    threads = max(1, (os.cpu_count() or 2) - 1)  # one core left for I/O, as a data-loader worker would have
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    machine = common.machine_info()
    other = common.OtherCpu()
    try:
        classes = _trainer_classes()
        _train_once("none", classes["none"], size, workdir, max_steps=3)  # warm-up: imports, allocator
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in SYSTEMS}
        for r in range(size["rounds"]):
            order = list(SYSTEMS) if r % 2 == 0 else list(reversed(SYSTEMS))
            for kind in order:
                res = _train_once(kind, classes[kind], size, workdir)
                runs[kind].append(res)
                log(
                    f"  [transformers] {kind:<5} {res['total_s']:.2f}s, {res['saves']} saves, held "
                    f"{res['held_s']:.3f}s, {res['bytes'] / 1e6:.1f} MB stored"
                )
    finally:
        torch.set_num_threads(before)
    base = median([r["total_s"] for r in runs["none"]])
    systems: dict[str, Any] = {}
    for kind, label in SYSTEMS.items():
        rs = runs[kind]
        saves = max(1, rs[0]["saves"]) if kind != "none" else 0
        systems[kind] = {
            "label": label,
            "total_s": median([r["total_s"] for r in rs]),
            "saves": saves,
            "stall_per_save_s": median([r["held_s"] / saves for r in rs]) if saves else 0.0,
            "stall_with_final_wait_s": (
                median([(r["held_s"] + r["final_commit_wait_s"]) / saves for r in rs]) if saves else 0.0
            ),
            "save_call_s": median([r["save_call_s"] / saves for r in rs]) if saves else 0.0,
            "after_save_extra_s": median([r["after_save_extra_s"] / saves for r in rs]) if saves else 0.0,
            "final_commit_wait_s": median([r["final_commit_wait_s"] for r in rs]),
            "overhead_per_save_s": median([(r["total_s"] - base) / saves for r in rs]) if saves else 0.0,
            "bytes": median([r["bytes"] for r in rs]),
            "opt_step_s": median([r["opt_step_s"] for r in rs]),
            "train_step_s": median([r["train_step_s"] for r in rs]),
            "runs": rs,
        }
    hf, ck = systems["hf"], systems["ckpt"]
    out: dict[str, Any] = {
        "section": "transformers",
        "smoke": smoke,
        "machine": {**machine, "torch_threads": threads},
        "workload": {
            "title": f"GPT-2 {size['n_layer']} layers, n_embd {size['n_embd']}, vocab {size['vocab']} + AdamW",
            "raw_bytes": runs["ckpt"][0]["raw_bytes"],
            **size,
            "max_steps": SAVES * size["save_steps"],
            "saves": SAVES,
            "transformers": transformers.__version__,
        },
        "systems": systems,
        "stall_ratio": ck["stall_per_save_s"] / hf["stall_per_save_s"],
        "stall_with_final_wait_ratio": ck["stall_with_final_wait_s"] / hf["stall_with_final_wait_s"],
        "overhead_ratio": ck["overhead_per_save_s"] / hf["overhead_per_save_s"]
        if hf["overhead_per_save_s"] > 0
        else None,
        "bytes_ratio": ck["bytes"] / hf["bytes"],
        "other_cpu_cores": round(other.cores(), 2),
    }
    out["targets"] = targets(out)
    return out


def markdown(res: dict[str, Any]) -> str:
    w = res["workload"]
    lines = report.header(
        "Frameworks: Hugging Face Trainer checkpoints vs CkptTrainer",
        res["machine"],
        res["smoke"],
        res.get("other_cpu_cores"),
    )
    lines += [
        f"- Model: {w['title']}, {report.mb(w['raw_bytes'])} MB of state (parameters + AdamW moments), CPU; "
        f"batch {w['batch']} x {w['seq']} tokens, transformers {w['transformers']}.",
        f"- {w['max_steps']} steps, a checkpoint every {w['save_steps']} ({w['saves']} checkpoints), local disk; "
        f"medians of {w['rounds']} round(s), the order of the runs alternating.",
        "- Stall per save (the target): time the training loop is held by checkpointing, per save: the save call",
        "  plus the extra time of the optimizer step after a save (per-save columns below are per save, too).",
        "- Last commit wait: `CkptTrainer.train()` returns once its last checkpoint is committed; the Trainer's last",
        "  save is synchronous, already in its stall. `+ last wait` folds that wait into the stall per save.",
        "- Overhead per save: (training time with checkpoints - without) / saves; includes background work",
        "  competing with training for the CPU.",
        "",
        "| run | train (s) | train step | stall per save | save call | step after save | last commit wait (once) "
        "| stall + last wait | overhead per save | stored (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in res["systems"].values():
        lines.append(
            f"| {s['label']} | {s['total_s']:.2f} | {report.secs(s['train_step_s'])} "
            f"| {report.secs(s['stall_per_save_s'])} | {report.secs(s['save_call_s'])} "
            f"| {report.secs(s['after_save_extra_s'])} | {report.secs(s['final_commit_wait_s'])} "
            f"| {report.secs(s['stall_with_final_wait_s'])} | {report.secs(s['overhead_per_save_s'])} "
            f"| {report.mb(s['bytes'])} |"
        )
    lines += [
        "",
        f"CkptTrainer / Trainer default: stall per save {report.ratio(res['stall_ratio'])} "
        f"({report.ratio(res['stall_with_final_wait_ratio'])} with the wait for the last commit), "
        f"end-to-end overhead per save {report.ratio(res['overhead_ratio'])}, bytes {report.ratio(res['bytes_ratio'])}.",
        "",
        *report.target_lines(res["targets"], res.get("other_cpu_cores")),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return report.standalone("benchmarks.bench_transformers", "transformers", __doc__, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
