"""Core's own hook implementations: the built-in adapters, codecs and key providers.

Registered by the plugin-manager factory exactly like a plugin, ``trylast`` so plugins
registered through entry points are consulted first. The adapters and codecs are
imported inside the hooks: building the plugin manager (``ckpt plugins``, ``ckpt --help``)
must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckpt.hooks.hookspecs import hookimpl

if TYPE_CHECKING:
    from ckpt.codecs.base import CodecRegistry
    from ckpt.security.providers import KeyProviderRegistry
    from ckpt.state.adapters import AdapterRegistry


@hookimpl(trylast=True)
def ckpt_register_adapters(register: AdapterRegistry) -> None:
    from ckpt.state.dataloader import DataLoaderAdapter, StatefulDataLoaderAdapter
    from ckpt.state.torch_adapters import (
        GeneratorAdapter,
        GradScalerAdapter,
        ModuleAdapter,
        OptimizerAdapter,
        RNGAdapter,
        SchedulerAdapter,
    )

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
    from ckpt.codecs.crypto import AesGcmCodec
    from ckpt.codecs.delta import XorDeltaCodec
    from ckpt.codecs.zstd import ByteGroupZstdCodec, ZstdCodec

    for codec in (ZstdCodec(), ByteGroupZstdCodec(), XorDeltaCodec(), AesGcmCodec()):
        register(codec)


@hookimpl(trylast=True)
def ckpt_register_key_providers(register: KeyProviderRegistry) -> None:
    from ckpt.security.providers import KeyFileProvider, kms_from_spec

    register("file", KeyFileProvider)  # file:/etc/ckpt/key
    register("kms", kms_from_spec)  # kms:alias/ckpt?region=eu-west-1 (boto3 on first use)
