"""State trees <-> JSON with tensor references.

A state tree is nested mappings, lists and tuples whose leaves are tensors (torch or
NumPy) or JSON scalars. :func:`encode` turns it into a JSON-safe structure in which every
tensor is replaced by ``{"$tensor": path}`` and returns the tensors by path; :func:`decode`
reverses it. Python types JSON cannot express are tagged so they come back exactly:

=====================  =========================================
``{"$tuple": [...]}``  a tuple
``{"$map": [[k, v]]}`` a mapping with non-string keys (optimizer state ``{0: ...}``)
``{"$float": "nan"}``  a non-finite float
``{"$dtype": "..."}``  a ``torch.dtype``
``{"$bytes": "..."}``  bytes (base64)
=====================  =========================================

Nothing is pickled: a value of any other type raises :class:`UnsupportedValueError`
naming its key. Decoding only ever builds these plain types.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ckpt.errors import SchemaError, UnsupportedValueError
from ckpt.storage.manifest import DTYPE_NAMES

TAGS = ("$tensor", "$tuple", "$map", "$float", "$dtype", "$bytes")


def escape(key: str) -> str:
    """One path component, JSON-pointer escaped so '/' in keys stays unambiguous."""
    return key.replace("~", "~0").replace("/", "~1")


def unescape(part: str) -> str:
    """One escaped path component back to the key it names (``~1`` is ``/``, ``~0`` is ``~``)."""
    return part.replace("~1", "/").replace("~0", "~")


def join(prefix: str, key: Any) -> str:
    part = escape(str(key))
    return f"{prefix}/{part}" if prefix else part


def children(node: Any) -> list[tuple[str, Any]] | None:
    """Named children of an encoded tree node, or None for a leaf value.

    A list (or tuple) of scalars is one leaf; a tagged value (``$tensor``, ``$float``...)
    is a leaf; mappings, ``$map`` pairs and other sequences have children.
    """
    if isinstance(node, list):
        if all(not isinstance(v, (dict, list)) for v in node):
            return None
        return [(str(i), v) for i, v in enumerate(node)]
    if isinstance(node, dict):
        if "$map" in node and isinstance(node["$map"], list):
            return [(str(p[0]), p[1]) for p in node["$map"] if isinstance(p, list) and len(p) == 2]
        if "$tuple" in node and isinstance(node["$tuple"], list):
            return children(node["$tuple"])
        if any(isinstance(k, str) and k.startswith("$") for k in node):
            return None
        return list(node.items())
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


#: name -> torch.dtype for the names of :data:`ckpt.storage.manifest.DTYPE_NAMES` this torch
#: has. Names from a store are looked up here, never with ``getattr(torch, name)``, which
#: would import submodules (``_dynamo``) or return functions for hostile names.
_DTYPES: dict[str, torch.dtype] = {
    name: d for name in DTYPE_NAMES if isinstance(d := getattr(torch, name, None), torch.dtype)
}


def dtype_from_name(name: str, *, what: str = "") -> torch.dtype:
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise SchemaError(f"unknown dtype {str(name)[:60]!r}" + (f" for {what}" if what else ""))
    return dtype


def encode(tree: Any, tensors: dict[str, torch.Tensor], numpy_paths: set[str], path: str = "") -> Any:
    """Encode ``tree``; tensors found are added to ``tensors`` keyed by their path."""
    if isinstance(tree, torch.Tensor):
        _claim(tensors, path)
        tensors[path] = tree
        return {"$tensor": path}
    if isinstance(tree, np.ndarray):
        if tree.dtype.hasobject:
            raise UnsupportedValueError(f"{path or '<root>'}: NumPy object arrays cannot be stored without pickle")
        # ascontiguousarray turns a 0-d array into shape (1,); keep the shape
        _claim(tensors, path)
        tensors[path] = torch.from_numpy(np.ascontiguousarray(tree).reshape(tree.shape))
        numpy_paths.add(path)
        return {"$tensor": path, "numpy": True}
    if isinstance(tree, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in tree):
            return {k: encode(v, tensors, numpy_paths, join(path, k)) for k, v in tree.items()}
        items = []
        for k, v in tree.items():
            if not (k is None or isinstance(k, (str, int, float, bool))):
                raise UnsupportedValueError(
                    f"{path or '<root>'}: mapping key {k!r} of type {type(k).__name__} is not a JSON scalar"
                )
            items.append([encode(k, tensors, numpy_paths, path), encode(v, tensors, numpy_paths, join(path, k))])
        return {"$map": items}
    if isinstance(tree, tuple):
        return {"$tuple": [encode(v, tensors, numpy_paths, join(path, i)) for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [encode(v, tensors, numpy_paths, join(path, i)) for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, str)):
        return tree
    if isinstance(tree, float):
        if math.isfinite(tree):
            return tree
        return {"$float": "nan" if math.isnan(tree) else ("inf" if tree > 0 else "-inf")}
    if isinstance(tree, np.generic):
        return encode(tree.item(), tensors, numpy_paths, path)
    if isinstance(tree, torch.dtype):
        return {"$dtype": _dtype_name(tree)}
    if isinstance(tree, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(tree)).decode("ascii")}
    raise UnsupportedValueError(
        f"{path or '<root>'}: cannot checkpoint a value of type {type(tree).__module__}.{type(tree).__qualname__} "
        "without pickle. Store tensors, JSON values or objects an adapter handles; "
        "to support this type, register an adapter plugin (see README 'Writing a plugin')."
    )


def _claim(tensors: Mapping[str, Any], path: str) -> None:
    # keys 1 and "1" (or "None" and None) share a path: storing both would mix them up
    if path in tensors:
        raise UnsupportedValueError(
            f"{path or '<root>'}: two tensors would be stored under this path (keys that differ only in "
            "type, like 1 and '1'); rename one"
        )


def decode(node: Any, tensor: Callable[[str, bool], Any], path: str = "") -> Any:
    """Rebuild a tree from :func:`encode`'s output; ``tensor(path, numpy)`` supplies tensors."""
    if isinstance(node, list):
        return [decode(v, tensor, join(path, i)) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if len(node) >= 1:
        if "$tensor" in node:
            return tensor(str(node["$tensor"]), bool(node.get("numpy", False)))
        if "$tuple" in node:
            return tuple(decode(v, tensor, join(path, i)) for i, v in enumerate(_list(node, "$tuple", path)))
        if "$map" in node:
            out = {}
            for pair in _list(node, "$map", path):
                if not isinstance(pair, list) or len(pair) != 2:
                    raise SchemaError(f"{path}: malformed $map entry {pair!r}")
                key = decode(pair[0], tensor, path)
                if not (key is None or isinstance(key, (str, int, float, bool))):
                    raise SchemaError(f"{path}: $map key {pair[0]!r} is not a JSON scalar")
                out[key] = decode(pair[1], tensor, join(path, key))
            return out
        if "$float" in node:
            if node["$float"] not in _NONFINITE:
                raise SchemaError(f"{path}: $float must be one of {sorted(_NONFINITE)}, got {node['$float']!r}")
            return float(node["$float"])
        if "$dtype" in node:
            return dtype_from_name(str(node["$dtype"]), what=path)
        if "$bytes" in node:
            try:
                return base64.b64decode(node["$bytes"], validate=True)
            except (TypeError, ValueError) as exc:  # binascii.Error is a ValueError
                raise SchemaError(f"{path}: $bytes is not base64 ({exc})") from None
    return {k: decode(v, tensor, join(path, k)) for k, v in node.items()}


_NONFINITE = ("nan", "inf", "-inf")


def _list(node: dict, tag: str, path: str) -> list:
    value = node[tag]
    if not isinstance(value, list):
        raise SchemaError(f"{path}: {tag} must hold a list")
    return value


def tensor_paths(node: Any) -> list[str]:
    """Every tensor path referenced by an encoded tree, in tree order."""
    found: list[str] = []

    def walk(n: Any) -> None:
        if isinstance(n, list):
            for v in n:
                walk(v)
        elif isinstance(n, dict):
            if "$tensor" in n:
                found.append(str(n["$tensor"]))
            else:
                for v in n.values():
                    walk(v)

    walk(node)
    return found


def instances(state: Any, cls: type | tuple[type, ...]) -> list[Any]:
    """Every object of type ``cls`` in a user's state (nested mappings, lists, tuples)."""
    found: list[Any] = []

    def walk(v: Any) -> None:
        if isinstance(v, cls):
            found.append(v)
        elif isinstance(v, Mapping):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(state)
    return found
