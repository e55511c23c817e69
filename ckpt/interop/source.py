"""What an import reads from: a checkpoint file or directory, planned first, then streamed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class Source:
    """A checkpoint file or directory to import: plan() first, then tensors() lazily."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def plan(self) -> tuple[Any, dict[str, int], dict[str, str], dict[str, Any]]:
        """(encoded tree, {path: nbytes}, adapters, manifest meta)."""
        raise NotImplementedError

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError
