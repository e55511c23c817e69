"""Encrypted local tiers under torch.distributed: every rank's local tier and the durable tier
share one descriptor (tests/distributed/tier_enc_worker.py runs the phases on 2 ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ckpt
from ckpt.errors import EncryptionError

from .conftest import assert_ok, run_ranks
from .tier_enc_worker import KEY, known

WORKER = Path(__file__).with_name("tier_enc_worker.py")


def _phase(text: str, tag: str) -> str:
    after = text.split(f"PHASE {tag}\n", 1)[1]
    return after.split("PHASE ", 1)[0]


def _store_id(root: Path) -> str:
    return json.loads((root / "encryption.json").read_text())["store_id"]


def test_encrypted_rank_local_tiers(tmp_path):
    results = run_ranks("enc", 2, tmp_path, worker=WORKER, timeout=120)
    assert_ok(results)
    out0, out1 = results[0][1], results[1][1]
    for out, r in ((out0, 0), (out1, 1)):
        assert f"rank {r} restored step 3 from the local tier" in _phase(out, "local")
        assert f"rank {r} restored step 4 from the local tier" in _phase(out, "redurable")
        assert f"rank {r} restored step 5 from the local tier" in _phase(out, "after")
    # rank 1's local tier deleted: it reads the (encrypted) durable tier, rank 0 its local one
    assert "rank 0 restored step 3 from the local tier" in _phase(out0, "gone")
    gone1 = _phase(out1, "gone")
    assert "rank 1 restored step 3 from the durable tier" in gone1 and "its local tier does not hold it" in gone1
    # a foreign (another store id) or plain local tier on rank 1: an EncryptionError on every rank
    for out in (out0, out1):
        foreign, plain = _phase(out, "foreign"), _phase(out, "plain")
        assert "REFUSED foreign" in foreign and "another encrypted store" in foreign, foreign
        assert "REFUSED plain" in plain and "plain checkpoints" in plain, plain
        wrong = _phase(out, "wrongkey")
        assert "REFUSED wrongkey" in wrong and "cannot open it" in wrong, wrong
    durable, local = tmp_path / "durable", tmp_path / "local"
    # one descriptor: the durable tier re-created at step 5 took the local tiers' store id
    ids = {_store_id(durable), _store_id(local / "rank-00000"), _store_id(local / "rank-00001")}
    assert len(ids) == 1, ids
    # the durable tier loads in one process with the key, at any rank's view
    assert ckpt.steps(str(durable)) == [5]
    for r in (0, 1):
        got = ckpt.load(str(durable), step=5, rank=r, encryption=ckpt.Encryption(KEY))
        assert got["r"] == {"rank": r, "step": 5}
        assert (got["w"] == known(r, 5)).all()
    with pytest.raises(EncryptionError):
        ckpt.load(str(durable))
    # without the key, no file of either tier reveals a saved tensor's bytes
    secrets = [known(r, s).numpy().tobytes()[:512] for r in (0, 1) for s in (1, 2, 3, 4, 5)]
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "objects" in p.parts]
    assert files and any("rank-00001" in p.parts for p in files)
    for p in files:
        data = p.read_bytes()
        assert not any(s in data for s in secrets), p
    for m in (*durable.rglob("manifests/*"), *local.rglob("manifests/*")):
        assert m.read_bytes().startswith(b"CKPT-SEALED"), m
