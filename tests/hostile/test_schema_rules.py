"""The manifest schema and the bounded readers, rule by rule, in process (fast).

The subprocess suites (``test_hostile_cases.py``, ``test_hostile_fuzz.py``) attack whole
stores; these pin each rule's error class and message, and that saves refuse what loads
would refuse.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import zstandard

import ckpt
from ckpt.codecs.base import decode_chain, max_encoded_size
from ckpt.codecs.zstd import ByteGroupZstdCodec, ZstdCodec
from ckpt.errors import CheckpointError, CorruptCheckpointError, SchemaError, UnsupportedValueError
from ckpt.hooks.manager import get_plugins
from ckpt.state.tree import dtype_from_name
from ckpt.storage.manifest import DTYPE_ITEMSIZE, Manifest, check_step
from ckpt.storage.store import Store

H32 = "ab" * 16


def _doc(**tensor: object) -> dict:
    entry = {
        "dtype": "float32",
        "shape": [2, 2],
        "nbytes": 16,
        "chunks": [{"hash": H32, "key": H32, "size": 16, "stored": 16, "codec": []}],
    }
    entry.update(tensor)
    return {
        "format": "ckpt",
        "schema": 1,
        "step": 3,
        "chunk_bytes": 4096,
        "tree": {"w": {"$tensor": "w"}},
        "tensors": {"w": entry},
    }


def _parse(doc: object) -> Manifest:
    return Manifest.from_json_bytes(json.dumps(doc).encode(), where="test step 3")


def _refused(doc: object, *words: str) -> SchemaError:
    with pytest.raises(SchemaError) as exc:
        _parse(doc)
    for w in words:
        assert w in str(exc.value), str(exc.value)
    assert "test step 3" in str(exc.value)
    return exc.value


def test_a_sound_manifest_parses():
    m = _parse(_doc())
    assert m.tensors["w"].shape == (2, 2) and m.tensors["w"].chunks[0].stored == 16


@pytest.mark.parametrize(
    "change, words",
    [
        ({"shape": [2**40]}, ("tensor 'w'", "do not add up")),
        ({"shape": [2, True]}, ("shape[1]",)),
        ({"shape": [2, 2.0]}, ("shape[1]",)),
        ({"shape": [-2, -2]}, ("shape[0]",)),
        ({"shape": [1] * 65}, ("shape",)),
        ({"nbytes": 17}, ("do not add up",)),
        ({"nbytes": "16"}, ("nbytes",)),
        ({"dtype": "_dynamo"}, ("unknown dtype",)),
        ({"dtype": ["float32"]}, ("unknown dtype",)),
        ({"chunks": {}}, ("malformed", "chunks")),
        ({"chunks": []}, ("do not add up",)),
    ],
)
def test_tensor_entries(change, words):
    _refused(_doc(**change), *words)


@pytest.mark.parametrize(
    "chunk, words",
    [
        ({"key": "../canary.bin"}, ("bad object key",)),
        ({"key": "/etc/passwd"}, ("bad object key",)),
        ({"key": H32 + ".x" + "0" * 15}, ("bad object key",)),
        ({"key": H32.upper()}, ("bad object key",)),
        ({"hash": "xyz"}, ("bad content hash",)),
        ({"size": 1e12}, ("size",)),
        ({"size": 10**12}, ("size",)),  # over chunk_bytes
        ({"size": True}, ("size",)),
        ({"stored": 17}, ("raw object",)),
        ({"stored": max_encoded_size(16) + 1}, ("stored size",)),
        ({"stored": -1}, ("stored size",)),
        ({"codec": [{"name": "bgzstd", "itemsize": "x"}], "stored": 10}, ("itemsize",)),
        ({"codec": [{"name": "bgzstd", "itemsize": 4.0}], "stored": 10}, ("itemsize",)),
        ({"codec": [{"name": "bgzstd"}], "stored": 10}, ("no itemsize",)),
        ({"codec": ["zstd"], "stored": 10}, ("not a mapping with a name",)),
        ({"codec": [{"name": 3}], "stored": 10}, ("not a mapping with a name",)),
        ({"codec": [{"name": "zstd", "in": "16"}], "stored": 10}, ("input size",)),
        ({"codec": [{"name": "zstd", "in": 2**40}], "stored": 10}, ("input size",)),
        ({"codec": [{"name": "xor"}], "stored": 16}, ("no parent",)),
        ({"codec": [{"name": "zstd", "p": json.loads("[" * 40 + "]" * 40)}], "stored": 10}, ("nests too deeply",)),
    ],
)
def test_chunk_records(chunk, words):
    doc = _doc()
    doc["tensors"]["w"]["chunks"][0].update(chunk)
    _refused(doc, "tensor 'w' chunk 0", *words)


def _delta(parent: dict) -> dict:
    doc = _doc()
    c = doc["tensors"]["w"]["chunks"][0]
    c.update(key=H32 + ".x" + "cd" * 8, codec=[{"name": "xor", "parent": parent, "age": 1}])
    return doc


def test_delta_parent_records():
    parent = {"hash": "cd" * 16, "key": "cd" * 16, "size": 16, "stored": 16, "codec": []}
    assert _parse(_delta(parent)).tensors["w"].chunks[0].codec[0]["parent"] == parent
    _refused(_delta({**parent, "size": 8}), "delta parent of 8 bytes")
    _refused(_delta({**parent, "key": "../x"}), "bad object key")
    _refused(_delta({**parent, "size": "16"}), "size")
    cyclic = {**parent, "key": H32 + ".x" + "cd" * 8}
    _refused(_delta(cyclic), "cycle")
    rec = parent
    for n in range(64):
        rec = {**parent, "key": f"{n:032x}", "codec": [{"name": "xor", "parent": rec}]}
    _refused(_delta(rec), "deeper than 64 links")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"step": -1}, ("step",)),
        ({"step": True}, ("step",)),
        ({"step": 10**18}, ("step",)),
        ({"parent": "2"}, ("parent",)),
        ({"seq": 0}, ("seq",)),
        ({"seq": False}, ("seq",)),
        ({"run": 5}, ("run",)),
        ({"run": "x" * 300}, ("run",)),
        ({"run": "a\nb"}, ("run",)),
        ({"chunk_bytes": 2**41}, ("chunk_bytes",)),
        ({"raw_bytes": -5}, ("raw_bytes",)),
        ({"schema": True}, ("schema",)),
        ({"adapters": {"model": 3}}, ("adapters",)),
        ({"meta": []}, ("meta",)),
        ({"tensors": {"a\x00b": _doc()["tensors"]["w"]}}, ("bad tensor path",)),
        ({"tensors": {"a~2b": _doc()["tensors"]["w"]}}, ("bad tensor path",)),
        ({"tree": {"w": {"$tensor": "missing"}}}, ("not listed",)),
        ({"tree": {"w": {"$tensor": ["w"]}}}, ("not listed",)),
        ({"tree": {"w": {"$tuple": [json.loads("[" * 200 + "]" * 200)]}}}, ("nests deeper",)),
    ],
)
def test_fields(change, words):
    doc = _doc()
    doc.update(change)
    _refused(doc, *words)


def test_json_that_is_too_deep_or_not_json():
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
        with pytest.raises(SchemaError, match="nested too deeply"):
            Manifest.from_json_bytes(body, where="x")
    with pytest.raises(SchemaError, match="not valid JSON"):
        Manifest.from_json_bytes(json.dumps(_doc()).replace("4096", "NaN").encode(), where="x")
    with pytest.raises(SchemaError, match="not valid JSON"):
        Manifest.from_json_bytes(b'{"step": ' + b"9" * 5000 + b"}", where="x")
    # a number that overflows a float is infinity, which no writer stores untagged: the CLI's
    # JSON output and the safetensors export died on it with a ValueError (hostile review)
    for number in ("1e999", "-1e999", "1" + "0" * 400 + ".0"):
        doc = _doc()
        doc["meta"] = {"epoch": "X"}
        body = json.dumps(doc).replace('"X"', number).encode()
        with pytest.raises(SchemaError, match="out of a float's range"):
            Manifest.from_json_bytes(body, where="x")
    doc = _doc()
    doc["meta"] = {"lr": 1e-300, "big": 1.5e308}  # finite extremes still load
    assert Manifest.from_json_bytes(json.dumps(doc).encode(), where="x").meta == {"lr": 1e-300, "big": 1.5e308}


def test_manifest_size_limit(monkeypatch):
    body = json.dumps(_doc()).encode()
    monkeypatch.setenv("CKPT_MAX_MANIFEST_BYTES", str(1 << 20))
    Manifest.from_json_bytes(body + b" " * ((1 << 20) - len(body)), where="x")
    with pytest.raises(SchemaError, match="larger than 1048576 bytes"):
        Manifest.from_json_bytes(body + b" " * ((1 << 20) - len(body) + 1), where="x")


def test_manifest_of_another_step():
    with pytest.raises(SchemaError, match="holds step 3"):
        Manifest.from_json_bytes(json.dumps(_doc()).encode(), where="x step 4", step=4)


def test_saves_refuse_what_loads_refuse(tmp_path):
    deep: object = 1
    for _ in range(200):
        deep = [deep]
    with pytest.raises(UnsupportedValueError, match="CKPT_MAX_TREE_DEPTH"):
        ckpt.save(f"file://{tmp_path}/s", {"cfg": deep}, step=1)
    with pytest.raises(UnsupportedValueError, match="control characters"):
        ckpt.save(f"file://{tmp_path}/s", {"a\nb": torch.zeros(2)}, step=1)
    with pytest.raises(CheckpointError, match="below 10\\*\\*18"):
        check_step(10**18)
    ckpt.save(f"file://{tmp_path}/s", {"cfg": [[[[1]]]], "a~b/c": torch.ones(3)}, step=1)
    assert ckpt.load(f"file://{tmp_path}/s")["a~b/c"].sum() == 3


def test_dtype_table_matches_torch():
    for name, size in DTYPE_ITEMSIZE.items():
        if hasattr(torch, name):
            assert dtype_from_name(name).itemsize == size, name
    for bad in ("_dynamo", "nn", "Tensor", "float", 3, None):
        with pytest.raises(SchemaError):
            dtype_from_name(bad)  # type: ignore[arg-type]


# -- bounded readers --------------------------------------------------------------------------


def test_store_reads_are_bounded_and_stay_in_the_store(tmp_path):
    root = tmp_path / "store"
    store = Store(f"file://{root}")
    key = "ab" * 16
    store.put_object(key, b"x" * 100)
    assert store.get_object(key, limit=11) == b"x" * 11
    assert store.get_object(key) == b"x" * 100
    path = store.object_path(key)
    os.unlink(path)
    os.mkfifo(path)
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        store.get_object(key, limit=10)
    os.unlink(path)
    os.symlink("/dev/zero", path)
    with pytest.raises(CorruptCheckpointError, match="outside the store"):
        store.get_object(key, limit=10)
    os.unlink(path)
    (tmp_path / "outside").write_bytes(b"x" * 100)
    os.symlink(tmp_path / "outside", path)
    with pytest.raises(CorruptCheckpointError, match="outside the store"):
        store.get_object(key)
    for bad in ("../outside", "..", "ab/../../x", "", "AB" * 16):
        with pytest.raises(CorruptCheckpointError, match="not an object key"):
            store.object_path(bad)
    # a store whose root is itself a symlink reads as usual
    os.unlink(path)
    store.put_object(key, b"y")
    os.symlink(root, tmp_path / "link")
    assert Store(f"file://{tmp_path}/link").get_object(key) == b"y"


def test_memory_store_reads_are_bounded():
    store = Store("memory://hostile-bounded")
    store.put_object("cd" * 16, b"z" * 50)
    assert store.get_object("cd" * 16, limit=5) == b"z" * 5
    store.put_object("ef" * 16, b"")
    assert store.get_object("ef" * 16, limit=5) == b""


def _forged(declared: int) -> bytes:
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 64)
    return frame[:4] + bytes([0xE0]) + declared.to_bytes(8, "little") + frame[6:]


def test_zstd_never_trusts_the_frame_header():
    out = memoryview(bytearray(64))
    with pytest.raises(CorruptCheckpointError, match="declares 1099511627776 bytes"):
        ZstdCodec().decode(memoryview(_forged(1 << 40)), out, {}, None)  # type: ignore[arg-type]
    good = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 64)
    with pytest.raises(CorruptCheckpointError):
        ZstdCodec().decode(memoryview(good + b"\0"), out, {}, None)  # type: ignore[arg-type]
    ZstdCodec().decode(memoryview(good), out, {}, None)  # type: ignore[arg-type]
    for bad in ("x", 4.0, True, 3, None):
        with pytest.raises(CorruptCheckpointError, match="itemsize"):
            ByteGroupZstdCodec().decode(memoryview(b""), out, {"itemsize": bad}, None)  # type: ignore[arg-type]


def test_decode_chain_refuses_malformed_steps():
    codecs = get_plugins().codecs
    for chain in ([{"name": "bgzstd", "itemsize": "x"}], [{"name": 3}], ["zstd"], [{"name": "xor", "parent": {}}]):
        with pytest.raises(CorruptCheckpointError):
            decode_chain(codecs, chain, memoryview(b"abcd"), memoryview(bytearray(4)), None, "t")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "extra",
    [
        {"$dtype": ["nan", "nan", "nan"]},  # a tag mixed into the root mapping (found by the fuzzer)
        {"$bytes": {"tree": 1}},
        {"$unknown": 1},
    ],
)
def test_a_tag_mixed_into_a_mapping_is_refused_before_restoring_any_key(tmp_path, extra):
    """Restoring one key must not accept a tree that decoding the whole would refuse."""
    url = str(tmp_path / "s")
    ckpt.save(url, {"w": torch.ones(3), "n": 1}, step=1)
    store = Store(url)
    path = store.manifest_path(1)
    doc = json.loads(store.fs.cat_file(path))
    doc["tree"].update(extra)
    store.fs.pipe_file(path, json.dumps(doc).encode())
    live = torch.zeros(3)
    with pytest.raises(SchemaError, match="malformed tagged node"):
        ckpt.restore(url, {"w": live}, step=1)
    assert torch.equal(live, torch.zeros(3))
