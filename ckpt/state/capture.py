"""Live objects <-> state tree: capture through the adapters, fit checks, loading back.

Capture turns the user's state mapping into a plain tree (adapters for live objects,
mappings and sequences walked, everything else left for :mod:`ckpt.state.tree` to
encode or refuse). Loading back first checks that the live objects can take what a
checkpoint holds, so a mismatch is refused before any live tensor is written.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

from ckpt.errors import CheckpointError, StateMismatchError, UnsupportedValueError
from ckpt.hooks.manager import Plugins
from ckpt.state import tree as treemod
from ckpt.state.torch_adapters import check_tensor


def capture(
    state: Mapping[str, Any], plugins: Plugins, classes: dict[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Turn the user's state into a plain tree; returns the tree and ``{path: adapter name}``.

    ``classes``, when given, receives the class of each adapted object by path (recorded
    in the manifest, so a restore into another optimizer class can be refused).
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"state must be a mapping of names to objects, got {type(state).__name__}")
    adapters: dict[str, str] = {}

    def walk(value: Any, path: str) -> Any:
        adapter = plugins.adapters.for_object(value)
        if adapter is not None:
            adapters[path] = adapter.name
            if classes is not None:
                classes[path] = qualified_name(type(value))
            return adapter.state(value)
        if isinstance(value, Mapping):
            treemod.check_container(value, path)  # defaultdict, Counter...: refused naming the key
            return {k: walk(v, treemod.join(path, k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            # torch.Size kept, namedtuples and other subclasses refused naming the key
            return treemod.rebuild(value, [walk(v, treemod.join(path, i)) for i, v in enumerate(value)], path)
        return value

    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or key.startswith("$"):
            raise UnsupportedValueError(f"state keys must be strings not starting with '$', got {key!r}")
        out[key] = walk(value, treemod.escape(key))
    return out, adapters


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class, as manifests record it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def live_tensors(tree: Any, path: str, out: dict[str, torch.Tensor], numpy_paths: set[str] | None = None) -> None:
    """Tensors of a captured live tree by path (the same paths :func:`tree.encode` uses);
    ``numpy_paths`` receives those that are NumPy arrays (shared with the array)."""
    treemod.encode(tree, out, set() if numpy_paths is None else numpy_paths, path)


def as_numpy(t: torch.Tensor, is_numpy: bool) -> Any:
    return t.numpy() if is_numpy else t


def check_into(target: Any, value: Any, path: str, plugins: Plugins, *, strict: bool = True) -> None:
    """Refuse ``value`` before anything live changes when ``target`` cannot take it.

    An adapter's optional ``check(obj, tree)`` decides for the objects it handles (an
    optimizer's state against its parameter groups, RNG states against their generators);
    live tensors are checked against the manifest by ``ckpt.state.restore`` and against
    the value they take here (:func:`check_tensor`).
    """
    adapter = plugins.adapters.for_object(target)
    if adapter is not None:
        check = getattr(adapter, "check", None)
        if check is None:
            return
        try:
            if "strict" in inspect.signature(check).parameters:
                check(target, value, strict=strict)
            else:
                check(target, value)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - a plugin's check failing is a misfit, named here
            raise StateMismatchError(
                f"{path!r}: the checkpoint does not fit the live {type(target).__name__} "
                f"(adapter {adapter.name!r}): {type(exc).__name__}: {exc}"
            ) from None
        return
    if isinstance(target, torch.Tensor):
        check_tensor(path, target, value)
        return
    if isinstance(target, MutableMapping) and isinstance(value, Mapping):
        for k in list(target):
            if k in value:
                check_into(target[k], value[k], treemod.join(path, k), plugins, strict=strict)
    elif isinstance(target, list) and isinstance(value, list) and len(target) == len(value):
        for i, item in enumerate(value):
            check_into(target[i], item, treemod.join(path, i), plugins, strict=strict)


def load_into(target: Any, value: Any, path: str, plugins: Plugins, *, strict: bool = True) -> Any:
    """Load ``value`` into ``target``; return what ``state`` should hold afterwards.

    ``strict=False`` is passed on to adapters whose ``load`` takes it (a module's), so a
    partial restore loads what matches.
    """
    adapter = plugins.adapters.for_object(target)
    if adapter is not None:
        try:
            if not strict and "strict" in inspect.signature(adapter.load).parameters:
                # an optional keyword the Adapter protocol leaves out; the signature was checked above
                adapter.load(target, value, strict=False)  # type: ignore[call-arg]
            else:
                adapter.load(target, value)
        except CheckpointError:
            raise
        except Exception as exc:
            raise StateMismatchError(
                f"{path!r}: adapter {adapter.name!r} failed to load the checkpoint after its checks passed "
                f"({type(exc).__name__}: {exc}); give the adapter a check() that refuses this"
            ) from exc
        return target
    if isinstance(target, torch.Tensor):
        with torch.no_grad():  # shape and dtype were checked against the manifest
            target.copy_(torch.as_tensor(value))
        return target
    if isinstance(target, MutableMapping) and isinstance(value, Mapping):
        for k in list(target):
            if k in value:
                target[k] = load_into(target[k], value[k], treemod.join(path, k), plugins, strict=strict)
        return target
    if isinstance(target, list) and isinstance(value, list) and len(target) == len(value):
        for i, item in enumerate(value):
            target[i] = load_into(target[i], item, treemod.join(path, i), plugins, strict=strict)
        return target
    return value
