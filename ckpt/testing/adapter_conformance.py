"""AdapterConformance: the tests every state adapter must pass, for a subclass to inherit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.hooks.manager import get_plugins
from ckpt.state import tree as treemod
from ckpt.state.adapters import Adapter
from ckpt.storage.store import Store
from ckpt.testing.state import assert_same_state, clone_state, corrupt_object, restore_object
from ckpt.testing.store_urls import LOCAL_STORE_KINDS, temporary_store_url


class AdapterConformance:
    """Conformance tests for one kind of live object; subclass it in a pytest module::

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
    restore-undoes-a-later-mutation, determinism (an unchanged object saves nothing new),
    corruption and error tests, on a ``file://`` and a ``memory://`` store (override the
    ``conformance_url`` fixture for others).
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

    @pytest.fixture(params=LOCAL_STORE_KINDS)
    def conformance_url(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
        """The store each test runs against; override to add store kinds."""
        with temporary_store_url(request.param, tmp_path, label="conformance") as url:
            yield url

    # -- helpers ------------------------------------------------------------------------
    def adapter_for(self, obj: Any) -> Adapter:
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
        tensors: dict[str, torch.Tensor] = {}
        treemod.encode(adapter.state(obj), tensors, set())  # only tensors and JSON values

    def test_mutate_changes_state(self, make_object: Callable[[], Any], mutate: Callable[[Any], None]) -> None:
        obj = make_object()
        before = self.state_of(obj)
        mutate(obj)
        with pytest.raises(AssertionError):
            assert_same_state(self.state_of(obj), before)

    def test_load_round_trip_is_bit_exact(self, make_object: Any, mutate: Any, conformance_url: str) -> None:
        obj = make_object()
        mutate(obj)
        expected = self.state_of(obj)
        info = ckpt.save(conformance_url, {self.key: obj}, step=1)
        assert info.step == 1
        tree = ckpt.load(conformance_url)
        assert set(tree) == {self.key}
        assert_same_state(tree[self.key], expected)

    def test_restore_into_fresh_object(self, make_object: Any, mutate: Any, conformance_url: str) -> None:
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

    def test_restore_undoes_later_mutation(self, make_object: Any, mutate: Any, conformance_url: str) -> None:
        obj = make_object()
        mutate(obj)
        saved = self.state_of(obj)
        ckpt.save(conformance_url, {self.key: obj}, step=1)
        mutate(obj)
        # the checkpoint is a snapshot: changes after save do not reach it
        assert_same_state(ckpt.load(conformance_url)[self.key], saved)
        ckpt.restore(conformance_url, {self.key: obj})
        assert_same_state(self.state_of(obj), saved)

    def test_unchanged_object_writes_no_new_object(self, make_object: Any, mutate: Any, conformance_url: str) -> None:
        """The adapter's capture is deterministic: an unchanged object saves nothing new
        (what a store must do for that is StoreConformance's)."""
        obj = make_object()
        mutate(obj)
        ckpt.save(conformance_url, {self.key: obj}, step=1)
        store = Store(conformance_url)
        objects = {o.key for o in store.list_objects()}
        second = ckpt.save(conformance_url, {self.key: obj}, step=2)
        assert second.stored_bytes == len(store.read_manifest(2))
        assert {o.key for o in store.list_objects()} == objects

    def test_corruption_is_detected(self, make_object: Any, mutate: Any, conformance_url: str) -> None:
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

    def test_restore_into_wrong_kind_is_refused(self, make_object: Any, mutate: Any, conformance_url: str) -> None:
        obj = make_object()
        mutate(obj)
        ckpt.save(conformance_url, {self.key: obj}, step=1)
        with pytest.raises(ckpt.StateMismatchError, match=self.key):
            ckpt.restore(conformance_url, {self.key: self.other_object(obj)})

    def test_restore_of_absent_key_is_refused(self, make_object: Any, conformance_url: str) -> None:
        ckpt.save(conformance_url, {self.key: make_object()}, step=1)
        with pytest.raises(ckpt.StateMismatchError, match="absent"):
            ckpt.restore(conformance_url, {"absent": make_object()})
