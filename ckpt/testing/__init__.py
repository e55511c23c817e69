"""Test helpers for ckpt and for authors of ckpt plugins (needs pytest).

Like fsspec's conformance suites, :class:`AdapterConformance` gives an adapter author
a whole battery of tests by subclassing it in a pytest module::

    import pytest
    from ckpt.testing import AdapterConformance

    class TestMyThing(AdapterConformance):
        adapter_name = "mypkg.MyThing"          # optional: the adapter expected to win

        @pytest.fixture
        def make_object(self):
            return lambda: MyThing(size=8)      # a fresh live object, every call

        @pytest.fixture
        def mutate(self):
            def mutate(obj):
                obj.train_one_step()            # change its state (must change it)
            return mutate

The subclass gets round-trip (``load``), bit-exactness, restore-into-a-fresh-object,
restore-undoes-a-later-mutation, dedup, corruption and error tests for free, on a
``file://`` and a ``memory://`` store (override the ``conformance_url`` fixture to add
others). :func:`assert_same_state` compares two state trees bit for bit.
"""

from __future__ import annotations

import copy
import math
import struct
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
import torch

import ckpt
from ckpt.hooks.manager import get_plugins
from ckpt.storage.store import Store

__all__ = [
    "AdapterConformance",
    "make_training_state",
    "assert_same_state",
    "clone_state",
    "corrupt_object",
    "tensor_bits",
]


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


class AdapterConformance:
    """Conformance tests for one kind of live object; subclass it in a pytest module.

    Provide the fixtures ``make_object`` (returns a callable building a fresh live
    object) and ``mutate`` (returns a callable that changes an object's state in
    place). Set ``adapter_name`` to check which adapter handles the object.
    """

    #: name of the adapter expected to handle ``make_object()``'s objects (None: any)
    adapter_name: str | None = None
    #: the key the object is saved under
    key: str = "obj"

    # -- what a subclass provides -----------------------------------------------------
    @pytest.fixture
    def make_object(self) -> Callable[[], Any]:
        raise NotImplementedError(f"{type(self).__name__} must define a `make_object` fixture returning a factory")

    @pytest.fixture
    def mutate(self) -> Callable[[Any], None]:
        raise NotImplementedError(f"{type(self).__name__} must define a `mutate` fixture returning a function")

    @pytest.fixture(params=["file", "memory"])
    def conformance_url(self, request: Any, tmp_path: Any) -> Any:
        """The store each test runs against; override to add store kinds."""
        if request.param == "file":
            yield f"file://{tmp_path}/conformance"
            return
        import fsspec

        url = f"memory://ckpt-conformance-{uuid.uuid4().hex}"
        yield url
        fs = fsspec.filesystem("memory")
        root = url.removeprefix("memory://")
        if fs.exists(root):
            fs.rm(root, recursive=True)

    # -- helpers ------------------------------------------------------------------------
    def adapter_for(self, obj: Any) -> Any:
        adapter = get_plugins().adapters.for_object(obj)
        assert adapter is not None, f"no registered adapter handles {type(obj).__qualname__}"
        return adapter

    def state_of(self, obj: Any) -> Any:
        """A detached copy of ``obj``'s state as its adapter captures it."""
        return clone_state(self.adapter_for(obj).state(obj))

    def other_object(self, obj: Any) -> Any:
        """A live object some *other* adapter handles (for the wrong-kind test)."""
        name = self.adapter_for(obj).name
        return torch.Generator() if name == "ckpt.RNG" else ckpt.RNG()

    # -- the tests ----------------------------------------------------------------------
    def test_adapter_handles_object(self, make_object: Callable[[], Any]) -> None:
        obj = make_object()
        adapter = self.adapter_for(obj)
        if self.adapter_name is not None:
            assert adapter.name == self.adapter_name
        assert get_plugins().adapters.get(adapter.name) is adapter
        from ckpt.state import tree as treemod

        tensors: dict[str, torch.Tensor] = {}
        treemod.encode(adapter.state(obj), tensors, set())  # only tensors and JSON values

    def test_mutate_changes_state(self, make_object: Callable[[], Any], mutate: Callable[[Any], None]) -> None:
        obj = make_object()
        before = self.state_of(obj)
        mutate(obj)
        with pytest.raises(AssertionError):
            assert_same_state(self.state_of(obj), before)

    def test_load_round_trip_is_bit_exact(self, make_object, mutate, conformance_url) -> None:
        obj = make_object()
        mutate(obj)
        expected = self.state_of(obj)
        info = ckpt.save(conformance_url, {self.key: obj}, step=1)
        assert info.step == 1
        tree = ckpt.load(conformance_url)
        assert set(tree) == {self.key}
        assert_same_state(tree[self.key], expected)

    def test_restore_into_fresh_object(self, make_object, mutate, conformance_url) -> None:
        obj = make_object()
        mutate(obj)
        expected = self.state_of(obj)
        ckpt.save(conformance_url, {self.key: obj}, step=3)
        fresh = make_object()
        state = {self.key: fresh}
        info = ckpt.restore(conformance_url, state)
        assert info.step == 3
        assert state[self.key] is fresh, "restore must load into the live object, not replace it"
        assert_same_state(self.state_of(fresh), expected)

    def test_restore_undoes_later_mutation(self, make_object, mutate, conformance_url) -> None:
        obj = make_object()
        mutate(obj)
        saved = self.state_of(obj)
        ckpt.save(conformance_url, {self.key: obj}, step=1)
        mutate(obj)
        # the checkpoint is a snapshot: changes after save do not reach it
        assert_same_state(ckpt.load(conformance_url)[self.key], saved)
        ckpt.restore(conformance_url, {self.key: obj})
        assert_same_state(self.state_of(obj), saved)

    def test_unchanged_second_save_writes_only_the_manifest(self, make_object, mutate, conformance_url) -> None:
        obj = make_object()
        mutate(obj)
        ckpt.save(conformance_url, {self.key: obj}, step=1)
        store = Store(conformance_url)
        objects = {o.key for o in store.list_objects()}
        second = ckpt.save(conformance_url, {self.key: obj}, step=2)
        assert second.stored_bytes == len(store.read_manifest(2))
        assert {o.key for o in store.list_objects()} == objects

    def test_corruption_is_detected(self, make_object, mutate, conformance_url) -> None:
        obj = make_object()
        mutate(obj)
        ckpt.save(conformance_url, {self.key: obj}, step=1)
        store = Store(conformance_url)
        for info in list(store.list_objects()):
            original = corrupt_object(store, info.key)
            with pytest.raises(ckpt.CorruptCheckpointError, match=info.key):
                ckpt.restore(conformance_url, {self.key: make_object()})
            with pytest.raises(ckpt.CorruptCheckpointError, match=info.key):
                ckpt.load(conformance_url)
            restore_object(store, info.key, original)
        # a damaged manifest is refused too, naming the step
        path = store.manifest_path(1)
        body = store.read(path)
        store.write(path, body[: len(body) // 2])
        with pytest.raises(ckpt.CorruptCheckpointError, match="step 1"):
            ckpt.restore(conformance_url, {self.key: make_object()})

    def test_restore_into_wrong_kind_is_refused(self, make_object, mutate, conformance_url) -> None:
        obj = make_object()
        mutate(obj)
        ckpt.save(conformance_url, {self.key: obj}, step=1)
        with pytest.raises(ckpt.StateMismatchError, match=self.key):
            ckpt.restore(conformance_url, {self.key: self.other_object(obj)})

    def test_restore_of_absent_key_is_refused(self, make_object, conformance_url) -> None:
        ckpt.save(conformance_url, {self.key: make_object()}, step=1)
        with pytest.raises(ckpt.StateMismatchError, match="absent"):
            ckpt.restore(conformance_url, {"absent": make_object()})


def make_training_state(seed: int = 0, width: int = 32):
    """A small model + AdamW + scheduler + scaler, stepped so optimizer state exists."""
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
