"""Where restored tensors go: ``map_location`` as ``torch.load`` takes it.

A string or ``torch.device`` sends every tensor there; a dict maps saved locations to
new ones (``{"cuda:1": "cuda:0"}``); a callable is called with each tensor's CPU storage
and its saved location and returns a storage (or None to keep it on the CPU), as
``torch.load`` calls it. Decoding always happens in host memory; placement follows.

Every device a string, device or dict names is checked before any data is read: a CUDA
device on a machine without one is a :class:`~ckpt.CheckpointError`, not an
AssertionError after reading everything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ckpt.errors import CheckpointError

#: the location of a tensor whose manifest records none (it was saved from host memory)
DEFAULT_LOCATION = "cpu"

Placer = Callable[[torch.Tensor, str], torch.Tensor]


def _device(value: Any, what: str) -> torch.device:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"map_location {what}: {value!r} is not a device ({exc})") from None
    if device.type == "meta":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CheckpointError(f"map_location {what}: {value!r} names a CUDA device, but this machine has none")
        if device.index is not None and device.index >= count:
            raise CheckpointError(f"map_location {what}: {value!r}, but this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        module = getattr(torch, device.type, None)
        available = getattr(module, "is_available", None)
        if callable(available) and not available():
            raise CheckpointError(f"map_location {what}: {value!r} is not available on this machine")
    return device


def placer(map_location: Any) -> Placer | None:
    """A function placing each decoded CPU tensor, or None to leave tensors on the CPU.

    Validates every named device first (see the module docstring).
    """
    if map_location is None:
        return None
    if isinstance(map_location, (str, torch.device)):
        device = _device(map_location, "")
        if device.type == "cpu":
            return None
        return lambda t, _loc: t.to(device)
    if isinstance(map_location, Mapping):
        table = {str(k): _device(v, f"entry {k!r}") for k, v in map_location.items()}

        def mapped(t: torch.Tensor, location: str) -> torch.Tensor:
            target = table.get(location)
            return t if target is None or target.type == "cpu" else t.to(target)

        return mapped
    if callable(map_location):
        fn = map_location

        def called(t: torch.Tensor, location: str) -> torch.Tensor:
            storage = fn(t.untyped_storage(), location)
            if storage is None:
                return t
            if not isinstance(storage, (torch.UntypedStorage, torch.TypedStorage)):
                raise CheckpointError(f"map_location returned {type(storage).__name__}, expected a storage or None")
            if isinstance(storage, torch.TypedStorage):
                storage = storage.untyped()
            out = torch.empty(0, dtype=t.dtype, device=storage.device)
            return out.set_(storage, 0, t.shape, t.stride())

        return called
    raise CheckpointError(
        f"map_location must be a device string, torch.device, dict or callable, got {type(map_location).__name__}"
    )
