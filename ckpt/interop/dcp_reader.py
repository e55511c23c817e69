"""``ckpt.dcp.StorageReader``: DCP's storage reader protocol over a ckpt store.

``read_metadata`` rebuilds DCP's ``Metadata`` from the validated manifest (a stored shard box
is a ``ChunkStorageMetadata``; a plain entry one box covering the tensor; the keys and tree
places from ``meta["dcp"]``, or derived from the tree for stores ckpt.save wrote, of which a
collective save is read as this rank's view). ``read_data`` reads for each ``ReadItem`` only
the objects overlapping its box (:func:`ckpt.io.region.read_box`), decoded and verified, into
the destination; bytes items come from the tree's plain values, serialized for DCP's
``load_bytes`` here, so a store never feeds a pickle of its own to DCP's unpickler. See
:mod:`ckpt.interop.dcp_storage` for the writer and the layout.
"""

from __future__ import annotations

import dataclasses
import io
import os
import traceback
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import StorageReader as _DCPReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from ckpt.errors import CheckpointError, CorruptCheckpointError
from ckpt.hooks.manager import get_plugins
from ckpt.interop.dcp_storage import Item, dcp_items, no_tensor, subtree
from ckpt.io.memory import sharing_memory
from ckpt.io.reader import Reader
from ckpt.io.region import pieces, read_box
from ckpt.io.writer import dtype_name
from ckpt.security.envelope import open_store
from ckpt.security.keys import Encryption
from ckpt.snapshot.executor import io_pool, wait_all
from ckpt.state import tree as treemod
from ckpt.storage.commit import load_manifest
from ckpt.storage.manifest import Manifest, TensorEntry, check_step
from ckpt.storage.store import Store


class StorageReader(_DCPReader):
    """DCP's storage reader protocol over a ckpt store (see the module docstring).

    :param url: the store; ``checkpoint_id`` of ``dcp.load`` replaces it when given.
    :param step: the checkpoint to read (None: the latest; every rank must then read the same,
        which :meth:`prepare_global_plan` checks).
    :param encryption: the key of an encrypted store (``ckpt.Encryption``).
    """

    def __init__(
        self,
        url: str,
        step: int | None = None,
        storage_options: dict[str, Any] | None = None,
        *,
        encryption: Encryption | None = None,
    ) -> None:
        super().__init__()
        self.url = str(url)
        self.encryption = encryption
        self.step = None if step is None else check_step(step)
        self.storage_options = storage_options
        self.manifest: Manifest | None = None
        self._items: dict[str, Item] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.url = os.fspath(checkpoint_id)
        self.manifest = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP then never asks for rank-local metadata
        try:
            return self._read_metadata()
        except CheckpointError as exc:
            # DCP would turn an Exception here into "metadata is None" and drop it; its own
            # exception type passes through to the caller, with ours in its failures
            from torch.distributed.checkpoint.api import CheckpointException

            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            trace = traceback.extract_tb(exc.__traceback__)
            raise CheckpointException(f"ckpt.dcp.StorageReader: {exc}", {rank: (exc, trace)}) from exc

    def _read_metadata(self) -> Metadata:
        store = Store(self.url, self.storage_options)
        open_store(store, self.encryption)
        manifest = load_manifest(store, self.step)
        if manifest.world_size:  # a collective ckpt.save: this rank's per-rank values
            from ckpt.distributed.sharding import rank_view

            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            manifest = rank_view(manifest, rank)
        self.manifest = manifest
        self._items = dcp_items(manifest)
        sd_meta: dict[str, Any] = {}
        planner_data: dict[str, tuple[str | int, ...]] = {}
        for fqn, (_kind, comps, path) in self._items.items():
            if path is not None:
                entry = manifest.tensors[path]
                chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s, _ in pieces(entry)]
                dtype = treemod.dtype_from_name(entry.dtype, what=f"tensor {path!r}")
                sd_meta[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(entry.shape), chunks)
            else:
                sd_meta[fqn] = BytesStorageMetadata()
            planner_data[fqn] = tuple(comps)
        return Metadata(state_dict_metadata=sd_meta, planner_data=planner_data)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        m = self._manifest()
        return dataclasses.replace(plan, storage_data={"ckpt_step": m.step, "ckpt_created": m.created})

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        read = {repr(p.storage_data) for p in plans}
        if len(read) > 1:
            raise CheckpointError(
                f"{self.url}: ranks read different checkpoints ({', '.join(sorted(read))}): a save committed "
                "while they loaded; pass step= to StorageReader"
            )
        return plans

    def _manifest(self) -> Manifest:
        if self.manifest is None:
            raise CheckpointError("StorageReader: read_metadata() must run first")
        return self.manifest

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        manifest = self._manifest()
        store = Store(self.url, self.storage_options)
        open_store(store, self.encryption)
        where = f"step {manifest.step} of {store.url}"
        reads = []
        for item in plan.items:
            fqn = item.storage_index.fqn
            kind, comps, path = self._items.get(fqn, ("", [], None))
            if item.type == LoadItemType.BYTE_IO:
                if kind != "bytes":
                    raise CorruptCheckpointError(f"{where}: holds no value {fqn!r}")
                value = treemod.decode(subtree(manifest.tree, comps, where), no_tensor)
                buf = io.BytesIO()
                torch.save(value, buf)  # a plain value decoded from JSON: DCP unpickles only this
                buf.seek(0)
                planner.load_bytes(item, buf)
                continue
            if path is None:
                raise CorruptCheckpointError(f"{where}: holds no tensor {fqn!r}")
            entry = manifest.tensors[path]
            box = tuple(item.storage_index.offset or ())
            offsets = tuple(int(b) + int(o) for b, o in zip(box, item.storage_offsets))
            target = planner.resolve_tensor(item).detach()
            if tuple(target.shape) != tuple(item.lengths) or len(offsets) != len(entry.shape):
                raise CheckpointError(
                    f"{where}: DCP asks for a box {list(item.lengths)} of tensor {fqn!r} into {list(target.shape)}"
                )
            reads.append((item, path, entry, offsets, target))
        codecs = get_plugins().codecs
        reader = Reader(store, codecs)
        # Targets sharing memory (tied weights) are read apart and copied one after the other
        # (the last item's wins, as DCP's own reader leaves them): items read in parallel
        # straight into one memory would mix, and one's hash would check the other's bytes.
        shared = {i for group in sharing_memory(enumerate(t for *_, t in reads)) for _, _, i in group}
        late: list[tuple[torch.Tensor, Any]] = []
        with io_pool("ckpt-read") as chunk_pool, io_pool("ckpt-read-items", workers=4) as item_pool:

            def one(path: str, entry: TensorEntry, offsets: tuple[int, ...], target: torch.Tensor) -> torch.Tensor:
                direct = target.device.type == "cpu" and dtype_name(target) == entry.dtype
                out = read_box(
                    reader, entry, path, offsets, tuple(target.shape), pool=chunk_pool, out=target if direct else None
                )
                if not direct:
                    with torch.no_grad():
                        target.copy_(out)
                return target

            def apart(path: str, entry: TensorEntry, offsets: tuple[int, ...], target: torch.Tensor) -> torch.Tensor:
                return read_box(reader, entry, path, offsets, tuple(target.shape), pool=chunk_pool)

            futures = []
            for i, (_, path, entry, offsets, target) in enumerate(reads):
                fut = item_pool.submit(apart if i in shared else one, path, entry, offsets, target)
                if i in shared:
                    late.append((target, fut))
                futures.append(fut)
            wait_all(futures)
        with torch.no_grad():
            for target, fut in late:
                target.copy_(fut.result())
        for item, *_, target in reads:
            planner.commit_tensor(item, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done
