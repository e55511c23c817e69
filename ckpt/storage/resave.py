"""Persisting a checkpoint of a raw local tier: read it back, write it compressed.

A fast local tier stores its objects raw (:attr:`ckpt.storage.store.Store.compress` is
False): a save there only hashes and writes, and a restore from it reads each object
straight into the tensor's memory and verifies it, with nothing to decode. The durable
tier must not hold raw objects (they are 1.2x-2x larger than compressed ones, and they
cross a network), so a checkpoint of such a tier is not copied object for object: its
tensors are read back (verified against their hashes), written to the durable store by
the ordinary writer (compression, deduplication against the durable tier's latest
checkpoint, deltas against it) and committed with a manifest that is the local one with
the durable tier's object records. Packed objects (small tensors sharing one) are written
as the local tier packed them, so both copies record the same raw content and layout
(:func:`ckpt.storage.copy.same_checkpoint` holds them the same checkpoint, which the tiers'
checks rely on). An object's key names its encoding too (:func:`ckpt.io.writer.object_key`):
a store holding the same content raw and compressed never has one replace the other.

The commit rules are the copy's (:mod:`ckpt.storage.copy`): objects, then the manifest,
then the ref, under the durable tier's writer lease; a checkpoint the durable tier holds
with the same content is not written again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from typing import NamedTuple

import torch

from ckpt import config
from ckpt.codecs.base import CodecRegistry
from ckpt.errors import CorruptCheckpointError
from ckpt.io.plan import ReadPlan
from ckpt.io.reader import Reader, read_tensors
from ckpt.io.writer import write_objects
from ckpt.security.binding import bind_destination
from ckpt.snapshot.executor import new_io_pool
from ckpt.state.tree import dtype_from_name
from ckpt.storage.copy import CopyResult, CopyStats, _commit_copy, _existing, _source_manifests, same_checkpoint
from ckpt.storage.lineage import find_latest
from ckpt.storage.manifest import ChunkRef, Manifest, TensorEntry
from ckpt.storage.store import Store
from ckpt.storage.writer_lease import WriterLease
from ckpt.types import CheckpointInfo

log = logging.getLogger("ckpt")

#: raw bytes read back from the local tier at a time (the writer encodes them meanwhile)
BATCH_BYTES = 256 * 1024 * 1024


def resave_step(
    src: Store,
    dst: Store,
    step: int,
    *,
    lease: WriterLease,
    codecs: CodecRegistry,
    batch_bytes: int = BATCH_BYTES,
) -> CopyResult:
    """Write ``src``'s checkpoint ``step`` to ``dst`` compressed, as ``dst``'s latest."""
    (manifest,) = _source_manifests(src, step, None)
    bind_destination(src, dst, None)  # an encrypted local tier gives the durable one its descriptor
    stats = CopyStats()
    held = _existing(dst, manifest, src.url, replace=True)
    if held is not None and same_checkpoint(held, manifest):
        stats.already += 1
        return CopyResult(CheckpointInfo.from_manifest(held, dst.url), stats)
    lease.protect([*lease.protected, manifest.step], in_flight=manifest.step)
    parent = find_latest(dst).manifest
    packs = _packs(manifest)
    window = _Window(batch_bytes)
    # compression is the heavy part: at the lower priority of the Checkpointer's background work
    with new_io_pool("ckpt-resave", nice=config.background_nice()) as pool:
        entries, written = write_objects(
            dst,
            codecs,
            _read_back(src, codecs, manifest, packs, window),
            pool=pool,
            chunk_bytes=manifest.chunk_bytes or config.chunk_bytes(),
            parent=parent,
            max_chain=config.delta_max_chain(),
            pack_bytes=0,  # the local tier's packs are written as they are (_packs)
            on_tensor_written=window.written,
        )
    entries = _unpack(manifest, packs, entries)
    stats.objects = written.objects_written
    stats.bytes = written.written_bytes
    out = _durable_manifest(manifest, entries)
    # its stored size settled as a save's is, once the copy has its seq
    committed = _commit_copy(dst, out, lease, {}, True, written.written_bytes)
    stats.checkpoints = 1
    return CopyResult(CheckpointInfo.from_manifest(committed, dst.url), stats)


class _Pack(NamedTuple):
    """A packed object of the local checkpoint: its record, and who it holds."""

    ref: ChunkRef
    members: list[str]


def _pack_path(key: str) -> str:
    # not a tree path (they never start with a NUL): only the writer's entries see it
    return f"\0pack/{key}"


def _packs(manifest: Manifest) -> dict[str, _Pack]:
    """The packed objects of ``manifest`` by key (their members: plain one-chunk entries)."""
    packs: dict[str, _Pack] = {}
    for path, entry in manifest.tensors.items():
        if not entry.shards and len(entry.chunks) == 1 and entry.chunks[0].packed:
            ref = entry.chunks[0].object_ref()
            pack = packs.setdefault(ref.key, _Pack(ref, []))
            if pack.ref != ref:
                raise CorruptCheckpointError(
                    f"step {manifest.step}: tensor {path!r} records packed object {ref.key} unlike {pack.members[0]!r}"
                )
            pack.members.append(path)
    return packs


def _pack_tensor(raw: memoryview, manifest: Manifest, pack: _Pack) -> torch.Tensor:
    """The verified bytes of a packed object, as its members' dtype where they share one (the
    codecs group bytes by element size)."""
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if len(raw) else torch.empty(0, dtype=torch.uint8)
    dtypes = {manifest.tensors[p].dtype for p in pack.members}
    if len(dtypes) == 1:
        dtype = dtype_from_name(dtypes.pop(), what=f"tensor {pack.members[0]!r}")
        if dtype.itemsize > 1 and len(raw) % dtype.itemsize == 0 and not dtype.is_complex:
            return data.view(dtype)
    return data


def _unpack(manifest: Manifest, packs: dict[str, _Pack], entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """The durable entries of every tensor: a packed one cites its slice of the durable copy
    of its pack, at the same place as in the local pack."""
    out = {p: e for p, e in entries.items() if not p.startswith("\0")}
    for key, pack in packs.items():
        chunks = entries[_pack_path(key)].chunks
        if len(chunks) != 1 or chunks[0].hash != pack.ref.hash or chunks[0].size != pack.ref.size:
            raise CorruptCheckpointError(f"packed object {key} of step {manifest.step} was not written whole")
        obj = chunks[0]
        for path in pack.members:
            mine = manifest.tensors[path].chunks[0]
            ref = dataclasses.replace(obj, size=mine.size, at=mine.at, of=obj.size)
            out[path] = dataclasses.replace(manifest.tensors[path], chunks=(ref,))
    return out


class _Window:
    """Raw bytes read back and not written yet: a batch is read only once those of the batch
    before are down to ``limit`` (the writer takes tensors without waiting: reading on
    regardless held the whole checkpoint in memory while the writer compressed it)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pending: dict[str, int] = {}
        self._cond = threading.Condition()

    def reading(self, path: str, nbytes: int) -> None:
        with self._cond:
            self._pending[path] = nbytes

    def written(self, path: str) -> None:
        """The writer is done with ``path``'s bytes (written, reused, or failed)."""
        with self._cond:
            self._pending.pop(path, None)
            self._cond.notify_all()

    def wait(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: sum(self._pending.values()) <= self.limit)


def _read_back(
    src: Store, codecs: CodecRegistry, manifest: Manifest, packs: dict[str, _Pack], window: _Window
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every packed object of ``manifest`` (as one tensor each, :func:`_pack_path`), then
    every other tensor, read and verified a batch of ``window.limit`` bytes at a time, each
    batch once the writer has the one before it (nearly) done."""
    batch_bytes = window.limit
    reader = Reader(src, codecs, cache_bytes=0)
    for key, pack in packs.items():
        window.wait()
        raw = reader.object_bytes(pack.ref, what=f"packed object {key} of step {manifest.step}")
        window.reading(_pack_path(key), len(raw))
        yield _pack_path(key), _pack_tensor(raw, manifest, pack)
    packed = {p for pack in packs.values() for p in pack.members}
    batch: list[str] = []
    size = 0
    paths = [p for p in manifest.tensors if p not in packed]
    for i, path in enumerate(paths):
        batch.append(path)
        size += manifest.tensors[path].nbytes
        if size >= batch_bytes or i == len(paths) - 1:
            window.wait()
            tensors = read_tensors(src, codecs, ReadPlan.for_paths(manifest, batch))
            for p in batch:
                window.reading(p, manifest.tensors[p].nbytes)
                yield p, tensors.pop(p)
            batch, size = [], 0


def _durable_manifest(manifest: Manifest, entries: dict[str, TensorEntry]) -> Manifest:
    """``manifest`` citing the durable tier's objects."""
    return dataclasses.replace(manifest, tensors={p: entries[p] for p in manifest.tensors}, seq=None)
