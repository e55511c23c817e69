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
``{"$bytearray": ..}`` a bytearray (base64)
``{"$size": [2, 3]}``  a ``torch.Size``
``{"$np": "int64",     a NumPy scalar of that dtype (:data:`NUMPY_DTYPES`): integers and
"v": 3}``              bools as ``v``; floats and complex numbers as ``hex``, their
                       little-endian bytes, so they come back bit for bit
=====================  =========================================

A ``$tensor`` node may carry flags: ``"numpy": true`` (a NumPy array), ``"byteorder": ">"``
(an array of non-native byte order, stored native and swapped back on load),
``"param": true`` (an ``nn.Parameter``) and ``"requires_grad": bool``.

Nothing is pickled: a value of any other type raises :class:`UnsupportedValueError`
naming its key, and so does a type whose rebuilding would import its class (a
namedtuple, an ``IntEnum``, a ``defaultdict``), with the plain type to convert it to.
An ``OrderedDict`` is stored as a mapping and loads as a ``dict`` (same order, equal).
Decoding only ever builds these plain types and validates every tag.
"""

from __future__ import annotations

import base64
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ckpt.errors import SchemaError, UnsupportedValueError
from ckpt.state.paths import children as children
from ckpt.state.paths import dotted as dotted
from ckpt.state.paths import escape as escape
from ckpt.state.paths import join as join
from ckpt.state.paths import tensor_paths as tensor_paths
from ckpt.state.paths import unescape as unescape
from ckpt.storage.manifest import DTYPE_NAMES

TAGS = ("$tensor", "$tuple", "$map", "$float", "$dtype", "$bytes", "$bytearray", "$size", "$np")


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
    """Encode ``tree``; tensors found are added to ``tensors`` keyed by their path.

    A value comes back from :func:`decode` with its own type, or is refused here with an
    :class:`UnsupportedValueError` naming its key: never changed silently.
    """
    if isinstance(tree, torch.Tensor):
        return _encode_tensor(tree, tensors, path)
    if isinstance(tree, np.ndarray):
        return _encode_array(tree, tensors, numpy_paths, path)
    if isinstance(tree, np.generic):  # before the Python types: np.float64 is a float, np.str_ a str
        return _encode_np_scalar(tree, path)
    if isinstance(tree, (Mapping, list, tuple)):
        check_container(tree, path)
    if isinstance(tree, Mapping):
        if all(type(k) is str and not k.startswith("$") for k in tree):
            return {k: encode(v, tensors, numpy_paths, join(path, k)) for k, v in tree.items()}
        items = []
        for k, v in tree.items():
            if not (k is None or isinstance(k, (str, int, float, bool))):
                raise UnsupportedValueError(
                    f"{path or '<root>'}: mapping key {k!r} of type {type(k).__name__} is not a JSON scalar"
                )
            items.append([encode(k, tensors, numpy_paths, path), encode(v, tensors, numpy_paths, join(path, k))])
        return {"$map": items}
    if isinstance(tree, torch.Size):
        return {"$size": list(tree)}
    if isinstance(tree, tuple):
        return {"$tuple": [encode(v, tensors, numpy_paths, join(path, i)) for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [encode(v, tensors, numpy_paths, join(path, i)) for i, v in enumerate(tree)]
    if tree is None or type(tree) in (bool, int, str):
        return tree
    if type(tree) is float:
        if math.isfinite(tree):
            return tree
        return {"$float": "nan" if math.isnan(tree) else ("inf" if tree > 0 else "-inf")}
    if isinstance(tree, torch.dtype):
        return {"$dtype": _dtype_name(tree)}
    if type(tree) is bytes:
        return {"$bytes": base64.b64encode(tree).decode("ascii")}
    if type(tree) is bytearray:
        return {"$bytearray": base64.b64encode(tree).decode("ascii")}
    for base in (bool, int, float, str, bytes):
        if isinstance(tree, base):  # IntEnum, StrEnum, ...: loading would have to import the class
            raise _unsupported(tree, path, f"convert it to {base.__name__} ({base.__name__}(value) or value.value)")
    raise _unsupported(
        tree,
        path,
        "store tensors, JSON values or objects an adapter handles; to support this type, "
        "register an adapter plugin (see README 'Writing a plugin')",
    )


def _unsupported(value: Any, path: str, hint: str) -> UnsupportedValueError:
    cls = type(value)
    return UnsupportedValueError(
        f"{path or '<root>'}: cannot checkpoint a value of type {cls.__module__}.{cls.__qualname__} "
        f"without pickle (loading it would import that class from storage); {hint}"
    )


def check_container(value: Any, path: str) -> None:
    """Refuse a mapping or sequence whose type a load could not rebuild without importing
    its class (``defaultdict``'s factory, a namedtuple, a list subclass).

    ``dict`` and ``OrderedDict`` are stored as mappings (an ``OrderedDict`` loads as a
    ``dict`` with the same order, which compares equal: module state dicts are ``OrderedDict``);
    ``list``, ``tuple`` and ``torch.Size`` are kept.
    """
    cls = type(value)
    if cls in (dict, OrderedDict, list, tuple, torch.Size):
        return
    if isinstance(value, Mapping):
        hint = "convert it to dict (dict(value))"
    elif isinstance(value, tuple) and hasattr(value, "_fields"):
        hint = "convert it to tuple (tuple(value)) or to dict (value._asdict())"
    elif isinstance(value, tuple):
        hint = "convert it to tuple (tuple(value))"
    else:
        hint = "convert it to list (list(value))"
    raise _unsupported(value, path, hint)


def rebuild(value: Any, items: list[Any], path: str) -> list[Any] | tuple[Any, ...]:
    """``items`` (the children of the list or tuple ``value``, walked) in ``value``'s own type;
    refuses a type :func:`check_container` refuses."""
    check_container(value, path)
    if isinstance(value, list):
        return items
    return torch.Size(items) if isinstance(value, torch.Size) else tuple(items)


def _encode_tensor(t: torch.Tensor, tensors: dict[str, torch.Tensor], path: str) -> dict[str, Any]:
    if t.is_meta:
        raise UnsupportedValueError(
            f"{path or '<root>'}: a meta tensor holds no data to checkpoint; materialize it first "
            "(module.to_empty(device=...) then initialize or load it)"
        )
    if t.layout != torch.strided:
        raise UnsupportedValueError(
            f"{path or '<root>'}: a tensor with layout {t.layout} cannot be checkpointed; convert it to dense (t.to_dense())"
        )
    _claim(tensors, path)
    tensors[path] = t
    node: dict[str, Any] = {"$tensor": path}
    if isinstance(t, torch.nn.Parameter):
        node["param"] = True
        node["requires_grad"] = t.requires_grad
    elif t.requires_grad:
        node["requires_grad"] = True
    return node


#: NumPy dtypes whose scalars and arrays are kept with their dtype (the rest are refused:
#: ``longdouble``'s size and precision differ between machines, ``datetime64``, ``str_``...
#: are no numbers a tensor holds)
NUMPY_DTYPES = frozenset(
    {
        "bool",
        *(f"{s}int{n}" for s in ("", "u") for n in (8, 16, 32, 64)),
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    }
)
_NUMPY_HINTS = {
    "M": "convert it to int (value.astype('int64')) or str",
    "m": "convert it to int (value.astype('int64')) or str",
    "U": "convert it to str",
    "S": "convert it to bytes",
    "f": "convert it to float64 (its size and precision differ between machines)",
    "c": "convert it to complex128 (its size and precision differ between machines)",
}


def _numpy_dtype(value: np.ndarray | np.generic, path: str) -> str:
    name = value.dtype.name
    if name not in NUMPY_DTYPES:
        what = f"NumPy dtype {value.dtype.str!r} ({name})"
        hint = _NUMPY_HINTS.get(value.dtype.kind, "convert it to a numeric dtype")
        raise UnsupportedValueError(f"{path or '<root>'}: cannot checkpoint {what} without pickle; {hint}")
    return name


def _encode_array(a: np.ndarray, tensors: dict[str, torch.Tensor], numpy_paths: set[str], path: str) -> dict[str, Any]:
    if a.dtype.hasobject:
        raise UnsupportedValueError(f"{path or '<root>'}: NumPy object arrays cannot be stored without pickle")
    _numpy_dtype(a, path)
    node: dict[str, Any] = {"$tensor": path, "numpy": True}
    if not a.dtype.isnative:  # stored in native order; the load swaps back
        node["byteorder"] = a.dtype.byteorder
        a = a.astype(a.dtype.newbyteorder("="))
    # ascontiguousarray turns a 0-d array into shape (1,); keep the shape
    _claim(tensors, path)
    tensors[path] = torch.from_numpy(np.ascontiguousarray(a).reshape(a.shape))
    numpy_paths.add(path)
    return node


def _encode_np_scalar(x: np.generic, path: str) -> dict[str, Any]:
    name = _numpy_dtype(x, path)
    if x.dtype.kind in "biu":
        return {"$np": name, "v": x.item()}
    # floats and complex numbers bit for bit (NaN payloads, -0.0), little-endian
    return {"$np": name, "hex": np.asarray(x).astype(x.dtype.newbyteorder("<")).tobytes().hex()}


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
            return _decode_tensor(node, tensor, path)
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
        if "$bytearray" in node:
            return bytearray(decode({"$bytes": node["$bytearray"]}, tensor, path))
        if "$size" in node:
            dims = _list(node, "$size", path)
            if len(dims) > _MAX_DIMS or not all(type(d) is int and 0 <= d < 2**62 for d in dims):
                raise SchemaError(f"{path}: $size must hold at most {_MAX_DIMS} non-negative ints")
            return torch.Size(dims)
        if "$np" in node:
            return _decode_np_scalar(node, path)
    return {k: decode(v, tensor, join(path, k)) for k, v in node.items()}


_NONFINITE = ("nan", "inf", "-inf")
_MAX_DIMS = 64
_BYTEORDERS = ("<", ">")


def _decode_tensor(node: dict, tensor: Callable[[str, bool], Any], path: str) -> Any:
    is_numpy, param = node.get("numpy", False), node.get("param", False)
    grad, order = node.get("requires_grad", param), node.get("byteorder")
    if not all(isinstance(f, bool) for f in (is_numpy, param, grad)):
        raise SchemaError(f"{path}: $tensor flags numpy, param and requires_grad must be bools")
    if order is not None and (order not in _BYTEORDERS or not is_numpy):
        raise SchemaError(f"{path}: $tensor byteorder must be one of {_BYTEORDERS}, on a NumPy array")
    if is_numpy and (param or grad):
        raise SchemaError(f"{path}: a NumPy array cannot be a parameter or require grad")
    value = tensor(str(node["$tensor"]), is_numpy)
    if order is not None:
        return value.astype(value.dtype.newbyteorder(order))
    if (param or grad) and not (value.dtype.is_floating_point or value.dtype.is_complex):
        raise SchemaError(f"{path}: only floating-point tensors can require grad, not {value.dtype}")
    if param:
        return torch.nn.Parameter(value, requires_grad=grad)
    return value.requires_grad_() if grad else value


def _decode_np_scalar(node: dict, path: str) -> np.generic:
    name = node["$np"]
    if not isinstance(name, str) or name not in NUMPY_DTYPES:
        raise SchemaError(f"{path}: $np names no NumPy dtype ckpt stores: {str(name)[:60]!r}")
    dtype = np.dtype(name)
    if dtype.kind in "biu":
        v = node.get("v")
        ok = (
            type(v) is bool if dtype.kind == "b" else type(v) is int and np.iinfo(dtype).min <= v <= np.iinfo(dtype).max
        )
        if not ok:
            raise SchemaError(f"{path}: $np {name} needs a value 'v' in its range")
        return dtype.type(v)
    text = node.get("hex")
    try:
        raw = bytes.fromhex(text) if isinstance(text, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != dtype.itemsize:
        raise SchemaError(f"{path}: $np {name} needs 'hex', {dtype.itemsize} little-endian bytes in hex")
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)[0]


def _list(node: dict, tag: str, path: str) -> list:
    value = node[tag]
    if not isinstance(value, list):
        raise SchemaError(f"{path}: {tag} must hold a list")
    return value


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
