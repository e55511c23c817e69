"""The delta codec and its policy: a chunk stored as the XOR of its bits with the same chunk of the parent.

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

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ckpt.codecs.base import CodecRegistry, DecodeContext, EncodeContext, default_chain, encode_chain
from ckpt.errors import CorruptCheckpointError
from ckpt.io.scratch import scratch

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

    def encode(self, data: memoryview, ctx: EncodeContext) -> tuple[memoryview, dict[str, Any]] | None:
        if ctx.parent is None or ctx.parent_ref is None or len(ctx.parent) != len(data):
            return None
        out = scratch(len(data)).data  # fully written by the XOR
        xor_into(data, ctx.parent, out)
        return out, {"parent": dict(ctx.parent_ref)}

    def decode(self, payload: memoryview, out: memoryview, params: Mapping[str, Any], ctx: DecodeContext) -> None:
        parent = params.get("parent")
        if not isinstance(parent, Mapping) or not isinstance(parent.get("hash"), str):
            raise CorruptCheckpointError("xor delta has no parent record")
        size = parent.get("size")
        if type(size) is not int or size != len(out) or len(payload) != len(out):
            raise CorruptCheckpointError(
                f"xor delta of {len(out)} bytes has a {len(payload)}-byte payload "
                f"and a {str(size)[:40]}-byte parent {str(parent.get('key', parent['hash']))[:80]}"
            )
        # verified by the reader, recursively for longer chains (bounded by manifest validation)
        base = ctx.raw_chunk(parent)
        if len(base) != len(out):
            raise CorruptCheckpointError(f"xor delta of {len(out)} bytes got a {len(base)}-byte parent")
        xor_into(payload, base, out)


def delta_key(raw_hash: str, parent_hash: str) -> str:
    """Object key of a delta object (differs from the full object's key ``raw_hash``)."""
    return f"{raw_hash}.x{parent_hash[:16]}"


def parent_record(codec: tuple[Mapping[str, Any], ...] | list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The parent chunk record of a codec chain, or None for a full object."""
    for step in codec:
        if isinstance(step, Mapping) and step.get("name") == NAME:
            parent = step.get("parent")
            return parent if isinstance(parent, Mapping) else None
    return None


def delta_age(codec: tuple[Mapping[str, Any], ...] | list[Mapping[str, Any]]) -> int:
    """Saves since the chunk's last full object (0 for a full object).

    The writer records it as the delta step's ``age``; without one (a delta citing its
    immediate parent) it is the chain depth.
    """
    for step in codec:
        if isinstance(step, Mapping) and step.get("name") == NAME:
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


def chunk_records(record: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """A chunk record and the record of every object its delta chain needs, depth first.

    Any codec step's ``parent`` (not only the built-in ``xor``) is followed, so a
    third-party delta codec that cites parents the same way is kept alive by GC too.
    """
    stack = [record]
    while stack:
        rec = stack.pop()
        yield rec
        for step in rec.get("codec", ()) or ():
            parent = step.get("parent") if isinstance(step, Mapping) else None
            if isinstance(parent, Mapping):
                stack.append(parent)


def referenced_keys(record: Mapping[str, Any]) -> Iterator[str]:
    """Keys of every object a chunk record needs: its own and its delta ancestors'."""
    for rec in chunk_records(record):
        key = rec.get("key", rec.get("hash"))
        if key is not None:
            yield str(key)


# -- policy: when a chunk is written as a delta ------------------------------------------

#: bytes of a large changed chunk encoded both ways (in PROBE_SAMPLES pieces spread over it)
#: to choose between a delta and a full object before encoding the whole chunk one way
PROBE_BYTES = 512 * 1024
PROBE_SAMPLES = 4
#: a chunk becomes a delta only when it is at most this fraction of the full encoding: a
#: delta must also be read and XORed on restore, and a marginal gain is not worth that
MIN_GAIN = 0.9
#: saves a Checkpointer writes a tensor in full, without trying a delta, after a delta of it did not pay off
RETRY_AFTER = 4


def delta_base(parent: Mapping[str, Any] | None, max_chain: int) -> tuple[Mapping[str, Any] | None, int]:
    """The record of the object a delta of this chunk cites, and the delta's age.

    ``parent`` is the parent checkpoint's record of the same chunk. The base is that chunk
    when it is a full object, else the full object its delta cites. ``(None, 0)``: write
    the chunk in full (no parent, or a delta would be ``max_chain`` saves old).
    """
    if parent is None:
        return None, 0
    codec = parent.get("codec", ())
    age = delta_age(codec) + 1
    if age >= max_chain:
        return None, 0
    record = parent_record(codec)
    if record is None or not isinstance(record.get("hash"), str) or not isinstance(record.get("size"), int):
        return parent, age
    if parent_record(record.get("codec", ())) is not None:
        return parent, age  # a store written with deltas of deltas: extend its chain
    return record, age


def _no_prefix(nbytes: int) -> memoryview | None:
    return None


class Sliceable(Protocol):
    """A plane as the probe gets it: its length, and its bytes where sliced (a memoryview,
    or :class:`ckpt.codecs.zstd.PlaneRange`, read from the store only there)."""

    def __len__(self) -> int: ...

    def __getitem__(self, part: slice, /) -> bytes | memoryview: ...


def _nothing() -> None:
    return None


def _no_planes() -> tuple[int, Mapping[int, Sliceable]] | None:
    return None


@dataclass(frozen=True)
class DeltaBase:
    """The chunk a delta would cite (see :func:`delta_base`), its raw bytes fetched only as
    far as :func:`choose` needs them."""

    #: its manifest record, repeated in the delta's codec parameters
    record: Mapping[str, Any]
    #: the delta's age (see :func:`delta_age`)
    age: int
    #: its verified raw bytes, or None when they cannot be had (the chunk is then written in full)
    whole: Callable[[], memoryview | None]
    #: its first raw bytes (at least the number asked for), decoded without the rest and
    #: **unverified**, or None: what the probe of a large chunk uses when :attr:`whole` would
    #: mean decoding a stored object (:func:`ckpt.codecs.base.decode_prefix`)
    prefix: Callable[[int], memoryview | None] = _no_prefix
    #: ``(itemsize, {i: plane})``: the byte planes the stored base holds raw (byte *i* of
    #: each element), read only where sliced and **unverified**, or None: where the probe
    #: looks past the first bytes without decoding anything (:func:`_first_bytes_understate`)
    raw_planes: Callable[[], tuple[int, Mapping[int, Sliceable]] | None] = _no_planes
    #: gives back what reading it holds (an open object): called once the chunk is encoded
    close: Callable[[], None] = _nothing
    #: read back from the store (its fetches wait on I/O), not held in memory
    stored: bool = False


@dataclass(frozen=True)
class Choice:
    """How a changed chunk was encoded: ``chain`` applied to give ``payload``."""

    payload: bytes | memoryview
    chain: list[dict[str, Any]]
    #: the delta was kept
    delta: bool
    #: a delta was tried (False: written in full without trying)
    tried: bool
    #: the choice was made from samples
    probed: bool
    #: the delta kept saved what :data:`MIN_GAIN` asks of the full encoding (estimated from
    #: the samples when probed: a delta the samples overrated is kept, being smaller than
    #: the raw chunk, but a run does not try again soon; see :class:`DeltaLearner`)
    paid: bool = False


def choose(registry: CodecRegistry, data: memoryview, ctx: EncodeContext, base: DeltaBase | None) -> Choice:
    """Encode a changed chunk in full, or as a delta against ``base`` when that is smaller.

    The base record and the age are repeated in the manifest, so they count against the
    delta. Encoding a large chunk both ways would double the codec work of every changed
    chunk, so samples decide first (:data:`PROBE_BYTES`), and only the chosen encoding runs
    on the whole chunk. The samples are spread over the chunk when the base's bytes are at
    hand; when they would have to be decoded from a stored object, one sample at the start
    of the chunk is compared with the base's first bytes, decoded alone (unverified: an
    estimate only), and the whole base is decoded (and verified) only when that sample
    favours a delta, or when it does not but the base's raw planes, read in place at
    places spread over the chunk, show more of it unchanged than its first bytes do
    (:func:`_first_bytes_understate`: a chunk whose first rows changed and the rest did not).
    Decoding and verifying a stored base whole costs over half the CPU of encoding the
    chunk (16 MiB of float32), and most large chunks of a training run do not pay a delta.
    A base whose first bytes cannot be cut short (a sealed object, a delta of deltas) is
    decoded whole and sampled as one at hand.
    """
    full_chain = default_chain(ctx.dtype)

    def full(tried: bool, probed: bool) -> Choice:
        payload, chain = encode_chain(registry, full_chain, data, ctx)
        return Choice(payload, chain, delta=False, tried=tried, probed=probed)

    if base is None:
        return full(False, False)
    overhead = len(json.dumps(dict(base.record), separators=(",", ":"))) + len(',"age":') + len(str(base.age))
    delta_chain = [NAME, *full_chain]

    def as_delta(whole: memoryview) -> tuple[bytes | memoryview, list[dict[str, Any]]]:
        return encode_chain(registry, delta_chain, data, dataclasses.replace(ctx, parent=whole, parent_ref=base.record))

    def wins(payload: bytes | memoryview, chain: list[dict[str, Any]], full_size: float) -> bool:
        won = bool(chain) and chain[0].get("name") == NAME and len(payload) + overhead < full_size
        if won:
            chain[0]["age"] = base.age
        return won

    if len(data) >= 4 * PROBE_BYTES:
        whole: memoryview | None = None
        step = PROBE_BYTES - PROBE_BYTES % 64  # whole elements
        head = base.prefix(step)
        if head is not None:
            samples = [(0, head[:step])]
        else:
            whole = base.whole()
            if whole is None:
                return full(False, False)
            samples = _spread(whole, len(data))
        full_est, delta_est = _probe(registry, data, samples, full_chain, delta_chain, ctx)
        if (
            whole is None
            and head is not None
            and not delta_est + overhead < full_est * MIN_GAIN
            and _first_bytes_understate(data, head[:step], base.raw_planes(), base.age)
        ):
            # The first bytes say "full", but the base's raw planes show more of the chunk
            # unchanged past them (or, without raw planes, a delta paid at this chunk's last
            # change): a chunk whose first rows changed and the rest did not (the frequent
            # tokens' rows of an embedding) would lose every delta to its first bytes, so
            # the whole base's spread samples decide.
            whole = base.whole()
            if whole is None:
                return full(False, True)  # the base cannot be read: nothing was tried
            samples = _spread(whole, len(data))
            full_est, delta_est = _probe(registry, data, samples, full_chain, delta_chain, ctx)
        if delta_est + overhead < full_est * MIN_GAIN:
            whole = whole if whole is not None else base.whole()
            if whole is None:
                return full(False, True)  # the base cannot be read: nothing was tried
            payload, chain = as_delta(whole)
            if wins(payload, chain, len(data)):
                paid = len(payload) + overhead < full_est * MIN_GAIN
                return Choice(payload, chain, delta=True, tried=True, probed=True, paid=paid)
        return full(True, True)
    whole = base.whole()
    if whole is None:
        return full(False, False)
    payload, chain = encode_chain(registry, full_chain, data, ctx)
    dpayload, dchain = as_delta(whole)
    if wins(dpayload, dchain, len(payload) * MIN_GAIN):
        return Choice(dpayload, dchain, delta=True, tried=True, probed=False, paid=True)
    return Choice(payload, chain, delta=False, tried=True, probed=False)


#: the first bytes understate a chunk's unchanged share when the raw planes past them
#: agree with the new data on this much more of their bytes (fractions of bytes)
UNDERSTATED = 0.1


def _first_bytes_understate(
    data: memoryview, head: memoryview, planes: tuple[int, Mapping[int, Sliceable]] | None, age: int
) -> bool:
    """Whether the bytes of ``data`` past ``head`` (the base's first bytes) are unchanged
    noticeably more often than the first ones, judged on the base's raw planes (the low
    mantissa bytes of floats, which an update of an element almost always changes) at
    :data:`PROBE_SAMPLES` places spread over the chunk: no decoding needed, and only those
    places of the planes read. Without raw planes to judge by (or planes that do not fit
    the chunk): whether a delta paid at the chunk's last change (``age`` > 1: its parent is
    a delta)."""
    if planes is None or not planes[1]:
        return age > 1
    k, raw = planes
    n = len(data) // k
    m = len(head) // k
    if len(data) % k or m == 0 or n < 2 * m or any(len(p) != n for p in raw.values()):
        return age > 1
    new = np.frombuffer(data, dtype=np.uint8).reshape(n, k)
    first = np.frombuffer(head, dtype=np.uint8, count=m * k).reshape(m, k)
    width = max(1, m // PROBE_SAMPLES)
    starts = [m + (n - m - width) * j // (PROBE_SAMPLES - 1) for j in range(PROBE_SAMPLES)]
    same_first = same_past = 0.0
    for i, plane in raw.items():
        same_first += float(np.mean(new[:m, i] == first[:, i]))
        same = []
        for a in starts:
            old = plane[a : a + width]
            if len(old) != width:  # a plane shorter than its table says: no judgement
                return age > 1
            same.append(np.mean(new[a : a + width, i] == np.frombuffer(old, dtype=np.uint8)))
        same_past += float(np.mean(same))
    return (same_past - same_first) / len(raw) > UNDERSTATED


def _spread(base: memoryview, n: int) -> list[tuple[int, memoryview]]:
    """:data:`PROBE_SAMPLES` samples of ``base`` (``n`` bytes) spread over it: (offset, bytes)."""
    step = PROBE_BYTES // PROBE_SAMPLES
    step -= step % 64  # keeps every sample aligned to whole elements
    starts = [((n - step) * i // (PROBE_SAMPLES - 1)) // 64 * 64 for i in range(PROBE_SAMPLES)]
    return [(a, base[a : a + step]) for a in starts]


def _probe(
    registry: CodecRegistry,
    data: memoryview,
    samples: list[tuple[int, memoryview]],
    full_chain: list[str],
    delta_chain: list[str],
    ctx: EncodeContext,
) -> tuple[float, float]:
    """Estimated full and delta sizes of ``data`` from encoding its ``samples`` (offset, the
    base's bytes there) both ways."""
    full = delta = taken = 0
    for a, pbase in samples:
        part = data[a : a + len(pbase)]
        p, _ = encode_chain(registry, full_chain, part, ctx)
        d, _ = encode_chain(registry, delta_chain, part, dataclasses.replace(ctx, parent=pbase, parent_ref={}))
        full += len(p)
        delta += len(d)
        taken += len(part)
    return full * len(data) / taken, delta * len(data) / taken


class DeltaLearner:
    """A run's memory of tensors whose deltas do not pay off, so it stops trying for a while.

    Trying a delta reads and decodes the chunk's full object and encodes samples twice:
    CPU taken from training for nothing when the tensor changes everywhere every step
    (Adam moments, weights early in training). Such a tensor is written in full without
    trying for the next :data:`RETRY_AFTER` saves, then tried again (learning rates decay).
    """

    def __init__(self, retry_after: int | None = None) -> None:
        self.retry_after = RETRY_AFTER if retry_after is None else retry_after
        self._rest: dict[str, int] = {}

    def skip(self) -> frozenset[str]:
        """Tensor paths the next save writes in full without trying a delta."""
        return frozenset(p for p, n in self._rest.items() if n > 0)

    def learn(self, outcomes: Mapping[str, bool]) -> None:
        """After a save: ``outcomes`` maps each tensor tried to whether a delta of it paid
        (``SaveStats.delta_paid``)."""
        for path in list(self._rest):
            self._rest[path] -= 1
            if self._rest[path] <= 0:
                del self._rest[path]
        for path, kept in outcomes.items():
            if kept:
                self._rest.pop(path, None)
            else:
                self._rest[path] = self.retry_after
