"""torch.distributed.checkpoint directories: imported with DCP's own reader, batch by batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import torch

from ckpt.errors import CheckpointError
from ckpt.interop.names import IMPORT_WINDOW_BYTES, encode_state, first_line, numel
from ckpt.interop.source import Source


class DCPSource(Source):
    """A torch.distributed.checkpoint directory, read with DCP's own reader, batch by batch."""

    def __init__(self, src: str) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.src = src
        self._reader_cls = FileSystemReader
        try:
            self.metadata = FileSystemReader(src).read_metadata()
        except Exception as exc:  # noqa: BLE001 - DCP raises many types for a bad directory
            raise CheckpointError(f"{src}: cannot read DCP metadata: {exc}") from None
        self._fqn_of: dict[str, str] = {}  # ckpt path -> DCP fqn
        self._obj_path: dict[str, tuple] = {}  # fqn -> DCP object path

    def _load(self, fqns: set[str]) -> dict[str, Any]:
        """Load ``fqns`` with DCP's planner, non-tensor entries with weights_only=True."""
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        src = self.src
        refused: list[CheckpointError] = []

        class SafePlanner(_EmptyStateDictLoadPlanner):
            # DCP's default unpickles non-tensor entries with weights_only=False: never that.
            def load_bytes(self, read_item: Any, value: Any) -> None:
                import pickle

                from torch.distributed.checkpoint._traverse import set_element

                fqn = read_item.dest_index.fqn
                try:
                    obj = torch.load(value, weights_only=True)
                except pickle.UnpicklingError as exc:
                    refused.append(
                        CheckpointError(f"{src}: entry {fqn!r} is not weights-only data ({first_line(exc)})")
                    )
                    raise refused[-1] from None
                if self.flatten_state_dict:
                    set_element(self.original_state_dict, self.mappings[fqn], obj)
                else:
                    self.state_dict[fqn] = obj

        from torch.distributed.checkpoint.api import CheckpointException

        sd: dict[str, Any] = {}
        try:
            _load_state_dict(sd, storage_reader=self._reader_cls(src), planner=SafePlanner(keys=fqns), no_dist=True)
        except (Exception, CheckpointException) as exc:  # DCP wraps failures in a BaseException subclass
            if refused:
                raise refused[0] from None
            raise CheckpointError(f"{src}: reading the DCP checkpoint failed: {first_line(exc)}") from exc
        return sd

    def plan(self) -> tuple[Any, dict[str, int], dict[str, str], dict[str, Any]]:
        from torch.distributed.checkpoint._traverse import get_element, set_element
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        md = self.metadata
        planner_data = md.planner_data or {}
        skeleton: dict[str, Any] = {}
        byte_fqns: set[str] = set()
        placeholders: dict[int, str] = {}
        for fqn, item in md.state_dict_metadata.items():
            path = tuple(planner_data.get(fqn, (fqn,)))
            self._obj_path[fqn] = path
            if isinstance(item, TensorStorageMetadata):
                # a placeholder with the shape and dtype and one element of memory (zero
                # strides): the tree and sizes come from it, the data from DCP's reader later
                t = torch.zeros((), dtype=item.properties.dtype).expand(tuple(item.size))
                placeholders[id(t)] = fqn
                set_element(skeleton, path, t)
            else:
                byte_fqns.add(fqn)
                set_element(skeleton, path, None)
        if byte_fqns:
            values = self._load(byte_fqns)
            for fqn in byte_fqns:
                set_element(skeleton, self._obj_path[fqn], get_element(values, self._obj_path[fqn]))
        tree, tensors = encode_state(skeleton, self.src)
        self._fqn_of = {path: placeholders[id(t)] for path, t in tensors.items()}
        sizes = {path: t.nbytes for path, t in tensors.items()}
        return tree, sizes, {}, {}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from torch.distributed.checkpoint._traverse import get_element
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        def nbytes(fqn: str) -> int:
            item = self.metadata.state_dict_metadata[fqn]
            assert isinstance(item, TensorStorageMetadata)
            return numel(list(item.size)) * item.properties.dtype.itemsize

        batch: list[tuple[str, str]] = []
        size = 0
        items = list(self._fqn_of.items())
        for i, (path, fqn) in enumerate(items):
            batch.append((path, fqn))
            size += nbytes(fqn)
            if size >= IMPORT_WINDOW_BYTES // 2 or i == len(items) - 1:
                loaded = self._load({f for _, f in batch})
                for p, f in batch:
                    yield p, cast(torch.Tensor, get_element(loaded, self._obj_path[f]))  # loaded by its own plan
                batch, size = [], 0
