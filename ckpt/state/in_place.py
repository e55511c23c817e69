"""Restoring from local disk straight into the live tensors, in two passes (see
:func:`ckpt.state.restore.prepare_restore`): :func:`read_verified` verifies, nothing live
changes; :func:`decode_in_place` decodes into the live tensors once every rank has verified.

A tensor qualifies, packed or not (a packed object is decoded once into a reused buffer and
sliced into its tensors), when its objects are verified by reading their stored bytes (raw, or
encoded with a recorded ``stored_hash``; a delta with its parents'; :func:`ckpt.io.reader.stored_digests`)
with codecs this reader has, and its live tensor is contiguous CPU memory of the stored
size that no other live tensor overlaps (exact aliases holding the same stored bytes are
read once). Everything else is read into fresh memory and loaded by the adapters.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch.autograd.graph import increment_version

from ckpt.codecs.base import CodecRegistry
from ckpt.errors import CheckpointError, CorruptCheckpointError
from ckpt.io.memory import sharing_memory
from ckpt.io.plan import ReadPlan
from ckpt.io.reader import read_tensors, stored_digests, verify_reads, writable_in_place
from ckpt.snapshot.executor import cpu_threads
from ckpt.storage.manifest import Manifest, TensorEntry
from ckpt.storage.store import Store


@dataclass
class InPlace:
    """Objects verified by :func:`read_verified` that :func:`decode_in_place` reads straight
    into the live tensors."""

    store: Store
    plan: ReadPlan
    live: dict[str, torch.Tensor]
    #: the checkpoint's step (named by a late failure)
    step: int

    def values(self) -> dict[str, torch.Tensor]:
        """The live tensors' memory as the values the adapters load, filled by
        :func:`decode_in_place`. Decoding a value may set requires_grad on it (a stored
        tensor that needs grad), which must not change a live tensor: those that do not
        require grad already are given as aliases. Those that do are given themselves, so
        a module's load, copying each onto itself, does nothing (an alias it would copy)."""
        return {p: t if t.requires_grad else t.detach() for p, t in self.live.items()}


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
    with ThreadPoolExecutor(1, thread_name_prefix="ckpt-verify") as side:
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
        read_tensors(ip.store, codecs, ip.plan, destinations=ip.live, workers=cpu_threads(), cache_parents=False)
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
        for tensor in ip.live.values():
            increment_version(tensor)


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
    :func:`ckpt.io.reader.stored_digests`) and this reader has the codecs of, parents' too (an object of a
    newer ckpt, or of a plugin not installed here, is refused by the read into fresh memory,
    before anything live changes), and ``live`` can take it in place."""
    if not entry.chunks or entry.shards:
        return False
    if not writable_in_place(live) or live.nbytes != entry.nbytes:
        return False
    links = [stored_digests(c) for c in entry.chunks]
    return all(
        objs is not None and all(step.get("name") in codecs for obj, _ in objs for step in obj.codec) for objs in links
    )
