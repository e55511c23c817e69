"""The command line on an encrypted store: ``--key-file``, ``CKPT_KEY_FILE``, ``--key-provider``
(KMS on moto), no key, a wrong key, a bad key file, and ``ckpt rekey``."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

import ckpt
from ckpt.cli import build_cli
from ckpt.security.keys import StaticKeyProvider

KEY = bytes(range(1, 33))


def run(*args: str, env: dict | None = None):
    return CliRunner(env=env).invoke(build_cli(), list(args), catch_exceptions=False)


def error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("ckpt: error:") and "Traceback" not in result.output, err
    return err


def _state(step: int) -> dict:
    return {
        "model": {"layer.weight": torch.arange(2048, dtype=torch.float32) + step, "frozen": torch.ones(4096)},
        "note": f"secret-note-{step}",
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An encrypted file store with steps 1 and 2, and its key file (hex)."""
    root = tmp_path_factory.mktemp("enc")
    key_file = root / "store.key"
    key_file.write_text(KEY.hex() + "\n")
    url = f"file://{root}/store"
    for step in (1, 2):
        ckpt.save(url, _state(step), step=step, encryption=ckpt.Encryption(KEY))
    return root, url, key_file


@pytest.fixture
def enc(built, tmp_path):
    """A private copy of the built store (tests may change it)."""
    root, _url, key_file = built
    shutil.copytree(root / "store", tmp_path / "store")
    shutil.copy(key_file, tmp_path / "store.key")
    return f"file://{tmp_path}/store", str(tmp_path / "store.key")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_read_commands_with_the_key(built, tmp_path, monkeypatch, how):
    _root, url, key_file = built
    if how == "env":
        monkeypatch.setenv("CKPT_KEY_FILE", str(key_file))
        key = []
    else:
        monkeypatch.delenv("CKPT_KEY_FILE", raising=False)
        key = ["--key-file", str(key_file)]

    ls = run("ls", url, *key, "--json")
    assert ls.exit_code == 0, ls.output
    assert [c["step"] for c in json.loads(ls.stdout)["checkpoints"]] == [1, 2]

    show = run("show", url, *key, "--step", "1")
    assert show.exit_code == 0 and "layer.weight" in show.stdout and "secret-note-1" in show.stdout

    diff = run("diff", url, "1", "2", *key, "--json")
    assert diff.exit_code == 0, diff.output
    changed = json.loads(diff.stdout)["changed"]
    assert [c["max_abs_diff"] for c in changed] == [1.0] and "layer.weight" in changed[0]["tensor"]

    verify = run("verify", url, *key, "--json")
    assert verify.exit_code == 0, verify.output
    doc = json.loads(verify.stdout)
    assert doc["ok"] and doc["steps"] == [1, 2]

    du = run("du", url, *key, "--json")
    assert du.exit_code == 0, du.output

    out = tmp_path / "model.safetensors"
    export = run("export", url, str(out), *key, "--key", "model")
    assert export.exit_code == 0, export.output
    from safetensors.torch import load_file

    loaded = load_file(str(out))
    assert torch.equal(loaded["layer.weight"], _state(2)["model"]["layer.weight"])


COMMANDS = {
    "ls": ["ls", "{url}"],
    "show": ["show", "{url}"],
    "diff": ["diff", "{url}", "1", "2"],
    "export": ["export", "{url}", "{out}"],
    "gc": ["gc", "{url}", "--keep-last", "1"],
    "du": ["du", "{url}"],
}


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_no_key_wrong_key_bad_key_file(built, tmp_path, monkeypatch, cmd):
    monkeypatch.delenv("CKPT_KEY_FILE", raising=False)
    _root, url, _key_file = built
    args = [a.format(url=url, out=tmp_path / "o.safetensors") for a in COMMANDS[cmd]]
    key_id = StaticKeyProvider(KEY).key_id

    err = error_line(run(*args))
    assert "is encrypted" in err and key_id in err and "--key-file" in err

    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    err = error_line(run(*args, "--key-file", str(wrong)))
    assert "cannot open it" in err and "wrong key" in err and key_id in err

    bad = tmp_path / "bad.key"
    bad.write_text("not-a-key-at-all\n")
    monkeypatch.setenv("CKPT_KEY_FILE", str(bad))
    err = error_line(run(*args))
    assert "does not hold a 256-bit key" in err and "not-a-key" not in err
    assert not (tmp_path / "o.safetensors").exists()


def test_verify_without_the_key_checks_what_it_can(enc, monkeypatch):
    monkeypatch.delenv("CKPT_KEY_FILE", raising=False)
    url, _key_file = enc
    result = run("verify", url)
    text = result.output
    assert "cannot authenticate" in text, text
    assert result.exit_code == 0, text
    doc = json.loads(run("verify", url, "--json").stdout)
    assert doc["ok"] and doc["authenticated"] is False and doc["steps"] == [1, 2]
    assert doc["key_id"] == StaticKeyProvider(KEY).key_id
    # a missing object is still found without the key
    objects = os.path.join(url.removeprefix("file://"), "objects")
    victim = next(os.path.join(d, f) for d, _s, files in os.walk(objects) for f in files)
    os.remove(victim)
    result = run("verify", url)
    assert result.exit_code == 1, result.output
    assert "cannot authenticate" in result.output


def test_verify_with_the_key_authenticates_every_object(enc):
    url, key_file = enc
    objects = os.path.join(url.removeprefix("file://"), "objects")
    victim = max(
        (os.path.join(d, f) for d, _s, files in os.walk(objects) for f in files), key=lambda p: os.path.getsize(p)
    )
    with open(victim, "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 1  # one flipped bit, same size
        f.seek(0)
        f.write(bytes(data))
    result = run("verify", url, "--key-file", key_file)
    assert result.exit_code == 1, result.output
    assert "BAD object" in result.stdout


def test_gc_and_import_with_the_key(enc, tmp_path, monkeypatch):
    url, key_file = enc
    monkeypatch.setenv("CKPT_KEY_FILE", key_file)
    gc = run("gc", url, "--keep-last", "1", "--grace-seconds", "0", "--json")
    assert gc.exit_code == 0, gc.output
    assert json.loads(gc.stdout)["removed_steps"] == [1]
    state = {"model": {"layer.weight": torch.zeros(2048), "frozen": torch.zeros(4096)}, "note": ""}
    ckpt.restore(url, state, encryption=ckpt.Encryption(KEY))
    assert state["note"] == "secret-note-2"

    src = tmp_path / "in.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.full((64,), 7.0)}, str(src))
    imp = run("import", str(src), url, "--step", "5")
    assert imp.exit_code == 0, imp.output
    assert torch.equal(ckpt.load(url, step=5, encryption=ckpt.Encryption(KEY))["w"], torch.full((64,), 7.0))
    monkeypatch.delenv("CKPT_KEY_FILE")
    err = error_line(run("import", str(src), url, "--step", "6"))
    assert "is encrypted" in err


def test_key_file_and_key_provider_are_exclusive(enc):
    url, key_file = enc
    err = error_line(run("ls", url, "--key-file", key_file, "--key-provider", f"file:{key_file}"))
    assert "not both" in err
    ok = run("ls", url, "--key-provider", f"file:{key_file}")
    assert ok.exit_code == 0, ok.output


def test_rekey_to_a_new_key_file(enc, tmp_path, monkeypatch):
    monkeypatch.delenv("CKPT_KEY_FILE", raising=False)
    url, key_file = enc
    new_key = os.urandom(32)
    new_file = tmp_path / "new.key"
    import base64

    new_file.write_bytes(base64.b64encode(new_key))
    err = error_line(run("rekey", url, "--new-key-file", str(new_file)))
    assert "current key" in err
    res = run("rekey", url, "--key-file", key_file, "--new-key-file", str(new_file), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["old_key_id"] == StaticKeyProvider(KEY).key_id and doc["new_key_id"] == StaticKeyProvider(new_key).key_id
    assert "wrong key" in error_line(run("ls", url, "--key-file", key_file))
    assert run("verify", url, "--key-file", str(new_file)).exit_code == 0
    usage = run("rekey", url, "--key-file", str(new_file))
    assert usage.exit_code == 2 and "exactly one of" in usage.output


@pytest.mark.server
def test_rekey_to_kms_and_open_with_key_provider(enc, kms_server, monkeypatch):
    monkeypatch.delenv("CKPT_KEY_FILE", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url, key_file = enc
    arn = kms_server.new_kms_key()
    spec = f"kms:{arn}?region=us-east-1&endpoint_url={kms_server.endpoint}"
    res = run("rekey", url, "--key-file", key_file, "--new-key-provider", spec)
    assert res.exit_code == 0, res.output
    assert f"-> kms:{arn}" in res.stdout
    ls = run("ls", url, "--key-provider", spec, "--json")
    assert ls.exit_code == 0, ls.output
    other = kms_server.new_kms_key()
    err = error_line(
        run("ls", url, "--key-provider", f"kms:{other}?region=us-east-1&endpoint_url={kms_server.endpoint}")
    )
    assert other in err and "cannot open it" in err


@pytest.mark.server
def test_remote_store_verify_and_rekey(s3_server, tmp_path, monkeypatch):
    monkeypatch.delenv("CKPT_KEY_FILE", raising=False)
    url = s3_server.new_url("enc-cli")
    ckpt.save(url, _state(1), step=1, encryption=ckpt.Encryption(KEY))
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    old.write_bytes(KEY)  # 32 raw bytes
    new.write_text(os.urandom(32).hex())
    opts = [x for o in s3_server.cli_options for x in ("-o", o)]
    assert run("verify", url, "--key-file", str(old), *opts).exit_code == 0
    res = run("rekey", url, "--key-file", str(old), "--new-key-file", str(new), *opts)
    assert res.exit_code == 0, res.output
    assert "wrong key" in error_line(run("ls", url, "--key-file", str(old), *opts))
    ok = run("show", url, "--key-file", str(new), *opts)
    assert ok.exit_code == 0 and "secret-note-1" in ok.stdout
