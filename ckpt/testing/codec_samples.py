"""What the codec kit feeds a codec: varied chunks (every float and int dtype, empty, odd,
random, zeros, repetitive, megabytes), and the parent chunks a delta codec decodes against."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import ckpt
from ckpt.codecs import CodecContext
from ckpt.io.hashing import hash_bytes


@dataclass(frozen=True)
class Sample:
    """One chunk of raw bytes to encode, as the writer would hand it to a codec."""

    name: str
    dtype: str
    itemsize: int
    data: bytes


def _values(dtype: torch.dtype, n: int, g: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.5
    if dtype.is_complex:
        real = torch.view_as_complex(torch.randn(n, 2, generator=g))
        with warnings.catch_warnings():  # complex32 is "experimental": a conversion is all we need
            warnings.simplefilter("ignore", UserWarning)
            return real.to(dtype)
    if dtype.is_floating_point:
        return (torch.randn(n, generator=g) * 0.02).to(dtype)  # weight-like: few exponents
    return torch.randint(0, 100, (n,), generator=g).to(dtype)  # small non-negative ints


def _sample(name: str, t: torch.Tensor) -> Sample:
    return Sample(name, str(t.dtype).removeprefix("torch."), t.element_size(), t.view(torch.uint8).numpy().tobytes())


def codec_samples() -> list[Sample]:
    """Varied chunks: every float and int dtype, empty and odd sizes, random, zeros, repetitive."""
    g = torch.Generator().manual_seed(0)
    dtypes = [
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex32,
        torch.complex64,
        torch.complex128,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.bool,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.uint16,
        torch.int32,
        torch.uint32,
        torch.int64,
        torch.uint64,
    ]
    out = [
        Sample("empty", "uint8", 1, b""),
        Sample("one-byte", "uint8", 1, b"\x07"),
        Sample("zeros-100k", "uint8", 1, bytes(100_000)),
        Sample("repetitive", "uint8", 1, bytes(range(256)) * 40 + b"tail"),
        Sample("random-odd", "uint8", 1, np.random.default_rng(0).bytes(4099)),
        Sample("zeros-float32", "float32", 4, bytes(4 * 3001)),
    ]
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        out.append(_sample(f"{name}-1001", _values(dtype, 1001, g)))
        out.append(_sample(f"{name}-1", _values(dtype, 1, g)))
    return out


def large_samples() -> list[Sample]:
    """Chunks of megabytes: big enough for sampling shortcuts and for allocations to show."""
    g = torch.Generator().manual_seed(1)
    return [
        _sample("float32-2.4MB", (torch.randn(600_001, generator=g) * 0.02).float()),
        _sample("bfloat16-1.2MB", (torch.randn(600_001, generator=g) * 0.02).bfloat16()),
        Sample("zeros-2MB", "uint8", 1, bytes(2 << 20)),
        Sample("random-1MB", "uint8", 1, np.random.default_rng(1).bytes(1 << 20)),
    ]


def chunk_record(raw: bytes) -> dict[str, Any]:
    """The manifest record of ``raw`` stored as a plain object (what a delta cites as its parent)."""
    digest = hash_bytes(raw)
    return {"hash": digest, "key": digest, "size": len(raw), "stored": len(raw), "codec": []}


class ChunkSource:
    """A :class:`~ckpt.codecs.DecodeContext` outside any store: serves the raw chunks it was given."""

    def __init__(self, codec_context: CodecContext) -> None:
        self.codec_context = codec_context
        self._chunks: dict[str, bytes] = {}

    def serve(self, record: Mapping[str, Any], raw: bytes) -> None:
        self._chunks[str(record["hash"])] = raw

    def raw_chunk(self, ref: Mapping[str, Any]) -> memoryview:
        digest = ref.get("hash") if isinstance(ref, Mapping) else None
        raw = self._chunks.get(digest) if isinstance(digest, str) else None
        if raw is None:
            raise ckpt.MissingObjectError(f"parent chunk {ref!r} is not in this test's store")
        if ref.get("size") != len(raw):
            raise ckpt.CorruptCheckpointError(f"parent chunk {digest} has {len(raw)} bytes, the record says {ref!r}")
        return memoryview(raw)
