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

    def load(self, obj: Any, tree: Mapping[str, Any]) -> None:
        kind = type(obj).__name__
        saved = tree["peft"]["adapters"]
        live = {n: config_doc(c) for n, c in obj.peft_config.items()}
        if set(saved) != set(live):
            raise StateMismatchError(
                f"{kind}: checkpoint has peft adapters {sorted(saved)}, the live model has {sorted(live)}"
            )
        for name in sorted(saved):
            for field in sorted(set(saved[name]) | set(live[name])):
                a, b = saved[name].get(field), live[name].get(field)
                if a != b:
                    raise StateMismatchError(
                        f"{kind}: adapter {name!r} was saved with {field}={a!r}, the live model has {field}={b!r}"
                    )
        combined: dict[str, torch.Tensor] = {**tree["base"], **tree["adapter"]}
        try:
            obj.load_state_dict(combined, strict=True)
        except RuntimeError as exc:
            raise StateMismatchError(f"checkpoint does not fit this {kind}: {exc}") from None
        active = list(tree["peft"].get("active") or [])
        if active and active != _active(obj) and hasattr(obj, "set_adapter"):
            obj.set_adapter(active[0] if len(active) == 1 else active)
