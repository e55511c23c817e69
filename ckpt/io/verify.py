"""Verification of stored checkpoints: every object read, decoded and hash-checked; the
first pass of an in-place restore (stored bytes hashed, nothing kept)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ckpt.codecs.base import CodecRegistry
from ckpt.errors import CheckpointError
from ckpt.io.plan import ChunkRead, ReadPlan, object_identity
from ckpt.io.reader import Reader, tensors_named, xor_parent
from ckpt.snapshot.executor import cpu_threads, io_pool, wait_all
from ckpt.storage.manifest import ChunkRef, Manifest
from ckpt.storage.store import Store


@dataclass(frozen=True)
class Problem:
    """One bad object (or manifest) found by :func:`verify_manifest`."""

    step: int
    tensor: str
    key: str
    error: str

    def __str__(self) -> str:
        return f"step {self.step}: {self.error}"


def verify_manifest(
    store: Store,
    codecs: CodecRegistry,
    manifest: Manifest,
    *,
    progress: Callable[[int], None] | None = None,
) -> list[Problem]:
    """Read and verify every object of ``manifest``; return what is wrong (empty: sound).

    Each distinct object is checked once even when several tensors share it.
    ``progress`` is called with the raw bytes of each object checked.
    """
    plan = ReadPlan.whole(manifest)
    reads = plan.distinct()
    users = plan.users()
    reader = Reader(store, codecs)

    def check(r: ChunkRead) -> Problem | None:
        try:
            # the whole object, packed or not: every byte of it is checked
            obj = r.ref.object_ref()
            what = tensors_named(users.get(object_identity(r.ref), [r.path]))
            reader.read_object(obj, memoryview(bytearray(obj.size)), what=what)
        except CheckpointError as exc:
            return Problem(step=manifest.step, tensor=r.path, key=r.ref.key, error=str(exc))
        finally:
            if progress is not None:
                progress(r.ref.object_size)
        return None

    with io_pool("ckpt-verify") as pool:
        return [p for p in pool.map(check, reads) if p is not None]


def verify_reads(store: Store, codecs: CodecRegistry, plan: ReadPlan) -> None:
    """Read and verify every chunk of ``plan`` into reused buffers, keeping nothing: the first
    pass of an in-place restore (:func:`ckpt.state.restore.prepare_restore`)."""
    verify_objects(store, codecs, [(r.ref, r.path) for r in plan.reads])


def verify_objects(store: Store, codecs: CodecRegistry, reads: Iterable[tuple[ChunkRef, str]]) -> None:
    """:func:`verify_reads` of chunk records, each with the path of the tensor reading it."""
    # objects whose stored bytes hashed right (a delta's base once), by what was checked: a
    # record of the same object naming another stored size is checked on its own
    seen: set[tuple[str, str, int]] = set()
    lock = threading.Lock()
    # A local store's objects are hashed as they stream by: CPU work when they are in the page
    # cache (a restore that follows a save, or a second restore), one thread per core then.
    # The 1.2 GB benchmark state on this project's 2-core machine: its stored bytes hashed in
    # 77-92 ms by 2 threads, 104-110 ms by 8, and its restore 289 ms against 320 (medians of 8);
    # read from the device, 2 threads and 8 restored it alike (699 and 689 ms).
    with io_pool("ckpt-verify", cpu_threads() if store.local else None) as pool:
        # decodes as the second pass will (cache_bytes=0, see read_tensors' cache_parents): a
        # parent decoded for one delta must not vouch for another delta's record of it (its
        # stored size, its codec chain), which the second pass reads by that record
        reader = Reader(store, codecs, cache_bytes=0)

        def matches(obj: ChunkRef, digest: str, what: str) -> bool:
            checked = (obj.key, digest, obj.stored)
            with lock:
                if checked in seen:
                    return True
            if store.hash_object(obj.key, obj.stored, what=what) != (digest, obj.stored):
                return False
            with lock:
                seen.add(checked)
            return True

        def job(ref: ChunkRef, path: str) -> None:
            obj = ref.object_ref()
            what = tensors_named(packs[object_identity(obj)]) if ref.packed else f"tensor {path!r}"
            links = stored_digests(obj)
            # on local disk: its stored bytes (and a delta's parents') hashed as they stream by
            if links is not None and all(matches(o, digest, what) for o, digest in links):
                return
            # Else decoded and verified, as an object without a stored hash is. Other bytes than
            # recorded are not necessarily damage: an encrypted object sealed again under its
            # key by a later save (same content, a new nonce). Damage is refused, by the reason
            # the decode gives, before anything live changes.
            with reader._scratch(obj.size) as buf:
                reader.read_object(obj, buf, what=what)

        # one job per object a record promises: a packed object's tensors are verified together
        first: dict[tuple[str, str, int, int, str], tuple[ChunkRef, str]] = {}
        packs: dict[tuple[str, str, int, int, str], list[str]] = {}
        for ref, path in reads:
            ident = object_identity(ref.object_ref())
            first.setdefault(ident, (ref, path))
            packs.setdefault(ident, []).append(path)
        wait_all([pool.submit(job, ref, path) for ref, path in first.values()])


#: delta links :func:`stored_digests` follows (a writer cites the last full object: one)
MAX_LINKS = 64


def stored_digests(ref: ChunkRef) -> list[tuple[ChunkRef, str]] | None:
    """The objects whose stored bytes verify ``ref``'s object when read (see
    :func:`verify_reads`), each with what they must hash to: the object itself and, for a
    delta of ckpt's ``xor`` codec, every object of its parent chain. None when reading
    them is not enough.

    A raw object's bytes are its content. An encoded one needs its recorded ``stored_hash``.
    A delta decodes through its parent objects (every codec step citing a ``parent``): those
    of ckpt's ``xor``, whose records carry their own stored size and ``stored_hash``, are
    verified the same way; a plugin's delta step, whose reading of its parents this reader
    does not know, is not. The decode (decompression, decryption, XOR) is then a function of
    bytes already verified, checked again against the content hashes after it.
    """
    links: list[tuple[ChunkRef, str]] = []
    current = ref.object_ref()
    while len(links) <= MAX_LINKS:
        digest = stored_digest(current)
        if not digest:
            return None
        links.append((current, digest))
        parent = xor_parent(current)
        if parent is None:
            return links
        if not isinstance(parent, ChunkRef):
            return None  # (a plugin's delta, or a malformed record: the decode says what is wrong)
        current = parent.object_ref()
    return None


def stored_digest(ref: ChunkRef) -> str:
    """What the stored bytes of object ``ref`` hash to by its record: its ``stored_hash``
    when encoded, its content hash when raw; "" when the record does not say."""
    if ref.stored < 0:
        return ""
    return ref.stored_hash if ref.codec else ref.hash if ref.stored == ref.size else ""
