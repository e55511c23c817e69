"""CodecConformance: the tests every codec must pass, for a subclass to inherit.

A codec reads untrusted bytes: whatever a damaged or hostile object holds, its decoder
must raise :class:`~ckpt.CorruptCheckpointError` (never another exception), and must not
allocate more than the size it decodes to. A codec without integrity of its own may
decode a damaged payload to wrong bytes; ckpt's reader catches those by the content
hash, which :meth:`CodecConformance.test_damage_is_caught_end_to_end` checks through
real saves and loads.
"""

from __future__ import annotations

import contextlib
import json
import random
import tracemalloc
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckpt
from ckpt.codecs import Codec, CodecContext, CodecRegistry, EncodeContext, decode_chain, encode_chain
from ckpt.codecs.base import decode_prefix
from ckpt.hooks.manager import get_plugins
from ckpt.io.hashing import hash_bytes
from ckpt.io.reader import Reader
from ckpt.state.tree import dtype_from_name
from ckpt.storage.store import Store
from ckpt.testing.codec_samples import ChunkSource, Sample, codec_samples, large_samples
from ckpt.testing.state import assert_same_state, clone_state, corrupt_object, restore_object

#: a decoder may allocate this much beyond the size it decodes to (tables, small scratch)
DECODE_SLACK_BYTES = 1 << 20


@dataclass(frozen=True)
class Encoded:
    """A sample as a manifest would record it: payload, chain (through JSON), and its parents."""

    sample: Sample
    payload: bytes
    chain: list[dict[str, Any]]
    source: ChunkSource


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        yield
    finally:
        if started:
            tracemalloc.stop()


def _damaged_outcome(decode: Callable[[], None]) -> tuple[str, int]:
    """Run one decode of damaged input: ``("corrupt" | "decoded", peak bytes allocated)``.

    Any exception other than CorruptCheckpointError propagates: that is the failure.
    """
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        decode()
        outcome = "decoded"
    except ckpt.CorruptCheckpointError:
        outcome = "corrupt"
    except MemoryError as exc:
        raise AssertionError("decoding a damaged payload tried to allocate more memory than exists") from exc
    return outcome, tracemalloc.get_traced_memory()[1] - base


#: what a damaged parameter may be replaced by
_BAD_VALUES: tuple[Any, ...] = ("", "bogus", None, -1, 2**63, 0.5, True, [], {})


def _bad_params(params: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each parameter removed, then replaced by each bad value, nested mappings included."""
    for key, value in params.items():
        if key == "name":
            continue
        yield f"without {key!r}", {k: v for k, v in params.items() if k != key}
        for bad in _BAD_VALUES:
            yield f"{key}={bad!r}", {**params, key: bad}
        if isinstance(value, Mapping):
            for what, inner in _bad_params(value):
                yield f"{key}: {what}", {**params, key: inner}


class CodecConformance:
    """Conformance tests for one codec; subclass it in a pytest module::

        class TestMyCodec(CodecConformance):
            codec_name = "mycodec"      # registered by a plugin (or override the `codec` fixture)

    The subclass gets bit-exact round trips over varied data, exact-size decoding,
    truncated, extended and bit-flipped payloads and wrong parameters refused with
    CorruptCheckpointError, decoding bounded by the expected size, independence from
    the store (the :class:`~ckpt.codecs.CodecContext`), and damage caught end to end
    through real saves and loads with the codec in the chain.

    Hooks: :meth:`encode_context` (a delta codec's parent chunk), :meth:`codec_context`
    (a store's settings, e.g. keys), :attr:`detects_corruption`.
    """

    #: name of the codec under test, as a plugin registers it
    codec_name: str | None = None
    #: True when the codec authenticates or checksums its payload: then no damaged payload
    #: may decode at all. Without it, damage may decode to wrong bytes (the reader's hash
    #: check catches them) but must never raise anything but CorruptCheckpointError.
    detects_corruption: bool = False

    # -- what a subclass provides -----------------------------------------------------
    @pytest.fixture
    def codec(self) -> Codec:
        """The codec under test (by default the registered codec named :attr:`codec_name`)."""
        if self.codec_name is None:
            raise NotImplementedError(f"{type(self).__name__} must set `codec_name` or define a `codec` fixture")
        codecs = get_plugins().codecs
        assert self.codec_name in codecs, f"no loaded plugin registers a codec named {self.codec_name!r}"
        return codecs.get(self.codec_name)

    def encode_context(self, data: memoryview, dtype: str, itemsize: int, codec_context: CodecContext) -> EncodeContext:
        """The context ``data`` is encoded in; a delta codec's subclass adds a parent chunk
        (``parent`` and ``parent_ref``, see :func:`chunk_record`), which decoding is given back."""
        return EncodeContext(dtype=dtype, itemsize=itemsize, codec_context=codec_context)

    def codec_context(self, url: str) -> CodecContext:
        """What the store at ``url`` gives its codecs (a codec with keys reads them from here)."""
        return CodecContext(url=url)

    # -- helpers ------------------------------------------------------------------------
    def registry(self, codec: Codec) -> CodecRegistry:
        registry = CodecRegistry()
        registry.current_plugin = "conformance"
        registry(codec)
        return registry

    def encode(self, codec: Codec, sample: Sample, context: CodecContext | None = None) -> Encoded | None:
        """``sample`` through :func:`ckpt.codecs.encode_chain`; None when the codec declines it."""
        context = context or self.codec_context("memory://codec-conformance")
        source = ChunkSource(context)
        buf = bytearray(sample.data)  # writable, so an encoder writing into its input is caught
        ctx = self.encode_context(memoryview(buf), sample.dtype, sample.itemsize, context)
        if ctx.parent is not None and ctx.parent_ref is not None:
            source.serve(ctx.parent_ref, bytes(ctx.parent))
        payload, chain = encode_chain(self.registry(codec), [codec.name], memoryview(buf), ctx)
        assert bytes(buf) == sample.data, f"{codec.name} changed its input while encoding {sample.name}"
        if not chain:
            return None
        try:
            stored = json.loads(json.dumps(chain, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise AssertionError(f"{codec.name}'s parameters {chain!r} cannot be stored in a manifest: {exc}") from None
        assert stored == chain, f"{codec.name}'s parameters change through JSON: {chain!r} -> {stored!r}"
        return Encoded(sample, bytes(payload), stored, source)

    def decode(
        self,
        codec: Codec,
        encoded: Encoded,
        out: memoryview,
        *,
        payload: bytes | None = None,
        chain: list[dict[str, Any]] | None = None,
        source: ChunkSource | None = None,
    ) -> None:
        steps: list[Mapping[str, Any]] = list(encoded.chain if chain is None else chain)
        decode_chain(
            self.registry(codec),
            steps,
            memoryview(encoded.payload if payload is None else payload),
            out,
            encoded.source if source is None else source,
            what=f"sample {encoded.sample.name}",
        )

    def encoded_samples(self, codec: Codec, *, limit: int = 10_000) -> list[Encoded]:
        """The samples of at most ``limit`` bytes the codec encodes (it may decline the others)."""
        found = []
        for sample in codec_samples():
            if len(sample.data) <= limit:
                encoded = self.encode(codec, sample)
                if encoded is not None:
                    found.append(encoded)
        if not found:
            pytest.skip(f"{codec.name} declines every sample")
        return found

    def check_damaged(self, codec: Codec, encoded: Encoded, what: str, **damage: Any) -> str:
        """Decode ``encoded`` with ``damage`` (``payload``, ``chain`` or ``source`` replaced): it must
        raise nothing but CorruptCheckpointError and allocate no more than the expected size.

        Returns ``"corrupt"`` (refused) or ``"decoded"`` (to some bytes: allowed only for a
        codec without :attr:`detects_corruption`; ckpt's hash check refuses them). Call it
        with tracemalloc tracing (see the tests).
        """
        expected = len(encoded.sample.data)
        out = memoryview(bytearray(expected))
        where = f"{codec.name}, sample {encoded.sample.name}, {what}"
        try:
            outcome, peak = _damaged_outcome(lambda: self.decode(codec, encoded, out, **damage))
        except AssertionError:
            raise
        except Exception as exc:
            raise AssertionError(
                f"{where}: raised {type(exc).__name__}: {exc} (damaged input must raise CorruptCheckpointError)"
            ) from exc
        assert peak <= expected + DECODE_SLACK_BYTES, (
            f"{where}: decoding allocated {peak} bytes for a {expected}-byte chunk "
            "(bounded by the expected size, never by what the payload claims)"
        )
        if outcome == "decoded" and self.detects_corruption:
            assert bytes(out) == encoded.sample.data, (
                f"{where}: decoded to wrong bytes, though the codec detects corruption"
            )
        return outcome

    # -- the tests ----------------------------------------------------------------------
    def test_round_trip_is_bit_exact(self, codec: Codec) -> None:
        encoded = 0
        for sample in codec_samples() + large_samples():
            result = self.encode(codec, sample)
            if result is None:
                continue  # "does not help": the writer stores the chunk raw
            encoded += 1
            out = bytearray(b"\xa5" * len(sample.data))
            self.decode(codec, result, memoryview(out))
            assert bytes(out) == sample.data, f"{codec.name} does not round-trip sample {sample.name}"
        assert encoded, f"{codec.name} declined every sample: it never helps"

    def test_decodes_into_exactly_the_expected_size(self, codec: Codec) -> None:
        for encoded in self.encoded_samples(codec):
            n = len(encoded.sample.data)
            guarded = bytearray(b"\x5a" * (n + 32))
            self.decode(codec, encoded, memoryview(guarded)[16 : 16 + n])
            assert bytes(guarded[16 : 16 + n]) == encoded.sample.data
            assert guarded[:16] == guarded[-16:] == b"\x5a" * 16, f"{codec.name} wrote outside `out`"
            for size in {n + 1, max(n - 1, 0)} - {n}:
                with pytest.raises(ckpt.CorruptCheckpointError):
                    self.decode(codec, encoded, memoryview(bytearray(size)))

    def test_truncated_payload_is_corrupt(self, codec: Codec) -> None:
        with _tracing():
            for encoded in self.encoded_samples(codec):
                p = encoded.payload
                for cut in sorted({0, 1, len(p) // 2, len(p) - 1}):
                    if 0 <= cut < len(p):
                        what = f"payload cut to {cut} of {len(p)} bytes"
                        outcome = self.check_damaged(codec, encoded, what, payload=p[:cut])
                        assert outcome == "corrupt", f"{codec.name}, sample {encoded.sample.name}: {what} decodes"

    def test_extended_payload_is_corrupt(self, codec: Codec) -> None:
        with _tracing():
            for encoded in self.encoded_samples(codec):
                p = encoded.payload
                for extra in (b"\0", p[:16], bytes(range(256)) * 4):
                    if not extra:
                        continue
                    what = f"{len(extra)} bytes appended to the payload"
                    outcome = self.check_damaged(codec, encoded, what, payload=p + extra)
                    assert outcome == "corrupt", f"{codec.name}, sample {encoded.sample.name}: {what} decodes"

    def test_flipped_bits_never_escape_as_other_errors(self, codec: Codec) -> None:
        with _tracing():
            for encoded in self.encoded_samples(codec, limit=100_000):
                p = encoded.payload
                if not p:
                    continue
                header = range(min(len(p), 48))
                rest = sorted(
                    {*np.linspace(0, len(p) - 1, 16).astype(int).tolist(), *range(max(0, len(p) - 8), len(p))}
                )
                flips = [(i, m) for i in header for m in (0xFF, 0x80, 0x01)] + [(i, 0xFF) for i in rest]
                for pos, mask in flips:
                    bad = bytearray(p)
                    bad[pos] ^= mask
                    self.check_damaged(codec, encoded, f"byte {pos} ^ {mask:#x}", payload=bytes(bad))

    def test_wrong_params_are_corrupt(self, codec: Codec) -> None:
        with _tracing():
            for encoded in self.encoded_samples(codec):
                step = encoded.chain[0]
                for what, params in _bad_params(step):
                    self.check_damaged(codec, encoded, what, chain=[{**params, "name": step["name"]}])

    def test_decode_allocates_at_most_the_expected_size(self, codec: Codec) -> None:
        with _tracing():
            for sample in large_samples():
                encoded = self.encode(codec, sample)
                if encoded is None:
                    continue
                out = memoryview(bytearray(len(sample.data)))
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                self.decode(codec, encoded, out)
                peak = tracemalloc.get_traced_memory()[1] - base
                assert bytes(out) == sample.data
                assert peak <= len(out) + DECODE_SLACK_BYTES, (
                    f"{codec.name} allocated {peak} bytes decoding {sample.name} ({len(out)} bytes)"
                )

    def test_decode_prefix_is_the_start_of_decode(self, codec: Codec) -> None:
        """``decode_prefix`` (optional; see :func:`ckpt.codecs.base.decode_prefix`) gives the
        first bytes the whole decode gives, at least as many as asked; a codec without it
        gives None, and the writer decodes the whole chunk instead."""
        has = getattr(codec, "decode_prefix", None) is not None
        registry = self.registry(codec)
        for sample in codec_samples() + large_samples():
            encoded = self.encode(codec, sample)
            if encoded is None:
                continue
            n = len(sample.data)
            for want in sorted({0, 1, sample.itemsize, n // 3, n, n + 7}):
                got = decode_prefix(registry, encoded.chain, memoryview(encoded.payload), n, want)
                where = f"{codec.name}, sample {sample.name}, prefix of {want} of {n} bytes"
                if not has:
                    assert got is None, f"{where}: a codec without decode_prefix has no prefix"
                    continue
                if got is None:
                    continue  # allowed (a codec may decline a chain it cannot cut short)
                assert min(want, n) <= len(got) <= n, f"{where}: got {len(got)} bytes"
                assert bytes(got) == sample.data[: len(got)], f"{where}: differs from the decoded chunk"

    def test_decode_prefix_of_damage_never_raises(self, codec: Codec) -> None:
        """A damaged payload's prefix is None or some bytes (unverified: used for estimates
        only), never an exception, and costs memory bounded by what was asked."""
        registry = self.registry(codec)
        with _tracing():
            for encoded in self.encoded_samples(codec, limit=100_000) + [
                e for e in (self.encode(codec, s) for s in large_samples()) if e is not None
            ]:
                p = encoded.payload
                n = len(encoded.sample.data)
                damaged = [p[:cut] for cut in sorted({0, 1, len(p) // 2, len(p) - 1}) if 0 <= cut < len(p)]
                for pos in sorted(
                    {*range(min(len(p), 48)), *np.linspace(0, max(len(p) - 1, 0), 8).astype(int).tolist()}
                ):
                    if pos < len(p):
                        bad = bytearray(p)
                        bad[pos] ^= 0xFF
                        damaged.append(bytes(bad))
                for bad_payload in damaged:
                    want = min(n, 64 * 1024)
                    tracemalloc.reset_peak()
                    base = tracemalloc.get_traced_memory()[0]
                    try:
                        got = decode_prefix(registry, encoded.chain, memoryview(bad_payload), n, want)
                    except Exception as exc:
                        raise AssertionError(
                            f"{codec.name}, sample {encoded.sample.name}: decode_prefix of a damaged payload "
                            f"raised {type(exc).__name__}: {exc}"
                        ) from exc
                    peak = tracemalloc.get_traced_memory()[1] - base
                    assert got is None or min(want, n) <= len(got) <= n
                    assert peak <= 2 * want + DECODE_SLACK_BYTES, (
                        f"{codec.name}, sample {encoded.sample.name}: a {want}-byte prefix allocated {peak} bytes"
                    )

    def test_stateless_across_stores(self, codec: Codec) -> None:
        """One codec instance serves every store at once: all it needs comes in the context."""
        contexts = [self.codec_context(f"memory://codec-conformance-{i}") for i in range(2)]
        samples = [s for s in codec_samples() if len(s.data) <= 10_000]
        jobs = [(ctx, s) for s in samples for ctx in contexts]
        random.Random(0).shuffle(jobs)

        def round_trip(job: tuple[CodecContext, Sample]) -> None:
            ctx, sample = job
            encoded = self.encode(codec, sample, ctx)
            if encoded is not None:
                out = bytearray(len(sample.data))
                self.decode(codec, encoded, memoryview(out))
                assert bytes(out) == sample.data, f"{codec.name}: {sample.name} for {ctx.url} does not round-trip"

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(round_trip, jobs))

    def test_damage_is_caught_end_to_end(self, codec: Codec, tmp_path: Path) -> None:
        """Objects re-encoded with the codec load bit-exact; a flipped or cut object is refused by name."""
        if self.codec_name is None or get_plugins().codecs.get(self.codec_name) is not codec:
            pytest.skip("the codec is not registered by a plugin: ckpt's reader cannot find it")
        url = f"file://{tmp_path}/store"
        g = torch.Generator().manual_seed(3)
        state = {
            "f32": torch.randn(3000, generator=g) * 0.02,
            "bf16": (torch.randn(3001, generator=g) * 0.02).bfloat16(),
            "ints": torch.arange(5000) % 7,
            "zeros": torch.zeros(4096, dtype=torch.uint8),
            "noise": torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=g),
        }
        expected = clone_state(state)
        ckpt.save(url, state, step=1)
        keys = rewrite_with_codec(url, 1, codec.name, encode_context=self.encode_context)
        if not keys:
            pytest.skip(f"{codec.name} declines every chunk of the test state")
        assert_same_state(ckpt.load(url), expected)
        live = {k: torch.zeros_like(v) for k, v in state.items()}
        ckpt.restore(url, live)
        assert_same_state(live, expected)
        store = Store(url)
        for key in keys:
            original = store.get_object(key)
            corrupt_object(store, key)
            with pytest.raises(ckpt.CorruptCheckpointError, match=key):
                ckpt.load(url)
            store.put_object(key, original[: len(original) // 2])
            with pytest.raises(ckpt.CorruptCheckpointError, match=key):
                ckpt.load(url)
            restore_object(store, key, original)
        assert_same_state(ckpt.load(url), expected)


def rewrite_with_codec(
    url: str,
    step: int,
    codec_name: str,
    *,
    paths: list[str] | None = None,
    encode_context: Callable[[memoryview, str, int, CodecContext], EncodeContext] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Re-encode the objects of checkpoint ``step`` (of ``paths``, default all) with the
    registered codec ``codec_name`` alone, as a writer using it would have stored them.

    ``encode_context`` builds each chunk's context (see :meth:`CodecConformance.encode_context`);
    a parent chunk it names is stored as a plain object so a reader finds it. Returns the keys
    rewritten; chunks the codec declines keep their encoding.
    """
    store = Store(url, storage_options)
    codecs = get_plugins().codecs
    codec = codecs.get(codec_name)
    doc = json.loads(store.read_manifest(step))
    manifest = ckpt.read_manifest(url, step, storage_options)
    reader = Reader(store, codecs)
    done: dict[str, dict[str, Any]] = {}
    for path, entry in manifest.tensors.items():
        if paths is not None and path not in paths:
            continue
        itemsize = dtype_from_name(entry.dtype).itemsize
        for i, ref in enumerate(entry.chunks):
            if ref.key not in done:
                # the whole object: a packed chunk (schema 2) is a slice of an object shared with others
                raw = memoryview(bytearray(ref.object_size))
                reader.read_object(ref, raw, what=f"tensor {path!r}")
                if encode_context is None:
                    ctx = EncodeContext(dtype=entry.dtype, itemsize=itemsize, codec_context=store.codec_context)
                else:
                    ctx = encode_context(raw, entry.dtype, itemsize, store.codec_context)
                if ctx.parent is not None and ctx.parent_ref is not None:
                    store.put_object(str(ctx.parent_ref["key"]), bytes(ctx.parent))
                result = codec.encode(raw, ctx)
                if result is None:
                    continue
                payload, params = result
                store.put_object(ref.key, payload)
                # the hash of the new stored bytes too: a restore checks it before decoding in place
                done[ref.key] = {
                    "codec": [{"name": codec_name, **params}],
                    "stored": len(payload),
                    "stored_hash": hash_bytes(payload),
                }
            doc["tensors"][path]["chunks"][i].update(done[ref.key])
    store.write(store.manifest_path(step), json.dumps(doc).encode())
    return sorted(done)
