"""Retention and garbage collection: policies, mark-and-sweep through delta parents,
the grace period, leases, dry runs, and GC running while a training loop saves."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

import ckpt
from ckpt.codecs import delta as deltamod
from ckpt.storage.leases import Lease, live_leases
from ckpt.storage.retention import GCResult, collect, prune, ranked_steps, retained, retained_steps
from ckpt.storage.store import Store
from ckpt.testing import assert_same_state, clone_state


def _age_everything(store: Store, seconds: float = 3600.0) -> None:
    """Make every object look ``seconds`` old (file stores only)."""
    then = time.time() - seconds
    for info in store.list_objects():
        os.utime(store.object_path(info.key), (then, then))


def _needed(store: Store, steps) -> set[str]:
    keys: set[str] = set()
    for s in steps:
        for ref in ckpt.read_manifest(store.url, s).chunk_refs():
            keys.update(deltamod.referenced_keys(ref.to_json()))
    return keys


def _delta_run(url: str, steps: int = 6) -> dict[int, dict]:
    """Saves where most chunks are deltas, plus a tensor replaced every step (garbage)."""
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    expected = {}
    for step in range(steps):
        w.add_(1e-4 * torch.randn_like(w))
        state = {"w": w, "noise": torch.randn(300), "step": torch.tensor(step)}
        ckpt.save(url, {"s": state}, step=step)
        expected[step] = clone_state(state)
    return expected


# -- retention policy ---------------------------------------------------------------------


def test_retention_policy():
    steps = [0, 5, 10, 15, 20, 25, 30]
    assert retained_steps(steps, keep_last=2) == {25, 30}
    assert retained_steps(steps, keep_last=2, keep_every=10) == {0, 10, 20, 25, 30}
    assert retained_steps(steps, keep_last=1, protect=[5, 99]) == {5, 30}
    assert retained_steps(steps, keep_last=None, keep_every=20) == {0, 20, 30}  # newest always kept
    assert retained_steps(steps, keep_last=None) == set(steps)
    assert retained_steps([], keep_last=3) == set()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ckpt.CheckpointError, match="keep_last"):
            retained_steps(steps, keep_last=bad)
    with pytest.raises(ckpt.CheckpointError, match="keep_every"):
        retained_steps(steps, keep_last=1, keep_every=0)


def test_retention_counts_in_the_ranked_order():
    """``retained`` takes the order of :func:`ranked_steps` (newest first), whatever the numbers."""
    ranked = [21, 20, 10, 30]  # e.g. a lineage: 21 continues from 20, 30 was abandoned
    assert retained(ranked, keep_last=2) == {21, 20}
    assert retained(ranked, keep_last=1, keep_every=10) == {21, 20, 10, 30}
    assert retained(ranked, keep_last=1, protect=[30, 99]) == {21, 30}
    assert retained([], keep_last=1) == set()


def test_ranked_steps_follow_the_lineage(tmp_path):
    """The seam orders by the store's lineage: the latest, its ancestors, then abandoned steps;
    a step that is not a readable checkpoint is left out (so it is never deleted)."""
    url = f"file://{tmp_path}/s"
    for step in (10, 20, 30):
        ckpt.save(url, {"w": torch.full((4,), float(step))}, step=step)
    with ckpt.Checkpointer(url) as ck:
        ck.restore({"w": torch.zeros(4)}, step=20)
        ck.save({"w": torch.ones(4)}, step=21).wait()
    assert ranked_steps(Store(url), [10, 20, 21, 30, 99]) == [21, 20, 10, 30]


# -- mark and sweep -----------------------------------------------------------------------


def test_gc_keeps_delta_parents_and_sweeps_the_rest(store_url):
    expected = _delta_run(store_url)
    store = Store(store_url)
    last = ckpt.read_manifest(store.url, 5)
    assert any(deltamod.delta_age(r.codec) >= 2 for r in last.chunk_refs()), "run should build delta runs"
    before = {o.key for o in store.list_objects()}
    need = _needed(store, [5])
    assert need - {r.key for r in last.chunk_refs()}, "step 5 needs objects only its delta parents name"

    result = collect(store_url, keep_last=1, grace_seconds=0)
    assert isinstance(result, GCResult)
    assert result.kept_steps == (5,)
    assert result.removed_steps == (0, 1, 2, 3, 4)
    assert not result.dry_run
    after = {o.key for o in store.list_objects()}
    assert after == need
    assert result.removed_objects == len(before - need) > 0
    assert store.steps() == [5]
    assert_same_state(ckpt.load(store_url)["s"], expected[5])
    # a second pass finds nothing left to do
    again = collect(store_url, keep_last=1, grace_seconds=0)
    assert (again.removed_steps, again.removed_objects, again.freed_bytes) == ((), 0, 0)


def test_keep_every_keeps_divisible_steps_restorable(store_url):
    expected = _delta_run(store_url, steps=7)
    result = collect(store_url, keep_last=2, keep_every=3, grace_seconds=0)
    assert result.kept_steps == (0, 3, 5, 6)
    store = Store(store_url)
    assert {o.key for o in store.list_objects()} == _needed(store, result.kept_steps)
    for step in result.kept_steps:
        assert_same_state(ckpt.load(store_url, step=step)["s"], expected[step])


def test_dry_run_deletes_nothing_and_reports_the_same(store_url):
    _delta_run(store_url, steps=4)
    store = Store(store_url)
    objects = sorted(o.key for o in store.list_objects())
    dry = collect(store_url, keep_last=1, grace_seconds=0, dry_run=True)
    assert dry.dry_run and dry.removed_steps == (0, 1, 2) and dry.removed_objects > 0
    assert sorted(o.key for o in store.list_objects()) == objects and store.steps() == [0, 1, 2, 3]
    real = collect(store_url, keep_last=1, grace_seconds=0)
    assert (real.removed_steps, real.removed_objects, real.freed_bytes) == (
        dry.removed_steps,
        dry.removed_objects,
        dry.freed_bytes,
    )


def test_grace_period_protects_young_objects(tmp_path):
    url = f"file://{tmp_path}/store"
    _delta_run(url, steps=3)
    store = Store(url)
    orphan = "f" * 32
    store.put_object(orphan, b"object of a save in flight")
    young = collect(url, grace_seconds=60)  # no policy: keep all steps, sweep orphans only
    assert young.removed_objects == 0 and young.kept_steps == (0, 1, 2)
    assert store.has_object(orphan)
    _age_everything(store, 120)
    old = collect(url, grace_seconds=60)
    assert old.removed_objects == 1 and not store.has_object(orphan)
    assert old.freed_bytes == len(b"object of a save in flight")


def test_grace_default_comes_from_the_environment(tmp_path, monkeypatch):
    url = f"file://{tmp_path}/store"
    _delta_run(url, steps=2)
    store = Store(url)
    _age_everything(store, 100)
    monkeypatch.setenv("CKPT_GC_GRACE_SECONDS", "1000")
    assert collect(url, keep_last=1).removed_objects == 0
    monkeypatch.setenv("CKPT_GC_GRACE_SECONDS", "10")
    assert collect(url, keep_last=1).removed_objects > 0
    monkeypatch.setenv("CKPT_GC_GRACE_SECONDS", "soon")
    with pytest.raises(ckpt.CheckpointError, match="CKPT_GC_GRACE_SECONDS"):
        collect(url, keep_last=1)


def test_unreadable_retained_manifest_stops_gc_before_deleting(store_url):
    _delta_run(store_url, steps=3)
    store = Store(store_url)
    objects = {o.key for o in store.list_objects()}
    store.write(store.manifest_path(2), b'{"format": "ckpt", "schema": 1')
    with pytest.raises(ckpt.CorruptCheckpointError, match="step 2"):
        collect(store_url, keep_last=1, grace_seconds=0)
    assert store.steps() == [0, 1, 2] and {o.key for o in store.list_objects()} == objects


def test_progress_reports_both_phases(store_url):
    _delta_run(store_url, steps=3)
    seen = []
    collect(
        store_url, keep_last=2, grace_seconds=0, progress=lambda phase, done, total: seen.append((phase, done, total))
    )
    assert ("mark", 2, 2) in seen
    assert seen[-1][0] == "sweep" and seen[-1][1] == seen[-1][2]


# -- leases -------------------------------------------------------------------------------


def test_leased_step_survives_until_released(store_url):
    expected = _delta_run(store_url, steps=4)
    store = Store(store_url)
    lease = Lease(store, step=1)
    doc = json.loads(store.read(lease.path))
    assert doc["step"] == 1 and doc["pid"] == os.getpid() and doc["expires"] > time.time() and doc["host"]
    assert [(r.path, r.kind, r.protect) for r in live_leases(store)] == [(lease.path, "step", (1,))]
    result = prune(store, keep_last=1, grace_seconds=0)
    assert result.kept_steps == (1, 3)
    assert_same_state(ckpt.load(store_url, step=1)["s"], expected[1])
    lease.renew(3)
    assert json.loads(store.read(lease.path))["step"] == 3
    assert prune(store, keep_last=1, grace_seconds=0).removed_steps == (1,)
    lease.release()
    lease.release()  # idempotent
    assert live_leases(store) == []
    with pytest.raises(ckpt.CheckpointError, match="released"):
        lease.renew(3)


def test_lease_of_the_first_format_is_honoured(store_url):
    """Step leases written before writer leases existed: {"step", "pid", "host", "expires"}."""
    _delta_run(store_url, steps=3)
    store = Store(store_url)
    path = store.path("leases", "0123abcd.json")
    store.write(path, json.dumps({"step": 0, "pid": 1, "host": "h", "expires": time.time() + 60}).encode())
    assert [(r.kind, r.protect) for r in live_leases(store)] == [("step", (0,))]
    assert collect(store_url, keep_last=1, grace_seconds=0).kept_steps == (0, 2)
    store.write(path, b'{"step": "zero"}')  # unreadable: what it holds is unknown, gc stops
    with pytest.raises(ckpt.CorruptCheckpointError, match="0123abcd.json"):
        live_leases(store)


_LEASE = {"kind": "step", "id": "x", "host": "h", "pid": 1, "since": 1.0, "heartbeat": 1.0, "protect": [0]}


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps({**_LEASE, "kind": "reader"}).encode(),  # a newer ckpt's kind
        json.dumps({**_LEASE, "kind": "writer", "pid": "1", "in_flight": 3, "in_flight_since": 1.0}).encode(),
        b"[" * 60000,
        json.dumps({**_LEASE, "heartbeat": 10**400}).encode(),
        json.dumps({**_LEASE, "heartbeat": 1e999}).encode().replace(b"Infinity", b"1e999"),
        json.dumps({**_LEASE, "since": 1e12}).encode(),
        b"\xff\xfe{}",
    ],
    ids=["newer-kind", "pid-text", "deep", "huge-int", "overflow", "year-33658", "not-utf8"],
)
def test_a_lease_that_cannot_be_read_stops_gc_and_a_writer(tmp_path, monkeypatch, raw):
    """A lease that cannot be read may protect any step: gc deleted what it held, or died
    with a RecursionError, OverflowError or ValueError. It stops, naming the file, with
    nothing deleted. An unreadable writer lease (a newer ckpt's writer may hold it) refuses
    a save, naming it, unless taken over: a save looped on it forever, or died."""
    url = str(tmp_path / "s")
    _delta_run(url, steps=3)
    store = Store(url)
    objects = {o.key for o in store.list_objects()}
    _age_everything(store)
    for name in ("other.json", "writer.json"):
        path = store.path("leases", name)
        store.write(path, raw)
        with pytest.raises(ckpt.CorruptCheckpointError, match=f"lease .*{name}.* is unreadable"):
            collect(url, keep_last=1, grace_seconds=0)
        assert store.steps() == [0, 1, 2] and {o.key for o in store.list_objects()} == objects
        store.delete(path)
    store.write(store.path("leases", "writer.json"), raw)
    with pytest.raises(ckpt.CheckpointError, match="writer lease .*writer.json.* is unreadable"):
        ckpt.save(url, {"s": {"w": torch.ones(2)}}, step=3)
    monkeypatch.setenv("CKPT_WRITER_TAKE_OVER", "1")
    ckpt.save(url, {"s": {"w": torch.ones(2)}}, step=3)
    assert ckpt.latest_step(url) == 3


def test_expired_lease_is_ignored_and_cleaned_up(store_url):
    _delta_run(store_url, steps=3)
    store = Store(store_url)
    with Lease(store, step=0, ttl_seconds=0.05) as lease:
        time.sleep(0.1)
        assert live_leases(store) == []
        result = collect(store_url, keep_last=1, grace_seconds=0)
        assert 0 in result.removed_steps
        assert not store.exists(lease.path), "gc removes expired lease files"


def test_prune_protects_given_steps(store_url):
    _delta_run(store_url, steps=4)
    result = prune(Store(store_url), keep_last=1, protect=[0], grace_seconds=0)
    assert result.kept_steps == (0, 3) and result.removed_steps == (1, 2)


# -- concurrency --------------------------------------------------------------------------


def test_gc_running_while_saving_never_breaks_a_retained_checkpoint(store_url):
    """A training loop saves as fast as it can while GC runs repeatedly with a short grace."""
    grace = 0.4
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    model[0].requires_grad_(False)  # frozen: shared by every checkpoint
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    expected: dict[int, dict] = {}
    errors: list[BaseException] = []
    done = threading.Event()

    def train():
        try:
            for step in range(24):
                model(torch.randn(4, 64)).square().mean().backward()
                opt.step()
                opt.zero_grad()
                snap = clone_state({"model": model.state_dict(), "opt": opt.state_dict()})
                ckpt.save(store_url, {"model": model, "opt": opt}, step=step)
                expected[step] = snap
                time.sleep(0.02)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    saver = threading.Thread(target=train)
    saver.start()
    results = []
    while not done.is_set():
        results.append(collect(store_url, keep_last=2, keep_every=10, grace_seconds=grace))
        time.sleep(0.05)
    saver.join()
    assert not errors, errors
    time.sleep(grace + (0.1 if store_url.startswith("file") else 1.1))
    results.append(collect(store_url, keep_last=2, keep_every=10, grace_seconds=grace))
    assert sum(r.removed_objects for r in results) > 0, "GC should have swept during the run"
    store = Store(store_url)
    assert store.steps() == [0, 10, 20, 22, 23]
    assert {o.key for o in store.list_objects()} == _needed(store, store.steps())
    for step in store.steps():
        fresh = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
        fresh[0].requires_grad_(False)
        fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
        ckpt.restore(store_url, {"model": fresh, "opt": fresh_opt}, step=step)
        assert_same_state(clone_state(fresh.state_dict()), expected[step]["model"])
        assert_same_state(clone_state(fresh_opt.state_dict()), expected[step]["opt"])
