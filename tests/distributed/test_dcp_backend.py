"""``ckpt.dcp.StorageWriter/StorageReader`` under dcp.save/dcp.load/dcp.async_save.

Real torch.distributed: two gloo processes on CPU save an FSDP2 (``fully_shard``) model and
AdamW through ``dcp.save`` into a ckpt store, load it back at two ranks and ``dcp.async_save``
it again; this process then loads it at one rank (resharded), with ``ckpt.load``, and
verifies it with the CLI. The worker is this file run as a script.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    # 7 outputs: uneven shards over two ranks
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    torch.manual_seed(1)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    opt.zero_grad()


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer, **options) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(**options))
    return {"model": msd, "optim": osd}


def _load_into(model: torch.nn.Module, opt: torch.optim.Optimizer, sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _assert_same(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}/{i}")
    else:
        assert a == b, (path, a, b)


def worker(rank: int, world: int, tmp: str) -> None:
    """One rank: FSDP2 save via dcp.save, load at the same world size, dcp.async_save."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import ckpt.dcp

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    url = f"file://{tmp}/store"
    mesh = init_device_mesh("cpu", (world,))

    def sharded():
        model = _model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    model, opt = sharded()
    _train(model, opt)
    writer = ckpt.dcp.StorageWriter(url, step=1)
    dcp.save({**_state(model, opt), "extra": {"epoch": 3, "betas": (0.9, 0.99)}}, storage_writer=writer)
    assert writer.stats is not None and writer.stats.raw_bytes > 0
    full = _state(model, opt, full_state_dict=True, cpu_offload=True)
    if rank == 0:
        torch.save(full, f"{tmp}/reference.pt")

    model2, opt2 = sharded()
    _train(model2, opt2)  # other values, optimizer state present
    sd = {**_state(model2, opt2), "extra": {"epoch": 0, "betas": (0.0, 0.0)}}
    dcp.load(sd, storage_reader=ckpt.dcp.StorageReader(url, step=1))
    _load_into(model2, opt2, sd)
    assert sd["extra"] == {"epoch": 3, "betas": (0.9, 0.99)}
    back = _state(model2, opt2, full_state_dict=True, cpu_offload=True)
    if rank == 0:
        _assert_same(full, back)

    fut = dcp.async_save(_state(model, opt), storage_writer=ckpt.dcp.StorageWriter(url, step=2))
    assert isinstance(fut, Future)  # without an async stager of its own: one future, done after the commit
    fut.result()
    # pytorch#120356: one key, different data on each rank; DCP's planner keeps one rank's item
    dcp.save({"r": torch.full((2,), float(rank))}, storage_writer=ckpt.dcp.StorageWriter(url, step=3))
    # a collective ckpt.save store read back through DCP (same world size: this rank's view)
    ckpt.save(f"file://{tmp}/collective", {"model": model}, step=1)
    model3, opt3 = sharded()
    sd3 = {"model": _state(model3, opt3)["model"]}
    dcp.load(sd3, storage_reader=ckpt.dcp.StorageReader(f"file://{tmp}/collective"))
    _load_into(model3, opt3, {"model": sd3["model"], "optim": _state(model3, opt3)["optim"]})
    back3 = _state(model3, opt3, full_state_dict=True, cpu_offload=True)
    if rank == 0:
        _assert_same(full["model"], back3["model"])
    dist.barrier()
    # As every multi-rank worker of these tests: past the last barrier the process exits at
    # once, without tearing its gloo groups down (a rank of this worker aborted there twice
    # in full runs, "terminate called without an active exception", after its work was done).
    sys.stdout.flush()
    os._exit(0)


def _run_ranks(tmp: Path, world: int = 2) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(world), str(tmp)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-4000:]}"


@pytest.fixture(scope="module")
def fsdp_store(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dcp2")
    _run_ranks(tmp)
    return tmp


def test_fsdp2_save_load_two_ranks_and_async(fsdp_store):
    import ckpt

    url = f"file://{fsdp_store}/store"
    assert ckpt.steps(url) == [1, 2, 3]
    m = ckpt.read_manifest(url, step=1)
    sharded = [p for p, e in m.tensors.items() if e.shards]
    assert sharded and any(len(m.tensors[p].shards) == 2 for p in sharded)  # FSDP2 dim-0 shards
    # the async save of the same state stored nothing new: every chunk deduplicated
    m2 = ckpt.read_manifest(url, step=2)
    assert m2.parent == 1 and m2.chunk_refs() and {c.key for c in m2.chunk_refs()} <= {c.key for c in m.chunk_refs()}


def test_one_key_different_data_on_ranks_keeps_one_ranks_item(fsdp_store):
    """What pytorch#120356 reports, as this writer stores it: DCP's planner deduplicates write
    items by (fqn, offset) before the storage layer sees them, so one rank's value is stored,
    whole, and the other's is dropped (rank-local values belong in ckpt.save)."""
    import ckpt

    r = ckpt.load(f"file://{fsdp_store}/store", step=3)["r"]
    assert torch.equal(r, torch.zeros(2)) or torch.equal(r, torch.ones(2))


def test_ckpt_load_and_verify_read_a_dcp_written_store(fsdp_store):
    from click.testing import CliRunner

    import ckpt
    from ckpt.cli import build_cli

    url = f"file://{fsdp_store}/store"
    ref = torch.load(fsdp_store / "reference.pt", weights_only=True)
    tree = ckpt.load(url, step=1)
    _assert_same(ref["model"], tree["model"])  # full tensors put together from the shard boxes
    _assert_same(ref["optim"]["state"], tree["optim"]["state"])
    assert tree["extra"] == {"epoch": 3, "betas": (0.9, 0.99)}
    result = CliRunner().invoke(build_cli(), ["verify", url], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_reshard_load_at_one_rank(fsdp_store):
    import torch.distributed.checkpoint as dcp

    import ckpt.dcp

    ref = torch.load(fsdp_store / "reference.pt", weights_only=True)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    _train(model, opt)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # nothing of what the load must bring back is left
    sd = _state(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, storage_reader=ckpt.dcp.StorageReader(f"file://{fsdp_store}/store", step=1))
    _load_into(model, opt, sd)
    _assert_same(ref, _state(model, opt))


def _plain_state() -> dict:
    torch.manual_seed(3)
    return {
        "w": torch.randn(64, 33),
        "half": torch.randn(5, 7).to(torch.bfloat16),
        "ints": torch.arange(10, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "cfg": {"lr": 0.1, "name": "run", "sizes": [1, 2, 3], "opt": None},
    }


def test_single_process_round_trip_bit_exact(tmp_path):
    import torch.distributed.checkpoint as dcp

    import ckpt
    import ckpt.dcp

    url = f"file://{tmp_path}/s"
    src = _plain_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(src, storage_writer=ckpt.dcp.StorageWriter(url, step=5))
        dst: dict[str, Any] = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else {}) for k, v in src.items()}
        dst["cfg"] = {"lr": 0.0, "name": "", "sizes": [], "opt": 1}
        dcp.load(dst, storage_reader=ckpt.dcp.StorageReader(url))
    _assert_same(src, dst)
    _assert_same(src, ckpt.load(url))
    assert ckpt.read_manifest(url).schema == 1  # nothing sharded: readable by any ckpt


def test_stored_bytes_count_the_objects_and_the_manifest_as_written(tmp_path):
    """The seq is set after the manifest is built: stored_bytes must count it too (it was
    settled before, and fell 8 bytes short)."""
    import torch.distributed.checkpoint as dcp

    import ckpt
    import ckpt.dcp
    from ckpt.storage.store import Store
    from ckpt.testing import stored_objects

    url = str(tmp_path / "s")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_plain_state(), storage_writer=ckpt.dcp.StorageWriter(url, step=1))
    m = ckpt.read_manifest(url, step=1)
    store = Store(url)
    assert m.seq is not None
    assert m.stored_bytes == sum(stored_objects(store).values()) + len(store.read_manifest(1))


def test_next_save_deduplicates_and_writes_deltas_against_the_parent(tmp_path):
    import torch.distributed.checkpoint as dcp

    import ckpt
    import ckpt.dcp

    url = f"file://{tmp_path}/s"
    src = _plain_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(src, storage_writer=ckpt.dcp.StorageWriter(url, step=1))
        src["w"][3, 4] += 1.0  # one element of one tensor changes
        writer = ckpt.dcp.StorageWriter(url, step=2)
        dcp.save(src, storage_writer=writer)
        dst: dict[str, Any] = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else {}) for k, v in src.items()}
        dst["cfg"] = {"lr": 0.0, "name": "", "sizes": [], "opt": 1}
        dcp.load(dst, storage_reader=ckpt.dcp.StorageReader(url, step=2))
    stats = writer.stats
    assert stats is not None and stats.objects_written == 1 and stats.delta_objects == 1
    assert stats.written_bytes < 1024 and stats.reused_bytes > 0
    m = ckpt.read_manifest(url, step=2)
    assert m.parent == 1 and m.stored_bytes < ckpt.read_manifest(url, step=1).stored_bytes // 2
    _assert_same(src, dst)
    _assert_same(src, ckpt.load(url, step=2))


def test_corrupt_object_is_a_checkpoint_error(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    import ckpt
    import ckpt.dcp
    from ckpt.storage.store import Store

    url = f"file://{tmp_path}/s"
    src = _plain_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(src, storage_writer=ckpt.dcp.StorageWriter(url, step=1))
        key = ckpt.read_manifest(url).tensors["w"].chunks[0].key
        path = Path(Store(url).object_path(key))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        dst: dict[str, Any] = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else {}) for k, v in src.items()}
        with pytest.raises(CheckpointException) as info:
            dcp.load(dst, storage_reader=ckpt.dcp.StorageReader(url))
    err = ckpt.dcp.checkpoint_error(info.value)
    assert isinstance(err, ckpt.CorruptCheckpointError) and key in str(err)


@pytest.mark.parametrize("damage", ["no checkpoint", "unlisted tensor", "malformed items", "missing value"])
def test_hostile_or_missing_store_is_a_checkpoint_error(tmp_path, damage):
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    import ckpt
    import ckpt.dcp
    from ckpt.storage.store import Store

    url = f"file://{tmp_path}/s"
    src = _plain_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if damage != "no checkpoint":
            dcp.save(src, storage_writer=ckpt.dcp.StorageWriter(url, step=1))
            path = Path(Store(url).manifest_path(1))
            doc = json.loads(path.read_text())
            items = doc["meta"]["dcp"]["items"]
            if damage == "unlisted tensor":
                items["w"][2] = "nope"
            elif damage == "malformed items":
                items["w"] = {"kind": "tensor"}
            else:
                items["cfg.lr"][1] = ["cfg", "gone"]
            path.write_text(json.dumps(doc))
        dst: dict[str, Any] = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else {}) for k, v in src.items()}
        dst["cfg"] = {"lr": 0.0, "name": "", "sizes": [], "opt": 1}
        with pytest.raises(CheckpointException) as info:
            dcp.load(dst, storage_reader=ckpt.dcp.StorageReader(url))
    assert isinstance(ckpt.dcp.checkpoint_error(info.value), ckpt.CheckpointError), info.value


class Custom:
    """A value only a pickle could store."""


def test_pickled_values_are_refused(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    import ckpt
    import ckpt.dcp

    url = f"file://{tmp_path}/s"
    with warnings.catch_warnings(), pytest.raises(CheckpointException) as info:
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3), "obj": Custom()}, storage_writer=ckpt.dcp.StorageWriter(url, step=1))
    err = ckpt.dcp.checkpoint_error(info.value)
    assert isinstance(err, ckpt.UnsupportedValueError) and "obj" in str(err)
    assert ckpt.steps(url) == []


def test_public_name():
    import ckpt

    assert ckpt.dcp.StorageWriter.__name__ == "StorageWriter"


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
