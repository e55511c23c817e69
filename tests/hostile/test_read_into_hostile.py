"""Hostile checks of the local read path: objects read into reused payload buffers, and raw
objects read straight into the destination memory (Store.read_object_into)."""

from __future__ import annotations

import torch

import ckpt
from ckpt.hooks.manager import get_plugins
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
    url = str(tmp_path / "s")
    tensors = _growing(24, 256 * 1024)
    ckpt.save(url, dict(tensors), step=1)
    store = Store(url)
    m = load_manifest(store, 1)
    refs = [(p, m.tensors[p].chunks[0]) for p in sorted(m.tensors)]
    stored = [r.stored for _, r in refs]
    assert stored == sorted(stored) and stored[0] < stored[-1] // 4  # each read needs a larger buffer
    reader = Reader(store, get_plugins().codecs)
    for path, ref in refs:  # one after the other, as one pool thread (or a copy, an export) does
        out = torch.empty(ref.size, dtype=torch.uint8)
        reader.read_chunk(ref, out.numpy().data, what=f"tensor {path!r}")
        assert torch.equal(out, tensors[path].view(torch.uint8))
    # never more than one payload in use at a time: one buffer of the largest, not one per size
    held = sum(b.nbytes for b in reader._buffers)
    assert held <= max(stored) + 1, (held, max(stored))
