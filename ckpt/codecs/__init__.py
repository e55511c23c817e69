"""Codecs: bytes <-> bytes, named, registered through a hook and recorded per object.

A chunk is encoded by a chain of codecs (applied left to right) whose names and
parameters are written into the manifest; decoding runs the chain right to left. A
stage may change the size (compression, encryption). Built-ins: ``zstd`` and ``bgzstd``
(:mod:`ckpt.codecs.zstd`) and the ``xor`` delta (:mod:`ckpt.codecs.delta`).
"""

from __future__ import annotations

from ckpt.codecs.base import (
    Codec,
    CodecContext,
    CodecRegistry,
    DecodeContext,
    EncodeContext,
    decode_chain,
    encode_chain,
)

__all__ = ["Codec", "CodecContext", "CodecRegistry", "DecodeContext", "EncodeContext", "decode_chain", "encode_chain"]
