"""A lazy Store makes its filesystem on first use: the tiers' durable tier costs a restart
from the local tier nothing (importing s3fs and its clients alone takes ~0.2 s)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

import ckpt
from ckpt.errors import StoreError
from ckpt.storage.store import Store


def test_lazy_store_imports_nothing_until_used():
    code = (
        "import sys, ckpt.snapshot.checkpointer\n"
        "from ckpt.storage.store import Store\n"
        "s = Store('s3://bucket/run', {'anon': True}, lazy=True)\n"
        "assert 's3fs' not in sys.modules, 'imported at construction'\n"
        "assert s.url == 's3://bucket/run'\n"
        "assert s.path('x') == 'bucket/run/x', s.path('x')\n"
        "assert 's3fs' in sys.modules and type(s.fs).__name__ == 'S3FileSystem' and s._s3 and not s.local\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_lazy_store_resolves_once_across_threads(tmp_path):
    store = Store(str(tmp_path / "s"), lazy=True)
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(store.fs)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 and all(fs is seen[0] for fs in seen)
    assert store.local and store.root == str(tmp_path / "s")
    with pytest.raises(AttributeError):
        store.no_such_attribute  # noqa: B018


def test_lazy_store_refuses_an_unknown_protocol_at_once(tmp_path):
    with pytest.raises(StoreError, match="nosuchproto://x/y"):
        Store("nosuchproto://x/y", lazy=True)  # a typo: said at construction, nothing imported
    with pytest.raises(StoreError, match="nosuchproto://x/y"):
        ckpt.Checkpointer("nosuchproto://x/y", local=str(tmp_path / "local"))


def test_lazy_store_refuses_a_url_it_cannot_open_at_first_use():
    # a known protocol whose package is not installed: known only when fsspec imports it
    store = Store("hdfs://namenode/x/y", lazy=True)
    with pytest.raises(StoreError, match="hdfs://namenode/x/y"):
        store.fs  # noqa: B018
    with pytest.raises(StoreError, match="hdfs://namenode/x/y"):
        store.path("objects")  # and again: nothing half-made was kept


def test_checkpointer_durable_tier_made_lazily_still_persists(tmp_path):
    durable = str(tmp_path / "durable")
    with ckpt.Checkpointer(durable, local=str(tmp_path / "local"), persist_every=1) as ck:
        ck.save({"m": {"w": torch.arange(8.0)}}, step=1).wait()
    assert ckpt.steps(durable) == [1]
    assert torch.equal(ckpt.load(durable)["m"]["w"], torch.arange(8.0))


def test_lazy_store_wraps_any_error_of_its_filesystem(tmp_path):
    # fsspec raises what the filesystem raises: a zip over a missing file, FileNotFoundError
    url = f"zip://a::file://{tmp_path}/missing.zip"
    store = Store(url, lazy=True)
    with pytest.raises(StoreError, match="missing.zip"):
        store.fs  # noqa: B018
    with pytest.raises(StoreError, match="missing.zip"):
        store.path("objects")


def test_checkpointer_durable_tier_that_cannot_be_made_is_a_checkpoint_error(tmp_path):
    url = f"zip://a::file://{tmp_path}/missing.zip"
    state = {"m": {"w": torch.arange(8.0)}}
    ck = ckpt.Checkpointer(url, local=str(tmp_path / "local"), persist_every=None)
    try:
        ck.save(state, step=1).wait()
    except ckpt.CheckpointError as exc:  # the first save may be refused: the durable tier's lease
        assert "missing.zip" in str(exc)
    with pytest.raises(ckpt.CheckpointError, match="missing.zip"):
        ck.save(state, step=2).wait()
    # restore: the durable tier cannot be read, the local one answers
    info = ck.restore(state)
    assert info.step in (1, 2)
    try:
        ck.close()  # the newest local checkpoint cannot be persisted: said, naming the URL
    except ckpt.CheckpointError as exc:
        assert "missing.zip" in str(exc)
