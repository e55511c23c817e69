"""StoreConformance: ckpt's storage contract, checked on one kind of store by a subclass.

What any fsspec backend must give ckpt (DESIGN.md, "Storage contract"): bit-exact round
trips; objects durable and listed before the manifest is written, the manifest before
``refs/latest``; an unchanged save writing only its manifest; a missing or stale ref
repaired by scanning manifests; damage refused with errors that name the object; and
retention that deletes whole checkpoints, then the objects nothing retained needs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

import ckpt
from ckpt.codecs.delta import referenced_keys
from ckpt.hooks.manager import get_plugins
from ckpt.io.verify import verify_manifest
from ckpt.storage.retention import prune
from ckpt.storage.store import Store
from ckpt.testing.state import assert_same_state, clone_state, corrupt_object, restore_object, stored_objects

#: chunks small enough that the test state spans several objects per tensor
CHUNK_BYTES = 16 * 1024


def contract_state(seed: int = 0) -> dict[str, Any]:
    """A small state stored in every form: byte-grouped floats over several chunks, zstd ints,
    raw noise, an empty tensor, a NumPy array and JSON values."""
    g = torch.Generator().manual_seed(seed)
    return {
        "weights": torch.randn(64, 257, generator=g) * 0.02,
        "half": (torch.randn(1000, generator=g) * 0.02).bfloat16(),
        "ids": torch.arange(5000) % 7,
        "noise": torch.randint(0, 256, (3000,), dtype=torch.uint8, generator=g),
        "flags": torch.rand(17, generator=g) > 0.5,
        "empty": torch.zeros(0, 3),
        "array": np.arange(12, dtype=np.int16).reshape(3, 4) * (seed + 1),
        "meta": {"epoch": seed, "lr": 0.1, "name": "run", "nan": float("nan")},
    }


@contextlib.contextmanager
def spy_writes(before: Callable[[str, memoryview | bytes], None] | None = None) -> Iterator[list[str]]:
    """Every path :class:`~ckpt.storage.store.Store` writes, in order, while the block runs.

    The writes themselves happen as usual; ``before(path, data)`` runs before each one.
    """
    written: list[str] = []
    lock = threading.Lock()
    real = Store.write

    def write(self: Store, path: str, data: memoryview | bytes) -> None:
        if before is not None:
            before(path, data)
        with lock:
            written.append(path)
        real(self, path, data)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Store, "write", write)
        yield written


class StoreConformance:
    """Storage-contract tests for one kind of store; subclass it in a pytest module::

        class TestMyStore(StoreConformance):
            @pytest.fixture
            def store_url(self, my_server):
                return my_server.new_url()           # a fresh, empty store, every test

            @pytest.fixture
            def storage_options(self, my_server):
                return my_server.storage_options     # optional (default: none)

    ckpt's :func:`~ckpt.testing.temporary_store_url` makes such URLs and cleans up after them.
    """

    # -- what a subclass provides -----------------------------------------------------
    @pytest.fixture
    def store_url(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} must define a `store_url` fixture (a fresh, empty store)")

    @pytest.fixture
    def storage_options(self) -> dict[str, Any]:
        return {}

    @pytest.fixture(autouse=True)
    def _small_chunks(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CKPT_CHUNK_BYTES", str(CHUNK_BYTES))

    # -- helpers ------------------------------------------------------------------------
    def save(self, url: str, options: dict[str, Any], step: int, seed: int = 0) -> dict[str, Any]:
        """Save :func:`contract_state` ``(seed)`` as ``step``; returns a copy of what was saved."""
        state = contract_state(seed)
        ckpt.save(url, state, step=step, storage_options=options)
        return clone_state(state)

    def users(self, url: str, options: dict[str, Any], step: int) -> dict[str, list[str]]:
        """Object key -> the tensors of checkpoint ``step`` stored in it."""
        users: dict[str, list[str]] = {}
        for path, entry in ckpt.read_manifest(url, step, options).tensors.items():
            for ref in entry.chunks:
                users.setdefault(ref.key, []).append(path)
        return users

    @staticmethod
    def _kind_of(store: Store, step: int) -> Callable[[str], str | None]:
        def kind(path: str) -> str | None:
            if path.startswith(store.path("objects") + "/"):
                return "object"
            if path == store.manifest_path(step):
                return "manifest"
            return "ref" if path == store.path("refs", "latest") else None

        return kind

    @staticmethod
    def assert_names(exc: BaseException, key: str, tensors: list[str]) -> None:
        msg = str(exc)
        assert key in msg, msg
        assert any(f"tensor {t!r}" in msg for t in tensors), f"no tensor of {tensors} named in: {msg}"

    # -- the tests ----------------------------------------------------------------------
    def test_round_trip_is_bit_exact(self, store_url: str, storage_options: dict[str, Any]) -> None:
        expected = self.save(store_url, storage_options, step=1)
        manifest = ckpt.read_manifest(store_url, 1, storage_options)
        assert len(manifest.tensors["weights"].chunks) > 1, "the state should span several objects"
        assert_same_state(ckpt.load(store_url, storage_options=storage_options), expected)
        live = contract_state(seed=7)
        info = ckpt.restore(store_url, live, storage_options=storage_options)
        assert info.step == 1
        assert_same_state(clone_state(live), expected)

    def test_objects_are_written_before_the_manifest_before_the_ref(
        self, store_url: str, storage_options: dict[str, Any]
    ) -> None:
        store = Store(store_url, storage_options)
        ref_path = store.path("refs", "latest")
        problems: list[str] = []

        def check(path: str, data: memoryview | bytes) -> None:
            # what a reader in another process would see at this instant
            if path.startswith(store.path("manifests") + "/"):
                manifest = ckpt.Manifest.from_json_bytes(bytes(data), where=path)
                listed = stored_objects(Store(store_url, storage_options))
                for ref in manifest.chunk_refs():
                    if listed.get(ref.key) != ref.stored:
                        problems.append(f"{path} written while object {ref.key} lists as {listed.get(ref.key)}")
                if manifest.step in ckpt.steps(store_url, storage_options):
                    problems.append(f"step {manifest.step} listed before its manifest was written")
            elif path == ref_path:
                step = ckpt.steps(store_url, storage_options)[-1:]
                if not step or ckpt.read_manifest(store_url, step[0], storage_options).step != step[0]:
                    problems.append(f"refs/latest written before any readable manifest: steps {step}")

        for step, seed in ((1, 0), (2, 1)):
            with spy_writes(check) as written:
                self.save(store_url, storage_options, step=step, seed=seed)
            order = [kind for kind in map(self._kind_of(store, step), written) if kind]
            assert "object" in order, f"step {step} wrote no object: {written}"
            first_manifest = order.index("manifest")
            assert set(order[:first_manifest]) == {"object"}, f"step {step}: writes out of order: {order}"
            assert order[first_manifest:] == ["manifest", "ref"], f"step {step}: writes out of order: {order}"
        assert not problems, problems
        assert ckpt.latest_step(store_url, storage_options) == 2 and store.read_latest() == 2

    def test_unchanged_second_save_writes_only_the_manifest(
        self, store_url: str, storage_options: dict[str, Any]
    ) -> None:
        state = contract_state()
        first = ckpt.save(store_url, state, step=1, storage_options=storage_options)
        store = Store(store_url, storage_options)
        objects = stored_objects(store)
        assert first.stored_bytes == len(store.read_manifest(1)) + sum(objects.values())
        with spy_writes() as written:
            second = ckpt.save(store_url, state, step=2, storage_options=storage_options)
        # the writer lease (leases/) is bookkeeping, not checkpoint data
        leases = store.path("leases") + "/"
        assert [p for p in written if not p.startswith(leases)] == [
            store.manifest_path(2),
            store.path("refs", "latest"),
        ]
        assert second.stored_bytes == len(store.read_manifest(2))
        assert second.raw_bytes == first.raw_bytes and second.parent == 1
        assert stored_objects(store) == objects
        m1, m2 = (ckpt.read_manifest(store_url, s, storage_options) for s in (1, 2))
        assert m2.chunk_refs() == m1.chunk_refs()

    def test_steps_latest_step_and_read_manifest(self, store_url: str, storage_options: dict[str, Any]) -> None:
        assert ckpt.steps(store_url, storage_options) == []
        assert ckpt.latest_step(store_url, storage_options) is None
        with pytest.raises(ckpt.NoCheckpointError):
            ckpt.read_manifest(store_url, storage_options=storage_options)
        for step in (1, 2, 5):
            self.save(store_url, storage_options, step=step, seed=step)
        assert ckpt.steps(store_url, storage_options) == [1, 2, 5]
        assert ckpt.latest_step(store_url, storage_options) == 5
        newest = ckpt.read_manifest(store_url, storage_options=storage_options)
        assert newest.step == 5 and newest.parent == 2
        assert set(newest.tensors) == {"weights", "half", "ids", "noise", "flags", "empty", "array"}
        weights = newest.tensors["weights"]
        assert (weights.dtype, weights.shape, weights.nbytes) == ("float32", (64, 257), 64 * 257 * 4)
        assert newest.adapters == {} and newest.tree["meta"]["epoch"] == 5
        assert ckpt.read_manifest(store_url, 2, storage_options).step == 2
        with pytest.raises(ckpt.NoCheckpointError, match="step 3"):
            ckpt.read_manifest(store_url, 3, storage_options)
        with pytest.raises(ckpt.CheckpointError, match="step"):
            ckpt.read_manifest(store_url, -1, storage_options)

    def test_missing_or_stale_ref_is_repaired(self, store_url: str, storage_options: dict[str, Any]) -> None:
        expected = {step: self.save(store_url, storage_options, step=step, seed=step) for step in (1, 2, 5)}
        store = Store(store_url, storage_options)
        ref = store.path("refs", "latest")

        def unreadable(body: bytes) -> Callable[[], None]:
            return lambda: store.write(ref, body)

        damages: dict[str, Callable[[], None]] = {
            "stale": lambda: store.write_latest(2),  # a crash between manifest and ref
            "missing": lambda: store.delete(ref),
            "past the newest": lambda: store.write_latest(9),  # names a manifest never written
            **{f"unreadable {b!r}": unreadable(b) for b in (b"", b"\x00not json", b'{"step": "x"}', b"{}")},
        }
        for damage, do in damages.items():
            do()
            assert ckpt.latest_step(store_url, storage_options) == 5, damage
            assert_same_state(ckpt.load(store_url, storage_options=storage_options), expected[5], damage)
            assert store.latest_step(repair=True) == 5 and store.read_latest() == 5, f"{damage}: not repaired"
        # a save repairs a lost ref too, and still deduplicates against the newest manifest
        store.delete(ref)
        info = ckpt.save(store_url, contract_state(5), step=6, storage_options=storage_options)
        assert info.parent == 5 and store.read_latest() == 6
        assert info.stored_bytes == len(store.read_manifest(6))

    def test_missing_object_is_named(self, store_url: str, storage_options: dict[str, Any]) -> None:
        self.save(store_url, storage_options, step=1)
        store = Store(store_url, storage_options)
        users = self.users(store_url, storage_options, 1)
        key = ckpt.read_manifest(store_url, 1, storage_options).tensors["weights"].chunks[0].key
        store.delete(store.object_path(key))
        with pytest.raises(ckpt.MissingObjectError) as exc:
            ckpt.restore(store_url, contract_state(1), storage_options=storage_options)
        self.assert_names(exc.value, key, users[key])
        assert store_url.split("://", 1)[-1] in str(exc.value)
        with pytest.raises(ckpt.MissingObjectError) as exc:
            ckpt.load(store_url, storage_options=storage_options)
        self.assert_names(exc.value, key, users[key])
        problems = verify_manifest(store, get_plugins().codecs, ckpt.read_manifest(store_url, 1, storage_options))
        assert [p.key for p in problems] == [key] and "missing" in problems[0].error
        # keys of the state that do not use the object still restore
        ids = {"ids": torch.zeros(5000, dtype=torch.int64)}
        ckpt.restore(store_url, ids, storage_options=storage_options)
        assert torch.equal(ids["ids"], torch.arange(5000) % 7)

    def test_flipped_byte_is_named(self, store_url: str, storage_options: dict[str, Any]) -> None:
        expected = self.save(store_url, storage_options, step=1)
        store = Store(store_url, storage_options)
        manifest = ckpt.read_manifest(store_url, 1, storage_options)
        users = self.users(store_url, storage_options, 1)
        forms: dict[tuple[str, ...], list[str]] = {}
        for ref in manifest.chunk_refs():
            forms.setdefault(tuple(str(s["name"]) for s in ref.codec), []).append(ref.key)
        assert {("bgzstd",), ("zstd",), ()} <= set(forms), f"every storage form is damaged once: {sorted(forms)}"
        assert len(users) == len(stored_objects(store))
        # local stores: every object; remote ones (slower): the first object of each form
        keys = sorted(users) if store_url.startswith(("file://", "memory://")) else sorted(k[0] for k in forms.values())
        for key in keys:
            original = corrupt_object(store, key)
            with pytest.raises(ckpt.CorruptCheckpointError) as exc:
                ckpt.restore(store_url, contract_state(1), storage_options=storage_options)
            self.assert_names(exc.value, key, users[key])
            with pytest.raises(ckpt.CorruptCheckpointError) as exc:
                ckpt.load(store_url, storage_options=storage_options)
            self.assert_names(exc.value, key, users[key])
            problems = verify_manifest(store, get_plugins().codecs, manifest)
            assert [p.key for p in problems] == [key]
            assert problems[0].tensor in users[key] and problems[0].step == 1 and key in problems[0].error
            restore_object(store, key, original)
        assert verify_manifest(store, get_plugins().codecs, manifest) == []
        assert_same_state(ckpt.load(store_url, storage_options=storage_options), expected)

    def test_prune_deletes_old_checkpoints_then_unneeded_objects(
        self, store_url: str, storage_options: dict[str, Any]
    ) -> None:
        expected = {step: self.save(store_url, storage_options, step=step, seed=step) for step in (1, 2, 3, 4)}
        store = Store(store_url, storage_options)
        before = stored_objects(store)
        orphan = "0123456789abcdef" * 2  # what a crashed save leaves: an object no manifest names
        store.put_object(orphan, b"left behind")
        # default grace period: every object is young and may belong to a save in flight
        result = prune(Store(store_url, storage_options), keep_last=2)
        assert (result.kept_steps, result.removed_steps, result.removed_objects) == ((3, 4), (1, 2), 0)
        assert ckpt.steps(store_url, storage_options) == [3, 4]
        assert ckpt.latest_step(store_url, storage_options) == 4
        assert set(stored_objects(store)) == set(before) | {orphan}
        # no grace (nothing in flight): what no retained checkpoint needs is swept, the rest stays
        needed = {
            key
            for step in (3, 4)
            for ref in ckpt.read_manifest(store_url, step, storage_options).chunk_refs()
            for key in referenced_keys(ref.to_json())
        }
        again = prune(Store(store_url, storage_options), keep_last=2, grace_seconds=0)
        assert again.removed_steps == () and again.removed_objects == len(set(before) - needed) + 1
        assert set(stored_objects(store)) == needed
        for step in (3, 4):
            assert_same_state(ckpt.load(store_url, step=step, storage_options=storage_options), expected[step])
