"""Verification of stored checkpoints: every object read, decoded and hash-checked."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from ckpt import config
from ckpt.errors import CheckpointError
from ckpt.manifest import ChunkRef, Manifest
from ckpt.pipeline import Reader
from ckpt.plugins import Plugins
from ckpt.store import Store


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
    plugins: Plugins,
    manifest: Manifest,
    *,
    progress: Callable[[int], None] | None = None,
) -> list[Problem]:
    """Read and verify every object of ``manifest``; return what is wrong (empty: sound).

    Each distinct object is checked once even when several tensors share it.
    ``progress`` is called with the raw bytes of each object checked.
    """
    seen: dict[str, tuple[str, ChunkRef]] = {}
    for path, entry in manifest.tensors.items():
        for ref in entry.chunks:
            seen.setdefault(ref.key, (path, ref))
    problems: list[Problem] = []
    with ThreadPoolExecutor(config.io_threads(), thread_name_prefix="ckpt-verify") as pool:
        reader = Reader(store, plugins.codecs, pool)

        def check(path: str, ref: ChunkRef) -> Problem | None:
            try:
                reader.read_chunk(ref, memoryview(bytearray(ref.size)), what=f"tensor {path!r}")
            except CheckpointError as exc:
                return Problem(step=manifest.step, tensor=path, key=ref.key, error=str(exc))
            finally:
                if progress is not None:
                    progress(ref.size)
            return None

        for result in pool.map(lambda item: check(*item), seen.values()):
            if result is not None:
                problems.append(result)
    return problems
