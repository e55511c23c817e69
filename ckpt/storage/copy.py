"""Copying checkpoints between stores: ``ckpt.copy`` and ``ckpt cp``, and the tiers' persist step.

A copy keeps the storage contract of the destination: the objects it lacks (delta bases
included) are fetched from the source, decoded and verified against their hash (the
reader's own check, :meth:`ckpt.io.reader.Reader.check_payload`), then written as they
were stored; then the manifest; then ``refs/latest``. Objects the destination holds are
not moved again, so a second copy of a run whose weights are frozen moves only what
changed, and a copy interrupted at any instant is completed by running it again (every
object is one atomic write, and a checkpoint without its manifest does not exist).

The source is untrusted: its manifests are validated (:func:`ckpt.storage.lineage.parse_manifest`)
before anything is fetched, object keys are checked by the store, and reads are bounded by
the recorded sizes. A copy holds the destination's writer lease
(:class:`~ckpt.storage.writer_lease.WriterLease`) while it writes: a live writer there
refuses it.

Lineage in the destination: ``parent`` and ``run`` are kept as the source recorded them;
``seq`` is the destination's own commit order. A copied checkpoint becomes the
destination's latest (one more than its highest seq, and the ref names it) unless it is
older, in the source's commit order, than the destination's latest; then it is written
without a seq, which orders it before every sequenced commit (see
:func:`ckpt.storage.lineage.order_key`), and the ref is left alone.

A step the destination already holds is never overwritten by a copy (the contract): the
same checkpoint there is skipped; a different one (another lineage, an abandoned branch,
or a manifest this version cannot read) is refused with :class:`CheckpointError` naming the
step and both URLs, before anything is written. Only the tiers' persister
(``as_latest=True``: the writing run persisting its own saves) replaces a step, as a save of
an existing step does. Everything refusable (hostile manifests, a collision, an object or
delta base the source lacks) is refused before the first write; an object that fails
verification mid-copy leaves the already-verified objects of that checkpoint behind as
unreferenced objects (``ckpt gc`` removes them), never a manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ckpt.codecs.base import CodecRegistry, max_encoded_size
from ckpt.codecs.delta import chunk_records
from ckpt.errors import CheckpointError, CorruptCheckpointError, MissingObjectError, NoCheckpointError
from ckpt.io.hashing import hash_bytes
from ckpt.io.reader import Reader
from ckpt.io.verify import stored_digest
from ckpt.security.binding import bind_destination, open_source
from ckpt.security.keys import Encryption
from ckpt.snapshot.executor import io_pool, wait_all
from ckpt.storage.commit import settled
from ckpt.storage.lineage import find_latest, order_key, parse_manifest, read_lineage
from ckpt.storage.manifest import ChunkRef, Manifest, TensorEntry, check_step
from ckpt.storage.store import Store
from ckpt.storage.writer_lease import WriterLease
from ckpt.types import CheckpointInfo

log = logging.getLogger("ckpt")

#: ``progress(advance, total)``: stored bytes copied so far, and the total to copy
Progress = Callable[[int, int], None]


@dataclass
class CopyStats:
    """What one copy moved."""

    #: checkpoints whose manifest was written to the destination
    checkpoints: int = 0
    #: checkpoints the destination already held as in the source
    already: int = 0
    #: objects fetched, verified and written
    objects: int = 0
    #: stored (encoded) bytes of those objects
    bytes: int = 0
    #: objects the destination already held (not moved)
    skipped: int = 0
    #: objects the destination held at their size but with other bytes (``verify_existing``): copied again
    replaced: int = 0


@dataclass(frozen=True)
class CopyResult:
    #: the newest checkpoint copied (or already there), as the destination holds it
    info: CheckpointInfo
    stats: CopyStats


def copy(
    src_url: str,
    dst_url: str,
    *,
    step: int | None = None,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    encryption: Encryption | None = None,
    verify_existing: bool = False,
) -> CheckpointInfo:
    """Copy checkpoint ``step`` (every checkpoint when None) of ``src_url`` to ``dst_url``.

    Only what the destination lacks is moved; what is moved is verified first; the commit
    order is objects, manifest, ref. Safe to interrupt and run again. Returns the info of
    the newest checkpoint copied, as the destination holds it.

    An encrypted source needs its ``encryption`` (the copy verifies every object with it);
    the destination holds the same store afterwards (:mod:`ckpt.security.binding`: it gets
    the source's descriptor, or must have it already; re-encryption is not supported).

    An object the destination holds at its recorded size is taken as it is, unless
    ``verify_existing``: then its stored bytes are read and hashed, and one that does not
    match its record (damaged in place, or a record without a stored hash) is copied again.
    That reads every shared object back from the destination (from S3: downloads it).

    :raises EncryptionError: an encrypted source without its key (or a wrong one), a
        destination that is another encrypted store, or plain and encrypted mixed.
    :raises CheckpointError: a source manifest or object is malformed, missing or fails
        verification (nothing of that checkpoint is committed), or the destination has a
        live writer.
    """
    src, dst = Store(src_url, storage_options), Store(dst_url, dst_storage_options)
    return copy_stores(src, dst, step=step, encryption=encryption, verify_existing=verify_existing).info


def copy_stores(
    src: Store,
    dst: Store,
    *,
    step: int | None = None,
    steps: Iterable[int] | None = None,
    lease: WriterLease | None = None,
    progress: Progress | None = None,
    codecs: CodecRegistry | None = None,
    as_latest: bool | None = None,
    encryption: Encryption | None = None,
    verify_existing: bool = False,
) -> CopyResult:
    """:func:`copy` between open stores, with what it moved.

    :param steps: copy these steps (in the source's commit order) instead of one or all.
    :param lease: the destination's writer lease, held by the caller (the tiers' persister);
        without one the copy takes it for its duration.
    :param as_latest: True: every copied checkpoint becomes the destination's latest (the
        writing run persisting its own checkpoints); None: decided as the module says.
    :param encryption: the key of an encrypted source (None: a plain source, or stores the
        caller opened already, :func:`ckpt.security.envelope.open_store`).
    :param verify_existing: see :func:`copy`.
    """
    if codecs is None:
        from ckpt.hooks.manager import get_plugins

        codecs = get_plugins(adapters=False).codecs
    open_source(src, encryption)  # before any manifest is read: an encrypted source needs its key
    manifests = _source_manifests(src, step, steps)
    if lease is not None:
        bind_destination(src, dst, encryption)
        return _copy_all(src, dst, manifests, lease, progress, codecs, as_latest, verify_existing)
    with WriterLease(dst, what=f"ckpt copy from {src.url}") as own:
        bind_destination(src, dst, encryption)  # an encrypted source's descriptor, before any object
        return _copy_all(src, dst, manifests, own, progress, codecs, as_latest, verify_existing)


def _source_manifests(src: Store, step: int | None, steps: Iterable[int] | None) -> list[Manifest]:
    """The validated source manifests to copy, oldest commit first."""
    if step is not None or steps is not None:
        wanted = [check_step(step)] if step is not None else [check_step(s) for s in steps or ()]
        out = [parse_manifest(src.read_manifest(s), s, src.url) for s in dict.fromkeys(wanted)]
        return sorted(out, key=order_key)
    lineage, good = read_lineage(src)
    if lineage.unreadable:
        bad = "; ".join(f"step {s}: {why}" for s, why in sorted(lineage.unreadable.items()))
        raise CorruptCheckpointError(f"cannot copy every checkpoint of {src.url}: unreadable manifests: {bad}")
    if not good:
        raise NoCheckpointError(f"no checkpoint in {src.url} to copy")
    return sorted(good.values(), key=order_key)


def _records(manifest: Manifest) -> dict[str, ChunkRef]:
    """Every object ``manifest`` needs, by key: its chunks and their delta bases."""
    out: dict[str, ChunkRef] = {}
    for ref in manifest.chunk_refs():
        for rec in chunk_records(ref.to_json()):
            try:
                # a packed record is a slice: the object is what is fetched, verified and compared
                chunk = ChunkRef.from_json(rec).object_ref()
            except (KeyError, TypeError, ValueError) as exc:  # a validated manifest never gets here
                raise CorruptCheckpointError(
                    f"step {manifest.step}: malformed parent record {str(rec)[:200]}: {exc}"
                ) from None
            seen = out.setdefault(chunk.key, chunk)
            if (seen.hash, seen.size, seen.stored) != (chunk.hash, chunk.size, chunk.stored) or list(
                seen.codec
            ) != list(chunk.codec):
                # one object verified against one record would let the other through unverified
                raise CorruptCheckpointError(
                    f"step {manifest.step}: object {chunk.key} is cited by records that disagree "
                    "(hash, size, stored size or codec)"
                )
    return out


def same_checkpoint(a: Manifest, b: Manifest) -> bool:
    """Whether two manifests hold the same checkpoint, whatever their commit sequences and
    however their objects are encoded (a raw local tier and the compressed durable copy of
    the same save: :mod:`ckpt.storage.resave`)."""
    keep = ("seq", "stored_bytes", "tensors")
    da = {f.name: getattr(a, f.name) for f in dataclasses.fields(a) if f.name not in keep}
    db = {f.name: getattr(b, f.name) for f in dataclasses.fields(b) if f.name not in keep}
    if da != db or a.tensors.keys() != b.tensors.keys():
        return False
    return all(_content(a.tensors[p]) == _content(b.tensors[p]) for p in a.tensors)


def _content(entry: TensorEntry) -> Any:
    """A tensor entry without the encoding of its objects: raw hashes, sizes, layout."""

    def chunks(refs: Iterable[ChunkRef]) -> list[tuple[str, int, int, int]]:
        return [(c.hash, c.size, c.at, c.of) for c in refs]

    shards = [(s.offsets, s.shape, chunks(s.chunks)) for s in entry.shards]
    return entry.dtype, tuple(entry.shape), entry.nbytes, chunks(entry.chunks), shards


def _copy_all(
    src: Store,
    dst: Store,
    manifests: list[Manifest],
    lease: WriterLease,
    progress: Progress | None,
    codecs: CodecRegistry,
    as_latest: bool | None,
    verify_existing: bool = False,
) -> CopyResult:
    stats = CopyStats()
    try:
        present: dict[str, int] | None = {o.key: o.size for o in dst.list_objects()}
    except CheckpointError as exc:  # a listing is an optimisation: ask object by object instead
        log.warning("cannot list the objects of %s (%s): checking each one", dst.url, exc)
        present = None
    src_order = {m.step: order_key(m) for m in manifests}
    newest: CheckpointInfo | None = None
    reader = Reader(src, codecs)
    # what every copied checkpoint still needs (an estimate for the progress bar only)
    todo = {k: r for m in manifests for k, r in _records(m).items() if not _held(present, r)}
    total = sum(max(r.stored, 0) for r in todo.values())
    lock = threading.Lock()
    # everything that can be refused is refused before anything is written
    held = {m.step: _existing(dst, m, src.url, replace=as_latest is True) for m in manifests}
    _check_sources(src, [m for m in manifests if not _holds(held[m.step], m)], present)
    with io_pool("ckpt-copy") as pool:
        for manifest in manifests:
            existing = held[manifest.step]
            if existing is not None and _holds(existing, manifest):
                stats.already += 1
                newest = CheckpointInfo.from_manifest(existing, dst.url)
                continue
            lease.protect([*lease.protected, manifest.step], in_flight=manifest.step)
            needed = _records(manifest)
            wrote = [0]  # bytes of this checkpoint's objects written to dst (not those it held)

            def one(ref: ChunkRef, manifest: Manifest = manifest, wrote: list[int] = wrote) -> None:
                there = _held(present, ref) or (present is None and dst.has_object(ref.key))
                if there and verify_existing and not _intact(dst, ref):
                    log.warning("%s holds object %s with other bytes than recorded: copying it again", dst.url, ref.key)
                    with lock:
                        stats.replaced += 1
                elif there:
                    with lock:
                        stats.skipped += 1
                    return
                if present is not None and ref.key in present:
                    log.warning(
                        "%s holds object %s at %d bytes, not the %d recorded (a torn write): copying it again",
                        dst.url,
                        ref.key,
                        present[ref.key],
                        ref.stored,
                    )
                moved = _copy_object(src, dst, reader, ref, f"step {manifest.step} of {src.url}")
                with lock:
                    stats.objects += 1
                    stats.bytes += moved
                    wrote[0] += moved
                    if present is not None:
                        present[ref.key] = moved
                if progress is not None:
                    progress(moved, total)

            wait_all([pool.submit(one, r) for r in needed.values()])
            committed = _commit_copy(dst, manifest, lease, src_order, as_latest, wrote[0])
            stats.checkpoints += 1
            newest = CheckpointInfo.from_manifest(committed, dst.url)
    assert newest is not None  # manifests is never empty
    log.info(
        "copied %s -> %s: %d checkpoint(s) (%d already there), %d objects, %d bytes (%d objects already there)",
        src.url,
        dst.url,
        stats.checkpoints,
        stats.already,
        stats.objects,
        stats.bytes,
        stats.skipped,
    )
    return CopyResult(newest, stats)


def _holds(existing: Manifest | None, manifest: Manifest) -> bool:
    return existing is not None and same_checkpoint(existing, manifest)


def _existing(dst: Store, manifest: Manifest, src_url: str, *, replace: bool) -> Manifest | None:
    """The destination's checkpoint at ``manifest.step``, if it holds one.

    A different checkpoint at the same step (another lineage, an abandoned branch, a manifest
    this version cannot read) is never overwritten by a copy: :class:`CheckpointError`. Only
    ``replace`` (the tiers persisting their own run, whose save of an existing step replaces
    it, as :func:`ckpt.save` does) writes over it.
    """
    step = manifest.step
    try:
        held = parse_manifest(dst.read_manifest(step), step, dst.url)
    except NoCheckpointError:
        return None
    except CorruptCheckpointError as exc:
        if not replace:
            raise CheckpointError(
                f"step {step} of {dst.url} is unreadable ({exc}); not overwriting it with step {step} of "
                f"{src_url}: remove its manifest first if it is damaged"
            ) from None
        log.warning("step %d of %s is unreadable (%s): replacing it with the copy from %s", step, dst.url, exc, src_url)
        return None
    if replace or same_checkpoint(held, manifest):
        return held
    raise CheckpointError(
        f"step {step} of {dst.url} is a different checkpoint (run {held.run or '?'}, created {held.created}) "
        f"than step {step} of {src_url} (run {manifest.run or '?'}, created {manifest.created}); "
        "a copy never overwrites a committed checkpoint: copy to another store, or remove that step there first"
    )


def _held(present: dict[str, int] | None, ref: ChunkRef) -> bool:
    """Whether the destination's listing shows object ``ref`` whole (at its recorded size).

    An object there at another size is a torn write of a backend whose writes are not
    atomic (a copier killed while writing it): it is copied again, over it."""
    return present is not None and ref.key in present and (ref.stored < 0 or present[ref.key] == ref.stored)


def _intact(dst: Store, ref: ChunkRef) -> bool:
    """Whether the destination's object ``ref`` holds the stored bytes its record hashes
    (``stored_hash``; a raw object's content hash). False for a record without one."""
    digest = stored_digest(ref)
    if not digest:
        return False
    what = f"object {ref.key} at {dst.url}"
    try:
        got = dst.hash_object(ref.key, ref.stored, what=what)
        if got is None:  # a remote store: fetched (at most one byte past the record)
            payload = dst.get_object(ref.key, what=what, limit=ref.stored + 1)
            got = (hash_bytes(payload), len(payload))
    except MissingObjectError:
        return False
    return got == (digest, ref.stored)


def _check_sources(src: Store, manifests: list[Manifest], present: dict[str, int] | None) -> None:
    """Refuse, before anything is written, a checkpoint citing an object (or delta base) the
    source lacks or holds at another size than its manifest records."""
    try:
        there = {o.key: o.size for o in src.list_objects()}
    except CheckpointError as exc:  # an optimisation: each fetch is still checked
        log.warning("cannot list the objects of %s (%s): checking each one as it is copied", src.url, exc)
        return
    for manifest in manifests:
        records = _records(manifest)
        todo = {k: r for k, r in records.items() if not _held(present, r)}
        missing = sorted(k for k in todo if k not in there)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise MissingObjectError(
                f"step {manifest.step} of {src.url} cites object(s) {', '.join(missing[:3])}{more} "
                "that the source does not hold: nothing of it copied"
            )
        for key, ref in todo.items():
            if ref.stored >= 0 and there[key] != ref.stored:
                raise CorruptCheckpointError(
                    f"step {manifest.step} of {src.url}: object {key} has {there[key]} bytes, the manifest says "
                    f"{ref.stored} (truncated or replaced): nothing of it copied"
                )


def _copy_object(src: Store, dst: Store, reader: Reader, ref: ChunkRef, what: str) -> int:
    """Fetch object ``ref``, verify it, write it to ``dst`` as stored; returns its stored size."""
    expected = ref.stored if ref.stored >= 0 else max_encoded_size(ref.size)
    payload = src.get_object(ref.key, what=what, limit=expected + 1)
    if len(payload) > expected or (ref.stored >= 0 and len(payload) != ref.stored):
        # before the raw buffer is allocated: a hostile size costs nothing
        reader.check_payload(ref, payload, memoryview(bytearray(0)), what=what)
    try:  # bounded by the manifest: at most one chunk's raw bytes per worker
        out = memoryview(bytearray(ref.size))
    except MemoryError:
        raise CheckpointError(f"{what}: object {ref.key}: cannot allocate {ref.size} bytes to verify it") from None
    reader.check_payload(ref, payload, out, what=what)
    dst.put_object(ref.key, payload)
    return len(payload)


def _commit_copy(
    dst: Store,
    manifest: Manifest,
    lease: WriterLease,
    src_order: dict[int, tuple[int, int, int]],
    as_latest: bool | None,
    written_bytes: int,
) -> Manifest:
    """Write ``manifest`` to ``dst`` after its objects (which are durable by now), the copy
    having written ``written_bytes`` of them (those ``dst`` held already are not counted):
    ``stored_bytes`` counts them and the manifest file as written, settled as a save's is,
    once the ``seq`` is set (:func:`ckpt.storage.commit.settled`)."""
    latest = find_latest(dst)
    current = latest.manifest
    if as_latest is None:
        # older than the destination's latest in the source's own order: never its latest
        older = (
            current is not None
            and current.step != manifest.step
            and (
                (current.step in src_order and src_order[current.step] > order_key(manifest))
                or (current.run == manifest.run and current.run != "" and current.step > manifest.step)
            )
        )
        as_latest = not older
    if as_latest:
        out, file = settled(dst, dataclasses.replace(manifest, seq=latest.top_seq + 1), written_bytes)
        lease.check()  # a writer that lost the store must not commit over the new one
        dst.commit(out.step, file, seq=out.seq)
    else:
        out, file = settled(dst, dataclasses.replace(manifest, seq=None), written_bytes)
        lease.check()
        dst.sync_dirs()
        dst.write(dst.manifest_path(out.step), file)
        dst.sync_dirs()
        log.info(
            "step %d copied to %s without becoming its latest (step %s is newer)",
            out.step,
            dst.url,
            current and current.step,
        )
    lease.protect([s for s in lease.protected if s != out.step] + [out.step])
    return out
