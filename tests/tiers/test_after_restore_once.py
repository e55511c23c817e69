"""The ``ckpt_after_restore`` hooks run exactly once per restore across the tiers, for the
checkpoint the live objects end up holding, on every path of the ranking (fallbacks,
``restore(step=N)``, a durable tier answering first or last)."""

from __future__ import annotations

import pytest
from _tiers_util import corrupt, keys_of, make_state, run_steps, same, weights

import ckpt
from ckpt.storage.store import Store


def _restore(durable, local, **kw):
    fresh = make_state(seed=1)
    with ckpt.Checkpointer(durable, local=local) as ck:
        info = ck.restore(fresh, **kw)
    return info.step, weights(fresh)


def _once(calls, step, w):
    assert [s for s, _ in calls] == [step]
    assert same(calls[0][1], w)


@pytest.mark.parametrize("step", [5, 2])  # in the local tier / only in the durable one
def test_restore_of_a_given_step(tmp_path, after_restore_calls, step):
    durable, local = str(tmp_path / "d"), str(tmp_path / "l")
    seen = run_steps(durable, local, range(1, 6), persist_every=2)  # durable 2, 4, 5; local 4, 5
    got, w = _restore(durable, local, step=step)
    assert got == step and same(w, seen[step])
    _once(after_restore_calls, step, seen[step])


def test_latest_from_the_local_tier(tmp_path, after_restore_calls):
    durable, local = str(tmp_path / "d"), str(tmp_path / "l")
    seen = run_steps(durable, local, range(1, 4), persist_every=2)
    got, w = _restore(durable, local)
    assert got == 3
    _once(after_restore_calls, 3, seen[3])


def test_a_damaged_local_newest_falls_back_to_the_durable_copy(tmp_path, after_restore_calls):
    durable, local = str(tmp_path / "d"), str(tmp_path / "l")
    seen = run_steps(durable, local, range(1, 5), persist_every=2)
    corrupt(Store(local), 4)
    got, w = _restore(durable, local)
    assert got == 4 and same(w, seen[4])
    _once(after_restore_calls, 4, seen[4])


def test_a_damaged_local_newest_falls_back_to_an_older_local_one(tmp_path, after_restore_calls):
    durable, local = str(tmp_path / "d"), str(tmp_path / "l")
    seen = run_steps(durable, local, range(1, 5), persist_every=None)  # durable: only 4 (close)
    store = Store(local)
    corrupt(store, 4, keys_of(store, 4) - keys_of(store, 3))
    corrupt(Store(durable), 4)
    got, w = _restore(durable, local)
    assert got == 3 and same(w, seen[3])
    _once(after_restore_calls, 3, seen[3])


def test_no_checkpoint_runs_no_hook(tmp_path, after_restore_calls):
    with pytest.raises(ckpt.NoCheckpointError):
        _restore(str(tmp_path / "d"), str(tmp_path / "l"))
    assert after_restore_calls == []


@pytest.fixture
def durable_answers_first(monkeypatch):
    """The local checkpoint is read only once the durable tier's latest is known: it is not
    loaded early, but prepared and loaded (or not) after the ranking."""
    import threading
    import time

    import ckpt.snapshot.checkpointer as ckmod
    from ckpt.storage.tiers import Tiers

    latest, prepare, apply = Tiers._durable_latest, ckmod.prepare_restore, ckmod.apply_restore
    answered = threading.Event()
    #: whether the durable tier had answered, at each load of a prepared local checkpoint
    late: list[bool] = []

    def signalled(self):
        try:
            return latest(self)
        finally:
            answered.set()

    def prepare_after(*a, **k):
        answered.wait(30)
        time.sleep(0.1)  # its future is done
        return prepare(*a, **k)

    def apply_late(p, **kw):
        late.append(answered.is_set())
        return apply(p, **kw)

    def arm():
        monkeypatch.setattr(Tiers, "_durable_latest", signalled)
        monkeypatch.setattr(ckmod, "prepare_restore", prepare_after)
        monkeypatch.setattr(ckmod, "apply_restore", apply_late)
        return late

    return arm


def test_durable_answering_first_local_wins(tmp_path, after_restore_calls, durable_answers_first):
    durable, local = str(tmp_path / "d"), str(tmp_path / "l")
    seen = run_steps(durable, local, range(1, 4), persist_every=2)
    late = durable_answers_first()
    got, w = _restore(durable, local)
    assert got == 3 and same(w, seen[3])
    assert late == [True]  # prepared, then loaded after the ranking
    _once(after_restore_calls, 3, seen[3])


def test_durable_answering_first_durable_wins(tmp_path, after_restore_calls, durable_answers_first):
    durable, local = str(tmp_path / "d"), str(tmp_path / "l")
    run_steps(durable, local, range(1, 3))
    seen = run_steps(durable, str(tmp_path / "other-node"), range(1, 6), persist_every=5)
    late = durable_answers_first()
    got, w = _restore(durable, local)
    assert got == 5 and same(w, seen[5])
    assert late == []  # the local one prepared, never loaded
    _once(after_restore_calls, 5, seen[5])
