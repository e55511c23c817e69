"""The read plan: which stored objects fill which byte ranges of which tensors.

Every read path builds one: restore and load (tensors into destinations), verify (each
distinct object once), export (chunks in file order) and diff. The plan is pure data
computed from a manifest; :mod:`ckpt.io.reader` carries it out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ckpt.errors import CorruptCheckpointError
from ckpt.storage.manifest import ChunkRef, Manifest, TensorEntry


@dataclass(frozen=True)
class ChunkRead:
    """Object ``ref`` fills bytes ``[offset, offset + ref.size)`` of tensor ``path``; of the
    row-major bytes of its box ``shard`` when that is not None (a sharded tensor, schema 2:
    :mod:`ckpt.io.region` places the box)."""

    path: str
    ref: ChunkRef
    offset: int
    shard: int | None = None


@dataclass(frozen=True)
class ReadPlan:
    """The reads that produce tensors ``paths`` of checkpoint ``manifest``, in tensor order."""

    manifest: Manifest
    paths: tuple[str, ...]
    reads: tuple[ChunkRead, ...]

    @classmethod
    def for_paths(cls, manifest: Manifest, paths: Iterable[str]) -> ReadPlan:
        """The plan for ``paths``; a path the manifest does not list is a CorruptCheckpointError.

        A path named twice (a tree citing one tensor in two places) is read once: two reads
        of one chunk into the same memory at once would race (a delta decodes in place).
        """
        paths = tuple(dict.fromkeys(paths))
        reads: list[ChunkRead] = []
        for path in paths:
            entry = manifest.tensors.get(path)
            if entry is None:
                raise CorruptCheckpointError(
                    f"manifest of step {manifest.step} references tensor {path!r} it does not list"
                )
            offset = 0
            for ref in entry.chunks:
                reads.append(ChunkRead(path, ref, offset))
                offset += ref.size
            for i, shard in enumerate(entry.shards):
                offset = 0
                for ref in shard.chunks:
                    reads.append(ChunkRead(path, ref, offset, i))
                    offset += ref.size
        return cls(manifest, paths, tuple(reads))

    @classmethod
    def whole(cls, manifest: Manifest) -> ReadPlan:
        """Every tensor of ``manifest``."""
        return cls.for_paths(manifest, manifest.tensors)

    def entry(self, path: str) -> TensorEntry:
        return self.manifest.tensors[path]

    @property
    def nbytes(self) -> int:
        """Raw bytes the plan produces."""
        return sum(r.ref.size for r in self.reads)

    def distinct(self) -> list[ChunkRead]:
        """One read per distinct stored object (the first tensor using it): what verifying needs.

        Records are told apart by everything they promise about the object, not by the key
        alone: a damaged manifest may give one key two hashes, and each must be checked.
        Packed chunks of one object are one object (its whole raw size is what is checked).
        """
        seen: dict[tuple[str, str, int, int, str], ChunkRead] = {}
        for r in self.reads:
            seen.setdefault(object_identity(r.ref), r)
        return list(seen.values())

    def users(self) -> dict[tuple[str, str, int, int, str], list[str]]:
        """Tensor paths reading each distinct object (by :func:`object_identity`)."""
        out: dict[tuple[str, str, int, int, str], list[str]] = {}
        for r in self.reads:
            paths = out.setdefault(object_identity(r.ref), [])
            if not paths or paths[-1] != r.path:
                paths.append(r.path)
        return out

    def packed_objects(self) -> dict[tuple[str, str, int, int, str], list[ChunkRead]]:
        """The packed reads grouped by the object they slice: each object is decoded once."""
        out: dict[tuple[str, str, int, int, str], list[ChunkRead]] = {}
        for r in self.reads:
            if r.ref.packed:
                out.setdefault(object_identity(r.ref), []).append(r)
        return out


def object_identity(ref: ChunkRef) -> tuple[str, str, int, int, str]:
    """What a record promises about its stored object: key, hash, raw size, stored size, chain."""
    return (ref.key, ref.hash, ref.object_size, ref.stored, repr(ref.codec) if ref.codec else "")
