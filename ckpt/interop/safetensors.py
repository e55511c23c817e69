"""safetensors: a streaming, lossless export and an import of any .safetensors file.

The header is computed from the manifest alone, then every chunk is decoded, verified
and written in order; at most a few chunks are in memory at once, whatever the size of
the checkpoint. Non-tensor values go into the header's ``__metadata__`` as one JSON
string under ``"ckpt"`` (schema: ``{"step", "key", "tree", "adapters", "tensors":
{name: ckpt path}}``), so an import of the file rebuilds the checkpoint exactly.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ckpt.codecs.base import CodecRegistry
from ckpt.errors import CheckpointError, CorruptCheckpointError, UnsupportedValueError
from ckpt.interop.names import SAFETENSORS_DTYPES, ST_TO_TORCH, Progress, numel
from ckpt.interop.source import Source
from ckpt.io.plan import ReadPlan
from ckpt.io.reader import iter_chunks
from ckpt.state import tree as treemod
from ckpt.storage.manifest import DTYPE_ITEMSIZE, Manifest, TensorEntry
from ckpt.storage.store import Store


def write_safetensors(
    store: Store,
    codecs: CodecRegistry,
    manifest: Manifest,
    subtree: Any,
    key: str | None,
    names: list[tuple[str, str, TensorEntry]],
    tmp: str,
    total: int,
    progress: Progress | None,
) -> None:
    ckpt_meta = {
        "step": manifest.step,
        "key": key,
        "tree": subtree,
        "adapters": {
            p: a
            for p, a in manifest.adapters.items()
            if not key or p == treemod.escape(key) or p.startswith(treemod.escape(key) + "/")
        },
        "tensors": {name: path for name, path, _ in names},
    }
    metadata = {"format": "pt", "ckpt": json.dumps(ckpt_meta, separators=(",", ":"), allow_nan=False)}
    foreign = manifest.meta.get("safetensors_metadata") if key is None else None
    if isinstance(foreign, Mapping):  # a file imported from elsewhere keeps its own metadata
        metadata = {**{str(k): str(v) for k, v in foreign.items()}, **metadata}
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, path, entry in names:
        code = SAFETENSORS_DTYPES.get(entry.dtype)
        if code is None:
            raise UnsupportedValueError(
                f"tensor {path!r}: dtype {entry.dtype} has no safetensors equivalent; export with --format torch"
            )
        # a header whose shape disagrees with the bytes that follow is a broken file: never write one
        if entry.nbytes != numel(list(entry.shape)) * DTYPE_ITEMSIZE[entry.dtype]:
            raise CorruptCheckpointError(
                f"tensor {path!r} of step {manifest.step}: shape {list(entry.shape)} of {entry.dtype} "
                f"is not {entry.nbytes} bytes"
            )
        header[name] = {"dtype": code, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # data starts 8-byte aligned, as safetensors itself writes
    plan = ReadPlan.for_paths(manifest, [path for _, path, _ in names])
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(body)))
        f.write(body)
        written = 0
        for raw in iter_chunks(store, codecs, plan):
            f.write(raw)
            written += len(raw)
            if progress is not None:
                progress(len(raw), total)
        if written != offset:
            raise CorruptCheckpointError(
                f"step {manifest.step}: wrote {written} tensor bytes, the header says {offset}"
            )
        f.flush()
        os.fsync(f.fileno())


class SafetensorsSource(Source):
    def __init__(self, src: str) -> None:
        try:
            from safetensors import safe_open
        except ImportError:
            raise CheckpointError(f"{src}: install safetensors to import .safetensors files") from None

        self.src = src
        try:
            self._file: Any = safe_open(src, framework="pt", device="cpu")  # None once closed
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError for a bad header
            raise CheckpointError(f"{src} is not a readable safetensors file: {exc}") from None
        self._names: dict[str, str] = {}  # ckpt path -> name in the file

    def __exit__(self, *exc: object) -> None:
        self._file = None

    def plan(self) -> tuple[Any, dict[str, int], dict[str, str], dict[str, Any]]:
        f = self._file
        metadata = dict(f.metadata() or {})
        sizes: dict[str, int] = {}
        shapes: dict[str, tuple[str, list[int]]] = {}
        for name in f.keys():  # noqa: SIM118 - a safe_open handle, not a dict
            sl = f.get_slice(name)
            dtype = ST_TO_TORCH.get(sl.get_dtype(), sl.get_dtype().lower())
            shapes[name] = (dtype, list(sl.get_shape()))
        raw = metadata.pop("ckpt", None)
        if raw is not None:  # written by ckpt export: rebuild the checkpoint exactly
            try:
                doc = json.loads(raw)
                tree, names, key = doc["tree"], dict(doc["tensors"]), doc.get("key")
                adapters = dict(doc.get("adapters") or {})
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                raise CheckpointError(f"{self.src}: unreadable 'ckpt' metadata ({str(exc)[:200]})") from None
            if key is not None:
                tree = {key: tree}
            for name, path in names.items():
                if name not in shapes:
                    raise CheckpointError(f"{self.src}: metadata names tensor {name!r} that the file does not hold")
                self._names[path] = name
            meta: dict[str, Any] = {}
            metadata.pop("format", None)
            if metadata:
                meta["safetensors_metadata"] = metadata
        else:  # a foreign file: a flat mapping of its names
            tree = {name: {"$tensor": treemod.escape(name)} for name in shapes}
            self._names = {treemod.escape(name): name for name in shapes}
            adapters = {}
            meta = {"safetensors_metadata": metadata} if metadata else {}
        for path, name in self._names.items():
            dtype, shape = shapes[name]
            sizes[path] = treemod.dtype_from_name(dtype, what=f"tensor {name!r}").itemsize * numel(shape)
        return tree, sizes, adapters, meta

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for path, name in self._names.items():
            yield path, self._file.get_tensor(name)
