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

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ckpt.errors import StateMismatchError

log = logging.getLogger("ckpt")


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


def capture_states() -> dict[str, Any]:
    """The process RNG states as a state tree (tensors and JSON values only)."""
    tree: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tree["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return tree


def _mismatch(what: str, detail: Any) -> StateMismatchError:
    return StateMismatchError(f"checkpoint does not fit the {what}: {detail}")


def _check_bytes(what: str, state: Any, like: torch.Tensor) -> None:
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.shape != like.shape:
        got = f"{state.dtype}{list(state.shape)}" if isinstance(state, torch.Tensor) else type(state).__name__
        raise _mismatch(what, f"its state is {got}, expected uint8{list(like.shape)}")


def check_states(tree: Any) -> None:
    """Refuse states the process RNGs cannot take, trying each on a throw-away generator."""
    if not isinstance(tree, Mapping) or not {"python", "numpy", "torch"} <= set(tree):
        raise _mismatch("process RNGs", "python, numpy and torch states are required")
    try:
        random.Random().setstate(tree["python"])
    except (TypeError, ValueError) as exc:
        raise _mismatch("Python RNG", exc) from None
    try:
        np.random.RandomState().set_state(tree["numpy"])
    except (TypeError, ValueError, KeyError) as exc:
        raise _mismatch("NumPy global RNG", exc) from None
    _check_bytes("torch CPU RNG", tree["torch"], torch.get_rng_state())
    cuda = tree.get("cuda") or []
    if not isinstance(cuda, list):
        raise _mismatch("CUDA RNGs", "not a list of states")
    for i, state in enumerate(cuda[: torch.cuda.device_count() if torch.cuda.is_available() else 0]):
        _check_bytes(f"CUDA RNG {i}", state, torch.cuda.get_rng_state(i))


def apply_states(tree: Mapping[str, Any]) -> None:
    random.setstate(tree["python"])
    np.random.set_state(tree["numpy"])
    torch.set_rng_state(tree["torch"])
    cuda = tree.get("cuda") or []
    if cuda:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < len(cuda):
            log.warning("checkpoint has RNG states of %d CUDA devices, this process sees %d", len(cuda), have)
        for i, state in enumerate(cuda[:have]):
            torch.cuda.set_rng_state(state, i)


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
