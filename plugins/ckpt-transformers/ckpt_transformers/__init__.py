"""ckpt-transformers: a ckpt plugin for the Hugging Face ``transformers.Trainer``.

``CkptTrainer`` (and ``CkptTrainerMixin`` for other Trainer subclasses) saves at
``save_steps`` into a ckpt store, asynchronously, and resumes bit-exact with
``trainer.train(resume_from_checkpoint=True)``; ``export_pretrained`` writes a checkpoint
as a folder ``from_pretrained`` loads.

Registered through the ``ckpt`` entry-point group under its distribution name
(``ckpt-transformers``); the plugin registers the adapter of the Trainer's process RNGs.
Importing this module does not import transformers (every ckpt command loads the
plugins): the Trainer classes are imported on first use.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import ckpt

if TYPE_CHECKING:
    from ckpt_transformers.rng import TrainerRNG, TrainerRNGAdapter
    from ckpt_transformers.trainer import CkptTrainer, CkptTrainerMixin, export_pretrained

try:
    __version__ = version("ckpt-transformers")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "CkptTrainer",
    "CkptTrainerMixin",
    "TrainerRNG",
    "TrainerRNGAdapter",
    "__version__",
    "ckpt_register_adapters",
    "export_pretrained",
]

_LAZY = ("CkptTrainer", "CkptTrainerMixin", "export_pretrained")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from ckpt_transformers import trainer

        return getattr(trainer, name)
    if name in ("TrainerRNG", "TrainerRNGAdapter"):
        from ckpt_transformers import rng

        return getattr(rng, name)
    raise AttributeError(f"module 'ckpt_transformers' has no attribute {name!r}")


@ckpt.hookimpl
def ckpt_register_adapters(register) -> None:
    """Register the adapter of :class:`TrainerRNG` (the process RNGs, applied when the Trainer asks)."""
    from ckpt_transformers.rng import TrainerRNGAdapter

    register(TrainerRNGAdapter())
