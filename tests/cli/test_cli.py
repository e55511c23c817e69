"""The ``ckpt`` command line through its real entry points, on a real two-step store.

Every command runs through :func:`ckpt.cli.build_cli` (click's CliRunner) and a few
through the installed ``ckpt`` console script in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

import ckpt
import ckpt.hooks.manager
from ckpt.cli import build_cli
from ckpt.cli.common import parse_storage_options
from ckpt.errors import PluginError
from ckpt.storage.manifest import Manifest
from ckpt.testing import make_training_state

CKPT_BIN = Path(sys.executable).parent / "ckpt"


def run(*args: str, env: dict | None = None):
    result = CliRunner(env=env).invoke(build_cli(), list(args), catch_exceptions=False)
    return result


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("ckpt: error:"), err
    assert "Traceback" not in result.output
    return err


def _state(seed: int):
    st = make_training_state(seed, width=64)
    st["frozen"] = torch.arange(4096, dtype=torch.float32).reshape(64, 64)  # identical in both steps: dedup
    return st


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A file store with steps 1 and 2 (one optimizer step apart), 4 KiB chunks."""
    root = tmp_path_factory.mktemp("cli")
    url = f"file://{root}/store"
    old = os.environ.get("CKPT_CHUNK_BYTES")
    os.environ["CKPT_CHUNK_BYTES"] = "4096"  # several chunks per tensor
    try:
        st = _state(0)
        info1 = ckpt.save(url, st, step=1)
        st["model"](torch.randn(8, 64)).square().mean().backward()
        st["optim"].step()
        st["sched"].step()
        info2 = ckpt.save(url, st, step=2)
    finally:
        if old is None:
            del os.environ["CKPT_CHUNK_BYTES"]
        else:
            os.environ["CKPT_CHUNK_BYTES"] = old
    return {"url": url, "root": Path(f"{root}/store"), "infos": {1: info1, 2: info2}}


def manifest(store, step: int) -> Manifest:
    return Manifest.from_json_bytes((store["root"] / "manifests" / f"{step}.json").read_bytes(), where="test")


def object_keys(m: Manifest) -> dict[str, int]:
    from ckpt.codecs.delta import referenced_keys

    out = {}
    for ref in m.chunk_refs():
        out[ref.key] = ref.stored
    # delta parents are referenced too
    for ref in m.chunk_refs():
        for k in referenced_keys(ref.to_json()):
            out.setdefault(k, None)
    return out


# -- ls ------------------------------------------------------------------------------------


def test_ls_human_and_json(store):
    r = run("ls", store["url"])
    assert r.exit_code == 0
    lines = r.stdout.strip().splitlines()
    assert lines[0].split() == ["step", "created", "tensors", "raw", "stored", "ratio", "new", "lineage"]
    rows = [line.split() for line in lines[1:]]
    assert [row[0] for row in rows] == ["1", "2"]
    n_tensors = len(manifest(store, 1).tensors)
    assert all(row[3] == str(n_tensors) for row in rows)  # created is two words (date time)

    doc = json.loads(run("ls", store["url"], "--json").stdout)
    assert doc["url"] == store["url"] and doc["errors"] == []
    for row in doc["checkpoints"]:
        info = store["infos"][row["step"]]
        m = manifest(store, row["step"])
        assert row["tensors"] == len(m.tensors) == info.tensors
        assert row["raw_bytes"] == info.raw_bytes
        assert row["new_bytes"] == info.stored_bytes
        stored = {r.key: r for r in m.chunk_refs()}
        assert row["stored_bytes"] >= sum(r.stored for r in stored.values())
        assert row["ratio"] > 1.0  # arange and Adam state compress
        assert row["manifest_bytes"] == (store["root"] / "manifests" / f"{row['step']}.json").stat().st_size
    assert doc["checkpoints"][1]["parent"] == 1


def test_ls_on_every_store_kind(store_url):
    ckpt.save(store_url, {"w": torch.ones(10)}, step=7)
    doc = json.loads(run("ls", store_url, "--json").stdout)
    assert [c["step"] for c in doc["checkpoints"]] == [7]
    assert doc["checkpoints"][0]["raw_bytes"] == 40


# -- show ----------------------------------------------------------------------------------


def test_show_plain_table(store):
    r = run("show", store["url"], "--step", "1")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].startswith("step 1 of ")
    header = lines[1].split()
    assert header == ["name", "dtype", "shape", "codec", "stored", "status"]
    rows = {line.split()[0]: line.split() for line in lines[2:] if line and not line.startswith(("values:", " "))}
    assert rows["model.0.weight"][1:4] == ["float32", "64x64", "bgzstd"]
    assert rows["frozen"][1:3] == ["float32", "64x64"]
    assert rows["optim.state.0.exp_avg"][1] == "float32"
    assert "values:" in lines and any(line.strip().startswith("sched.last_epoch = ") for line in lines)


def test_show_json_dedup_and_delta(store):
    doc1 = json.loads(run("show", store["url"], "--step", "1", "--json").stdout)
    doc2 = json.loads(run("show", store["url"], "--json").stdout)  # newest = 2
    assert doc2["step"] == 2 and doc2["parent"] == 1
    t1 = {t["path"]: t for t in doc1["tensors"]}
    t2 = {t["path"]: t for t in doc2["tensors"]}
    m2 = manifest(store, 2)
    assert set(t2) == set(m2.tensors)
    for path, t in t2.items():
        entry = m2.tensors[path]
        assert t["dtype"] == entry.dtype and t["shape"] == list(entry.shape)
        assert t["stored"] == sum(c.stored for c in entry.chunks)
        assert [c["key"] for c in t["chunks"]] == [c.key for c in entry.chunks]
        is_delta = any("parent" in s for c in entry.chunks for s in c.codec)
        assert (t["status"] == "delta") == is_delta
    # the frozen tensor: written by step 1, reused by step 2
    assert t1["frozen"]["status"] == "new" and all(c["shared_with"] == [2] for c in t1["frozen"]["chunks"])
    assert t2["frozen"]["status"] == "dedup" and all(c["shared_with"] == [1] for c in t2["frozen"]["chunks"])
    assert len(t2["frozen"]["chunks"]) == 4  # 16 KiB in 4 KiB chunks
    assert t2["model/0.weight"]["name"] == "model.0.weight"
    assert t2["model/0.weight"]["status"] in ("new", "delta", "partial")
    assert doc2["adapters"]["model"] == "torch.nn.Module"
    assert doc2["tree"]["model"]["0.weight"] == {"$tensor": "model/0.weight"}


def test_show_rich_tree_on_a_terminal_via_console_script(store):
    env = {**os.environ, "TTY_COMPATIBLE": "1", "NO_COLOR": "1", "COLUMNS": "120"}
    p = subprocess.run([str(CKPT_BIN), "show", store["url"]], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    out = re.sub(r"\x1b\[[0-9;]*m", "", p.stdout)  # styles (bold, dim) stay even with NO_COLOR
    assert "├── model" in out and "└── frozen  float32[64, 64]" in out and "dedup" in out
    assert "0.weight  float32[64, 64]" in out


# -- diff ----------------------------------------------------------------------------------


def test_diff_two_steps(store):
    doc = json.loads(run("diff", store["url"], "1", "2", "--json").stdout)
    a, b = ckpt.load(store["url"], step=1), ckpt.load(store["url"], step=2)
    changed = {c["tensor"]: c for c in doc["changed"]}
    assert "frozen" not in changed and doc["added"] == [] and doc["removed"] == []
    want = (a["model"]["0.weight"] - b["model"]["0.weight"]).abs().max().item()
    assert changed["model/0.weight"]["max_abs_diff"] == pytest.approx(want, rel=1e-6)
    assert changed["optim/state/0/step"]["max_abs_diff"] == 1.0
    assert doc["unchanged"] == len(manifest(store, 2).tensors) - len(changed)
    assert {"path": "sched/last_epoch", "a": a["sched"]["last_epoch"], "b": b["sched"]["last_epoch"]} in doc[
        "values_changed"
    ]
    common = set(object_keys(manifest(store, 1))) & set(object_keys(manifest(store, 2)))
    assert doc["shared"]["objects"] == len(common) >= 4  # at least the frozen tensor's chunks

    human = run("diff", store["url"], "1", "2")
    assert human.exit_code == 0
    summary = human.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"step 1 -> 2: {len(changed)} changed, 0 added, 0 removed")
    assert any(line.split()[:2] == ["changed", "model.0.weight"] for line in human.stdout.splitlines())
    assert "value sched.last_epoch: " in human.stdout


def test_diff_added_removed_and_dtype_change(tmp_path):
    url = f"file://{tmp_path}/s"
    ckpt.save(url, {"a": torch.zeros(3), "b": torch.ones(2), "c": torch.zeros(2)}, step=1)
    ckpt.save(
        url,
        {"a": torch.tensor([0.0, float("nan"), 2.0]), "c": torch.zeros(2, dtype=torch.int64), "d": torch.ones(1)},
        step=2,
    )
    doc = json.loads(run("diff", url, "1", "2", "--json").stdout)
    assert [x["tensor"] for x in doc["added"]] == ["d"]
    assert [x["tensor"] for x in doc["removed"]] == ["b"]
    changed = {c["tensor"]: c for c in doc["changed"]}
    assert changed["a"]["max_abs_diff"] == "inf"  # NaN against a number
    assert changed["c"]["max_abs_diff"] is None and changed["c"]["b"]["dtype"] == "int64"


# -- verify --------------------------------------------------------------------------------


def test_verify_ok(store):
    r = run("verify", store["url"])
    assert r.exit_code == 0 and r.stdout.startswith("OK: 2 checkpoint(s)")
    doc = json.loads(run("verify", store["url"], "--json").stdout)
    keys = set()
    for s in (1, 2):
        keys |= {ref.key for ref in manifest(store, s).chunk_refs()}
    assert doc["ok"] and doc["objects"] == len(keys) and doc["steps"] == [1, 2]
    one = json.loads(run("verify", store["url"], "--step", "1", "--json").stdout)
    assert one["steps"] == [1] and one["objects"] == len({r.key for r in manifest(store, 1).chunk_refs()})


def test_verify_names_each_corrupt_object_and_tensor(store, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(store["root"], root)
    m1 = Manifest.from_json_bytes((root / "manifests" / "1.json").read_bytes(), where="t")
    key = m1.tensors["frozen"].chunks[1].key
    obj = root / "objects" / key[:2] / key
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.write_bytes(bytes(data))

    r = run("verify", str(root))
    assert r.exit_code == 1
    assert f"BAD object {key}" in r.stdout
    assert "used by step 1 tensor 'frozen'" in r.stdout and "used by step 2 tensor 'frozen'" in r.stdout
    assert "verification failed: 1 bad object" in r.stderr
    doc = json.loads(run("verify", str(root), "--json").stdout)
    assert not doc["ok"] and [p["key"] for p in doc["problems"]] == [key]
    assert {"step": 2, "tensor": "frozen"} in doc["problems"][0]["references"]

    # reading the corrupt object anywhere else is exit 1 too, one line, no traceback
    err = one_line_error(run("export", str(root), str(tmp_path / "x.safetensors")), 1)
    assert key in err and "frozen" in err
    assert not (tmp_path / "x.safetensors").exists()


# -- export (the bit-exact read-backs are in test_export_import.py) ------------------------


def test_export_safetensors_and_torch_via_cli(store, tmp_path):
    from safetensors.torch import load_file

    want = ckpt.load(store["url"], step=1)
    out = tmp_path / "m.safetensors"
    doc = json.loads(run("export", store["url"], str(out), "--step", "1", "--key", "model", "--json").stdout)
    assert doc["format"] == "safetensors" and doc["step"] == 1 and doc["file_bytes"] == out.stat().st_size
    sd = load_file(str(out))
    assert set(sd) == set(want["model"])
    model = _state(5)["model"]
    model.load_state_dict(sd)
    assert all(torch.equal(model.state_dict()[k], want["model"][k]) for k in sd)

    out_pt = tmp_path / "full.bin"
    r = run("export", store["url"], str(out_pt))
    assert r.exit_code == 0 and "(torch," in r.stdout
    obj = torch.load(out_pt, weights_only=True)
    assert torch.equal(obj["frozen"], want["frozen"])


def test_export_bad_suffix_is_a_usage_error(store, tmp_path):
    err = one_line_error(run("export", store["url"], str(tmp_path / "x.weird")), 2)
    assert "--format" in err


# -- gc / du -------------------------------------------------------------------------------


def test_gc_removes_what_it_says(store, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(store["root"], root)
    url = f"file://{root}"
    before = {p.name for p in (root / "objects").rglob("*") if p.is_file()}

    dry = json.loads(run("gc", url, "--keep-last", "1", "--dry-run", "--grace-seconds", "0", "--json").stdout)
    assert dry["dry_run"] and dry["removed_steps"] == [1] and dry["kept_steps"] == [2]
    assert {p.name for p in (root / "objects").rglob("*") if p.is_file()} == before  # nothing deleted

    only_1 = set(object_keys(manifest({"root": root}, 1))) - set(object_keys(manifest({"root": root}, 2)))
    m1_size = (root / "manifests" / "1.json").stat().st_size
    freed = sum((root / "objects" / k[:2] / k).stat().st_size for k in only_1) + m1_size
    r = run("gc", url, "--keep-last", "1", "--grace-seconds", "0")
    assert r.exit_code == 0
    assert r.stdout.splitlines()[0].startswith(f"removed checkpoints: 1; removed {len(only_1)} objects")
    after = {p.name for p in (root / "objects").rglob("*") if p.is_file()}
    assert before - after == only_1 and dry["removed_objects"] == len(only_1) and dry["freed_bytes"] == freed
    assert not (root / "manifests" / "1.json").exists()
    assert run("verify", url).exit_code == 0
    assert [c["step"] for c in json.loads(run("ls", url, "--json").stdout)["checkpoints"]] == [2]


def test_gc_requires_keep_last(store):
    r = run("gc", store["url"])
    assert r.exit_code == 2 and "--keep-last" in r.stderr


def test_du(store):
    doc = json.loads(run("du", store["url"], "--json").stdout)
    files = [p for p in (store["root"] / "objects").rglob("*") if p.is_file()]
    assert doc["store"]["objects"] == len(files)
    assert doc["store"]["bytes"] == sum(p.stat().st_size for p in files)
    assert doc["store"]["unreferenced_objects"] == 0 and doc["store"]["missing_objects"] == 0
    rows = {c["step"]: c for c in doc["checkpoints"]}
    for step, row in rows.items():
        assert row["unique_bytes"] + row["shared_bytes"] == row["stored_bytes"]
        assert row["objects"] == len(object_keys(manifest(store, step)))
    common = set(object_keys(manifest(store, 1))) & set(object_keys(manifest(store, 2)))
    assert rows[1]["shared_bytes"] == rows[2]["shared_bytes"] > 0 and common
    assert doc["gc"]["removed_steps"] == [1] and doc["gc"]["keep_last"] == 1 and doc["gc"]["dry_run"]
    from ckpt import config

    assert doc["gc"]["grace_seconds"] == config.gc_grace_seconds()
    now = json.loads(run("du", store["url"], "--grace-seconds", "0", "--json").stdout)["gc"]
    only_1 = set(object_keys(manifest(store, 1))) - set(object_keys(manifest(store, 2)))
    assert now["removed_objects"] == len(only_1) and now["kept_steps"] == [2]
    human = run("du", store["url"])
    assert human.exit_code == 0 and "gc --keep-last 1 would remove checkpoints: 1;" in human.stdout


# -- plugins -------------------------------------------------------------------------------


def test_plugins_lists_builtins():
    r = run("plugins")
    assert r.exit_code == 0
    row = next(line.split() for line in r.stdout.splitlines() if line.startswith("ckpt.hooks.defaults"))
    assert row[1] == ckpt.__version__
    doc = json.loads(run("plugins", "--json").stdout)
    builtins = next(p for p in doc["plugins"] if p["name"] == "ckpt.hooks.defaults")
    assert "ckpt_register_adapters" in builtins["hooks"] and "ckpt_register_codecs" in builtins["hooks"]


class FakeCommandPlugin:
    """A plugin adding ``ckpt hello``; registered on a real plugin manager."""

    @ckpt.hookimpl
    def ckpt_register_commands(self, cli):
        @click.command("hello")
        @click.argument("who")
        def hello(who):
            """Say hello (from a plugin)."""
            click.echo(f"hello {who} from a plugin")

        cli.add_command(hello)


def _with_plugin(monkeypatch, plugin, name):
    real = ckpt.hooks.manager.make_plugin_manager

    def factory(**kw):
        pm = real(**kw)
        pm.register(plugin, name=name)
        return pm

    monkeypatch.setattr(ckpt.hooks.manager, "make_plugin_manager", factory)
    ckpt.hooks.manager.reset_plugins()


def test_plugin_adds_a_subcommand(monkeypatch):
    _with_plugin(monkeypatch, FakeCommandPlugin(), "fake-cli-plugin")
    r = run("hello", "world")
    assert r.exit_code == 0 and r.stdout == "hello world from a plugin\n"
    assert "hello" in run("--help").stdout
    doc = json.loads(run("plugins", "--json").stdout)
    fake = next(p for p in doc["plugins"] if p["name"] == "fake-cli-plugin")
    assert fake["hooks"] == ["ckpt_register_commands"]


def test_plugin_cannot_replace_a_builtin_command(monkeypatch):
    class Clobber:
        @ckpt.hookimpl
        def ckpt_register_commands(self, cli):
            cli.add_command(click.Command("ls", callback=lambda: None))

    _with_plugin(monkeypatch, Clobber(), "clobber")
    with pytest.raises(PluginError, match="replace the built-in command 'ckpt ls'"):
        build_cli()


# -- errors and options --------------------------------------------------------------------


def test_clean_errors(tmp_path, store):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (
        ["ls", str(empty)],
        ["show", str(empty)],
        ["verify", str(empty)],
        ["du", str(empty)],
        ["gc", str(empty), "--keep-last", "1"],
        ["export", str(empty), str(tmp_path / "o.pt")],
    ):
        assert "no checkpoint in" in one_line_error(run(*args), 2)
    assert "no checkpoint at step 9" in one_line_error(run("show", store["url"], "--step", "9"), 2)
    assert "step 9" in one_line_error(run("diff", store["url"], "1", "9"), 2)
    assert "Protocol not known" in one_line_error(run("ls", "nosuchproto://x"), 2)
    assert "no key 'nope'" in one_line_error(run("export", store["url"], str(tmp_path / "o.pt"), "--key", "nope"), 2)
    r = run("ls", store["url"], "--storage-option", "novalue")
    assert r.exit_code == 2 and "expected KEY=VALUE" in r.stderr


def test_debug_shows_the_traceback(tmp_path):
    r = run("--debug", "ls", str(tmp_path))
    assert r.exit_code == 2
    assert "Traceback" in r.stderr and "NoCheckpointError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("ckpt: error: no checkpoint in")


def test_console_script_exit_codes(tmp_path, store):
    p = subprocess.run([str(CKPT_BIN), "ls", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == f"ckpt: error: no checkpoint in {tmp_path}"
    p = subprocess.run([str(CKPT_BIN), "ls", store["url"], "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and [c["step"] for c in json.loads(p.stdout)["checkpoints"]] == [1, 2]


def test_storage_options_are_parsed_and_passed(monkeypatch, store):
    assert parse_storage_options(
        ["anon=false", "n=3", "name=x=y", "client_kwargs.endpoint_url=http://h:1", "flag=TRUE", "v=1.5"]
    ) == {
        "anon": False,
        "n": 3,
        "name": "x=y",
        "client_kwargs": {"endpoint_url": "http://h:1"},
        "flag": True,
        "v": "1.5",
    }
    import fsspec.core

    seen = []
    real = fsspec.core.url_to_fs

    def spy(url, **kw):
        seen.append(kw)
        return real(url, **{k: v for k, v in kw.items() if k == "auto_mkdir"})

    monkeypatch.setattr(fsspec.core, "url_to_fs", spy)
    assert run("ls", store["url"], "-o", "auto_mkdir=true", "-o", "retries=5").exit_code == 0
    assert seen and all(kw == {"auto_mkdir": True, "retries": 5} for kw in seen)


def test_every_command_has_help_with_examples():
    root = build_cli()
    for name in ("ls", "show", "diff", "verify", "export", "import", "gc", "unlock", "plugins", "du"):
        r = run(name, "--help")
        assert r.exit_code == 0 and "Examples:" in r.stdout and "Exit codes" in r.stdout, name
        if name not in ("export", "import", "gc"):
            assert "JSON schema:" in r.stdout, name
    assert set(root.commands) >= {"ls", "show", "diff", "verify", "export", "import", "gc", "unlock", "plugins", "du"}


def test_terminal_rendering_and_progress_bars(store, tmp_path):
    """With a terminal (forced through rich's TTY_COMPATIBLE), tables are rich and bars run."""
    root = tmp_path / "copy"
    shutil.copytree(store["root"], root)
    tty = {"TTY_COMPATIBLE": "1", "NO_COLOR": "1", "COLUMNS": "120"}
    r = CliRunner(env=tty).invoke(build_cli(), ["ls", str(root)], catch_exceptions=False)
    assert r.exit_code == 0 and "┃ step ┃" in re.sub(r"\x1b\[[0-9;]*m", "", r.stdout)
    for args in (
        ["verify", str(root)],
        ["export", str(root), str(tmp_path / "o.safetensors")],
        ["import", str(tmp_path / "o.safetensors"), str(root), "--step", "3"],
        ["gc", str(root), "--keep-last", "1", "--grace-seconds", "0"],
    ):
        r = CliRunner(env=tty).invoke(build_cli(), args, catch_exceptions=False)
        assert r.exit_code == 0, (args, r.output)
    assert json.loads(run("ls", str(root), "--json").stdout)["checkpoints"][0]["step"] == 3


def test_unreadable_manifest_is_reported_not_fatal(store, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(store["root"], root)
    (root / "manifests" / "1.json").write_bytes(b"{not json")
    r = run("ls", str(root))
    assert r.exit_code == 1
    assert [line.split()[0] for line in r.stdout.strip().splitlines()[1:]] == ["2"]
    assert "step 1:" in r.stderr and "not valid JSON" in r.stderr
    r = run("verify", str(root))
    assert r.exit_code == 1 and "BAD manifest:" in r.stdout
    assert "not valid JSON" in one_line_error(run("show", str(root), "--step", "1"), 1)


def test_report_skips_a_malformed_nested_parent_record():
    from ckpt.cli import report
    from ckpt.storage.manifest import ChunkRef

    bad = ChunkRef(
        hash="ab" * 16,
        key="ab" * 16 + ".xcd",
        size=8,
        stored=8,
        codec=({"name": "xor", "parent": {"hash": "cd" * 16, "size": 8, "codec": ["bgzstd"]}},),
    )
    assert [r.key for r in report._closure(bad)] == [bad.key]


def test_control_characters_from_a_store_never_reach_the_terminal(tmp_path):
    """A tree key or a stray file name with control characters: show, diff and verify
    printed them raw (a hostile store cleared the screen, set the title, forged a line)."""
    url = str(tmp_path / "s")
    ckpt.save(url, {"t": torch.ones(2), "epoch": 1}, step=1)
    ckpt.save(url, {"t": torch.ones(2), "epoch": 2}, step=2)
    path = tmp_path / "s" / "manifests" / "2.json"
    doc = json.loads(path.read_text())
    doc["tree"]["x\x1b[2J\nOK: 9 checkpoint(s) verified"] = doc["tree"].pop("epoch")
    doc["adapters"] = {}
    path.write_text(json.dumps(doc))
    (tmp_path / "s" / "manifests" / "\x1b]0;owned\x07.json").write_text("{}")
    tty = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "0", "COLUMNS": "200"}
    for args, env in (
        (["show", url], None),
        (["show", url], tty),
        (["diff", url, "1", "2"], None),
        (["verify", url], None),
    ):
        out = CliRunner(env=env).invoke(build_cli(), args, catch_exceptions=False).output
        assert "\x07" not in out and "\x1b[2J" not in out and "\x1b]0" not in out, (args, out)
        assert "\nOK: 9" not in out, (args, out)
        assert "\\x1b" in out, (args, out)
