"""Core's own hook implementations: the built-in adapters and codecs.

Registered by the plugin-manager factory exactly like a plugin, ``trylast`` so plugins
registered through entry points are consulted first.
"""

from __future__ import annotations

from ckpt.codecs.base import CodecRegistry
from ckpt.codecs.delta import XorDeltaCodec
from ckpt.codecs.zstd import ByteGroupZstdCodec, ZstdCodec
from ckpt.hooks.hookspecs import hookimpl
from ckpt.state.adapters import AdapterRegistry
from ckpt.state.dataloader import DataLoaderAdapter, StatefulDataLoaderAdapter
from ckpt.state.torch_adapters import (
    GeneratorAdapter,
    GradScalerAdapter,
    ModuleAdapter,
    OptimizerAdapter,
    RNGAdapter,
    SchedulerAdapter,
)


@hookimpl(trylast=True)
def ckpt_register_adapters(register: AdapterRegistry) -> None:
    # first match wins: a StatefulDataLoader is a DataLoader
    for adapter in (
        StatefulDataLoaderAdapter(),
        DataLoaderAdapter(),
        ModuleAdapter(),
        OptimizerAdapter(),
        SchedulerAdapter(),
        GradScalerAdapter(),
        GeneratorAdapter(),
        RNGAdapter(),
    ):
        register(adapter)


@hookimpl(trylast=True)
def ckpt_register_codecs(register: CodecRegistry) -> None:
    for codec in (ZstdCodec(), ByteGroupZstdCodec(), XorDeltaCodec()):
        register(codec)
