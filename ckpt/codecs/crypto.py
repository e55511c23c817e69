"""AES-256-GCM, the last codec stage of every object of an encrypted store.

The stage seals what the codecs before it produced (compressed bytes, a delta...) under
the store's object key (:class:`ckpt.security.envelope.StoreKeys`, carried by the store's
:class:`~ckpt.codecs.base.CodecContext`, never a global)::

    payload = nonce (12 random bytes, fresh per object)
              || for each piece i of p input bytes (the last may be shorter):
                     AES-GCM(nonce XOR i, piece_i, aad_i) = ciphertext_i || tag_i (16)
    aad_i   = "ckpt/object/v1" 0x00 || store id (16) || object key (ascii) || 0x00
              || input size (u64) || i (u32) || last (u8)

The chain step records ``{"name": "aesgcm", "p": <piece bytes>}`` (and ``"in"`` like any
stage whose input is not the raw size). Pieces of 1 MiB keep each call into
``cryptography`` (which holds the GIL) short, so compression threads keep running, and
seal/open straight into one buffer (``encrypt_into``/``decrypt_into``). The associated data
binds every piece to the store, to the object's key (its path in the store), to its place
in the object and to the object's length: an object swapped for another, pieces reordered,
cut or extended, or any flipped bit fails authentication, a
:class:`~ckpt.errors.CorruptCheckpointError` naming the object.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ckpt.codecs.base import INPUT_SIZE, CodecContext, DecodeContext, EncodeContext
from ckpt.errors import CorruptCheckpointError, EncryptionError
from ckpt.io.scratch import scratch

if TYPE_CHECKING:
    from ckpt.security.envelope import StoreKeys

NAME = "aesgcm"
#: the CodecContext setting that holds the store's keys (a StoreKeys; absent: a plain store)
SETTING = "encryption"
NONCE_SIZE = 12
TAG_SIZE = 16
#: piece size of new objects; measured: 1 MiB pieces seal ~2x faster than one 16 MiB call
PIECE_BYTES = 1024 * 1024
#: piece sizes a reader accepts from a manifest
_MIN_PIECE = 4096
_MAX_PIECE = 64 * 1024 * 1024
_AAD_PREFIX = b"ckpt/object/v1\x00"
#: the first bytes of a sealed manifest (the format is in :mod:`ckpt.security.envelope`)
SEALED_MAGIC = b"CKPT-SEALED 1\n"


def store_keys(ctx: CodecContext) -> StoreKeys | None:
    """The keys of the store ``ctx`` works for (None: a plain store)."""
    keys = ctx.settings.get(SETTING)
    return keys if keys is not None and hasattr(keys, "object_aead") else None


def _aad(keys: StoreKeys, object_key: str, total: int, index: int, last: bool) -> bytes:
    return b"".join(
        (_AAD_PREFIX, keys.store_id, object_key.encode("ascii"), b"\x00", struct.pack(">QIB", total, index, last))
    )


def _nonce(base: bytes, index: int) -> bytes:
    return base[:8] + (int.from_bytes(base[8:], "big") ^ index).to_bytes(4, "big")


def _pieces(total: int, piece: int) -> int:
    return max(1, -(-total // piece))


def sealed_size(total: int, piece: int = PIECE_BYTES) -> int:
    """Payload bytes of an object whose input to this stage is ``total`` bytes."""
    return NONCE_SIZE + total + TAG_SIZE * _pieces(total, piece)


def seal(keys: StoreKeys, object_key: str, data: memoryview, piece: int = PIECE_BYTES) -> memoryview:
    """``data`` sealed as object ``object_key`` of the store (see the module docstring)."""
    total = len(data)
    count = _pieces(total, piece)
    # fully overwritten (no zero-fill); on a page, so that a local store writes it direct
    view = scratch(sealed_size(total, piece)).data
    base = os.urandom(NONCE_SIZE)
    view[:NONCE_SIZE] = base
    at = NONCE_SIZE
    aead = keys.object_aead
    for i in range(count):
        part = data[i * piece : (i + 1) * piece]
        end = at + len(part) + TAG_SIZE
        aead.encrypt_into(_nonce(base, i), part, _aad(keys, object_key, total, i, i == count - 1), view[at:end])
        at = end
    return view


def unseal(keys: StoreKeys, object_key: str, payload: memoryview, out: memoryview, piece: int, what: str) -> None:
    """Authenticate and decrypt ``payload`` (object ``object_key``) into ``out``."""
    from cryptography.exceptions import InvalidTag

    total = len(out)
    if len(payload) != sealed_size(total, piece):
        raise CorruptCheckpointError(
            f"{what}: encrypted object has {len(payload)} bytes, {sealed_size(total, piece)} expected"
        )
    count = _pieces(total, piece)
    base = bytes(payload[:NONCE_SIZE])
    at = NONCE_SIZE
    aead = keys.object_aead
    for i in range(count):
        n = min(piece, total - i * piece)
        try:
            aead.decrypt_into(
                _nonce(base, i),
                payload[at : at + n + TAG_SIZE],
                _aad(keys, object_key, total, i, i == count - 1),
                out[i * piece : i * piece + n],
            )
        except InvalidTag:
            raise CorruptCheckpointError(
                f"{what}: fails authentication (altered, or another object put in its place)"
            ) from None
        at += n + TAG_SIZE


class AesGcmCodec:
    """The ``aesgcm`` stage. Never chosen by a chain on its own: :func:`seal_chain` appends it
    to every object of an encrypted store, once the object's key is known."""

    name = NAME

    def encode(self, data: memoryview, ctx: EncodeContext) -> tuple[bytes | memoryview, dict[str, Any]] | None:
        keys = store_keys(ctx.codec_context)
        object_key = getattr(ctx, "object_key", "")
        if keys is None or not object_key:
            return None  # a plain store, or no object to bind to: this stage does not apply
        return seal(keys, object_key, data), {"p": PIECE_BYTES}

    def decode(self, payload: memoryview, out: memoryview, params: Mapping[str, Any], ctx: DecodeContext) -> None:
        keys = store_keys(ctx.codec_context)
        object_key = getattr(ctx, "object_key", None)
        what = f"object {object_key}" if object_key else "an object"
        if keys is None:
            raise EncryptionError(
                f"{what} of {ctx.codec_context.url or 'the store'} is encrypted: pass encryption=ckpt.Encryption(key)"
            )
        if not isinstance(object_key, str) or not object_key:
            raise CorruptCheckpointError(f"{what}: no object key to authenticate it against")
        piece = params.get("p")
        if isinstance(piece, bool) or not isinstance(piece, int) or not _MIN_PIECE <= piece <= _MAX_PIECE:
            raise CorruptCheckpointError(f"{what}: impossible encryption piece size {str(piece)[:40]}")
        unseal(keys, object_key, payload, out, piece, what)


def seal_chain(
    ctx: CodecContext, object_key: str, payload: bytes | memoryview, chain: list[dict[str, Any]], raw_size: int
) -> tuple[bytes | memoryview, list[dict[str, Any]]]:
    """``payload`` and ``chain`` with the encryption stage appended when the store is encrypted
    (unchanged for a plain store)."""
    keys = store_keys(ctx)
    if keys is None:
        return payload, chain
    sealed = seal(keys, object_key, memoryview(payload))
    step: dict[str, Any] = {"name": NAME, "p": PIECE_BYTES}
    if len(payload) != raw_size:
        step[INPUT_SIZE] = len(payload)
    return sealed, [*chain, step]


def address(ctx: CodecContext, raw_hash: str, size: int) -> str:
    """The object key of a full chunk: its content hash in a plain store; in an encrypted one a
    keyed hash of it (:meth:`ckpt.security.envelope.StoreKeys.address`), so equal plaintext is
    not revealed to anyone without the key."""
    keys = store_keys(ctx)
    return raw_hash if keys is None else keys.address(raw_hash, size)


class ObjectDecodeContext:
    """A reader's :class:`DecodeContext` for one object: adds the key the object is stored under."""

    __slots__ = ("_ctx", "codec_context", "object_key")

    def __init__(self, ctx: DecodeContext, object_key: str) -> None:
        self._ctx = ctx
        self.codec_context = ctx.codec_context
        self.object_key = object_key

    def raw_chunk(self, ref: Mapping[str, Any]) -> memoryview:
        return self._ctx.raw_chunk(ref)


def manifest_json(ctx: CodecContext, step: int, data: bytes) -> bytes:
    """The manifest JSON of file ``data`` read as ``manifests/<step>.json`` of the store of ``ctx``:
    ``data`` itself in a plain store; opened and authenticated in an encrypted one
    (:meth:`ckpt.security.envelope.StoreKeys.open_manifest`)."""
    keys = store_keys(ctx)
    where = f"manifest step {step} of {ctx.url}"
    if not data.startswith(SEALED_MAGIC):
        if keys is not None:
            raise CorruptCheckpointError(f"{where} is not encrypted in an encrypted store: refusing it")
        return data
    if keys is None:
        raise EncryptionError(
            f"{ctx.url} is encrypted: pass encryption=ckpt.Encryption(key) to read it "
            "(on the command line --key-file or CKPT_KEY_FILE)"
        )
    return keys.open_manifest(data, step, ctx.url)
