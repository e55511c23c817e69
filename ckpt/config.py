"""Environment knobs, each read and documented here and nowhere else."""

from __future__ import annotations

import os


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        from ckpt.errors import CheckpointError

        raise CheckpointError(f"environment variable {name}={raw!r} is not an integer") from None


def disabled_plugins() -> set[str]:
    """``CKPT_DISABLE_PLUGINS``: comma-separated plugin (distribution) names not to load."""
    raw = os.environ.get("CKPT_DISABLE_PLUGINS", "")
    return {p.strip() for p in raw.split(",") if p.strip()}


def io_threads() -> int:
    """``CKPT_THREADS``: worker threads for encode/write and read/decode (default 2 x cores, at least 4)."""
    return max(1, _int("CKPT_THREADS", max(4, 2 * (os.cpu_count() or 1))))


def chunk_bytes() -> int:
    """``CKPT_CHUNK_BYTES``: tensors larger than this are split into chunks of this size (16 MiB).

    Chunks are the unit of dedup, parallel I/O and verification.
    """
    value = _int("CKPT_CHUNK_BYTES", 16 * 1024 * 1024)
    return max(4096, value - value % 64)  # a multiple of every element size


def zstd_level() -> int:
    """``CKPT_ZSTD_LEVEL``: zstandard level (1; higher levels compress float planes *worse* and slower)."""
    return _int("CKPT_ZSTD_LEVEL", 1)
