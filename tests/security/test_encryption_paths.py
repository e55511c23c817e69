"""Encryption through the copy, tier and distributed paths: a copy carries the source's
descriptor (same store id, resealed manifests), tiers share the durable tier's, and every
rank of a collective save uses the one descriptor rank 0 writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
from click.testing import CliRunner

import ckpt
from ckpt.cli import build_cli
from ckpt.errors import EncryptionError
from ckpt.security.envelope import FILE, parse_sealed
from ckpt.storage.store import Store
from ckpt.testing.store_urls import temporary_store_url

KEY = bytes(range(32))
SECRET = "TOP-SECRET-COPY-NOTE-0815"


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "weights": torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=g),
        "bias": torch.randn(64, generator=g),
        "meta": {"note": SECRET, "seed": seed},
    }


def _files(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    return {p: fs.cat_file(p) for p in fs.find(root)}


def _assert_no_plaintext(url: str, state: dict) -> None:
    needles = [state["weights"].numpy().tobytes()[:64], b"weights", SECRET.encode()]
    files = _files(url)
    assert any(p.endswith(FILE) for p in files)
    for path, data in files.items():
        for needle in needles:
            assert needle not in data, f"{needle[:20]!r} in plaintext at {path}"


def _equal(a: dict, b: dict) -> None:
    assert torch.equal(a["weights"], b["weights"]) and torch.equal(a["bias"], b["bias"])
    assert a["meta"] == b["meta"]


def _blank() -> dict:
    return {"weights": torch.zeros(4096, dtype=torch.uint8), "bias": torch.zeros(64), "meta": None}


@pytest.fixture
def encrypted_src(tmp_path) -> tuple[str, ckpt.Encryption, dict]:
    url, enc = str(tmp_path / "src"), ckpt.Encryption(KEY)
    ckpt.save(url, _state(1), step=1, encryption=enc)
    last = _state(2)
    ckpt.save(url, last, step=2, encryption=enc)
    return url, enc, last


@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_copy_encrypted_store_restores_bit_exact_at_destination(encrypted_src, kind, tmp_path, request):
    src, enc, last = encrypted_src
    server = request.getfixturevalue("s3_server") if kind == "s3" else None
    with temporary_store_url(kind, tmp_path, server=server, label=request.node.name) as dst:
        info = ckpt.copy(src, dst, encryption=enc)
        assert info.step == 2 and ckpt.steps(dst) == [1, 2]
        # the same store: the source's descriptor, verbatim
        assert Store(dst).read(Store(dst).path(FILE)) == Store(src).read(Store(src).path(FILE))
        got = _blank()
        assert ckpt.restore(dst, got, encryption=enc).step == 2
        _equal(got, last)
        _assert_no_plaintext(dst, last)
        with pytest.raises(EncryptionError, match="encrypted"):
            ckpt.restore(dst, _blank())
        # a second copy moves nothing; the copied manifests (resealed: new seq) still open
        assert ckpt.copy(src, dst, encryption=enc).step == 2
        got = _blank()
        assert ckpt.restore(dst, got, step=1, encryption=enc).step == 1
        _equal(got, _state(1))


def test_copy_of_encrypted_store_without_key_is_refused_before_writing(encrypted_src, tmp_path):
    src, _enc, _ = encrypted_src
    dst = str(tmp_path / "dst")
    with pytest.raises(EncryptionError, match=r"cannot copy .* is encrypted"):
        ckpt.copy(src, dst)
    assert not Store(dst).fs.exists(Store(dst).path(FILE)) and ckpt.steps(dst) == []
    res = CliRunner().invoke(build_cli(), ["cp", src, dst])
    assert res.exit_code != 0 and "is encrypted" in res.output, res.output
    assert ckpt.steps(dst) == []


def test_copy_into_another_encrypted_store_or_across_plain_is_refused(encrypted_src, tmp_path):
    src, enc, _ = encrypted_src
    other = str(tmp_path / "other")
    ckpt.save(other, _state(3), step=7, encryption=enc)  # same key, another store id
    with pytest.raises(EncryptionError, match="re-encryption is not supported"):
        ckpt.copy(src, other, encryption=enc)
    assert ckpt.steps(other) == [7]
    plain = str(tmp_path / "plain")
    ckpt.save(plain, _state(4), step=1)
    with pytest.raises(EncryptionError, match="plain checkpoints"):
        ckpt.copy(src, plain, encryption=enc)
    with pytest.raises(EncryptionError, match="refusing to mix"):
        ckpt.copy(plain, other)
    assert ckpt.steps(plain) == [1] and ckpt.steps(other) == [7]


def test_cli_cp_with_key_file(encrypted_src, tmp_path):
    src, enc, last = encrypted_src
    key_file = tmp_path / "key.hex"
    key_file.write_text(KEY.hex())
    dst = str(tmp_path / "dst")
    res = CliRunner().invoke(
        build_cli(), ["cp", src, dst, "--step", "2", "--key-file", str(key_file)], catch_exceptions=False
    )
    assert res.exit_code == 0, res.output
    got = _blank()
    assert ckpt.restore(dst, got, encryption=enc).step == 2
    _equal(got, last)


def test_tiers_share_the_durable_descriptor_and_restore_from_durable(tmp_path):
    enc = ckpt.Encryption(KEY)
    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    last = _state(0)
    with ckpt.Checkpointer(durable, local=local, persist_every=2, encryption=enc) as ck:
        for s in range(1, 5):
            last = _state(s)
            ck.save(last, step=s).wait()
    assert Store(local).read(Store(local).path(FILE)) == Store(durable).read(Store(durable).path(FILE))
    assert ckpt.steps(durable) == [2, 4]
    _assert_no_plaintext(durable, last)
    shutil.rmtree(local)
    with ckpt.Checkpointer(durable, local=local, persist_every=2, encryption=enc) as ck:
        got = _blank()
        assert ck.restore(got).step == 4
        _equal(got, last)
        ck.save(_state(5), step=5).wait()  # the new local tier took the durable descriptor
    assert Store(local).read(Store(local).path(FILE)) == Store(durable).read(Store(durable).path(FILE))
    # a local tier of another encrypted store is refused, not replaced
    stale = str(tmp_path / "stale")
    ckpt.save(stale, _state(9), step=1, encryption=enc)
    with pytest.raises(EncryptionError, match="another encrypted store"):
        ckpt.Checkpointer(durable, local=stale, encryption=enc)
    assert ckpt.steps(stale) == [1]


def test_new_durable_tier_takes_the_local_tier_descriptor(tmp_path):
    enc = ckpt.Encryption(KEY)
    local, durable = str(tmp_path / "local"), str(tmp_path / "durable")
    ckpt.save(local, _state(1), step=1, encryption=enc)
    with ckpt.Checkpointer(durable, local=local, persist_every=1, encryption=enc) as ck:
        ck.save(_state(2), step=2).wait()
    assert Store(local).read(Store(local).path(FILE)) == Store(durable).read(Store(durable).path(FILE))
    got = _blank()
    assert ckpt.restore(durable, got, encryption=enc).step == 2
    _equal(got, _state(2))


def test_collective_save_and_restore_encrypted(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("_enc_rank.py")
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "CKPT_THREADS": "2",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, text) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and text.rstrip().endswith("OK"), f"rank {rank} exited {p.returncode}:\n{text[-3000:]}"
    url = str(tmp_path / "store")
    enc = ckpt.Encryption(KEY)
    assert ckpt.steps(url) == [1, 2]
    files = _files(url)
    assert sum(p.endswith(FILE) for p in files) == 1
    for path, data in files.items():
        assert b"mine" not in data and torch.full((64,), 1000.0).numpy().tobytes()[:32] not in data, path
    with pytest.raises(EncryptionError):
        ckpt.load(url)
    got = ckpt.load(url, step=1, rank=1, encryption=enc)
    assert torch.equal(got["mine"]["t"], torch.full((64,), 1001.0))


def test_dcp_storage_writer_and_reader_encrypted(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    import ckpt.dcp
    from ckpt.interop.dcp_storage import checkpoint_error

    enc, url = ckpt.Encryption(KEY), str(tmp_path / "dcp")
    src = {"weights": _state(5)["weights"], "bias": _state(5)["bias"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(src, storage_writer=ckpt.dcp.StorageWriter(url, step=1, encryption=enc))
        dst = {"weights": torch.zeros(4096, dtype=torch.uint8), "bias": torch.zeros(64)}
        dcp.load(dst, storage_reader=ckpt.dcp.StorageReader(url, encryption=enc))
        assert torch.equal(dst["weights"], src["weights"]) and torch.equal(dst["bias"], src["bias"])
        for path, data in _files(url).items():
            assert src["weights"].numpy().tobytes()[:64] not in data and b"weights" not in data, path
        # no key: refused, and nothing plain is written into the encrypted store
        with pytest.raises(BaseException) as info:
            dcp.save(src, storage_writer=ckpt.dcp.StorageWriter(url, step=2))
        assert isinstance(checkpoint_error(info.value), EncryptionError)
        with pytest.raises(BaseException) as info:
            dcp.load(dst, storage_reader=ckpt.dcp.StorageReader(url))
        assert isinstance(checkpoint_error(info.value), EncryptionError)
    assert ckpt.steps(url) == [1]
    assert torch.equal(ckpt.load(url, encryption=enc)["weights"], src["weights"])


def test_copy_of_an_older_step_is_resealed_without_seq_and_opens(encrypted_src, tmp_path):
    src, enc, last = encrypted_src
    dst = str(tmp_path / "dst")
    ckpt.copy(src, dst, step=2, encryption=enc)
    ckpt.copy(src, dst, step=1, encryption=enc)  # older than the destination's latest: no seq
    assert ckpt.latest_step(dst, encryption=enc) == 2
    got = _blank()
    assert ckpt.restore(dst, got, step=1, encryption=enc).step == 1
    _equal(got, _state(1))
    store = Store(dst)
    assert parse_sealed(store.read(store.manifest_path(1)), "step 1")[1]["seq"] is None
    assert parse_sealed(store.read(store.manifest_path(2)), "step 2")[1]["seq"] == 1
    # the resealed manifests are bound to their step like any other (rollback refused)
    store.write(store.manifest_path(2), store.read(store.manifest_path(1)))
    with pytest.raises(ckpt.CorruptCheckpointError, match="rollback"):
        ckpt.restore(dst, _blank(), step=2, encryption=enc)
    # a plain source with a key: refused (nothing to re-encrypt with)
    plain = str(tmp_path / "plain")
    ckpt.save(plain, _state(4), step=1)
    with pytest.raises(EncryptionError, match="not encrypted"):
        ckpt.copy(plain, str(tmp_path / "x"), encryption=enc)


def test_plain_tiers_whose_durable_tier_is_encrypted_refuse_the_first_save(tmp_path, caplog):
    """Without a key the durable tier is opened in the background (a restart from the local
    tier does not wait on it): an encrypted durable tier is reported by the restore and
    refuses the first save, never mixed with plain checkpoints."""
    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    with ckpt.Checkpointer(durable, local=local, persist_every=None) as ck:
        ck.save(_state(1), step=1).wait()
        ck.tiers.persist_now(1)
    shutil.rmtree(durable)
    ckpt.save(durable, _state(2), step=1, encryption=ckpt.Encryption(KEY))  # another store there now
    ck = ckpt.Checkpointer(durable, local=local)
    got = _blank()
    assert ck.restore(got).step == 1  # the local tier's checkpoint, the durable one unreadable
    _equal(got, _state(1))
    assert "durable tier" in caplog.text
    ck.save(_state(3), step=2).wait()  # the local commit stands ...
    with pytest.raises(EncryptionError):
        ck.close()  # ... and nothing plain reaches the encrypted durable tier
    assert ckpt.steps(durable) == [1]  # the encrypted store as it was


def test_tiers_rank_an_encrypted_durable_tier_only_once_it_is_open(tmp_path, monkeypatch):
    """The durable tier's latest is fetched on the tiers' thread while the Checkpointer opens
    both tiers (descriptor, keys) on its own: fetched before the keys were attached, the durable
    tier's newer checkpoint was not seen (a slow KMS or object store makes that the usual order)."""
    import threading

    import ckpt.snapshot.checkpointer as ckmod
    from ckpt.storage.tiers import Tiers

    enc = ckpt.Encryption(KEY)
    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    with ckpt.Checkpointer(durable, local=local, persist_every=1, encryption=enc) as ck:
        ck.save(_state(1), step=1).wait()
    with ckpt.Checkpointer(durable, local=str(tmp_path / "other-node"), persist_every=5, encryption=enc) as ck:
        ck.save(_state(5), step=5).wait()
    fetched = threading.Event()
    latest, open_tiers = Tiers._durable_latest, ckmod.open_tiers

    def durable_latest(self):
        try:
            return latest(self)
        finally:
            fetched.set()

    def slow_open_tiers(*a, **k):
        fetched.wait(1.0)  # the tiers' thread first, if it does not wait for this
        return open_tiers(*a, **k)

    monkeypatch.setattr(Tiers, "_durable_latest", durable_latest)
    monkeypatch.setattr(ckmod, "open_tiers", slow_open_tiers)
    with ckpt.Checkpointer(durable, local=local, encryption=enc) as ck:
        got = _blank()
        assert ck.restore(got).step == 5
    _equal(got, _state(5))
