"""An object's key names its content and its encoding: the same content written again in
another encoding never replaces the object an older checkpoint cites."""

from __future__ import annotations

import torch

import ckpt
from ckpt.hooks.manager import get_plugins


def _payload(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # compressible bytes, 2 MiB: one object of its own (not packed), zstd or bgzstd helps
    return (torch.randint(0, 4, (2 * 1024 * 1024,), generator=g, dtype=torch.uint8) * 60).contiguous()


def test_same_bytes_under_another_dtype_keep_the_older_checkpoint(tmp_path):
    url = str(tmp_path / "s")
    raw = _payload(0)
    ckpt.save(url, {"t": raw}, step=1)  # uint8: zstd
    ckpt.save(url, {"t": _payload(1)}, step=2)  # the parent of step 3 does not cite step 1's object
    ckpt.save(url, {"t": raw.view(torch.float16)}, step=3)  # the same bytes as float16: bgzstd
    keys = {s: {c.key for c in ckpt.read_manifest(url, s).tensors["t"].chunks} for s in (1, 3)}
    assert keys[1].isdisjoint(keys[3])
    assert torch.equal(ckpt.load(url, step=1)["t"], raw)
    assert torch.equal(ckpt.load(url, step=3)["t"].view(torch.uint8), raw)


def test_another_zstd_level_keeps_the_older_checkpoint(tmp_path, monkeypatch):
    url = str(tmp_path / "s")
    g = torch.Generator().manual_seed(3)
    words = torch.randint(0, 256, (64, 16), generator=g, dtype=torch.uint8)
    raw = words[torch.randint(0, 64, (2 * 1024 * 1024 // 16,), generator=g)].reshape(-1).contiguous()
    ckpt.save(url, {"t": raw}, step=1)
    ckpt.save(url, {"t": _payload(1)}, step=2)
    # another level (CKPT_ZSTD_LEVEL in another run): the same content, another stored size
    monkeypatch.setattr(get_plugins(adapters=False).codecs.get("zstd"), "level", 19)
    ckpt.save(url, {"t": raw}, step=3)
    one, three = (ckpt.read_manifest(url, s).tensors["t"].chunks[0] for s in (1, 3))
    assert one.hash == three.hash and one.stored != three.stored and one.key != three.key
    assert torch.equal(ckpt.load(url, step=1)["t"], raw)
    assert torch.equal(ckpt.load(url, step=3)["t"], raw)


def test_same_content_same_encoding_still_one_object(tmp_path):
    url = str(tmp_path / "s")
    raw = _payload(0)
    ckpt.save(url, {"a": raw}, step=1)
    ckpt.save(url, {"a": _payload(1)}, step=2)
    ckpt.save(url, {"a": raw.clone()}, step=3)  # written again, to the same key: dedup holds
    assert ckpt.read_manifest(url, 1).tensors["a"].chunks == ckpt.read_manifest(url, 3).tensors["a"].chunks
