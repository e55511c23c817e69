"""Restoring from local disk straight into the live tensors, in two passes (see
:func:`ckpt.state.restore.prepare_restore`): :func:`read_verified` verifies, nothing live
changes; :func:`decode_in_place` decodes into the live tensors once every rank has verified.

A tensor qualifies, packed or not (a packed object is decoded once: streamed into its tensors
a block at a time, or, small or not streamable, into a reused buffer sliced into them), when its objects are verified by reading their stored bytes (raw, or
encoded with a recorded ``stored_hash``; a delta with its parents'; :func:`ckpt.io.verify.stored_digests`)
with codecs this reader has, and its live tensor is contiguous CPU memory of the stored
size that no other live tensor overlaps (exact aliases holding the same stored bytes are
read once). Everything else is read into fresh memory and loaded by the adapters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import increment_version

from ckpt.codecs.base import CodecRegistry
from ckpt.errors import CheckpointError, CorruptCheckpointError
from ckpt.io.memory import sharing_memory
from ckpt.io.plan import ReadPlan
from ckpt.io.reader import Reader, read_tensors, writable_in_place
from ckpt.io.region import box_chunks, box_read_whole, read_box
from ckpt.io.verify import stored_digests, verify_objects, verify_reads
from ckpt.snapshot.executor import cpu_threads, io_pool, wait_all
from ckpt.state.tree import dtype_from_name
from ckpt.storage.manifest import ChunkRef, Manifest, TensorEntry
from ckpt.storage.store import Store


@dataclass(frozen=True)
class Box:
    """A box of a stored tensor decoded straight into a live tensor's memory: this rank's
    shard of a live DTensor (``value``), its local tensor ``out`` (see
    :mod:`ckpt.distributed.restore`)."""

    entry: TensorEntry
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    out: torch.Tensor
    value: Any


@dataclass
class InPlace:
    """Objects verified by :func:`read_verified` that :func:`decode_in_place` reads straight
    into the live tensors."""

    store: Store
    plan: ReadPlan | None
    live: dict[str, torch.Tensor]
    #: the checkpoint's step (named by a late failure)
    step: int
    #: boxes of stored tensors read into live memory, by path (their objects verified too)
    boxes: dict[str, Box] = field(default_factory=dict)

    def values(self) -> dict[str, Any]:
        """The live tensors' memory as the values the adapters load, filled by
        :func:`decode_in_place`. Decoding a value may set requires_grad on it (a stored
        tensor that needs grad), which must not change a live tensor: those that do not
        require grad already are given as aliases. Those that do are given themselves, so
        a module's load, copying each onto itself, does nothing (an alias it would copy)."""
        values: dict[str, Any] = {**self.live, **{p: b.value for p, b in self.boxes.items()}}
        return {p: t if t.requires_grad else t.detach() for p, t in values.items()}


def read_verified(
    store: Store,
    codecs: CodecRegistry,
    manifest: Manifest,
    live: Mapping[str, torch.Tensor],
    wanted: list[str],
    refused: set[str],
    *,
    in_place: bool,
) -> tuple[dict[str, torch.Tensor], InPlace | None]:
    """The first pass: the tensors of ``wanted`` read into fresh host memory and verified,
    but (with ``in_place``) those :func:`in_place_targets` picks only verified, by their
    stored bytes, while the others are read; nothing live changes. Returns the fresh
    tensors and what :func:`decode_in_place` decodes into the live tensors afterwards."""
    deferred: dict[str, torch.Tensor] = {}
    plan = None
    if in_place:
        deferred, plan = in_place_targets(manifest, live, wanted, refused, codecs)
    with io_pool("ckpt-verify-side", 1) as side:
        verified = side.submit(verify_reads, store, codecs, plan) if plan is not None else None
        # Into fresh host memory, not the live tensors: a chunk failing verification must not
        # leave a module half-overwritten.
        tensors = read_tensors(store, codecs, ReadPlan.for_paths(manifest, [p for p in wanted if p not in deferred]))
        if verified is not None:
            verified.result()
    return tensors, InPlace(store, plan, deferred, manifest.step) if plan is not None else None


def decode_in_place(ip: InPlace, codecs: CodecRegistry) -> None:
    """The second pass: the objects :func:`read_verified` verified decoded straight into the
    live tensors and verified again. A failure here (an object rewritten since, or a
    manifest forged to record stored bytes that do not decode to its content) says the live
    tensors may be partly overwritten."""
    try:
        # just read by the verifying pass, so in the page cache: decoding is CPU work
        if ip.plan is not None:
            read_tensors(
                ip.store, codecs, ip.plan, destinations=ip.live, workers=cpu_threads(), cache_parents=False, stream=True
            )
        if ip.boxes:
            _decode_boxes(ip, codecs)
    except CheckpointError as exc:
        damage = (
            # what a pass-1 check of its stored bytes cannot tell apart
            "it changed after it was verified, or its manifest records a content its verified stored bytes "
            "do not decode to"
            if isinstance(exc, CorruptCheckpointError)
            else "it failed after the checkpoint was verified"
        )
        raise type(exc)(
            f"{exc} ({damage}: the live tensors of step {ip.step} may be partly overwritten; "
            "restore another checkpoint)"
        ) from None
    finally:
        # written through NumPy, which autograd does not see: a backward still pending
        # over these tensors must find them changed
        for tensor in [*ip.live.values(), *(b.out for b in ip.boxes.values())]:
            increment_version(tensor)


def _decode_boxes(ip: InPlace, codecs: CodecRegistry) -> None:
    """The boxes of ``ip`` decoded into their live memory, several at once (each box's
    chunks on a pool of their own: a box waiting on its chunks never holds a thread they need)."""
    reader = Reader(ip.store, codecs, cache_bytes=0, prefault_out=False, stream=True)
    with io_pool("ckpt-read", cpu_threads()) as chunks, io_pool("ckpt-boxes", cpu_threads()) as boxes:
        wait_all(
            [
                boxes.submit(read_box, reader, b.entry, p, b.offsets, b.shape, pool=chunks, out=b.out)
                for p, b in ip.boxes.items()
            ]
        )


def verify_boxes(store: Store, codecs: CodecRegistry, boxes: Mapping[str, Box]) -> None:
    """The first pass for ``boxes``: the stored bytes of every object each box reads hashed
    (see :func:`box_in_place` for which boxes qualify)."""
    verify_objects(
        store, codecs, [(ref, p) for p, b in boxes.items() for ref in box_chunks(b.entry, b.offsets, b.shape)]
    )


def box_in_place(entry: TensorEntry, offsets: tuple[int, ...], out: torch.Tensor, codecs: CodecRegistry) -> bool:
    """Whether the box ``offsets`` + ``out.shape`` of stored ``entry`` may be decoded
    straight into ``out`` after a first pass: ``out`` is contiguous CPU memory of the stored
    dtype, the box lies in the tensor and is made of whole stored pieces (decoded straight
    into ``out``: nothing to allocate once live memory is being written), and every object
    it reads is one reading verifies (unpacked, as :func:`_into_live` asks of a whole
    tensor's)."""
    shape = tuple(out.shape)
    if not writable_in_place(out) or len(offsets) != len(entry.shape) or len(shape) != len(entry.shape):
        return False
    try:
        if dtype_from_name(entry.dtype, what="") != out.dtype:
            return False
    except CheckpointError:  # a dtype this torch lacks: the read into fresh memory says so
        return False
    if any(o < 0 or n < 0 or o + n > g for o, n, g in zip(offsets, shape, entry.shape)):
        return False
    if not box_read_whole(entry, offsets, shape):  # a resharded box: its buffers are taken in the first pass
        return False
    refs = box_chunks(entry, offsets, shape)
    return all(not c.packed for c in refs) and _verifiable(refs, codecs)


def in_place_targets(
    manifest: Manifest,
    live: Mapping[str, torch.Tensor],
    wanted: list[str],
    refused: set[str],
    codecs: CodecRegistry,
) -> tuple[dict[str, torch.Tensor], ReadPlan | None]:
    """The live tensors of ``wanted`` decoded into in place (not those of ``refused``), and the
    plan that reads them (None when there are none; an exact alias of another is filled by
    the other's read)."""
    deferred = {
        p: live[p]
        for p in wanted
        if p in live and p not in refused and _into_live(manifest.tensors[p], live[p], codecs)
    }
    read = _unaliased(manifest, deferred, {p: live[p] for p in wanted if p in live})
    deferred = {p: t for p, t in deferred.items() if p in read}
    plan = ReadPlan.for_paths(manifest, [p for p in deferred if read[p]]) if deferred else None
    return deferred, plan


def _unaliased(
    manifest: Manifest, deferred: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor]
) -> dict[str, bool]:
    """Which tensors of ``deferred`` may be decoded into their live memory, and whether each
    is read for it (``False``: another path of the same memory is).

    Live tensors sharing memory (tied weights, a view and its base) would have it written
    by concurrent decodes: different stored data mixed (or failed its hash after the live
    tensors changed), where the loads copy one after the other. Only paths that are exactly
    one memory and hold the same stored bytes (the same object hashes) are read in place,
    once; any other overlap is read into fresh memory and loaded as before.
    """
    out = {p: True for p in deferred}
    for group in sharing_memory(live.items()):
        paths = [p for _, _, p in group]
        same = (
            all(p in deferred for p in paths)
            and len({(a, b) for a, b, _ in group}) == 1
            and len({_stored_bytes(manifest.tensors[p]) for p in paths}) == 1
        )
        for i, p in enumerate(paths):
            if not same:
                out.pop(p, None)
            elif i:
                out[p] = False
    return out


def _stored_bytes(entry: TensorEntry) -> tuple[tuple[str, int, int, int], ...]:
    """What a record says a tensor's bytes are: each chunk's content hash, and for a packed
    one (whose hash is the whole object's) its slice of that object."""
    return tuple((c.hash, c.at, c.size, c.of) for c in entry.chunks)


def _into_live(entry: TensorEntry, live: torch.Tensor, codecs: CodecRegistry) -> bool:
    """Whether ``entry`` is stored unsharded in objects reading verifies (see
    :func:`ckpt.io.verify.stored_digests`) and this reader has the codecs of, parents' too (an object of a
    newer ckpt, or of a plugin not installed here, is refused by the read into fresh memory,
    before anything live changes), and ``live`` can take it in place."""
    if not entry.chunks or entry.shards:
        return False
    if any(c.packed and any("parent" in step for step in c.codec) for c in entry.chunks):
        # a packed delta: each member carries its own copy of the parent's record, which
        # hashing stored bytes does not check (a damaged copy would fail only the second
        # pass, after its pack mates were written): decoded whole in the first pass
        return False
    if not writable_in_place(live) or live.nbytes != entry.nbytes:
        return False
    return _verifiable(entry.chunks, codecs)


def _verifiable(refs: Iterable[ChunkRef], codecs: CodecRegistry) -> bool:
    """Whether reading the stored bytes of ``refs``' objects verifies them and this reader
    has the codecs of each, parents' too."""
    links = [stored_digests(c) for c in refs]
    return all(
        objs is not None and all(step.get("name") in codecs for obj, _ in objs for step in obj.codec) for objs in links
    )
