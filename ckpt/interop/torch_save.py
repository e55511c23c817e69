"""torch.save files: an export ``torch.load(weights_only=True)`` reads, and a safe import.

Export writes a nested ``dict`` (``{"model": state_dict, "optim": optimizer state_dict,
...}``) that ``load_state_dict`` takes directly. ``torch.save`` needs every tensor at
once, so the tensors of the checkpoint (its raw size) are held in memory while the file
is written. NumPy arrays are written as tensors (weights-only loading refuses NumPy
objects). Import memory-maps the file and never unpickles arbitrary objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ckpt.codecs.base import CodecRegistry
from ckpt.errors import CheckpointError
from ckpt.interop.names import Progress, encode_state, first_line
from ckpt.interop.source import Source
from ckpt.io.plan import ReadPlan
from ckpt.io.reader import read_tensors
from ckpt.state import tree as treemod
from ckpt.storage.manifest import Manifest, TensorEntry
from ckpt.storage.store import Store


def write_torch(
    store: Store,
    codecs: CodecRegistry,
    manifest: Manifest,
    subtree: Any,
    names: list[tuple[str, str, TensorEntry]],
    tmp: str,
    total: int,
    progress: Progress | None,
) -> None:
    plan = ReadPlan.for_paths(manifest, [p for _, p, _ in names])
    tick = (lambda n: progress(n, total)) if progress is not None else None
    tensors = read_tensors(store, codecs, plan, progress=tick)
    # NumPy leaves come back as tensors: weights_only loading refuses NumPy objects.
    state = treemod.decode(subtree, lambda p, _is_np: tensors[p])
    torch.save(state, tmp)


class TorchSource(Source):
    def __init__(self, src: str) -> None:
        import pickle

        with open(src, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        try:
            # mmap: tensors stay in the page cache, not a second copy in process memory
            obj = torch.load(src, map_location="cpu", weights_only=True, mmap=zipped)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{src}: torch.load(weights_only=True) refused it ({first_line(exc)}); ckpt never unpickles arbitrary "
                "objects. Re-save it holding only tensors, containers and plain values"
            ) from None
        self.tree, self._tensors = encode_state(obj, src)

    def plan(self) -> tuple[Any, dict[str, int], dict[str, str], dict[str, Any]]:
        return self.tree, {p: t.nbytes for p, t in self._tensors.items()}, {}, {}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self._tensors.items()
