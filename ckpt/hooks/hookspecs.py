"""Hook specifications of ckpt: what a plugin can provide or observe.

Hooks are called with keyword arguments only. Registration hooks receive a typed
``register`` object; duplicate names fail loudly with :class:`ckpt.PluginError`.
Core's own adapters and codecs are ordinary implementations of these hooks
(``trylast=True``), registered like any plugin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from ckpt.codecs.base import CodecRegistry
    from ckpt.security.providers import KeyProviderRegistry
    from ckpt.state.adapters import AdapterRegistry
    from ckpt.types import CheckpointInfo

hookspec = pluggy.HookspecMarker("ckpt")
hookimpl = pluggy.HookimplMarker("ckpt")


# -- registration ---------------------------------------------------------------------


@hookspec
def ckpt_register_adapters(register: AdapterRegistry) -> None:
    """Register state adapters with ``register(adapter)``.

    Adapters registered first are asked first, so a plugin's adapter for a subclass
    (a ``PeftModel`` is an ``nn.Module``) wins over core's generic one.

    :param register: the registry; a duplicate adapter name raises PluginError naming both.
    """


@hookspec
def ckpt_register_codecs(register: CodecRegistry) -> None:
    """Register byte codecs with ``register(codec)``.

    A codec's name is recorded per object in every manifest, so it must never change
    meaning once data has been written with it.

    :param register: the registry; a duplicate codec name raises PluginError naming both.
    """


@hookspec
def ckpt_register_key_providers(register: KeyProviderRegistry) -> None:
    """Register key providers with ``register(scheme, factory)``.

    ``factory(rest)`` builds the provider that ``SCHEME:REST`` names wherever a key provider
    is given as text (the command line's ``--key-provider kms:alias/ckpt``); it returns an
    object with ``key_id``, ``wrap`` and ``unwrap`` (:class:`ckpt.security.keys.KeyProvider`).
    A provider's ``key_id`` is recorded in every store it wraps a key for, so it must keep
    naming the same key.

    :param register: the registry; a duplicate scheme raises PluginError naming both.
    """


@hookspec
def ckpt_register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``ckpt`` command line.

    :param cli: the root click group; call ``cli.add_command(cmd)``.
    """


# -- lifecycle ------------------------------------------------------------------------


@hookspec
def ckpt_before_save(url: str, step: int, tree: Mapping[str, Any]) -> None:
    """Called before a checkpoint's objects are written.

    :param url: the store URL.
    :param step: the step being saved.
    :param tree: the state tree about to be written (read-only; tensors are not yet copied
        for an asynchronous save, so do not keep references).
    """


@hookspec
def ckpt_after_commit(info: CheckpointInfo) -> None:
    """Called once a checkpoint's manifest and ``refs/latest`` are durable.

    :param info: what was committed (step, URL, raw and stored bytes).
    """


@hookspec
def ckpt_after_restore(info: CheckpointInfo, state: Mapping[str, Any]) -> None:
    """Called after a checkpoint has been loaded into live objects.

    In a collective restore it runs on every rank once every rank has loaded (and on none
    if one rank's load failed), so a hook may run collectives of its own; a hook raising
    on one rank raises on every rank.

    :param info: the checkpoint restored.
    :param state: the user's state mapping, now holding the restored values.
    """
