"""Frameworks section, Lightning half (issue 16): Lightning's checkpointing vs CkptCheckpointIO.

The same LightningModule (a small transformer on token ids; about 50 MB of parameters +
AdamW moments) trains on the same shuffled random tokens in one process, with a
``ModelCheckpoint(every_n_train_steps=N, save_top_k=-1)`` saving 5 checkpoints, through:

- **torch**: Lightning's default ``TorchCheckpointIO`` (a ``torch.save`` file per checkpoint);
- **async**: ``AsyncCheckpointIO`` (clones every tensor on the training thread, one worker
  thread writes the ``torch.save`` file);
- **ckpt**: ``ckpt_lightning.CkptCheckpointIO`` into a local store;
- **none**: no checkpoints (the baseline of the end-to-end overhead).

Measured per run:

- **stall per save** (the target): the time the training loop is held by checkpointing, per
  save: the time in ``ModelCheckpoint.on_train_batch_end`` (Lightning's dump of the
  checkpoint dict plus the CheckpointIO's save call) plus how much longer than a normal
  training step the step after a save took (ckpt's guard holds the next optimizer step
  until parameters and moments are copied);
- **the wait at teardown** for writes still in flight when ``fit()`` ends (async, ckpt),
  reported apart and also folded into the stall;
- **end-to-end overhead per save**: (training time with checkpoints - without) / saves;
- **bytes stored**: every file the run left (5 ``.ckpt`` files; the ckpt store).

``python -m benchmarks.bench_lightning [--smoke] [--out DIR]`` runs it standalone.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import tempfile
import warnings
from typing import Any

import torch

from benchmarks import common, report
from benchmarks.common import median, now

SAVES = 5

FULL = {"d_model": 256, "layers": 4, "heads": 4, "vocab": 2048, "seq": 64, "batch": 8, "every": 10, "rounds": 3}
SMOKE = {"d_model": 32, "layers": 1, "heads": 2, "vocab": 128, "seq": 16, "batch": 2, "every": 2, "rounds": 1}

SYSTEMS = {
    "none": "no checkpoints",
    "torch": "Lightning default (TorchCheckpointIO)",
    "async": "AsyncCheckpointIO",
    "ckpt": "CkptCheckpointIO (ckpt store, async)",
}


def _classes() -> dict[str, Any]:
    """The module, the timing callbacks and the timed CheckpointIOs (Lightning imported here)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

    from ckpt_lightning import CkptCheckpointIO

    class TinyLM(L.LightningModule):
        def __init__(self, vocab: int, d_model: int, layers: int, heads: int, seq: int) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.embed = torch.nn.Embedding(vocab, d_model)
            self.pos = torch.nn.Parameter(torch.zeros(seq, d_model))
            layer = torch.nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.1, batch_first=True)
            self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = torch.nn.Linear(d_model, vocab)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            step_clock.closure_start(self.trainer.global_step + 1)
            (ids,) = batch
            x = self.embed(ids[:, :-1]) + self.pos[: ids.shape[1] - 1]
            logits = self.head(self.body(x))
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            step_clock.closure_end()

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=5e-4, weight_decay=0.01)
            opt.register_step_pre_hook(lambda o, a, k: step_clock.update_starts())
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class StepClock(Callback):
        """Wall time of every training batch (checkpointing excluded: ModelCheckpoint runs last),
        and how long each ``optimizer.step()`` was held in the global step pre-hooks, where ckpt's
        guard waits for the background copy: from the step's start (or, when the closure ran
        ahead of the hold, from the closure's end) to the optimizer's own pre-hook, which runs
        after every global one, right before the update."""

        def __init__(self) -> None:
            self.steps: dict[int, float] = {}
            self.blocked: dict[int, float] = {}
            self._t = 0.0
            self._entered = 0.0
            self._closure_end = 0.0
            self._step = 0

        def step_entered(self) -> None:
            self._entered, self._closure_end = now(), 0.0

        def closure_start(self, step: int) -> None:
            self._step = step

        def closure_end(self) -> None:
            self._closure_end = now()

        def update_starts(self) -> None:
            if self._entered:
                self.blocked[self._step] = now() - max(self._entered, self._closure_end)
                self._entered = 0.0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self._t = now()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.steps[trainer.global_step] = now() - self._t

    class TimedModelCheckpoint(ModelCheckpoint):
        """The time the training loop spends in checkpointing, per save."""

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.save_s: dict[int, float] = {}

        def on_train_batch_end(self, trainer: Any, *a: Any, **kw: Any) -> None:
            t = now()
            before = self._last_global_step_saved
            super().on_train_batch_end(trainer, *a, **kw)
            if self._last_global_step_saved != before:
                self.save_s[trainer.global_step] = now() - t

    class Current:
        clock: StepClock | None = None

        def closure_start(self, step: int) -> None:
            if self.clock is not None:
                self.clock.closure_start(step)

        def closure_end(self) -> None:
            if self.clock is not None:
                self.clock.closure_end()

        def update_starts(self) -> None:
            if self.clock is not None:
                self.clock.update_starts()

    step_clock = Current()

    def entered(optimizer: Any, args: Any, kwargs: Any) -> None:
        if step_clock.clock is not None:
            step_clock.clock.step_entered()

    # Registered before any CheckpointIO or Checkpointer exists: global step pre-hooks run in
    # registration order, so the clock starts before any of theirs.
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(entered)

    def timed_teardown(base: type) -> type:
        class Timed(base):
            teardown_s = 0.0

            def teardown(self) -> None:
                t = now()
                super().teardown()
                self.teardown_s += now() - t

        Timed.__name__ = f"Timed{base.__name__}"
        return Timed

    return {
        "L": L,
        "current": step_clock,
        "module": TinyLM,
        "clock": StepClock,
        "checkpoint": TimedModelCheckpoint,
        "torch": timed_teardown(TorchCheckpointIO),
        "async": timed_teardown(AsyncCheckpointIO),
        "ckpt": timed_teardown(CkptCheckpointIO),
    }


def _train_once(
    kind: str, c: dict[str, Any], size: dict[str, Any], workdir: str, max_steps: int | None = None
) -> dict[str, Any]:
    L = c["L"]
    out_dir = tempfile.mkdtemp(prefix=f"lightning-{kind}-", dir=workdir)
    steps = max_steps or SAVES * size["every"]
    L.seed_everything(0, verbose=False)
    model = c["module"](size["vocab"], size["d_model"], size["layers"], size["heads"], size["seq"])
    ids = torch.randint(
        0, size["vocab"], (steps * size["batch"], size["seq"]), generator=torch.Generator().manual_seed(7)
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=size["batch"], shuffle=True)
    clock = c["clock"]()
    c["current"].clock = clock
    callbacks: list[Any] = [clock]
    plugins: list[Any] = []
    io = None
    checkpoint = None
    if kind != "none" and not max_steps:
        checkpoint = c["checkpoint"](
            dirpath=os.path.join(out_dir, "ck"), every_n_train_steps=size["every"], save_top_k=-1
        )
        callbacks.append(checkpoint)
        store = os.path.join(out_dir, "store")
        io = c["ckpt"](f"file://{store}") if kind == "ckpt" else c[kind]()
        plugins.append(io)
    trainer = L.Trainer(
        max_steps=steps,
        plugins=plugins,
        callbacks=callbacks,
        enable_checkpointing=checkpoint is not None,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    gc.collect()
    t0 = now()
    trainer.fit(model, loader)
    total = now() - t0
    c["current"].clock = None
    save_s = checkpoint.save_s if checkpoint is not None else {}
    after = {s + 1 for s in save_s}
    normal = median([t for s, t in clock.steps.items() if s not in after and s > 1])
    normal_blocked = median([t for s, t in clock.blocked.items() if s not in after and s > 1])
    blocked = max(0.0, sum(clock.blocked.get(s, 0.0) - normal_blocked for s in after))
    # Not clipped at zero per step: noise then averages out instead of adding up.
    extra = max(0.0, sum(clock.steps[s] - normal for s in after if s in clock.steps) - blocked)
    opt = trainer.optimizers[0]
    res = {
        "total_s": total,
        "saves": len(save_s),
        "save_call_s": sum(save_s.values()),
        "blocked_after_s": blocked,
        "after_save_extra_s": extra,
        "teardown_wait_s": getattr(io, "teardown_s", 0.0),
        "held_s": sum(save_s.values()) + blocked,
        # per save, in order: the first one also opens the writer (ckpt: takes the store's writer lease)
        "stall_each_s": [save_s[s] + max(0.0, clock.blocked.get(s + 1, 0.0) - normal_blocked) for s in sorted(save_s)],
        "bytes": common.dir_bytes(out_dir),
        "train_step_s": normal,
        "raw_bytes": common.raw_bytes({"model": model, "optim": opt}),
    }
    if kind == "ckpt":
        import ckpt

        res["steps_stored"] = ckpt.steps(f"file://{os.path.join(out_dir, 'store')}")
    common.rmtree(out_dir)
    return res


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, value, threshold, timing in (
        ("training stall per save: CkptCheckpointIO / Lightning default", res["stall_ratio"], 0.1, True),
        ("bytes stored over 5 checkpoints: CkptCheckpointIO / Lightning default", res["bytes_ratio"], 0.5, False),
    ):
        out.append(
            {
                "target": name,
                "value": value,
                "op": "<=",
                "threshold": threshold,
                "pass": bool(value <= threshold),
                "timing": timing,
            }
        )
    return out


def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning\..*")
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|num_workers|does not have many workers).*")


def run(*, smoke: bool, workdir: str, log=print) -> dict[str, Any]:
    _quiet()
    size = SMOKE if smoke else FULL
    threads = max(1, (os.cpu_count() or 2) - 1)  # one core left for I/O, as a data-loader worker would have
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    machine = common.machine_info()
    other = common.OtherCpu()
    try:
        import lightning

        c = _classes()
        _quiet()  # Lightning sets its loggers' levels on import
        _train_once("none", c, size, workdir, max_steps=3)  # warm-up: imports, allocator
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in SYSTEMS}
        for r in range(size["rounds"]):
            order = list(SYSTEMS) if r % 2 == 0 else list(reversed(SYSTEMS))
            for kind in order:
                res = _train_once(kind, c, size, workdir)
                runs[kind].append(res)
                log(
                    f"  [lightning] {kind:<5} {res['total_s']:.2f}s, {res['saves']} saves, held "
                    f"{res['held_s']:.3f}s, {res['bytes'] / 1e6:.1f} MB stored"
                )
    finally:
        torch.set_num_threads(before)
    base = median([r["total_s"] for r in runs["none"]])
    systems: dict[str, Any] = {}
    for kind, label in SYSTEMS.items():
        rs = runs[kind]
        saves = max(1, rs[0]["saves"]) if kind != "none" else 0

        def per_save(key: str, rs: list[dict[str, Any]] = rs, saves: int = saves) -> float:
            return median([r[key] / saves for r in rs]) if saves else 0.0

        systems[kind] = {
            "label": label,
            "total_s": median([r["total_s"] for r in rs]),
            "saves": saves,
            "stall_per_save_s": per_save("held_s"),
            "first_stall_s": median([r["stall_each_s"][0] for r in rs]) if saves else 0.0,
            "later_stall_s": median([median(r["stall_each_s"][1:]) for r in rs]) if saves > 1 else 0.0,
            "stall_with_teardown_s": (
                median([(r["held_s"] + r["teardown_wait_s"]) / saves for r in rs]) if saves else 0.0
            ),
            "save_call_s": per_save("save_call_s"),
            "blocked_after_s": per_save("blocked_after_s"),
            "after_save_extra_s": per_save("after_save_extra_s"),
            "slowed_per_save_s": median([(r["held_s"] + r["after_save_extra_s"]) / saves for r in rs])
            if saves
            else 0.0,
            "teardown_wait_s": median([r["teardown_wait_s"] for r in rs]),
            "overhead_per_save_s": median([(r["total_s"] - base) / saves for r in rs]) if saves else 0.0,
            "bytes": median([r["bytes"] for r in rs]),
            "train_step_s": median([r["train_step_s"] for r in rs]),
            "runs": rs,
        }
    default, asyn, ck = systems["torch"], systems["async"], systems["ckpt"]

    def div(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    out: dict[str, Any] = {
        "section": "lightning",
        "smoke": smoke,
        "machine": {**machine, "torch_threads": threads},
        "workload": {
            "title": f"transformer {size['layers']} layers, d_model {size['d_model']}, vocab {size['vocab']} + AdamW",
            "raw_bytes": runs["ckpt"][0]["raw_bytes"],
            **size,
            "max_steps": SAVES * size["every"],
            "saves": SAVES,
            "lightning": lightning.__version__,
        },
        "systems": systems,
        "stall_ratio": ck["stall_per_save_s"] / default["stall_per_save_s"],
        "stall_with_teardown_ratio": ck["stall_with_teardown_s"] / default["stall_with_teardown_s"],
        "stall_vs_async_ratio": div(ck["stall_per_save_s"], asyn["stall_per_save_s"]),
        "later_stall_ratio": div(ck["later_stall_s"], default["later_stall_s"]),
        "slowed_ratio": div(ck["slowed_per_save_s"], default["slowed_per_save_s"]),
        "overhead_ratio": div(ck["overhead_per_save_s"], default["overhead_per_save_s"]),
        "bytes_ratio": ck["bytes"] / default["bytes"],
        "other_cpu_cores": round(other.cores(), 2),
    }
    out["targets"] = targets(out)
    return out


def markdown(res: dict[str, Any]) -> str:
    w = res["workload"]
    lines = report.header(
        "Frameworks: Lightning checkpoints vs CkptCheckpointIO",
        res["machine"],
        res["smoke"],
        res.get("other_cpu_cores"),
    )
    lines += [
        f"- Model: {w['title']}, {report.mb(w['raw_bytes'])} MB of state (parameters + AdamW moments), CPU; "
        f"batch {w['batch']} x {w['seq']} tokens, dropout 0.1, Lightning {w['lightning']}.",
        f"- {w['max_steps']} steps, `ModelCheckpoint(every_n_train_steps={w['every']}, save_top_k=-1)` "
        f"({w['saves']} checkpoints), local disk; medians of {w['rounds']} round(s), the order of the runs alternating.",
        "- Stall per save (the target): time the training loop is held by checkpointing, per save: the time in",
        "  `ModelCheckpoint.on_train_batch_end` (Lightning's dump + the save call) plus how long the next",
        "  `optimizer.step()` was held before its update (ckpt's guard waiting for parameters and moments to be",
        "  copied; the plugin runs Lightning's closure, `training_step` + backward, before that hold).",
        "- Slower step after save: how much longer than a normal step the step after a save took besides that wait:",
        "  background writing sharing the CPU with training (async, ckpt). `stall + slower` adds it to the stall.",
        "- First save / later saves: the stall of the first save, which for ckpt also opens the writer (taking",
        "  the store's writer lease), and the median of the others.",
        "- Teardown wait: `fit()` returns once the writes still in flight are done (async, ckpt); `+ teardown`",
        "  folds that wait into the stall per save.",
        "- Overhead per save: (training time with checkpoints - without) / saves; includes background work",
        "  competing with training for the CPU.",
        "",
        "| run | train (s) | train step | stall per save | first save | later saves (median) | save call "
        "| step waited | slower step after save | stall + slower | teardown wait (once) | stall + teardown "
        "| overhead per save | stored (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in res["systems"].values():
        lines.append(
            f"| {s['label']} | {s['total_s']:.2f} | {report.secs(s['train_step_s'])} "
            f"| {report.secs(s['stall_per_save_s'])} | {report.secs(s['first_stall_s'])} "
            f"| {report.secs(s['later_stall_s'])} | {report.secs(s['save_call_s'])} "
            f"| {report.secs(s['blocked_after_s'])} | {report.secs(s['after_save_extra_s'])} "
            f"| {report.secs(s['slowed_per_save_s'])} | {report.secs(s['teardown_wait_s'])} "
            f"| {report.secs(s['stall_with_teardown_s'])} | {report.secs(s['overhead_per_save_s'])} "
            f"| {report.mb(s['bytes'])} |"
        )
    lines += [
        "",
        f"CkptCheckpointIO / Lightning default: stall per save {report.ratio(res['stall_ratio'])} "
        f"({report.ratio(res['stall_with_teardown_ratio'])} with the teardown wait, "
        f"{report.ratio(res['slowed_ratio'])} with the slower step after a save; "
        f"{report.ratio(res['later_stall_ratio'])} for the saves after the first), "
        f"end-to-end overhead per save {report.ratio(res['overhead_ratio'])}, bytes {report.ratio(res['bytes_ratio'])}; "
        f"stall vs AsyncCheckpointIO {report.ratio(res['stall_vs_async_ratio'])}.",
        "",
        *report.target_lines(res["targets"], res.get("other_cpu_cores")),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return report.standalone("benchmarks.bench_lightning", "lightning", __doc__, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
