"""ckpt: asynchronous, compressed, deduplicated, verified checkpoints for PyTorch training.

Quick use::

    import ckpt
    ckpt.save("file:///tmp/run", {"model": model, "optim": opt, "rng": ckpt.RNG()}, step=100)
    ckpt.restore("file:///tmp/run", {"model": model, "optim": opt, "rng": ckpt.RNG()})
    tree = ckpt.load("file:///tmp/run")      # plain tensors, no live objects needed
"""

from __future__ import annotations

from ckpt.api import latest_step, load, read_manifest, restore, save, steps
from ckpt.codecs.base import Codec, CodecRegistry
from ckpt.errors import (
    CheckpointError,
    CorruptCheckpointError,
    MissingObjectError,
    NewerSchemaError,
    NoCheckpointError,
    PluginError,
    SchemaError,
    StateMismatchError,
    StoreError,
    UnknownCodecError,
    UnsupportedValueError,
)
from ckpt.hooks.hookspecs import hookimpl
from ckpt.snapshot.checkpointer import Checkpointer, SaveHandle
from ckpt.state.adapters import Adapter, AdapterRegistry
from ckpt.state.dataloader import track
from ckpt.state.torch_adapters import RNG
from ckpt.storage.manifest import ChunkRef, Manifest, TensorEntry
from ckpt.types import CheckpointInfo, SaveStats
from ckpt.version import __version__

__all__ = [
    "Adapter",
    "AdapterRegistry",
    "CheckpointError",
    "CheckpointInfo",
    "Checkpointer",
    "ChunkRef",
    "Codec",
    "CodecRegistry",
    "CorruptCheckpointError",
    "Manifest",
    "MissingObjectError",
    "NewerSchemaError",
    "NoCheckpointError",
    "PluginError",
    "RNG",
    "SaveHandle",
    "SaveStats",
    "SchemaError",
    "StateMismatchError",
    "StoreError",
    "TensorEntry",
    "UnknownCodecError",
    "UnsupportedValueError",
    "__version__",
    "hookimpl",
    "latest_step",
    "load",
    "read_manifest",
    "restore",
    "save",
    "steps",
    "track",
]
