"""Persisting a checkpoint of a raw local tier: read it back, write it compressed.

A fast local tier stores its objects raw (:attr:`ckpt.storage.store.Store.compress` is
False): a save there only hashes and writes, and a restore from it reads each object
straight into the tensor's memory and verifies it, with nothing to decode. The durable
tier must not hold raw objects (they are 1.2x-2x larger than compressed ones, and they
cross a network), so a checkpoint of such a tier is not copied object for object: its
tensors are read back (verified against their hashes), written to the durable store by
the ordinary writer (compression, deduplication against the durable tier's latest
checkpoint, deltas against it) and committed with a manifest that is the local one with
the durable tier's object records. A raw object's key is not its encoded form's
(:func:`ckpt.io.writer.raw_key`): a store holding both never has one replace the other.

The commit rules are the copy's (:mod:`ckpt.storage.copy`): objects, then the manifest,
then the ref, under the durable tier's writer lease; a checkpoint the durable tier holds
with the same content is not written again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import torch

from ckpt import config
from ckpt.codecs.base import CodecRegistry
from ckpt.io.plan import ReadPlan
from ckpt.io.reader import read_tensors
from ckpt.io.writer import write_objects
from ckpt.security.binding import bind_destination
from ckpt.snapshot.executor import new_io_pool
from ckpt.storage.copy import CopyResult, CopyStats, _commit_copy, _existing, _source_manifests, same_checkpoint
from ckpt.storage.lineage import find_latest
from ckpt.storage.manifest import Manifest, TensorEntry
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
    # compression is the heavy part: at the lower priority of the Checkpointer's background work
    with new_io_pool("ckpt-resave", nice=config.background_nice()) as pool:
        entries, written = write_objects(
            dst,
            codecs,
            _read_back(src, codecs, manifest, batch_bytes),
            pool=pool,
            chunk_bytes=manifest.chunk_bytes or config.chunk_bytes(),
            parent=parent,
            max_chain=config.delta_max_chain(),
        )
    stats.objects = written.objects_written
    stats.bytes = written.written_bytes
    out = _durable_manifest(manifest, entries, written.written_bytes)
    committed = _commit_copy(dst, out, lease, {}, True)
    stats.checkpoints = 1
    return CopyResult(CheckpointInfo.from_manifest(committed, dst.url), stats)


def _read_back(
    src: Store, codecs: CodecRegistry, manifest: Manifest, batch_bytes: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of ``manifest``, read and verified a batch of ``batch_bytes`` at a time."""
    batch: list[str] = []
    size = 0
    paths = list(manifest.tensors)
    for i, path in enumerate(paths):
        batch.append(path)
        size += manifest.tensors[path].nbytes
        if size >= batch_bytes or i == len(paths) - 1:
            tensors = read_tensors(src, codecs, ReadPlan.for_paths(manifest, batch))
            for p in batch:
                yield p, tensors.pop(p)
            batch, size = [], 0


def _durable_manifest(manifest: Manifest, entries: dict[str, TensorEntry], written: int) -> Manifest:
    """``manifest`` citing the durable tier's objects, its stored size settled as a save's is."""
    out = dataclasses.replace(manifest, tensors={p: entries[p] for p in manifest.tensors}, seq=None)
    stored = written + len(out.to_json_bytes())
    for _ in range(3):
        out = dataclasses.replace(out, stored_bytes=stored)
        now = written + len(out.to_json_bytes())
        if now == stored:
            break
        stored = now
    return out
