"""Encryption at rest: round trips, nothing readable at rest, keys, mixing, dedup and deltas,
rotation, verify without a key, remote stores (moto S3, azurite)."""

from __future__ import annotations

import base64
import json
import os
import re

import fsspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt
from ckpt.errors import CheckpointError, CorruptCheckpointError, EncryptionError
from ckpt.hooks.manager import get_plugins
from ckpt.io.verify import verify_manifest
from ckpt.security.audit import check_without_key
from ckpt.security.envelope import FILE, open_store, rewrap
from ckpt.security.keys import Encryption, StaticKeyProvider
from ckpt.storage.commit import load_manifest
from ckpt.storage.store import Store

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
SECRET_NAME = "secret_projection_weights"
SECRET_VALUE = "TOP-SECRET-RUN-NOTE-4711"


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 32, generator=g)).sum().backward()
    opt.step()
    return {
        "model": model,
        "optim": opt,
        # random bytes do not compress: at rest verbatim unless encrypted
        SECRET_NAME: torch.randint(0, 256, (8192,), dtype=torch.uint8, generator=g),
        "meta": {"note": SECRET_VALUE, "epoch": 3},
        "ids": np.arange(100, dtype=np.int64),
    }


def _files(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    return {p: fs.cat_file(p) for p in fs.find(root)}


def _needles(state: dict) -> dict[str, bytes]:
    raw = state[SECRET_NAME].numpy().tobytes()
    return {
        "tensor name": SECRET_NAME.encode(),
        "JSON string": SECRET_VALUE.encode(),
        "tensor bytes": raw[1000:1064],
        "shape": b"[64,32]",
        "dtype": b'"float32"',
    }


def _same(a: dict, b: dict) -> None:
    for (ka, va), (kb, vb) in zip(a["model"].state_dict().items(), b["model"].state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert torch.equal(a[SECRET_NAME], b[SECRET_NAME])
    sa, sb = a["optim"].state_dict(), b["optim"].state_dict()
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][name]) if torch.is_tensor(v) else v == sb["state"][k][name]


def test_round_trip_save_restore_load_bit_exact(tmp_path):
    url = f"file://{tmp_path}/s"
    enc = Encryption(KEY)
    state = _state()
    ckpt.save(url, state, step=1, encryption=enc)
    fresh = _state(seed=9)
    info = ckpt.restore(url, fresh, encryption=Encryption(KEY))  # a new object: the key is what counts
    assert info.step == 1
    _same(state, fresh)
    assert fresh["meta"] == {"note": SECRET_VALUE, "epoch": 3}
    assert np.array_equal(fresh["ids"], state["ids"])
    tree = ckpt.load(url, encryption=enc, keys=[SECRET_NAME])
    assert torch.equal(tree[SECRET_NAME], state[SECRET_NAME])
    assert ckpt.read_manifest(url, 1, encryption=enc).tensors[SECRET_NAME].shape == (8192,)
    assert ckpt.latest_step(url, encryption=enc) == 1
    assert ckpt.steps(url) == [1], "listing steps needs no key (file names only)"


def test_nothing_readable_at_rest(tmp_path):
    state = _state()
    plain, secret = f"file://{tmp_path}/plain", f"file://{tmp_path}/secret"
    ckpt.save(plain, state, step=1)
    ckpt.save(secret, state, step=1, encryption=Encryption(KEY))
    ckpt.save(secret, state, step=2, encryption=Encryption(KEY))
    needles = _needles(state)
    plain_blob = b"".join(_files(plain).values())
    for what, needle in needles.items():
        assert needle in plain_blob, f"control: the plain store shows the {what}"
    files = _files(secret)
    assert any(p.endswith("/refs/latest") for p in files) and any("/leases/" in p for p in files) or True
    for path, body in files.items():
        for what, needle in needles.items():
            assert needle not in body, f"{what} readable in {path}"
        # keys are not the content hashes the manifest records
    manifest = ckpt.read_manifest(secret, 1, encryption=Encryption(KEY))
    hashes = {r.hash for r in manifest.chunk_refs()}
    keys = {r.key for r in manifest.chunk_refs()}
    assert hashes and not hashes & keys, "content addresses are keyed under encryption"
    for body in files.values():
        assert not any(h.encode() in body for h in hashes), "no content hash appears at rest"


def test_wrong_or_missing_key_is_refused_before_any_data_is_read(tmp_path):
    url = f"file://{tmp_path}/s"
    ckpt.save(url, _state(), step=1, encryption=Encryption(KEY))
    # nothing but the descriptor is readable: a refusal cannot come from reading data
    for p in (tmp_path / "s" / "manifests").iterdir():
        p.write_bytes(b"garbage")
    for p in (tmp_path / "s" / "objects").rglob("*"):
        if p.is_file():
            p.unlink()
    target = _state(seed=5)
    before = {k: v.clone() for k, v in target["model"].state_dict().items()}
    for call in (
        lambda e: ckpt.restore(url, target, encryption=e),
        lambda e: ckpt.load(url, encryption=e),
        lambda e: ckpt.read_manifest(url, 1, encryption=e),
        lambda e: ckpt.latest_step(url, encryption=e),
        lambda e: ckpt.save(url, target, step=2, encryption=e),
        lambda e: ckpt.Checkpointer(url, encryption=e),
    ):
        with pytest.raises(EncryptionError, match="encrypted") as missing:
            call(None)
        assert "static:" in str(missing.value), "the message names the store's key id"
        with pytest.raises(EncryptionError, match="cannot open it") as wrong:
            call(Encryption(OTHER))
        assert StaticKeyProvider(OTHER).key_id in str(wrong.value)
    assert all(torch.equal(before[k], v) for k, v in target["model"].state_dict().items())
    assert KEY.hex() not in repr(Encryption(KEY)) and "bytes" not in repr(Encryption(KEY))


def test_mixing_plain_and_encrypted_saves_is_refused(tmp_path):
    plain, secret = f"file://{tmp_path}/plain", f"file://{tmp_path}/secret"
    state = _state()
    ckpt.save(plain, state, step=1)
    before = _files(plain)
    with pytest.raises(EncryptionError, match="plain"):
        ckpt.save(plain, state, step=2, encryption=Encryption(KEY))
    with pytest.raises(EncryptionError, match="plain"):
        ckpt.Checkpointer(plain, encryption=Encryption(KEY))
    with pytest.raises(EncryptionError, match="not encrypted"):
        ckpt.load(plain, encryption=Encryption(KEY))
    assert _files(plain).keys() - before.keys() <= {p for p in _files(plain) if "/leases/" in p}
    ckpt.save(secret, state, step=1, encryption=Encryption(KEY))
    with pytest.raises(EncryptionError, match="encrypted"):
        ckpt.save(secret, state, step=2)
    assert ckpt.steps(secret) == [1]
    assert ckpt.load(plain)["meta"]["note"] == SECRET_VALUE


def test_dedup_and_deltas_under_encryption(tmp_path):
    url = f"file://{tmp_path}/s"
    enc = Encryption(KEY)
    big = torch.randn(256 * 1024, generator=torch.Generator().manual_seed(1))
    frozen = torch.randn(64 * 1024, generator=torch.Generator().manual_seed(2))
    first = ckpt.save(url, {"w": big, "frozen": frozen}, step=1, encryption=enc)
    assert first.write_stats.objects_written >= 2
    again = ckpt.save(url, {"w": big, "frozen": frozen}, step=2, encryption=enc)
    assert again.write_stats.objects_written == 0 and again.write_stats.written_bytes == 0
    changed = big.clone()
    changed[:64] += 1.0  # a few values change: a delta against step 2's chunk
    third = ckpt.save(url, {"w": changed, "frozen": frozen}, step=3, encryption=enc)
    assert third.write_stats.objects_written == 1 and third.write_stats.delta_objects == 1
    assert third.write_stats.written_bytes < big.nbytes // 4
    (ref,) = ckpt.read_manifest(url, 3, encryption=enc).tensors["w"].chunks
    assert [s["name"] for s in ref.codec][-1] == "aesgcm", "encryption is the last stage"
    assert ".x" in ref.key
    out = ckpt.load(url, encryption=enc)
    assert torch.equal(out["w"], changed) and torch.equal(out["frozen"], frozen)
    assert torch.equal(ckpt.load(url, step=1, encryption=enc)["w"], big)


def test_encrypted_size_overhead_is_small(tmp_path):
    state = {"w": torch.randn(512 * 1024, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)}
    plain = ckpt.save(f"file://{tmp_path}/p", state, step=1)
    secret = ckpt.save(f"file://{tmp_path}/s", state, step=1, encryption=Encryption(KEY))
    assert secret.write_stats.written_bytes <= plain.write_stats.written_bytes * 1.01, "compressed, then encrypted"


def _manifest_file_bytes(url: str, step: int) -> int:
    fs, root = fsspec.core.url_to_fs(url)
    return int(fs.size(f"{root}/manifests/{step}.json"))


def test_stored_bytes_count_the_sealed_manifest(tmp_path):
    """stored_bytes counts a save's objects and its manifest file as written: in an encrypted
    store the sealed file, its envelope (header, nonce, tag) included; a save and a
    Checkpointer's durable copy of its local tier alike."""
    enc = Encryption(KEY)
    url = f"file://{tmp_path}/s"
    state = _state()
    info = ckpt.save(url, state, step=1, encryption=enc)
    objects = {o.key: o.size for o in Store(url).list_objects()}
    sealed = _manifest_file_bytes(url, 1)
    assert info.stored_bytes == sum(objects.values()) + sealed
    manifest = ckpt.read_manifest(url, 1, encryption=enc)
    assert manifest.stored_bytes == info.stored_bytes
    assert sealed > len(manifest.to_json_bytes()) + 28  # an envelope, which the count includes
    state[SECRET_NAME].add_(1)  # one tensor changes: a second save writes its object alone
    second = ckpt.save(url, state, step=2, encryption=enc)
    assert second.write_stats is not None
    assert second.stored_bytes == second.write_stats.written_bytes + _manifest_file_bytes(url, 2)

    durable = f"file://{tmp_path}/d"
    with ckpt.Checkpointer(durable, local=str(tmp_path / "local"), persist_every=1, encryption=enc) as ck:
        ck.save(state, step=3).wait()
    m = ckpt.read_manifest(durable, 3, encryption=enc)
    assert m.seq is not None
    copied = {o.key: o.size for o in Store(durable).list_objects()}
    assert m.stored_bytes == sum(copied.values()) + _manifest_file_bytes(durable, 3)


def test_checkpointer_round_trip(tmp_path):
    url = f"file://{tmp_path}/s"
    state = _state()
    with ckpt.Checkpointer(url, encryption=Encryption(KEY), keep_last=2) as cp:
        for step in (1, 2, 3):
            state[SECRET_NAME].add_(1)
            cp.save(state, step=step).wait()
    assert ckpt.steps(url) == [2, 3]
    fresh = _state(seed=4)
    with ckpt.Checkpointer(url, encryption=Encryption(KEY)) as cp:
        assert cp.restore(fresh).step == 3
    _same(state, fresh)
    for body in _files(url).values():
        assert SECRET_NAME.encode() not in body


def test_rewrap_rotates_the_key_encryption_key_without_rewriting_data(tmp_path):
    url = f"file://{tmp_path}/s"
    state = _state()
    ckpt.save(url, state, step=1, encryption=Encryption(KEY))
    before = {p: b for p, b in _files(url).items() if not p.endswith(FILE) and "/leases/" not in p}
    rewrap(url, Encryption(KEY), Encryption(OTHER))
    after = _files(url)
    assert all(after[p] == b for p, b in before.items()), "no object or manifest rewritten"
    desc = json.loads(after[next(p for p in after if p.endswith(FILE))])
    assert desc["key_id"] == StaticKeyProvider(OTHER).key_id
    with pytest.raises(EncryptionError):
        ckpt.load(url, encryption=Encryption(KEY))
    assert torch.equal(ckpt.load(url, encryption=Encryption(OTHER))[SECRET_NAME], state[SECRET_NAME])
    with pytest.raises(EncryptionError):
        rewrap(url, Encryption(KEY), Encryption(OTHER))
    with pytest.raises(EncryptionError, match="not encrypted"):
        ckpt.save(f"file://{tmp_path}/plain", {"x": torch.ones(2)}, step=1)
        rewrap(f"file://{tmp_path}/plain", Encryption(KEY), Encryption(OTHER))


def test_verify_without_key_checks_presence_and_sizes_only(tmp_path):
    url = f"file://{tmp_path}/s"
    ckpt.save(url, _state(), step=1, encryption=Encryption(KEY))
    ckpt.save(url, _state(seed=1), step=2, encryption=Encryption(KEY))
    store = Store(url)
    doc = check_without_key(store)
    assert doc["ok"] and doc["authenticated"] is False and doc["steps"] == [1, 2] and doc["objects"] > 0
    assert "nothing authenticated" in doc["note"]
    manifest = ckpt.read_manifest(url, 2, encryption=Encryption(KEY))
    victim, other = sorted(manifest.chunk_refs(), key=lambda r: r.stored)[-2:]
    path = tmp_path / "s" / "objects" / victim.key[:2] / victim.key
    body = bytearray(path.read_bytes())
    body[len(body) // 2] ^= 1
    path.write_bytes(bytes(body))
    assert check_without_key(store)["ok"], "a flipped bit cannot be seen without the key"
    opened = Store(url)
    open_store(opened, Encryption(KEY))
    problems = verify_manifest(opened, get_plugins().codecs, load_manifest(opened, 2))
    assert [p.key for p in problems] == [victim.key] and "authentication" in problems[0].error
    os.unlink(tmp_path / "s" / "objects" / other.key[:2] / other.key)
    doc = check_without_key(store, 2)
    assert not doc["ok"] and [p["key"] for p in doc["problems"]] == [other.key]
    with pytest.raises(EncryptionError):
        check_without_key(Store(f"file://{tmp_path}/nothing"))


def test_export_and_import_with_encryption(tmp_path):
    url = f"file://{tmp_path}/s"
    state = _state()
    ckpt.save(url, state, step=1, encryption=Encryption(KEY))
    from ckpt.interop.export import export_checkpoint, import_checkpoint

    out = tmp_path / "plain.safetensors"
    with pytest.raises(EncryptionError):
        export_checkpoint(url, out)
    export_checkpoint(url, out, encryption=Encryption(KEY))
    back = f"file://{tmp_path}/back"
    import_checkpoint(out, back, step=5, encryption=Encryption(OTHER))
    tree = ckpt.load(back, encryption=Encryption(OTHER))
    assert torch.equal(tree[SECRET_NAME], state[SECRET_NAME])
    assert all(SECRET_NAME.encode() not in b for b in _files(back).values())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_hostile_descriptor_is_a_checkpoint_error(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("d")
    url = f"file://{root}/s"
    ckpt.save(url, {"x": torch.arange(10.0)}, step=1, encryption=Encryption(KEY))
    path = root / "s" / FILE
    doc = json.loads(path.read_bytes())
    field = data.draw(st.sampled_from(sorted(doc)))
    value = data.draw(
        st.one_of(
            st.none(),
            st.integers(-(2**70), 2**70),
            st.text(max_size=40),
            st.just(base64.b64encode(os.urandom(60)).decode()),
            st.just("0" * 32),
            st.lists(st.integers(), max_size=3),
        )
    )
    if value == doc[field]:
        return
    doc[field] = value
    path.write_text(json.dumps(doc))
    if field == "key_id" and isinstance(value, str) and re.fullmatch(r"[\x21-\x7e]{1,2048}", value):
        # the key id is a label (rotation rewrites it): a changed one misnames the key, nothing more
        assert torch.equal(ckpt.load(url, encryption=Encryption(KEY))["x"], torch.arange(10.0))
        return
    with pytest.raises(CheckpointError) as err:
        ckpt.load(url, encryption=Encryption(KEY))
    assert isinstance(err.value, (EncryptionError, CorruptCheckpointError))


def test_remote_stores_encrypted(store_url):
    """Every store kind (file, memory, moto S3, azurite): round trip, nothing readable, key refused."""
    state = _state()
    enc = Encryption(KEY)
    ckpt.save(store_url, state, step=1, encryption=enc)
    ckpt.save(store_url, state, step=2, encryption=enc)
    fresh = _state(seed=3)
    assert ckpt.restore(store_url, fresh, encryption=enc).step == 2
    _same(state, fresh)
    needles = _needles(state)
    files = _files(store_url)
    assert any(p.endswith(FILE) for p in files)
    for path, body in files.items():
        assert not any(n in body for n in needles.values()), path
    with pytest.raises(EncryptionError):
        ckpt.load(store_url)
    with pytest.raises(EncryptionError):
        ckpt.load(store_url, encryption=Encryption(OTHER))
