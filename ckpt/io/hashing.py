"""Content addresses: the hash that names and verifies every chunk (xxh3-128 of its raw bytes)."""

from __future__ import annotations

import xxhash

# inputs of at least RELEASE_GIL_BYTES are hashed with the GIL released (see hash_bytes)
from ckpt.io.memory import RELEASE_GIL_BYTES


def hash_bytes(data: memoryview | bytes) -> str:
    """Hex content address of ``data``.

    xxhash's one-shot functions hold the GIL while they hash, its ``update`` releases it: a
    chunk's hash (about 0.6 ms per 16 MiB here) would otherwise stop every other Python thread
    meanwhile, the training loop during a background save and the other readers of a
    restore among them. The two give the same digest.
    """
    if (data.nbytes if isinstance(data, memoryview) else len(data)) < RELEASE_GIL_BYTES:
        return xxhash.xxh3_128_hexdigest(data)
    digest = xxhash.xxh3_128()
    digest.update(data)
    return digest.hexdigest()
