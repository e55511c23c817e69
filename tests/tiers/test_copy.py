"""ckpt.copy / ckpt cp between stores: only what the destination lacks, verified, under its
writer lease, refusing hostile manifests, and completed by a rerun after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _tiers_util import keys_of
from click.testing import CliRunner

import ckpt
from ckpt.cli import build_cli
from ckpt.storage.copy import copy_stores
from ckpt.storage.store import Store
from ckpt.storage.writer_lease import WriterLease
from ckpt.testing import stored_objects

HERE = Path(__file__).resolve().parent


def _frozen_run(url: str, steps) -> None:
    """Saves of a model whose big layer is frozen: only the small head changes."""
    torch.manual_seed(0)
    base = torch.randn(256, 256)
    for s in steps:
        ckpt.save(url, {"base": base, "head": torch.full((8,), float(s))}, step=s)


def test_copy_all_then_only_new_objects(store_url, tmp_path):
    src = str(tmp_path / "src")
    _frozen_run(src, [1, 2])
    first = copy_stores(Store(src), Store(store_url))
    assert first.info.step == 2 and ckpt.steps(store_url) == [1, 2]
    assert first.stats.objects == len(keys_of(Store(src), 1) | keys_of(Store(src), 2))
    assert ckpt.latest_step(store_url) == 2
    _frozen_run(src, [3])
    before = {o.key for o in Store(store_url).list_objects()}
    second = copy_stores(Store(src), Store(store_url))
    new = keys_of(Store(src), 3) - keys_of(Store(src), 2) - keys_of(Store(src), 1)
    after = {o.key for o in Store(store_url).list_objects()}
    assert second.stats.checkpoints == 1 and second.stats.already == 2
    assert second.stats.objects == len(new) == len(after - before) >= 1  # the frozen base is not moved
    assert second.stats.skipped == len(keys_of(Store(src), 3)) - len(new) >= 1
    assert ckpt.latest_step(store_url) == 3
    out = ckpt.load(store_url)
    assert torch.equal(out["head"], torch.full((8,), 3.0))
    assert torch.equal(out["base"], ckpt.load(src, step=1)["base"])


def test_copy_one_step_keeps_lineage_and_older_copies_do_not_become_latest(store_url, tmp_path):
    src = str(tmp_path / "src")
    _frozen_run(src, [1, 2, 3])
    info = ckpt.copy(src, store_url, step=3)
    assert info.step == 3 and ckpt.steps(store_url) == [3]
    m = ckpt.read_manifest(store_url, 3)
    assert m.parent == 2 and m.run == ckpt.read_manifest(src, 3).run
    ckpt.copy(src, store_url, step=1)  # promoting an older one leaves the latest alone
    assert ckpt.steps(store_url) == [1, 3] and ckpt.latest_step(store_url) == 3


def test_a_copied_checkpoint_counts_what_the_copy_wrote(store_url, tmp_path):
    """stored_bytes of a copy, as of a save: the objects it wrote to the destination and its
    manifest file as written there, with the destination's own seq (or none, for an older
    step), not the source's count."""
    src = str(tmp_path / "src")
    _frozen_run(src, [1, 2, 3])
    dst = Store(store_url)
    ckpt.save(store_url, {"other": torch.ones(4)}, step=0)  # history of its own: another seq

    def copied(step: int) -> tuple[ckpt.CheckpointInfo, int]:
        before = stored_objects(dst)
        info = ckpt.copy(src, store_url, step=step)
        after = stored_objects(dst)
        return info, sum(after[k] for k in after.keys() - before.keys())

    three, wrote = copied(3)
    m = ckpt.read_manifest(store_url, 3)
    assert m.seq == 2 and ckpt.read_manifest(src, 3).seq == 3
    assert three.stored_bytes == m.stored_bytes == wrote + len(dst.read_manifest(3))
    one, wrote = copied(1)  # older than the latest: committed without a seq
    m = ckpt.read_manifest(store_url, 1)
    assert m.seq is None and ckpt.latest_step(store_url) == 3
    assert one.stored_bytes == m.stored_bytes == wrote + len(dst.read_manifest(1))


def test_copy_verifies_what_it_moves(store_url, tmp_path):
    src = Store(str(tmp_path / "src"))
    _frozen_run(src.url, [1])
    key = next(iter(keys_of(src, 1)))
    data = src.get_object(key)
    src.put_object(key, bytes(b ^ 1 for b in data))
    with pytest.raises(ckpt.CorruptCheckpointError, match=key):
        ckpt.copy(src.url, store_url)
    assert ckpt.steps(store_url) == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d["tensors"]["head"]["chunks"][0].update(key="../../../../etc/passwd"),
        lambda d: d["tensors"]["head"]["chunks"][0].update(size=2**50),
        lambda d: d.update(schema=99),
    ],
    ids=["key-escapes", "huge-size", "newer-schema"],
)
def test_copy_refuses_a_hostile_source_manifest(tmp_path, damage):
    src = Store(str(tmp_path / "src"))
    _frozen_run(src.url, [1])
    doc = json.loads(src.read_manifest(1))
    damage(doc)
    src.write(src.manifest_path(1), json.dumps(doc).encode())
    dst = str(tmp_path / "dst")
    for step in (1, None):
        with pytest.raises(ckpt.CheckpointError, match="step 1"):
            ckpt.copy(src.url, dst, step=step)
    assert ckpt.steps(dst) == [] and not any(Store(dst).list_objects())


def test_copy_takes_the_destination_writer_lease(store_url, tmp_path):
    src = str(tmp_path / "src")
    _frozen_run(src, [1])
    with WriterLease(Store(store_url), what="a training run"), pytest.raises(ckpt.CheckpointError, match="live writer"):
        ckpt.copy(src, store_url)
    assert ckpt.steps(store_url) == []
    ckpt.copy(src, store_url)  # the lease was released
    assert ckpt.steps(store_url) == [1]


def test_cli_cp_step_and_all(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    _frozen_run(src, [1, 2])
    runner = CliRunner()
    r = runner.invoke(build_cli(), ["cp", src, dst, "--step", "1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "copied 1 checkpoint(s)" in r.output and "bytes) copied" in r.output
    assert ckpt.steps(dst) == [1]
    r = runner.invoke(build_cli(), ["cp", src, dst, "--json"], catch_exceptions=False)
    doc = json.loads(r.output)
    assert doc["checkpoints"] == 1 and doc["already"] == 1 and doc["step"] == 2 and doc["bytes"] > 0
    assert doc["skipped_objects"] >= 1  # the frozen base was there already
    r = runner.invoke(build_cli(), ["cp", src, dst, "--step", "7"])
    assert r.exit_code == 2 and "no checkpoint at step 7" in r.output


def test_cli_cp_progress_bar_on_a_terminal(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    _frozen_run(src, [1])
    tty = {"TTY_COMPATIBLE": "1", "NO_COLOR": "1", "COLUMNS": "120"}  # rich draws its bar
    r = CliRunner(env=tty).invoke(build_cli(), ["cp", src, dst], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "copying to" in r.stderr  # the bar, drawn on stderr
    assert "bytes) copied" in r.stdout


def test_interrupted_copy_completes_when_rerun(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_PACK_BYTES", "0")  # one object per tensor
    src, dst = str(tmp_path / "src"), tmp_path / "dst"
    big = {f"t{i}": torch.randn(64 * 1024) for i in range(40)}  # 40 objects
    ckpt.save(src, big, step=1)
    script = (
        "import sys, faultfs, ckpt\n"  # faulty:// slows every call of the destination down
        "ckpt.copy(sys.argv[1], 'faulty://' + sys.argv[2], "
        "dst_storage_options={'target_protocol': 'file', 'target_options': {'auto_mkdir': True}, 'delay': 0.05, 'seed': 1})\n"
    )
    env = {**os.environ, "CKPT_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-c", script, src, str(dst)], env=env, stderr=subprocess.PIPE)
    objects = dst / "objects"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if objects.exists() and sum(1 for _ in objects.rglob("*")) >= 8:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert ckpt.steps(str(dst)) == []  # no manifest: the step does not exist there yet
    partial = {o.key for o in Store(str(dst)).list_objects()}
    assert 0 < len(partial) < 40
    res = copy_stores(Store(src), Store(str(dst)))  # the dead copier's lease is taken over at once
    # faulty://'s file backend writes in place (not atomically): the kill may have torn the
    # object it was writing, which is then copied again, not skipped
    assert len(partial) - 1 <= res.stats.skipped <= len(partial)
    assert res.stats.skipped + res.stats.objects == 40
    out = ckpt.load(str(dst))
    assert all(torch.equal(out[k], v) for k, v in big.items())


def test_a_torn_object_in_the_destination_is_copied_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CKPT_PACK_BYTES", "0")
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    state = {f"t{i}": torch.randn(64 * 1024, generator=torch.Generator().manual_seed(i)) for i in range(3)}
    ckpt.save(src, state, step=1)
    ckpt.copy(src, dst)
    (Path(dst) / "manifests" / "1.json").unlink()  # as if the copier died before its manifest
    torn = next(p for p in (Path(dst) / "objects").rglob("*") if p.is_file())
    torn.write_bytes(torn.read_bytes()[:1000])  # a write cut short under the final name
    with caplog.at_level("WARNING", logger="ckpt"):
        res = copy_stores(Store(src), Store(dst))
    assert res.stats.objects == 1 and res.stats.skipped == 2
    assert "a torn write" in caplog.text and torn.name in caplog.text
    out = ckpt.load(dst)
    assert all(torch.equal(out[k], v) for k, v in state.items())


def _largest(url: str, step: int) -> str:
    store = Store(url)
    return max(keys_of(store, step), key=lambda k: len(store.get_object(k)))


def test_verify_dst_copies_again_an_object_damaged_in_place(store_url, tmp_path):
    """An object the destination holds at its size is trusted by default; with verify_existing
    (``ckpt cp --verify-dst``) its bytes are hashed and one damaged in place is copied again."""
    src = str(tmp_path / "src")
    _frozen_run(src, [1])
    copy_stores(Store(src), Store(store_url))
    dst = Store(store_url)
    key = _largest(src, 1)  # the frozen base
    good = dst.get_object(key)
    dst.put_object(key, os.urandom(len(good)))  # same size, other bytes
    _frozen_run(src, [2])
    plain = copy_stores(Store(src), dst, step=2)
    assert plain.stats.replaced == 0 and dst.get_object(key) != good  # trusted: still damaged
    with pytest.raises(ckpt.CorruptCheckpointError, match=key):
        ckpt.load(store_url, step=2)
    _frozen_run(src, [3])
    checked = copy_stores(Store(src), dst, step=3, verify_existing=True)
    assert checked.stats.replaced == 1
    assert dst.get_object(key) == good
    got = ckpt.load(store_url, step=3)
    assert torch.equal(got["head"], torch.full((8,), 3.0))


def test_cli_cp_verify_dst_reports_what_it_replaced(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    _frozen_run(src, [1, 2])
    runner = CliRunner()
    assert runner.invoke(build_cli(), ["cp", src, dst, "--step", "1"]).exit_code == 0
    key = _largest(src, 1)
    with open(Store(dst).object_path(key), "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 8)
    r = runner.invoke(build_cli(), ["cp", src, dst, "--verify-dst", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["replaced_objects"] == 1 and doc["checkpoints"] == 1
    assert ckpt.load(dst, step=2)["base"].shape == (256, 256)
    r = runner.invoke(build_cli(), ["verify", dst], catch_exceptions=False)
    assert r.exit_code == 0, r.output
