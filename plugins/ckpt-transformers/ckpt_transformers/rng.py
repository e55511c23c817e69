"""The process RNGs of a Trainer run: captured at save, applied when the Trainer asks.

The Trainer restores its RNGs late: after it has skipped the batches a resumed epoch had
already consumed (creating the data iterator draws from torch's RNG), right before the
first step it trains. So the state holds a :class:`TrainerRNG`, whose adapter captures
the process RNGs on save (the same tree as ``ckpt.RNG``: Python, NumPy, torch CPU and
every CUDA device) but on restore only checks the states and keeps them in the holder;
:meth:`TrainerRNG.apply` sets them when the Trainer calls ``_load_rng_state``.

Nothing here imports transformers: the adapter is registered whenever ckpt loads its
plugins.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckpt import RNG
from ckpt.errors import StateMismatchError
from ckpt.state.torch_adapters import RNGAdapter


class TrainerRNG:
    """Stands for the process RNGs in a Trainer's checkpoint; holds restored states until :meth:`apply`."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def apply(self) -> bool:
        """Set the process RNGs to the restored states (once); False when nothing was restored."""
        tree, self.pending = self.pending, None
        if tree is None:
            return False
        apply_states(tree)
        return True

    def __repr__(self) -> str:
        return f"TrainerRNG(pending={self.pending is not None})"


#: core's adapter of the process RNGs (``ckpt.RNG``): the same tree, checks and load
_PROCESS = RNGAdapter()


def capture_states() -> dict[str, Any]:
    """The process RNG states as a state tree (tensors and JSON values only)."""
    return dict(_PROCESS.state(RNG()))


def check_states(tree: Any) -> None:
    """Refuse states the process RNGs cannot take (the Trainer saves NumPy's too)."""
    if not isinstance(tree, Mapping) or not {"python", "numpy", "torch"} <= set(tree):
        raise StateMismatchError(
            "checkpoint does not fit the process RNGs: python, numpy and torch states are required"
        )
    _PROCESS.check(RNG(), tree)


def apply_states(tree: Mapping[str, Any]) -> None:
    _PROCESS.load(RNG(), tree)


class TrainerRNGAdapter:
    """``TrainerRNG`` <-> the process RNG states; restore defers setting them to :meth:`TrainerRNG.apply`."""

    name = "transformers.TrainerRNG"

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, TrainerRNG)

    def state(self, obj: TrainerRNG) -> Mapping[str, Any]:
        return capture_states()

    def check(self, obj: TrainerRNG, tree: Mapping[str, Any]) -> None:
        check_states(tree)

    def load(self, obj: TrainerRNG, tree: Mapping[str, Any]) -> None:
        obj.pending = dict(tree)
