"""Content addresses: the hash that names and verifies every chunk (xxh3-128 of its raw bytes)."""

from __future__ import annotations

import xxhash


def hash_bytes(data: memoryview | bytes) -> str:
    """Hex content address of ``data``."""
    return xxhash.xxh3_128_hexdigest(data)
