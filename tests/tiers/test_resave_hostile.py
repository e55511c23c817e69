"""Hostile checks of the raw local tier and its re-save: a store whose objects were written
in one encoding must keep every committed checkpoint readable when a later writer stores
the same content in another (raw vs compressed share the content, never the object)."""

from __future__ import annotations

import threading

import pytest
import torch

import ckpt
from ckpt.hooks.manager import get_plugins
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


def test_both_tiers_record_one_save_alike_whatever_their_packs_reused(tmp_path):
    """Small tensors share packed objects, and an unchanged one cites its parent's pack: the
    local tier's parents are not the durable tier's (persist_every=2), yet the re-saved
    copy records the same content and layout, so the tiers' checks hold both the same."""
    from ckpt.storage.copy import same_checkpoint

    local, durable = str(tmp_path / "local"), str(tmp_path / "durable")
    torch.manual_seed(0)
    frozen, moving = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    state = {"m": torch.nn.ModuleDict({"frozen": frozen, "moving": moving})}
    seen = {}
    with ckpt.Checkpointer(durable, local=local, persist_every=2, local_keep_last=None) as ck:
        for step in (1, 2, 3, 4):
            with torch.no_grad():
                moving.weight.add_(1.0)
            seen[step] = {k: v.clone() for k, v in state["m"].state_dict().items()}
            ck.save(state, step=step).wait()
    assert ckpt.steps(durable) == [2, 4]
    for step in (2, 4):
        a, b = load_manifest(Store(local), step), load_manifest(Store(durable), step)
        assert any(c.packed for e in b.tensors.values() for c in e.chunks)
        assert same_checkpoint(a, b), step
        fresh = {"m": torch.nn.ModuleDict({"frozen": torch.nn.Linear(8, 8), "moving": torch.nn.Linear(8, 8)})}
        assert ckpt.restore(durable, fresh, step=step).step == step
        got = fresh["m"].state_dict()
        assert all(torch.equal(got[k], v) for k, v in seen[step].items())


def test_resave_reads_a_batch_ahead_of_the_writer_not_the_checkpoint(tmp_path):
    """The writer takes tensors without waiting: the re-save reads the next batch only once
    the writer is done with the one before, instead of the whole local checkpoint ahead of
    the compression (measured: 192 MiB read 4 MiB at a time grew the peak RSS by ~200 MiB)."""
    from ckpt.storage import resave

    local = str(tmp_path / "local")
    state = {f"t{i}": torch.full((1 << 18,), float(i)) for i in range(6)}  # 1 MiB each
    with ckpt.Checkpointer(str(tmp_path / "durable"), local=local, persist_every=None) as ck:
        ck.save(state, step=1).wait()
    m = load_manifest(Store(local), 1)
    window = resave._Window(1 << 20)
    got: list[str] = []
    gen = resave._read_back(Store(local), get_plugins().codecs, m, resave._packs(m), window)
    reader = threading.Thread(target=lambda: got.extend(p for p, _t in gen), daemon=True)
    reader.start()
    reader.join(1.0)
    assert reader.is_alive() and len(got) == 2, got  # a batch being written, one read ahead
    for path in list(got):
        window.written(path)
    reader.join(1.0)
    assert reader.is_alive() and len(got) == 4, got
    for path in list(got):
        window.written(path)
    reader.join(10.0)
    assert not reader.is_alive() and sorted(got) == sorted(state)
