"""Records ckpt hands back to its callers: what a save committed, what its writer did.

Plain frozen dataclasses (copyable, picklable, ``dataclasses.asdict``-able) that import
nothing else of ckpt at run time, so any layer may return them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckpt.storage.manifest import Manifest


@dataclass(frozen=True)
class SaveStats:
    """What one save's writer did (a snapshot of ``ckpt.io.writer.WriteStats``)."""

    raw_bytes: int
    written_bytes: int
    reused_bytes: int
    objects_written: int
    #: objects written as XOR deltas against the parent checkpoint's chunk
    delta_objects: int
    #: parent chunks read back from the store to encode a delta against
    parent_reads: int
    #: large chunks whose encoding was chosen from samples
    probes: int
    #: tensor path -> whether a delta was kept for any of its chunks (paths where one was tried)
    delta_outcome: dict[str, bool]
    #: parent chunks read back and decoded whole, verified or refused (the rest of ``parent_reads``: probed
    #: from their first bytes only, or not readable)
    parent_decodes: int = 0
    #: bytes of parent objects read back: ranges for the probe, whole objects to decode
    parent_bytes_read: int = 0
    #: tensor path -> whether a delta of any of its chunks saved what ``ckpt.codecs.delta.MIN_GAIN``
    #: asks of the full encoding (paths tried); a Checkpointer stops trying the others for a while
    delta_paid: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a save committed or a restore read."""

    step: int
    url: str
    #: logical bytes of every tensor in the checkpoint
    raw_bytes: int
    #: bytes this save wrote: new objects + the manifest (for a restore: the checkpoint's figure)
    stored_bytes: int
    created: str = ""
    parent: int | None = None
    tensors: int = 0
    #: the committed manifest itself
    manifest: Manifest | None = field(default=None, repr=False, compare=False)
    #: for a save: what its writer did (objects written and reused, deltas)
    write_stats: SaveStats | None = field(default=None, repr=False, compare=False)
    #: for a ``restore(strict=False)``: live keys the checkpoint lacks (dotted, like
    #: ``load_state_dict``'s), and checkpoint tensors a live module lacks
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()

    def with_keys(self, *, missing: Iterable[str], unexpected: Iterable[str]) -> CheckpointInfo:
        return dataclasses.replace(self, missing_keys=tuple(missing), unexpected_keys=tuple(unexpected))

    @classmethod
    def from_manifest(cls, m: Manifest, url: str) -> CheckpointInfo:
        return cls(
            step=m.step,
            url=url,
            raw_bytes=m.raw_bytes,
            stored_bytes=m.stored_bytes,
            created=m.created,
            parent=m.parent,
            tensors=len(m.tensors),
            manifest=m,
        )
