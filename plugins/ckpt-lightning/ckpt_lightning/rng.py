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

A resume Lightning refuses must leave the process RNGs as they were, as it does with its
default ``TorchCheckpointIO`` (which restores none). Lightning checks the checkpoint only
after ``load_checkpoint`` returned (``load_state_dict`` of the module, then of the
optimizers), and nothing it calls on a ``CheckpointIO`` falls between that check and the
train DataLoader's iterator, which must already see the restored states at an epoch end.
So the states are applied at load, and the ones they replaced are kept until training
resumes (the first ``optimizer.step()``): a run that fails before then, as a refused
resume does, gets them back when Lightning tears it down (:meth:`DeferredRNG.undo`).
"""

from __future__ import annotations

import logging
import random
import sys
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


def capture(like: Mapping[str, Any]) -> dict[str, Any]:
    """The process RNG states :func:`apply` would replace with ``like``, in the form it takes."""
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if "numpy" in like:
        import numpy as np

        states["numpy"] = np.random.get_state()
    cuda = like.get("cuda")
    wanted = len(cuda) if isinstance(cuda, (list, tuple)) else 0
    if wanted and torch.cuda.is_available():
        states["cuda"] = [torch.cuda.get_rng_state(i) for i in range(min(wanted, torch.cuda.device_count()))]
    return states


class DeferredRNG:
    """The RNG states of the checkpoint just loaded, until training resumes (see the module docstring).

    :meth:`arm` is given the states applied at load and those they replaced. At the next
    training step (the first ``optimizer.step()``, or with ``reapply`` the first forward of
    a module in training mode with gradients on, whichever comes first) the states are
    applied again when ``reapply``, and the replaced ones are dropped: training has resumed.
    """

    def __init__(self) -> None:
        self._states: Mapping[str, Any] | None = None
        self._previous: Mapping[str, Any] | None = None
        self._reapply = False
        #: the exception being handled when the states were applied (not one of the run's)
        self._handling: BaseException | None = None
        self._handles: list[Any] = []

    @property
    def armed(self) -> bool:
        """Whether the states of a checkpoint wait to be applied again at the next training step."""
        return self._states is not None and self._reapply

    def arm(self, states: Mapping[str, Any], previous: Mapping[str, Any], *, reapply: bool) -> None:
        """``states`` were just applied in place of ``previous``; ``reapply``: apply them again
        right before the next training step."""
        if self._previous is not None:  # loaded twice before training: the first load replaced the run's
            previous = self._previous
        self.disarm()
        self._states, self._previous, self._reapply = states, previous, reapply
        self._handling = sys.exc_info()[1]
        self._handles = [register_optimizer_step_pre_hook(self._on_step)]
        if reapply:
            self._handles.append(torch.nn.modules.module.register_module_forward_pre_hook(self._on_forward))

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._states = self._previous = self._handling = None
        self._reapply = False

    def undo(self, failing: BaseException | None) -> None:
        """At teardown: when the run is failing with ``failing`` (an exception raised since
        the load) and training never resumed since the load, put back the states the load
        replaced; then disarm."""
        previous, handling = self._previous, self._handling
        self.disarm()
        if previous is not None and failing is not None and failing is not handling:
            log.debug("the run failed before training resumed: the process RNGs are put back")
            apply(previous)

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._fire()

    def _on_forward(self, module: torch.nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self._fire()

    def _fire(self) -> None:
        states, reapply = self._states, self._reapply
        self.disarm()
        if states is not None and reapply:
            apply(states)
