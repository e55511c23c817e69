"""Dedup: stored content is referenced, not written again, chunk by chunk. Frozen weights
are written once, so any model with frozen parameters gets LoRA-sized checkpoints from
dedup alone. Bytes written are asserted from CheckpointInfo.stored_bytes. (That an
unchanged save writes only its manifest is part of the storage contract:
tests/storage/test_store_conformance.py.)"""

from __future__ import annotations

import time

import torch

import ckpt
from ckpt.codecs import EncodeContext
from ckpt.codecs.zstd import ByteGroupZstdCodec
from ckpt.io.hashing import hash_bytes
from ckpt.storage.store import Store
from ckpt.testing import assert_same_state, clone_state, stored_objects


def _manifest_len(store: Store, step: int) -> int:
    return len(store.read_manifest(step))


def test_equal_chunks_in_one_save_are_written_once(store_url):
    x = torch.randn(64, 1024)
    info = ckpt.save(store_url, {"a": x, "b": x.clone(), "c": x.clone().reshape(-1)}, step=0)
    store = Store(store_url)
    assert len(stored_objects(store)) == 1
    assert info.stored_bytes == sum(stored_objects(store).values()) + _manifest_len(store, 0)
    tree = ckpt.load(store_url)
    assert torch.equal(tree["a"], x) and torch.equal(tree["c"], x.reshape(-1))


def test_dedup_is_per_chunk(store_url, monkeypatch):
    monkeypatch.setenv("CKPT_CHUNK_BYTES", "4096")
    big = torch.randn(64 * 1024 // 4, generator=torch.Generator().manual_seed(0))  # 16 chunks of 4 KiB
    first = ckpt.save(store_url, {"a": big}, step=1)
    store = Store(store_url)
    assert len(stored_objects(store)) == 16 and first.raw_bytes == big.nbytes
    before = ckpt.read_manifest(store_url, 1).tensors["a"].chunks

    big[5000] += 1.0  # one element changes: one chunk is new
    second = ckpt.save(store_url, {"a": big}, step=2)
    objects = stored_objects(store)
    assert len(objects) == 17
    changed = [c for c in ckpt.read_manifest(store_url, 2).tensors["a"].chunks if c not in before]
    assert len(changed) == 1
    assert second.stored_bytes == _manifest_len(store, 2) + objects[changed[0].key]
    assert_same_state(ckpt.load(store_url)["a"], big)


def test_frozen_model_gets_lora_sized_checkpoints_from_dedup_alone(store_url, monkeypatch):
    """A frozen 4 MiB base with a small trainable head, no peft involved."""
    monkeypatch.setenv("CKPT_CHUNK_BYTES", str(1 << 20))
    torch.manual_seed(0)
    base = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
    base.requires_grad_(False)
    head = torch.nn.Linear(512, 16)
    model = torch.nn.Sequential(base, torch.nn.ReLU(), head)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    trainable = sum(p.numel() * p.element_size() for p in head.parameters())
    budget = 1.1 * 3 * trainable  # params + two AdamW moments
    store = Store(store_url)
    sizes = []
    for step in range(4):
        model(torch.randn(8, 512)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        info = ckpt.save(store_url, {"model": model, "opt": opt}, step=step)
        sizes.append(info.stored_bytes - _manifest_len(store, step))
        if step == 0:
            base_objects = {
                r.key
                for n, e in ckpt.read_manifest(store.url, 0).tensors.items()
                if n.startswith("model/0.")
                for r in e.chunks
                if not r.packed
            }
    frozen = sum(p.numel() * p.element_size() for p in base.parameters())
    assert sizes[0] > frozen * 0.8  # the base is written once, compressed a little
    for s in sizes[1:]:
        assert s <= budget, (sizes, budget)
    # the base objects are shared by every checkpoint, never rewritten (the small frozen biases
    # share a packed object with the trained head: that object changes, stored as a delta)
    for step in range(1, 4):
        keys = {
            r.key
            for n, e in ckpt.read_manifest(store.url, step).tensors.items()
            if n.startswith("model/0.")
            for r in e.chunks
            if not r.packed
        }
        assert keys == base_objects
    fresh = torch.nn.Sequential(
        torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)]), torch.nn.ReLU(), torch.nn.Linear(512, 16)
    )
    ckpt.restore(store_url, {"model": fresh})
    assert_same_state(clone_state(fresh.state_dict()), clone_state(model.state_dict()))


def test_dedup_survives_a_new_process_view_of_the_store(store_url):
    """A save with no in-memory history dedups against the newest manifest in the store."""
    frozen = torch.randn(256, 1024)
    ckpt.save(store_url, {"frozen": frozen, "x": torch.zeros(4)}, step=0)
    info = ckpt.save(store_url, {"frozen": frozen.clone(), "x": torch.ones(4)}, step=1)
    store = Store(store_url)
    assert info.stored_bytes < 200 + _manifest_len(store, 1)


def test_hashing_is_a_small_part_of_save_time():
    """xxh3-128 runs far faster than the cheapest codec, so it never dominates a save."""
    data = memoryview(torch.randn(4 << 20).view(torch.uint8).numpy())  # 16 MiB
    codec = ByteGroupZstdCodec()
    ctx = EncodeContext(dtype="float32", itemsize=4)

    def best(fn, n=3):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    hashing = best(lambda: hash_bytes(data))
    encoding = best(lambda: codec.encode(data, ctx))
    assert hashing * 5 < encoding, (hashing, encoding)


def test_stored_bytes_count_the_manifest_across_a_change_of_digits(store_url):
    """stored_bytes includes the manifest's own length, which its digits change: settled
    from one serialization for written sizes on either side of every power of ten."""
    from ckpt.storage.commit import load_manifest, settle_stored_bytes

    ckpt.save(store_url, {"x": torch.randn(100)}, step=0)
    manifest = load_manifest(Store(store_url), 0)
    for digits in range(1, 13):
        for written in (10**digits - 1 - len(manifest.to_json_bytes()), 10**digits - 700, 10**digits - 3, 10**digits):
            written = max(0, written)
            settled, body = settle_stored_bytes(manifest, written)
            assert body == settled.to_json_bytes(), written  # the digits put in place
            assert settled.stored_bytes == written + len(body), written


def test_stored_bytes_settled_when_its_field_text_is_also_in_meta(store_url):
    """A meta entry spelled like the stored_bytes field (same name, same value) is left alone:
    the body is serialized again, not patched in both places."""
    import dataclasses

    from ckpt.storage.commit import load_manifest, settle_stored_bytes

    ckpt.save(store_url, {"x": torch.randn(100)}, step=0)
    manifest = load_manifest(Store(store_url), 0)
    manifest = dataclasses.replace(manifest, meta={"stored_bytes": manifest.stored_bytes, "z": 1})
    settled, body = settle_stored_bytes(manifest, 12345)
    assert body == settled.to_json_bytes()
    assert settled.meta["stored_bytes"] == manifest.stored_bytes != settled.stored_bytes
    assert settled.stored_bytes == 12345 + len(body)
