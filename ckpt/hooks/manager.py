"""The plugin manager factory and a typed facade over its hooks.

:func:`make_plugin_manager` builds a fresh manager every time it is called: hookspecs,
blocked names from ``CKPT_DISABLE_PLUGINS``, core's built-ins, then every ``ckpt``
entry point (named after its distribution), then ``check_pending()``.
:func:`get_plugins` caches one :class:`Plugins` per value of ``CKPT_DISABLE_PLUGINS``;
nothing is loaded at import time.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from ckpt import config
from ckpt.codecs.base import CodecRegistry
from ckpt.errors import CheckpointError, PluginError
from ckpt.hooks import defaults, hookspecs
from ckpt.security.providers import KeyProviderRegistry
from ckpt.state.adapters import AdapterRegistry

if TYPE_CHECKING:
    import click

    from ckpt.security.keys import KeyProvider
    from ckpt.types import CheckpointInfo

PROJECT = "ckpt"
BUILTIN = "ckpt.hooks.defaults"


def make_plugin_manager(*, load_entrypoints: bool = True) -> pluggy.PluginManager:
    """A new plugin manager with core's built-ins and (by default) every installed plugin."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in config.disabled_plugins():
        pm.set_blocked(name)
    pm.register(defaults, name=BUILTIN)
    if load_entrypoints:
        try:
            pm.load_setuptools_entrypoints(PROJECT)
        except Exception as exc:  # a broken third-party plugin must say who it is
            raise PluginError(
                f"failed to load the 'ckpt' entry-point plugin {_failed_entry_point(pm)!r}: {exc!r}"
            ) from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {pm.get_name(exc.plugin)!r}: {exc}") from exc
    return pm


def _failed_entry_point(pm: pluggy.PluginManager) -> str:
    """The entry point pluggy was loading when it failed: the first one not registered,
    in the order pluggy walks them."""
    import importlib.metadata

    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == PROJECT and not pm.has_plugin(ep.name) and not pm.is_blocked(ep.name):
                return ep.name
    return "?"


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin, as ``ckpt plugins`` prints it."""

    name: str
    version: str | None
    hooks: tuple[str, ...]


class Plugins:
    """Typed facade over ``pm.hook``: what core calls, with keyword arguments."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.codecs = CodecRegistry()
        self._run_registration("ckpt_register_codecs", self.codecs)
        self.key_providers = KeyProviderRegistry()
        self._run_registration("ckpt_register_key_providers", self.key_providers)
        self._adapters: AdapterRegistry | None = None
        self._adapters_lock = threading.RLock()  # a plugin may look adapters up while registering
        #: a plugin's distribution version, by its name (with the plugin it is of): read from
        #: its metadata once, not on every save's manifest (a parse of its METADATA, ~0.3 ms)
        self._dist_versions: dict[str, tuple[object, str | None]] = {}

    @property
    def adapters(self) -> AdapterRegistry:
        """The adapter registry, filled on first use: the built-in adapters import torch,
        which the command line's read-only commands never need."""
        with self._adapters_lock:
            if self._adapters is None:
                registry = AdapterRegistry()
                self._run_registration("ckpt_register_adapters", registry)
                self._adapters = registry
            return self._adapters

    def _run_registration(
        self, hook_name: str, registry: AdapterRegistry | CodecRegistry | KeyProviderRegistry
    ) -> None:
        # Called implementation by implementation (in pluggy's call order) so a duplicate
        # name can be blamed on the plugin that registered it. That bypasses pluggy's call
        # loop, so a wrapper would never run: refused before anything registers.
        caller = getattr(self.pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            if impl.wrapper or impl.hookwrapper:
                kind = "wrapper=True" if impl.wrapper else "hookwrapper=True"
                raise PluginError(
                    f"plugin {impl.plugin_name!r} implements {hook_name} with {kind}: registration hooks "
                    "take plain implementations only (drop the wrapper option and register directly)"
                )
        for impl in reversed(caller.get_hookimpls()):
            registry.current_plugin = impl.plugin_name
            try:
                impl.function(register=registry)
            except CheckpointError:
                raise
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin_name!r} failed in {hook_name}: {exc!r}") from exc
        registry.current_plugin = "?"

    # -- lifecycle ---------------------------------------------------------------------
    def before_save(self, *, url: str, step: int, tree: Mapping[str, Any]) -> None:
        self.pm.hook.ckpt_before_save(url=url, step=step, tree=tree)

    def after_commit(self, *, info: CheckpointInfo) -> None:
        self.pm.hook.ckpt_after_commit(info=info)

    def after_restore(self, *, info: CheckpointInfo, state: Mapping[str, Any]) -> None:
        self.pm.hook.ckpt_after_restore(info=info, state=state)

    def register_commands(self, *, cli: click.Group) -> None:
        self.pm.hook.ckpt_register_commands(cli=cli)

    def key_provider(self, spec: str) -> KeyProvider:
        """The key provider a ``SCHEME:VALUE`` spec names (``file:/etc/ckpt.key``, ``kms:alias/ckpt``)."""
        return self.key_providers.resolve(spec)

    # -- introspection -----------------------------------------------------------------
    def info(self) -> list[PluginInfo]:
        dists = {id(plugin): dist for plugin, dist in self.pm.list_plugin_distinfo()}
        out = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:  # blocked
                continue
            dist = dists.get(id(plugin))
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or ()))
            version = self._dist_version(name, plugin, dist) if dist is not None else _core_version()
            out.append(PluginInfo(name=name, version=version, hooks=hooks))
        return out

    def _dist_version(self, name: str, plugin: object, dist: Any) -> str | None:
        known = self._dist_versions.get(name)
        if known is not None and known[0] is plugin:
            return known[1]
        version: str | None = dist.version  # None for metadata without a Version field
        self._dist_versions[name] = (plugin, version)
        return version

    def versions(self) -> dict[str, str]:
        """Name -> version of every loaded plugin, recorded in each manifest."""
        return {p.name: p.version or "" for p in self.info()}


def _core_version() -> str:
    from ckpt.version import __version__

    return __version__


@functools.lru_cache(maxsize=8)
def _plugins_for(disabled: frozenset[str]) -> Plugins:
    return Plugins(make_plugin_manager())


def get_plugins(*, adapters: bool = True) -> Plugins:
    """The plugins for the current ``CKPT_DISABLE_PLUGINS`` (built on first use).

    ``adapters=False`` leaves the adapter registry to be filled on first use (it imports
    torch): the command line's read-only commands pass it. By default a plugin's bad
    adapter registration fails here, not at its first use.
    """
    plugins = _plugins_for(frozenset(config.disabled_plugins()))
    if adapters:
        plugins.adapters  # noqa: B018 - fills the registry, raising a plugin's registration error now
    return plugins


def reset_plugins() -> None:
    """Forget cached managers (after installing a plugin in-process, and in tests)."""
    _plugins_for.cache_clear()
