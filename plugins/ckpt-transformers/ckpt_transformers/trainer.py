"""``CkptTrainer``: the Hugging Face Trainer, checkpointing through ckpt.

How it maps onto the Trainer's own checkpoint machinery:

save
    ``_save_checkpoint`` (called where the Trainer would write ``checkpoint-N/``: every
    ``save_steps``, per ``save_strategy``) takes an asynchronous ``Checkpointer.save``. It
    returns once the snapshot is consistent; parameters and optimizer state are copied in
    the background and only the next ``optimizer.step()`` waits for that copy. Encoding,
    deduplication and writing overlap training; ``train()`` returns once the last save
    is committed.
resume
    ``train(resume_from_checkpoint=True)`` resumes from the store's newest checkpoint (an
    int resumes from that step; a path is an ordinary ``checkpoint-N`` folder, loaded by
    the Trainer itself). The Trainer reads its ``TrainerState`` from a folder, so the
    stored ``trainer_state.json`` text goes into a temporary folder that stands for the
    checkpoint, and the Trainer's loading methods are overridden for that folder: model,
    optimizer, scheduler, scaler and RNG states are read in one all-or-nothing
    ``Checkpointer.restore`` once the optimizer exists, and the RNG states are applied
    where the Trainer applies its own: after it has skipped the batches the resumed epoch
    had consumed. The resumed run is bit-identical to an uninterrupted one.
retention
    ``save_total_limit`` is ``keep_last``: older checkpoints are pruned after each commit.

State tree of a checkpoint: ``model`` (state dict), ``optimizer``, ``scheduler``,
``scaler`` (when the Trainer has one), ``rng``, ``trainer_state`` (JSON text),
``data`` (the data-order record) and ``model_config`` (the model's ``config.json``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import transformers
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import get_last_checkpoint

import ckpt
from ckpt.errors import CheckpointError, NoCheckpointError, StateMismatchError
from ckpt_transformers.rng import TrainerRNG
from ckpt_transformers.state import (
    CONFIG_KEY,
    DATA_KEY,
    TRAINER_STATE_KEY,
    data_changes,
    data_record,
    parse_trainer_state,
    trainer_state_json,
)

log = logging.getLogger("ckpt")

_TRAINER_STATE_FILE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME


@dataclasses.dataclass(frozen=True)
class _Resume:
    """A resume in progress: the step and the folder that stands for it."""

    step: int
    folder: str
    manifest: ckpt.Manifest


if TYPE_CHECKING:  # the mixin is type-checked as the Trainer it is mixed into
    _TrainerBase = transformers.Trainer
else:
    _TrainerBase = object


def _inner_optimizer(opt: Any) -> Any:
    # accelerate's AcceleratedOptimizer delegates to the torch optimizer it wraps; ckpt
    # captures and checks the torch one (its step hook is the one the save guard needs).
    from accelerate.optimizer import AcceleratedOptimizer  # type: ignore[import-untyped]

    return opt.optimizer if isinstance(opt, AcceleratedOptimizer) else opt


class CkptTrainerMixin(_TrainerBase):
    """Makes a ``transformers.Trainer`` subclass checkpoint through ckpt.

    Put it first among the bases: ``class MyTrainer(CkptTrainerMixin, SFTTrainer): ...``.

    :param ckpt_url: the store (any fsspec URL); default ``<output_dir>/ckpt``.
    :param ckpt_storage_options: fsspec options of the store (credentials, endpoint).
    """

    def __init__(
        self, *args: Any, ckpt_url: str | None = None, ckpt_storage_options: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        targs = self.args
        self.ckpt_url: str = ckpt_url or os.path.join(str(targs.output_dir), "ckpt")
        self.ckpt_storage_options = ckpt_storage_options
        #: the checkpoint the last ``train(resume_from_checkpoint=...)`` restored
        self.ckpt_restored: ckpt.CheckpointInfo | None = None
        self._ckpt: ckpt.Checkpointer | None = None
        self._ckpt_rng = TrainerRNG()
        self._ckpt_resume: _Resume | None = None
        #: the model's config.json, rendered at the first save of a train() call (it takes
        #: milliseconds the training loop would otherwise wait for at every save)
        self._ckpt_config: str | None = None
        self._ckpt_refuse_unsupported()

    def _ckpt_refuse_unsupported(self) -> None:
        targs = self.args
        kind = type(self).__name__
        if targs.world_size > 1:
            raise CheckpointError(
                f"{kind} checkpoints one process; this run has world_size {targs.world_size} "
                f"(store {self.ckpt_url}). Use the Trainer's own checkpoints for multi-process runs."
            )
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise CheckpointError(f"{kind} does not checkpoint DeepSpeed or FSDP runs (store {self.ckpt_url})")
        if targs.load_best_model_at_end:
            raise CheckpointError(
                f"{kind} does not support load_best_model_at_end yet: retention keeps the newest "
                f"save_total_limit checkpoints of {self.ckpt_url}, not the best. Restore a step yourself with "
                "ckpt.restore(url, {'model': model}, step=trainer.state.best_global_step)"
            )

    # -- the Checkpointer's lifetime: one per train() call ---------------------------------
    def _ckpt_open(self) -> ckpt.Checkpointer:
        if self._ckpt is None:
            self._ckpt = ckpt.Checkpointer(
                self.ckpt_url,
                keep_last=self.args.save_total_limit or None,
                storage_options=self.ckpt_storage_options,
            )
        return self._ckpt

    def _ckpt_close(self, *, raise_errors: bool) -> None:
        ck, self._ckpt = self._ckpt, None
        self._ckpt_config = None
        if ck is not None:
            ck.close(raise_errors=raise_errors)

    def train(
        self,
        resume_from_checkpoint: str | bool | int | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes from the store's newest checkpoint.

        An int resumes from that step of the store; a path, from an ordinary ``checkpoint-N``
        folder (the Trainer loads it; the saves that follow go to the store). With ``True``
        and an empty store, the newest ``checkpoint-N`` folder in ``output_dir`` is used if
        there is one, else :class:`ckpt.NoCheckpointError` is raised.
        """
        if trial is not None:
            raise CheckpointError(
                f"{type(self).__name__} does not checkpoint hyper-parameter search trials (store {self.ckpt_url})"
            )
        self._ckpt_open()
        try:
            target = self._ckpt_target(resume_from_checkpoint)
            if not isinstance(target, int):
                out = super().train(target, None, ignore_keys_for_eval, **kwargs)
            else:
                with tempfile.TemporaryDirectory(prefix="ckpt-transformers-") as folder:
                    self._ckpt_resume = self._ckpt_stage_resume(target, folder)
                    out = super().train(folder, None, ignore_keys_for_eval, **kwargs)
        except BaseException:
            self._ckpt_close(raise_errors=False)  # the training error matters; a save error is logged
            raise
        finally:
            self._ckpt_resume = None
            self._ckpt_rng.pending = None
        self._ckpt_close(raise_errors=True)  # train() returns once every save is committed
        return out

    def _ckpt_target(self, resume: Any) -> int | str | None:
        """The store step (int) or checkpoint folder (str) to resume from; None for a fresh start."""
        if resume is None or resume is False:
            return None
        if resume is True:
            step = ckpt.latest_step(self.ckpt_url, self.ckpt_storage_options)
            if step is not None:
                return step
            out_dir = self.args.output_dir
            folder = get_last_checkpoint(out_dir) if out_dir and os.path.isdir(out_dir) else None
            if folder is not None:
                log.warning("%s holds no checkpoint: resuming from the Trainer's folder %s", self.ckpt_url, folder)
                return folder
            raise NoCheckpointError(
                f"resume_from_checkpoint=True: {self.ckpt_url} holds no checkpoint (and {out_dir} no checkpoint-* folder)"
            )
        if isinstance(resume, int) and not isinstance(resume, bool):
            if resume not in ckpt.steps(self.ckpt_url, self.ckpt_storage_options):
                raise NoCheckpointError(f"resume_from_checkpoint={resume}: {self.ckpt_url} holds no step {resume}")
            return resume
        if isinstance(resume, (str, os.PathLike)):
            return os.fspath(resume)
        raise CheckpointError(f"resume_from_checkpoint must be True, a step (int) or a folder, got {resume!r}")

    def _ckpt_stage_resume(self, step: int, folder: str) -> _Resume:
        """Write the stored ``trainer_state.json`` of ``step`` into ``folder`` for the Trainer to read."""
        manifest = ckpt.read_manifest(self.ckpt_url, step, self.ckpt_storage_options)
        tree = manifest.tree
        parse_trainer_state(tree.get(TRAINER_STATE_KEY), step=step, url=self.ckpt_url)
        Path(folder, _TRAINER_STATE_FILE).write_text(tree[TRAINER_STATE_KEY], encoding="utf-8")
        changes = data_changes(tree.get(DATA_KEY), self._ckpt_data())
        if changes:
            log.warning(
                "resuming step %d of %s: %s; the resumed run will not see the data as the saved one did",
                step,
                self.ckpt_url,
                "; ".join(changes),
            )
        return _Resume(step=step, folder=folder, manifest=manifest)

    def _ckpt_resuming(self, checkpoint: Any) -> _Resume | None:
        resume = self._ckpt_resume
        return resume if resume is not None and checkpoint == resume.folder else None

    # -- what a checkpoint holds ---------------------------------------------------------
    def _ckpt_objects(self, *, full: bool) -> dict[str, Any]:
        """The live objects, by state key (``full``: everything a resume needs, not just the model)."""
        objects: dict[str, Any] = {"model": self.model}
        if full:
            objects["optimizer"] = _inner_optimizer(self.optimizer)
            objects["scheduler"] = self.lr_scheduler
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                objects["scaler"] = scaler
            objects["rng"] = self._ckpt_rng
        return objects

    def _ckpt_data(self) -> dict[str, Any]:
        return data_record(self.args, self._train_batch_size, self.train_dataset)

    def _ckpt_export_callback_states(self) -> None:
        # As Trainer._save_checkpoint does, so a resume restores stateful callbacks
        # (early stopping patience...) through TrainerState.stateful_callbacks.
        handler = self.callback_handler
        kept: dict[str, Any] = self.state.stateful_callbacks  # type: ignore[assignment]  # a dict after __post_init__
        for cb in [cb for cb in [*handler.callbacks, self.control] if isinstance(cb, ExportableState)]:
            name = type(cb).__name__
            if isinstance(kept.get(name), list):
                kept[name].append(cb.state())
            else:
                kept[name] = cb.state()

    # -- the Trainer's checkpoint methods --------------------------------------------------
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        ck = self._ckpt_open()
        if getattr(self, "hp_search_backend", None) is None and trial is None:
            self.store_flos()
        self._ckpt_export_callback_states()
        state = self.state
        tree: dict[str, Any] = self._ckpt_objects(full=not self.args.save_only_model)
        tree[TRAINER_STATE_KEY] = trainer_state_json(state)
        tree[DATA_KEY] = self._ckpt_data()
        if self._ckpt_config is None:
            to_json = getattr(getattr(self.model, "config", None), "to_json_string", None)
            self._ckpt_config = to_json() if callable(to_json) else ""
        if self._ckpt_config:
            tree[CONFIG_KEY] = self._ckpt_config
        meta = {"framework": "transformers", "transformers": transformers.__version__, "epoch": float(state.epoch or 0)}
        ck.save(tree, step=state.global_step, meta=meta)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self._ckpt_resuming(resume_from_checkpoint) is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        # else: the model is restored with the optimizer, in one all-or-nothing restore

    def _load_optimizer_and_scheduler(self, checkpoint: Any) -> None:
        resume = self._ckpt_resuming(checkpoint)
        if resume is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        state = self._ckpt_objects(full=True)
        stored = resume.manifest.tree
        where = f"checkpoint step {resume.step} of {self.ckpt_url}"
        for key in ("optimizer", "scheduler", "rng"):
            if key not in stored:
                raise StateMismatchError(
                    f"{where} holds no {key}: it was saved with save_only_model=True, so training cannot resume "
                    "from it exactly; load its weights with ckpt.restore(url, {'model': model}, step=...)"
                )
        if ("scaler" in stored) != ("scaler" in state):
            saved = "with" if "scaler" in stored else "without"
            live = "has" if "scaler" in state else "has no"
            raise StateMismatchError(f"{where} was saved {saved} a gradient scaler (fp16); this Trainer {live} one")
        assert self._ckpt is not None  # opened by train()
        self.ckpt_restored = self._ckpt.restore(state, step=resume.step)
        log.info("resumed from step %d of %s", resume.step, self.ckpt_url)

    def _load_scaler(self, checkpoint: Any) -> None:
        if self._ckpt_resuming(checkpoint) is None:
            super()._load_scaler(checkpoint)

    def _load_rng_state(self, checkpoint: Any) -> None:
        if self._ckpt_resuming(checkpoint) is None:
            super()._load_rng_state(checkpoint)
        else:
            self._ckpt_rng.apply()


class CkptTrainer(CkptTrainerMixin, transformers.Trainer):
    """A ``transformers.Trainer`` whose checkpoints go to a ckpt store, asynchronously.

    ``CkptTrainer(model, args, train_dataset=..., ckpt_url="s3://bucket/run")``; see
    :class:`CkptTrainerMixin` for the options and the module docstring for the mapping.
    """


def export_pretrained(
    url: str,
    out_dir: str | os.PathLike[str],
    *,
    step: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` (newest when None) as a folder ``from_pretrained`` loads:
    ``config.json`` (stored with every checkpoint) and ``model.safetensors``."""
    from ckpt.interop.export import export_checkpoint

    manifest = ckpt.read_manifest(url, step, storage_options)
    config = manifest.tree.get(CONFIG_KEY) if isinstance(manifest.tree, Mapping) else None
    if not isinstance(config, str):
        raise NoCheckpointError(
            f"checkpoint step {manifest.step} of {url} holds no {CONFIG_KEY}: it was not saved by CkptTrainer "
            "from a model with a config; export the weights with `ckpt export URL out.safetensors --key model`"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    export_checkpoint(
        url,
        out / "model.safetensors",
        step=manifest.step,
        key="model",
        fmt="safetensors",
        storage_options=storage_options,
    )
    (out / "config.json").write_text(config, encoding="utf-8")
    return out
