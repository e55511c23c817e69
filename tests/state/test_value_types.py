"""A value comes back from a checkpoint with its own type and value, or save refuses it by key."""

from __future__ import annotations

import collections
import enum
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt
from ckpt.errors import SchemaError
from ckpt.state import tree as treemod

NUMERIC = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
FLOATS = ["float16", "float32", "float64", "complex64", "complex128"]


def same(a, b) -> bool:
    """Equal value and type, recursively; floats bit for bit."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and a.requires_grad == b.requires_grad
            and torch.equal(a.detach().view(torch.uint8), b.detach().view(torch.uint8))
        )
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, (np.generic, float)):
        return np.asarray(a).tobytes() == np.asarray(b).tobytes()
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def tree_round_trip(value):
    tensors: dict[str, torch.Tensor] = {}
    encoded = json.loads(json.dumps(treemod.encode({"k": value}, tensors, set()), allow_nan=False))
    # a stored tensor comes back as a fresh copy, as the reader makes it
    return treemod.decode(encoded, lambda p, is_np: tensors[p].clone().numpy() if is_np else tensors[p].clone())["k"]


def np_scalars():
    def build(name, raw):
        dtype = np.dtype(name)
        return np.frombuffer(raw[: dtype.itemsize].ljust(dtype.itemsize, b"\0"), dtype=dtype)[0]

    ints = st.sampled_from(NUMERIC[1:]).flatmap(lambda n: st.binary(min_size=8, max_size=8).map(lambda r: build(n, r)))
    # any bit pattern: NaN payloads, -0.0, subnormals
    floats = st.sampled_from(FLOATS).flatmap(lambda n: st.binary(min_size=16, max_size=16).map(lambda r: build(n, r)))
    return st.one_of(st.booleans().map(np.bool_), ints, floats)


leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.binary(max_size=5).map(bytearray),
    np_scalars(),
    st.lists(st.integers(0, 5), max_size=3).map(torch.Size),
    st.sampled_from(["float32", "int64", ">i4", ">f8", "<u2", "bool"]).map(lambda d: np.arange(3).astype(d)),
    st.booleans().map(lambda g: torch.nn.Parameter(torch.arange(3.0), requires_grad=g)),
)
values = st.recursive(
    leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.lists(kids, max_size=3).map(tuple),
        st.dictionaries(st.text(min_size=1, max_size=4).filter(lambda k: not k.startswith("$")), kids, max_size=3),
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_tree_round_trip_keeps_type_and_bits(value):
    assert same(tree_round_trip(value), value)


@pytest.mark.parametrize("name", NUMERIC + FLOATS)
def test_numpy_scalar_extremes(name):
    dtype = np.dtype(name)
    if dtype.kind in "iu":
        cases = [np.iinfo(dtype).min, np.iinfo(dtype).max]
    elif dtype.kind == "b":
        cases = [False, True]
    else:
        cases = [np.finfo(dtype).max, np.finfo(dtype).tiny, -0.0, math.inf, math.nan, 1.1]
    for c in cases:
        x = dtype.type(c)
        assert same(tree_round_trip(x), x)


def test_save_load_restore_keep_types(tmp_path):
    url = f"file://{tmp_path}"
    state = {
        "v": {
            "f32": np.float32(1.1),
            "i64": np.int64(-5),
            "b": np.bool_(True),
            "f64": np.float64(math.nan),
            "param": torch.nn.Parameter(torch.ones(2)),
            "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
            "grad": torch.ones(2, requires_grad=True),
            "ba": bytearray(b"\x00ab"),
            "big": np.arange(4, dtype=">f4"),
            "u32": np.arange(4, dtype=np.uint32),
        }
    }
    ckpt.save(url, state, step=1)
    assert same(ckpt.load(url)["v"], state["v"])
    assert ckpt.load(url)["v"]["f32"] == np.float32(1.1)  # not the float 1.100000023841858
    live = {"v": {k: (v.detach().clone() * 0 if isinstance(v, torch.Tensor) else None) for k, v in state["v"].items()}}
    live["v"]["param"] = torch.nn.Parameter(torch.zeros(2))
    live["v"]["frozen"] = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    ckpt.restore(url, live)
    for k in ("f32", "i64", "b", "f64", "ba", "big", "u32"):
        assert same(live["v"][k], state["v"][k]), k
    assert isinstance(live["v"]["param"], torch.nn.Parameter) and torch.equal(live["v"]["param"], state["v"]["param"])


class Color(enum.IntEnum):
    RED = 1


Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize(
    "value, words",
    [
        (Color.RED, "convert it to int"),
        (np.datetime64("2020-01-01"), "datetime64"),
        (np.timedelta64(3, "s"), "convert it to int"),
        (np.str_("a"), "convert it to str"),
        (np.longdouble(1), "float64"),
        (np.array(["a"]), "convert it to str"),
        (np.array([1], dtype=np.longdouble), "float64"),
        (torch.empty(2, device="meta"), "meta tensor"),
        (Point(1, 2), "convert it to tuple"),
        (collections.defaultdict(int), "convert it to dict"),
        (collections.Counter("ab"), "convert it to dict"),
        (complex(1, 2), "cannot checkpoint"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else None,
)
def test_tree_refuses_naming_the_key(value, words):
    with pytest.raises(ckpt.UnsupportedValueError, match=words) as exc:
        treemod.encode({"outer": {"key": value}}, {}, set())
    assert str(exc.value).startswith("outer/key:")


@pytest.mark.parametrize(
    "value, words",
    [
        (Color.RED, "convert it to int"),
        (np.str_("a"), "convert it to str"),
        (torch.empty(2, device="meta"), "meta tensor"),
        (Point(1, 2), "convert it to tuple"),
        (collections.defaultdict(int, a=1), "convert it to dict"),
    ],
    ids=["IntEnum", "str_", "meta", "namedtuple", "defaultdict"],
)
def test_save_refuses_naming_the_key(tmp_path, value, words):
    with pytest.raises(ckpt.UnsupportedValueError, match=words) as exc:
        ckpt.save(f"file://{tmp_path}", {"outer": {"key": value}}, step=1)
    assert "outer/key" in str(exc.value)


def test_save_keeps_torch_size(tmp_path):
    ckpt.save(f"file://{tmp_path}", {"s": {"shape": torch.Size([2, 3])}}, step=1)
    assert same(ckpt.load(f"file://{tmp_path}")["s"]["shape"], torch.Size([2, 3]))


@pytest.mark.parametrize(
    "node",
    [
        {"$np": "object", "v": 1},
        {"$np": "int8", "v": 300},
        {"$np": "bool", "v": 1},
        {"$np": "float32", "hex": "00"},
        {"$np": "float32", "hex": "zzzzzzzz"},
        {"$size": [-1]},
        {"$size": [True]},
        {"$size": "x"},
        {"$bytearray": "!!"},
        {"$tensor": "t", "param": "yes"},
        {"$tensor": "t", "numpy": True, "byteorder": "|"},
        {"$tensor": "t", "byteorder": ">"},
        {"$tensor": "t", "numpy": True, "param": True},
        {"$tensor": "i", "requires_grad": True},
    ],
)
def test_decode_refuses_malformed_tags(node):
    tensors = {"t": torch.ones(2), "i": torch.ones(2, dtype=torch.int64)}
    with pytest.raises(SchemaError):
        treemod.decode({"k": node}, lambda p, is_np: tensors[p].numpy() if is_np else tensors[p])
