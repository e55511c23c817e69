"""Encoded tree values as a Python user reads them, without torch.

A manifest's tree tags what JSON cannot express (``{"$float": "inf"}``, ``{"$tuple": [1, 2]}``,
:mod:`ckpt.state.tree`); ``ckpt show`` and ``ckpt diff`` print the value those tags stand
for (``inf``, ``(1, 2)``), the way ``repr`` would after ``ckpt.load``. Malformed tags (a
hostile store) are printed as they are, never raised on: this is display only.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any


def python_text(node: Any) -> str:
    """``repr`` of the value an encoded tree node decodes to (tensors as ``<tensor path>``)."""
    if isinstance(node, list):
        return "[" + ", ".join(map(python_text, node)) + "]"
    if not isinstance(node, dict):
        return repr(node)
    text = _tagged(node)
    if text is not None:
        return text
    return "{" + ", ".join(f"{k!r}: {python_text(v)}" for k, v in node.items()) + "}"


def _tagged(node: dict[str, Any]) -> str | None:
    if "$tensor" in node:
        kind = "ndarray" if node.get("numpy") is True else "Parameter" if node.get("param") is True else "tensor"
        return f"<{kind} {node['$tensor']}>"
    if isinstance(node.get("$tuple"), list):
        items = [python_text(v) for v in node["$tuple"]]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if isinstance(node.get("$map"), list) and all(isinstance(p, list) and len(p) == 2 for p in node["$map"]):
        return "{" + ", ".join(f"{python_text(k)}: {python_text(v)}" for k, v in node["$map"]) + "}"
    if node.get("$float") in ("nan", "inf", "-inf"):
        return f"float({node['$float']!r})" if node["$float"] == "nan" else str(node["$float"])
    if isinstance(node.get("$dtype"), str):
        return f"torch.{node['$dtype']}"
    for tag, wrap in (("$bytes", "{}"), ("$bytearray", "bytearray({})")):
        if isinstance(node.get(tag), str):
            try:
                return wrap.format(repr(base64.b64decode(node[tag], validate=True)))
            except (binascii.Error, ValueError):
                return None
    if isinstance(node.get("$size"), list):
        return f"torch.Size({python_text(node['$size'])})"
    if isinstance(node.get("$np"), str):
        return _numpy_scalar(node)
    return None


def _numpy_scalar(node: dict[str, Any]) -> str | None:
    name = node["$np"]
    if "v" in node:
        return f"np.{name}({node['v']!r})"
    import numpy as np  # no torch: numpy alone renders the stored bytes

    try:
        dtype = np.dtype(name)
        raw = bytes.fromhex(node["hex"])
        return repr(np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)[0])
    except (TypeError, ValueError, KeyError):
        return None
