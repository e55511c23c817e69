"""Every error ckpt raises on purpose: one base class, subclasses that say what went wrong.

Messages name the key, tensor, object or URL involved so a user at 3 a.m. knows where to look.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error ckpt raises on purpose."""


class CorruptCheckpointError(CheckpointError):
    """Stored data does not match what the manifest promises (hash, size, decode failure)."""


class NoCheckpointError(CheckpointError):
    """The store holds no committed checkpoint (or not the step asked for)."""


class MissingObjectError(CorruptCheckpointError):
    """A manifest references an object that is not in the store."""


class SchemaError(CorruptCheckpointError):
    """A manifest is malformed, or written by a newer schema than this reader knows."""


class NewerSchemaError(SchemaError):
    """A manifest written by a newer ckpt than this one: upgrade to read it.

    Never skipped in favour of an older checkpoint: an older ckpt must not carry on
    writing a store that a newer one has moved ahead.
    """


class UnknownCodecError(CheckpointError):
    """An object was encoded with a codec that no loaded plugin provides."""


class StateMismatchError(CheckpointError):
    """The live object does not fit the checkpoint (shape, dtype, missing or extra keys)."""


class UnsupportedValueError(CheckpointError):
    """A value in the state is neither adaptable, a tensor nor a JSON value."""


class PluginError(CheckpointError):
    """A plugin is broken: duplicate adapter or codec name, bad hook implementation."""


class EncryptionError(CheckpointError):
    """An encrypted store cannot be opened as asked: no key given, a wrong key, a key provider
    that refuses, or an encrypted save into a plain store (and the other way round).

    Raised before any tensor data is read. Tampered encrypted data is a
    :class:`CorruptCheckpointError` instead (authentication failed on a key that is right).
    """


class StoreError(CheckpointError):
    """The storage backend failed (after retries) for a URL."""
