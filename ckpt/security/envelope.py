"""The store-level envelope: a data key per store, wrapped by a key provider; its subkeys.

An encrypted store has a descriptor at its root, written before its first object::

    <root>/encryption.json
    {"format": "ckpt-encryption", "version": 1, "alg": "AES-256-GCM",
     "store_id": "<32 hex, random>", "key_id": "<the provider's key id>",
     "wrapped": "<base64 of the wrapped data key>", "check": "<32 hex>"}

The 32-byte data key is random; the provider wraps it (``key_id`` names its key). HKDF-SHA256
(salt: the store id) derives from it one key per use: objects (AES-256-GCM,
:mod:`ckpt.codecs.crypto`), manifests (AES-256-GCM, below), content addresses (keyed
BLAKE2b) and ``check`` (a keyed BLAKE2b of the descriptor's fixed fields, so a descriptor
whose store id or algorithm was changed is refused). Rotating the provider's key
(:func:`rewrap`) rewrites ``key_id`` and ``wrapped`` only.

A manifest of an encrypted store is a sealed envelope around the same JSON document::

    CKPT-SEALED 1\\n <header JSON, one line> \\n nonce (12) || AES-GCM(manifest JSON) || tag (16)
    header = {"store": <store id>, "step": n, "seq": s, "run": r, "parent": p,
              "objects": {<key>: <stored bytes, -1 for a delta's ancestor>}}

The header is the associated data: the step and lineage (seq, run, parent) bind the sealed
manifest to its place, so a manifest copied over another step, or an older manifest copied
over a newer one, is refused before it is decrypted; the objects let ``ckpt verify`` check
presence and sizes without the key. Keys of full objects are keyed hashes of the content
hash: the store does not reveal which chunks equal a known plaintext. The header reveals
what the listing of the store reveals anyway (keys and sizes), plus which objects each
step uses; never a name, shape, dtype or value.

Everything read here is untrusted: bounded reads, a strict descriptor, checked sizes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckpt.codecs.base import CodecContext
from ckpt.codecs.crypto import SEALED_MAGIC as MAGIC
from ckpt.codecs.crypto import SETTING
from ckpt.errors import CheckpointError, CorruptCheckpointError, EncryptionError
from ckpt.security.keys import KEY_SIZE, MAX_WRAPPED_SIZE, NONCE_SIZE, TAG_SIZE, Encryption

if TYPE_CHECKING:
    from ckpt.storage.manifest import Manifest
    from ckpt.storage.store import Store

FILE = "encryption.json"
FORMAT = "ckpt-encryption"
VERSION = 1
ALG = "AES-256-GCM"
_DESCRIPTOR_BYTES = 16384
_FIELDS = {"format", "version", "alg", "store_id", "key_id", "wrapped", "check"}
_HEX32 = re.compile(r"[0-9a-f]{32}")
_KEY_ID = re.compile(r"[\x21-\x7e]{1,2048}")
_MANIFEST_AAD = b"ckpt/manifest/v1\x00"
#: a value in CodecContext.settings[SETTING] for a store checked and found plain
PLAIN = "plain"


def _hkdf(data_key: bytes, store_id: bytes, use: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=store_id, info=f"ckpt/v1/{use}".encode()).derive(
        data_key
    )


def _check(data_key: bytes, store_id: bytes) -> str:
    fixed = json.dumps([FORMAT, VERSION, ALG, store_id.hex()]).encode()
    return hashlib.blake2b(fixed, key=_hkdf(data_key, store_id, "check"), digest_size=16).hexdigest()


@dataclass(eq=False)
class StoreKeys:
    """The keys of one encrypted store, derived from its data key; travels in the store's
    :class:`~ckpt.codecs.base.CodecContext` (``settings["encryption"]``)."""

    store_id: bytes
    key_id: str
    object_aead: Any = field(repr=False)
    manifest_aead: Any = field(repr=False)
    address_key: bytes = field(repr=False)
    #: the descriptor to write before the first object (a store being created), else None
    pending: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def derive(cls, data_key: bytes, store_id: bytes, key_id: str) -> StoreKeys:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        return cls(
            store_id=store_id,
            key_id=key_id,
            object_aead=AESGCM(_hkdf(data_key, store_id, "objects")),
            manifest_aead=AESGCM(_hkdf(data_key, store_id, "manifests")),
            address_key=_hkdf(data_key, store_id, "addresses"),
        )

    def address(self, raw_hash: str, size: int) -> str:
        """Key of a full object: a keyed BLAKE2b of its content hash and size (32 hex)."""
        msg = raw_hash.encode("ascii") + size.to_bytes(8, "big")
        return hashlib.blake2b(msg, key=self.address_key, digest_size=16).hexdigest()

    # -- manifests ---------------------------------------------------------------------------
    def seal_manifest(self, body: bytes, manifest: Manifest) -> bytes:
        """The sealed file of ``manifest`` whose JSON document is ``body``."""
        from ckpt.codecs.delta import referenced_keys

        objects: dict[str, int] = {}
        for ref in manifest.chunk_refs():
            objects[ref.key] = ref.stored
            for key in referenced_keys(ref.to_json()):
                objects.setdefault(key, -1)
        header = {
            "store": self.store_id.hex(),
            "step": manifest.step,
            "seq": manifest.seq,
            "run": manifest.run,
            "parent": manifest.parent,
            "objects": objects,
        }
        head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        nonce = os.urandom(NONCE_SIZE)
        return b"".join((MAGIC, head, b"\n", nonce, self.manifest_aead.encrypt(nonce, body, _MANIFEST_AAD + head)))

    def open_manifest(self, data: bytes, step: int, url: str) -> bytes:
        """The JSON document of sealed manifest ``data`` read as ``manifests/<step>.json``."""
        from cryptography.exceptions import InvalidTag

        where = f"manifest step {step} of {url}"
        head, header, rest = parse_sealed(data, where)
        if header["store"] != self.store_id.hex():
            raise CorruptCheckpointError(f"{where} belongs to another store (copied here from elsewhere)")
        if header["step"] != step:
            raise CorruptCheckpointError(
                f"{where} is sealed as step {header['step']}: a manifest copied over another step (rollback)"
            )
        if len(rest) < NONCE_SIZE + TAG_SIZE:
            raise CorruptCheckpointError(f"{where} is truncated")
        try:
            return bytes(self.manifest_aead.decrypt(rest[:NONCE_SIZE], rest[NONCE_SIZE:], _MANIFEST_AAD + head))
        except InvalidTag:
            raise CorruptCheckpointError(
                f"{where} fails authentication (altered, or its step or lineage changed)"
            ) from None


def parse_sealed(data: bytes, where: str) -> tuple[bytes, dict[str, Any], bytes]:
    """``(header bytes, header, nonce + ciphertext)`` of a sealed manifest, header validated
    (nothing authenticated yet: that takes the key)."""
    if not data.startswith(MAGIC):
        raise CorruptCheckpointError(f"{where} is not a sealed manifest")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise CorruptCheckpointError(f"{where}: sealed manifest without a header line")
    head = data[len(MAGIC) : end]
    try:
        header = json.loads(head)
    except (ValueError, RecursionError):
        raise CorruptCheckpointError(f"{where}: unreadable sealed-manifest header") from None
    ok = (
        isinstance(header, dict)
        and set(header) == {"store", "step", "seq", "run", "parent", "objects"}
        and isinstance(header["store"], str)
        and _HEX32.fullmatch(header["store"])
        and _count(header["step"])
        and (header["seq"] is None or _count(header["seq"]))
        and isinstance(header["run"], str)
        and len(header["run"]) <= 256
        and (header["parent"] is None or _count(header["parent"]))
        and isinstance(header["objects"], dict)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= -1 for v in header["objects"].values())
    )
    if not ok:
        raise CorruptCheckpointError(f"{where}: malformed sealed-manifest header")
    return head, header, data[end + 1 :]


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10**18


def is_sealed(data: bytes) -> bool:
    return data.startswith(MAGIC)


# -- the descriptor ------------------------------------------------------------------------------


def read_descriptor(store: Store) -> dict[str, Any] | None:
    """The validated ``encryption.json`` of ``store`` (None: the store is not encrypted)."""
    path = store.path(FILE)
    try:
        raw = store.read(path, limit=_DESCRIPTOR_BYTES + 1)
    except FileNotFoundError:
        return None
    where = f"{FILE} of {store.url}"
    if len(raw) > _DESCRIPTOR_BYTES:
        raise CorruptCheckpointError(f"{where} is larger than {_DESCRIPTOR_BYTES} bytes: not a descriptor")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise CorruptCheckpointError(f"{where} is not JSON: the encrypted store's descriptor is damaged") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{where} is not a ckpt encryption descriptor")
    version = doc.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise EncryptionError(f"{where} has version {version}: written by a newer ckpt; upgrade to read this store")
    if set(doc) != _FIELDS or version != VERSION or doc.get("alg") != ALG:
        raise CorruptCheckpointError(f"{where} is malformed (fields, version or algorithm)")
    if not all(isinstance(doc[k], str) for k in ("store_id", "key_id", "wrapped", "check")):
        raise CorruptCheckpointError(f"{where} is malformed: string fields expected")
    if not (_HEX32.fullmatch(doc["store_id"]) and _HEX32.fullmatch(doc["check"]) and _KEY_ID.fullmatch(doc["key_id"])):
        raise CorruptCheckpointError(f"{where} is malformed: store id, check or key id")
    try:
        wrapped = base64.b64decode(doc["wrapped"], validate=True)
    except (ValueError, binascii.Error):
        raise CorruptCheckpointError(f"{where}: the wrapped key is not base64") from None
    if not 0 < len(wrapped) <= MAX_WRAPPED_SIZE:
        raise CorruptCheckpointError(f"{where}: the wrapped key has {len(wrapped)} bytes")
    return {**doc, "wrapped": wrapped}


def _unwrap(doc: Mapping[str, Any], encryption: Encryption, url: str) -> StoreKeys:
    store_id = bytes.fromhex(doc["store_id"])
    cache_key = (doc["store_id"], doc["wrapped"])
    data_key = encryption._unwrapped.get(cache_key)
    if data_key is None:
        try:
            data_key = encryption.provider.unwrap(doc["wrapped"])
        except EncryptionError as exc:
            raise EncryptionError(
                f"{url} is encrypted with key {doc['key_id']}; the key given ({encryption.key_id}) "
                f"cannot open it: {exc}"
            ) from None
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - a provider's own failure (network, KMS refusal) named
            raise EncryptionError(
                f"{url} is encrypted with key {doc['key_id']}; the key provider failed to unwrap its data key: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(data_key, bytes) or len(data_key) != KEY_SIZE:
            raise EncryptionError(f"{url}: the key provider returned no {KEY_SIZE}-byte data key")
    if _check(data_key, store_id) != doc["check"]:
        raise CorruptCheckpointError(f"{FILE} of {url} fails its check: the descriptor was altered")
    encryption._unwrapped[cache_key] = data_key
    return StoreKeys.derive(data_key, store_id, doc["key_id"])


def new_descriptor(encryption: Encryption) -> tuple[dict[str, Any], StoreKeys]:
    """A fresh data key and store id, the descriptor recording them, and the store's keys."""
    data_key, store_id = os.urandom(KEY_SIZE), os.urandom(16)
    wrapped = encryption.provider.wrap(data_key)
    if not isinstance(wrapped, bytes) or not 0 < len(wrapped) <= MAX_WRAPPED_SIZE:
        raise EncryptionError(f"key provider {encryption.key_id} wrapped the data key into no usable bytes")
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "alg": ALG,
        "store_id": store_id.hex(),
        "key_id": encryption.key_id,
        "wrapped": base64.b64encode(wrapped).decode(),
        "check": _check(data_key, store_id),
    }
    encryption._unwrapped[(store_id.hex(), wrapped)] = data_key
    return doc, StoreKeys.derive(data_key, store_id, encryption.key_id)


def _attach(store: Store, value: StoreKeys | str) -> None:
    ctx = store.codec_context
    store.codec_context = CodecContext(url=ctx.url, settings={**ctx.settings, SETTING: value})


def open_store(store: Store, encryption: Encryption | None, *, create: bool = False) -> StoreKeys | None:
    """Open ``store`` for ``encryption`` (None: a plain store): the store's keys, or None.

    Reads the descriptor and unwraps the data key before any checkpoint data is read: an
    encrypted store without a key, or with a wrong one, is an :class:`EncryptionError`; so is an
    encrypted save into a store of plain checkpoints. With ``create`` an encrypted store that does
    not exist yet gets its keys now and its descriptor before its first object
    (:func:`before_write`). Opening a store twice returns what the first call found.
    """
    if encryption is not None and not isinstance(encryption, Encryption):
        raise EncryptionError(f"encryption= takes a ckpt.Encryption, not {type(encryption).__name__}")
    current = store.codec_context.settings.get(SETTING)
    if current is not None:
        keys = current if isinstance(current, StoreKeys) else None
        if (keys is None) != (encryption is None):
            raise EncryptionError(f"{store.url} was opened {'without' if keys is None else 'with'} encryption")
        return keys
    doc = read_descriptor(store)
    if doc is None:
        if encryption is None:
            _attach(store, PLAIN)
            return None
        if not create:
            raise EncryptionError(f"{store.url} is not encrypted (no {FILE}), but encryption= was given")
        if store.manifest_listing():
            raise EncryptionError(
                f"{store.url} holds plain checkpoints: refusing to mix encrypted and plain saves in one store"
            )
        pending, keys = new_descriptor(encryption)
        keys.pending = pending
        _attach(store, keys)
        return keys
    if encryption is None:
        raise EncryptionError(
            f"{store.url} is encrypted (key {doc['key_id']}): pass encryption=ckpt.Encryption(key) "
            "(on the command line --key-file or CKPT_KEY_FILE)"
        )
    keys = _unwrap(doc, encryption, store.url)
    _attach(store, keys)
    return keys


def before_write(store: Store) -> None:
    """Before a save writes its first object: a store being created gets its descriptor (under
    the writer's lease); a plain store that was made encrypted meanwhile is refused."""
    current = store.codec_context.settings.get(SETTING)
    if isinstance(current, StoreKeys) and current.pending is not None:
        if read_descriptor(store) is not None:
            raise EncryptionError(f"{store.url} was made encrypted by another writer meanwhile; open it again")
        if store.manifest_listing():
            raise EncryptionError(
                f"{store.url} holds plain checkpoints: refusing to mix encrypted and plain saves in one store"
            )
        store.write(store.path(FILE), json.dumps(current.pending, indent=1).encode())
        store.sync_dirs()
        current.pending = None
    elif current is None:
        open_store(store, None)  # a store nobody opened: refuse to write plain into an encrypted one


def keys_of(store: Store) -> StoreKeys | None:
    """The keys ``store`` was opened with (None: plain, or not opened)."""
    current = store.codec_context.settings.get(SETTING)
    return current if isinstance(current, StoreKeys) else None


def seal_for(store: Store, manifest: Manifest, body: bytes) -> bytes:
    """The file to commit for ``manifest`` (``body`` sealed when the store is encrypted)."""
    keys = keys_of(store)
    return body if keys is None else keys.seal_manifest(body, manifest)


def rewrap(url: str, old: Encryption, new: Encryption, storage_options: Mapping[str, Any] | None = None) -> None:
    """Rewrap the data key of the encrypted store at ``url`` from ``old``'s key to ``new``'s.

    Rewrites only ``<root>/encryption.json`` (atomically); no object or manifest changes, and
    the store opens with ``new`` afterwards (and no longer with ``old``, unless both name the
    same key). The new wrapping is checked to unwrap before it is written.
    """
    from ckpt.storage.store import Store

    store = Store(url, dict(storage_options or {}))
    doc = read_descriptor(store)
    if doc is None:
        raise EncryptionError(f"{url} is not encrypted (no {FILE}): nothing to rewrap")
    _unwrap(doc, old, url)
    data_key = old._unwrapped[(doc["store_id"], doc["wrapped"])]
    wrapped = new.provider.wrap(data_key)
    if not isinstance(wrapped, bytes) or not 0 < len(wrapped) <= MAX_WRAPPED_SIZE:
        raise EncryptionError(f"key provider {new.key_id} wrapped the data key into no usable bytes")
    if new.provider.unwrap(wrapped) != data_key:
        raise EncryptionError(f"key provider {new.key_id} does not unwrap what it wrapped: not rewrapping {url}")
    out = {k: v for k, v in doc.items() if k != "wrapped"}
    out.update(key_id=new.key_id, wrapped=base64.b64encode(wrapped).decode())
    store.write(store.path(FILE), json.dumps(out, indent=1).encode())
    store.sync_dirs()
