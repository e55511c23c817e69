"""Interop: export a checkpoint as a safetensors or torch.save file; import those and DCP directories.

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

import json
import os
import struct
import threading
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from ckpt import config, tree as treemod
from ckpt.errors import CheckpointError, NoCheckpointError, UnsupportedValueError
from ckpt.manifest import ChunkRef, Manifest, TensorEntry
from ckpt.pipeline import Reader, empty_like_entry
from ckpt.plugins import Plugins, get_plugins
from ckpt.store import Store

#: ``progress(advance, total)``: ``advance`` bytes just done out of ``total`` bytes of work
Progress = Callable[[int, int], None]

FORMATS = ("safetensors", "torch")
_SUFFIXES = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch", ".ckpt": "torch"}

#: torch dtype name -> safetensors dtype code
SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ", "complex64": "C64",
}  # fmt: skip
_ST_TO_TORCH = {v: k for k, v in SAFETENSORS_DTYPES.items()}

#: bytes of tensors an import hands to the writer before waiting for earlier ones to be stored
IMPORT_WINDOW_BYTES = 256 * 1024 * 1024


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


# -- names -------------------------------------------------------------------------------


def unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


def flat_name(path: str, prefix: str = "") -> str:
    """``model/0.weight`` -> ``model.0.weight`` (``prefix`` = an escaped sub-tree path to drop)."""
    if prefix:
        path = path[len(prefix) + 1 :]
    return ".".join(unescape(p) for p in path.split("/"))


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


# -- reading chunks in order, a bounded window at a time --------------------------------


def iter_raw_chunks(
    store: Store, plugins: Plugins, items: list[tuple[str, ChunkRef]], *, window: int | None = None
) -> Iterator[bytearray]:
    """Decoded, verified raw bytes of each ``(tensor path, chunk)`` in order.

    Up to ``window`` chunks are fetched and decoded in parallel ahead of the consumer.
    """
    workers = config.io_threads()
    window = window or workers + 2
    with ThreadPoolExecutor(workers, thread_name_prefix="ckpt-export") as pool:
        reader = Reader(store, plugins.codecs, pool)

        def job(path: str, ref: ChunkRef) -> bytearray:
            buf = bytearray(ref.size)
            reader.read_chunk(ref, memoryview(buf), what=f"tensor {path!r}")
            return buf

        pending: deque[Future[bytearray]] = deque()
        try:
            for path, ref in items:
                pending.append(pool.submit(job, path, ref))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def _atomic_output(out: str) -> str:
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CheckpointError(f"cannot write {out}: directory {parent} does not exist")
    return f"{out}.tmp-{uuid.uuid4().hex[:8]}"


# -- export ------------------------------------------------------------------------------


def export_checkpoint(
    url: str,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    fmt: str | None = None,
    key: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Write checkpoint ``step`` (newest when None) of ``url`` to the file ``out``."""
    from ckpt.api import load_manifest

    out = os.fspath(out)
    fmt = format_for(out, fmt)
    plugins = get_plugins()
    store = Store(url, storage_options)
    manifest = load_manifest(store, step)
    subtree, prefix = _select(manifest, key, store.url)
    names = _names(manifest, subtree, prefix)
    total = sum(e.nbytes for _, _, e in names)
    tmp = _atomic_output(out)
    try:
        if fmt == "safetensors":
            _write_safetensors(store, plugins, manifest, subtree, key, names, tmp, total, progress)
        else:
            _write_torch(store, plugins, manifest, subtree, names, tmp, total, progress)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ExportResult(
        url=store.url, step=manifest.step, out=out, format=fmt, tensors=len(names), raw_bytes=total,
        file_bytes=os.path.getsize(out),
    )  # fmt: skip


def _write_safetensors(
    store: Store,
    plugins: Plugins,
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
        "adapters": {p: a for p, a in manifest.adapters.items() if not key or p == treemod.escape(key) or
                     p.startswith(treemod.escape(key) + "/")},
        "tensors": {name: path for name, path, _ in names},
    }  # fmt: skip
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
        header[name] = {"dtype": code, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # data starts 8-byte aligned, as safetensors itself writes
    chunks = [(path, ref) for _, path, entry in names for ref in entry.chunks]
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(body)))
        f.write(body)
        for raw in iter_raw_chunks(store, plugins, chunks):
            f.write(raw)
            if progress is not None:
                progress(len(raw), total)
        f.flush()
        os.fsync(f.fileno())


def read_tensors(
    store: Store,
    plugins: Plugins,
    manifest: Manifest,
    paths: list[str],
    progress: Progress | None = None,
    total: int | None = None,
) -> dict[str, torch.Tensor]:
    """Fresh CPU tensors for ``paths`` of ``manifest``, decoded in parallel and verified."""
    from ckpt.pipeline import wait_all

    out: dict[str, torch.Tensor] = {}
    total = total if total is not None else sum(manifest.tensors[p].nbytes for p in paths)
    with ThreadPoolExecutor(config.io_threads(), thread_name_prefix="ckpt-read") as pool:
        reader = Reader(store, plugins.codecs, pool)
        futures: list[Future[None]] = []
        try:
            for path in paths:
                entry = manifest.tensors[path]
                out[path] = dest = empty_like_entry(entry, path)
                futs = reader.submit(path, entry, dest)
                if progress is not None:
                    for ref, fut in zip(entry.chunks, futs):
                        fut.add_done_callback(lambda _f, n=ref.size: progress(n, total))
                futures.extend(futs)
        finally:
            wait_all(futures)
    return out


def _write_torch(
    store: Store,
    plugins: Plugins,
    manifest: Manifest,
    subtree: Any,
    names: list[tuple[str, str, TensorEntry]],
    tmp: str,
    total: int,
    progress: Progress | None,
) -> None:
    tensors = read_tensors(store, plugins, manifest, [p for _, p, _ in names], progress, total)
    # NumPy leaves come back as tensors: weights_only loading refuses NumPy objects.
    state = treemod.decode(subtree, lambda p, _is_np: tensors[p])
    torch.save(state, tmp)


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
) -> ImportResult:
    """Store the state in ``src`` as checkpoint ``step`` of ``url``.

    ``adapters`` maps top-level keys to adapter names (``{"model": "torch.nn.Module"}``)
    so ``ckpt.restore`` can load the imported state into live objects of that kind.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step must be a non-negative int, got {step!r}")
    src = os.fspath(src)
    kind = detect_source(src)
    plugins = get_plugins()
    store = Store(url, storage_options)
    if kind == "torch":
        source = _TorchSource(src)
    elif kind == "safetensors":
        source = _SafetensorsSource(src)
    else:
        source = _DCPSource(src)
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
        info = _commit(store, plugins, step, json_tree, sizes, chosen, {**meta, "imported_from": {"kind": kind,
                       "src": os.path.abspath(src)}}, source.tensors(), progress)  # fmt: skip
    return ImportResult(
        src=src, kind=kind, url=store.url, step=step, tensors=len(sizes), raw_bytes=info.raw_bytes,
        stored_bytes=info.stored_bytes,
    )  # fmt: skip


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
    from ckpt.api import _parent_for_save, _pool, write_checkpoint

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
                budget.wait_for(lambda n=n: in_flight[0] == 0 or in_flight[0] + n <= IMPORT_WINDOW_BYTES)
                in_flight[0] += n
            yield path, tensor

    placeholder = treemod.decode(json_tree, lambda p, _np: torch.empty(0, device="meta"))
    plugins.before_save(url=store.url, step=step, tree=placeholder)
    parent = _parent_for_save(store, step)
    with _pool() as pool:
        return write_checkpoint(
            store, plugins, step=step, json_tree=json_tree, adapters=adapters, tensors=windowed(), parent=parent,
            pool=pool, meta=meta, on_tensor_written=written,
        )  # fmt: skip


class _Source:
    """A checkpoint file or directory to import: plan() first, then tensors() lazily."""

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def plan(self) -> tuple[Any, dict[str, int], dict[str, str], dict[str, Any]]:
        """(encoded tree, {path: nbytes}, adapters, manifest meta)."""
        raise NotImplementedError

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError


def _encode_state(obj: Any, src: str) -> tuple[Any, dict[str, torch.Tensor]]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{src} holds a {type(obj).__name__}, not a mapping of names to state; cannot import it")
    for k in obj:
        if not isinstance(k, str) or k.startswith("$"):
            raise UnsupportedValueError(f"{src}: top-level key {k!r} must be a string not starting with '$'")
    tensors: dict[str, torch.Tensor] = {}
    tree = treemod.encode(obj, tensors, set())
    return tree, tensors


class _TorchSource(_Source):
    def __init__(self, src: str) -> None:
        import pickle

        with open(src, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        try:
            # mmap: tensors stay in the page cache, not a second copy in process memory
            obj = torch.load(src, map_location="cpu", weights_only=True, mmap=zipped)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{src}: torch.load(weights_only=True) refused it ({_first_line(exc)}); ckpt never unpickles arbitrary "
                "objects. Re-save it holding only tensors, containers and plain values"
            ) from None
        self.tree, self._tensors = _encode_state(obj, src)

    def plan(self) -> tuple[Any, dict[str, int], dict[str, str], dict[str, Any]]:
        return self.tree, {p: t.nbytes for p, t in self._tensors.items()}, {}, {}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self._tensors.items()


class _SafetensorsSource(_Source):
    def __init__(self, src: str) -> None:
        try:
            from safetensors import safe_open
        except ImportError:
            raise CheckpointError(f"{src}: install safetensors to import .safetensors files") from None

        self.src = src
        try:
            self._file = safe_open(src, framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError for a bad header
            raise CheckpointError(f"{src} is not a readable safetensors file: {exc}") from None
        self._names: dict[str, str] = {}  # ckpt path -> name in the file

    def __exit__(self, *exc: object) -> None:
        self._file = None

    def plan(self) -> tuple[Any, dict[str, int], dict[str, str], dict[str, Any]]:
        f = self._file
        metadata = dict(f.metadata() or {})
        sizes: dict[str, int] = {}
        shapes: dict[str, tuple[str, list[int]]] = {}
        for name in f.keys():
            sl = f.get_slice(name)
            dtype = _ST_TO_TORCH.get(sl.get_dtype(), sl.get_dtype().lower())
            shapes[name] = (dtype, list(sl.get_shape()))
        raw = metadata.pop("ckpt", None)
        if raw is not None:  # written by ckpt export: rebuild the checkpoint exactly
            try:
                doc = json.loads(raw)
                tree, names, key = doc["tree"], dict(doc["tensors"]), doc.get("key")
                adapters = dict(doc.get("adapters") or {})
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{self.src}: unreadable 'ckpt' metadata ({exc})") from None
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
            sizes[path] = treemod.dtype_from_name(dtype, what=f"tensor {name!r}").itemsize * _numel(shape)
        return tree, sizes, adapters, meta

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for path, name in self._names.items():
            yield path, self._file.get_tensor(name)


def _first_line(exc: BaseException) -> str:
    """The first line of an error message, without terminal escapes (torch styles some)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class _DCPSource(_Source):
    """A torch.distributed.checkpoint directory, read with DCP's own reader, batch by batch."""

    def __init__(self, src: str) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.src = src
        self._reader_cls = FileSystemReader
        try:
            self.metadata = FileSystemReader(src).read_metadata()
        except Exception as exc:
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
                    refused.append(CheckpointError(f"{src}: entry {fqn!r} is not weights-only data ({_first_line(exc)})"))
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
            raise CheckpointError(f"{src}: reading the DCP checkpoint failed: {_first_line(exc)}") from exc
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
                t = torch.empty(tuple(item.size), dtype=item.properties.dtype, device="meta")
                placeholders[id(t)] = fqn
                set_element(skeleton, path, t)
            else:
                byte_fqns.add(fqn)
                set_element(skeleton, path, None)
        if byte_fqns:
            values = self._load(byte_fqns)
            for fqn in byte_fqns:
                set_element(skeleton, self._obj_path[fqn], get_element(values, self._obj_path[fqn]))
        tree, tensors = _encode_state(skeleton, self.src)
        self._fqn_of = {path: placeholders[id(t)] for path, t in tensors.items()}
        sizes = {path: t.nbytes for path, t in tensors.items()}
        return tree, sizes, {}, {}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from torch.distributed.checkpoint._traverse import get_element
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        def nbytes(fqn: str) -> int:
            item = self.metadata.state_dict_metadata[fqn]
            assert isinstance(item, TensorStorageMetadata)
            return _numel(list(item.size)) * item.properties.dtype.itemsize

        batch: list[tuple[str, str]] = []
        size = 0
        items = list(self._fqn_of.items())
        for i, (path, fqn) in enumerate(items):
            batch.append((path, fqn))
            size += nbytes(fqn)
            if size >= IMPORT_WINDOW_BYTES // 2 or i == len(items) - 1:
                loaded = self._load({f for _, f in batch})
                for p, f in batch:
                    yield p, get_element(loaded, self._obj_path[f])
                batch, size = [], 0
