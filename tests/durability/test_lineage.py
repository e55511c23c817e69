"""Lineage on every store kind: "latest" is the commit the writing run made last, not the
highest step; refs/latest is a hint whose trouble never blocks a save or hides a commit;
resume never starts over while the store holds checkpoints."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
import torch
from click.testing import CliRunner

import ckpt
from ckpt.cli import build_cli
from ckpt.errors import CorruptCheckpointError, NoCheckpointError
from ckpt.snapshot.checkpointer import Checkpointer
from ckpt.storage import lineage
from ckpt.storage.commit import process_run_id
from ckpt.storage.lineage import Ref, lineage_of, read_lineage
from ckpt.storage.manifest import Manifest
from ckpt.storage.store import Store


class Crash(Exception):
    pass


def _state(step: int) -> dict:
    return {"w": torch.full((32, 32), float(step)), "step_no": step}


def _manifest(store: Store, step: int) -> Manifest:
    return Manifest.from_json_bytes(store.read_manifest(step), where=f"step {step}")


def _resume_start(url: str) -> int:
    """The step a fresh run resumes from (its state holds the restored step number)."""
    state = _state(0)
    seen = []
    with Checkpointer(url) as ck:

        @ck.resume(state)
        def train(start):
            seen.append(start)

        train()
    assert seen and torch.equal(state["w"], torch.full((32, 32), float(seen[0])))  # restored in place
    return seen[0]


def _cli(*args: str):
    return CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)


@pytest.fixture
def rolled_back(store_url):
    """Steps 10, 20, 30 saved; then a run restored 20 and saved 21: 30 is abandoned."""
    for s in (10, 20, 30):
        ckpt.save(store_url, _state(s), step=s)
    with Checkpointer(store_url) as ck:
        live = _state(0)
        assert ck.restore(live, step=20).step == 20 and live["step_no"] == 20
        live["w"].fill_(21.0)
        live["step_no"] = 21
        ck.save(live, step=21).wait()
        run = ck.run_id
    return store_url, Store(store_url), run


def _assert_latest_is_21(url: str) -> None:
    assert ckpt.latest_step(url) == 21
    assert ckpt.load(url)["step_no"] == 21
    live = _state(0)
    assert ckpt.restore(url, live).step == 21 and torch.equal(live["w"], torch.full((32, 32), 21.0))
    assert ckpt.read_manifest(url).step == 21


# -- rollback --------------------------------------------------------------------------------


def test_rollback_is_followed_by_latest_load_resume_and_ls(rolled_back):
    url, store, run = rolled_back
    m10, m20, m30, m21 = (_manifest(store, s) for s in (10, 20, 30, 21))
    assert (m10.parent, m20.parent, m30.parent, m21.parent) == (None, 10, 20, 20)
    assert [m.seq for m in (m10, m20, m30, m21)] == [1, 2, 3, 4]
    assert m21.run == run and m10.run == m30.run == process_run_id() != run
    assert store.read_ref() == Ref(21, 4)
    _assert_latest_is_21(url)
    assert ckpt.load(url, step=30)["step_no"] == 30, "an explicit step still reads an abandoned checkpoint"

    lin, _ = read_lineage(store)
    assert (lin.latest, lin.line, lin.abandoned) == (21, (21, 20, 10), (30,))
    assert lin.ranked[:2] == (21, 20), "retention keeps the run's newest, not the abandoned step"

    doc = json.loads(_cli("ls", url, "--json").stdout)
    assert doc["latest"] == 21
    flags = {c["step"]: (c["latest"], c["abandoned"], c["seq"]) for c in doc["checkpoints"]}
    assert flags == {10: (False, False, 1), 20: (False, False, 2), 21: (True, False, 4), 30: (False, True, 3)}
    human = {line.split()[0]: line.split()[-1] for line in _cli("ls", url).stdout.strip().splitlines()[1:]}
    assert human["30"] == "abandoned" and human["21"] == "latest"
    assert json.loads(_cli("show", url, "--json").stdout)["step"] == 21

    # the run goes on from 21; 30 stays abandoned, never resurrected
    assert _resume_start(url) == 21
    info = ckpt.save(url, _state(22), step=22)
    assert info.parent == 21 and _manifest(store, 22).seq == 5
    lin, _ = read_lineage(store)
    assert lin.line == (22, 21, 20, 10) and lin.abandoned == (30,)
    assert ckpt.latest_step(url) == 22


def test_checkpointer_without_restore_continues_from_the_latest(rolled_back):
    url, store, _ = rolled_back
    with Checkpointer(url) as ck:
        ck.save(_state(22), step=22).wait()
        ck.save(_state(23), step=23).wait()
    assert (_manifest(store, 22).parent, _manifest(store, 23).parent) == (21, 22)
    assert (_manifest(store, 22).seq, _manifest(store, 23).seq) == (5, 6)
    assert _manifest(store, 22).run == _manifest(store, 23).run


def test_retention_keeps_the_run_and_prunes_abandoned_steps_first(rolled_back):
    url, store, _ = rolled_back
    with Checkpointer(url, keep_last=2) as ck:
        assert ck.restore(_state(0)).step == 21
        for s in (22, 23):
            ck.save(_state(s), step=s).wait()
    kept = store.steps()
    assert {22, 23} <= set(kept) and 30 not in kept, kept
    assert ckpt.latest_step(url) == 23 and read_lineage(store)[0].abandoned == ()


def test_resave_of_a_step_replaces_it_and_warns(store_url, caplog):
    ckpt.save(store_url, _state(4), step=4)
    ckpt.save(store_url, _state(5), step=5)
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        info = ckpt.save(store_url, _state(55), step=5)
    assert any("re-saved step 5" in r.message and store_url in r.message for r in caplog.records), caplog.text
    store = Store(store_url)
    assert store.steps() == [4, 5] and ckpt.load(store_url, step=5)["step_no"] == 55
    m = _manifest(store, 5)
    assert (m.parent, m.seq, info.parent) == (4, 3, 4), "a re-save continues from what the step continued from"
    assert read_lineage(store)[0].line == (5, 4)


# -- manifest names ----------------------------------------------------------------------------


def test_non_canonical_manifest_names_are_ignored_and_reported_by_verify(store_url):
    ckpt.save(store_url, _state(1), step=1)
    ckpt.save(store_url, _state(2), step=2)
    store = Store(store_url)
    doc = json.loads(store.read_manifest(2))
    doc["step"] = 9
    strays = ["0009.json", "+9.json", "9.json.tmp", "009.json"]
    for name in strays:
        store.write(store.path("manifests", name), json.dumps(doc).encode())
    assert store.steps() == [1, 2]
    assert ckpt.latest_step(store_url) == 2 and ckpt.load(store_url)["step_no"] == 2
    with pytest.raises(
        NoCheckpointError, match=r"no checkpoint at step 9 .*ignored, not manifest names: .*manifests/0009\.json"
    ):
        ckpt.load(store_url, step=9)
    assert _resume_start(store_url) == 2
    r = _cli("verify", store_url, "--json")
    assert r.exit_code == 1
    problems = [p["error"] for p in json.loads(r.stdout)["problems"]]
    assert len(problems) == len(strays)
    for name in strays:
        assert any(f"manifests/{name} " in p for p in problems), (name, problems)
    assert _cli("verify", store_url, "--step", "2").exit_code == 0


def test_a_manifest_copied_under_another_step_is_no_checkpoint_of_that_step(store_url, caplog):
    ckpt.save(store_url, _state(1), step=1)
    ckpt.save(store_url, _state(2), step=2)
    store = Store(store_url)
    store.write(store.manifest_path(7), store.read_manifest(2))
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        assert ckpt.latest_step(store_url) == 2
    assert "step 7" in caplog.text and "says it is step 2" in caplog.text
    with pytest.raises(ckpt.SchemaError, match="step 7 says it is step 2"):
        ckpt.load(store_url, step=7)


def test_manifests_that_is_a_file_is_named_not_an_empty_store(store_url):
    store = Store(store_url)
    store.write(store.path("manifests"), b"not a folder")
    for call in (lambda: ckpt.load(store_url), lambda: ckpt.latest_step(store_url), lambda: _resume_start(store_url)):
        with pytest.raises(CorruptCheckpointError, match="manifests/ of .* is a file, not a folder"):
            call()


# -- refs/latest is a hint -----------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["missing", "garbage", "abandoned", "wrong-seq", "dangling", "no-seq", "deep"])
def test_a_bad_ref_never_resurrects_the_abandoned_step(rolled_back, ref):
    url, store, _ = rolled_back
    path = store.path("refs", "latest")
    if ref == "missing":
        store.delete(path)
    elif ref == "garbage":
        store.write(path, b"\x00garbage")
    elif ref == "abandoned":  # a stale ref, as a backup of the store from before the rollback holds
        store.write_latest(30, 3)
    elif ref == "wrong-seq":
        store.write_latest(30, 99)
    elif ref == "dangling":
        store.write_latest(99, 9)
    elif ref == "no-seq":  # written before lineage was recorded
        store.write(path, json.dumps({"step": 30, "manifest": "manifests/30.json"}).encode())
    else:
        store.write(path, b"[" * 100_000 + b"]" * 100_000)
    _assert_latest_is_21(url)
    assert _resume_start(url) == 21
    assert store.latest_step(repair=True) == 21
    assert store.read_ref() == Ref(21, 4)


def test_crash_between_manifest_and_ref_after_a_rollback(rolled_back, monkeypatch):
    url, store, _ = rolled_back
    with Checkpointer(url) as ck:
        live = _state(0)
        ck.restore(live, step=20)

        def crash(self, step, seq=None):
            raise Crash("power cut before refs/latest")

        monkeypatch.setattr(Store, "write_latest", crash)
        with pytest.raises(ckpt.CheckpointError, match="power cut"):
            ck.save(_state(25), step=25).wait()
        monkeypatch.undo()
    assert store.read_latest() == 21, "the ref is stale"
    assert ckpt.latest_step(url) == 25 and ckpt.load(url)["step_no"] == 25
    assert _manifest(store, 25).seq == 5
    assert store.read_latest() == 21, "reading does not write"
    assert _resume_start(url) == 25
    lin, _ = read_lineage(store)
    assert lin.line == (25, 20, 10) and set(lin.abandoned) == {21, 30}


def test_manifest_written_without_its_ref_is_the_latest(store_url):
    ckpt.save(store_url, _state(1), step=1)
    ckpt.save(store_url, _state(2), step=2)
    store = Store(store_url)
    doc = json.loads(store.read_manifest(2))
    doc.update(step=3, parent=2, seq=3)
    store.write(store.manifest_path(3), json.dumps(doc).encode())  # the manifest only, as a crash leaves it
    assert store.read_latest() == 2
    assert ckpt.latest_step(store_url) == 3 and ckpt.read_manifest(store_url).step == 3
    assert ckpt.save(store_url, _state(4), step=4).parent == 3


def test_ref_trouble_never_blocks_a_save(store_url, caplog):
    ckpt.save(store_url, _state(1), step=1)
    store = Store(store_url)
    store.delete(store.path("refs", "latest"))
    store.write(store.path("refs", "latest", "stray"), b"x")  # refs/latest is a folder now
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        info = ckpt.save(store_url, _state(2), step=2)
    assert info.step == 2 and info.parent == 1
    assert ckpt.latest_step(store_url) == 2 and ckpt.load(store_url)["step_no"] == 2
    if store.local:  # object stores hold a key and a "folder" of the same name side by side
        assert "refs/latest could not be written" in caplog.text
        assert "step 2 is committed" in caplog.text


def test_refs_that_is_a_file_never_blocks_a_save(store_url, caplog):
    ckpt.save(store_url, _state(1), step=1)
    store = Store(store_url)
    store.delete(store.path("refs", "latest"))
    if store.local:
        os.rmdir(store.path("refs"))
    store.write(store.path("refs"), b"not a folder")
    assert ckpt.save(store_url, _state(2), step=2).step == 2
    assert ckpt.latest_step(store_url) == 2 and _resume_start(store_url) == 2


def test_latest_reads_only_the_manifests_newer_than_the_ref(tmp_path, monkeypatch):
    url = f"file://{tmp_path}/store"
    for s in range(1, 11):
        ckpt.save(url, _state(s), step=s)
    store = Store(url)
    old = time.time() - 600
    for s in range(1, 11):  # as if saved minutes apart
        os.utime(store.manifest_path(s), (old + s * 30, old + s * 30))
    read = []
    real = Store.read_manifest

    def counting(self, step):
        read.append(step)
        return real(self, step)

    monkeypatch.setattr(Store, "read_manifest", counting)
    assert store.latest_step() == 10 and read == [10]
    read.clear()
    store.delete(store.path("refs", "latest"))
    assert store.latest_step() == 10 and sorted(read) == list(range(1, 11)), "no ref: every manifest is read"


# -- resume never starts over ----------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{broken", b"[]", b'{"format": "ckpt", "schema": 1, "step": 3}'])
def test_resume_falls_back_past_an_unreadable_newest_manifest(store_url, caplog, body):
    for s in (1, 2, 3):
        ckpt.save(store_url, _state(s), step=s)
    store = Store(store_url)
    store.write(store.manifest_path(3), body)
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        assert _resume_start(store_url) == 2
    warned = [r.message for r in caplog.records if "skipped unreadable" in r.message]
    assert warned and "step 3" in warned[0] and store_url in warned[0]
    assert ckpt.latest_step(store_url) == 2 and ckpt.load(store_url)["step_no"] == 2
    with Checkpointer(store_url) as ck:
        assert ck.restore(_state(0)).step == 2
    with pytest.raises(CorruptCheckpointError, match="step 3"):
        ckpt.load(store_url, step=3)
    # the run goes on from 2 and its next save is the latest, whatever step 3 held
    assert ckpt.save(store_url, _state(3), step=3).parent == 2
    assert ckpt.load(store_url)["step_no"] == 3


def test_resume_raises_when_no_manifest_is_readable(store_url):
    for s in (1, 2):
        ckpt.save(store_url, _state(s), step=s)
    store = Store(store_url)
    store.write(store.manifest_path(1), b"[]")
    store.write(store.manifest_path(2), b"{broken")
    before = {s: store.read_manifest(s) for s in (1, 2)}
    with pytest.raises(CorruptCheckpointError, match=r"no readable checkpoint in .*step 2: .*step 1: "):
        _resume_start(store_url)
    with pytest.raises(CorruptCheckpointError, match="no readable checkpoint"):
        ckpt.load(store_url)
    assert store.steps() == [1, 2] and {s: store.read_manifest(s) for s in (1, 2)} == before, "nothing overwritten"


def test_resume_of_an_empty_store_starts_at_zero(store_url):
    assert _resume_start(store_url) == 0


# -- stores written before lineage was recorded ------------------------------------------------------


def test_manifests_without_seq_order_by_step_and_can_be_extended(store_url):
    for s in (1, 2, 3):
        ckpt.save(store_url, _state(s), step=s)
    store = Store(store_url)
    for s in (1, 2, 3):
        doc = json.loads(store.read_manifest(s))
        del doc["seq"], doc["run"]
        store.write(store.manifest_path(s), json.dumps(doc).encode())
    store.write(store.path("refs", "latest"), json.dumps({"step": 3, "manifest": "manifests/3.json"}).encode())
    assert _manifest(store, 3).seq is None
    assert ckpt.latest_step(store_url) == 3 and ckpt.load(store_url)["step_no"] == 3
    assert _resume_start(store_url) == 3

    with Checkpointer(store_url) as ck:  # a rollback in an old store
        ck.restore(_state(0), step=2)
        ck.save(_state(4), step=4).wait()
    m4 = _manifest(store, 4)
    assert (m4.parent, m4.seq) == (2, 1)
    assert ckpt.latest_step(store_url) == 4 and _resume_start(store_url) == 4
    info = ckpt.save(store_url, _state(5), step=5)
    assert (info.parent, _manifest(store, 5).seq) == (4, 2)
    lin, _ = read_lineage(store)
    assert lin.line == (5, 4, 2, 1) and lin.abandoned == (3,)


# -- lineage_of ------------------------------------------------------------------------------------


def _m(step: int, seq: int | None, parent: int | None) -> Manifest:
    return Manifest(step=step, created="", tree={}, adapters={}, tensors={}, parent=parent, seq=seq)


def _lineage(*ms: Manifest) -> lineage.Lineage:
    return lineage_of({m.step: m for m in ms})


def test_lineage_bridges_pruned_parents():
    lin = _lineage(_m(10, 1, None), _m(20, 2, 19), _m(24, 6, 23), _m(25, 7, 24))
    assert lin.line == (25, 24, 20, 10) and lin.abandoned == ()
    assert lin.before(24) == (20, 10) and lin.before(99) == ()


def test_lineage_after_a_rollback_with_pruned_steps():
    # 10, 20, 30; restore 20, save 25 and 26; then 20 and 25 were pruned
    lin = _lineage(_m(10, 1, None), _m(30, 3, 20), _m(26, 5, 25))
    assert lin.line == (26, 10) and lin.abandoned == (30,)


def test_lineage_does_not_follow_a_parent_replaced_since():
    # 10, 20, 30; restore 10 and re-save 20 (seq 4); then restore 30 explicitly and save 31
    lin = _lineage(_m(10, 1, None), _m(20, 4, 10), _m(30, 3, 20), _m(31, 5, 30))
    assert lin.line == (31, 30, 10) and lin.abandoned == (20,)


def test_lineage_of_hostile_links_terminates():
    lin = _lineage(_m(5, 2, 5), _m(6, 1, 7), _m(7, 3, 6))
    assert lin.latest == 7 and lin.line == (7, 6) and lin.abandoned == (5,)
    assert lineage_of({}).latest is None


def test_manifests_without_seq_come_before_every_one_with_seq():
    lin = _lineage(_m(1, None, None), _m(2, None, 1), _m(3, None, 2), _m(4, 1, 2))
    assert lin.line == (4, 2, 1) and lin.abandoned == (3,)


def test_damaged_rollback_commit_never_resurrects_the_abandoned_line(rolled_back, caplog):
    """21 (the rollback's commit) unreadable: its parent cannot be read from it, so the latest
    is taken below its step (20), never the abandoned 30 of higher seq than 20."""
    url, store, _ = rolled_back
    store.write(store.manifest_path(21), b"{not json")
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        assert ckpt.latest_step(url) == 20
    live = _state(0)
    assert ckpt.restore(url, live).step == 20 and live["step_no"] == 20
    assert "step 21" in caplog.text
