"""read_box decoding a stored piece straight into a contiguous destination (``out``): the
destination must end up as the buffered path leaves it, and autograd must see the write."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from ckpt.distributed.sharding import read_region
from ckpt.hooks.manager import get_plugins
from ckpt.storage.store import Store

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))
from test_sharded_manifest import _boxes, save_sharded


def _rows(tmp_path, full):
    url = str(tmp_path / "s")
    return url, save_sharded(url, full, list(_boxes(tuple(full.shape), [[4], []])), chunk_bytes=40)


@pytest.mark.parametrize("bit", ["conj", "neg"])
def test_a_conjugate_or_negative_view_destination_gets_the_values(tmp_path, bit):
    """A contiguous view with a conjugate or negative bit (``t.conj()``, ``torch._neg_view``)
    reads like its values: the box is written so that it reads as stored, as a copy_ does."""
    dtype = torch.complex64 if bit == "conj" else torch.float32
    full = torch.randn(8, 6, dtype=dtype)
    url, m = _rows(tmp_path, full)
    base = torch.zeros(4, 6, dtype=dtype)
    out = base.conj() if bit == "conj" else torch._neg_view(base)
    assert out.is_contiguous()
    assert read_region(Store(url), get_plugins().codecs, m, "w", (4, 0), (4, 6), out=out) is out
    assert torch.equal(out, full[4:])


def test_dcp_load_into_conjugate_and_negative_views(tmp_path):
    """ckpt.dcp reads into the live tensors: a conjugate or negative view among them (the
    planner's target) ends up holding the stored values, as DCP's own reader leaves it."""
    import torch.distributed.checkpoint as dcp

    import ckpt.dcp

    url = f"file://{tmp_path}/s"
    src = {"z": torch.randn(4, 6, dtype=torch.complex64), "f": torch.randn(4, 6)}
    z, f = torch.zeros(4, 6, dtype=torch.complex64), torch.zeros(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(src, storage_writer=ckpt.dcp.StorageWriter(url, step=1))
        dst = {"z": z.conj(), "f": torch._neg_view(f)}
        dcp.load(dst, storage_reader=ckpt.dcp.StorageReader(url))
    for k in src:
        assert torch.equal(dst[k], src[k]), k


def test_the_direct_write_is_seen_by_autograd(tmp_path):
    """A destination saved for a pending backward must count as changed (its version bumped),
    as a copy_ into it would: else backward silently uses the restored values."""
    full = torch.randn(8, 6)
    url, m = _rows(tmp_path, full)
    out = torch.ones(4, 6)
    x = torch.ones(4, 6, requires_grad=True)
    y = (out * x).sum()  # out saved for the backward
    before = out._version
    read_region(Store(url), get_plugins().codecs, m, "w", (4, 0), (4, 6), out=out)
    assert torch.equal(out, full[4:]) and out._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_dcp_load_is_seen_by_autograd(tmp_path):
    """dcp.load into a parameter a pending backward saved: the backward refuses, as with
    DCP's own reader (a copy_), instead of silently using the loaded values."""
    import torch.distributed.checkpoint as dcp

    import ckpt.dcp

    url = f"file://{tmp_path}/s"
    src = {"w": torch.randn(4, 6)}
    w = torch.ones(4, 6)
    x = torch.ones(4, 6, requires_grad=True)
    y = (w * x).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(src, storage_writer=ckpt.dcp.StorageWriter(url, step=1))
        dcp.load({"w": w}, storage_reader=ckpt.dcp.StorageReader(url))
    assert torch.equal(w, src["w"])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_dcp_load_into_tied_targets_of_different_stored_tensors(tmp_path):
    """Two keys stored apart (different values) loaded into one memory (tied weights at load
    time): the items are read in parallel, so decoding both straight into the same memory
    mixes them, and one's hash over the memory the other wrote fails: an intact store reported
    corrupt. The memory must end up holding one of them, whole, without an error."""
    import torch.distributed.checkpoint as dcp

    import ckpt.dcp

    url = f"file://{tmp_path}/s"
    src = {"a": torch.randn(1024, 1024), "b": torch.randn(1024, 1024)}  # 4 MiB each
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(src, storage_writer=ckpt.dcp.StorageWriter(url, step=1))
        for _ in range(5):
            w = torch.zeros(1024, 1024)
            dcp.load({"a": w, "b": w}, storage_reader=ckpt.dcp.StorageReader(url))
            assert torch.equal(w, src["a"]) or torch.equal(w, src["b"])


def test_which_boxes_are_read_whole_and_which_chunks_they_read(tmp_path):
    """box_read_whole (boxes an in-place restore decodes straight into live memory, taking no
    buffer once live memory is being written) and box_chunks (what the verifying pass hashes
    for them): exactly the objects read_box reads."""
    from ckpt.io.region import box_chunks, box_read_whole

    full = torch.randn(8, 6)
    url, m = _rows(tmp_path, full)  # two stored row boxes, [0:4] and [4:8], 40-byte chunks
    entry = m.tensors["w"]
    top, bottom = entry.shards
    assert box_read_whole(entry, (4, 0), (4, 6)) and box_chunks(entry, (4, 0), (4, 6)) == list(bottom.chunks)
    assert box_read_whole(entry, (0, 0), (8, 6)) and box_chunks(entry, (0, 0), (8, 6)) == [*top.chunks, *bottom.chunks]
    # resharded: rows 2..6 cut both stored boxes; columns 0..3 cut every row
    assert not box_read_whole(entry, (2, 0), (4, 6))
    assert not box_read_whole(entry, (0, 0), (8, 3))
    assert box_chunks(entry, (2, 0), (4, 6)) == [*top.chunks, *bottom.chunks][1:-1]
    read: list[str] = []

    class Spy:
        def __init__(self, reader):
            self.reader = reader

        def read_chunk(self, ref, out, *, what):
            read.append(ref.key)
            return self.reader.read_chunk(ref, out, what=what)

    from concurrent.futures import ThreadPoolExecutor

    from ckpt.io.reader import Reader
    from ckpt.io.region import read_box

    with ThreadPoolExecutor(2) as pool:
        got = read_box(Spy(Reader(Store(url), get_plugins().codecs)), entry, "w", (2, 0), (4, 6), pool=pool)
    assert torch.equal(got, full[2:6])
    assert sorted(read) == sorted(c.key for c in box_chunks(entry, (2, 0), (4, 6)))
