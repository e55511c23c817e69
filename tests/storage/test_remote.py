"""Remote stores on real local servers: S3 (moto) and Azure Blob (azurite).

The generic save/restore/load suites run on these stores through the ``store_url``
fixture; this file holds what is specific to object stores: multipart uploads,
corruption done behind ckpt's back, listings other writers change, dead endpoints,
the CLI with ``--storage-option``, and the async engine surviving a failed save.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest
import torch

import ckpt
from ckpt.errors import CheckpointError, CorruptCheckpointError, MissingObjectError, StoreError
from ckpt.hooks.manager import get_plugins
from ckpt.io.verify import verify_manifest
from ckpt.storage.store import Store

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["s3", "az"])
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


def _state(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(256, 64, generator=g), "b": torch.randn(64, generator=g)},
        "ids": torch.randint(0, 1000, (3000,), generator=g),
        "epoch": seed,
    }


def _object_bytes(server, url: str, key: str) -> bytes:
    return Store(url, server.storage_options).get_object(key)


def _replace_object(server, url: str, key: str, data: bytes) -> None:
    """Overwrite an object with the service's own client (behind fsspec's and ckpt's back)."""
    store = Store(url, server.storage_options)
    path = store.object_path(key)
    if server.kind == "s3":
        bucket, name = path.split("/", 1)
        server.client().put_object(Bucket=bucket, Key=name, Body=data)
    else:
        container, name = path.split("/", 1)
        server.client().get_blob_client(container, name).upload_blob(data, overwrite=True)


def _delete_object(server, url: str, key: str) -> None:
    store = Store(url, server.storage_options)
    path = store.object_path(key)
    if server.kind == "s3":
        bucket, name = path.split("/", 1)
        server.client().delete_object(Bucket=bucket, Key=name)
    else:
        container, name = path.split("/", 1)
        server.client().get_blob_client(container, name).delete_blob()


def test_explicit_storage_options_round_trip(server):
    """URL + storage_options, no fsspec defaults involved."""
    import fsspec.config

    saved = fsspec.config.conf.pop(server.kind, None)
    try:
        url = server.new_url("explicit")
        state = _state(1)
        info = ckpt.save(url, state, step=3, storage_options=server.storage_options)
        assert info.url == url and info.step == 3
        out = ckpt.load(url, storage_options=server.storage_options)
        assert torch.equal(out["model"]["w"], state["model"]["w"]) and out["epoch"] == 1
    finally:
        if saved is not None:
            fsspec.config.conf[server.kind] = saved


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_objects_corrupted_on_the_server_are_detected(server, how):
    url = server.new_url("corrupt")
    state = _state(2)
    ckpt.save(url, state, step=1, storage_options=server.storage_options)
    store = Store(url, server.storage_options)
    key = next(iter(ckpt.read_manifest(store.url, 1).tensors["model/w"].chunks)).key
    if how == "delete":
        _delete_object(server, url, key)
    else:
        data = bytearray(_object_bytes(server, url, key))
        if how == "flip":
            data[len(data) // 2] ^= 0x40
        else:
            del data[len(data) // 2 :]
        _replace_object(server, url, key, bytes(data))
    expected = MissingObjectError if how == "delete" else CorruptCheckpointError
    with pytest.raises(expected) as err:
        ckpt.load(url, storage_options=server.storage_options)
    assert key in str(err.value) and "model/w" in str(err.value)
    live = _state(3)
    with pytest.raises(expected):
        ckpt.restore(url, live, storage_options=server.storage_options)
    problems = verify_manifest(store, get_plugins().codecs, ckpt.read_manifest(store.url, 1))
    assert [p.key for p in problems] == [key] and problems[0].tensor == "model/w"


def test_s3_large_objects_go_up_in_parallel_parts(s3_server, monkeypatch):
    monkeypatch.setenv("CKPT_PART_BYTES", str(5 * 1024 * 1024))
    monkeypatch.setenv("CKPT_CHUNK_BYTES", str(12 * 1024 * 1024))
    url = s3_server.new_url("multipart")
    t = torch.randn(3 * 1024 * 1024)  # 12 MiB in one chunk; random floats barely compress
    ckpt.save(url, {"t": t}, step=0, storage_options=s3_server.storage_options)
    store = Store(url, s3_server.storage_options)
    (ref,) = ckpt.read_manifest(store.url, 0).tensors["t"].chunks
    assert ref.stored >= 10 * 1024 * 1024
    bucket, name = store.object_path(ref.key).split("/", 1)
    head = s3_server.client().head_object(Bucket=bucket, Key=name)
    parts = -(-ref.stored // (5 * 1024 * 1024))
    assert head["ETag"].strip('"').endswith(f"-{parts}"), head["ETag"]  # a multipart ETag: <md5>-<parts>
    assert torch.equal(ckpt.load(url, storage_options=s3_server.storage_options)["t"], t)
    # small objects stay single PUTs
    manifest_head = s3_server.client().head_object(Bucket=bucket, Key=store.manifest_path(0).split("/", 1)[1])
    assert "-" not in manifest_head["ETag"]


def test_azure_large_blobs_are_staged_in_blocks(az_server, monkeypatch):
    monkeypatch.setenv("CKPT_CHUNK_BYTES", str(72 * 1024 * 1024))
    url = az_server.new_url("blocks")
    g = torch.Generator().manual_seed(0)
    t = torch.randint(-(2**31), 2**31 - 1, (17 * 1024 * 1024,), dtype=torch.int32, generator=g)  # 68 MiB
    ckpt.save(url, {"t": t}, step=0, storage_options=az_server.storage_options)
    store = Store(url, az_server.storage_options)
    (ref,) = ckpt.read_manifest(store.url, 0).tensors["t"].chunks
    container, name = store.object_path(ref.key).split("/", 1)
    blocks = az_server.client().get_blob_client(container, name).get_block_list("committed")[0]
    assert len(blocks) > 1, "above 64 MiB the SDK stages blocks and commits them with one Put Block List"
    assert torch.equal(ckpt.load(url, storage_options=az_server.storage_options)["t"], t)


def test_listings_see_other_writers(server):
    """fsspec caches listings per (shared) filesystem instance; the store must not trust them."""
    url = server.new_url("listing")
    store = Store(url, server.storage_options)
    assert store.steps() == []  # a listing is now cached by the filesystem instance
    other = fsspec.filesystem(server.kind, skip_instance_cache=True, **server.storage_options)
    ckpt.save(url, _state(4), step=1, storage_options=server.storage_options)
    # another process (another client) commits step 2 (same content, the next commit)
    doc = json.loads(other.cat_file(store.manifest_path(1)))
    doc.update(step=2, parent=1, seq=doc["seq"] + 1)
    other.pipe_file(store.manifest_path(2), json.dumps(doc).encode())
    assert store.steps() == [1, 2]
    assert store.latest_step(repair=True) == 2
    key = next(iter(ckpt.read_manifest(store.url, 1).tensors["ids"].chunks)).key
    assert store.has_object(key)
    other.rm_file(store.object_path(key))
    assert not store.has_object(key)


def test_one_store_is_safe_from_many_threads(server):
    url = server.new_url("threads")
    store = Store(url, server.storage_options)
    payloads = {f"{i:032x}": os.urandom(1000 + i) for i in range(64)}
    errors = []

    def work(items):
        try:
            for key, data in items:
                store.put_object(key, data)
                assert store.get_object(key) == data
        except BaseException as exc:
            errors.append(exc)

    items = list(payloads.items())
    threads = [threading.Thread(target=work, args=(items[i::16],)) for i in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert {o.key for o in store.list_objects()} == set(payloads)


def test_dead_endpoint_fails_in_bounded_time_naming_the_url(monkeypatch):
    """Nothing listens: connection refused on every call, retried, then a StoreError."""
    from servers import free_port

    monkeypatch.setenv("CKPT_RETRY_BASE_DELAY", "0.05")
    monkeypatch.setenv("CKPT_RETRY_MAX_SECONDS", "2")
    port = free_port()
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
        # botocore's own retries off: ckpt's are the ones under test
        "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}},
    }
    url = "s3://nowhere/run"
    t0 = time.monotonic()
    with pytest.raises(StoreError) as err:
        ckpt.save(url, _state(5), step=0, storage_options=options)
    assert time.monotonic() - t0 < 20
    assert url in str(err.value) and "attempt" in str(err.value)
    with pytest.raises(StoreError, match="s3://nowhere/run"):
        ckpt.load(url, storage_options=options)


# -- the CLI on remote URLs ------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FSSPEC_")}
    return subprocess.run(
        [sys.executable, "-m", "ckpt.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )


def _options(server) -> list[str]:
    out = []
    for opt in server.cli_options:
        out += ["--storage-option", opt]
    if server.kind == "s3":
        out += ["--storage-option", "client_kwargs.region_name=us-east-1"]
    return out


def test_cli_ls_and_verify_on_remote_urls(server):
    url = server.new_url("cli")
    for step in (10, 20):
        ckpt.save(url, _state(step), step=step, storage_options=server.storage_options)
    ls = _cli("ls", url, "--json", *_options(server))
    assert ls.returncode == 0, ls.stderr
    doc = json.loads(ls.stdout)
    assert [c["step"] for c in doc["checkpoints"]] == [10, 20] and doc["url"] == url
    ok = _cli("verify", url, *_options(server))
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout

    store = Store(url, server.storage_options)
    key = next(iter(ckpt.read_manifest(store.url, 20).tensors["model/b"].chunks)).key
    data = bytearray(_object_bytes(server, url, key))
    data[-1] ^= 1
    _replace_object(server, url, key, bytes(data))
    bad = _cli("verify", url, "--json", *_options(server))
    assert bad.returncode == 1, bad.stderr
    doc = json.loads(bad.stdout)
    assert not doc["ok"] and [p["key"] for p in doc["problems"]] == [key]
    assert any(r["tensor"] == "model/b" for r in doc["problems"][0]["references"])


# -- the async engine: a failed save is reported, training goes on ----------------------------


def test_failed_async_save_is_reported_and_training_continues(monkeypatch, s3_server):
    import faultfs  # noqa: F401 - registers faulty://

    monkeypatch.setenv("CKPT_RETRY_BASE_DELAY", "0.02")
    monkeypatch.setenv("CKPT_RETRY_MAX_SECONDS", "0.5")
    tag = os.urandom(6).hex()
    so = {"target_protocol": "s3", "target_options": s3_server.storage_options, "tag": tag, "ops": ["pipe_file"]}
    url = f"faulty://{s3_server.bucket}/async-{tag}"
    plain = f"s3://{s3_server.bucket}/async-{tag}"
    fs = fsspec.filesystem("faulty", **so)
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model": model, "optim": opt}

    def train_step():
        model(torch.randn(4, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    with ckpt.Checkpointer(url, storage_options=so) as ck:
        train_step()
        ck.save(state, step=1).wait()
        saved_1 = {k: v.clone() for k, v in model.state_dict().items()}
        fs.fail_rate = 1.0  # the bucket stops taking writes
        train_step()
        handle = ck.save(state, step=2)
        train_step()  # training goes on while the save fails in the background
        with pytest.raises(CheckpointError) as err:
            handle.wait()
        assert url in str(err.value)
        assert Store(plain).steps() == [1], "no manifest of the failed save may become visible"
        assert torch.equal(ckpt.load(plain)["model"]["weight"], saved_1["weight"])  # step 1 stays latest
        fs.fail_rate = 0.0  # the service recovers
        train_step()
        ck.save(state, step=3).wait()
    assert Store(plain).steps() == [1, 3]
    assert torch.equal(ckpt.load(plain)["model"]["weight"], model.weight.detach())
