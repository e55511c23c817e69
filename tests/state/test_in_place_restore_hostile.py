"""Restoring straight into the live tensors (see test_in_place_restore.py) against what
a store, a manifest or the live state may hold: a codec this reader lacks, live tensors
sharing memory, NumPy arrays, adapters whose check reads values, damage of every kind.

Whatever it is, it is refused before anything live changes, or restored exactly as a
restore through fresh memory would.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import xxhash

import ckpt
import ckpt.state.in_place as in_place_mod
from ckpt.hooks.manager import get_plugins
from ckpt.io.hashing import hash_bytes
from ckpt.storage.commit import load_manifest
from ckpt.storage.store import Store
from ckpt.testing import corrupt_object, rewrite_with_codec

KEY = bytes(range(32))


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def _chunks(monkeypatch):
    monkeypatch.setenv("CKPT_CHUNK_BYTES", str(512 * 1024))  # the large weights span several chunks


@pytest.fixture
def in_place(monkeypatch):
    """The paths of every read_tensors call of a restore that fills live tensors."""
    paths: list[str] = []
    real = in_place_mod.read_tensors

    def spy(store, codecs, plan, **kw):
        if kw.get("destinations"):
            paths.extend(plan.paths)
        return real(store, codecs, plan, **kw)

    monkeypatch.setattr(in_place_mod, "read_tensors", spy)
    return paths


def _edit_manifest(url: str, step: int, edit) -> None:
    store = Store(url)
    doc = json.loads(store.read_manifest(step))
    for path, entry in doc["tensors"].items():
        for chunk in entry["chunks"]:
            edit(path, chunk)
    store.write(store.manifest_path(step), json.dumps(doc).encode())


def _newer_codec(url: str, step: int, path: str) -> None:
    """``path``'s objects recorded as encoded by a codec this reader does not have (a newer
    ckpt's, or a plugin not installed here), their stored hashes recorded as such a writer would."""

    def edit(p, chunk):
        if p == path:
            assert chunk["codec"] and chunk["stored_hash"]
            chunk["codec"] = [dict(chunk["codec"][0], name="bgzstd2")]

    _edit_manifest(url, step, edit)


# -- a codec this reader lacks ---------------------------------------------------------


def test_a_codec_this_reader_lacks_is_refused_before_anything_live_changes(tmp_path):
    url = str(tmp_path / "store")
    ckpt.save(url, {"model": _model()}, step=1)
    _newer_codec(url, 1, "model/1.weight")
    fresh = _model(seed=3)
    before = _weights(fresh)
    with pytest.raises(ckpt.UnknownCodecError, match="bgzstd2") as err:
        ckpt.restore(url, {"model": fresh}, step=1)
    assert "partly overwritten" not in str(err.value)
    assert _same(_weights(fresh), before)


def test_restoring_the_latest_does_not_skip_a_checkpoint_that_needs_a_codec_this_reader_lacks(tmp_path):
    """Not damage: an older checkpoint restored instead would be silently older data."""
    url = str(tmp_path / "store")
    with ckpt.Checkpointer(url) as ck:
        ck.save({"model": _model(1)}, step=1).wait()
        ck.save({"model": _model(2)}, step=2).wait()
    _newer_codec(url, 2, "model/1.weight")
    fresh = _model(seed=3)
    before = _weights(fresh)
    with pytest.raises(ckpt.UnknownCodecError, match="bgzstd2"):
        ckpt.restore(url, {"model": fresh})
    assert _same(_weights(fresh), before)


# -- live tensors sharing memory --------------------------------------------------------


class _Pair(torch.nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.a = torch.nn.Linear(1024, 1024, bias=False)
        self.b = torch.nn.Linear(1024, 1024, bias=False)
        if tied:
            self.b.weight = self.a.weight


@pytest.mark.parametrize("attempt", range(3))
def test_tied_live_weights_take_an_untied_checkpoint_as_a_load_does(tmp_path, attempt):
    """Two live paths, one memory, two different stored tensors: decoding both into it at
    once mixed them (or failed their hash, saying the live tensors may be overwritten). A
    load copies one after the other: the second wins."""
    url = str(tmp_path / "store")
    torch.manual_seed(attempt)
    saved = _Pair(tied=False)
    ckpt.save(url, {"m": saved}, step=1)
    live = _Pair(tied=True)
    ckpt.restore(url, {"m": live}, step=1)
    assert live.a.weight is live.b.weight
    assert torch.equal(live.a.weight, saved.b.weight)


def test_tied_live_weights_holding_one_stored_tensor_are_read_once_in_place(tmp_path, in_place):
    url = str(tmp_path / "store")
    torch.manual_seed(0)
    saved = _Pair(tied=True)
    ckpt.save(url, {"m": saved}, step=1)
    live = _Pair(tied=True)
    ptr = live.a.weight.data_ptr()
    ckpt.restore(url, {"m": live}, step=1)
    assert live.a.weight is live.b.weight and live.a.weight.data_ptr() == ptr
    assert torch.equal(live.a.weight, saved.a.weight)
    assert len([p for p in in_place if p in ("m/a.weight", "m/b.weight")]) == 1


def test_tied_live_tensors_packed_apart_take_the_checkpoint_as_a_load_does(tmp_path):
    """Two small tensors packed in one object (their records cite the same object hash, at
    different offsets), restored into one live memory: not "the same stored bytes" read once
    (the first one's values for both), but loaded one after the other: the second wins."""
    url = str(tmp_path / "store")
    saved = torch.nn.ParameterDict({"a": torch.full((16,), 1.0), "b": torch.full((16,), 2.0)})
    ckpt.save(url, {"m": saved}, step=1)
    records = ckpt.read_manifest(url, 1).tensors
    assert records["m/a"].chunks[0].packed and records["m/a"].chunks[0].hash == records["m/b"].chunks[0].hash
    live = torch.nn.ParameterDict({"a": torch.zeros(16)})
    live["b"] = live["a"]
    ckpt.restore(url, {"m": live}, step=1)
    assert live["a"] is live["b"] and torch.equal(live["b"], saved["b"])


def test_overlapping_live_tensors_are_restored_as_a_load_does(tmp_path):
    """A plain tensor and a view of its first half, saved apart: the later key wins, as the
    loads copy them in order."""
    url = str(tmp_path / "store")
    torch.manual_seed(0)
    n = 1 << 19
    stored = {"whole": torch.randn(n), "half": torch.randn(n // 2)}
    ckpt.save(url, stored, step=1)
    whole = torch.zeros(n)
    live = {"whole": whole, "half": whole[: n // 2]}
    ckpt.restore(url, live, step=1)
    assert torch.equal(whole[: n // 2], stored["half"])
    assert torch.equal(whole[n // 2 :], stored["whole"][n // 2 :])


# -- NumPy arrays -----------------------------------------------------------------------


def test_a_live_numpy_array_is_replaced_not_written(tmp_path):
    """A restore gives a NumPy key a new array, as before: the live one may be read-only
    (a np.memmap opened 'r' segfaulted) or held elsewhere."""
    url = str(tmp_path / "store")
    saved = np.random.default_rng(0).standard_normal(1 << 19).astype(np.float32)
    ckpt.save(url, {"arr": saved, "model": _model()}, step=1)
    read_only = np.zeros(1 << 19, dtype=np.float32)
    read_only.flags.writeable = False
    state = {"arr": read_only, "model": _model(seed=3)}
    ckpt.restore(url, state, step=1)
    assert np.array_equal(state["arr"], saved)
    assert not read_only.any() and not np.shares_memory(state["arr"], read_only)


# -- requires_grad ----------------------------------------------------------------------


def test_a_restore_leaves_requires_grad_of_live_tensors_alone(tmp_path):
    url = str(tmp_path / "store")
    ckpt.save(url, {"w": torch.randn(1 << 18).requires_grad_()}, step=1)
    live = {"w": torch.zeros(1 << 18)}
    ckpt.restore(url, live, step=1)
    assert not live["w"].requires_grad and live["w"].any()


# -- adapters' checks -------------------------------------------------------------------


class _Counts:
    def __init__(self) -> None:
        self.counts = torch.zeros(1 << 18, dtype=torch.int64)


class _CountsAdapter:
    """An adapter whose check reads the values it is given."""

    name = "test.Counts"

    def handles(self, obj):
        return isinstance(obj, _Counts)

    def state(self, obj):
        return {"counts": obj.counts}

    def check(self, obj, tree):
        if (tree["counts"] < 0).any():
            raise ckpt.StateMismatchError("negative counts")

    def load(self, obj, tree):
        if (tree["counts"] < 0).any():
            raise RuntimeError("negative counts")
        obj.counts.copy_(tree["counts"])


def test_an_adapters_check_sees_the_checkpoints_values_before_anything_live_changes(tmp_path):
    get_plugins().adapters(_CountsAdapter())
    url = str(tmp_path / "store")
    bad = _Counts()
    bad.counts -= 1
    ckpt.save(url, {"model": _model(), "c": bad}, step=1)
    live, model = _Counts(), _model(seed=3)
    before = _weights(model)
    with pytest.raises(ckpt.StateMismatchError, match="negative counts"):
        ckpt.restore(url, {"model": model, "c": live}, step=1)
    assert _same(_weights(model), before) and not live.counts.any()


# -- damage found before anything live changes (these held) ----------------------------


def _encoded_keys(url: str, step: int, **kw) -> list[str]:
    m = ckpt.read_manifest(url, step, **kw)
    return sorted({c.key for e in m.tensors.values() for c in e.chunks if c.codec and c.stored_hash and not c.packed})


@pytest.mark.parametrize("damage", ["symlink-outside", "deleted", "extended", "swapped"])
def test_damaged_encoded_objects_change_nothing_live(tmp_path, damage):
    url = str(tmp_path / "store")
    ckpt.save(url, {"model": _model()}, step=1)
    store = Store(url)
    keys = _encoded_keys(url, 1)
    victim = store.object_path(keys[-1])
    if damage == "symlink-outside":
        outside = tmp_path / "outside"
        with open(victim, "rb") as f:
            outside.write_bytes(f.read())  # the very bytes: only the place is wrong
        os.remove(victim)
        os.symlink(outside, victim)
    elif damage == "deleted":
        os.remove(victim)
    elif damage == "extended":
        with open(victim, "ab") as f:
            f.write(b"\0")
    else:
        with open(store.object_path(keys[0]), "rb") as f:  # another object of the checkpoint, whole
            data = f.read()
        os.chmod(victim, 0o644)
        with open(victim, "wb") as f:
            f.write(data)
    fresh = _model(seed=3)
    before = _weights(fresh)
    with pytest.raises(ckpt.CorruptCheckpointError, match=keys[-1]) as err:
        ckpt.restore(url, {"model": fresh}, step=1)
    assert "partly overwritten" not in str(err.value)
    assert _same(_weights(fresh), before)


def test_an_encrypted_store_is_decoded_in_place_and_damage_found_first(tmp_path, in_place):
    url = str(tmp_path / "store")
    enc = ckpt.Encryption(KEY)
    saved = _model()
    ckpt.save(url, {"model": saved}, step=1, encryption=enc)
    fresh = _model(seed=3)
    ckpt.restore(url, {"model": fresh}, step=1, encryption=enc)
    assert _same(_weights(fresh), _weights(saved)) and "model/0.weight" in in_place
    corrupt_object(Store(url), _encoded_keys(url, 1, encryption=enc)[0])
    fresh = _model(seed=4)
    before = _weights(fresh)
    with pytest.raises(ckpt.CorruptCheckpointError) as err:
        ckpt.restore(url, {"model": fresh}, step=1, encryption=enc)
    assert "partly overwritten" not in str(err.value)
    assert _same(_weights(fresh), before)


def test_restoring_the_latest_repairs_what_a_forged_stored_hash_overwrote(tmp_path):
    """The accepted exception, found while decoding in place: the fallback to the older
    checkpoint restores every live tensor of it."""
    url = str(tmp_path / "store")
    first = _model(1)
    with ckpt.Checkpointer(url) as ck:
        ck.save({"model": first}, step=1).wait()
        ck.save({"model": _model(2)}, step=2).wait()
    store = Store(url)
    m = load_manifest(store, 2)
    ref = next(c for c in m.tensors["model/1.weight"].chunks if c.stored_hash and "xor" not in str(c.codec))
    bad = bytearray(store.get_object(ref.key))
    bad[len(bad) // 2] ^= 0xFF
    with open(store.object_path(ref.key), "wb") as f:
        f.write(bad)
    forged = xxhash.xxh3_128_hexdigest(bytes(bad))
    _edit_manifest(url, 2, lambda p, c: c.__setitem__("stored_hash", forged) if c["key"] == ref.key else None)
    fresh = _model(seed=3)
    assert ckpt.restore(url, {"model": fresh}).step == 1
    assert _same(_weights(fresh), _weights(first))


# -- ckpt.testing -----------------------------------------------------------------------


def test_objects_rewritten_with_a_codec_by_the_testing_kit_restore_in_place(tmp_path, in_place):
    """rewrite_with_codec kept the stored hash of the objects it replaced: an intact store
    was refused as corrupt."""
    url = str(tmp_path / "store")
    torch.manual_seed(0)
    w = torch.randn(1 << 19) * 0.02
    ckpt.save(url, {"w": w}, step=1)
    assert rewrite_with_codec(url, 1, "zstd")
    live = {"w": torch.zeros(1 << 19)}
    ckpt.restore(url, live, step=1)
    assert torch.equal(live["w"], w) and "w" in in_place


# -- encrypted objects sealed again -----------------------------------------------------


def test_a_checkpoint_whose_encrypted_object_a_later_save_sealed_again_restores(tmp_path, in_place):
    """The same content under the same key, sealed with a new nonce: other stored bytes than
    the older manifest records, an intact object. Refusing it lost a committed checkpoint."""
    url = str(tmp_path / "store")
    enc = ckpt.Encryption(KEY)
    torch.manual_seed(0)
    a, b = torch.randn(1 << 19) * 0.02, torch.randn(1 << 19) * 0.02
    ckpt.save(url, {"w": a}, step=1, encryption=enc)
    ckpt.save(url, {"w": b}, step=2, encryption=enc)
    ckpt.save(url, {"w": a}, step=3, encryption=enc)  # the parent (step 2) does not hold a: written again
    first, third = (ckpt.read_manifest(url, s, encryption=enc).tensors["w"].chunks for s in (1, 3))
    assert [c.key for c in first] == [c.key for c in third]
    assert [c.stored_hash for c in first] != [c.stored_hash for c in third]
    live = {"w": torch.zeros(1 << 19)}
    assert ckpt.restore(url, live, step=1, encryption=enc).step == 1
    assert torch.equal(live["w"], a) and "w" in in_place


# -- a plugin's delta codec -------------------------------------------------------------


class _XorWithParent:
    """A plugin's delta codec: the payload xor the parent object its step cites."""

    name = "test-xorp"

    def encode(self, data, ctx):
        return None  # (written by the test itself)

    def decode(self, payload, out, params, ctx):
        parent = ctx.raw_chunk(params["parent"])
        np.bitwise_xor(
            np.frombuffer(payload, np.uint8), np.frombuffer(parent, np.uint8), out=np.frombuffer(out, np.uint8)
        )


def test_a_damaged_parent_of_a_plugin_delta_changes_nothing_live(tmp_path, in_place):
    """Any codec step citing a parent decodes through it: hashing the object's own bytes does
    not verify it (only ckpt's own xor was read through fresh memory)."""
    get_plugins().codecs(_XorWithParent())
    url = str(tmp_path / "store")
    torch.manual_seed(0)
    w = torch.randn(1 << 19) * 0.02
    ckpt.save(url, {"w": w}, step=1)
    store = Store(url)
    doc = json.loads(store.read_manifest(1))
    raw, at, parents = w.numpy().view(np.uint8), 0, []
    for c in doc["tensors"]["w"]["chunks"]:
        n = c["size"]
        parent = np.random.default_rng(at).integers(0, 256, n, dtype=np.uint8).tobytes()
        parents.append(hash_bytes(parent))
        store.put_object(parents[-1], parent)
        payload = (raw[at : at + n] ^ np.frombuffer(parent, np.uint8)).tobytes()
        store.put_object(c["key"], payload)
        record = {"hash": parents[-1], "key": parents[-1], "size": n, "stored": n, "codec": []}
        c.update(codec=[{"name": "test-xorp", "parent": record}], stored=n, stored_hash=hash_bytes(payload))
        at += n
    store.write(store.manifest_path(1), json.dumps(doc).encode())
    live = {"w": torch.zeros(1 << 19)}
    ckpt.restore(url, live, step=1)
    assert torch.equal(live["w"], w) and "w" not in in_place
    corrupt_object(store, parents[-1])
    live = {"w": torch.zeros(1 << 19)}
    with pytest.raises(ckpt.CorruptCheckpointError, match=parents[-1]) as err:
        ckpt.restore(url, live, step=1)
    assert "partly overwritten" not in str(err.value)
    assert not live["w"].any()
