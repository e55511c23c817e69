"""An attacker with write access to an encrypted store: every change they can make without the
key is a CorruptCheckpointError (never the attacker's data restored), and live objects stay
as they were.

The attacks: a flipped bit in an object or in a manifest (its ciphertext or its plain header),
an object swapped for another object of the store of the same size, a tensor pointed at another
object (a manifest rewritten: plain, or sealed with a key of the attacker's), a manifest copied
over another step (rollback), an older manifest copied over the newest, another store's
descriptor put in place.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import ckpt
from ckpt.errors import CorruptCheckpointError
from ckpt.security.envelope import FILE, StoreKeys
from ckpt.security.keys import Encryption

KEY = bytes(range(32))
N = 16 * 1024  # elements of each tensor: random bytes do not compress, so every object has one size


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(-(2**31), 2**31 - 1, (N,), dtype=torch.int32, generator=g) for k in "ab"}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Steps 1, 2, 3 of an encrypted store, each with new values of tensors a and b.

    Each tensor gets an object of its own (no packing), so one can be swapped for another."""
    monkeypatch.setenv("CKPT_PACK_BYTES", "0")
    url = f"file://{tmp_path}/s"
    enc = Encryption(KEY)
    for step in (1, 2, 3):
        ckpt.save(url, {"model": _tensors(step)}, step=step, encryption=enc)
    return url, tmp_path / "s"


def _object(root, key):
    return root / "objects" / key[:2] / key


def _refs(url, step):
    tensors = ckpt.read_manifest(url, step, encryption=Encryption(KEY)).tensors
    return {path.rsplit("/", 1)[-1]: entry.chunks[0] for path, entry in tensors.items()}


def _live():
    return {"model": {"a": torch.zeros(N, dtype=torch.int32), "b": torch.zeros(N, dtype=torch.int32)}}


def _refused(url, step=3):
    """Restoring ``step`` and loading it are refused; the live tensors keep their zeros."""
    live = _live()
    with pytest.raises(CorruptCheckpointError) as err:
        ckpt.restore(url, live, step=step, encryption=Encryption(KEY))
    assert all(not t.any() for t in live["model"].values()), "live objects unchanged"
    with pytest.raises(CorruptCheckpointError):
        ckpt.load(url, step=step, encryption=Encryption(KEY))
    return str(err.value)


def _flip(path, at=None):
    body = bytearray(path.read_bytes())
    body[len(body) // 2 if at is None else at] ^= 0x01
    path.write_bytes(bytes(body))


def test_untouched_store_restores(store):
    url, _root = store
    live = _live()
    ckpt.restore(url, live, step=3, encryption=Encryption(KEY))
    assert torch.equal(live["model"]["a"], _tensors(3)["a"])


@pytest.mark.parametrize("where", ["first byte (nonce)", "middle", "last byte (tag)"])
def test_flipped_bit_in_an_object(store, where):
    url, root = store
    path = _object(root, _refs(url, 3)["a"].key)
    size = path.stat().st_size
    _flip(path, {"first byte (nonce)": 0, "middle": size // 2, "last byte (tag)": size - 1}[where])
    assert "fails authentication" in _refused(url)


@pytest.mark.parametrize("part", ["ciphertext", "header"])
def test_flipped_bit_in_a_manifest(store, part):
    url, root = store
    path = root / "manifests" / "3.json"
    body = path.read_bytes()
    header_end = body.index(b"\n", body.index(b"\n") + 1)
    if part == "header":
        # the header's "run" value: still a valid header, but no longer the one sealed
        at = body.index(b'"run":"') + len(b'"run":"') + 3
        assert at < header_end
    else:
        at = header_end + 40
    _flip(path, at)
    assert "fails authentication" in _refused(url)


def test_object_swapped_for_another_object_of_the_same_size(store):
    url, root = store
    refs = _refs(url, 3)
    victim, other = _object(root, refs["a"].key), _object(root, refs["b"].key)
    assert victim.stat().st_size == other.stat().st_size
    shutil.copyfile(other, victim)
    message = _refused(url)
    assert "another object put in its place" in message and refs["a"].key in message


def test_object_swapped_for_an_older_version_of_itself(store):
    url, root = store
    old, new = _refs(url, 2)["a"], _refs(url, 3)["a"]
    assert old.stored == new.stored
    shutil.copyfile(_object(root, old.key), _object(root, new.key))
    _refused(url)


def _rewritten_manifest(url, root):
    """Manifest 3's JSON with tensor a pointed at tensor b's object (what an attacker wants)."""
    doc = json.loads(ckpt.read_manifest(url, 3, encryption=Encryption(KEY)).to_json_bytes())
    chunks = {path.rsplit("/", 1)[-1]: entry["chunks"] for path, entry in doc["tensors"].items()}
    chunks["a"][0] = dict(chunks["b"][0])
    return doc


def test_tensor_pointed_at_another_object_in_a_plain_manifest(store):
    url, root = store
    doc = _rewritten_manifest(url, root)
    (root / "manifests" / "3.json").write_bytes(json.dumps(doc).encode())
    assert "not encrypted in an encrypted store" in _refused(url)


def test_tensor_pointed_at_another_object_sealed_with_the_attackers_key(store):
    url, root = store
    doc = _rewritten_manifest(url, root)
    store_id = bytes.fromhex(json.loads((root / FILE).read_bytes())["store_id"])
    attacker = StoreKeys.derive(os.urandom(32), store_id, "static:attacker")
    manifest = ckpt.read_manifest(url, 3, encryption=Encryption(KEY))
    (root / "manifests" / "3.json").write_bytes(attacker.seal_manifest(json.dumps(doc).encode(), manifest))
    assert "fails authentication" in _refused(url)


def test_manifest_copied_over_another_step(store):
    url, root = store
    shutil.copyfile(root / "manifests" / "1.json", root / "manifests" / "2.json")
    assert "copied over another step" in _refused(url, step=2)
    assert torch.equal(ckpt.load(url, step=1, encryption=Encryption(KEY))["model"]["a"], _tensors(1)["a"])


def test_older_manifest_copied_over_the_newest(store):
    url, root = store
    shutil.copyfile(root / "manifests" / "2.json", root / "manifests" / "3.json")
    assert "rollback" in _refused(url, step=3)
    # the latest: never step 2's data passed off as step 3
    live = _live()
    try:
        info = ckpt.restore(url, live, encryption=Encryption(KEY))
    except CorruptCheckpointError:
        assert all(not t.any() for t in live["model"].values())
    else:
        assert info.step == 2 and torch.equal(live["model"]["a"], _tensors(2)["a"])


def test_header_step_edited_to_match_is_refused(store):
    """Copying manifest 2 over 3 and editing its plain header to say step 3: authentication fails."""
    url, root = store
    body = (root / "manifests" / "2.json").read_bytes()
    (root / "manifests" / "3.json").write_bytes(body.replace(b'"step":2', b'"step":3', 1))
    assert "fails authentication" in _refused(url)


def test_another_stores_descriptor_put_in_place(store, tmp_path):
    url, root = store
    other = f"file://{tmp_path}/other"
    ckpt.save(other, {"model": _tensors(9)}, step=1, encryption=Encryption(KEY))  # same key, another store
    shutil.copyfile(tmp_path / "other" / FILE, root / FILE)
    assert "another store" in _refused(url)


def test_truncated_object(store):
    url, root = store
    path = _object(root, _refs(url, 3)["b"].key)
    path.write_bytes(path.read_bytes()[:-1])
    _refused(url)
