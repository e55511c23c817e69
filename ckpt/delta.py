"""The delta codec: a chunk stored as the XOR of its bits with the same chunk of the parent.

Consecutive checkpoints of a training run differ little: frozen tensors not at all (those
are deduplicated before any codec runs), weights by a few low mantissa bits per step, and
in bf16 most weights not at all at small learning rates. XOR of the two bit patterns
leaves zero bytes wherever sign, exponent and high mantissa agree; the byte-grouped zstd
stage that follows in the chain turns those zero planes into almost nothing.

The codec records the parent chunk's whole manifest record (``ChunkRef.to_json()``,
itself possibly a delta) in its parameters, so a reader needs no other manifest: it asks
the :class:`~ckpt.codecs.DecodeContext` for the parent's verified raw bytes and XORs.

Objects are content-addressed by their *raw* hash, and a delta object's bytes depend on
its parent too, so its key is ``<raw hash>.x<first 16 hex of the parent's raw hash>``
(:func:`delta_key`): a full object and a delta of the same content never share a key.

Deltas reference their chunk's **base**, the last full object, not the previous
checkpoint's delta: consecutive deltas of a chunk all cite the same full object, so a
restore reads two objects per chunk however many checkpoints lie between (as a video
codec references its key frame). The codec's ``age`` parameter counts the saves that
changed the chunk since its base (a save where it did not change reuses the object);
``CKPT_DELTA_MAX_CHAIN`` (K) bounds it, so a chunk is stored in full at least once every
K changes and a delta never drifts far from its base. Readers follow any
nesting of parent records (:func:`chain_depth`), each link verified against its hash,
so stores whose deltas cite deltas read the same.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from ckpt.codecs import DecodeContext, EncodeContext
from ckpt.errors import CorruptCheckpointError

#: the codec name recorded in manifests; never reuse it for another meaning
NAME = "xor"


def xor_into(a: memoryview, b: memoryview, out: memoryview) -> None:
    """``out = a ^ b`` bytewise (64 bits at a time when the lengths allow)."""
    n = len(out)
    if len(a) != n or len(b) != n:
        raise ValueError(f"xor of {len(a)} and {len(b)} bytes into {n}")
    dt = np.uint64 if n % 8 == 0 else np.uint8
    np.bitwise_xor(np.frombuffer(a, dt), np.frombuffer(b, dt), out=np.frombuffer(out, dt))


class XorDeltaCodec:
    """XOR against the parent chunk's raw bytes (first stage of a delta chain)."""

    name = NAME
    #: decode tolerates ``payload`` aliasing ``out`` (see :func:`ckpt.codecs.decode_chain`)
    in_place = True

    def encode(self, data: memoryview, ctx: EncodeContext) -> tuple[bytearray, dict[str, Any]] | None:
        if ctx.parent is None or ctx.parent_ref is None or len(ctx.parent) != len(data):
            return None
        out = bytearray(len(data))
        xor_into(data, ctx.parent, memoryview(out))
        return out, {"parent": dict(ctx.parent_ref)}

    def decode(self, payload: memoryview, out: memoryview, params: Mapping[str, Any], ctx: DecodeContext) -> None:
        parent = params.get("parent")
        if not isinstance(parent, Mapping) or "hash" not in parent or "size" not in parent:
            raise CorruptCheckpointError("xor delta has no parent record")
        if int(parent["size"]) != len(out) or len(payload) != len(out):
            raise CorruptCheckpointError(
                f"xor delta of {len(out)} bytes has a {len(payload)}-byte payload "
                f"and a {parent['size']}-byte parent {parent.get('key', parent['hash'])}"
            )
        base = ctx.raw_chunk(parent)  # verified by the reader, recursively for longer chains
        xor_into(payload, base, out)


def delta_key(raw_hash: str, parent_hash: str) -> str:
    """Object key of a delta object (differs from the full object's key ``raw_hash``)."""
    return f"{raw_hash}.x{parent_hash[:16]}"


def parent_record(codec: tuple[Mapping[str, Any], ...] | list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The parent chunk record of a codec chain, or None for a full object."""
    for step in codec:
        if step.get("name") == NAME:
            parent = step.get("parent")
            return parent if isinstance(parent, Mapping) else None
    return None


def delta_age(codec: tuple[Mapping[str, Any], ...] | list[Mapping[str, Any]]) -> int:
    """Saves since the chunk's last full object (0 for a full object).

    The writer records it as the delta step's ``age``; without one (a delta citing its
    immediate parent) it is the chain depth.
    """
    for step in codec:
        if step.get("name") == NAME:
            age = step.get("age")
            if isinstance(age, int) and not isinstance(age, bool) and age >= 1:
                return age
            return chain_depth(codec)
    return 0


def chain_depth(codec: tuple[Mapping[str, Any], ...] | list[Mapping[str, Any]]) -> int:
    """Delta links to follow before reaching a full object (0 for a full object)."""
    depth = 0
    parent = parent_record(codec)
    while parent is not None:
        depth += 1
        parent = parent_record(parent.get("codec", ()))
    return depth


def referenced_keys(record: Mapping[str, Any]) -> Iterator[str]:
    """Keys of every object a chunk record needs: its own and its delta ancestors'.

    Any codec step's ``parent`` (not only the built-in ``xor``) is followed, so a
    third-party delta codec that cites parents the same way is kept alive by GC too.
    """
    stack = [record]
    while stack:
        rec = stack.pop()
        key = rec.get("key", rec.get("hash"))
        if key is not None:
            yield str(key)
        for step in rec.get("codec", ()) or ():
            parent = step.get("parent") if isinstance(step, Mapping) else None
            if isinstance(parent, Mapping):
                stack.append(parent)
