"""Export a checkpoint to a file, import a file or DCP directory as a checkpoint.

Names a PyTorch user recognises
    A tensor at ckpt path ``model/0.weight`` is exported as ``model.0.weight``: the path's
    components (JSON-pointer unescaped) joined with ``.``, so the top-level state key comes
    first and a module's own state-dict keys follow. Optimizer state reads
    ``optim.state.0.exp_avg``. With ``key="model"`` only that sub-tree is exported and the
    prefix is dropped (``0.weight``): ``model.load_state_dict(load_file(out))`` then works.

safetensors export (streaming, lossless)
    The header is computed from the manifest alone, then every chunk is decoded, verified
    and written in order; at most a few chunks are in memory at once, whatever the size of
    the checkpoint. Non-tensor values go into the header's ``__metadata__`` as one JSON
    string under ``"ckpt"`` (schema: ``{"step", "key", "tree", "adapters", "tensors":
    {name: ckpt path}}``), so an import of the file rebuilds the checkpoint exactly.

torch export (one copy of the tensors in memory)
    A nested ``dict`` (``{"model": state_dict, "optim": optimizer state_dict, ...}``) that
    ``torch.load(out, weights_only=True)`` reads and ``load_state_dict`` takes directly.
    ``torch.save`` needs every tensor at once, so the tensors of the checkpoint (its raw
    size) are held in memory while the file is written. NumPy arrays are written as
    tensors (weights-only loading refuses NumPy objects).

import
    A torch.save file (``torch.load(weights_only=True)``, memory-mapped: never unpickles
    arbitrary objects), a ``.safetensors`` file (read tensor by tensor) or a
    torch.distributed.checkpoint directory (read with DCP's own ``FileSystemReader``, in
    batches, non-tensor entries with ``weights_only=True``). Tensors stream into the store
    through the normal commit path with a bounded number of bytes in flight.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckpt.api import save_tree
from ckpt.distributed.sharding import rank_view
from ckpt.errors import CheckpointError, NoCheckpointError
from ckpt.hooks.manager import Plugins, get_plugins
from ckpt.interop.dcp import DCPSource
from ckpt.interop.names import IMPORT_WINDOW_BYTES, Progress, flat_name
from ckpt.interop.safetensors import SafetensorsSource, write_safetensors
from ckpt.interop.source import Source
from ckpt.interop.torch_save import TorchSource, write_torch
from ckpt.security.envelope import open_store
from ckpt.security.keys import Encryption
from ckpt.state import tree as treemod
from ckpt.storage.commit import load_manifest
from ckpt.storage.manifest import Manifest, TensorEntry, check_step
from ckpt.storage.store import Store

FORMATS = ("safetensors", "torch")
_SUFFIXES = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch", ".ckpt": "torch"}


@dataclass(frozen=True)
class ExportResult:
    url: str
    step: int
    out: str
    format: str
    tensors: int
    #: logical bytes of the tensors exported
    raw_bytes: int
    #: size of the written file
    file_bytes: int


@dataclass(frozen=True)
class ImportResult:
    src: str
    kind: str  # "torch" | "safetensors" | "dcp"
    url: str
    step: int
    tensors: int
    raw_bytes: int
    stored_bytes: int


# -- export ------------------------------------------------------------------------------


def format_for(out: str | os.PathLike, fmt: str | None) -> str:
    """The export format: ``fmt`` when given, else from the suffix of ``out``."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise CheckpointError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(out).suffix.lower()
    if suffix not in _SUFFIXES:
        raise CheckpointError(
            f"cannot tell the format of {os.fspath(out)!r} from its suffix; use .safetensors, .pt, .pth or .bin, "
            "or pass --format safetensors|torch"
        )
    return _SUFFIXES[suffix]


def _select(manifest: Manifest, key: str | None, url: str) -> tuple[Any, str]:
    """The encoded (sub-)tree to export and its escaped path prefix."""
    tree = manifest.tree
    if key is None:
        return tree, ""
    if not isinstance(tree, dict) or key not in tree:
        held = ", ".join(map(repr, tree)) if isinstance(tree, dict) else "nothing"
        raise NoCheckpointError(f"checkpoint step {manifest.step} of {url} has no key {key!r}; it holds {held}")
    return tree[key], treemod.escape(key)


def _names(manifest: Manifest, subtree: Any, prefix: str) -> list[tuple[str, str, TensorEntry]]:
    """(exported name, ckpt path, entry) of every tensor of ``subtree``, in tree order."""
    out: list[tuple[str, str, TensorEntry]] = []
    seen: dict[str, str] = {}
    for path in treemod.tensor_paths(subtree):
        entry = manifest.tensors.get(path)
        if entry is None:
            raise CheckpointError(f"manifest of step {manifest.step} references tensor {path!r} it does not list")
        name = flat_name(path, prefix)
        if name in seen or name == "__metadata__":
            raise CheckpointError(
                f"tensors {seen.get(name, name)!r} and {path!r} both flatten to the name {name!r}; "
                "export a sub-tree with --key to tell them apart"
            )
        seen[name] = path
        out.append((name, path, entry))
    return out


def _atomic_output(out: str) -> str:
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CheckpointError(f"cannot write {out}: directory {parent} does not exist")
    return f"{out}.tmp-{uuid.uuid4().hex[:8]}"


def export_checkpoint(
    url: str,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    fmt: str | None = None,
    key: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    encryption: Encryption | None = None,
) -> ExportResult:
    """Write checkpoint ``step`` (newest when None) of ``url`` to the file ``out``
    (``encryption``: the key of an encrypted store; the file written is plain)."""
    out = os.fspath(out)
    fmt = format_for(out, fmt)
    plugins = get_plugins()
    store = Store(url, storage_options)
    open_store(store, encryption)
    # a collective save's checkpoint: full tensors (shards put together), rank 0's per-rank values
    manifest = rank_view(load_manifest(store, step), 0, warn=False)
    subtree, prefix = _select(manifest, key, store.url)
    names = _names(manifest, subtree, prefix)
    total = sum(e.nbytes for _, _, e in names)
    tmp = _atomic_output(out)
    try:
        if fmt == "safetensors":
            write_safetensors(store, plugins.codecs, manifest, subtree, key, names, tmp, total, progress)
        else:
            write_torch(store, plugins.codecs, manifest, subtree, names, tmp, total, progress)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ExportResult(
        url=store.url,
        step=manifest.step,
        out=out,
        format=fmt,
        tensors=len(names),
        raw_bytes=total,
        file_bytes=os.path.getsize(out),
    )


# -- import ------------------------------------------------------------------------------


def detect_source(src: str | os.PathLike) -> str:
    """``"dcp"``, ``"safetensors"`` or ``"torch"`` for ``src``, from its content."""
    p = Path(src)
    if p.is_dir():
        if (p / ".metadata").is_file():
            return "dcp"
        raise CheckpointError(f"{p} is a directory but not a torch.distributed.checkpoint one (no .metadata file)")
    if not p.is_file():
        raise NoCheckpointError(f"{p} does not exist")
    with open(p, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"  # zip (torch.save since 1.6) or a legacy pickle stream
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(f"{p} is neither a torch.save file, a .safetensors file nor a DCP directory")


def import_checkpoint(
    src: str | os.PathLike,
    url: str,
    *,
    step: int,
    adapters: Mapping[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    encryption: Encryption | None = None,
) -> ImportResult:
    """Store the state in ``src`` as checkpoint ``step`` of ``url`` (``encryption``: as ``ckpt.save``).

    ``adapters`` maps top-level keys to adapter names (``{"model": "torch.nn.Module"}``)
    so ``ckpt.restore`` can load the imported state into live objects of that kind.
    """
    check_step(step)
    src = os.fspath(src)
    kind = detect_source(src)
    plugins = get_plugins()
    store = Store(url, storage_options)
    open_store(store, encryption, create=True)
    if kind == "torch":
        source: Source = TorchSource(src)
    elif kind == "safetensors":
        source = SafetensorsSource(src)
    else:
        source = DCPSource(src)
    with source:
        json_tree, sizes, saved_adapters, meta = source.plan()
        chosen = dict(saved_adapters)
        for key, name in (adapters or {}).items():
            if not isinstance(json_tree, dict) or key not in json_tree:
                raise CheckpointError(f"--adapter {key}={name}: {src} has no top-level key {key!r}")
            if plugins.adapters.get(name) is None:
                known = ", ".join(a.name for a in plugins.adapters)
                raise CheckpointError(f"--adapter {key}={name}: no adapter named {name!r}; loaded: {known}")
            chosen[treemod.escape(key)] = name
        info = _commit(
            store,
            plugins,
            step,
            json_tree,
            sizes,
            chosen,
            {**meta, "imported_from": {"kind": kind, "src": os.path.abspath(src)}},
            source.tensors(),
            progress,
        )
    return ImportResult(
        src=src,
        kind=kind,
        url=store.url,
        step=step,
        tensors=len(sizes),
        raw_bytes=info.raw_bytes,
        stored_bytes=info.stored_bytes,
    )


def _commit(
    store: Store,
    plugins: Plugins,
    step: int,
    json_tree: Any,
    sizes: Mapping[str, int],
    adapters: Mapping[str, str],
    meta: Mapping[str, Any],
    tensors: Iterator[tuple[str, torch.Tensor]],
    progress: Progress | None,
) -> Any:
    """The normal commit path (``write_checkpoint``), fed lazily with a bounded window."""
    missing = set(treemod.tensor_paths(json_tree)) - set(sizes)
    if missing:
        raise CheckpointError(f"source has no tensor for {sorted(missing)[:3]}")
    total = sum(sizes.values())
    budget = threading.Condition()
    in_flight = [0]

    def written(path: str) -> None:
        with budget:
            in_flight[0] -= sizes[path]
            budget.notify_all()
        if progress is not None:
            progress(sizes[path], total)

    def windowed() -> Iterator[tuple[str, torch.Tensor]]:
        for path, tensor in tensors:
            n = sizes[path]
            with budget:
                # mypy cannot type a lambda whose parameter binds the loop variable
                budget.wait_for(lambda n=n: in_flight[0] == 0 or in_flight[0] + n <= IMPORT_WINDOW_BYTES)  # type: ignore[misc]
                in_flight[0] += n
            yield path, tensor

    placeholder = treemod.decode(json_tree, lambda p, _np: torch.empty(0, device="meta"))
    plugins.before_save(url=store.url, step=step, tree=placeholder)
    return save_tree(
        store,
        plugins,
        step=step,
        json_tree=json_tree,
        adapters=adapters,
        tensors=windowed(),
        what="ckpt import",
        meta=meta,
        on_tensor_written=written,
    )
