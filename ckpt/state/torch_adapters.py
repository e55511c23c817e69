"""Built-in adapters for PyTorch objects and the process RNGs.

They are registered through ``ckpt_register_adapters`` like any plugin's (see
:mod:`ckpt.hooks.defaults`), after plugins, so a plugin adapter for a subclass wins.
"""

from __future__ import annotations

import copy
import logging
import random
import types
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import torch

from ckpt.errors import StateMismatchError

log = logging.getLogger("ckpt")


def _mismatch(kind: str, exc: Exception | str) -> StateMismatchError:
    return StateMismatchError(f"checkpoint does not fit this {kind}: {exc}")


def _meta_twin(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """An optimizer of ``opt``'s class over meta-device copies of its parameters (no memory),
    so ``load_state_dict`` can be tried on it without touching ``opt``."""
    twin = type(opt).__new__(type(opt))
    groups = [{**g, "params": [torch.empty_like(p, device="meta") for p in g["params"]]} for g in opt.param_groups]
    torch.optim.Optimizer.__init__(twin, groups, dict(opt.defaults))
    return twin


def check_tensor(path: str, live: torch.Tensor, value: Any) -> None:
    """A stored value a live tensor can take in place: a tensor (or array) of its shape and dtype."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value) if value.dtype.isnative else None
    if not isinstance(value, torch.Tensor):
        raise StateMismatchError(f"{path!r}: the live object is a tensor, the checkpoint holds {type(value).__name__}")
    if value.shape != live.shape or value.dtype != live.dtype:
        raise StateMismatchError(
            f"{path!r}: the checkpoint holds {value.dtype}{list(value.shape)}, the live tensor is {live.dtype}{list(live.shape)}"
        )


class ModuleAdapter:
    """``torch.nn.Module`` <-> its ``state_dict()`` (parameters and buffers, by name).

    A ``torch.compile``'d module is saved and loaded through the module it wraps, so its
    keys carry no ``_orig_mod.`` prefix: a checkpoint of a compiled model restores into
    the plain one and the other way round.
    """

    name = "torch.nn.Module"
    #: restore checks the stored tensors are exactly the live ones before writing any
    exact_tensors = True
    #: check() reads shapes and dtypes, never values: the tensors may be decoded in place
    checks_tensor_values = False

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, torch.nn.Module)

    def state(self, obj: torch.nn.Module) -> Mapping[str, Any]:
        return _uncompiled(obj).state_dict()

    def check(self, obj: torch.nn.Module, tree: Mapping[str, Any], strict: bool = True) -> None:
        # restore checked the manifest's tensors against the live ones; this checks what the
        # tree actually hands each name (a hostile tree may point a name at another tensor,
        # or drop one), because load_state_dict copies before it reports missing keys
        kind = f"module {type(obj).__name__}"
        if not isinstance(tree, Mapping):
            raise _mismatch(kind, f"its state is a {type(tree).__name__}, not a mapping")
        live = _uncompiled(obj).state_dict()
        if strict:
            missing = [k for k in live if k not in tree]
            unexpected = [k for k in tree if k not in live]
            if missing or unexpected:
                raise _mismatch(kind, f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        for name, value in tree.items():
            target = live.get(name)
            if isinstance(target, torch.Tensor):
                check_tensor(f"{type(obj).__name__}.{name}", target, value)

    def load(self, obj: torch.nn.Module, tree: Mapping[str, Any], strict: bool = True) -> None:
        module = _uncompiled(obj)
        try:
            module.load_state_dict(tree, strict=strict)
        except RuntimeError as exc:
            raise _mismatch(f"module {type(module).__name__}", exc) from None


def _uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) stands for, else itself."""
    inner = getattr(module, "_orig_mod", None)
    if isinstance(inner, torch.nn.Module) and type(module).__name__ == "OptimizedModule":
        return inner
    return module


class OptimizerAdapter:
    """``torch.optim.Optimizer`` <-> its ``state_dict()`` (per-parameter state and param groups)."""

    name = "torch.optim.Optimizer"
    #: the checkpoint records the optimizer's class; restoring AdamW state into SGD is refused
    exact_class = True
    #: check() loads the state into a twin over meta tensors: no value is read
    checks_tensor_values = False

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, torch.optim.Optimizer)

    def state(self, obj: torch.optim.Optimizer) -> Mapping[str, Any]:
        return obj.state_dict()

    def check(self, obj: torch.optim.Optimizer, tree: Mapping[str, Any]) -> None:
        # torch validates and casts in load_state_dict; a twin over meta tensors takes the
        # same path (group sizes, state keys, value types) without memory or side effects.
        kind = f"optimizer {type(obj).__name__}"
        if not isinstance(tree, Mapping) or not isinstance(tree.get("param_groups"), list):
            raise _mismatch(kind, "no param_groups list")
        if not isinstance(tree.get("state"), Mapping):
            raise _mismatch(kind, "no state mapping")
        try:
            twin = _meta_twin(obj)
        except Exception as exc:  # noqa: BLE001 - an optimizer built unlike torch's: structural checks only
            log.debug("cannot build a meta twin of %s (%s); checking structure only", kind, exc)
            _check_groups(kind, obj, tree)
            return
        try:
            twin.load_state_dict(dict(tree))
        except Exception as exc:  # noqa: BLE001 - whatever torch raises, the live optimizer is untouched
            raise _mismatch(kind, f"{type(exc).__name__}: {exc}") from None
        if type(obj) in _PARAM_SHAPED_STATE:
            _check_state_shapes(kind, twin)

    def load(self, obj: torch.optim.Optimizer, tree: Mapping[str, Any]) -> None:
        try:
            obj.load_state_dict(cast("dict[str, Any]", tree))  # decoded trees are dicts
        except (ValueError, KeyError, RuntimeError) as exc:
            raise _mismatch(f"optimizer {type(obj).__name__}", exc) from None


#: torch's optimizers whose per-parameter state tensors all have their parameter's shape,
#: scalars aside (``step``, ASGD's ``eta`` and ``mu``). Exact classes: a subclass may keep
#: state of other shapes, as Adafactor's factored moments and LBFGS's flat history do.
_PARAM_SHAPED_STATE = frozenset(
    getattr(torch.optim, name)
    for name in (
        "SGD",
        "Adam",
        "AdamW",
        "Adagrad",
        "Adadelta",
        "Adamax",
        "ASGD",
        "NAdam",
        "RAdam",
        "RMSprop",
        "Rprop",
        "SparseAdam",
    )
    if hasattr(torch.optim, name)
)


def _check_state_shapes(kind: str, twin: torch.optim.Optimizer) -> None:
    """Each state tensor ``twin`` (loaded with the checkpoint) holds has its parameter's shape.

    torch's ``load_state_dict`` compares no shapes: state of another model's parameters
    loads into an optimizer that has not stepped yet (the usual resume) and fails at its
    first step instead, or worse, broadcasts."""
    index = {p: i for i, p in enumerate(p for g in twin.param_groups for p in g["params"])}
    for param, state in twin.state.items():
        if not isinstance(state, Mapping) or not isinstance(param, torch.Tensor):
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                raise _mismatch(
                    kind,
                    f"state {index.get(param, '?')}/{key} has shape {list(value.shape)}, "
                    f"its parameter {list(param.shape)}",
                )


def _check_groups(kind: str, obj: torch.optim.Optimizer, tree: Mapping[str, Any]) -> None:
    groups = tree["param_groups"]
    if len(groups) != len(obj.param_groups):
        raise _mismatch(kind, f"{len(groups)} parameter groups stored, {len(obj.param_groups)} live")
    ids: set[Any] = set()
    for i, (saved, live) in enumerate(zip(groups, obj.param_groups)):
        params = saved.get("params") if isinstance(saved, Mapping) else None
        if not isinstance(params, list) or len(params) != len(live["params"]):
            raise _mismatch(kind, f"parameter group {i} does not hold {len(live['params'])} parameters")
        ids.update(params)
    stray = [k for k in tree["state"] if k not in ids]
    if stray:
        raise _mismatch(kind, f"state for parameter {stray[0]!r} that no group names")


class SchedulerAdapter:
    """LR schedulers (``LRScheduler`` and ``ReduceLROnPlateau``)."""

    name = "torch.optim.lr_scheduler"
    exact_class = True

    def handles(self, obj: Any) -> bool:
        sched = torch.optim.lr_scheduler
        return isinstance(obj, (sched.LRScheduler, sched.ReduceLROnPlateau))

    def state(self, obj: Any) -> Mapping[str, Any]:
        return obj.state_dict()

    def check(self, obj: Any, tree: Mapping[str, Any]) -> None:
        # load_state_dict is a __dict__.update followed by checks: try it on a shallow twin
        # so a refusal leaves the live scheduler as it was
        kind = f"scheduler {type(obj).__name__}"
        if not isinstance(tree, Mapping) or not all(isinstance(k, str) for k in tree):
            raise _mismatch(kind, "its state is not a mapping of names")
        live = obj.state_dict()
        unexpected = sorted(k for k in tree if k not in live)
        if unexpected:
            raise _mismatch(kind, f"the checkpoint holds {unexpected[:5]}, which it does not have")
        lambdas = tree.get("lr_lambdas")
        if lambdas is not None and (not isinstance(lambdas, list) or len(lambdas) != len(live.get("lr_lambdas") or [])):
            raise _mismatch(kind, "lr_lambdas do not match its parameter groups")
        twin = _scheduler_twin(obj)
        try:
            twin.load_state_dict(dict(tree))
        except Exception as exc:  # noqa: BLE001 - whatever the scheduler raises, the live one is untouched
            raise _mismatch(kind, f"{type(exc).__name__}: {exc}") from None

    def load(self, obj: Any, tree: Mapping[str, Any]) -> None:
        obj.load_state_dict(dict(tree))


def _scheduler_twin(obj: Any) -> Any:
    """A copy of scheduler ``obj`` whose ``load_state_dict`` changes nothing of ``obj``.

    Loading is a ``__dict__.update`` of the scheduler, which a shallow copy takes alone, and
    then writes into what the copy shares with ``obj``: ``SequentialLR`` and
    ``ChainedScheduler`` load each of their schedulers (twinned here in turn), ``LambdaLR``
    and ``MultiplicativeLR`` update their lambdas' ``__dict__``, ``CyclicLR`` its custom
    ``scale_fn``'s (each a copy here, see :func:`_own_copy`)."""
    twin = copy.copy(obj)
    inner = getattr(obj, "_schedulers", None)
    if isinstance(inner, (list, tuple)):
        twin._schedulers = [_scheduler_twin(s) for s in inner]
    lambdas = getattr(obj, "lr_lambdas", None)
    if isinstance(lambdas, (list, tuple)):
        twin.lr_lambdas = [_own_copy(f) for f in lambdas]
    if getattr(obj, "_scale_fn_custom", None) is not None:
        twin._scale_fn_custom = _own_copy(obj._scale_fn_custom)
    return twin


def _own_copy(fn: Any) -> Any:
    """What a scheduler's twin may load a callable's saved ``__dict__`` into: a copy of it,
    or a blank stand-in for a function (whose state torch does not save) or for an object
    that cannot be copied (loading only updates its ``__dict__``)."""
    if isinstance(fn, types.FunctionType):
        return types.SimpleNamespace()
    try:
        return copy.copy(fn)
    except Exception:  # noqa: BLE001 - any object may refuse copying; the stand-in takes the load as well
        return types.SimpleNamespace()


#: what an enabled GradScaler's state_dict holds, and the types it takes
_SCALER_FIELDS = {
    "scale": float,
    "growth_factor": float,
    "backoff_factor": float,
    "growth_interval": int,
    "_growth_tracker": int,
}


class GradScalerAdapter:
    """``torch.amp.GradScaler`` (its state is empty while disabled)."""

    name = "torch.amp.GradScaler"

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, torch.amp.GradScaler)

    def state(self, obj: torch.amp.GradScaler) -> Mapping[str, Any]:
        return obj.state_dict()

    def check(self, obj: torch.amp.GradScaler, tree: Mapping[str, Any]) -> None:
        kind = "GradScaler"
        if not isinstance(tree, Mapping):
            raise _mismatch(kind, "its state is not a mapping")
        enabled = obj.is_enabled()
        if bool(tree) != enabled:
            saved = "an enabled" if tree else "a disabled"
            live = "enabled" if enabled else "disabled"
            raise _mismatch(kind, f"the checkpoint holds {saved} scaler's state, the live scaler is {live}")
        for name, kind_of in _SCALER_FIELDS.items() if tree else ():
            value = tree.get(name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or (kind_of is int and not isinstance(value, int)):
                raise _mismatch(kind, f"{name} is {value!r}, expected a {kind_of.__name__}")

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

    def check(self, obj: torch.Generator, tree: Mapping[str, Any]) -> None:
        _check_rng_bytes(
            f"generator on {obj.device}",
            tree.get("state") if isinstance(tree, Mapping) else None,
            obj.get_state(),
            obj.device,
        )

    def load(self, obj: torch.Generator, tree: Mapping[str, Any]) -> None:
        obj.set_state(tree["state"])


def _check_rng_bytes(kind: str, state: Any, like: torch.Tensor, device: torch.device | str | None = "cpu") -> None:
    """``state`` fits a generator whose state is like ``like``: uint8 of its shape, and taken
    by a throw-away generator on ``device`` (None: not tried), which checks the contents
    (an mt19937 state that is not one is refused there, not by the live generator)."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.shape != like.shape:
        got = f"{state.dtype}{list(state.shape)}" if isinstance(state, torch.Tensor) else type(state).__name__
        raise _mismatch(kind, f"its state is {got}, expected uint8{list(like.shape)}")
    if device is not None:
        try:
            torch.Generator(device=device).set_state(state)
        except (RuntimeError, ValueError) as exc:
            raise _mismatch(kind, f"its state is not one ({exc})") from None


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

    def check(self, obj: RNG, tree: Mapping[str, Any]) -> None:
        # Each state is tried on a throw-away generator of its kind: the process RNGs only
        # change in load(), once everything fits.
        if not isinstance(tree, Mapping) or "python" not in tree or "torch" not in tree:
            raise _mismatch("process RNGs", "python and torch states are required")
        try:
            random.Random().setstate(tree["python"])
        except (TypeError, ValueError) as exc:
            raise _mismatch("Python random", exc) from None
        _check_rng_bytes("torch CPU RNG", tree["torch"], torch.get_rng_state())
        if "numpy" in tree:
            import numpy as np

            try:
                np.random.RandomState().set_state(tree["numpy"])
            except (TypeError, ValueError, KeyError) as exc:
                raise _mismatch("NumPy global RNG", exc) from None
        cuda = tree.get("cuda") or []
        if not isinstance(cuda, list):
            raise _mismatch("CUDA RNGs", "not a list of states")
        for i, state in enumerate(cuda[: torch.cuda.device_count() if torch.cuda.is_available() else 0]):
            _check_rng_bytes(f"CUDA RNG {i}", state, torch.cuda.get_rng_state(i), f"cuda:{i}")

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
