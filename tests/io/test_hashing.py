"""Content addresses: one digest whatever the input's size, type or path through xxhash."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from ckpt.io import hashing
from ckpt.io.hashing import RELEASE_GIL_BYTES, hash_bytes


@pytest.mark.parametrize("n", [0, 1, RELEASE_GIL_BYTES - 1, RELEASE_GIL_BYTES, 3 * RELEASE_GIL_BYTES + 5])
def test_every_size_and_buffer_type_gives_the_one_shot_digest(n):
    raw = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    expected = xxhash.xxh3_128_hexdigest(raw.tobytes())
    assert hash_bytes(raw.tobytes()) == expected
    assert hash_bytes(bytearray(raw.tobytes())) == expected
    assert hash_bytes(raw.data) == expected
    if n % 4 == 0 and n:  # a typed view: its length in elements is not its size in bytes
        assert hash_bytes(memoryview(raw.view(np.float32))) == expected


def test_a_large_input_is_hashed_without_holding_the_gil(monkeypatch):
    """xxhash's one-shot functions hold the GIL while they hash (its ``update`` releases it):
    a large chunk must not take them, or every other Python thread (the training loop
    during a background save) stops meanwhile."""
    taken: list[int] = []
    original = xxhash.xxh3_128_hexdigest

    def one_shot(data):
        taken.append(memoryview(data).nbytes)
        return original(data)

    monkeypatch.setattr(hashing.xxhash, "xxh3_128_hexdigest", one_shot)
    small, big = b"x" * (RELEASE_GIL_BYTES - 1), np.ones(8 * RELEASE_GIL_BYTES, dtype=np.uint8)
    hash_bytes(small)
    assert hash_bytes(big.data) == xxhash.xxh3_128(big.tobytes()).hexdigest()
    assert taken == [len(small)]
