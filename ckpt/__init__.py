"""ckpt: asynchronous, compressed, deduplicated, verified checkpoints for PyTorch training.

Quick use::

    import ckpt
    ckpt.save("file:///tmp/run", {"model": model, "optim": opt, "rng": ckpt.RNG()}, step=100)
    ckpt.restore("file:///tmp/run", {"model": model, "optim": opt, "rng": ckpt.RNG()})
    tree = ckpt.load("file:///tmp/run")      # plain tensors, no live objects needed
"""

from __future__ import annotations

__version__ = "0.1.0"

from ckpt.adapters import Adapter, AdapterRegistry
from ckpt.api import CheckpointInfo, load, restore, save
from ckpt.checkpointer import Checkpointer, SaveHandle
from ckpt.codecs import Codec, CodecRegistry
from ckpt.dataloader import track
from ckpt.errors import (
    CheckpointError,
    CorruptCheckpointError,
    MissingObjectError,
    NoCheckpointError,
    PluginError,
    SchemaError,
    StateMismatchError,
    StoreError,
    UnknownCodecError,
    UnsupportedValueError,
)
from ckpt.hookspecs import hookimpl
from ckpt.torch_adapters import RNG

__all__ = [
    "Adapter",
    "AdapterRegistry",
    "CheckpointError",
    "CheckpointInfo",
    "Checkpointer",
    "Codec",
    "CodecRegistry",
    "CorruptCheckpointError",
    "MissingObjectError",
    "NoCheckpointError",
    "PluginError",
    "RNG",
    "SchemaError",
    "StateMismatchError",
    "SaveHandle",
    "StoreError",
    "UnknownCodecError",
    "UnsupportedValueError",
    "__version__",
    "hookimpl",
    "load",
    "restore",
    "save",
    "track",
]
