"""The ``peft.PeftModel`` adapter.

State tree::

    {"peft": {"adapters": {name: config as JSON}, "active": [names]},
     "base": {state-dict key: tensor, ...},      # frozen base weights: deduplicated
     "adapter": {state-dict key: tensor, ...}}   # the adapters' own weights

The split is by state-dict key (a key belongs to an adapter when one of its dotted
components is that adapter's name, as in ``...query.lora_A.default.weight``); it makes
a checkpoint legible, while the bytes saved come from ckpt's content addressing: the
base tensors hash to the objects the first checkpoint wrote.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Mapping
from typing import Any

import torch

from ckpt.errors import StateMismatchError
from ckpt.state.torch_adapters import check_tensor

#: config fields that describe where or how a model was made, not its shape
_VOLATILE = frozenset(
    {"peft_version", "base_model_name_or_path", "revision", "inference_mode", "runtime_config", "auto_mapping"}
)


def _jsonable(value: Any) -> Any:
    """A config value as plain JSON (sets sorted, enums by value, dataclasses as dicts)."""
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return type(value).__qualname__  # opaque objects: their kind is what can be compared


def config_doc(config: Any) -> dict[str, Any]:
    """The comparable JSON form of a ``PeftConfig``."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    return {k: _jsonable(v) for k, v in sorted(raw.items()) if k not in _VOLATILE}


def _active(model: Any) -> list[str]:
    active = getattr(model, "active_adapters", None)
    if active is None:
        active = getattr(model, "active_adapter", [])
    return [active] if isinstance(active, str) else list(active)


def _is_adapter_key(key: str, names: set[str]) -> bool:
    return any(part in names for part in key.split("."))


class PeftModelAdapter:
    """``peft.PeftModel`` <-> {peft configs, base weights, adapter weights}."""

    name = "peft.PeftModel"
    #: restore checks the stored tensors are exactly the live ones before writing any
    exact_tensors = True
    #: check() reads shapes, dtypes and configs, never tensor values: the tensors may be
    #: decoded in place, so it refuses everything load() would
    checks_tensor_values = False

    def handles(self, obj: Any) -> bool:
        peft = sys.modules.get("peft")  # no peft imported: obj cannot be a PeftModel
        return peft is not None and isinstance(obj, peft.PeftModel)

    def state(self, obj: Any) -> Mapping[str, Any]:
        names = set(obj.peft_config)
        state = obj.state_dict()
        return {
            "peft": {
                "adapters": {n: config_doc(c) for n, c in sorted(obj.peft_config.items())},
                "active": _active(obj),
            },
            "base": {k: v for k, v in state.items() if not _is_adapter_key(k, names)},
            "adapter": {k: v for k, v in state.items() if _is_adapter_key(k, names)},
        }

    def check(self, obj: Any, tree: Mapping[str, Any], strict: bool = True) -> None:
        """Refuse ``tree`` before anything live changes (restore's first pass).

        A restore may decode this model's tensors straight into the live ones between
        ``check`` and :meth:`load`, so every ground :meth:`load` has to refuse is here:
        the tree's layout, the adapters and their configs (a same-shaped LoRA with another
        ``lora_alpha`` or dropout differs only there), the active adapters, and the
        state-dict keys (all of them with ``strict``, as ``load_state_dict`` wants) with
        each tensor's shape and dtype. The configs must match with ``strict=False`` too:
        weights trained under one scaling are not a partial state of another. Only shapes,
        dtypes and structure are read, never tensor values.
        """
        kind = type(obj).__name__
        if not isinstance(tree, Mapping):
            raise StateMismatchError(f"{kind}: its state is a {type(tree).__name__}, not a mapping")
        meta = tree.get("peft")
        if not isinstance(meta, Mapping) or not isinstance(meta.get("adapters"), Mapping):
            raise StateMismatchError(f"{kind}: the checkpoint holds no peft adapter configs")
        for part in ("base", "adapter"):
            if not isinstance(tree.get(part), Mapping):
                raise StateMismatchError(f"{kind}: the checkpoint's {part!r} weights are not a mapping")
        saved = meta["adapters"]
        live = {n: config_doc(c) for n, c in obj.peft_config.items()}
        if set(saved) != set(live):
            raise StateMismatchError(
                f"{kind}: checkpoint has peft adapters {sorted(saved)}, the live model has {sorted(live)}"
            )
        for name in sorted(saved):
            if not isinstance(saved[name], Mapping):
                raise StateMismatchError(f"{kind}: adapter {name!r}'s saved config is not a mapping")
            for field in sorted(set(saved[name]) | set(live[name])):
                a, b = saved[name].get(field), live[name].get(field)
                if a != b:
                    raise StateMismatchError(
                        f"{kind}: adapter {name!r} was saved with {field}={a!r}, the live model has {field}={b!r}"
                    )
        active = meta.get("active") or []
        if not isinstance(active, list) or not all(isinstance(n, str) for n in active):
            raise StateMismatchError(f"{kind}: the checkpoint's active adapters are not a list of names")
        unknown = [n for n in active if n not in live]
        if unknown:
            raise StateMismatchError(f"{kind}: the checkpoint's active adapters {unknown} are not in the live model")
        if active and active != _active(obj) and len(active) > 1:
            raise StateMismatchError(
                f"{kind}: the checkpoint has active adapters {active}, the live model {_active(obj)}; "
                "a PeftModel activates one adapter at a time: activate them on the live model before restoring"
            )
        combined = _combined(tree)
        state = obj.state_dict()
        if strict:
            missing = [k for k in state if k not in combined]
            unexpected = [k for k in combined if k not in state]
            if missing or unexpected:
                raise StateMismatchError(
                    f"checkpoint does not fit this {kind}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
                )
        for key, value in combined.items():
            target = state.get(key)
            if isinstance(target, torch.Tensor):
                check_tensor(f"{kind}.{key}", target, value)

    def load(self, obj: Any, tree: Mapping[str, Any], strict: bool = True) -> None:
        self.check(obj, tree, strict=strict)  # passed in a restore's first pass; here for a direct call
        kind = type(obj).__name__
        try:
            obj.load_state_dict(_combined(tree), strict=strict)
        except RuntimeError as exc:
            raise StateMismatchError(f"checkpoint does not fit this {kind}: {exc}") from None
        active = list(tree["peft"].get("active") or [])
        if active and active != _active(obj) and hasattr(obj, "set_adapter"):
            obj.set_adapter(active[0])  # check() refused more than one


def _combined(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict a tree's base and adapter weights make together."""
    return {**tree["base"], **tree["adapter"]}
