"""Damaged stores are refused with errors naming what is bad, never read as garbage.

Every object of a checkpoint is corrupted in turn (one flipped byte) and must be caught
by ``restore``, ``load`` and verification; then truncated and missing objects, broken
manifests, newer schemas and unknown codecs.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import ckpt
from ckpt.hooks.manager import get_plugins
from ckpt.io.verify import verify_manifest
from ckpt.storage.store import Store
from ckpt.testing import clone_state, corrupt_object, restore_object


def _state(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    return {
        "model": model,
        "optim": opt,
        "ints": torch.arange(5000, dtype=torch.int64) % 7,  # zstd-compressed
        "bf16": torch.randn(300, dtype=torch.bfloat16),  # byte-grouped
        "noise": torch.randint(0, 256, (257,), dtype=torch.uint8),  # stored raw
        "rng": ckpt.RNG(),
    }


@pytest.fixture
def saved(store_url):
    state = _state()
    ckpt.save(store_url, state, step=1)
    store = Store(store_url)
    manifest = ckpt.read_manifest(store.url, 1)
    users: dict[str, list[str]] = {}
    for path, entry in manifest.tensors.items():
        for ref in entry.chunks:
            users.setdefault(ref.key, []).append(path)
    return store_url, store, manifest, users


def _expect(exc_info, key: str, tensors: list[str]) -> None:
    msg = str(exc_info.value)
    assert key in msg, msg
    assert any(f"tensor {t!r}" in msg for t in tensors), f"no tensor of {tensors} named in: {msg}"


def test_flipped_byte_at_either_end_of_an_object(saved):
    url, store, manifest, users = saved
    key = manifest.tensors["bf16"].chunks[0].key
    size = len(store.get_object(key))
    assert size > 1
    for offset in (0, size - 1):
        original = corrupt_object(store, key, offset)
        with pytest.raises(ckpt.CorruptCheckpointError, match=key):
            ckpt.load(url)
        restore_object(store, key, original)


def test_truncated_and_extended_objects(saved):
    url, store, manifest, users = saved
    key = manifest.tensors["model/0.weight"].chunks[0].key
    original = store.get_object(key)
    for bad in (original[:-1], original[: len(original) // 2], b"", original + b"\0"):
        store.put_object(key, bad)
        with pytest.raises(ckpt.CorruptCheckpointError) as exc:
            ckpt.load(url)
        _expect(exc, key, users[key])
        assert "bytes" in str(exc.value)
        with pytest.raises(ckpt.CorruptCheckpointError):
            ckpt.restore(url, {"model": _state(1)["model"]})
        assert [p.key for p in verify_manifest(store, get_plugins().codecs, manifest)] == [key]
    store.put_object(key, original)
    ckpt.load(url)


def _rewrite_manifest(store: Store, step: int, change) -> None:
    doc = json.loads(store.read_manifest(step))
    change(doc)
    store.write(store.manifest_path(step), json.dumps(doc).encode())


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{not json",
        b"\xff\xfe garbage",
        b"[]",
        b'{"format": "other", "schema": 1}',
        b'{"format": "ckpt", "schema": "one"}',
        b'{"format": "ckpt", "schema": 1, "step": 1}',
    ],
    ids=["empty", "bad-json", "not-utf8", "list", "foreign", "bad-schema", "no-tensors"],
)
def test_malformed_manifest(saved, body):
    url, store, manifest, users = saved
    store.write(store.manifest_path(1), body)
    for call in (lambda: ckpt.load(url), lambda: ckpt.restore(url, _state(1))):
        with pytest.raises(ckpt.SchemaError) as exc:
            call()
        assert "step 1" in str(exc.value)
        assert isinstance(exc.value, ckpt.CorruptCheckpointError)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: d["tensors"]["ints"].update(nbytes=1), "do not add up"),
        (lambda d: d["tensors"]["ints"].update(dtype="float128"), "float128"),
        (lambda d: d["tensors"]["ints"].pop("chunks"), "malformed"),
        (lambda d: d.update(hash="md5"), "md5"),
    ],
    ids=["sizes", "dtype", "no-chunks", "hash"],
)
def test_inconsistent_manifest(saved, change, words):
    url, store, manifest, users = saved
    _rewrite_manifest(store, 1, change)
    with pytest.raises(ckpt.CorruptCheckpointError, match=re.escape(words)):
        ckpt.load(url)


def test_newer_schema_asks_for_upgrade(saved):
    url, store, manifest, users = saved
    _rewrite_manifest(store, 1, lambda d: d.update(schema=d["schema"] + 1))
    for call in (lambda: ckpt.load(url), lambda: ckpt.restore(url, _state(1))):
        with pytest.raises(ckpt.SchemaError, match="upgrade"):
            call()


def test_unknown_codec(saved):
    url, store, manifest, users = saved
    ref = manifest.tensors["bf16"].chunks[0]
    assert ref.codec and ref.codec[0]["name"] == "bgzstd"

    def rename(doc):
        for chunk in doc["tensors"]["bf16"]["chunks"]:
            chunk["codec"][0]["name"] = "zfp-lossy"

    _rewrite_manifest(store, 1, rename)
    live = _state(1)
    before = clone_state(live["bf16"])
    with pytest.raises(ckpt.UnknownCodecError) as exc:
        ckpt.restore(url, {"bf16": live["bf16"]})
    msg = str(exc.value)
    assert "zfp-lossy" in msg and "'bf16'" in msg and ref.key in msg and "plugin" in msg
    assert torch.equal(live["bf16"], before)
    with pytest.raises(ckpt.UnknownCodecError):
        ckpt.load(url)
    problems = verify_manifest(store, get_plugins().codecs, ckpt.read_manifest(store.url, 1))
    assert [p.tensor for p in problems] == ["bf16"]


def test_bad_manifest_does_not_stop_the_next_save(saved):
    url, store, manifest, users = saved
    store.write(store.manifest_path(1), b"{broken")
    info = ckpt.save(url, _state(), step=2)  # writes a full checkpoint instead of deduplicating
    assert info.parent is None
    restored = _state(3)
    ckpt.restore(url, restored)
    assert torch.equal(restored["ints"], torch.arange(5000) % 7)


def test_shared_object_reported_for_every_step_using_it(saved):
    url, store, manifest, users = saved
    ckpt.save(url, _state(), step=2)  # dedup: step 2 references step 1's objects
    key = manifest.tensors["ints"].chunks[0].key
    corrupt_object(store, key)
    for step in (1, 2):
        problems = verify_manifest(store, get_plugins().codecs, ckpt.read_manifest(store.url, step))
        assert [(p.step, p.key) for p in problems] == [(step, key)]
        with pytest.raises(ckpt.CorruptCheckpointError, match="'ints'"):
            ckpt.load(url, step=step)
