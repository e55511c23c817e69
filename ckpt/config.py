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
    """``CKPT_THREADS``: worker threads for encode/write and read/decode (2 x cores, within 8..32).

    More threads than cores: a thread waiting in write/fsync or on the network leaves its
    core to another that encodes, and block devices and object stores serve parallel
    requests faster (measured on this project's 2-core machine: 72 files of 14 MB written
    and fsynced in 2.4-3.3 s by 1 thread, 0.4-1.2 s by 4, 0.37-0.7 s by 8). Each thread
    holds up to two chunks (``CKPT_CHUNK_BYTES``) while it encodes: memory outside
    ``max_host_memory``, hence the cap.
    """
    return max(1, _int("CKPT_THREADS", min(32, max(8, 2 * (os.cpu_count() or 1)))))


def background_nice() -> int:
    """``CKPT_BACKGROUND_NICE``: niceness added to the Checkpointer's encode/write threads (10).

    Persistence runs while training continues; on Linux its threads are given a lower
    scheduling priority so the training loop's own CPU work (its intra-op threads, data
    loading) is served first and checkpoints use the cycles left over. 0 turns it off.
    The staging copies that a following ``optimizer.step()`` may wait for are not demoted;
    but with ``max_host_memory`` smaller than the state, staging waits for buffers that the
    demoted threads free as they write, so set 0 if a busy host then stalls optimizer steps.
    """
    return max(0, min(19, _int("CKPT_BACKGROUND_NICE", 10)))


def fsync() -> bool:
    """``CKPT_FSYNC``: ``0`` skips fsync on local files (faster, not durable across power loss)."""
    return os.environ.get("CKPT_FSYNC", "1") != "0"


def direct_writes() -> bool:
    """``CKPT_DIRECT_WRITES``: ``0`` writes objects to local disk through the page cache.

    By default an object of 1 MiB or more written to a local store (with fsync on) bypasses
    the page cache (``O_DIRECT``, :mod:`ckpt.storage.direct_io`): no kernel copy of every
    byte, and the job's own cached files stay cached. A tiers' local tier, which a restart
    reads at once, always writes through the page cache.
    """
    return os.environ.get("CKPT_DIRECT_WRITES", "1") != "0"


def chunk_bytes() -> int:
    """``CKPT_CHUNK_BYTES``: tensors larger than this are split into chunks of this size (16 MiB).

    Chunks are the unit of dedup, parallel I/O and verification.
    """
    value = _int("CKPT_CHUNK_BYTES", 16 * 1024 * 1024)
    return max(4096, value - value % 64)  # a multiple of every element size


def pack_bytes() -> int:
    """``CKPT_PACK_BYTES``: tensors smaller than this share stored objects (1 MiB; 0: never).

    Small tensors (biases, norms, small projections) are packed, in the order a save meets
    them and by top-level key and dtype, into objects of up to 4 MiB (at most
    ``CKPT_CHUNK_BYTES``): one object, hash, write
    (fsync or PUT) and manifest object record for many tensors instead of one each. An
    unchanged set of small tensors packs into identical objects and is deduplicated across
    saves; a changed one may be stored as a delta of the parent's object of the same layout.
    """
    return max(0, _int("CKPT_PACK_BYTES", 1024 * 1024))


def native_planes() -> bool:
    """``CKPT_NATIVE_PLANES``: ``0`` moves bgzstd's byte planes with numpy instead of the
    compiled loops of ``ckpt/codecs/_planes.c`` (same bytes, slower; where the extension was
    not built, numpy is used anyway)."""
    return os.environ.get("CKPT_NATIVE_PLANES", "1") != "0"


def zstd_level_override() -> int | None:
    """``CKPT_ZSTD_LEVEL`` when set; byte planes of floats otherwise use tuned settings (``ckpt.codecs.zstd.PLANE_PARAMS``)."""
    return zstd_level() if os.environ.get("CKPT_ZSTD_LEVEL") else None


def zstd_level() -> int:
    """``CKPT_ZSTD_LEVEL``: zstandard level (1; higher levels compress float planes *worse* and slower)."""
    return _int("CKPT_ZSTD_LEVEL", 1)


def delta_max_chain() -> int:
    """``CKPT_DELTA_MAX_CHAIN``: a changed chunk is stored in full at least once every K saves (8).

    Between full objects it may be stored as an XOR delta against the last full object
    (at most K-1 saves old); a restore reads the delta and that object. ``1`` turns deltas off.
    """
    return max(1, _int("CKPT_DELTA_MAX_CHAIN", 8))


def gc_grace_seconds() -> float:
    """``CKPT_GC_GRACE_SECONDS``: objects younger than this are never swept by GC (900 = 15 min).

    It protects the objects of a save still in flight, which no manifest names yet; a save
    must finish within it.
    """
    raw = os.environ.get("CKPT_GC_GRACE_SECONDS")
    if raw is None or raw == "":
        return 900.0
    try:
        value = float(raw)
    except ValueError:
        from ckpt.errors import CheckpointError

        raise CheckpointError(f"environment variable CKPT_GC_GRACE_SECONDS={raw!r} is not a number") from None
    return max(0.0, value)


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        from ckpt.errors import CheckpointError

        raise CheckpointError(f"environment variable {name}={raw!r} is not a number") from None


def retries() -> int:
    """``CKPT_RETRIES``: retries of one storage call after a transient error (8; 0 disables).

    Transient: connection resets and refusals, timeouts, throttling (HTTP 429, S3
    ``SlowDown``) and server errors (5xx). Missing objects and permission errors never retry.
    """
    return max(0, _int("CKPT_RETRIES", 8))


def retry_base_delay() -> float:
    """``CKPT_RETRY_BASE_DELAY``: seconds before the first retry (0.2); doubles each retry, with jitter, up to 10 s."""
    return max(0.0, _float("CKPT_RETRY_BASE_DELAY", 0.2))


def retry_max_seconds() -> float:
    """``CKPT_RETRY_MAX_SECONDS``: time budget of one storage call, retries included (60).

    When it is spent the call fails with a StoreError naming the URL, and the store fails
    fast (one attempt per call) until a call succeeds again, so an outage ends a save
    in about this time instead of once per object.
    """
    return max(0.0, _float("CKPT_RETRY_MAX_SECONDS", 60.0))


def connect_seconds() -> float:
    """``CKPT_CONNECT_SECONDS``: how long a store that cannot be reached is retried (5).

    Unreachable: connection refused, a name that does not resolve, no route to the host,
    no answer to the connect. On a store that has not completed a call in this process
    that is most likely a wrong URL or endpoint, reported (StoreError naming the URL)
    after this long instead of ``CKPT_RETRY_MAX_SECONDS``; a server still coming up is
    caught if it answers within it. Once a store has answered, the same errors are an
    outage and get the full budget. It is also the connect timeout (at least 1 s) of one
    request to S3 (s3fs) and Azure (adlfs) unless ``storage_options`` set one
    (``config_kwargs`` ``connect_timeout``, ``connection_timeout``).
    """
    return max(0.0, _float("CKPT_CONNECT_SECONDS", 5.0))


def part_bytes() -> int:
    """``CKPT_PART_BYTES``: part size of multipart uploads to S3 (16 MiB, at least 5 MiB).

    Objects of two parts or more are uploaded in parts, in parallel; Azure's SDK stages
    blocks on its own above 64 MiB. Both commit the object atomically at the end.
    """
    return max(5 * 1024 * 1024, _int("CKPT_PART_BYTES", 16 * 1024 * 1024))


def max_manifest_bytes() -> int:
    """``CKPT_MAX_MANIFEST_BYTES``: a manifest larger than this is refused unread (256 MiB).

    A store is untrusted input and parsing JSON takes about six times its size in memory.
    A real manifest takes about 200 bytes per 16 MiB chunk (13 MB for a 1 TB checkpoint),
    so the default leaves room for checkpoints of tens of terabytes.
    """
    return max(1024 * 1024, _int("CKPT_MAX_MANIFEST_BYTES", 256 * 1024 * 1024))


def max_tree_depth() -> int:
    """``CKPT_MAX_TREE_DEPTH``: deepest JSON nesting of a checkpoint's state tree (128 levels).

    Saves refuse deeper trees and loads refuse manifests holding one, so a hostile
    manifest cannot exhaust the stack. A list or a string-keyed mapping is one JSON level,
    a tuple two, a mapping with other keys three; model, optimizer and scheduler states
    stay below 10.
    """
    return max(16, _int("CKPT_MAX_TREE_DEPTH", 128))


def writer_lease_seconds() -> float:
    """``CKPT_WRITER_LEASE_SECONDS``: a writer lease whose heartbeat stopped this long is stale (10).

    One writer per store holds ``leases/writer.json`` and rewrites it every tenth of this
    (at most every second). A holder on another host whose heartbeat does not move for
    this long, watched by the clock of the process that wants the lease, is taken over
    (a dead holder on the same host at once). Raise it where a writer may stall longer
    (a store that answers slowly for minutes); lower it to resume faster on another node.
    """
    return max(0.5, _float("CKPT_WRITER_LEASE_SECONDS", 10.0))


def writer_take_over() -> bool:
    """``CKPT_WRITER_TAKE_OVER``: ``1`` takes the writer lease whoever holds it (0).

    An operator's override for a holder known to be gone; a live holder then fails at its
    next save. ``ckpt unlock URL`` does the same once, from outside the job.
    """
    return os.environ.get("CKPT_WRITER_TAKE_OVER", "0") not in ("", "0")


def clock_skew_seconds() -> float:
    """``CKPT_CLOCK_SKEW_SECONDS``: how far the clocks of writers, GC hosts and the store may disagree (5).

    GC compares object modification times (the store's clock) with the start of a save in
    flight (the writer's clock), and a writer judges another host's heartbeat by its own
    clock; this is the margin both allow.
    """
    return max(0.0, _float("CKPT_CLOCK_SKEW_SECONDS", 5.0))


def preempt_deadline_seconds() -> float:
    """``CKPT_PREEMPT_DEADLINE_SECONDS``: after SIGTERM/SIGUSR1, exit by then even if the save has not committed (25).

    Counted from the moment the main thread handles the signal. A preempted run saves at
    its next ``Checkpointer.step()``; if that step or the save outlives the deadline the
    process exits anyway (``os._exit``), abandoning the save in flight: the manifest is the
    commit, so the previous checkpoint stays the latest and intact. Set it below the
    scheduler's grace period (Slurm's ``KillWait``, Kubernetes'
    ``terminationGracePeriodSeconds``, both 30 s by default: hence 25 s) to exit with a
    clear log line instead of a SIGKILL. 0 turns it off.
    """
    return max(0.0, _float("CKPT_PREEMPT_DEADLINE_SECONDS", 25.0))


def dist_timeout_seconds() -> float:
    """``CKPT_DIST_TIMEOUT``: seconds a collective save/restore waits on the other ranks (300).

    ckpt coordinates ranks over a gloo group of its own created with this timeout; a rank
    that fails or dies makes every other rank raise a CheckpointError within about this
    long (at once when the failure is reported), and no manifest is written.
    """
    return max(1.0, _float("CKPT_DIST_TIMEOUT", 300.0))


def key_file() -> str | None:
    """``CKPT_KEY_FILE``: the key file the ``ckpt`` command line uses when ``--key-file`` is not given.

    The file holds a 256-bit key as 64 hex digits, as base64 or as exactly 32 raw bytes
    (:func:`ckpt.security.providers.read_key_file`). Only the command line reads it: the
    Python API takes ``encryption=`` explicitly, so a library call never picks up a key
    from the environment by surprise.
    """
    raw = os.environ.get("CKPT_KEY_FILE", "")
    return raw or None
