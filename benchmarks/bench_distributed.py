"""Distributed checkpoints (issue 13): ``python -m benchmarks.bench_distributed [--smoke]``.

World sizes 2 and 4 on this machine (gloo, one process per rank, CPU): an MLP + AdamW
replicated with DDP and the same model sharded with FSDP2 (``fully_shard``), saved and
restored by

- ``dcp``: ``dcp.save``/``dcp.load`` with ``FileSystemWriter``/``FileSystemReader``;
- ``dcp+zstd``: the same with its ``ZStandard`` stream extension (when this torch has it);
- ``ckpt.dcp``: ``dcp.save``/``dcp.load`` through ``ckpt.dcp.StorageWriter/StorageReader``
  (DCP's planner, ckpt's store: compression, hashes, dedup);
- ``ckpt.save``: the collective ``ckpt.save``/``ckpt.restore`` (issue 13's core), measured
  when this checkout has it (``ckpt.distributed.coordinator``), else reported as absent.

Each save goes to an empty store. Measured per system: bytes each rank wrote, total
stored, save time and restore time (from a barrier to a barrier, so the slowest rank's,
each system's files read into the page cache first),
and the restore at 2 ranks of what 4 ranks saved (reshard 4 -> 2). Every restore is
checked bit-exact against a hash of the full saved state.

A planning simulation sizes a 1,024-rank save of a 70B-parameter model (see
:func:`simulate`). Targets are printed as PASS/FAIL lines, never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODES = ("ddp", "fsdp2")


def sizes(smoke: bool) -> dict[str, int]:
    """6 x Linear(2048, 2048) + AdamW: 25.2M params, 302 MB of state (params + two moments);
    ``CKPT_BENCH_DIST_SIZE=LAYERSxWIDTH`` (``4x1024``) sets another size."""
    if smoke:
        return {"layers": 2, "width": 64}
    custom = os.environ.get("CKPT_BENCH_DIST_SIZE")
    if custom:
        layers, width = (int(x) for x in custom.lower().split("x"))
        return {"layers": layers, "width": width}
    return {"layers": 6, "width": 2048}


# -- one rank ----------------------------------------------------------------------------------


def _systems(collective: bool) -> dict[str, dict[str, Callable[..., Any]]]:
    """name -> {"save": f(sd|objs, path, step) -> bytes this rank wrote, "load": f(sd|objs, path)}."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import ckpt.dcp

    def dcp_bytes(path: str) -> int:
        r = dist.get_rank()
        return sum(f.stat().st_size for f in Path(path).glob(f"__{r}_*.distcp"))

    def dcp_save(ext: list | None) -> Callable[..., int]:
        def save(sd: Any, path: str, step: int) -> int:
            writer = dcp.FileSystemWriter(path, _extensions=ext) if ext else dcp.FileSystemWriter(path)
            dcp.save(sd, storage_writer=writer)
            return dcp_bytes(path)

        return save

    def dcp_load(sd: Any, path: str) -> None:
        dcp.load(sd, storage_reader=dcp.FileSystemReader(path))

    def ckpt_save(sd: Any, path: str, step: int) -> int:
        writer = ckpt.dcp.StorageWriter(f"file://{path}", step=step)
        dcp.save(sd, storage_writer=writer)
        assert writer.stats is not None
        return writer.stats.written_bytes

    def ckpt_load(sd: Any, path: str) -> None:
        dcp.load(sd, storage_reader=ckpt.dcp.StorageReader(f"file://{path}"))

    out: dict[str, dict[str, Callable[..., Any]]] = {
        "dcp": {"save": dcp_save(None), "load": dcp_load},
    }
    try:
        from torch.distributed.checkpoint._extension import ZStandard

        out["dcp+zstd"] = {"save": dcp_save([ZStandard()]), "load": dcp_load}
    except ImportError:
        pass
    out["ckpt.dcp"] = {"save": ckpt_save, "load": ckpt_load}
    if collective:
        out["ckpt.save"] = {"save": _collective_save, "load": _collective_restore, "objects": True}  # type: ignore[dict-item]
    return out


def collective_ckpt_available() -> bool:
    """Whether this checkout has the collective ``ckpt.save`` (issue 13's coordinator);
    ``CKPT_BENCH_COLLECTIVE=0`` leaves it out."""
    if os.environ.get("CKPT_BENCH_COLLECTIVE", "1") == "0":
        return False
    return importlib.util.find_spec("ckpt.distributed.coordinator") is not None


def _collective_save(objs: dict[str, Any], path: str, step: int) -> int:
    import ckpt

    info = ckpt.save(f"file://{path}", objs, step=step)
    stats = getattr(info, "write_stats", None)
    return int(getattr(stats, "written_bytes", 0) or 0)


def _collective_restore(objs: dict[str, Any], path: str) -> None:
    import ckpt

    ckpt.restore(f"file://{path}", objs)


def _build(mode: str, layers: int, width: int, seed: int) -> tuple[Any, Any]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from benchmarks.common import make_mlp, train_step

    model = make_mlp(layers, width, seed)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    else:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.children():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    train_step(model, opt, torch.randn(16, width, generator=g))
    return model, opt


def _state(model: Any, opt: Any, **options: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(**options))
    return {"model": msd, "optim": osd}


def _apply(model: Any, opt: Any, sd: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _full_hash(model: Any, opt: Any) -> str:
    """A hash of the full (unsharded) state, on rank 0 ("" elsewhere); layout independent."""
    import torch
    import torch.distributed as dist

    from ckpt.io.hashing import hash_bytes

    full = _state(model, opt, full_state_dict=True, cpu_offload=True)
    if dist.get_rank() != 0:
        return ""
    parts: list[str] = []

    def walk(node: Any, at: str) -> None:
        if isinstance(node, torch.Tensor):
            t = node.detach().contiguous().reshape(-1)
            data = t.view(torch.uint8).numpy().data if t.numel() else memoryview(b"")
            parts.append(f"{at}:{t.dtype}:{hash_bytes(data)}")
        elif isinstance(node, dict):
            for k in sorted(node, key=str):
                walk(node[k], f"{at}/{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{at}/{i}")
        else:
            parts.append(f"{at}={node!r}")

    walk(full, "")
    return hash_bytes("\n".join(parts).encode())


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    dist.barrier()
    return time.perf_counter() - t0, out


def worker(rank: int, world: int, tmp: str, cfg: dict[str, Any]) -> None:
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg-{cfg['phase']}-{world}", rank=rank, world_size=world)
    systems = _systems(cfg.get("collective", False))
    res: dict[str, Any] = {}
    for mode in MODES:
        for name, sys_ in systems.items():
            try:
                res[f"{mode}/{name}"] = _measure(mode, sys_, str(Path(cfg["stores"]) / f"{mode}-{name}"), cfg)
            except Exception as exc:  # recorded: one system failing must not hide the others
                res[f"{mode}/{name}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    Path(tmp, f"result-{cfg['phase']}-{world}-{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def _measure(mode: str, sys_: dict[str, Any], path: str, cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg["phase"] == "save":
        model, opt = _build(mode, cfg["layers"], cfg["width"], seed=0)
        obj = {"model": model, "optim": opt} if sys_.get("objects") else _state(model, opt)
        save_s, wrote = _timed(lambda: sys_["save"](obj, path, 1))
        saved_hash = _full_hash(model, opt)
        del model, opt, obj
    else:
        save_s, wrote, saved_hash = None, None, None
    import torch.distributed as dist

    from benchmarks import cache

    if dist.get_rank() == 0:
        # every system restores from a warm page cache: ckpt writes its objects around it
        # (O_DIRECT), DCP through it, so right after the saves only DCP's files would be cached
        cache.load([path])
    dist.barrier()
    fresh, fopt = _build(mode, cfg["layers"], cfg["width"], seed=123)
    if sys_.get("objects"):
        target = {"model": fresh, "optim": fopt}
        restore_s, _ = _timed(lambda: sys_["load"](target, path))
    else:
        sd = _state(fresh, fopt)

        def restore(sd: Any = sd, m: Any = fresh, o: Any = fopt, load: Any = sys_["load"], at: str = path) -> None:
            load(sd, at)
            _apply(m, o, sd)

        restore_s, _ = _timed(restore)
    out = {
        "save_s": save_s,
        "restore_s": restore_s,
        "rank_bytes": wrote,
        "saved_hash": saved_hash,
        "restored_hash": _full_hash(fresh, fopt),
    }
    del fresh, fopt
    return out


# -- the parent --------------------------------------------------------------------------------


def _launch(world: int, tmp: Path, cfg: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    args = [sys.executable, "-m", "benchmarks.bench_distributed", "--worker"]
    procs = [
        subprocess.Popen(
            [*args, str(r), str(world), str(tmp), json.dumps(cfg)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + timeout
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"distributed benchmark at {world} ranks timed out") from None
    for r, (p, out) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            raise RuntimeError(f"rank {r} of {world} failed:\n{out[-3000:]}")
    return [json.loads((tmp / f"result-{cfg['phase']}-{world}-{r}.json").read_text()) for r in range(world)]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run(*, smoke: bool, workdir: str, log: Callable[[str], None] = print, **_: Any) -> dict[str, Any]:
    """Both world sizes, the reshard and the simulation; a plain dict (JSON) of results."""
    import shutil

    from benchmarks import common

    size = sizes(smoke)
    tmp = Path(workdir)
    res: dict[str, Any] = {"sizes": size, "worlds": {}, "load_average": os.getloadavg()}
    res["ckpt_save_collective"] = collective_ckpt_available()
    size = {**size, "collective": res["ckpt_save_collective"]}
    timeout = 180 if smoke else 1800
    for world in (2, 4):
        stores = tmp / f"stores-{world}"
        log(f"[distributed] world {world}: saving and restoring ({size['layers']} x {size['width']})")
        ranks = _launch(world, tmp, {"phase": "save", "stores": str(stores), **size}, timeout)
        table: dict[str, Any] = {}
        for key in ranks[0]:
            errors = [r[key]["error"] for r in ranks if "error" in r[key]]
            if errors:
                table[key] = {"error": errors[0]}
                continue
            per_rank = [r[key]["rank_bytes"] or 0 for r in ranks]
            row = {
                "save_s": ranks[0][key]["save_s"],
                "restore_s": ranks[0][key]["restore_s"],
                "rank_bytes": per_rank,
                "stored_bytes": _dir_bytes(stores / key.replace("/", "-")),
                "bit_exact": ranks[0][key]["saved_hash"] == ranks[0][key]["restored_hash"],
                "saved_hash": ranks[0][key]["saved_hash"],
            }
            table[key] = row
        res["worlds"][str(world)] = table
        if world == 4:
            log("[distributed] reshard: restoring at 2 ranks what 4 saved")
            back = _launch(2, tmp, {"phase": "restore", "stores": str(stores), **size}, timeout)
            for key, row in table.items():
                if "error" in row:
                    continue
                if "error" in back[0].get(key, {}):
                    row["reshard_error"] = back[0][key]["error"]
                    continue
                row["reshard_4to2_s"] = back[0][key]["restore_s"]
                row["reshard_bit_exact"] = back[0][key]["restored_hash"] == row["saved_hash"]
        shutil.rmtree(stores, ignore_errors=True)
    for f in tmp.glob("result-*.json"):
        f.unlink()
    for f in tmp.glob("pg-*"):
        f.unlink()
    log("[distributed] planning simulation: 1,024 ranks, 70B parameters")
    res["simulation"] = simulate(ranks=1024, smoke=smoke)
    res["targets"] = targets(res)
    res["machine"] = common.machine_info()
    res["load_average_after"] = os.getloadavg()
    return res


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for world, table in res["worlds"].items():
        for mode in MODES:
            base = table.get(f"{mode}/dcp")
            for name in ("ckpt.dcp", "ckpt.save"):
                row = table.get(f"{mode}/{name}")
                if row is None or base is None or "error" in row or "error" in base:
                    continue
                tag = f"{name} {mode} at {world} ranks"
                mean = sum(row["rank_bytes"]) / len(row["rank_bytes"]) if row["rank_bytes"] else 0
                checks = [
                    ("total stored vs DCP", row["stored_bytes"] / max(1, base["stored_bytes"]), "<=", 0.85, False),
                    (
                        "max per-rank bytes vs mean",
                        max(row["rank_bytes"]) / mean if mean else float("nan"),
                        "<=",
                        1.2,
                        False,
                    ),
                    ("save time vs DCP", row["save_s"] / base["save_s"], "<=", 1.0, True),
                    ("restore time vs DCP", row["restore_s"] / base["restore_s"], "<=", 1.0, True),
                ]
                if "reshard_4to2_s" in row and "reshard_4to2_s" in base:
                    checks.append(
                        (
                            "reshard 4->2 restore time vs DCP",
                            row["reshard_4to2_s"] / base["reshard_4to2_s"],
                            "<=",
                            1.0,
                            True,
                        )
                    )
                for what, value, op, thr, timing in checks:
                    ok = value <= thr if value == value else False
                    out.append(
                        {
                            "target": f"{tag}: {what}",
                            "value": value,
                            "op": op,
                            "threshold": thr,
                            "pass": ok,
                            "timing": timing,
                        }
                    )
    return out


# -- planning at scale ---------------------------------------------------------------------------


def simulate(*, ranks: int = 1024, smoke: bool = False) -> dict[str, Any]:
    """Planning a 1,024-rank FSDP save of a 70B model (Llama-2-70B shapes), measured here.

    Fake per-rank plans (every parameter and both AdamW moments sharded on dim 0 over all
    ranks, fp32, as FSDP2 lays them out) go through what the coordinator runs: DCP's global
    planning (``DefaultSavePlanner.create_global_plan``: dedup, metadata), then
    ``ckpt.dcp.StorageWriter.finish``'s manifest construction from every rank's chunk records
    (chunks of ``CKPT_CHUNK_BYTES``), serialized and validated as a reader would. ckpt's
    collective ``ckpt.save`` plans differently (its own coordinator, issue 13's core); this is
    the ``ckpt.dcp`` path. Only ``layers`` of the 80 transformer blocks are simulated and the
    figures scaled by 80 / layers (labelled), to fit this shared machine.
    """

    import torch
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult

    from ckpt import config
    from ckpt.interop.dcp_storage import StorageWriter

    hidden, inter, vocab, blocks = 8192, 28672, 32000, 80
    layers = 1 if smoke else 2
    kv = 1024  # grouped-query attention: 8 KV heads of 128
    block = {
        "attn.q": (hidden, hidden),
        "attn.k": (kv, hidden),
        "attn.v": (kv, hidden),
        "attn.o": (hidden, hidden),
        "mlp.gate": (inter, hidden),
        "mlp.up": (inter, hidden),
        "mlp.down": (hidden, inter),
        "norm1": (hidden,),
        "norm2": (hidden,),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in block.items()})
    per_block = sum(torch.Size(s).numel() for s in block.values())
    embed = vocab * hidden
    params_total = blocks * per_block + 2 * embed + hidden
    fqns: dict[str, tuple[int, ...]] = {}
    mapping: dict[str, tuple[str, ...]] = {}
    for name, shape in shapes.items():
        fqns[f"model.{name}"] = shape
        mapping[f"model.{name}"] = ("model", name)
        for moment in ("exp_avg", "exp_avg_sq"):
            fqns[f"optim.state.{name}.{moment}"] = shape
            mapping[f"optim.state.{name}.{moment}"] = ("optim", "state", name, moment)
    chunk = config.chunk_bytes()

    def box(shape: tuple[int, ...], r: int) -> tuple[list[int], list[int]]:
        rows = -(-shape[0] // ranks)  # torch.chunk's split: uneven, trailing ranks may be empty
        lo, hi = min(shape[0], r * rows), min(shape[0], (r + 1) * rows)
        return [lo, *([0] * (len(shape) - 1))], [hi - lo, *shape[1:]]

    t0 = time.process_time()
    plans = []
    for r in range(ranks):
        items = []
        for fqn, shape in fqns.items():
            o, s = box(shape, r)
            chunk_md = ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s))
            items.append(
                WriteItem(
                    index=MetadataIndex(fqn, o),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=chunk_md, properties=TensorProperties(dtype=torch.float32), size=torch.Size(shape)
                    ),
                )
            )
        plans.append(SavePlan(items=items, planner_data=mapping))
    build_s = time.process_time() - t0
    import pickle

    plan_bytes = sum(len(pickle.dumps(p)) for p in plans[:8]) / 8 * ranks
    planner = DefaultSavePlanner()
    planner.set_up_planner({}, is_coordinator=True)
    t0 = time.process_time()
    global_plans, metadata = planner.create_global_plan(plans)
    dcp_plan_s = time.process_time() - t0
    # every rank's write results: one chunk record per CKPT_CHUNK_BYTES of its boxes
    results = []
    objects_per_rank = []
    fake = {"hash": "0" * 32, "key": "0" * 32, "codec": [{"name": "bgzstd", "itemsize": 4}]}
    for r, p in enumerate(global_plans):
        rr, n_obj = [], 0
        for item in p.items:
            assert item.tensor_data is not None
            nbytes = torch.Size(item.tensor_data.chunk.sizes).numel() * 4
            recs = []
            for a in range(0, nbytes, chunk):
                size = min(chunk, nbytes - a)
                h = f"{r:08x}{a:08x}{hash(item.index.fqn) & 0xFFFFFFFFFFFFFFFF:016x}"
                recs.append({**fake, "hash": h, "key": h, "size": size, "stored": size})
            n_obj += len(recs)
            rr.append(
                WriteResult(index=item.index, size_in_bytes=nbytes, storage_data={"dtype": "float32", "chunks": recs})
            )
        results.append(rr)
        objects_per_rank.append(n_obj)
    result_bytes = sum(len(pickle.dumps(x)) for x in results[:8]) / 8 * ranks
    from ckpt.storage.manifest import Manifest

    w = StorageWriter("memory://ckpt-sim", step=1)
    t0 = time.process_time()
    manifest = w.build_manifest(metadata, results, None)
    data = manifest.to_json_bytes()
    serialize_s = time.process_time() - t0
    t0 = time.process_time()
    try:
        Manifest.from_json_bytes(data, where="simulated")
        validate = "ok"
    except Exception as exc:  # reported: the size limit is the likely one
        validate = f"{type(exc).__name__}: {str(exc)[:160]}"
    validate_s = time.process_time() - t0
    finish_s = serialize_s + validate_s
    manifest_bytes = len(data)
    scale = blocks / layers
    tensors = len(fqns)
    return {
        "ranks": ranks,
        "params_total": params_total,
        "simulated_blocks": layers,
        "scale_to_80_blocks": scale,
        "state_bytes_total": params_total * 4 * 3,
        "dcp_items_per_rank": tensors,
        "dcp_items_per_rank_scaled": int(tensors * scale),
        "objects_per_rank_scaled": int(max(objects_per_rank) * scale),
        "bytes_per_rank": params_total * 12 // ranks,
        "plan_build_cpu_s": build_s,
        "dcp_global_plan_cpu_s": dcp_plan_s,
        "dcp_global_plan_cpu_s_scaled": dcp_plan_s * scale,
        "finish_cpu_s": finish_s,
        "finish_cpu_s_scaled": finish_s * scale,
        "manifest_bytes": manifest_bytes,
        "manifest_validates": validate,
        "reader_validate_cpu_s_scaled": validate_s * scale,
        "manifest_bytes_scaled": int(manifest_bytes * scale),
        "max_manifest_bytes": config.max_manifest_bytes(),
        "plans_gathered_bytes_scaled": int(plan_bytes * scale),
        "results_gathered_bytes_scaled": int(result_bytes * scale),
        # dcp.save: reduce_scatter("plan") = gather + scatter, all_reduce("write") = gather + broadcast
        "collectives": 4,
    }


# -- report ----------------------------------------------------------------------------------------


def markdown(res: dict[str, Any]) -> str:
    from benchmarks import report

    load = res.get("load_average") or ()
    lines = report.header("Distributed checkpoints (gloo, CPU processes)", res["machine"], res.get("smoke", False))
    lines += [
        f"- Model: MLP {res['sizes']['layers']} x Linear({res['sizes']['width']}, {res['sizes']['width']}) + AdamW; "
        "DDP replicated and FSDP2 sharded; every save into an empty store; every restore from a warm page cache "
        "(each system's files read once before it)",
        f"- Load average before / after: {', '.join(f'{x:.1f}' for x in load)} / "
        f"{', '.join(f'{x:.1f}' for x in res.get('load_average_after') or ())} (a shared machine: timings are noisy)",
        f"- Collective ckpt.save in this checkout: {'yes' if res['ckpt_save_collective'] else 'no (not measured)'}",
        "",
        "| world | mode | system | save | restore | reshard 4->2 | total stored MB | per-rank MB (max / mean) | stored vs DCP | bit-exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for world, table in res["worlds"].items():
        for key, row in table.items():
            mode, name = key.split("/", 1)
            if "error" in row:
                lines.append(f"| {world} | {mode} | {name} | failed: {row['error'][:200]} |||||||| ")
                continue
            base = table.get(f"{mode}/dcp", row)
            rb = row["rank_bytes"]
            mean = sum(rb) / len(rb) if rb else 0
            exact = row["bit_exact"] and row.get("reshard_bit_exact", True)
            lines.append(
                f"| {world} | {mode} | {name} | {report.secs(row['save_s'])} | {report.secs(row['restore_s'])} | "
                f"{report.secs(row['reshard_4to2_s']) if 'reshard_4to2_s' in row else ''} | "
                f"{report.mb(row['stored_bytes'])} | {report.mb(max(rb))} / {report.mb(mean)} | "
                f"{report.ratio(row['stored_bytes'] / max(1, base['stored_bytes']))} | {'yes' if exact else 'NO'} |"
            )
    s = res["simulation"]
    lines += [
        "",
        f"## Planning a {s['ranks']:,}-rank save of a {s['params_total'] / 1e9:.0f}B-parameter model (simulated)",
        "",
        f"FSDP over {s['ranks']} ranks, fp32 params + AdamW moments = {s['state_bytes_total'] / 1e12:.2f} TB, "
        f"{s['bytes_per_rank'] / 1e6:,.0f} MB per rank. {s['simulated_blocks']} of 80 transformer blocks planned "
        f"for real through DCP's planner and ckpt.dcp's finish(); figures marked (x{s['scale_to_80_blocks']:.0f}) "
        "scaled linearly to 80 blocks (embeddings left out).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| collectives per dcp.save (plan gather+scatter, write gather+broadcast) | {s['collectives']} |",
        f"| DCP items per rank (x{s['scale_to_80_blocks']:.0f}) | {s['dcp_items_per_rank_scaled']:,} |",
        f"| objects per rank (x{s['scale_to_80_blocks']:.0f}) | {s['objects_per_rank_scaled']:,} |",
        f"| plans gathered at the coordinator (x{s['scale_to_80_blocks']:.0f}) | {report.mb(s['plans_gathered_bytes_scaled'])} MB |",
        f"| write results gathered at the coordinator (x{s['scale_to_80_blocks']:.0f}) | {report.mb(s['results_gathered_bytes_scaled'])} MB |",
        f"| DCP global planning CPU (x{s['scale_to_80_blocks']:.0f}) | {s['dcp_global_plan_cpu_s_scaled']:.1f} s |",
        f"| ckpt.dcp finish: manifest build + serialize + validate CPU (no I/O) (x{s['scale_to_80_blocks']:.0f}) | {s['finish_cpu_s_scaled']:.1f} s |",
        f"| manifest size (x{s['scale_to_80_blocks']:.0f}) | {report.mb(s['manifest_bytes_scaled'])} MB "
        f"(limit CKPT_MAX_MANIFEST_BYTES {report.mb(s['max_manifest_bytes'])} MB) |",
        "",
        *report.target_lines(res["targets"]),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(int(argv[1]), int(argv[2]), argv[3], json.loads(argv[4]))
        return 0
    from benchmarks import report

    return report.standalone("benchmarks.bench_distributed", "distributed", __doc__, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
