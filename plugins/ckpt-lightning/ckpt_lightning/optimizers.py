"""The live optimizers behind Lightning's ``optimizer_states``, and their first step after a save.

**Which optimizer.** Lightning's checkpoint dict holds ``optimizer.state_dict()`` of each
optimizer, whose tensors are the optimizer's own. A process-wide step pre-hook notes every
optimizer that steps; a save swaps each ``optimizer_states`` entry whose tensors are exactly
one noted optimizer's state for that optimizer. ckpt stores it the same way (its adapter
saves ``state_dict()``) but guards it: its tensors and parameters are copied in the
background, and the Checkpointer's own step pre-hook holds the next ``optimizer.step()``
until the copy is done.

**The first step after a save.** Lightning's automatic optimization calls
``optimizer.step(closure=...)`` and runs ``training_step`` and ``backward`` inside that
closure, so the Checkpointer's hold would come before the forward pass, and the copy could
not overlap it. Forward and backward change neither parameters nor optimizer state, so
the hook here (registered before any Checkpointer's: global pre-hooks run in registration
order) runs the closure first, then lets the step wait for the copy and update, handing the
optimizer the closure's result. Only the first step after a save whose copy is still
running does this, and only with a ``closure`` keyword (not with AMP's scaler, which calls
the closure itself, nor with manual optimization, which passes none).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import ckpt

_stepped: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
#: optimizer -> the save whose copy its next step waits for
_pending: weakref.WeakKeyDictionary[torch.optim.Optimizer, ckpt.SaveHandle] = weakref.WeakKeyDictionary()
_hook: Any = None
_lock = threading.Lock()


def watch() -> None:
    """Install the process-wide step pre-hook (once, before any Checkpointer of this plugin exists)."""
    global _hook
    with _lock:
        if _hook is None:
            _hook = register_optimizer_step_pre_hook(_on_step)


def _on_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> tuple[Any, dict[str, Any]] | None:
    _stepped.add(optimizer)
    handle = _pending.pop(optimizer, None)
    closure = kwargs.get("closure") if isinstance(kwargs, dict) else None
    if handle is None or closure is None or not callable(closure) or handle.wait_staged(0):
        return None
    with torch.enable_grad():  # as the optimizers' own step runs its closure
        first = closure()
    return args, {**kwargs, "closure": _Replay(first, closure)}


class _Replay:
    """The closure's first result once, then the closure itself (LBFGS calls it again)."""

    def __init__(self, first: Any, closure: Callable[[], Any]) -> None:
        self._first: list[Any] = [first]
        self._closure = closure

    def __call__(self) -> Any:
        return self._first.pop() if self._first else self._closure()


def guarding(optimizers: list[Any], handle: ckpt.SaveHandle) -> None:
    """The next step of each of ``optimizers`` (live ones) follows the save ``handle``."""
    for opt in optimizers:
        if isinstance(opt, torch.optim.Optimizer):
            _pending[opt] = handle


def live(states: Any) -> Any:
    """``optimizer_states`` with each entry that is a stepped optimizer's own ``state_dict()``
    replaced by that optimizer."""
    if not isinstance(states, list):
        return states
    by_tensors = {ids: opt for opt in list(_stepped) if (ids := _tensor_ids(opt.state))}
    out: list[Any] = []
    for sd in states:
        ids = _tensor_ids(sd.get("state")) if isinstance(sd, Mapping) else frozenset()
        opt = by_tensors.get(ids) if ids else None
        out.append(opt if opt is not None and _same_groups(opt, sd) else sd)
    return out


def _tensor_ids(state: Any) -> frozenset[int]:
    """The tensors of an optimizer's per-parameter state (``opt.state`` or a state dict's "state")."""
    if not isinstance(state, Mapping):
        return frozenset()
    return frozenset(
        id(v) for s in state.values() if isinstance(s, Mapping) for v in s.values() if isinstance(v, torch.Tensor)
    )


def _same_groups(opt: torch.optim.Optimizer, sd: Mapping[str, Any]) -> bool:
    groups = sd.get("param_groups")
    return isinstance(groups, list) and len(groups) == len(opt.param_groups)
