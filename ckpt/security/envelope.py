"""The store-level envelope (work in progress; the signatures below are the contract)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckpt.security.keys import Encryption


def rewrap(url: str, old: Encryption, new: Encryption, storage_options: Mapping[str, Any] | None = None) -> None:
    """Rewrap the data key of the encrypted store at ``url`` from ``old``'s key to ``new``'s.

    Rewrites only ``<root>/encryption.json``; no object or manifest changes.
    """
    raise NotImplementedError
