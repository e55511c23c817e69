"""State helpers for tests: exact comparison and copies of state trees, a small training
state, and damage done to stored objects the way a failing disk or network would."""

from __future__ import annotations

import copy
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

import ckpt
from ckpt.storage.store import Store


def tensor_bits(t: torch.Tensor) -> bytes:
    """The exact bytes of ``t``'s values (row-major), whatever its device, layout or view bits."""
    t = t.detach().to("cpu")
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def assert_same_state(actual: Any, expected: Any, path: str = "") -> None:
    """Assert two state trees are identical: same structure, types, dtypes, shapes and bits.

    Floats are compared bit for bit (``-0.0`` differs from ``0.0``; any NaN equals NaN),
    mapping keys by value *and* type (``0`` is not ``"0"``), tuples are not lists.
    """
    where = path or "<root>"
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: expected a tensor, got {type(actual).__name__}"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert tuple(actual.shape) == tuple(expected.shape), (
            f"{where}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        )
        assert tensor_bits(actual) == tensor_bits(expected), f"{where}: tensor values differ"
    elif isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{where}: expected an ndarray, got {type(actual).__name__}"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
        assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes(), (
            f"{where}: values differ"
        )
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{where}: expected a mapping, got {type(actual).__name__}"
        want = {(type(k), k) if not _isnan(k) else (float, "nan") for k in expected}
        got = {(type(k), k) if not _isnan(k) else (float, "nan") for k in actual}
        assert got == want, f"{where}: keys differ: missing {want - got!r}, extra {got - want!r}"
        for k in expected:
            if _isnan(k):
                continue
            assert_same_state(actual[k], expected[k], f"{path}/{k}" if path else str(k))
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), (
            f"{where}: expected {type(expected).__name__}, got {type(actual).__name__}"
        )
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_state(a, e, f"{path}/{i}" if path else str(i))
    elif isinstance(expected, float):
        assert type(actual) is float, f"{where}: expected a float, got {type(actual).__name__} {actual!r}"
        if math.isnan(expected):
            assert math.isnan(actual), f"{where}: {actual!r} != nan"
        else:
            assert struct.pack("<d", actual) == struct.pack("<d", expected), f"{where}: {actual!r} != {expected!r}"
    else:
        assert type(actual) is type(expected), (
            f"{where}: expected {type(expected).__name__} {expected!r}, got {type(actual).__name__} {actual!r}"
        )
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def _isnan(k: Any) -> bool:
    return isinstance(k, float) and math.isnan(k)


def clone_state(tree: Any) -> Any:
    """A deep copy of a state tree with every tensor cloned (adapters may return live tensors)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, np.ndarray):
        return tree.copy()
    if isinstance(tree, Mapping):
        return {k: clone_state(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(clone_state(v) for v in tree)
    if isinstance(tree, list):
        return [clone_state(v) for v in tree]
    return copy.deepcopy(tree)


def make_training_state(seed: int = 0, width: int = 32) -> dict[str, Any]:
    """A small model + AdamW + scheduler + RNG, stepped so optimizer state exists."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.LayerNorm(width), torch.nn.Linear(width, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(2):
        model(torch.randn(8, width)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return {"model": model, "optim": opt, "sched": sched, "rng": ckpt.RNG()}


def stored_objects(store: Store) -> dict[str, int]:
    """Key -> size of every object in ``store``, as a fresh listing shows them."""
    return {o.key: o.size for o in store.list_objects()}


def corrupt_object(store: Store, key: str, offset: int | None = None) -> bytes:
    """Flip every bit of one byte of object ``key`` (the middle one by default) in place.

    Returns the original bytes so the caller can put them back.
    """
    original = store.get_object(key)
    if not original:
        raise ValueError(f"object {key} is empty; nothing to corrupt")
    pos = len(original) // 2 if offset is None else offset
    bad = bytearray(original)
    bad[pos] ^= 0xFF
    if store.local:  # corrupt the file itself, as a failing disk would
        with open(store.object_path(key), "r+b") as f:
            f.seek(pos)
            f.write(bytes([bad[pos]]))
    else:
        store.fs.pipe_file(store.object_path(key), bytes(bad))
    return original


def restore_object(store: Store, key: str, data: bytes) -> None:
    """Put an object's original bytes back (undo :func:`corrupt_object`)."""
    store.put_object(key, data)
