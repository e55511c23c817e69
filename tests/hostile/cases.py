"""The named cases of issue 11 ("a store is untrusted input"), each tried the way the issue
found it, run inside a worker process under a memory limit (see ``worker.py``).

Each ``case_*`` function damages a real store, asserts what every reader does with it
(an error of the expected CheckpointError class naming what is wrong, no file outside
the store opened, memory bounded), and puts the store back.
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import hostile_env as H
import mutations as M
import xxhash
import zstandard

import ckpt
from ckpt.errors import CorruptCheckpointError, NoCheckpointError, SchemaError

CASES: dict[str, Callable[[H.Base], None]] = {}
_audit: H.OpenAudit | None = None
_out_dir = ""


def case(fn: Callable[[H.Base], None]) -> Callable[[H.Base], None]:
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


def run(names: list[str], hang: float, current: str) -> dict[str, Any]:
    global _audit, _out_dir, _dynamo_probe
    _dynamo_probe = _probe_dtype_lookup()  # before anything else imports torch._dynamo
    base = H.build_base("file")
    _out_dir = os.path.join(base.tmp, "out")
    os.makedirs(_out_dir)
    _audit = H.OpenAudit()
    results: dict[str, Any] = {}
    for name in names or list(CASES):
        with open(current, "w") as f:
            f.write(name)
        before = _maxrss_mb()
        start = time.monotonic()
        faulthandler.dump_traceback_later(hang, exit=True)
        try:
            CASES[name](base)
            results[name] = {"ok": True}
        except BaseException as exc:
            results[name] = {"ok": False, "error": "".join(traceback.format_exception(exc))[-4000:]}
        finally:
            faulthandler.cancel_dump_traceback_later()
            for rel in ("objects", "manifests", "refs"):
                M.put_back(base, rel)
        results[name].update(seconds=round(time.monotonic() - start, 2), rss_growth_mb=_maxrss_mb() - before)
    return {"cases": results}


def _maxrss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


# -- helpers --------------------------------------------------------------------------------------


def edit(base: H.Base, step: int, change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    doc = json.loads(base.manifests[step])
    change(doc)
    M.write_rel(base, f"manifests/{step}.json", json.dumps(doc).encode())
    return doc


def restated(chunk: dict[str, Any], body: bytes) -> None:
    """``chunk`` records ``body`` as its object's stored bytes, as a forger would write it:
    the decoder, not the stored-bytes check, has to refuse what ``body`` declares."""
    chunk["stored"] = len(body)
    if "stored_hash" in chunk:
        chunk["stored_hash"] = xxhash.xxh3_128_hexdigest(body)


def chunk_of(doc: dict[str, Any], tensor: str, i: int = 0) -> dict[str, Any]:
    return doc["tensors"][tensor]["chunks"][i]


def readers(base: H.Base, step: int) -> dict[str, Callable[[], Any]]:
    """Every way a store is read: manifest, load, restore, export (both formats); the CLI below."""
    from ckpt.interop.export import export_checkpoint

    out = os.path.join(_out_dir, "x.pt")
    return {
        "read_manifest": lambda: ckpt.read_manifest(base.url, step),
        "load": lambda: H.load_op(base, step),
        "restore": lambda: H.restore_op(base, step),
        "export safetensors": lambda: H.export_op(base, step, _out_dir),
        "export torch": lambda: export_checkpoint(base.url, out, step=step),
    }


def refused(
    base: H.Base, step: int, cls: type[BaseException], *words: str, only: tuple[str, ...] = ()
) -> dict[str, BaseException]:
    """Every reader of ``step`` raises ``cls`` with ``words`` in its message, opening
    nothing outside the store; ``ckpt verify`` reports it (exit 1) and writes no output.

    ``read_manifest`` (which reads no object) is held to it when ``cls`` is a SchemaError.
    """
    assert _audit is not None
    errors = {}
    for name, fn in readers(base, step).items():
        if (only and name not in only) or (name == "read_manifest" and not only and cls is not SchemaError):
            continue
        with _audit.watch():
            got = H.attempt(fn)
        outside = _audit.outside([base.root, _out_dir])
        assert not outside, f"{name} opened {outside[:3]} outside the store"
        assert not got.ok, f"{name} succeeded on a damaged store"
        assert isinstance(got.error, cls), f"{name} raised {type(got.error).__name__}: {got.error}, not {cls.__name__}"
        for w in words:
            assert w in str(got.error), f"{name}: {w!r} not in {got.error}"
        errors[name] = got.error
    if not only:
        with _audit.watch():
            code, out, err = H.run_cli(["verify", base.url, "--step", str(step)])
        assert code == 1 and "OK" not in out, f"ckpt verify exit {code}: {out} {err}"
        assert H.cli_escaped(code, err) is None, err
        assert not _audit.outside([base.root, _out_dir])
        code, out, err = H.run_cli(["export", base.url, os.path.join(_out_dir, "cli.safetensors"), "--step", str(step)])
        assert code in (1, 2) and H.cli_escaped(code, err) is None, f"ckpt export exit {code}: {err}"
        assert not os.path.exists(os.path.join(_out_dir, "cli.safetensors")), "ckpt export wrote a file"
    return errors


def rss_bounded(mb: int) -> Callable[[Callable[[H.Base], None]], Callable[[H.Base], None]]:
    """The case's peak memory grows by less than ``mb`` MiB over the worker's peak so far."""

    def wrap(fn: Callable[[H.Base], None]) -> Callable[[H.Base], None]:
        def inner(base: H.Base) -> None:
            before = _maxrss_mb()
            fn(base)
            grown = _maxrss_mb() - before
            assert grown < mb, f"peak memory grew by {grown} MiB"

        inner.__name__ = fn.__name__
        return inner

    return wrap


# -- reads outside the store ----------------------------------------------------------------------


@case
def case_key_outside_store(base: H.Base) -> None:
    """A chunk key ``../canary.bin`` naming a file outside the store that holds the right bytes."""
    key = os.path.basename(base.canary)
    canary_hash = None
    for doc_step in (1,):
        doc = json.loads(base.manifests[doc_step])
        for entry in doc["tensors"].values():
            for c in entry["chunks"]:
                if base.objects.get(c["key"]) == open(base.canary, "rb").read():  # noqa: SIM115
                    canary_hash = c
    assert canary_hash is not None
    for bad in (f"../{key}", f"../../{key}", "/" + base.canary.lstrip("/"), f"{canary_hash['key'][:2]}/../../../{key}"):

        def point(doc: dict[str, Any], bad: str = bad) -> None:
            for entry in doc["tensors"].values():
                for c in entry["chunks"]:
                    if c["key"] == canary_hash["key"]:
                        c["key"] = bad

        edit(base, 1, point)
        refused(base, 1, SchemaError, "bad object key", "step 1")
    doc = edit(base, 1, lambda d: None)
    assert doc  # the store is sound again: the canary is never read, before or after
    report = H.verify_op(base, 1)
    assert report["ok"], report


@case
def case_key_names_a_fifo(base: H.Base) -> None:
    key = sorted(base.objects)[0]
    path = base.object_file(key)
    os.unlink(path)
    os.mkfifo(path)
    start = time.monotonic()
    refused(base, 1 if _used_by(base, 1, key) else 2, CorruptCheckpointError, key, "not a regular file")
    assert time.monotonic() - start < 20


@case
@rss_bounded(100)
def case_key_names_dev_zero(base: H.Base) -> None:
    key = sorted(base.objects)[1]
    path = base.object_file(key)
    os.unlink(path)
    os.symlink("/dev/zero", path)
    refused(base, 1 if _used_by(base, 1, key) else 2, CorruptCheckpointError, key, "outside the store")


@case
def case_symlink_out_of_store(base: H.Base) -> None:
    """A shard folder of objects/ replaced by a symlink to a faithful copy outside the store."""
    key = sorted(base.objects)[2]
    shard = os.path.dirname(base.object_file(key))
    outside = os.path.join(base.tmp, "outside-shard")
    os.rename(shard, outside)
    os.symlink(outside, shard)
    try:
        refused(base, 1 if _used_by(base, 1, key) else 2, CorruptCheckpointError, "outside the store")
    finally:
        os.unlink(shard)
        os.rename(outside, shard)


@case
def case_manifest_is_dev_zero_or_fifo(base: H.Base) -> None:
    path = base.manifest_file(1)
    os.unlink(path)
    os.symlink("/dev/zero", path)
    refused(base, 1, CorruptCheckpointError, "outside the store", only=("load", "restore", "read_manifest"))
    os.unlink(path)
    os.mkfifo(path)
    refused(base, 1, CorruptCheckpointError, "not a regular file", only=("load", "restore", "read_manifest"))


@case
def case_memory_store_rejects_traversal_keys(base: H.Base) -> None:
    mem = H.build_base("memory")
    for bad in ("../canary", "..", "ab/../../x", "0" * 31 + "/"):
        doc = json.loads(mem.manifests[1])
        first = next(iter(doc["tensors"].values()))["chunks"][0]
        first["key"] = bad
        M.write_rel(mem, "manifests/1.json", json.dumps(doc).encode())
        refused(mem, 1, SchemaError, "bad object key", only=("load", "restore", "export safetensors"))
    store = mem.store
    for bad in ("../x", "..", "", "ab/cd", "x" * 2):
        try:
            store.object_path(bad)
        except CorruptCheckpointError:
            continue
        raise AssertionError(f"object_path accepted {bad!r}")


# -- memory bombs ---------------------------------------------------------------------------------


@case
@rss_bounded(100)
def case_shape_2_40(base: H.Base) -> None:
    edit(base, 1, lambda d: d["tensors"]["big"].update(shape=[2**40]))
    refused(base, 1, SchemaError, "tensor 'big'", "do not add up")
    # consistent shape and nbytes, chunks that do not hold them
    edit(base, 1, lambda d: d["tensors"]["big"].update(shape=[2**40], nbytes=2**42))
    refused(base, 1, SchemaError, "tensor 'big'", "do not add up")


@case
@rss_bounded(100)
def case_chunk_size_1e12(base: H.Base) -> None:
    for size in (1e12, 10**12, -1, True, "12"):
        edit(base, 1, lambda d, size=size: chunk_of(d, "noise").update(size=size))
        refused(base, 1, SchemaError, "tensor 'noise' chunk 0", "size")
    # nbytes and shape grown to match: the chunk is still larger than chunk_bytes
    n = 10**12

    def grow(d: dict[str, Any]) -> None:
        d["tensors"]["noise"].update(shape=[n], nbytes=n)
        chunk_of(d, "noise").update(size=n)

    edit(base, 1, grow)
    refused(base, 1, SchemaError, "tensor 'noise' chunk 0", "size")


@case
def case_safetensors_export_of_a_bogus_shape(base: H.Base) -> None:
    out = os.path.join(_out_dir, "bogus.safetensors")
    edit(base, 1, lambda d: d["tensors"]["big"].update(shape=[7, 7]))
    code, _, err = H.run_cli(["export", base.url, out, "--step", "1"])
    assert code == 1 and "tensor 'big'" in err, (code, err)
    assert not os.path.exists(out), "a broken file was written"
    assert not [n for n in os.listdir(_out_dir) if n.startswith("bogus")], os.listdir(_out_dir)
    # the writer refuses on its own too, whatever manifest it is handed
    from ckpt.hooks.manager import get_plugins
    from ckpt.interop.safetensors import write_safetensors
    from ckpt.storage.manifest import Manifest, TensorEntry

    M.put_back(base, "manifests")
    good = ckpt.read_manifest(base.url, 1)
    entry = good.tensors["big"]
    bad = TensorEntry(entry.dtype, (7, 7), entry.nbytes, entry.chunks)
    manifest = Manifest(**{**good.__dict__, "tensors": {**good.tensors, "big": bad}})
    try:
        write_safetensors(base.store, get_plugins().codecs, manifest, None, None, [("big", "big", bad)], out, 0, None)
    except CorruptCheckpointError as exc:
        assert "tensor 'big'" in str(exc)
    else:
        raise AssertionError("write_safetensors wrote a header that disagrees with its bytes")


@case
@rss_bounded(100)
def case_zstd_frame_declares_1_tib(base: H.Base) -> None:
    doc = json.loads(base.manifests[1])
    c = next(c for c in doc["tensors"]["ints"]["chunks"] if [s["name"] for s in c["codec"]] == ["zstd"])
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 64)
    assert frame[4] == 0x20  # single segment, 1-byte content size: widen it to 8 bytes
    forged = frame[:4] + bytes([0xE0]) + (1 << 40).to_bytes(8, "little") + frame[6:]
    assert zstandard.get_frame_parameters(forged).content_size == 1 << 40
    M.write_rel(base, M.rel_object(c["key"]), forged)

    def restate(d: dict[str, Any]) -> None:
        for chunk in d["tensors"]["ints"]["chunks"]:
            if chunk["key"] == c["key"]:
                restated(chunk, forged)  # the object's size and hash are what the manifest says

    edit(base, 1, restate)
    refused(base, 1, CorruptCheckpointError, c["key"], "declares 1099511627776 bytes")


@case
@rss_bounded(100)
def case_bgzstd_plane_declares_1_tib(base: H.Base) -> None:
    from ckpt.codecs.zstd import _PLANE

    doc = json.loads(base.manifests[1])
    c = next(c for c in doc["tensors"]["big"]["chunks"] if [s["name"] for s in c["codec"]] == ["bgzstd"])
    body = bytearray(base.objects[c["key"]])
    k = c["codec"][0]["itemsize"]
    pos = _PLANE.size * k
    for i in range(k):
        mode, length = _PLANE.unpack_from(body, i * _PLANE.size)
        if mode == 1:
            plane = bytes(body[pos : pos + length])
            params = zstandard.get_frame_parameters(plane)
            assert params.content_size == c["size"] // k
            frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 64)
            forged = frame[:4] + bytes([0xE0]) + (1 << 40).to_bytes(8, "little") + frame[6:]
            body[pos : pos + length] = forged
            _PLANE.pack_into(body, i * _PLANE.size, 1, len(forged))
            break
        pos += length
    else:
        raise AssertionError("no compressed plane")
    M.write_rel(base, M.rel_object(c["key"]), bytes(body))

    def restate(d: dict[str, Any]) -> None:
        for chunk in d["tensors"]["big"]["chunks"]:
            if chunk["key"] == c["key"]:
                restated(chunk, bytes(body))

    edit(base, 1, restate)
    refused(base, 1, CorruptCheckpointError, c["key"], "declares 1099511627776 bytes")


@case
@rss_bounded(100)
def case_sparse_6_gib_object(base: H.Base) -> None:
    key = sorted(base.objects)[3]
    with open(base.object_file(key), "r+b") as f:
        f.truncate(6 << 30)
    start = time.monotonic()
    step = 1 if _used_by(base, 1, key) else 2
    refused(base, step, CorruptCheckpointError, key, "more than")
    assert time.monotonic() - start < 20


@case
@rss_bounded(700)
def case_manifest_of_500_mb(base: H.Base) -> None:
    with open(base.manifest_file(1), "r+b") as f:
        f.seek(0, 2)
        f.truncate(500 << 20)  # sparse: a valid manifest followed by 500 MB of zeros
    refused(base, 1, SchemaError, "CKPT_MAX_MANIFEST_BYTES", only=("load",))
    os.environ["CKPT_MAX_MANIFEST_BYTES"] = str(2 << 20)  # the knob lowers the limit
    try:
        M.put_back(base, "manifests")
        with open(base.manifest_file(1), "ab") as f:
            f.write(b" " * (3 << 20))
        refused(base, 1, SchemaError, "larger than 2097152 bytes", only=("load", "read_manifest", "restore"))
    finally:
        del os.environ["CKPT_MAX_MANIFEST_BYTES"]


# -- exceptions that escaped ----------------------------------------------------------------------


@case
def case_json_nested_100k_deep(base: H.Base) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for body in (deep, json.dumps({"format": "ckpt", "schema": 1, "step": 1, "tree": "@", "tensors": {}}).encode()):
        body = body.replace(b'"@"', b'{"a":' * 100_000 + b"1" + b"}" * 100_000)
        M.write_rel(base, "manifests/1.json", body)
        refused(base, 1, SchemaError, "step 1", "nested too deeply")
        for args in (
            ["ls", base.url],
            ["show", base.url, "--step", "1"],
            ["diff", base.url, "1", "2"],
            ["verify", base.url],
            ["du", base.url],
            ["gc", base.url, "--keep-last", "1", "--dry-run"],
            ["export", base.url, os.path.join(_out_dir, "deep.pt"), "--step", "1"],
        ):
            code, out, err = H.run_cli(args)
            assert H.cli_escaped(code, err) is None and "Recursion" not in out + err, (args, code, err)
    # a tree nested deeper than CKPT_MAX_TREE_DEPTH, though Python could still parse it
    edit(base, 1, lambda d: d["tree"]["cfg"].update(deep=json.loads("[" * 200 + "]" * 200)))
    refused(base, 1, SchemaError, "nests deeper than 128 levels")


@case
def case_codec_params_untyped(base: H.Base) -> None:
    for bad in ("x", 3, 4.0, True, None, [4]):
        edit(base, 1, lambda d, bad=bad: chunk_of(d, "big")["codec"][0].update(itemsize=bad))
        refused(base, 1, SchemaError, "tensor 'big' chunk 0", "itemsize")
    edit(base, 1, lambda d: chunk_of(d, "big")["codec"].append({"name": "zstd", "in": "12"}))
    refused(base, 1, SchemaError, "input size")
    edit(base, 1, lambda d: chunk_of(d, "big")["codec"].insert(0, "zstd"))
    refused(base, 1, SchemaError, "not a mapping with a name")
    # the codecs refuse on their own too (a chain handed to them without a manifest)
    from ckpt.codecs.base import decode_chain
    from ckpt.hooks.manager import get_plugins

    for chain in ([{"name": "bgzstd", "itemsize": "x"}], [{"name": 3}], ["zstd"], [{"name": "xor", "parent": {}}]):
        try:
            decode_chain(get_plugins().codecs, chain, memoryview(b"abcd"), memoryview(bytearray(4)), None, "t")
        except CorruptCheckpointError:
            continue
        raise AssertionError(f"decode_chain accepted {chain}")


@case
def case_dtype_names_from_a_table(base: H.Base) -> None:
    for bad in ("_dynamo", "nn", "Tensor", "float128", "__class__", "qint8"):
        edit(base, 1, lambda d, bad=bad: d["tensors"]["big"].update(dtype=bad))
        refused(base, 1, SchemaError, "tensor 'big'", "dtype")
    edit(base, 1, lambda d: d["tree"]["cfg"].update(dt={"$dtype": "_dynamo"}))
    refused(base, 1, SchemaError, "dtype", only=("load", "restore"))
    # looking hostile names up imported nothing (checked when this worker started)
    assert _dynamo_probe == "clean", _dynamo_probe


_dynamo_probe = "not run"


def _probe_dtype_lookup() -> str:
    from ckpt.state.tree import dtype_from_name

    if "torch._dynamo" in sys.modules:
        return "torch._dynamo was imported before the probe: cannot tell"
    for name in ("_dynamo", "nn", "Tensor", "compile", "_inductor"):
        try:
            dtype_from_name(name)
        except SchemaError:
            continue
        return f"dtype_from_name({name!r}) did not raise SchemaError"
    return "clean" if "torch._dynamo" not in sys.modules else "looking up '_dynamo' imported torch._dynamo"


@case
def case_delta_chain_citing_itself(base: H.Base) -> None:
    doc = json.loads(base.manifests[2])
    path, i = next(
        (p, i)
        for p, e in doc["tensors"].items()
        for i, c in enumerate(e["chunks"])
        if c["codec"][:1] and c["codec"][0]["name"] == "xor"
    )

    def cycle(d: dict[str, Any]) -> None:
        c = d["tensors"][path]["chunks"][i]
        c["codec"][0]["parent"]["key"] = c["key"]

    edit(base, 2, cycle)
    refused(base, 2, SchemaError, "cycle", f"tensor {path!r}")

    def deep(d: dict[str, Any]) -> None:
        c = d["tensors"][path]["chunks"][i]
        rec = c["codec"][0]["parent"]
        for n in range(70):  # links of distinct objects, deeper than any writer makes
            rec = {**rec, "key": f"{n:032x}", "codec": [{"name": "xor", "parent": rec}]}
        c["codec"][0]["parent"] = rec

    edit(base, 2, deep)
    refused(base, 2, SchemaError, "deeper than 64 links")


@case
def case_manifests_is_a_file(base: H.Base) -> None:
    M.delete_rel(base, "manifests")
    with open(os.path.join(base.root, "manifests"), "wb") as f:
        f.write(b"{}")
    for name, fn in {"load": lambda: ckpt.load(base.url), "steps": lambda: ckpt.latest_step(base.url)}.items():
        got = H.attempt(fn)
        assert isinstance(got.error, ckpt.CheckpointError), (name, got.error)
        assert not isinstance(got.error, NoCheckpointError), f"{name}: {got.error}"
        assert "manifests" in str(got.error), f"{name}: {got.error}"


def _used_by(base: H.Base, step: int, key: str) -> bool:
    doc = json.loads(base.manifests[step])
    return any(c["key"] == key for e in doc["tensors"].values() for c in e["chunks"])
