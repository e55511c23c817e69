"""A local save makes every new directory entry durable before its manifest commits.

A file renamed into a directory is durable once that directory is fsynced; a directory
created on the way (``objects/ab/``, ``objects/``, the store's root) is durable once its
*parent* is. These tests watch which directories ``os.fsync`` is called on during a real
``ckpt.save`` (``os.open``/``os.fsync``/``os.replace`` wrapped to record, then called)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
import torch

import ckpt


class Recorder:
    """``("fsync", directory)`` and ``("replace", destination)`` in the order they happen."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str]] = []
        self._dirs: dict[int, tuple[str, int]] = {}  # fd -> (path, inode) of directories opened
        self._lock = threading.Lock()
        real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

        def open_(path, flags, *args, **kwargs):
            fd = real_open(path, flags, *args, **kwargs)
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                with self._lock:
                    self._dirs[fd] = (os.path.realpath(path), st.st_ino)
            return fd

        def fsync(fd):
            st = os.fstat(fd)
            with self._lock:
                known = self._dirs.get(fd)
                if stat.S_ISDIR(st.st_mode) and known is not None and known[1] == st.st_ino:
                    self.events.append(("fsync", known[0]))
            return real_fsync(fd)

        def replace(src, dst, *args, **kwargs):
            real_replace(src, dst, *args, **kwargs)
            with self._lock:
                self.events.append(("replace", os.path.realpath(dst)))

        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def index(self, kind: str, path: Path) -> list[int]:
        return [i for i, event in enumerate(self.events) if event == (kind, os.path.realpath(path))]


def _state() -> dict[str, object]:
    # several objects (tensors over the pack size are stored alone), so several objects/<xx>/
    return {f"w{i}": torch.full((300_000,), float(i)) for i in range(4)} | {"step_no": 1}


def test_new_directories_are_fsynced_in_their_parents_before_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_FSYNC", "1")
    root = tmp_path / "new" / "store"  # neither exists yet
    rec = Recorder(monkeypatch)
    ckpt.save(str(root), _state(), step=1)
    monkeypatch.undo()

    [manifest] = rec.index("replace", root / "manifests" / "1.json")
    shards = sorted(p for p in (root / "objects").iterdir() if p.is_dir())
    assert len(shards) >= 2
    # each directory a committed object's path needs, made by this save, is in its parent's
    # listing durably before the manifest names the object
    for parent in [*shards, root / "objects", root, tmp_path / "new", tmp_path]:
        before = [i for i in rec.index("fsync", parent) if i < manifest]
        assert before, f"{parent} not fsynced before the manifest: {rec.events}"
    # manifests/ is new too: the root is fsynced again after the manifest, before save returns
    assert any(i > manifest for i in rec.index("fsync", root)), rec.events
    assert ckpt.load(str(root))["step_no"] == 1


def test_existing_directories_are_not_fsynced_again(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_FSYNC", "1")
    root = tmp_path / "store"
    ckpt.save(str(root), _state(), step=1)
    rec = Recorder(monkeypatch)
    ckpt.save(str(root), _state(), step=2)  # same chunks: no object, no new directory
    monkeypatch.undo()
    synced = {path for kind, path in rec.events if kind == "fsync"}
    assert os.path.realpath(tmp_path) not in synced
    assert os.path.realpath(root / "objects") not in synced


def test_no_fsync_when_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_FSYNC", "0")
    rec = Recorder(monkeypatch)
    ckpt.save(str(tmp_path / "store"), _state(), step=1)
    monkeypatch.undo()
    assert [e for e in rec.events if e[0] == "fsync"] == []


def test_a_directory_removed_after_the_store_made_it_is_made_again_and_fsynced_in_its_parent(tmp_path, monkeypatch):
    # objects/ab/ made by this store, then emptied and removed by someone else (a cleaner of
    # empty folders, ``find -empty -delete``): the next object written there makes it again
    from ckpt.storage.store import Store

    monkeypatch.setenv("CKPT_FSYNC", "1")
    root = tmp_path / "store"
    store = Store(str(root))
    store.write(store.object_path("ab" + "0" * 14), b"one")
    store.sync_dirs()
    (root / "objects" / "ab" / ("ab" + "0" * 14)).unlink()
    (root / "objects" / "ab").rmdir()
    (root / "objects").rmdir()
    rec = Recorder(monkeypatch)
    store.write(store.object_path("ab" + "1" * 14), b"two")
    store.sync_dirs()
    monkeypatch.undo()
    assert (root / "objects" / "ab" / ("ab" + "1" * 14)).read_bytes() == b"two"
    for parent in [root / "objects" / "ab", root / "objects", root]:
        assert rec.index("fsync", parent), f"{parent} not fsynced: {rec.events}"


def test_a_store_whose_root_was_removed_is_not_made_again(tmp_path):
    import shutil

    from ckpt.errors import StoreError
    from ckpt.storage.store import Store

    root = tmp_path / "store"
    store = Store(str(root))
    store.write(store.object_path("ab" + "0" * 14), b"one")
    shutil.rmtree(root)  # the whole store deleted under a live writer: its saves fail
    with pytest.raises(StoreError, match="FileNotFoundError"):
        store.write(store.object_path("ab" + "1" * 14), b"two")
    assert not root.exists()


def test_a_folder_that_cannot_be_fsynced_fails_the_save_and_is_synced_at_the_next(tmp_path, monkeypatch):
    # EIO from fsync of the objects/ folder: the save is a StoreError naming it, nothing is
    # committed, and the writer's next save fsyncs it (and the folders not reached) before
    # its manifest
    store = tmp_path / "store"
    rec = Recorder(monkeypatch)
    recorded_fsync = os.fsync
    failing = {"left": 1}

    def fsync(fd):
        if (
            failing["left"]
            and stat.S_ISDIR(os.fstat(fd).st_mode)
            and os.fstat(fd).st_ino == os.stat(store / "objects").st_ino
        ):
            failing["left"] -= 1
            raise OSError(5, "Input/output error (injected)")
        return recorded_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    state = _state()
    with ckpt.Checkpointer(str(store)) as ck:
        with pytest.raises(ckpt.StoreError, match=r"objects .*durable.*Input/output error"):
            ck.save(state, step=1).wait()
        assert ckpt.steps(str(store)) == []
        rec.events.clear()
        ck.save(state, step=2).wait()
    manifest = rec.index("replace", store / "manifests" / "2.json")
    assert manifest and rec.index("fsync", store / "objects")
    assert min(rec.index("fsync", store / "objects")) < manifest[0]
    assert ckpt.steps(str(store)) == [2]
