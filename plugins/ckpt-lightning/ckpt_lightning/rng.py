"""The process RNGs of a Lightning checkpoint: applied at load, and again where training resumes.

Lightning saves no RNG state, so the plugin stores ``ckpt.RNG()`` with every checkpoint
(Python's ``random``, NumPy's global RNG, torch's CPU and CUDA generators, as they were
when ``save_checkpoint`` was called).

When to put them back decides bit-exactness. Between ``load_checkpoint`` and the first
training step, a resumed ``fit`` builds the train DataLoader's iterator, which draws from
torch's global RNG (its base seed, and a ``RandomSampler``'s seed when an epoch starts):

* a checkpoint taken **at the end of an epoch**: the uninterrupted run also built the next
  epoch's iterator from the saved state, so the states are applied at load, before the
  iterator is built, and the next epoch's order is the uninterrupted run's;
* a checkpoint taken **mid-epoch**: the uninterrupted run had built its iterator long
  before the save, so the states are applied (again) right before the first training step
  runs: at the first ``optimizer.step()`` (Lightning's automatic optimization calls it
  before ``training_step``, which runs inside it) or the first forward of a module in
  training mode with gradients on, whichever comes first.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import ckpt

log = logging.getLogger("ckpt.lightning")


def apply(states: Mapping[str, Any]) -> None:
    """Set the process RNGs from the tree ``ckpt.RNG()`` saved (as ``ckpt.load`` returns it)."""
    try:
        random.setstate(states["python"])
        torch.set_rng_state(states["torch"])
        if "numpy" in states:
            import numpy as np

            np.random.set_state(states["numpy"])
        cuda = states.get("cuda") or []
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if len(cuda) > have:
            log.warning("checkpoint has RNG states of %d CUDA devices, this process sees %d", len(cuda), have)
        for i, state in enumerate(cuda[:have]):
            torch.cuda.set_rng_state(state, i)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ckpt.StateMismatchError(f"the RNG states of the checkpoint do not fit this process: {exc}") from None


class DeferredRNG:
    """Applies RNG states once, right before the next training step (see the module docstring)."""

    def __init__(self) -> None:
        self._states: Mapping[str, Any] | None = None
        self._handles: list[Any] = []

    @property
    def armed(self) -> bool:
        return self._states is not None

    def arm(self, states: Mapping[str, Any]) -> None:
        self.disarm()
        self._states = states
        self._handles = [
            register_optimizer_step_pre_hook(self._on_step),
            torch.nn.modules.module.register_module_forward_pre_hook(self._on_forward),
        ]

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._states = None

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._fire()

    def _on_forward(self, module: torch.nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self._fire()

    def _fire(self) -> None:
        states = self._states
        self.disarm()
        if states is not None:
            apply(states)
