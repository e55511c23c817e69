"""Property tests of the state-tree encoding: arbitrary nested values survive
encode -> JSON -> decode exactly, and decoding any JSON builds only plain values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt
from ckpt.state import tree as treemod
from ckpt.testing import assert_same_state

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int64, torch.bool]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    seed = draw(st.integers(0, 2**16))  # values come from a seeded generator
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 100, shape, generator=g, dtype=dtype)


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
keys = st.text(max_size=8) | st.integers(-1000, 1000)


def _no_collisions(d: dict) -> bool:
    # 1 and "1" share a tensor path; such trees are refused on purpose (see test_errors)
    return len({str(k) for k in d}) == len(d)


trees = st.recursive(
    scalars | tensors(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(keys, children, max_size=4).filter(_no_collisions)
    ),
    max_leaves=25,
)


def _round_trip(value):
    found: dict[str, torch.Tensor] = {}
    encoded = treemod.encode(value, found, set())
    text = json.dumps(encoded, allow_nan=False)  # strict JSON: no NaN literals leak through
    decoded = treemod.decode(json.loads(text), lambda p, is_np: found[p])
    assert set(treemod.tensor_paths(json.loads(text))) == set(found)
    return decoded, found


@SETTINGS
@given(trees)
def test_encode_decode_round_trip(value):
    decoded, _ = _round_trip({"root": value})
    assert_same_state(decoded, {"root": value})


@SETTINGS
@given(st.dictionaries(keys, tensors(), max_size=6).filter(_no_collisions))
def test_every_tensor_gets_its_own_path(mapping):
    decoded, found = _round_trip({"m": mapping})
    assert len(found) == len(mapping)
    for k, t in mapping.items():
        assert decoded["m"][k] is found[treemod.join("m", k)]
        assert found[treemod.join("m", k)] is t


@SETTINGS
@given(st.text(max_size=10), st.text(max_size=10))
def test_path_components_are_unambiguous(a, b):
    if a != b:
        assert treemod.join("x", a) != treemod.join("x", b)
    assert "/" not in treemod.escape(a)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["$tensor", "$tuple", "$map", "$float", "$dtype", "$bytes", "numpy"]) | st.text(max_size=5),
            children,
            max_size=3,
        )
    ),
    max_leaves=20,
)

PLAIN = (type(None), bool, int, float, str, bytes, torch.dtype)


class FakeTensor:
    """What the decode callback hands back, so we can tell tensors from built values."""


def _only_plain(x) -> bool:
    if isinstance(x, dict):
        return all(_only_plain(k) and _only_plain(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(_only_plain(v) for v in x)
    return isinstance(x, PLAIN + (FakeTensor,))


@SETTINGS
@given(json_values)
def test_decode_builds_only_plain_values(doc):
    fake = FakeTensor()
    try:
        out = treemod.decode(doc, lambda p, is_np: fake)
    except ckpt.SchemaError:
        return  # refusing malformed input is fine; anything but SchemaError is a bug
    assert _only_plain(out), out


@pytest.mark.parametrize(
    "doc",
    [
        {"$float": "abc"},
        {"$float": 3},
        {"$bytes": 5},
        {"$bytes": "not base64!"},
        {"$map": [[[1], 2]]},
        {"$map": [[{"a": 1}, 2]]},
        {"$map": "x"},
        {"$map": [[1]]},
        {"$tuple": {"a": 1}},
        {"$dtype": "Tensor"},
        {"$dtype": "load"},
    ],
)
def test_malformed_tags_are_schema_errors(doc):
    with pytest.raises(ckpt.SchemaError):
        treemod.decode({"k": doc}, lambda p, is_np: None)


def test_numpy_round_trip_keeps_shape_and_dtype():
    arrays = {"scalar": np.array(1.5), "empty": np.zeros((0, 2), np.int16), "f": np.asfortranarray(np.eye(3))}
    found: dict[str, torch.Tensor] = {}
    numpy_paths: set[str] = set()
    encoded = treemod.encode(arrays, found, numpy_paths)
    assert numpy_paths == {"scalar", "empty", "f"}
    decoded = treemod.decode(json.loads(json.dumps(encoded)), lambda p, is_np: found[p].numpy() if is_np else found[p])
    for k, a in arrays.items():
        assert decoded[k].shape == a.shape and decoded[k].dtype == a.dtype and np.array_equal(decoded[k], a)


def test_special_floats_and_types():
    value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "dtype": torch.int8, "b": b"\x00\x01", "t": (1,)}
    decoded, _ = _round_trip(value)
    assert math.isnan(decoded["nan"]) and decoded["inf"] == math.inf and decoded["-inf"] == -math.inf
    assert decoded["dtype"] is torch.int8 and decoded["b"] == b"\x00\x01" and decoded["t"] == (1,)
