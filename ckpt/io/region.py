"""Reading a box of a stored tensor: only the objects whose bytes overlap it.

A stored tensor is one or more *pieces*: a plain entry is one piece (the whole tensor, its
chunks in row-major byte order), a sharded entry (schema 2) one piece per shard box. For a
requested box, each piece it intersects is read as far as needed: the chunks covering the
piece's byte range from the first to the last element of the intersection, decoded and
verified like every read, copied into a buffer of that range and from there, as a strided
view, into the destination. Nothing else is fetched, so a rank restoring its shard of a
resharded tensor reads about its own share of the bytes, never the whole tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_done
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.autograd.graph import increment_version

from ckpt.errors import CheckpointError, CorruptCheckpointError
from ckpt.io.memory import payload_buffer
from ckpt.snapshot.executor import wait_all
from ckpt.state.tree import dtype_from_name
from ckpt.storage.manifest import DTYPE_ITEMSIZE, ChunkRef, TensorEntry

if TYPE_CHECKING:  # the reader calls this module for sharded tensors
    from ckpt.io.reader import Reader

Box = tuple[tuple[int, ...], tuple[int, ...]]


def pieces(entry: TensorEntry) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[ChunkRef, ...]]]:
    """(offsets, shape, chunks) of each stored piece of ``entry``."""
    if entry.shards:
        return [(s.offsets, s.shape, s.chunks) for s in entry.shards]
    return [((0,) * len(entry.shape), entry.shape, entry.chunks)]


def intersect(a: Box, b: Box) -> Box | None:
    """The intersection of two boxes (None when it holds no element)."""
    offs, shape = [], []
    for oa, na, ob, nb in zip(a[0], a[1], b[0], b[1]):
        lo, hi = max(oa, ob), min(oa + na, ob + nb)
        if hi <= lo:
            return None
        offs.append(lo)
        shape.append(hi - lo)
    return tuple(offs), tuple(shape)


def _strides(shape: Sequence[int]) -> list[int]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return out[::-1]


def _piece_range(want: Box, piece: Box, itemsize: int) -> tuple[Box, int, int] | None:
    """The part of box ``want`` in stored piece ``piece`` and the byte range ``[lo, hi)`` of
    the piece's row-major bytes from its first to its last element (None: no overlap)."""
    if not all(n > 0 for n in want[1]):
        return None
    inter = intersect(want, piece)
    if inter is None:
        return None
    strides = _strides(piece[1])
    rel = [o - po for o, po in zip(inter[0], piece[0])]
    first = sum(r * s for r, s in zip(rel, strides))
    last = sum((r + n - 1) * s for r, n, s in zip(rel, inter[1], strides))
    return inter, first * itemsize, (last + 1) * itemsize


def _whole_rows(inter: Box, piece: Box, want: Box) -> bool:
    """Whether ``inter``, the part of box ``want`` in ``piece``, is the whole piece and spans
    whole rows of the box: a contiguous byte range of a contiguous destination."""
    return inter == piece and inter[0][1:] == want[0][1:] and inter[1][1:] == want[1][1:]


def box_read_whole(entry: TensorEntry, offsets: Sequence[int], shape: Sequence[int]) -> bool:
    """Whether :func:`read_box` decodes every piece of this box straight into a contiguous
    destination, taking no buffer of its own (the box is made of whole stored pieces: a
    shard restored at the layout that saved it, or a whole tensor)."""
    want: Box = (tuple(offsets), tuple(shape))
    for p_off, p_shape, _ in pieces(entry):
        span = _piece_range(want, (p_off, p_shape), DTYPE_ITEMSIZE[entry.dtype])
        if span is not None and not _whole_rows(span[0], (p_off, p_shape), want):
            return False
    return True


def box_chunks(entry: TensorEntry, offsets: Sequence[int], shape: Sequence[int]) -> list[ChunkRef]:
    """The chunk records :func:`read_box` reads for the box ``offsets`` + ``shape`` of ``entry``."""
    want: Box = (tuple(offsets), tuple(shape))
    out: list[ChunkRef] = []
    for p_off, p_shape, chunks in pieces(entry):
        span = _piece_range(want, (p_off, p_shape), DTYPE_ITEMSIZE[entry.dtype])
        if span is None:
            continue
        _, lo, hi = span
        start = 0
        for ref in chunks:
            a, start = start, start + ref.size
            if start > lo and a < hi:
                out.append(ref)
    return out


def read_box(
    reader: Reader,
    entry: TensorEntry,
    path: str,
    offsets: Sequence[int],
    shape: Sequence[int],
    *,
    pool: ThreadPoolExecutor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The box ``tensor[offsets[i]:offsets[i]+shape[i], ...]`` of stored tensor ``path``.

    ``out`` (a CPU tensor of ``shape`` and the entry's dtype, any strides) receives it;
    without it a fresh contiguous tensor is returned. Only chunks overlapping the box are read.
    """
    dtype = dtype_from_name(entry.dtype, what=f"tensor {path!r}")
    offsets, shape = tuple(int(o) for o in offsets), tuple(int(n) for n in shape)
    if len(offsets) != len(entry.shape) or len(shape) != len(entry.shape):
        raise CheckpointError(f"tensor {path!r}: a box of {len(shape)} dims for a tensor of {len(entry.shape)}")
    if any(o < 0 or n < 0 or o + n > g for o, n, g in zip(offsets, shape, entry.shape)):
        raise CheckpointError(
            f"tensor {path!r}: box {list(offsets)}+{list(shape)} is outside its shape {list(entry.shape)}"
        )
    if out is None:
        try:
            out = torch.empty(shape, dtype=dtype)
        except (RuntimeError, MemoryError) as exc:
            raise CheckpointError(f"tensor {path!r}: cannot allocate a box of {list(shape)} ({exc})") from None
    elif tuple(out.shape) != shape or out.dtype != dtype or out.device.type != "cpu":
        raise CheckpointError(
            f"tensor {path!r}: destination {out.dtype}{list(out.shape)} on {out.device} for a box {entry.dtype}{list(shape)}"
        )
    itemsize = DTYPE_ITEMSIZE[entry.dtype]
    want: Box = (offsets, shape)
    copies: list[tuple[torch.Tensor, tuple[slice, ...], Box, tuple[int, ...], int]] = []
    jobs = []
    direct = False  # some piece decoded straight into out
    try:
        for p_off, p_shape, chunks in pieces(entry):
            span = _piece_range(want, (p_off, p_shape), itemsize)
            if span is None:
                continue
            inter, lo, hi = span
            strides = _strides(p_shape)
            # A whole piece spanning whole rows of the box (the box itself, or a shard of rows
            # of it) is a contiguous range of a contiguous destination: decoded straight into it.
            whole = _whole_rows(inter, (p_off, p_shape), want)
            # (not a conjugate or negative view: its memory holds other values than it reads as)
            whole = whole and out.is_contiguous() and not out.is_conj() and not out.is_neg()
            if whole:
                direct = True
                at = (inter[0][0] - offsets[0]) * (out.nbytes // shape[0]) if shape else 0
                buf = out.detach().reshape(-1).view(torch.uint8).numpy()[at : at + hi - lo]
            else:
                buf = payload_buffer(hi - lo, what=f"tensor {path!r}, a piece of box {list(offsets)}+{list(shape)}")
            start = 0
            for ref in chunks:
                a, b = start, start + ref.size
                start = b
                if b <= lo or a >= hi:
                    continue
                jobs.append(pool.submit(_fill, reader, ref, a, buf, lo, hi, path))
            if start != int(np.prod(p_shape, dtype=np.int64)) * itemsize:  # a validated manifest never gets here
                raise CorruptCheckpointError(f"tensor {path!r}: a piece's chunks do not add up to its box")
            if whole:
                continue
            dest = tuple(slice(o - w, o - w + n) for o, w, n in zip(inter[0], offsets, inter[1]))
            copies.append((torch.from_numpy(buf), dest, inter, tuple(strides), 0))
        wait_all(jobs)
    finally:
        if direct:
            # written through NumPy, which autograd does not see (a copy_ would bump it): a
            # backward still pending over ``out`` must find it changed, even when a read failed
            wait_done(jobs)  # none still writing into it
            increment_version(out)
    with torch.no_grad():
        for raw, dest, box, box_strides, _ in copies:
            src = raw.view(dtype).as_strided(box[1], box_strides, 0) if raw.numel() else raw.view(dtype)
            out[dest].copy_(src)
    return out


def _fill(reader: Reader, ref: ChunkRef, a: int, buf: np.ndarray, lo: int, hi: int, path: str) -> None:
    """Decode chunk ``ref`` (bytes ``[a, a + size)`` of its piece) and copy its part of ``[lo, hi)`` into ``buf``."""
    b = a + ref.size
    if a >= lo and b <= hi:  # wholly inside: decode straight into the buffer
        reader.read_chunk(ref, buf.data[a - lo : b - lo], what=f"tensor {path!r}")
        return
    tmp = payload_buffer(ref.size, what=f"tensor {path!r}, chunk {ref.key}")
    reader.read_chunk(ref, tmp.data, what=f"tensor {path!r}")
    s, e = max(a, lo), min(b, hi)
    buf[s - lo : e - lo] = tmp[s - a : e - a]
