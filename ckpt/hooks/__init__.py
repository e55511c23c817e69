"""The pluggy hook system: specifications, the plugin-manager factory, core's own implementations."""

from __future__ import annotations

from ckpt.hooks.hookspecs import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec"]
