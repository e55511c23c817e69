"""Collective saves and restores with real ranks (gloo on the CPU)."""

from __future__ import annotations

import json

import pytest
import torch

import ckpt
from ckpt.storage.store import Store
from ckpt.testing import stored_objects

from .conftest import assert_ok, run_ranks


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The DDP, failing-rank and async scenarios, run by one launch of 2 ranks."""
    where = tmp_path_factory.mktemp("suite")
    results = run_ranks("suite", 2, where, timeout=240)
    assert_ok(results)
    return where, results


def test_ddp_shared_state_once_and_per_rank_values(suite):
    url = str(suite[0] / "ddp" / "store")
    m = ckpt.read_manifest(url)
    assert m.world_size == 2
    # what the collective save put in the store: every rank's objects and the manifest, whose
    # own length (world_size included) stored_bytes counts
    store = Store(url)
    assert m.stored_bytes == sum(stored_objects(store).values()) + len(store.read_manifest(1))
    assert "model/0.weight" in m.tensors and not any(p.startswith("$rank/") and "model" in p for p in m.tensors)
    assert {"$rank/0/rank/t", "$rank/1/rank/t"} <= set(m.tensors)
    assert m.tree["step"] == 7 and m.tree["rank"]["value"] == {"$rank": [0, 1]}
    from click.testing import CliRunner

    from ckpt.cli import build_cli

    res = CliRunner().invoke(build_cli(), ["show", url], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = {line.split()[0]: line for line in res.output.splitlines() if line.strip()}
    assert lines["model.0.weight"].rstrip().endswith("replicated")
    assert lines["$rank.1.rank.t"].rstrip().endswith("rank:1")
    for r in (0, 1):
        got = ckpt.load(url, rank=r)
        assert got["rank"]["value"] == r and torch.equal(got["rank"]["t"], torch.full((3,), float(r)))


def test_whole_tensors_are_decoded_into_the_live_tensors_and_a_late_failure_raises_everywhere(suite):
    """The worker checks the values, the reads into live memory and the same memory; a
    failure of the second pass on rank 1 raises on both ranks."""
    _, results = suite
    late = [line for _, text in results for line in text.splitlines() if line.startswith("LATE")]
    assert len(late) == 2, late
    assert "LATE 1 CorruptCheckpointError" in late[1] and "rewritten" in late[1]
    assert late[0].startswith("LATE 0") and "rank 1" in late[0]


def test_after_restore_hooks_run_once_every_rank_has_loaded(suite):
    """A hook running a collective of its own: it meets the other ranks' after a good
    restore; when one rank's load fails, every rank raises and none runs the hook (the
    worker asserts the calls)."""
    _, results = suite
    lines = [line for _, text in results for line in text.splitlines() if line.startswith("HOOKS")]
    assert len(lines) == 2, lines
    assert lines[1].startswith("HOOKS 1 ") and "adapter failed (test)" in lines[1], lines
    assert lines[0].startswith("HOOKS 0 ") and "rank 1" in lines[0], lines


def test_a_keyboard_interrupt_on_one_rank_raises_on_every_rank_at_once(suite):
    """Rank 1 interrupted while it writes its objects, while it loads, and while a
    Checkpointer stages: it gets the
    KeyboardInterrupt itself, rank 0 a CheckpointError naming it without waiting for the
    ranks' timeout, and the next collective save and restore work (the worker checks)."""
    _, results = suite
    lines = [line for _, text in results for line in text.splitlines() if line.startswith("INTERRUPT")]
    assert len(lines) == 6, lines
    for what in ("save", "restore", "checkpointer"):
        assert f"INTERRUPT {what} 1 KeyboardInterrupt" in lines, lines
        (mine,) = [line for line in lines if line.startswith(f"INTERRUPT {what} 0 CheckpointError")]
        assert "rank 1 failed: KeyboardInterrupt" in mine, mine
        assert float(mine.split()[4].rstrip("s")) < 30, mine  # not CKPT_DIST_TIMEOUT
    waiting = sorted(line for _, text in results for line in text.splitlines() if line.startswith("WAITING"))
    assert waiting == [
        "WAITING 2 1 KeyboardInterrupt",
        "WAITING 3 0 CheckpointError",
        "WAITING 3 1 CheckpointError",
    ], waiting


def test_a_rank_one_save_ahead_is_refused_not_committed_under_the_others_step(suite):
    """Rank 1 saving the step after rank 0's (it missed one): every rank raises, for ckpt.save
    and the Checkpointer, and neither step is committed (the worker checks the steps)."""
    _, results = suite
    lines = [line for _, text in results for line in text.splitlines() if line.startswith("MISSED")]
    assert len(lines) == 4, lines
    for line in lines:
        assert "the ranks are not saving the same step (rank 0: step" in line, line


def test_an_interrupted_rank_waiting_for_a_slow_one_leaves_at_a_second_ctrl_c_and_keeps_its_interrupt(tmp_path):
    results = run_ranks("interrupt_wait", 2, tmp_path, timeout=120, env={"CKPT_DIST_TIMEOUT": "30"})
    text0, text1 = results[0][1], results[1][1]
    # first, the report of an interrupt on ckpt's group leaves the Checkpointer's group alone
    (group0,) = [line for line in text0.splitlines() if line.startswith("GROUP 0 KeyboardInterrupt")]
    assert float(group0.split()[3].rstrip("s")) < 10, group0  # not CKPT_DIST_TIMEOUT
    (group1,) = [line for line in text1.splitlines() if line.startswith("GROUP 1")]
    assert "rank 0 failed: KeyboardInterrupt" in group1, group1
    assert results[0][0] == 0 and text0.rstrip().endswith("OK"), text0[-3000:]
    second = [line for line in text0.splitlines() if line.startswith("WAIT second 0")]
    assert second and float(second[0].split()[3].rstrip("s")) < 4, text0  # rank 1 answers after 6 s
    assert "WAIT second 1 CheckpointError" in text1 and "rank 0 failed: KeyboardInterrupt" in text1, text1
    assert "WAIT dead 0 KeyboardInterrupt" in text0, text0  # not "the other ranks did not answer"
    assert "WAIT rank 1 exits" in text1


def test_a_real_sigint_wherever_it_lands_stops_every_rank_in_step(tmp_path):
    """Real SIGINTs: on a rank waiting in ckpt's gathers for a slow one (save, restore), and on
    rank 0 right after it wrote the manifest. The worker checks the store and that a later
    save and restore of every rank's own values work."""
    results = run_ranks("sigint", 2, tmp_path, timeout=120, env={"CKPT_DIST_TIMEOUT": "30"})
    assert all(code == 0 for code, _ in results), results
    lines = [line for _, text in results for line in text.splitlines() if line.startswith("SIGINT")]
    got = {tuple(line.split()[1:3]): line for line in lines}
    for what in ("save", "restore"):
        assert got[(what, "1")].split()[3] == "KeyboardInterrupt", lines
        assert got[(what, "0")].split()[3] == "CheckpointError", lines
        assert "rank 1 failed: KeyboardInterrupt" in got[(what, "0")], lines
    # committed: rank 0 stops after the ranks agree on it, rank 1 returns it
    assert got[("committed", "0")].split()[3] == "KeyboardInterrupt", lines
    assert got[("committed", "1")].split()[3:4] + got[("committed", "1")].split()[5:] == ["returned", "3"], lines
    assert "SIGINT in step 0" in lines and "SIGINT in step 1" in lines, lines
    # a second SIGINT ends rank 1's wait at once (rank 0 is 2.5 s late). When rank 0 sent a
    # failure in that gather, every rank ended the save there, and the next save commits
    failed = got[("failed", "1")].split()
    assert failed[3] == "KeyboardInterrupt" and float(failed[4].rstrip("s")) < 2.0, lines
    assert got[("failed", "0")].split()[3] == "CheckpointError" and "capture failed on rank 0" in got[("failed", "0")]
    for r in ("0", "1"):
        assert got[("after", r)].split()[3] == "returned" and got[("after", r)].split()[5:] == ["6"], lines
    # the job's own handler: the save commits on both, rank 1's handler ran once, after it
    assert got[("handled", "0")].split()[5:] == ["(7,", "0)"], lines
    assert got[("handled", "1")].split()[5:] == ["(7,", "1)"], lines
    # left while a Checkpointer's restore waited for its commit: rank 0 raises at the first gather
    assert got[("waiting", "1")].split()[3] == "KeyboardInterrupt", lines
    assert (
        got[("waiting", "0")].split()[3] == "CheckpointError"
        and "rank 1 failed: KeyboardInterrupt" in got[("waiting", "0")]
    )
    # when rank 0 went on with the save rank 1 left, rank 1's next call refuses rather than
    # meet rank 0's next gather; rank 0 raises when rank 1 exits (not after CKPT_DIST_TIMEOUT)
    twice = got[("twice", "1")].split()
    assert twice[3] == "KeyboardInterrupt" and float(twice[4].rstrip("s")) < 2.0, lines
    refused = got[("refused", "1")]
    assert (
        refused.split()[3] == "CheckpointError" and "in the middle (a second Ctrl-C) while the other ranks" in refused
    )
    assert got[("twice", "0")].split()[3] == "CheckpointError", lines
    assert float(got[("twice", "0")].split()[4].rstrip("s")) < 25, lines


def test_failing_rank_raises_everywhere_and_writes_no_manifest(suite):
    where, results = suite
    assert all("RAISED" in text for _, text in results)
    url = str(where / "fail" / "store")
    assert ckpt.steps(url) == [1]
    doc = json.loads(Store(url).fs.cat_file(Store(url).manifest_path(1)))
    assert doc["schema"] == 2 and doc["world_size"] == 2


def test_sigkilled_rank_leaves_previous_latest(tmp_path):
    results = run_ranks("kill", 2, tmp_path, env={"CKPT_DIST_TIMEOUT": "20"}, timeout=90)
    code0, text0 = results[0]
    assert code0 == 0 and "RAISED" in text0, text0[-2000:]
    assert results[1][0] != 0
    url = str(tmp_path / "store")
    assert ckpt.latest_step(url) == 1
    assert torch.equal(ckpt.load(url)["x"], torch.ones(3))


def test_async_checkpointer_commits_while_training_collectives_run(suite):
    m = ckpt.read_manifest(str(suite[0] / "async" / "store"))
    assert m.step == 6 and m.world_size == 2 and m.tree["rank"]["r"] == {"$rank": [0, 1]}


def test_checkpointer_retention_resume_preemption_and_damaged_newest(tmp_path):
    """One launch: refused arguments, keep_last/keep_every, resume, a SIGTERM on one rank
    stopping both at the same step, and a newest damaged on rank 1 only skipped by both."""
    results = run_ranks("checkpointer", 2, tmp_path, timeout=180)
    assert_ok(results)
    for _, text in results:
        assert text.count("REFUSED") == 2 and "PREEMPTED" in text and "RAISED" in text
    assert "RAISED CorruptCheckpointError" in results[0][1] and "RAISED MissingObjectError" in results[1][1]
    assert "step 2 is damaged on rank 1; trying step 1" in results[0][1] + results[1][1]
    # retention also collected what only the pruned checkpoints used
    store = Store(str(tmp_path / "kept"))
    refs = {c.key for s in (4, 5, 6) for e in ckpt.read_manifest(store.url, step=s).tensors.values() for c in e.refs}
    assert {o.key for o in store.list_objects()} == refs


def test_every_rank_makes_its_objects_durable_before_the_manifest(tmp_path):
    # a rank's objects are renamed into objects/<xx>/ (made by it, maybe): those directories
    # (and the parents of new ones) must be fsynced before rank 0 commits the manifest, or a
    # power loss after the commit can lose objects of a committed checkpoint
    from pathlib import Path

    from .conftest import WORKER

    results = run_ranks("fsync", 2, tmp_path, env={"CKPT_FSYNC": "1"}, worker=WORKER.with_name("fsync_worker.py"))
    assert_ok(results)
    events = {r: json.loads((tmp_path / f"events-{r}.json").read_text()) for r in (0, 1)}
    store = (tmp_path / "store").resolve()
    [committed] = [t for kind, p, t in events[0] if kind == "replace" and p == str(store / "manifests" / "1.json")]
    fsyncs = [(p, t) for r in (0, 1) for kind, p, t in events[r] if kind == "fsync"]
    mine = [(p, t) for kind, p, t in events[1] if kind == "replace" and Path(p).parent.parent == store / "objects"]
    assert mine, events[1]
    for obj, renamed in mine:
        folder = str(Path(obj).parent)
        assert any(p == folder and renamed <= t < committed for p, t in fsyncs), f"{folder} of rank 1's {obj}"
    assert any(p == str(store / "objects") and t < committed for p, t in fsyncs)
