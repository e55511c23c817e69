"""Names and dtypes a PyTorch user recognises, shared by every export and import format.

A tensor at ckpt path ``model/0.weight`` is exported as ``model.0.weight``: the path's
components (JSON-pointer unescaped) joined with ``.``, so the top-level state key comes
first and a module's own state-dict keys follow. Optimizer state reads
``optim.state.0.exp_avg``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ckpt.errors import CheckpointError, UnsupportedValueError
from ckpt.state import tree as treemod

#: ``progress(advance, total)``: ``advance`` bytes just done out of ``total`` bytes of work
Progress = Callable[[int, int], None]

#: bytes of tensors an import hands to the writer before waiting for earlier ones to be stored
IMPORT_WINDOW_BYTES = 256 * 1024 * 1024

#: torch dtype name -> safetensors dtype code
SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "complex64": "C64",
}
#: safetensors dtype code -> torch dtype name
ST_TO_TORCH = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def flat_name(path: str, prefix: str = "") -> str:
    """``model/0.weight`` -> ``model.0.weight`` (``prefix`` = an escaped sub-tree path to drop)."""
    if prefix:
        path = path[len(prefix) + 1 :]
    return ".".join(treemod.unescape(p) for p in path.split("/"))


def encode_state(obj: Any, src: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """An imported mapping of state as an encoded tree and its tensors by path."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{src} holds a {type(obj).__name__}, not a mapping of names to state; cannot import it")
    for k in obj:
        if not isinstance(k, str) or k.startswith("$"):
            raise UnsupportedValueError(f"{src}: top-level key {k!r} must be a string not starting with '$'")
    tensors: dict[str, torch.Tensor] = {}
    tree = treemod.encode(obj, tensors, set())
    return tree, tensors


def first_line(exc: BaseException) -> str:
    """The first line of an error message, without terminal escapes (torch styles some)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
