"""Crashes at every point of the commit sequence (objects -> manifest -> refs/latest)
leave the last committed checkpoint loadable and latest; stale or lost refs are repaired."""

from __future__ import annotations

import json

import pytest
import torch

import ckpt
from ckpt.storage.store import Store


class Crash(Exception):
    pass


def _state(value: float):
    return {"w": torch.full((64, 64), value), "step_no": int(value)}


@pytest.fixture
def committed(store_url):
    ckpt.save(store_url, _state(1.0), step=1)
    return store_url, Store(store_url)


def _assert_step1_is_latest(url: str, store: Store) -> None:
    assert store.latest_step() == 1
    tree = ckpt.load(url)
    assert tree["step_no"] == 1 and torch.equal(tree["w"], torch.full((64, 64), 1.0))
    live = _state(0.0)
    assert ckpt.restore(url, live).step == 1
    assert torch.equal(live["w"], torch.full((64, 64), 1.0))


def test_crash_before_manifest_keeps_previous(committed, monkeypatch):
    url, store = committed

    def boom(self, step, manifest, seq=None):
        raise Crash("power cut after the objects")

    monkeypatch.setattr(Store, "commit", boom)
    with pytest.raises(Crash):
        ckpt.save(url, _state(2.0), step=2)
    monkeypatch.undo()
    assert store.steps() == [1]
    _assert_step1_is_latest(url, store)
    # the orphaned objects of the failed save are harmless: the next save commits normally
    info = ckpt.save(url, _state(2.0), step=2)
    assert info.step == 2 and ckpt.load(url)["step_no"] == 2


def test_crash_in_manifest_write_keeps_previous(committed, monkeypatch):
    url, store = committed
    real_write = Store.write

    def write(self, path, data):
        if "/manifests/" in "/" + path:
            raise Crash(f"crash while writing {path}")
        return real_write(self, path, data)

    monkeypatch.setattr(Store, "write", write)
    with pytest.raises(Crash):
        ckpt.save(url, _state(2.0), step=2)
    monkeypatch.undo()
    assert store.steps() == [1]
    assert store.read_latest() == 1
    _assert_step1_is_latest(url, store)


def test_crash_while_writing_objects_keeps_previous(committed, monkeypatch):
    url, store = committed
    real_put = Store.put_object
    calls = []

    def put(self, key, payload):
        calls.append(key)
        if len(calls) == 1:
            raise Crash("disk full")
        return real_put(self, key, payload)

    monkeypatch.setattr(Store, "put_object", put)
    big = {"w": torch.randn(64, 64), "other": torch.randn(300), "step_no": 2}
    with pytest.raises(Crash):
        ckpt.save(url, big, step=2)
    monkeypatch.undo()
    assert calls, "the save wrote objects"
    assert store.steps() == [1]
    _assert_step1_is_latest(url, store)


def test_crash_between_manifest_and_ref(committed, monkeypatch):
    url, store = committed

    def boom(self, step, seq=None):
        raise Crash("crash before refs/latest")

    monkeypatch.setattr(Store, "write_latest", boom)
    with pytest.raises(Crash):
        ckpt.save(url, _state(2.0), step=2)
    monkeypatch.undo()
    # the manifest is the commit: step 2 exists and is the newest, though the ref is stale
    assert store.read_latest() == 1
    assert store.latest_step() == 2
    assert ckpt.load(url)["step_no"] == 2
    assert store.read_latest() == 1, "a plain read does not write"
    assert store.latest_step(repair=True) == 2
    assert store.read_latest() == 2
    assert json.loads(store.read(store.path("refs", "latest")))["step"] == 2


def test_leftover_temporaries_are_ignored(committed):
    url, store = committed
    # what a crash halfway through a local atomic write leaves behind
    store.fs.pipe_file(store.path("manifests", "7.json.tmp-deadbeef0000"), b"{partial")
    store.fs.makedirs(store.path("objects", "ab"), exist_ok=True)
    store.fs.pipe_file(store.path("objects", "ab", "abcdef0123456789.tmp-deadbeef0000"), b"x")
    assert store.steps() == [1]
    assert all(".tmp" not in o.key for o in store.list_objects())
    _assert_step1_is_latest(url, store)


def test_after_commit_runs_only_after_the_commit(committed, monkeypatch):
    url, store = committed
    seen = []

    class Observer:
        @ckpt.hookimpl
        def ckpt_after_commit(self, info):
            # by now the manifest and the ref are both in place
            seen.append((info.step, store.steps(), store.read_latest()))

    from ckpt.hooks.manager import get_plugins

    get_plugins().pm.register(Observer(), name="observer")
    ckpt.save(url, _state(2.0), step=2)
    assert seen == [(2, [1, 2], 2)]

    monkeypatch.setattr(Store, "commit", lambda self, step, manifest, seq=None: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        ckpt.save(url, _state(3.0), step=3)
    assert len(seen) == 1, "no after_commit for a save that did not commit"
