"""Key providers: key files (every accepted form, and the refused ones), AWS KMS against
moto's KMS server on loopback, the scheme registry, and key rotation through a provider."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt
from ckpt.errors import CheckpointError, EncryptionError, PluginError, StoreError
from ckpt.hooks.manager import get_plugins
from ckpt.security.keys import StaticKeyProvider
from ckpt.security.providers import KeyFileProvider, KeyProviderRegistry, KMSKeyProvider, parse_key, read_key_file

KEY = bytes(range(32))

# -- key files ---------------------------------------------------------------------------


def _forms(key: bytes) -> dict[str, bytes]:
    return {
        "raw": key,
        "hex": key.hex().encode() + b"\n",
        "HEX": key.hex().upper().encode(),
        "base64": base64.b64encode(key) + b"\n",
        "base64-unpadded": base64.b64encode(key).rstrip(b"="),
        "base64-urlsafe": base64.urlsafe_b64encode(key) + b"\r\n",
        "spaced": b"  " + key.hex().encode() + b" \n",
    }


@pytest.mark.parametrize("form", sorted(_forms(KEY)))
def test_key_file_forms(tmp_path, form):
    path = tmp_path / "k"
    path.write_bytes(_forms(KEY)[form])
    assert read_key_file(path) == KEY
    provider = KeyFileProvider(path)
    assert provider.key_id == StaticKeyProvider(KEY).key_id, "the id names the key, not the file"
    assert provider.unwrap(StaticKeyProvider(KEY).wrap(b"d" * 32)) == b"d" * 32
    assert KEY.hex() not in repr(provider)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.binary(min_size=32, max_size=32), form=st.sampled_from(sorted(_forms(KEY))))
def test_key_file_forms_any_key(key, form):
    assert parse_key(_forms(key)[form], source="k") == key


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=120) | st.text(alphabet="0123456789abcdefABCDEF+/=-_ \n", max_size=80).map(str.encode))
def test_any_bytes_give_a_key_or_an_error_that_does_not_show_them(raw):
    try:
        key = parse_key(raw, source="k")
    except EncryptionError as exc:
        text = raw.strip().decode("latin-1")
        assert len(text) < 8 or text not in str(exc)
    else:
        assert len(key) == 32
        assert len(raw) == 32 or raw.strip().lower() == key.hex().encode() or len(raw.strip()) in (43, 44)


BAD = {
    "empty": b"",
    "31 raw bytes": b"\x01" * 31,
    "33 raw bytes": b"\x01" * 33,
    "63 hex digits": b"a" * 63,
    "65 hex digits": b"a" * 65,
    "64 chars, not hex": b"g" * 64,
    "hex of 31 bytes": bytes(31).hex().encode(),
    "base64 of 31 bytes": base64.b64encode(b"s" * 31),
    "base64 of 33 bytes": base64.b64encode(b"s" * 33),
    "base64, non-canonical tail": base64.b64encode(KEY)[:42] + b"B=",
    "base64, mixed alphabets": b"-" + base64.b64encode(b"\xfb" * 32)[1:],
    "hex with a space inside": KEY.hex()[:32].encode() + b" " + KEY.hex()[32:].encode(),
    "a passphrase": b"correct horse battery staple\n",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_key_files_are_refused_without_showing_them(tmp_path, name):
    path = tmp_path / "secret.key"
    path.write_bytes(BAD[name])
    with pytest.raises(EncryptionError, match="does not hold a 256-bit key") as err:
        read_key_file(path)
    message = str(err.value)
    assert "secret.key" in message and f"found {len(BAD[name])} bytes" in message
    text = BAD[name].strip().decode("latin-1")
    for i in range(0, max(0, len(text) - 8)):
        assert text[i : i + 8] not in message, "the key file's content leaked into the error"


def test_key_file_not_there_too_big_or_a_directory(tmp_path):
    with pytest.raises(EncryptionError, match="does not exist"):
        read_key_file(tmp_path / "missing")
    with pytest.raises(EncryptionError, match="is a directory"):
        read_key_file(tmp_path)
    big = tmp_path / "big"
    big.write_bytes(b"0" * 100_000)
    with pytest.raises(EncryptionError, match="larger than 4096 bytes"):
        read_key_file(big)
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.write_bytes(KEY)
        locked.chmod(0)
        with pytest.raises(EncryptionError, match="cannot be read"):
            read_key_file(locked)


def test_key_file_readable_by_others_is_warned_about(tmp_path, caplog):
    path = tmp_path / "k"
    path.write_text(KEY.hex())
    path.chmod(0o600)
    with caplog.at_level("WARNING", logger="ckpt.security.providers"):
        assert read_key_file(path) == KEY
    assert not caplog.records
    path.chmod(0o644)
    with caplog.at_level("WARNING", logger="ckpt.security.providers"):
        assert read_key_file(path) == KEY
    assert "can be read by other users (mode 644): chmod 600 it" in caplog.text and KEY.hex() not in caplog.text


def test_key_file_wrong_key_cannot_unwrap(tmp_path):
    (tmp_path / "a").write_text(KEY.hex())
    (tmp_path / "b").write_text(bytes(32).hex())
    wrapped = KeyFileProvider(tmp_path / "a").wrap(b"d" * 32)
    with pytest.raises(EncryptionError, match="wrong key"):
        KeyFileProvider(tmp_path / "b").unwrap(wrapped)


# -- the registry ------------------------------------------------------------------------


def test_registry_resolves_built_in_schemes(tmp_path):
    (tmp_path / "k").write_text(KEY.hex())
    plugins = get_plugins(adapters=False)
    assert {"file", "kms"} <= set(plugins.key_providers)
    provider = plugins.key_provider(f"file:{tmp_path / 'k'}")
    assert isinstance(provider, KeyFileProvider) and provider.key_id == StaticKeyProvider(KEY).key_id
    kms = plugins.key_provider("kms:alias/ckpt?region=eu-west-1&context.tenant=a")
    assert isinstance(kms, KMSKeyProvider) and kms.key_id == "kms:alias/ckpt" and kms.region == "eu-west-1"
    assert kms.context["tenant"] == "a" and kms.context["ckpt:purpose"] == "checkpoint-data-key"
    with pytest.raises(EncryptionError, match=r"unknown key provider 'vault:'.*file:, kms:"):
        plugins.key_provider("vault:secret/x")
    with pytest.raises(EncryptionError, match="unknown option 'colour'"):
        plugins.key_provider("kms:alias/x?colour=red")
    with pytest.raises(EncryptionError, match="empty"):
        plugins.key_provider("kms:")


def test_registry_refuses_duplicates_bad_names_and_bad_providers():
    reg = KeyProviderRegistry()
    reg.current_plugin = "one"
    reg("x", lambda rest: object())
    reg.current_plugin = "two"
    with pytest.raises(PluginError, match="'x' registered twice: by 'one' and by 'two'"):
        reg("x", lambda rest: None)
    with pytest.raises(PluginError, match="not a lower-case URL scheme"):
        reg("Bad Scheme", lambda rest: None)
    with pytest.raises(PluginError, match="returned an object without key_id"):
        reg.resolve("x:1")

    def boom(rest):
        raise RuntimeError("no vault")

    reg("y", boom)
    with pytest.raises(PluginError, match="key provider 'y' of plugin 'two' failed: RuntimeError: no vault"):
        reg.resolve("y:1")


# -- AWS KMS, against moto's KMS server ------------------------------------------------------


@pytest.fixture
def kms(kms_server):
    """A fresh KMS key on moto; returns ``(arn, provider)``."""
    arn = kms_server.new_kms_key()
    return arn, KMSKeyProvider(arn, **kms_server.kms_options)


@pytest.mark.server
def test_kms_wrap_unwrap(kms, kms_server):
    arn, provider = kms
    assert provider.key_id == f"kms:{arn}"
    data_key = os.urandom(32)
    wrapped = provider.wrap(data_key)
    assert data_key not in wrapped and len(wrapped) > 32
    assert provider.unwrap(wrapped) == data_key
    # a second provider object (a new process) unwraps it too, and through an alias
    kms_server.kms_client().create_alias(AliasName=f"alias/ckpt-{arn[-8:]}", TargetKeyId=arn)
    assert KMSKeyProvider(arn, **kms_server.kms_options).unwrap(wrapped) == data_key
    # KMS itself authenticates the context: the same blob without ckpt's context is refused
    with pytest.raises(Exception, match="InvalidCiphertext"):
        kms_server.kms_client().decrypt(CiphertextBlob=wrapped)


@pytest.mark.server
def test_kms_refusals_are_encryption_errors_naming_the_key(kms, kms_server):
    arn, provider = kms
    wrapped = provider.wrap(b"k" * 32)
    other_arn = kms_server.new_kms_key()
    other = KMSKeyProvider(other_arn, **kms_server.kms_options)
    with pytest.raises(EncryptionError, match=rf"KMS key '{other_arn}'.*cannot unwrap.*(denied|another KMS key)"):
        other.unwrap(wrapped)
    tenant = KMSKeyProvider(arn, encryption_context={"tenant": "b"}, **kms_server.kms_options)
    with pytest.raises(EncryptionError, match="rejected the wrapped data key"):
        tenant.unwrap(wrapped)
    with pytest.raises(EncryptionError, match="rejected the wrapped data key|denied"):
        provider.unwrap(b"\x00garbage" * 10)
    missing = KMSKeyProvider("alias/no-such-key", **kms_server.kms_options)
    with pytest.raises(EncryptionError, match="'alias/no-such-key'.*does not exist"):
        missing.wrap(b"k" * 32)
    with pytest.raises(EncryptionError, match="data key is 32 bytes"):
        provider.wrap(b"short")


def test_kms_unreachable_is_a_store_error_naming_the_key(monkeypatch):
    from servers import free_port

    monkeypatch.setenv("CKPT_RETRIES", "0")  # one attempt: KMS's own retries would take seconds

    provider = KMSKeyProvider(
        "alias/ckpt",
        region="us-east-1",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        aws_access_key_id="x",
        aws_secret_access_key="y",
    )
    with pytest.raises(StoreError, match="'alias/ckpt' at http://127.0.0.1:.*cannot be reached"):
        provider.wrap(b"k" * 32)


@pytest.mark.server
def test_save_restore_with_kms_and_wrong_kms_key(kms, kms_server, tmp_path):
    torch = pytest.importorskip("torch")
    arn, provider = kms
    url = f"file://{tmp_path}/store"
    w = torch.arange(1000, dtype=torch.float32)
    ckpt.save(url, {"w": w, "note": "kms-secret"}, step=3, encryption=ckpt.Encryption(provider))
    state = {"w": torch.zeros(1000), "note": ""}
    info = ckpt.restore(url, state, encryption=ckpt.Encryption(KMSKeyProvider(arn, **kms_server.kms_options)))
    assert info.step == 3 and torch.equal(state["w"], w) and state["note"] == "kms-secret"

    other = KMSKeyProvider(kms_server.new_kms_key(), **kms_server.kms_options)
    with pytest.raises(CheckpointError, match="KMS|key") as err:
        ckpt.restore(url, {"w": torch.zeros(1000), "note": ""}, encryption=ckpt.Encryption(other))
    assert isinstance(err.value, EncryptionError)
    with pytest.raises(EncryptionError, match="encrypted"):
        ckpt.restore(url, {"w": torch.zeros(1000), "note": ""})


# -- rotation ------------------------------------------------------------------------------


def _snapshot(root):
    """Every file under the store but the envelope: path -> (bytes, mtime_ns)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if rel == "encryption.json" or rel.startswith("leases"):
                continue
            with open(path, "rb") as f:
                out[rel] = (f.read(), os.stat(path).st_mtime_ns)
    return out


@pytest.mark.server
def test_rotation_rewraps_without_rewriting_data(kms, kms_server, tmp_path):
    torch = pytest.importorskip("torch")
    from ckpt.security.envelope import rewrap

    _arn, kms_provider = kms
    (tmp_path / "old.key").write_text(KEY.hex())
    old = ckpt.Encryption(KeyFileProvider(tmp_path / "old.key"))
    root = tmp_path / "store"
    url = f"file://{root}"
    w = torch.randn(4096)
    for step in (1, 2):
        ckpt.save(url, {"w": w + step}, step=step, encryption=old)
    before = _snapshot(root)
    envelope_before = (root / "encryption.json").read_bytes()

    rewrap(url, old, ckpt.Encryption(kms_provider))
    assert _snapshot(root) == before, "rotation rewrote or touched a data object or manifest"
    assert (root / "encryption.json").read_bytes() != envelope_before

    state = {"w": torch.zeros(4096)}
    assert ckpt.restore(url, state, encryption=ckpt.Encryption(kms_provider)).step == 2
    assert torch.equal(state["w"], w + 2)
    with pytest.raises(EncryptionError):
        ckpt.restore(url, {"w": torch.zeros(4096)}, encryption=ckpt.Encryption(KeyFileProvider(tmp_path / "old.key")))
