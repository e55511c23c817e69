"""The command line starts without torch, fast, and exits quietly into a closed pipe."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

import ckpt

#: the first-party plugins installed beside core in this checkout; a plugin whose module
#: imports torch at import time costs every command torch's start-up
PLUGINS_OFF = {"CKPT_DISABLE_PLUGINS": "ckpt-peft,ckpt-transformers,ckpt-lightning"}
CLI = [sys.executable, "-c", "import sys; from ckpt.cli.app import main; main(sys.argv[1:])"]
NO_TORCH = (
    "import sys, runpy; sys.argv = ['ckpt', *sys.argv[1:]]\n"
    "try:\n    from ckpt.cli.app import main; main(sys.argv[1:])\n"
    "except SystemExit: pass\n"
    "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
)


def run(args, env=None, code=NO_TORCH):
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full, timeout=120)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    url = f"file://{path}"
    ckpt.save(url, {"m": {"w": torch.ones(3)}, "v": {"t": (1, 2), "inf": float("inf")}}, step=1)
    ckpt.save(url, {"m": {"w": torch.ones(3)}, "v": {"t": (1, 3), "inf": float("inf")}}, step=2)
    return url


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["ls", "{url}"],
        ["show", "{url}"],
        ["show", "{url}", "--json"],
        ["du", "{url}"],
        ["diff", "{url}", "1", "2"],
        ["gc", "{url}", "--keep-last", "1", "--dry-run"],
        ["plugins"],
    ],
    ids=lambda a: " ".join(a),
)
def test_commands_start_without_torch(store, args):
    proc = run([a.format(url=store) for a in args], env=PLUGINS_OFF)
    assert proc.stderr.strip().endswith("NO-TORCH"), proc.stderr
    assert proc.stdout


def test_installed_plugins_do_not_import_torch_at_load(store):
    """Every ``ckpt`` command loads the installed plugins' modules: they must not import torch."""
    proc = run(["ls", store])
    assert proc.stderr.strip().endswith("NO-TORCH"), "a plugin's module imports torch at import time"


def test_diff_of_changed_tensors_still_compares(tmp_path):
    url = f"file://{tmp_path}"
    ckpt.save(url, {"w": torch.zeros(3)}, step=1)
    ckpt.save(url, {"w": torch.ones(3)}, step=2)
    proc = run(["diff", url, "1", "2"], env=PLUGINS_OFF)
    assert "changed" in proc.stdout and "1" in proc.stdout, proc.stdout + proc.stderr


def _median_wall(cmd, env) -> float:
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env={**os.environ, **env}, timeout=120, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_ls_starts_in_under_half_of_import_torch(store):
    torch_s = _median_wall([sys.executable, "-c", "import torch"], {})
    ls_s = _median_wall([*CLI, "ls", store], PLUGINS_OFF)
    assert ls_s < 0.5 * torch_s, f"ckpt ls {ls_s:.2f}s vs import torch {torch_s:.2f}s"


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_closed_pipe_is_a_quiet_exit(tmp_path, extra):
    url = f"file://{tmp_path}"
    ckpt.save(url, {"m": {str(i): torch.ones(1) for i in range(3000)}}, step=1)
    reader = subprocess.Popen(["head", "-1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    writer = subprocess.run(
        [*CLI, "show", url, *extra],
        stdout=reader.stdin,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        env={**os.environ, **PLUGINS_OFF},
    )
    reader.stdin.close()
    first = reader.stdout.read()
    reader.wait(timeout=60)
    assert first.strip()
    assert writer.stderr == "", writer.stderr
    assert writer.returncode == 0


def test_show_and_diff_print_python_values(tmp_path):
    store = f"file://{tmp_path}"
    ckpt.save(store, {"m": {"w": torch.ones(3)}, "v": {"t": (1, 2), "inf": float("inf")}}, step=1)
    ckpt.save(store, {"m": {"w": torch.ones(3)}, "v": {"t": (1, 3), "inf": float("inf")}}, step=2)
    show = run(["show", store, "--step", "1"], env=PLUGINS_OFF).stdout
    assert "v.t = (1, 2)" in show and "v.inf = inf" in show and "$" not in show
    diff = run(["diff", store, "1", "2"], env=PLUGINS_OFF).stdout
    assert "(1, 2) -> (1, 3)" in diff and "$" not in diff


def test_import_ckpt_is_lazy_and_complete():
    code = (
        "import sys, ckpt\n"
        "assert 'torch' not in sys.modules\n"
        "from ckpt import save, UnsupportedValueError, __version__\n"
        "assert ckpt.save is save and all(getattr(ckpt, n) is not None for n in ckpt.__all__)\n"
        "print(sorted(set(ckpt.__all__) - set(dir(ckpt))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
