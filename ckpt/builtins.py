"""Core's own hook implementations: the built-in adapters and codecs.

Registered by the plugin-manager factory exactly like a plugin, ``trylast`` so plugins
registered through entry points are consulted first.
"""

from __future__ import annotations

from ckpt.hookspecs import hookimpl


@hookimpl(trylast=True)
def ckpt_register_adapters(register) -> None:
    from ckpt.torch_adapters import builtin_adapters

    for adapter in builtin_adapters():
        register(adapter)


@hookimpl(trylast=True)
def ckpt_register_codecs(register) -> None:
    from ckpt.codecs import builtin_codecs

    for codec in builtin_codecs():
        register(codec)
