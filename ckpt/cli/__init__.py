"""The ``ckpt`` command line (entry point ``ckpt = "ckpt.cli:main"``)."""

from __future__ import annotations

from ckpt.cli.app import build_cli, main

__all__ = ["build_cli", "main"]
