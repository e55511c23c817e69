"""Built-in adapters for PyTorch objects and the process RNGs.

They are registered through ``ckpt_register_adapters`` like any plugin's (see
:mod:`ckpt.hooks.defaults`), after plugins, so a plugin adapter for a subclass wins.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import torch

from ckpt.errors import StateMismatchError

log = logging.getLogger("ckpt")


def _mismatch(kind: str, exc: Exception) -> StateMismatchError:
    return StateMismatchError(f"checkpoint does not fit this {kind}: {exc}")


class ModuleAdapter:
    """``torch.nn.Module`` <-> its ``state_dict()`` (parameters and buffers, by name)."""

    name = "torch.nn.Module"
    #: restore checks the stored tensors are exactly the live ones before writing any
    exact_tensors = True

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, torch.nn.Module)

    def state(self, obj: torch.nn.Module) -> Mapping[str, Any]:
        return obj.state_dict()

    def load(self, obj: torch.nn.Module, tree: Mapping[str, Any]) -> None:
        try:
            obj.load_state_dict(tree, strict=True)
        except RuntimeError as exc:
            raise _mismatch(f"module {type(obj).__name__}", exc) from None


class OptimizerAdapter:
    """``torch.optim.Optimizer`` <-> its ``state_dict()`` (per-parameter state and param groups)."""

    name = "torch.optim.Optimizer"

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, torch.optim.Optimizer)

    def state(self, obj: torch.optim.Optimizer) -> Mapping[str, Any]:
        return obj.state_dict()

    def load(self, obj: torch.optim.Optimizer, tree: Mapping[str, Any]) -> None:
        try:
            obj.load_state_dict(tree)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise _mismatch(f"optimizer {type(obj).__name__}", exc) from None


class SchedulerAdapter:
    """LR schedulers (``LRScheduler`` and ``ReduceLROnPlateau``)."""

    name = "torch.optim.lr_scheduler"

    def handles(self, obj: Any) -> bool:
        sched = torch.optim.lr_scheduler
        return isinstance(obj, (sched.LRScheduler, sched.ReduceLROnPlateau))

    def state(self, obj: Any) -> Mapping[str, Any]:
        return obj.state_dict()

    def load(self, obj: Any, tree: Mapping[str, Any]) -> None:
        obj.load_state_dict(dict(tree))


class GradScalerAdapter:
    """``torch.amp.GradScaler`` (its state is empty while disabled)."""

    name = "torch.amp.GradScaler"

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, torch.amp.GradScaler)

    def state(self, obj: torch.amp.GradScaler) -> Mapping[str, Any]:
        return obj.state_dict()

    def load(self, obj: torch.amp.GradScaler, tree: Mapping[str, Any]) -> None:
        if tree:  # a disabled scaler saves {} and refuses to load it
            obj.load_state_dict(dict(tree))


class GeneratorAdapter:
    """A ``torch.Generator`` (CPU or CUDA): its state bytes."""

    name = "torch.Generator"

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, torch.Generator)

    def state(self, obj: torch.Generator) -> Mapping[str, Any]:
        return {"device": str(obj.device), "state": obj.get_state()}

    def load(self, obj: torch.Generator, tree: Mapping[str, Any]) -> None:
        obj.set_state(tree["state"])


class RNG:
    """Stands for the process RNGs: ``random``, NumPy's global RNG (if installed), torch's
    CPU generator and the generator of every CUDA device.

    Put an instance in the state (``{"rng": ckpt.RNG()}``) to save and restore them.
    """

    def __repr__(self) -> str:
        return "ckpt.RNG()"


class RNGAdapter:
    name = "ckpt.RNG"

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, RNG)

    def state(self, obj: RNG) -> Mapping[str, Any]:
        tree: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
        try:
            import numpy as np
        except ImportError:  # pragma: no cover - numpy is a dependency, but RNG() must not need it
            pass
        else:
            tree["numpy"] = np.random.get_state(legacy=False)
        if torch.cuda.is_available():
            tree["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        return tree

    def load(self, obj: RNG, tree: Mapping[str, Any]) -> None:
        random.setstate(tree["python"])
        torch.set_rng_state(tree["torch"])
        if "numpy" in tree:
            import numpy as np

            np.random.set_state(tree["numpy"])
        cuda = tree.get("cuda") or []
        if cuda:
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if have < len(cuda):
                log.warning("checkpoint has RNG states of %d CUDA devices, this process sees %d", len(cuda), have)
            for i, state in enumerate(cuda[:have]):
                torch.cuda.set_rng_state(state, i)
