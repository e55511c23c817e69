"""ckpt: asynchronous, compressed, deduplicated, verified checkpoints for PyTorch training.

Quick use::

    import ckpt
    ckpt.save("file:///tmp/run", {"model": model, "optim": opt, "rng": ckpt.RNG()}, step=100)
    ckpt.restore("file:///tmp/run", {"model": model, "optim": opt, "rng": ckpt.RNG()})
    tree = ckpt.load("file:///tmp/run")      # plain tensors, no live objects needed
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names as type checkers see them; at run time they load on first use
    from ckpt.api import latest_step, load, read_manifest, restore, save, steps
    from ckpt.codecs.base import Codec, CodecRegistry
    from ckpt.errors import (
        CheckpointError,
        CorruptCheckpointError,
        EncryptionError,
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
    from ckpt.security.keys import Encryption
    from ckpt.snapshot.checkpointer import Checkpointer, SaveHandle
    from ckpt.state.adapters import Adapter, AdapterRegistry
    from ckpt.state.dataloader import track
    from ckpt.state.torch_adapters import RNG
    from ckpt.storage.copy import copy
    from ckpt.storage.manifest import ChunkRef, Manifest, TensorEntry
    from ckpt.types import CheckpointInfo, SaveStats
    from ckpt.version import __version__

#: public name -> the module that defines it. ``import ckpt`` imports none of them, so the
#: command line and tools that only read stores start without importing torch (PEP 562).
_LAZY = {
    **dict.fromkeys(("latest_step", "load", "read_manifest", "restore", "save", "steps"), "ckpt.api"),
    **dict.fromkeys(("Codec", "CodecRegistry"), "ckpt.codecs.base"),
    **dict.fromkeys(
        (
            "CheckpointError",
            "CorruptCheckpointError",
            "EncryptionError",
            "MissingObjectError",
            "NewerSchemaError",
            "NoCheckpointError",
            "PluginError",
            "SchemaError",
            "StateMismatchError",
            "StoreError",
            "UnknownCodecError",
            "UnsupportedValueError",
        ),
        "ckpt.errors",
    ),
    "hookimpl": "ckpt.hooks.hookspecs",
    "Encryption": "ckpt.security.keys",
    **dict.fromkeys(("Checkpointer", "SaveHandle"), "ckpt.snapshot.checkpointer"),
    **dict.fromkeys(("Adapter", "AdapterRegistry"), "ckpt.state.adapters"),
    "track": "ckpt.state.dataloader",
    "RNG": "ckpt.state.torch_adapters",
    "copy": "ckpt.storage.copy",
    **dict.fromkeys(("ChunkRef", "Manifest", "TensorEntry"), "ckpt.storage.manifest"),
    **dict.fromkeys(("CheckpointInfo", "SaveStats"), "ckpt.types"),
    "__version__": "ckpt.version",
}


def __getattr__(name: str) -> Any:
    if name == "dcp":  # the submodule ckpt.dcp (DCP storage writer/reader; imports torch)
        import ckpt.dcp  # noqa: F401 - bound for sys.modules

        return sys.modules["ckpt.dcp"]
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckpt' has no attribute {name!r}")
    value = getattr(_import(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def _import(module: str) -> Any:
    # written out rather than importlib by name, so the import graph (tests/test_layout.py) sees each edge
    if module == "ckpt.api":
        import ckpt.api
    elif module == "ckpt.codecs.base":
        import ckpt.codecs.base
    elif module == "ckpt.errors":
        import ckpt.errors
    elif module == "ckpt.hooks.hookspecs":
        import ckpt.hooks.hookspecs
    elif module == "ckpt.security.keys":
        import ckpt.security.keys
    elif module == "ckpt.snapshot.checkpointer":
        import ckpt.snapshot.checkpointer
    elif module == "ckpt.state.adapters":
        import ckpt.state.adapters
    elif module == "ckpt.state.dataloader":
        import ckpt.state.dataloader
    elif module == "ckpt.state.torch_adapters":
        import ckpt.state.torch_adapters
    elif module == "ckpt.storage.copy":
        import ckpt.storage.copy
    elif module == "ckpt.storage.manifest":
        import ckpt.storage.manifest
    elif module == "ckpt.types":
        import ckpt.types
    elif module == "ckpt.version":
        import ckpt.version  # noqa: F401 - bound for sys.modules, as every branch above
    return sys.modules[module]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


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
    "Encryption",
    "EncryptionError",
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
    "copy",
    "hookimpl",
    "latest_step",
    "load",
    "read_manifest",
    "restore",
    "save",
    "steps",
    "track",
]
