"""Key providers and :class:`Encryption`, what a user passes as ``encryption=``.

A store is encrypted with a random 32-byte *data key* of its own (see
:mod:`ckpt.security.envelope`). A :class:`KeyProvider` holds the *key-encryption key*: it wraps
the data key when the store is created and unwraps it when the store is opened; the wrapped key
and the provider's :attr:`~KeyProvider.key_id` are recorded at the store root. Rotating the
key-encryption key rewraps the data key and rewrites nothing else.

First-party providers: :class:`StaticKeyProvider` (32 raw bytes, here) and the key-file,
environment and AWS KMS providers in :mod:`ckpt.security.providers`. A provider never reveals
its key: ``key_id`` names it (a keyed hash for a static key, an ARN for KMS).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Protocol, runtime_checkable

from ckpt.errors import EncryptionError

#: size of every AES-256 key here: key-encryption keys, data keys, derived subkeys
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
#: bound on a wrapped data key read from a store (KMS ciphertext blobs are a few hundred bytes)
MAX_WRAPPED_SIZE = 4096

_WRAP_AAD = b"ckpt/wrap/v1"


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps and unwraps a store's data key with a key-encryption key the provider holds."""

    #: names the key-encryption key (never the key itself); recorded in the store
    key_id: str

    def wrap(self, data_key: bytes) -> bytes:
        """Wrap the store's 32-byte data key."""

    def unwrap(self, wrapped: bytes) -> bytes:
        """Unwrap a data key; raise :class:`~ckpt.errors.EncryptionError` when this key cannot."""


def _aesgcm(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def check_key(key: object, what: str = "key") -> bytes:
    """``key`` as 32 bytes, or :class:`EncryptionError` saying what is wrong (never showing it)."""
    if isinstance(key, (bytearray, memoryview)):
        key = bytes(key)
    if not isinstance(key, bytes):
        raise EncryptionError(f"{what} must be {KEY_SIZE} bytes or a key provider, not {type(key).__name__}")
    if len(key) != KEY_SIZE:
        raise EncryptionError(f"{what} must be {KEY_SIZE} bytes (AES-256), got {len(key)} bytes")
    return key


class StaticKeyProvider:
    """A key-encryption key given as 32 raw bytes; wraps with AES-256-GCM.

    The wrapped form is ``nonce (12) || ciphertext (32) || tag (16)``, with associated data
    naming the format and the key id. ``key_id`` is ``"static:"`` and 16 hex digits of a keyed
    BLAKE2b of a constant: it tells keys apart and reveals nothing of the key.
    """

    def __init__(self, key: bytes) -> None:
        self._key = check_key(key)
        digest = hashlib.blake2b(b"ckpt/key-id/v1", key=self._key, digest_size=8).hexdigest()
        self.key_id = f"static:{digest}"

    def __repr__(self) -> str:
        return f"StaticKeyProvider(key_id={self.key_id!r})"

    def wrap(self, data_key: bytes) -> bytes:
        data_key = check_key(data_key, "data key")
        nonce = os.urandom(NONCE_SIZE)
        return nonce + _aesgcm(self._key).encrypt(nonce, data_key, _WRAP_AAD + self.key_id.encode())

    def unwrap(self, wrapped: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        if len(wrapped) != NONCE_SIZE + KEY_SIZE + TAG_SIZE:
            raise EncryptionError(
                f"wrapped data key has {len(wrapped)} bytes, not a key wrapped by a static key ({self.key_id})"
            )
        nonce, body = wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:]
        try:
            return bytes(_aesgcm(self._key).decrypt(nonce, body, _WRAP_AAD + self.key_id.encode()))
        except InvalidTag:
            raise EncryptionError(f"the key {self.key_id} cannot unwrap this store's data key: wrong key") from None


def as_provider(key: bytes | bytearray | memoryview | KeyProvider) -> KeyProvider:
    """A provider for ``key``: 32 raw bytes become a :class:`StaticKeyProvider`; a provider is kept."""
    if isinstance(key, (bytes, bytearray, memoryview)):
        return StaticKeyProvider(bytes(key))
    if isinstance(key, str):
        raise EncryptionError("an encryption key must be 32 bytes or a key provider, not a str (decode it first)")
    if not (
        isinstance(getattr(key, "key_id", None), str)
        and callable(getattr(key, "wrap", None))
        and callable(getattr(key, "unwrap", None))
    ):
        raise EncryptionError(f"{type(key).__name__} is not a key provider (needs key_id, wrap, unwrap)")
    return key


class Encryption:
    """Encrypt a store: ``ckpt.save(url, state, step=n, encryption=ckpt.Encryption(key))``.

    ``key`` is 32 bytes (AES-256) or a :class:`KeyProvider`. One object may serve many stores;
    it remembers each store's unwrapped data key so a provider (KMS) is asked once per store.
    """

    def __init__(self, key: bytes | bytearray | memoryview | KeyProvider) -> None:
        self.provider: KeyProvider = as_provider(key)
        #: (store id, wrapped key) -> unwrapped data key
        self._unwrapped: dict[tuple[str, bytes], bytes] = {}

    def __repr__(self) -> str:
        return f"Encryption(key_id={self.provider.key_id!r})"

    @property
    def key_id(self) -> str:
        return self.provider.key_id
