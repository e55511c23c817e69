"""Hostile checks of the raw local tier and its re-save: a store whose objects were written
in one encoding must keep every committed checkpoint readable when a later writer stores
the same content in another (raw vs compressed share the content, never the object)."""

from __future__ import annotations

import pytest
import torch

import ckpt
from ckpt.storage.commit import load_manifest
from ckpt.storage.store import Store

N = 1 << 19  # 2 MiB of float32: a chunk of its own (not packed)


def _chains(url: str, step: int) -> list[tuple[str, int, int]]:
    refs = load_manifest(Store(url), step).tensors["w"].chunks
    return [("+".join(s["name"] for s in r.codec) or "raw", r.stored, r.size) for r in refs]


@pytest.mark.parametrize("first_compressed", [True, False])
def test_other_encoding_of_the_same_content_never_replaces_a_committed_object(tmp_path, first_compressed):
    local, durable = str(tmp_path / "local"), str(tmp_path / "durable")
    # step 1 holds zeros in one encoding, step 2 (the parent of the next save) something else
    with ckpt.Checkpointer(durable, local=local, local_keep_last=None, local_compress=first_compressed) as ck:
        ck.save({"w": torch.zeros(N)}, step=1).wait()
        ck.save({"w": torch.ones(N)}, step=2).wait()
    assert (_chains(local, 1)[0][0] == "raw") is not first_compressed
    # a later run stores the same zeros in the other encoding
    with ckpt.Checkpointer(durable, local=local, local_keep_last=None, local_compress=not first_compressed) as ck:
        ck.save({"w": torch.zeros(N)}, step=3).wait()
    assert (_chains(local, 3)[0][0] == "raw") is first_compressed
    for step, value in ((1, 0.0), (2, 1.0), (3, 0.0)):
        out = {"w": torch.full((N,), 7.0)}
        assert ckpt.restore(local, out, step=step).step == step
        assert torch.equal(out["w"], torch.full((N,), value))
