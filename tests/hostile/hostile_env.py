"""What the hostile-store workers share: a real store to attack, the reference data, an
oracle for what a (mutated) manifest promises, deep equality, and the open() audit.

Imported only inside worker subprocesses (``worker.py``), which run under a memory limit.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import click
import numpy as np
import torch
import xxhash

import ckpt
from ckpt.cli.app import build_cli
from ckpt.cli.report import verify_report
from ckpt.hooks.manager import get_plugins
from ckpt.interop.export import export_checkpoint
from ckpt.state import tree as treemod
from ckpt.storage.manifest import DTYPE_ITEMSIZE
from ckpt.storage.store import Store

#: chunks this small give multi-chunk tensors in a small state (the smallest CKPT_CHUNK_BYTES)
CHUNK_BYTES = 4096


def make_state(seed: int = 0) -> dict[str, Any]:
    """A small training state using every storage form: bgzstd, zstd, raw, multi-chunk,
    NumPy, and every tree tag ($tuple, $map, $float, $dtype, $bytes)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    return {
        "model": model,
        "optim": opt,
        "ints": torch.arange(5000, dtype=torch.int64) % 7,  # zstd, several chunks
        "bf16": torch.randn(300, dtype=torch.bfloat16),  # byte-grouped
        "noise": torch.randint(0, 256, (257,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)),
        "big": torch.randn(3000),  # several bgzstd chunks
        "np": np.arange(10, dtype=np.int16) * (seed + 1),
        "cfg": {
            "lr": 0.1,
            "name": "run",
            "t": (1, None),
            "nan": float("nan"),
            "blob": b"\x00\x01",
            "dt": torch.float16,
        },
        "keys": {3: "int key", "x": [1.5, True]},
    }


#: keys of make_state() whose restored value must equal the manifest's promise bit for bit
TENSOR_KEYS = ("model", "ints", "bf16", "noise", "big", "np")


def advance(state: dict[str, Any]) -> None:
    """A small change, so the next save stores some chunks as XOR deltas."""
    with torch.no_grad():
        state["model"][0].weight.add_(1e-4)
        state["big"][:100] += 1e-3


@dataclass
class Base:
    """A real store written by ckpt.save (steps 1 and 2), and what it holds."""

    url: str
    root: str  # local root (real path); "" for memory stores
    tmp: str  # scratch folder outside the store (canary, export output)
    canary: str  # a file outside the store holding a copy of a real object
    reference: dict[int, Any] = field(default_factory=dict)  # step -> ckpt.load result
    raw_by_hash: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[int, bytes] = field(default_factory=dict)
    objects: dict[str, bytes] = field(default_factory=dict)  # key -> stored bytes
    ref_latest: bytes = b""

    @property
    def store(self) -> Store:
        return Store(self.url)

    def object_file(self, key: str) -> str:
        return self.store.object_path(key)

    def manifest_file(self, step: int) -> str:
        return self.store.manifest_path(step)


def build_base(kind: str) -> Base:
    os.environ["CKPT_CHUNK_BYTES"] = str(CHUNK_BYTES)
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only add contention
    logging.getLogger("ckpt").setLevel(logging.CRITICAL)
    tmp = os.path.realpath(tempfile.mkdtemp(prefix="ckpt-hostile-"))
    if kind == "file":
        root = os.path.join(tmp, "store")
        url = f"file://{root}"
    else:
        root = ""
        url = f"memory://hostile-{os.getpid()}"
    state = make_state()
    ckpt.save(url, state, step=1)
    advance(state)
    ckpt.save(url, state, step=2)
    base = Base(url=url, root=root, tmp=tmp, canary=os.path.join(tmp, "canary.bin"))
    store = base.store
    # packed objects (schema 2) assembled from their tensors, over both steps: step 2 cites
    # slices of step 1's packs for the small tensors it did not change, and a pack it fills
    # again (a delta of step 1's) starts as step 1's object: the unchanged tensors' slots
    # hold their bytes, though they cite step 1's object
    packs: dict[str, bytearray] = {}
    for step in (1, 2):
        base.reference[step] = ckpt.load(url, step=step)
        base.manifests[step] = store.read_manifest(step)
        manifest = ckpt.read_manifest(url, step)
        loaded = _flat_tensors(base.reference[step])
        for path, entry in manifest.tensors.items():
            raw = loaded[path]
            offset = 0
            for c in entry.chunks:
                piece = raw[offset : offset + c.size]
                if c.packed:
                    if c.hash not in packs:
                        parent = next((s["parent"] for s in c.codec if "parent" in s), None)
                        start = packs.get(parent["hash"]) if parent is not None else None
                        packs[c.hash] = bytearray(start) if start is not None else bytearray(c.of)
                    packs[c.hash][c.at : c.at + c.size] = piece
                else:
                    assert xxhash.xxh3_128_hexdigest(piece) == c.hash
                    base.raw_by_hash[c.hash] = piece
                offset += c.size
    for digest, whole in packs.items():
        assert xxhash.xxh3_128_hexdigest(whole) == digest
        base.raw_by_hash[digest] = bytes(whole)
    for info in store.list_objects():
        base.objects[info.key] = store.get_object(info.key)
    base.ref_latest = store.read(store.path("refs", "latest"))
    first = json.loads(base.manifests[1])  # the canary copies an object step 1 cites
    some = min(c["key"] for entry in first["tensors"].values() for c in entry["chunks"])
    with open(base.canary, "wb") as f:
        f.write(base.objects[some])
    return base


def _flat_tensors(loaded: Any) -> dict[str, bytes]:
    """Raw bytes of every tensor of a loaded tree, by its ckpt path."""
    out: dict[str, bytes] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, torch.Tensor):
            out[path] = tensor_bytes(node)
        elif isinstance(node, np.ndarray):
            out[path] = np.ascontiguousarray(node).tobytes()
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, treemod.join(path, k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, treemod.join(path, i))

    walk(loaded, "")
    return out


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


# -- the oracle: what a manifest document promises, from verified raw chunks -----------------


class Unreadable(Exception):
    """The document promises nothing a reader could produce: every read of it must fail."""


#: what building from a malformed document raises
_MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError, ckpt.CheckpointError)


class Oracle:
    """What loading a manifest document promises, built from raw chunks by content hash
    (not by ckpt's reader): each tensor from the verified bytes its chunk hashes name, laid
    out by its dtype and shape, and the tree decoded around them.

    A part that cannot be built raises :class:`Unreadable`: no faithful read of it exists
    (a chunk no object holds, sizes that disagree), so a read that succeeds anyway returned
    data nobody promised.
    """

    def __init__(self, base: Base, body: bytes) -> None:
        self.base = base
        self.problem: str | None = None
        self.doc: Any = None
        self._tensors: dict[str, torch.Tensor | Unreadable] = {}
        try:
            self.doc = json.loads(body)
        except (ValueError, RecursionError) as exc:
            self.problem = f"unparsable: {type(exc).__name__}"

    def tensor(self, path: str) -> torch.Tensor:
        if self.problem is not None:
            raise Unreadable(self.problem)
        if path not in self._tensors:
            try:
                self._tensors[path] = self._build(path)
            except Unreadable as exc:
                self._tensors[path] = exc
        got = self._tensors[path]
        if isinstance(got, Unreadable):
            raise got
        return got

    def _build(self, path: str) -> torch.Tensor:
        try:
            entry = self.doc["tensors"][path]
            raw = b""
            for c in entry["chunks"]:
                piece = self.base.raw_by_hash[c["hash"]]
                if "at" in c or "of" in c:  # a slice of a packed object (schema 2)
                    at, of, size = c["at"], c["of"], c["size"]
                    if not all(type(v) is int for v in (at, of, size)) or not 0 <= at <= at + size <= of:
                        raise Unreadable(f"chunk {c['hash']}: bad slice at={at!r} of={of!r}")
                    if len(piece) != of:
                        raise Unreadable(f"chunk {c['hash']} is {len(piece)} bytes, not {of}")
                    piece = piece[at : at + size]
                if type(c["size"]) is not int or len(piece) != c["size"]:
                    raise Unreadable(f"chunk {c['hash']} is {len(piece)} bytes, not {c['size']}")
                raw += piece
            dtype = treemod.dtype_from_name(entry["dtype"])
            shape = entry["shape"]
            if not all(type(s) is int and s >= 0 for s in shape) or type(entry["nbytes"]) is not int:
                raise Unreadable(f"tensor {path}: shape {shape}")
            if not len(raw) == math.prod(shape) * DTYPE_ITEMSIZE[entry["dtype"]] == entry["nbytes"]:
                raise Unreadable(f"tensor {path}: {len(raw)} bytes for shape {shape}")
            return (
                torch.frombuffer(bytearray(raw) or bytearray(1), dtype=torch.uint8)[: len(raw)]
                .view(dtype)
                .reshape(shape)
            )
        except Unreadable:
            raise
        except _MALFORMED as exc:
            raise Unreadable(f"tensor {path}: {type(exc).__name__}: {str(exc)[:200]}") from None

    def tree(self) -> Any:
        """The whole tree ``ckpt.load`` must return."""
        if self.problem is not None:
            raise Unreadable(self.problem)
        try:
            return treemod.decode(
                self.doc["tree"], lambda p, is_np: self.tensor(p).numpy() if is_np else self.tensor(p)
            )
        except Unreadable:
            raise
        except _MALFORMED as exc:
            raise Unreadable(f"tree: {type(exc).__name__}: {str(exc)[:200]}") from None


def same(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of loaded trees (types, dtypes, shapes and bytes; NaN equals NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and tuple(a.shape) == tuple(b.shape)
            and tensor_bytes(a) == tensor_bytes(b)
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


def live_view(state: dict[str, Any]) -> dict[str, Any]:
    """A restored live state as the plain tree ``ckpt.load`` gives (modules as state dicts)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.nn.Module):
            out[k] = dict(v.state_dict())
        elif isinstance(v, torch.optim.Optimizer):
            out[k] = v.state_dict()
        else:
            out[k] = v
    return out


# -- the open() audit -----------------------------------------------------------------------


class OpenAudit:
    """Records every file the process opens while armed (``sys.addaudithook``, event ``open``).

    ``outside(roots)`` lists the opened paths that resolve outside all of ``roots`` and
    outside Python's own installation (lazy imports of the interpreter and its packages).
    """

    def __init__(self) -> None:
        self.armed = False
        self.paths: list[str] = []
        # the interpreter, its packages and ckpt's own source (lazy imports)
        roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(ckpt.__file__)}
        self._library = [os.path.realpath(p) for p in roots]
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.armed and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            self.paths.append(os.fsdecode(args[0]))

    @contextlib.contextmanager
    def watch(self) -> Iterator[list[str]]:
        self.paths = []
        self.armed = True
        try:
            yield self.paths
        finally:
            self.armed = False

    def outside(self, roots: list[str]) -> list[str]:
        allowed = [*(os.path.realpath(r) for r in roots if r), *self._library, "/proc/", "/sys/"]
        bad = []
        for p in self.paths:
            real = os.path.realpath(p)
            if real in ("/dev/null", "/dev/urandom"):
                continue
            if not any(real == a.rstrip("/") or real.startswith(a.rstrip("/") + "/") for a in allowed):
                bad.append(real)
        return bad


# -- the operations a mutated store is read with ---------------------------------------------


@dataclass
class Outcome:
    """How one operation on a (mutated) store ended."""

    ok: bool
    error: BaseException | None = None
    value: Any = None


def attempt(fn: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(True, value=fn())
    except ckpt.CheckpointError as exc:
        return Outcome(False, error=exc)
    except BaseException as exc:
        return Outcome(False, error=exc)


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """``ckpt ARGS`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = build_cli().main(args, prog_name="ckpt", standalone_mode=False)
        except click.ClickException as exc:  # a usage error: a bug of the caller
            raise AssertionError(f"ckpt {' '.join(args)}: {exc.format_message()}") from None
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    return int(code or 0), out.getvalue(), err.getvalue()


def cli_escaped(code: int, err: str) -> str | None:
    """What is wrong with a CLI run on a hostile store: an error that is not a CheckpointError."""
    if code not in (0, 1, 2):
        return f"exit code {code}"
    for line in err.splitlines():
        if line.startswith("ckpt: error: unexpected") or line.startswith("ckpt: error: ") and _is_exc_name(line[13:]):
            return line[:300]
    return None


def _is_exc_name(text: str) -> bool:
    head = text.split(":", 1)[0]
    return head.isidentifier() and head[:1].isupper() and head.endswith(("Error", "Exception"))


def load_op(base: Base, step: int) -> Any:
    return ckpt.load(base.url, step=step)


def verify_op(base: Base, step: int) -> dict[str, Any]:
    return verify_report(Store(base.url), get_plugins(), step)


def export_op(base: Base, step: int, out_dir: str) -> dict[str, torch.Tensor]:
    """Export ``step`` to safetensors and read the file back: ckpt path -> tensor."""
    from safetensors import safe_open

    out = os.path.join(out_dir, "export.safetensors")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out)
    export_checkpoint(base.url, out, step=step)
    tensors = {}
    with safe_open(out, framework="pt") as f:
        names = json.loads(f.metadata()["ckpt"])["tensors"]
        for name, path in names.items():
            tensors[path] = f.get_tensor(name)
    return tensors


_LIVE: dict[str, Any] = {}


def restore_op(base: Base, step: int) -> dict[str, Any]:
    """Restore ``step`` into fresh live objects (a copy of one template: building a model
    and stepping its optimizer costs more than the restore) and return them as plain data."""
    if not _LIVE:
        _LIVE.update(make_state(seed=7))
    state = copy.deepcopy(_LIVE)
    ckpt.restore(base.url, state, step=step)
    return live_view(state)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
