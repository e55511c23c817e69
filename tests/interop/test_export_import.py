"""Export to safetensors / torch.save and import of torch.save, safetensors and DCP: bit-exact round trips."""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import ckpt
import ckpt.interop.export as ex
from ckpt.cli import build_cli
from ckpt.testing import make_training_state

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def run(*args: str):
    return CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_same_tree(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and same(a, b), path
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a), list(b))
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b and type(a) is type(b), (path, a, b)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"0.weight": t}}`` -> ``{"model.0.weight": t}`` (tensors only, NumPy as tensors)."""
    out: dict[str, Any] = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else None
    if items is None:
        if isinstance(tree, torch.Tensor):
            out[prefix] = tree
        elif isinstance(tree, np.ndarray):
            out[prefix] = torch.from_numpy(tree)
        return out
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for dt in DTYPES:
        base = torch.randn(3, 5, generator=g) * 100
        name = str(dt).removeprefix("torch.")
        if dt == torch.bool:
            out[name] = base > 0
        elif dt.is_complex:
            out[name] = torch.complex(base, -base).to(dt)
        elif dt.is_floating_point:
            out[name] = base.to(dt)
        else:
            out[name] = base.abs().to(torch.int64).to(dt)
    out["nan_inf"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    out["empty"] = torch.zeros(0, 3)
    out["scalar"] = torch.tensor(7.5, dtype=torch.bfloat16)
    out["transposed"] = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
    out["big_bf16"] = torch.randn(96, 64, generator=g).to(torch.bfloat16)  # several 4 KiB chunks
    return out


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    url = f"file://{root}/store"
    old = os.environ.get("CKPT_CHUNK_BYTES")
    os.environ["CKPT_CHUNK_BYTES"] = "4096"
    try:
        st = make_training_state(0, width=64)
        st["extra"] = every_dtype()
        st["np"] = np.arange(10, dtype=np.int32)
        st["epoch"] = 3
        ckpt.save(url, st, step=1)
        st["model"](torch.randn(4, 64)).sum().backward()
        st["optim"].step()
        ckpt.save(url, st, step=2)
    finally:
        if old is None:
            del os.environ["CKPT_CHUNK_BYTES"]
        else:
            os.environ["CKPT_CHUNK_BYTES"] = old
    return {"url": url, "root": root, "tree": ckpt.load(url)}


# -- export --------------------------------------------------------------------------------


def test_safetensors_export_is_bit_exact_with_pytorch_names(src, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "all.safetensors"
    r = run("export", src["url"], str(out))
    assert r.exit_code == 0, r.output
    got = load_file(str(out))
    want = flatten(src["tree"])
    assert set(got) == set(want)
    for name, t in want.items():
        assert same(got[name], t.contiguous()), name
    assert "model.0.weight" in got and "optim.state.0.exp_avg" in got and "extra.bfloat16" in got
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["ckpt"])
    assert meta["step"] == 2 and meta["tensors"]["model.0.weight"] == "model/0.weight"
    assert meta["tree"]["epoch"] == 3 and meta["adapters"]["optim"] == "torch.optim.Optimizer"


def test_safetensors_export_of_one_key_loads_into_the_module(src, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    assert run("export", src["url"], str(out), "--key", "model", "--step", "1").exit_code == 0
    fresh = make_training_state(9, width=64)["model"]
    fresh.load_state_dict(load_file(str(out)))
    want = ckpt.load(src["url"], step=1)["model"]
    assert all(same(fresh.state_dict()[k], want[k]) for k in want)


def test_torch_export_loads_weights_only_into_live_objects(src, tmp_path):
    out = tmp_path / "full.pt"
    assert run("export", src["url"], str(out)).exit_code == 0
    obj = torch.load(out, weights_only=True)
    tree = src["tree"]
    assert list(obj) == list(tree) and obj["epoch"] == 3
    assert same(obj["np"], torch.from_numpy(tree["np"]))  # NumPy arrays are written as tensors
    got, want = flatten(obj), flatten(tree)
    assert list(got) == list(want) and all(same(got[k], want[k]) for k in want)
    assert isinstance(obj["optim"]["state"], dict) and list(obj["optim"]["state"]) == list(range(6))
    live = make_training_state(4, width=64)
    live["model"].load_state_dict(obj["model"])
    live["optim"].load_state_dict(obj["optim"])
    assert list(live["optim"].state_dict()["state"]) == list(range(6))
    assert same(live["optim"].state_dict()["state"][0]["exp_avg"], tree["optim"]["state"][0]["exp_avg"])


def test_safetensors_cannot_hold_complex128_but_torch_can(tmp_path):
    url = f"file://{tmp_path}/s"
    ckpt.save(url, {"z": torch.randn(4, dtype=torch.complex128)}, step=0)
    r = run("export", url, str(tmp_path / "z.safetensors"))
    assert r.exit_code == 2 and "complex128 has no safetensors equivalent" in r.stderr
    assert run("export", url, str(tmp_path / "z.data"), "--format", "torch").exit_code == 0  # --format wins
    assert same(torch.load(tmp_path / "z.data", weights_only=True)["z"], ckpt.load(url)["z"])


def test_export_streams_a_bounded_window_of_chunks(src, monkeypatch):
    """The safetensors writer never decodes more than `window` chunks ahead of the file."""
    from ckpt.hooks.manager import get_plugins
    from ckpt.io.writer import Reader
    from ckpt.storage.store import Store

    started = []
    real = Reader.read_chunk

    def spy(self, ref, out, *, what):
        started.append(ref.key)
        return real(self, ref, out, what=what)

    monkeypatch.setattr(Reader, "read_chunk", spy)
    store = Store(src["url"])
    m = ckpt.read_manifest(store.url, None)
    items = [(p, r) for p, e in m.tensors.items() for r in e.chunks if not any("parent" in s for s in r.codec)]
    assert len(items) > 20
    consumed = 0
    from ckpt.io.plan import ChunkRead, ReadPlan
    from ckpt.io.reader import iter_chunks

    plan = ReadPlan(m, tuple(p for p, _ in items), tuple(ChunkRead(p, r, 0) for p, r in items))
    for raw in iter_chunks(store, get_plugins().codecs, plan, window=3):
        consumed += 1
        assert len(started) <= consumed + 3
        assert len(raw) == items[consumed - 1][1].size
    assert consumed == len(items)


# -- import --------------------------------------------------------------------------------


def test_ckpt_safetensors_export_imports_back_exactly(src, tmp_path):
    out = tmp_path / "all.safetensors"
    assert run("export", src["url"], str(out)).exit_code == 0
    url = f"file://{tmp_path}/back"
    doc = json.loads(run("import", str(out), url, "--step", "5", "--json").stdout)
    assert doc["kind"] == "safetensors" and doc["step"] == 5 and doc["tensors"] == len(flatten(src["tree"]))
    assert_same_tree(ckpt.load(url), src["tree"])  # NumPy, tuples, int keys and values included
    live = make_training_state(3, width=64)
    ckpt.restore(url, {"model": live["model"], "optim": live["optim"]})  # adapters came along
    assert same(live["model"].state_dict()["0.weight"], src["tree"]["model"]["0.weight"])


def test_torch_save_import_round_trips(src, tmp_path):
    st = make_training_state(1, width=64)
    original = {
        "model": st["model"].state_dict(),
        "optim": st["optim"].state_dict(),
        "extra": every_dtype(),
        "epoch": 4,
    }
    path = tmp_path / "orig.pt"
    torch.save(original, path)
    url = f"file://{tmp_path}/imp"
    r = run(
        "import",
        str(path),
        url,
        "--step",
        "3",
        "--adapter",
        "model=torch.nn.Module",
        "--adapter",
        "optim=torch.optim.Optimizer",
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"imported {path} (torch) as step 3")
    reread = torch.load(path, weights_only=True)
    assert_same_tree(ckpt.load(url), reread)
    out = tmp_path / "again.pt"
    assert run("export", url, str(out)).exit_code == 0
    assert_same_tree(torch.load(out, weights_only=True), reread)
    live = make_training_state(2, width=64)
    ckpt.restore(url, {"model": live["model"], "optim": live["optim"]})
    assert same(live["model"].state_dict()["2.weight"], original["model"]["2.weight"])


def test_legacy_torch_save_imports(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(6.0)}, path, _use_new_zipfile_serialization=False)
    url = f"file://{tmp_path}/s"
    assert run("import", str(path), url, "--step", "0").exit_code == 0
    assert same(ckpt.load(url)["w"], torch.arange(6.0))


def test_foreign_safetensors_round_trips_names_and_metadata(tmp_path, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = {f"encoder.layer.{i}.weight": torch.randn(16, 16).to(torch.bfloat16) for i in range(5)}
    tensors["embeddings/odd~name"] = torch.arange(10, dtype=torch.int64)
    path = tmp_path / "hf.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "source": "hub"})
    monkeypatch.setattr(ex, "IMPORT_WINDOW_BYTES", 600)  # forces waiting on earlier tensors
    url = f"file://{tmp_path}/s"
    assert run("import", str(path), url, "--step", "1").exit_code == 0
    loaded = ckpt.load(url)
    assert set(loaded) == set(tensors) and all(same(loaded[k], t) for k, t in tensors.items())
    out = tmp_path / "out.safetensors"
    assert run("export", url, str(out)).exit_code == 0
    back = load_file(str(out))
    assert set(back) == set(tensors) and all(same(back[k], t) for k, t in tensors.items())
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["source"] == "hub"


def test_dcp_directory_imports_with_dcp_reader(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    st = make_training_state(2, width=64)
    state = {"model": st["model"].state_dict(), "optim": st["optim"].state_dict(), "extra": every_dtype()}
    state["extra"].pop("transposed")  # DCP itself stores views of the full storage
    ckpt_dir = tmp_path / "dcp"
    with pytest.warns(UserWarning):
        dcp.save(state, checkpoint_id=str(ckpt_dir))

    loads = []
    from ckpt.interop import dcp as dcp_import

    real = dcp_import.DCPSource._load
    monkeypatch.setattr(dcp_import.DCPSource, "_load", lambda self, fqns: loads.append(len(fqns)) or real(self, fqns))
    monkeypatch.setattr(dcp_import, "IMPORT_WINDOW_BYTES", 40_000)  # several batches
    url = f"file://{tmp_path}/s"
    doc = json.loads(run("import", str(ckpt_dir), url, "--step", "7", "--json").stdout)
    assert doc["kind"] == "dcp" and doc["step"] == 7
    assert len(loads) >= 3  # non-tensor entries, then tensors in batches
    tree = ckpt.load(url)
    assert all(same(tree["model"][k], v) for k, v in state["model"].items())
    assert all(same(tree["extra"][k], v) for k, v in state["extra"].items())
    # DCP stringifies mapping keys; values come back as saved
    assert same(tree["optim"]["state"]["0"]["exp_avg"], state["optim"]["state"][0]["exp_avg"])
    assert tree["optim"]["param_groups"][0]["lr"] == state["optim"]["param_groups"][0]["lr"]
    assert tree["optim"]["param_groups"][0]["params"] == [0, 1, 2, 3, 4, 5]

    out = tmp_path / "dcp.safetensors"
    assert run("export", url, str(out)).exit_code == 0
    from safetensors.torch import load_file

    got = load_file(str(out))
    meta = dcp.FileSystemReader(str(ckpt_dir)).read_metadata()
    tensor_fqns = {k for k, v in meta.state_dict_metadata.items() if hasattr(v, "size")}
    assert set(got) == tensor_fqns  # the same flattened names DCP uses
    assert same(got["model.0.weight"], state["model"]["0.weight"])


class Evil:
    """Pickles to a call that creates a marker file: loading it must never run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_import_never_unpickles_code(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Evil(str(marker))}, path)
    r = run("import", str(path), f"file://{tmp_path}/s", "--step", "0")
    assert r.exit_code == 2 and "weights_only=True" in r.stderr and r.stderr.count("\n") == 1
    with pytest.warns(UserWarning):
        dcp.save({"w": torch.ones(2), "x": Evil(str(marker))}, checkpoint_id=str(tmp_path / "dcp"))
    r = run("import", str(tmp_path / "dcp"), f"file://{tmp_path}/s", "--step", "0")
    assert r.exit_code == 2 and "entry 'x' is not weights-only data" in r.stderr
    assert not marker.exists()
    assert not (tmp_path / "s" / "manifests").exists()


def test_import_errors_are_clean(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world, not a checkpoint")
    (tmp_path / "dir").mkdir()
    for args, text in (
        (["import", str(junk), str(tmp_path / "s"), "--step", "0"], "neither a torch.save file"),
        (["import", str(tmp_path / "dir"), str(tmp_path / "s"), "--step", "0"], "no .metadata file"),
        (["import", str(junk), str(tmp_path / "s")], "Missing option '--step'"),
        (["import", str(tmp_path / "nope.pt"), str(tmp_path / "s"), "--step", "0"], "does not exist"),
    ):
        r = run(*args)
        assert r.exit_code == 2 and text in r.stderr and "Traceback" not in r.output, (args, r.output)
    path = tmp_path / "t.pt"
    torch.save({"w": torch.ones(1)}, path)
    r = run("import", str(path), str(tmp_path / "s"), "--step", "0", "--adapter", "w=no.such.adapter")
    assert r.exit_code == 2 and "no adapter named 'no.such.adapter'" in r.stderr
    torch.save([torch.ones(1)], path)
    r = run("import", str(path), str(tmp_path / "s"), "--step", "0")
    assert r.exit_code == 2 and "not a mapping" in r.stderr
