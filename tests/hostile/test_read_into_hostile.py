"""Hostile checks of the local read path: objects read into reused payload buffers, and raw
objects read straight into the destination memory (Store.read_object_into)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import ckpt
from ckpt.errors import CheckpointError
from ckpt.hooks.manager import get_plugins
from ckpt.io import scratch
from ckpt.io.reader import Reader
from ckpt.storage.commit import load_manifest
from ckpt.storage.store import Store


def _growing(n: int, size: int) -> dict[str, torch.Tensor]:
    """Tensors that compress worse and worse: their stored sizes grow in save order."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(n):
        t = torch.zeros(size // 4, dtype=torch.int32)
        k = (i + 1) * len(t) // n
        t[:k] = torch.randint(-(2**31), 2**31 - 1, (k,), generator=g, dtype=torch.int32)
        out[f"t{i:02d}"] = t
    return out


def test_payload_buffers_stay_bounded_by_the_largest_object(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_PACK_BYTES", "0")  # an object per tensor
    pool = scratch._Pool(scratch.KEEP_BYTES)
    url = str(tmp_path / "s")
    tensors = _growing(24, 256 * 1024)
    ckpt.save(url, dict(tensors), step=1)
    store = Store(url)
    m = load_manifest(store, 1)
    refs = [(p, m.tensors[p].chunks[0]) for p in sorted(m.tensors)]
    stored = [r.stored for _, r in refs]
    assert stored == sorted(stored) and stored[0] < stored[-1] // 4  # each read needs a larger buffer
    reader = Reader(store, get_plugins().codecs)
    monkeypatch.setattr(scratch, "_pool", pool)  # (the save above used the process's)
    for path, ref in refs:  # one after the other, as one pool thread (or a copy, an export) does
        out = torch.empty(ref.size, dtype=torch.uint8)
        reader.read_chunk(ref, out.numpy().data, what=f"tensor {path!r}")
        assert torch.equal(out, tensors[path].view(torch.uint8))
    # never more than one payload in use at a time: one buffer (of a whole MiB) lent again
    # and again, not one per size
    assert max(stored) + 1 <= 1 << 20
    assert pool.held() == 1 << 20 and len(pool._free) == 1


_THREADS_FAIL = """
import resource
from ckpt.snapshot.executor import io_pool

def vm():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize"):
            return int(line.split()[1]) * 1024

# room for a few threads' stacks, not for 512: a thread fails to start while others wait
resource.setrlimit(resource.RLIMIT_AS, (vm() + 128 * 2**20, resource.RLIM_INFINITY))
try:
    with io_pool("t", workers=512):
        print("all started")
except RuntimeError as exc:
    print("refused:", exc)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_io_pool_whose_threads_cannot_all_start_raises_instead_of_hanging():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _THREADS_FAIL], capture_output=True, text=True, timeout=30, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail("io_pool hung when a thread could not start")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: can't start new thread" in done.stdout or "all started" in done.stdout, done.stdout


def test_packed_object_size_no_host_can_hold_is_a_checkpoint_error(tmp_path):
    """A manifest without a chunk size lets a packed record claim an object of up to 1 TiB:
    its buffer cannot be allocated (or, where memory is overcommitted, the object is short)."""
    url = str(tmp_path / "s")
    ckpt.save(url, {"a": torch.arange(4.0), "b": torch.arange(3.0)}, step=1)
    (path,) = (tmp_path / "s" / "manifests").glob("*1*.json")
    doc = json.loads(path.read_text())
    chunk = doc["tensors"]["a"]["chunks"][0]
    assert "of" in chunk  # packed with 'b'
    chunk["of"] = chunk["stored"] = 2**40
    chunk["codec"] = []
    doc["chunk_bytes"] = 0  # no chunk size recorded: the cap is the schema's
    path.write_text(json.dumps(doc))
    live = {"a": torch.zeros(4), "b": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"cannot allocate|truncated or replaced"):
        ckpt.restore(url, live, step=1)
    assert not live["a"].any() and not live["b"].any()


@pytest.mark.parametrize("nbytes", [2**62, -1])
def test_a_buffer_size_no_host_can_hold_is_a_checkpoint_error(nbytes):
    """Every buffer sized by a manifest (payloads, packed objects, boxes of sharded tensors)
    comes from payload_buffer: an impossible size is a CheckpointError naming what needed it."""
    from ckpt.io.memory import payload_buffer

    with pytest.raises(CheckpointError, match=r"tensor 'w', chunk k: cannot allocate"):
        payload_buffer(nbytes, what="tensor 'w', chunk k")
    with pytest.raises(CheckpointError, match=r"tensor 'w', chunk k: cannot allocate"):
        scratch.lend(nbytes, what="tensor 'w', chunk k")


def test_a_remote_store_reader_holds_no_payload_buffer(monkeypatch):
    """A remote store's payloads come back as bytes: the Reader takes no buffer for them."""
    import uuid

    url = f"memory://read-into-{uuid.uuid4().hex}"
    tensors = _growing(4, 256 * 1024)
    ckpt.save(url, dict(tensors), step=1)
    store = Store(url)
    assert not store.local
    m = load_manifest(store, 1)
    reader = Reader(store, get_plugins().codecs)
    pool = scratch._Pool(scratch.KEEP_BYTES)
    monkeypatch.setattr(scratch, "_pool", pool)
    for path in sorted(m.tensors):
        ref = m.tensors[path].chunks[0]
        out = torch.empty(ref.size, dtype=torch.uint8)
        reader.read_chunk(ref, out.numpy().data, what=f"tensor {path!r}")
        assert torch.equal(out, tensors[path].view(torch.uint8)[: ref.size])
    assert pool.held() == 0
