"""The codec conformance kit, run on ckpt's own codecs: zstd, bgzstd and the xor delta."""

from __future__ import annotations

import numpy as np

from ckpt.codecs import CodecContext, EncodeContext
from ckpt.testing import CodecConformance, chunk_record, codec_samples


class TestZstdConformance(CodecConformance):
    codec_name = "zstd"


class TestByteGroupZstdConformance(CodecConformance):
    codec_name = "bgzstd"


class TestXorConformance(CodecConformance):
    """xor encodes against a parent chunk: a slightly changed copy of the data, as after
    an optimizer step (its record is served back when decoding)."""

    codec_name = "xor"

    def encode_context(self, data: memoryview, dtype: str, itemsize: int, codec_context: CodecContext) -> EncodeContext:
        parent = bytearray(data)
        for i in range(0, len(parent), 7):
            parent[i] ^= 0x01  # low bits of a few bytes differ
        return EncodeContext(
            dtype=dtype,
            itemsize=itemsize,
            parent=memoryview(bytes(parent)),
            parent_ref=chunk_record(bytes(parent)),
            codec_context=codec_context,
        )


def test_samples_cover_every_dtype_and_edge():
    samples = codec_samples()
    dtypes = {s.dtype for s in samples}
    assert {"float16", "bfloat16", "float32", "float64", "complex64", "complex128", "bool"} <= dtypes
    assert {"int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"} <= dtypes
    assert all(len(s.data) % s.itemsize == 0 for s in samples)
    sizes = [len(s.data) for s in samples]
    assert 0 in sizes and 1 in sizes and any(n % 2 for n in sizes)
    assert any(not np.frombuffer(s.data, np.uint8).any() for s in samples if s.data)  # zeros
