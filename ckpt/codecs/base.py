"""The codec contract: protocol, registry, per-store context, and running a chain.

A chunk is encoded by a chain of codecs (applied left to right); the chain, with each
codec's parameters, is written into the manifest so a reader always knows how to
decode. Decoding runs the chain right to left and the last step writes straight into
the destination memory. Any stage may change the size (compression, encryption): a
stage whose input was not the chunk's raw size records that input size as ``"in"``,
so a decoder always knows how much memory each stage produces, and never trusts a
payload's own header for it.

Codec instances are shared by the whole process and hold no per-store state: what a
store gives its codecs (keys, later) arrives with every call in a :class:`CodecContext`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ckpt.errors import CorruptCheckpointError, PluginError, UnknownCodecError
from ckpt.io.memory import copy_into


@dataclass(frozen=True)
class CodecContext:
    """What one store gives its codecs: the store it works for, and its settings (keys live here)."""

    url: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)


#: for encoding or decoding outside any store (tests, benchmarks)
NO_STORE = CodecContext()


@dataclass(frozen=True)
class EncodeContext:
    """What a codec may know about the chunk it encodes."""

    dtype: str
    itemsize: int
    #: raw bytes of the same chunk in the parent checkpoint, when there is one (delta codecs)
    parent: memoryview | None = None
    #: the parent chunk's manifest record (``ChunkRef.to_json()``), for a delta codec to cite
    parent_ref: Mapping[str, Any] | None = None
    #: the store the chunk is written to
    codec_context: CodecContext = NO_STORE


class DecodeContext(Protocol):
    """What a codec may ask for while decoding."""

    #: the store the chunk is read from
    codec_context: CodecContext

    def raw_chunk(self, ref: Mapping[str, Any]) -> memoryview:
        """The verified raw bytes of another chunk, given its manifest record (a delta's parent)."""


@runtime_checkable
class Codec(Protocol):
    """A reversible transform of bytes; see :mod:`ckpt.codecs`."""

    name: str

    def encode(self, data: memoryview, ctx: EncodeContext) -> tuple[bytes | memoryview, dict[str, Any]] | None:
        """Encode ``data``; return ``(payload, params)`` or None when this codec does not help."""

    def decode(self, payload: memoryview, out: memoryview, params: Mapping[str, Any], ctx: DecodeContext) -> None:
        """Decode ``payload`` into ``out``, using the recorded ``params``.

        ``out`` has exactly the size this stage's input had when encoding; a payload that
        does not decode to exactly that is a :class:`~ckpt.CorruptCheckpointError`.

        A codec may also have ``decode_prefix(payload, size, nbytes, params)``: the first
        bytes (at least ``min(nbytes, size)``, at most ``size``) of its ``size``-byte input,
        decoded without the rest, or None; see :func:`decode_prefix`. And
        ``decode_prefix_from(read, stored, size, nbytes, params)``: the same of a payload of
        ``stored`` bytes that ``read(start, end)`` gives in ranges, reading no more of it
        than those bytes need; see :func:`decode_prefix_from`.
        """


class CodecRegistry:
    """Name -> codec. Passed to ``ckpt_register_codecs`` as ``register``."""

    def __init__(self) -> None:
        self._codecs: dict[str, Codec] = {}
        self._owner: dict[str, str] = {}
        self.current_plugin = "?"

    def __call__(self, codec: Codec) -> None:
        name = getattr(codec, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"codec {codec!r} from plugin {self.current_plugin!r} has no name")
        if name in self._codecs:
            raise PluginError(
                f"codec name {name!r} registered twice: by {self._owner[name]!r} and by {self.current_plugin!r}"
            )
        self._codecs[name] = codec
        self._owner[name] = self.current_plugin

    def get(self, name: str, *, what: str = "") -> Codec:
        try:
            return self._codecs[name]
        except KeyError:
            where = f" (needed by {what})" if what else ""
            known = ", ".join(sorted(self._codecs)) or "none"
            raise UnknownCodecError(
                f"unknown codec {name!r}{where}; loaded codecs: {known}. Install the plugin that provides it."
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._codecs

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._codecs))

    def owner(self, name: str) -> str:
        return self._owner[name]


FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64", "complex64", "complex128"}


def default_chain(dtype: str) -> list[str]:
    """The codec chain tried for a fresh (non-delta) chunk of ``dtype``."""
    return ["bgzstd"] if dtype in FLOAT_DTYPES else ["zstd"]


def encode_chain(
    registry: CodecRegistry, names: list[str], data: memoryview, ctx: EncodeContext
) -> tuple[bytes | memoryview, list[dict[str, Any]]]:
    """Run the codecs named in ``names`` in order, skipping those that do not help.

    Returns the payload and the chain actually applied (``[]`` = stored raw).
    """
    chain: list[dict[str, Any]] = []
    payload: bytes | memoryview = data
    for name in names:
        codec = registry.get(name)
        size = len(payload)
        result = codec.encode(memoryview(payload), ctx)
        if result is None:
            continue
        payload, params = result
        step = {"name": name, **params}
        if size != len(data):
            step[INPUT_SIZE] = size
        chain.append(step)
    return payload, chain


def decode_chain(
    registry: CodecRegistry,
    chain: list[Mapping[str, Any]],
    payload: memoryview,
    out: memoryview,
    ctx: DecodeContext,
    what: str,
) -> None:
    """Decode ``payload`` through ``chain`` (reversed) into ``out``."""
    if not chain:
        if len(payload) != len(out):
            raise CorruptCheckpointError(f"{what}: raw object has {len(payload)} bytes, expected {len(out)}")
        copy_into(out, payload)
        return
    # A last stage that may decode in place (``in_place = True``: it tolerates ``payload``
    # aliasing ``out``, as XOR does) gets the previous stage's output written straight
    # into ``out``, saving a full-size intermediate and a copy.
    steps = [(registry.get(_step_name(step, what), what=what), step) for step in reversed(chain)]
    current = payload
    for depth, (codec, step) in enumerate(steps):
        last = depth == len(steps) - 1
        size = len(out) if last else _input_size(step, len(out), what)
        in_place_next = depth == len(steps) - 2 and getattr(steps[-1][0], "in_place", False)
        if last or (in_place_next and size == len(out)):
            target = out
        else:
            target = np.empty(size, dtype=np.uint8).data  # no zero-fill: fully overwritten
        try:
            codec.decode(current, target, step, ctx)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, struct.error) as exc:
            # a payload or parameter a codec chokes on is corrupt data, whichever codec it is
            raise CorruptCheckpointError(
                f"{what}: codec {codec.name!r} cannot decode it ({type(exc).__name__}: {exc})"
            ) from None
        current = target


def decode_prefix(
    registry: CodecRegistry, chain: Sequence[Mapping[str, Any]], payload: memoryview, size: int, nbytes: int
) -> memoryview | None:
    """The first bytes, at least ``min(nbytes, size)``, of a chunk of ``size`` raw bytes
    stored as ``payload`` through ``chain``, decoding no more of it than they take.

    For a chunk stored raw, or by one codec that has ``decode_prefix`` (the zstd codecs);
    None for any other chain (a delta, an encrypted object), and for a payload that does
    not decode: decode the whole chunk then, which says what is wrong with it. The bytes
    are **not verified** (the content hash covers the whole chunk): estimates only (the
    delta probe of :mod:`ckpt.codecs.delta`), never data.
    """
    return decode_prefix_from(registry, chain, lambda a, b: payload[a:b], len(payload), size, nbytes)


def decode_prefix_from(
    registry: CodecRegistry,
    chain: Sequence[Mapping[str, Any]],
    read: Callable[[int, int], bytes | memoryview],
    stored: int,
    size: int,
    nbytes: int,
) -> memoryview | None:
    """:func:`decode_prefix` of a payload of ``stored`` bytes that ``read(start, end)`` gives
    in ranges (an object in a store): a codec with ``decode_prefix_from`` reads only what
    the first bytes need; one with only ``decode_prefix`` is given the whole payload."""
    want = min(nbytes, size)
    if not chain:
        if stored != size:
            return None
        head = read(0, want)
        return memoryview(head) if len(head) == want else None
    step = chain[0]
    if len(chain) != 1 or not isinstance(step, Mapping) or INPUT_SIZE in step:
        return None
    name = step.get("name")
    if not isinstance(name, str) or name not in registry:
        return None
    codec = registry.get(name)
    ranged = getattr(codec, "decode_prefix_from", None)
    prefix = getattr(codec, "decode_prefix", None)
    if ranged is None and prefix is None:
        return None
    try:
        if ranged is not None:
            out = ranged(read, stored, size, nbytes, step)
        elif prefix is not None:
            payload = read(0, stored)
            out = prefix(memoryview(payload), size, nbytes, step) if len(payload) == stored else None
    except (CorruptCheckpointError, ValueError, TypeError, KeyError, IndexError, OverflowError, struct.error):
        return None  # a third party's codec refusing it: the whole decode says why
    if out is None or not want <= len(out) <= size:
        return None
    return memoryview(out)


def _step_name(step: Any, what: str) -> str:
    name = step.get("name") if isinstance(step, Mapping) else None
    if not isinstance(name, str):
        raise CorruptCheckpointError(f"{what}: malformed codec step {str(step)[:80]}")
    return name


#: the chain-step key recording a stage's input size when it differs from the raw size
INPUT_SIZE = "in"
#: a stage's recorded input may exceed the raw size by this much (a codec's framing on
#: incompressible data); anything larger is a hostile manifest asking for memory
_SLACK = 64 * 1024


def max_encoded_size(raw: int) -> int:
    """The most bytes any stage of a chain may produce from, or take in for, ``raw`` raw bytes.

    Codecs that do not help are skipped when encoding, so a real stage grows its input by
    its framing at most; this bound is what a reader allocates or reads at most for a chunk.
    """
    return raw + raw // 8 + _SLACK


def _input_size(step: Mapping[str, Any], raw: int, what: str) -> int:
    """Bytes the stage encoded at ``step`` took as input: what decoding it must produce."""
    size = step.get(INPUT_SIZE, raw)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= max_encoded_size(raw):
        raise CorruptCheckpointError(
            f"{what}: codec step {step.get('name')!r} records an impossible input size {size!r}"
        )
    return size
