"""Byte planes of fixed-size elements: byte *i* of every element into plane *i*, and back.

bgzstd (:mod:`ckpt.codecs.zstd`) stores float data as its byte planes. Moving the bytes is
most of its cost outside zstd, so it is done by the vectorized C loops of
:mod:`ckpt.codecs._planes` when that extension is built (it is, where pip install finds a C
compiler), else by numpy. Both give the same bytes; ``CKPT_NATIVE_PLANES=0`` picks numpy.

Plane *i* is byte *i* of each element in memory: little-endian words everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ckpt import config


def _load_native() -> ModuleType | None:
    if not config.native_planes():
        return None
    try:
        from ckpt.codecs import _planes
    except ImportError:
        return None
    return _planes


#: the compiled loops, or None where they were not built (or CKPT_NATIVE_PLANES=0)
native: ModuleType | None = _load_native()

# Without the extension, elements of 2, 4 and 8 bytes are split into planes with shifts on
# words, and two-byte ones (bf16, fp16) joined back the same way: faster than numpy's strided
# byte copies on this project's machines (8 Mi bf16 elements: split 1.8 ms instead of 5.5,
# join 2.0-2.3 ms instead of 4.5). Each ufunc writes its narrowing (split) or widening (join)
# cast straight into its output: no temporary the size of the chunk. (Joining 4-byte
# elements by shifts, even cache-blocked, was no faster than strided copies: 4.3-4.8 ms.)
_WORD = np.dtype("<u2")
_WORDS: dict[int, np.dtype[Any]] = {2: _WORD, 4: np.dtype("<u4"), 8: np.dtype("<u8")}
#: elements split per block by numpy: a block's words (2 MiB of float32) stay in the cache
#: while every plane's shift reads them (16 MiB of float32 in 3.2-3.6 ms on an AMD EPYC
#: machine instead of 4.5-4.9 when each plane's pass read all of the words)
_SPLIT_BLOCK = 512 * 1024


def split(data: memoryview, planes: np.ndarray) -> None:
    """Byte *i* of every element of ``data`` into ``planes[i]``; ``planes`` is a C-contiguous
    ``(itemsize, n)`` uint8 array that does not overlap ``data``."""
    k, n = planes.shape
    if native is not None:
        native.split(data, planes.data, k)
        return
    if k not in _WORDS:
        np.copyto(planes, np.frombuffer(data, dtype=np.uint8).reshape(n, k).T)
        return
    words = np.frombuffer(data, dtype=_WORDS[k])
    for at in range(0, n, _SPLIT_BLOCK):
        block = words[at : at + _SPLIT_BLOCK]
        end = at + len(block)
        np.copyto(planes[0, at:end], block, casting="unsafe")  # the low byte
        for i in range(1, k):
            np.right_shift(block, 8 * i, out=planes[i, at:end], casting="unsafe")


def join(planes: Sequence[np.ndarray], out: memoryview) -> None:
    """The elements whose byte *i* is ``planes[i]`` (uint8 arrays of equal length) into
    ``out``, which none of them overlaps."""
    k = len(planes)
    if native is not None:
        native.join([p.data for p in planes], out, k)
        return
    if k == 2:
        words = np.frombuffer(out, dtype=_WORD)
        np.left_shift(planes[1], 8, out=words, dtype=_WORD)
        np.bitwise_or(words, planes[0], out=words)
        return
    grid = np.frombuffer(out, dtype=np.uint8).reshape(-1, k)
    for i, plane in enumerate(planes):
        grid[:, i] = plane
