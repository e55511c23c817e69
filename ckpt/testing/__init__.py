"""Test kits for ckpt and for authors of ckpt plugins (needs pytest).

Like fsspec's abstract test classes, each conformance class gives a whole battery of
tests to a subclass that provides a fixture or two:

- :class:`AdapterConformance`: a state adapter (``make_object`` and ``mutate`` fixtures).
- :class:`CodecConformance`: a codec (``codec_name``; hooks for a delta codec's parent).
- :class:`StoreConformance`: a storage backend (``store_url`` and ``storage_options`` fixtures).

``store_url`` (import it into a ``conftest.py``) runs a test on a ``file://`` and a
``memory://`` store; :func:`store_url_fixture` and :func:`temporary_store_url` make
fixtures for other kinds. :func:`assert_same_state` compares state trees bit for bit.
"""

from __future__ import annotations

from ckpt.hooks.manager import get_plugins, reset_plugins
from ckpt.testing.adapter_conformance import AdapterConformance
from ckpt.testing.codec_conformance import CodecConformance, rewrite_with_codec
from ckpt.testing.codec_samples import ChunkSource, Sample, chunk_record, codec_samples
from ckpt.testing.state import (
    assert_same_state,
    clone_state,
    corrupt_object,
    make_training_state,
    restore_object,
    stored_objects,
    tensor_bits,
)
from ckpt.testing.store_conformance import StoreConformance, spy_writes
from ckpt.testing.store_urls import (
    LOCAL_STORE_KINDS,
    StoreServer,
    store_url,
    store_url_fixture,
    temporary_store_url,
)

__all__ = [
    "LOCAL_STORE_KINDS",
    "AdapterConformance",
    "ChunkSource",
    "CodecConformance",
    "Sample",
    "StoreConformance",
    "StoreServer",
    "assert_same_state",
    "chunk_record",
    "clone_state",
    "codec_samples",
    "corrupt_object",
    "get_plugins",
    "make_training_state",
    "reset_plugins",
    "restore_object",
    "rewrite_with_codec",
    "spy_writes",
    "store_url",
    "store_url_fixture",
    "stored_objects",
    "tensor_bits",
    "temporary_store_url",
]
