"""Verification of stored checkpoints: every object read, decoded and hash-checked."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ckpt.codecs.base import CodecRegistry
from ckpt.errors import CheckpointError
from ckpt.io.plan import ChunkRead, ReadPlan, object_identity
from ckpt.io.reader import Reader, tensors_named
from ckpt.snapshot.executor import io_pool
from ckpt.storage.manifest import Manifest
from ckpt.storage.store import Store


@dataclass(frozen=True)
class Problem:
    """One bad object (or manifest) found by :func:`verify_manifest`."""

    step: int
    tensor: str
    key: str
    error: str

    def __str__(self) -> str:
        return f"step {self.step}: {self.error}"


def verify_manifest(
    store: Store,
    codecs: CodecRegistry,
    manifest: Manifest,
    *,
    progress: Callable[[int], None] | None = None,
) -> list[Problem]:
    """Read and verify every object of ``manifest``; return what is wrong (empty: sound).

    Each distinct object is checked once even when several tensors share it.
    ``progress`` is called with the raw bytes of each object checked.
    """
    plan = ReadPlan.whole(manifest)
    reads = plan.distinct()
    users = plan.users()
    reader = Reader(store, codecs)

    def check(r: ChunkRead) -> Problem | None:
        try:
            # the whole object, packed or not: every byte of it is checked
            obj = r.ref.object_ref()
            what = tensors_named(users.get(object_identity(r.ref), [r.path]))
            reader.read_object(obj, memoryview(bytearray(obj.size)), what=what)
        except CheckpointError as exc:
            return Problem(step=manifest.step, tensor=r.path, key=r.ref.key, error=str(exc))
        finally:
            if progress is not None:
                progress(r.ref.object_size)
        return None

    with io_pool("ckpt-verify") as pool:
        return [p for p in pool.map(check, reads) if p is not None]
