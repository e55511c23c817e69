"""Key providers beyond a key in memory: key files, AWS KMS, and the scheme registry.

A key provider wraps a store's data key with a key-encryption key it holds (see
:mod:`ckpt.security.keys` for the protocol). This module owns:

- :func:`read_key_file` / :class:`KeyFileProvider`: a file holding a 256-bit key as 64 hex
  digits, as base64 (standard or URL-safe alphabet) or as exactly 32 raw bytes. Parsing is
  strict and no message ever contains the key or any part of the file.
- :class:`KMSKeyProvider`: the key-encryption key lives in AWS KMS (boto3, imported on
  first use); wrap is ``kms.encrypt`` and unwrap ``kms.decrypt`` under an encryption
  context that binds the ciphertext to ckpt, so a data key wrapped for something else
  does not unwrap here and the other way round.
- :class:`KeyProviderRegistry`: scheme -> factory, filled through the
  ``ckpt_register_key_providers`` hook (``Plugins.key_provider(spec)`` turns
  ``file:/etc/ckpt.key`` or ``kms:alias/ckpt?region=eu-west-1`` into a provider).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import stat
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt.errors import CheckpointError, EncryptionError, PluginError, StoreError

if TYPE_CHECKING:
    from ckpt.security.keys import KeyProvider

log = logging.getLogger(__name__)

KEY_BYTES = 32
#: Any key file longer than this is not a key file (a key in any accepted form is < 100 bytes).
MAX_KEY_FILE_BYTES = 4096
_HEX = re.compile(rb"[0-9a-fA-F]{64}")
_B64 = re.compile(rb"[A-Za-z0-9+/]{43}=?|[A-Za-z0-9_-]{43}=?")

# -- key files ---------------------------------------------------------------------------


def parse_key(raw: bytes, *, source: str) -> bytes:
    """The 32-byte key in ``raw``: exactly 32 raw bytes, 64 hex digits or base64 of 32 bytes.

    Surrounding ASCII whitespace (a trailing newline) is ignored for the text forms. Anything
    else is an EncryptionError naming ``source`` and the size found, never the content.
    """
    if len(raw) == KEY_BYTES:
        return bytes(raw)
    text = raw.strip(b" \t\r\n")
    if _HEX.fullmatch(text):
        return bytes.fromhex(text.decode("ascii"))
    if _B64.fullmatch(text):
        alphabet = b"-_" if (b"-" in text or b"_" in text) else b"+/"
        try:
            key = base64.b64decode(text.rstrip(b"=") + b"=", altchars=alphabet, validate=True)
        except (binascii.Error, ValueError):
            key = b""
        # 43 base64 digits carry 258 bits: the last two must be zero in a canonical encoding
        if len(key) == KEY_BYTES and base64.b64encode(key, altchars=alphabet).rstrip(b"=") == text.rstrip(b"="):
            return key
    raise EncryptionError(
        f"{source} does not hold a 256-bit key: expected exactly 32 raw bytes, 64 hex digits or the "
        f"base64 of 32 bytes, found {len(raw)} bytes"
        + (f" ({len(text)} after stripping whitespace)" if text != raw and len(raw) != KEY_BYTES else "")
        + " (the content is not shown)"
    )


def read_key_file(path: str | Path) -> bytes:
    """The key held by the file at ``path`` (see :func:`parse_key`)."""
    p = Path(path).expanduser()
    source = f"key file {str(p)!r}"
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_KEY_FILE_BYTES + 1)
            mode = os.fstat(f.fileno()).st_mode
    except FileNotFoundError:
        raise EncryptionError(f"{source} does not exist") from None
    except IsADirectoryError:
        raise EncryptionError(f"{source} is a directory, not a key file") from None
    except OSError as exc:
        raise EncryptionError(f"{source} cannot be read: {exc.strerror or type(exc).__name__}") from None
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise EncryptionError(f"{source} is larger than {MAX_KEY_FILE_BYTES} bytes: not a key file")
    key = parse_key(raw, source=source)
    if os.name == "posix" and stat.S_ISREG(mode) and mode & 0o077:
        log.warning("%s can be read by other users (mode %o): chmod 600 it", source, stat.S_IMODE(mode))
    return key


class KeyFileProvider:
    """The key-encryption key read from a file (once, at construction).

    Wrapping is the static provider's: the key id is derived from the key, not from the
    path, so moving the file or naming it through ``CKPT_KEY_FILE`` opens the same stores.
    """

    def __init__(self, path: str | Path) -> None:
        from ckpt.security.keys import StaticKeyProvider

        self.path = str(path)
        self._static = StaticKeyProvider(read_key_file(path))
        self.key_id: str = self._static.key_id

    def wrap(self, data_key: bytes) -> bytes:
        return self._static.wrap(data_key)

    def unwrap(self, wrapped: bytes) -> bytes:
        return self._static.unwrap(wrapped)

    def __repr__(self) -> str:
        return f"KeyFileProvider({self.path!r}, key_id={self.key_id!r})"


# -- AWS KMS -----------------------------------------------------------------------------

#: Encryption context of every data key ckpt wraps with KMS. KMS authenticates it; CloudTrail
#: logs it, so it says what the key is for and nothing about the store's content.
KMS_CONTEXT = {"ckpt:purpose": "checkpoint-data-key", "ckpt:version": "1"}

_KMS_REFUSED = {
    "AccessDeniedException": "KMS denied access",
    "IncorrectKeyException": "the data key was wrapped by another KMS key",
    "InvalidCiphertextException": "KMS rejected the wrapped data key (another KMS key, another encryption "
    "context, or a damaged envelope)",
    "NotFoundException": "the KMS key does not exist",
    "DisabledException": "the KMS key is disabled",
    "KMSInvalidStateException": "the KMS key is not usable in its current state (disabled or pending deletion)",
    "InvalidKeyUsageException": "the KMS key cannot encrypt/decrypt (wrong key usage or key spec)",
    "UnrecognizedClientException": "KMS did not recognise the AWS credentials",
    "InvalidClientTokenId": "KMS did not recognise the AWS credentials",
    "ExpiredTokenException": "the AWS credentials have expired",
    "InvalidGrantTokenException": "KMS rejected the grant token",
}


def _boto_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


class KMSKeyProvider:
    """A key-encryption key held by AWS KMS; ckpt never sees it.

    ``key_id`` is what KMS accepts as a key id (key id, key ARN, alias name or alias ARN).
    ``region``, ``endpoint_url`` and any further keyword (``aws_access_key_id``,
    ``config``, ...) go to ``boto3.client("kms", ...)``; ``profile`` picks a boto3 session
    profile. ``encryption_context`` adds pairs to :data:`KMS_CONTEXT` (a tenant, a job):
    the same pairs are then needed to unwrap.

    Unwrap passes ``key_id`` to ``kms.decrypt``, so a store wrapped by another KMS key is
    refused by KMS instead of being opened with whatever key its envelope names.
    """

    def __init__(
        self,
        key_id: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        profile: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
        **client_kwargs: Any,
    ) -> None:
        if not isinstance(key_id, str) or not key_id.strip():
            raise EncryptionError("KMSKeyProvider needs a KMS key id, key ARN or alias, got an empty one")
        self._kms_key_id = key_id.strip()
        self.key_id: str = f"kms:{self._kms_key_id}"
        self.region = region
        self.endpoint_url = endpoint_url
        self.profile = profile
        self.context = {**KMS_CONTEXT, **dict(encryption_context or {})}
        self._client_kwargs = client_kwargs
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        where = f", region={self.region!r}" if self.region else ""
        return f"KMSKeyProvider({self._kms_key_id!r}{where})"

    def client(self) -> Any:
        """The boto3 KMS client, made on first use."""
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError
        except ImportError:
            raise EncryptionError(f"the KMS key provider ({self._kms_key_id}) needs boto3: pip install boto3") from None
        from ckpt import config

        kwargs = dict(self._client_kwargs)
        kwargs.setdefault(
            "config",
            Config(
                connect_timeout=max(1.0, config.connect_seconds()),
                read_timeout=30,
                retries={"mode": "standard", "max_attempts": 1 + min(config.retries(), 2)},
            ),
        )
        if self.region:
            kwargs["region_name"] = self.region
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        try:
            session = boto3.session.Session(profile_name=self.profile) if self.profile else boto3
            return session.client("kms", **kwargs)
        except BotoCoreError as exc:  # NoRegionError, ProfileNotFound
            raise self._error("cannot create a KMS client", exc) from None

    def wrap(self, data_key: bytes) -> bytes:
        if len(data_key) != KEY_BYTES:
            raise EncryptionError(f"a data key is {KEY_BYTES} bytes, got {len(data_key)}")
        try:
            out = self.client().encrypt(
                KeyId=self._kms_key_id, Plaintext=bytes(data_key), EncryptionContext=self.context
            )
        except _boto_errors() as exc:
            raise self._error("cannot wrap the data key", exc) from None
        return bytes(out["CiphertextBlob"])

    def unwrap(self, wrapped: bytes) -> bytes:
        try:
            out = self.client().decrypt(
                CiphertextBlob=bytes(wrapped), KeyId=self._kms_key_id, EncryptionContext=self.context
            )
        except _boto_errors() as exc:
            raise self._error("cannot unwrap the store's data key", exc) from None
        key = bytes(out.get("Plaintext", b""))
        if len(key) != KEY_BYTES:
            raise EncryptionError(
                f"KMS key {self._kms_key_id} unwrapped {len(key)} bytes, not a {KEY_BYTES}-byte data key: "
                "the envelope was not written by ckpt"
            )
        return key

    def _error(self, what: str, exc: Exception) -> CheckpointError:
        """A botocore failure as a CheckpointError naming the key: refusals (wrong key, no
        access, disabled) are EncryptionError, an unreachable or failing service StoreError."""
        name = type(exc).__name__
        code = ""
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
        where = f" at {self.endpoint_url}" if self.endpoint_url else (f" in {self.region}" if self.region else "")
        head = f"KMS key {self._kms_key_id!r}{where}: {what}"
        if code in _KMS_REFUSED:
            return EncryptionError(f"{head}: {_KMS_REFUSED[code]} ({code})")
        if name in ("NoCredentialsError", "PartialCredentialsError", "NoRegionError", "ProfileNotFound"):
            return EncryptionError(f"{head}: {name}: {exc}")
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"):
            return StoreError(f"{head}: KMS cannot be reached ({name}: {exc})")
        if code:
            return StoreError(f"{head}: KMS error {code}: {exc}")
        return EncryptionError(f"{head}: {name}: {exc}")


# -- the scheme registry -----------------------------------------------------------------

Factory = Callable[[str], "KeyProvider"]


class KeyProviderRegistry:
    """Scheme -> factory. Passed to ``ckpt_register_key_providers`` as ``register``.

    ``register("vault", factory)`` makes ``vault:<rest>`` resolve to ``factory("<rest>")``.
    """

    def __init__(self) -> None:
        self._factories: dict[str, Factory] = {}
        self._owner: dict[str, str] = {}
        self.current_plugin = "?"

    def __call__(self, scheme: str, factory: Factory) -> None:
        if not isinstance(scheme, str) or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
            raise PluginError(
                f"key provider scheme {scheme!r} from plugin {self.current_plugin!r} is not a lower-case "
                "URL scheme (letters, digits, + . -)"
            )
        if not callable(factory):
            raise PluginError(f"key provider {scheme!r} from plugin {self.current_plugin!r} is not callable")
        if scheme in self._factories:
            raise PluginError(
                f"key provider scheme {scheme!r} registered twice: by {self._owner[scheme]!r} "
                f"and by {self.current_plugin!r}"
            )
        self._factories[scheme] = factory
        self._owner[scheme] = self.current_plugin

    def __contains__(self, scheme: object) -> bool:
        return scheme in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._factories))

    def owner(self, scheme: str) -> str:
        return self._owner[scheme]

    def resolve(self, spec: str) -> KeyProvider:
        """The provider a ``SCHEME:REST`` spec names (``file:/k``, ``kms:alias/x?region=r``)."""
        scheme, sep, rest = spec.partition(":")
        if not sep or scheme not in self._factories:
            known = ", ".join(f"{s}:" for s in self) or "none"
            raise EncryptionError(
                f"unknown key provider {scheme + ':' if sep else spec!r}: expected SCHEME:VALUE with one of "
                f"the registered schemes ({known})"
            )
        try:
            provider = self._factories[scheme](rest)
        except CheckpointError:
            raise
        except Exception as exc:
            raise PluginError(
                f"key provider {scheme!r} of plugin {self._owner[scheme]!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        for attr in ("key_id", "wrap", "unwrap"):
            if not hasattr(provider, attr):
                raise PluginError(
                    f"key provider {scheme!r} of plugin {self._owner[scheme]!r} returned an object without {attr}"
                )
        return provider


def kms_from_spec(rest: str) -> KMSKeyProvider:
    """``KEY_ID[?region=R&endpoint_url=U&profile=P&context.K=V]`` -> a KMSKeyProvider."""
    key_id, _, query = rest.partition("?")
    options: dict[str, Any] = {}
    context: dict[str, str] = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if name in ("region", "endpoint_url", "profile"):
            options[name] = value
        elif name.startswith("context."):
            context[name.removeprefix("context.")] = value
        else:
            raise EncryptionError(
                f"kms key provider: unknown option {name!r} (known: region, endpoint_url, profile, context.NAME)"
            )
    return KMSKeyProvider(key_id, encryption_context=context or None, **options)
