"""Packing small tensors into shared objects (manifest schema 2: chunk records with ``at``/``of``).

A model made of many small tensors would otherwise pay per-object costs (an open, a
write and fsync or a PUT, a hash, a manifest record) for each of them. A save's small
tensors (below ``CKPT_PACK_BYTES``) are copied, in the order the save meets them and
grouped by top-level state key and dtype, into pack buffers of a few MiB
(:data:`ckpt.io.writer.PACK_CAPACITY`, at most the chunk size); each full buffer is
written as one object, and each tensor's entry cites its slice of it (``at``, ``of``).
Top-level subtrees (a module, an optimizer) never share an object, so
``ckpt.load(keys=[...])`` reads only the objects of those keys; a tensor equal to one
packed before it in the same group (tied weights) cites the same slice instead of being
packed twice.

An unchanged small tensor keeps citing its slice of the parent's packed object
(:func:`unchanged_slice`): frozen tensors (a LoRA base's) never move to a new object.
Across saves a pack keeps its layout. A small tensor the parent checkpoint packed (same
dtype and size) goes back to its slot of a copy of the parent's object (:class:`_Repack`,
which starts as the parent's bytes): when every tensor is unchanged nothing is written;
when some changed, the object is written again with the same layout, so that it can be
stored as a delta of the parent's (:mod:`ckpt.codecs.delta`), where the unchanged slots
cost nothing, and the changed tensors cite it. Without deltas (a raw tier,
``max_chain=1``) the changed ones are packed anew.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from ckpt.errors import CheckpointError
from ckpt.io import scratch
from ckpt.io.hashing import hash_bytes
from ckpt.io.memory import copy_into
from ckpt.io.reader import Reader
from ckpt.storage.manifest import ChunkRef, Manifest, TensorEntry

log = logging.getLogger("ckpt")

#: (path, at, size) of each tensor of a pack, in offset order
Layout = tuple[tuple[str, int, int], ...]
#: writes one object: (first tensor path, raw bytes, dtype, itemsize, delta parent, its layout) -> its record
WriteObject = Callable[[str, memoryview, str, int, ChunkRef | None, Layout], ChunkRef]


@dataclass
class _Member:
    path: str
    at: int
    size: int
    shape: tuple[int, ...]
    future: Future[TensorEntry]


@dataclass
class _Pack:
    dtype: str
    itemsize: int
    #: lent by ckpt.io.scratch, given back once the pack is written; a larger one is lent as
    #: the pack grows (to the capacity at most): a save of many top-level keys holds one open
    #: pack for each, and a capacity lent for each (4 MiB, mostly unused) made the buffer
    #: pool, which keeps what was lent at once, keep 486 MiB after a save of 9 MiB
    buf: np.ndarray
    used: int = 0
    members: list[_Member] = field(default_factory=list)
    #: content hash of each member's bytes -> the member (equal tensors share a slice)
    seen: dict[str, _Member] = field(default_factory=dict)


@dataclass
class _Repack:
    """A parent's packed object being filled again, slot by slot, by this save's tensors."""

    parent: ChunkRef  # the parent's whole-object record
    layout: Layout
    dtype: str
    itemsize: int
    #: the parent's object, each arriving tensor's bytes put in its slot: the object's size
    #: of a buffer lent by ckpt.io.scratch, given back (``lent``) once it is written
    buf: np.ndarray
    lent: np.ndarray
    waiting: set[str]
    members: list[_Member] = field(default_factory=list)
    #: offset -> the content hash written there by this save (twins share a slot)
    filled: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _ParentPack:
    layout: Layout
    obj: ChunkRef  # the object's record
    dtype: str
    #: path -> the parent's own record of that tensor (its slice)
    slices: Mapping[str, ChunkRef]


def _grown(buf: np.ndarray, used: int, nbytes: int) -> np.ndarray:
    """A buffer of ``nbytes`` lent in place of ``buf``, its first ``used`` bytes copied over."""
    bigger = scratch.lend(nbytes)
    copy_into(bigger[:used].data, buf[:used].data)
    scratch.give_back(buf)
    return bigger


def unchanged_slice(
    parent: Manifest, known: Mapping[str, ChunkRef], reader: Reader, path: str, view: memoryview, dtype: str
) -> ChunkRef | None:
    """The parent's packed record of ``path`` when its bytes equal ``view`` and its object is
    present (``known``: reusable objects by hash).

    Frozen small tensors (a LoRA base's biases and norms) keep citing the object they were
    first packed in, so only what changed is packed and written again. The parent's packed
    objects are read back through ``reader`` (verified; cached, so each once per save).
    """
    entry = parent.tensors.get(path)
    if entry is None or entry.dtype != dtype or len(entry.chunks) != 1:
        return None
    ref = entry.chunks[0]
    if not ref.packed or ref.size != len(view) or ref.hash not in known:
        return None
    try:
        raw = reader.object_bytes(ref, what=f"parent of tensor {path!r}")
    except CheckpointError as exc:
        log.warning("tensor %r: cannot read the parent's packed object %s (%s); packing it again", path, ref.key, exc)
        return None
    return ref if raw[ref.at : ref.at + ref.size] == view else None


def parent_packs(parent: Manifest | None, capacity: int) -> dict[str, _ParentPack]:
    """For each packed tensor of ``parent``: its object's layout and record.

    Left out (their tensors are packed anew): objects over ``capacity`` bytes (a pack this
    save would not write; the buffer filled again is that large), objects whose slots
    overlap without being equal (not something ckpt writes): filling one slot again would
    change another member's bytes, and objects whose members cover less than half of them
    (the buffer filled again would be mostly gaps: memory a hostile manifest could make
    any save spend, one buffer per small tensor).
    """
    if parent is None:
        return {}
    by_object: dict[tuple[str, str, int], dict[str, ChunkRef]] = {}
    dtypes: dict[tuple[str, str, int], set[str]] = {}
    for path, entry in parent.tensors.items():
        if len(entry.chunks) != 1 or not entry.chunks[0].packed:
            continue
        ref = entry.chunks[0]
        ident = (ref.key, ref.hash, ref.of)
        by_object.setdefault(ident, {})[path] = ref
        dtypes.setdefault(ident, set()).add(entry.dtype)
    out: dict[str, _ParentPack] = {}
    for ident, slices in by_object.items():
        layout = _layout((path, ref.at, ref.size) for path, ref in slices.items())
        covered = _covered(layout, ident[2])
        if ident[2] > capacity or len(dtypes[ident]) != 1 or covered is None or 2 * covered < ident[2]:
            continue
        found = _ParentPack(layout, next(iter(slices.values())).object_ref(), next(iter(dtypes[ident])), slices)
        for path in slices:
            out[path] = found
    return out


def _layout(members: Iterable[tuple[str, int, int]]) -> Layout:
    """Members in offset order (then path: twins share an offset)."""
    return tuple(sorted(members, key=lambda m: (m[1], m[0])))


def _covered(layout: Layout, of: int) -> int | None:
    """The bytes the slots of ``layout`` (in offset order) cover; None unless they are equal
    or apart, never partly overlapping, and all within ``of`` bytes."""
    end = covered = 0
    prev: tuple[int, int] | None = None
    for _path, at, size in layout:
        if (at, size) == prev:
            continue
        if at < end:
            return None
        prev, end = (at, size), at + size
        covered += size
    return covered if end <= of else None


class Packer:
    """Collects small tensors into packs and writes each full pack with ``write`` on ``pool``.

    With ``parent`` (a save that may store deltas), a tensor the parent packed goes back to
    its slot of the parent's object, and the object is written with that object as its
    delta parent (``write`` cites an unchanged one: its hash is known).
    """

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        write: WriteObject,
        *,
        capacity: int,
        parent: Manifest | None = None,
        parent_bytes: Callable[[ChunkRef], memoryview | None] | None = None,
    ) -> None:
        self.pool = pool
        self.write = write
        #: a parent's packed object, decoded and verified (None when it cannot be read): what a
        #: repack starts from, so that slots no tensor of this save fills again (a removed
        #: tensor's, or one citing another object) cost nothing in the delta
        self.parent_bytes = parent_bytes
        #: raw bytes of a pack at most (the chunk size)
        self.capacity = capacity
        self._open: dict[tuple[str, str], _Pack] = {}
        self._lock = threading.Lock()
        self._parents = parent_packs(parent, capacity)
        #: parent object key -> its repack (None once written)
        self._repacks: dict[str, _Repack | None] = {}
        #: packs written (objects or dedup hits)
        self.packs = 0
        self._added: set[str] = set()

    def holds(self, path: str) -> bool:
        """Whether tensor ``path`` was copied into a pack (its own memory is no longer needed)."""
        return path in self._added

    def repacks(self, path: str, dtype: str, size: int) -> bool:
        """Whether ``path`` goes back to its slot of a parent's packed object."""
        found = self._parents.get(path)
        return found is not None and found.dtype == dtype and found.slices[path].size == size

    def add(
        self,
        path: str,
        data: memoryview,
        dtype: str,
        itemsize: int,
        shape: tuple[int, ...],
        unchanged: ChunkRef | None = None,
    ) -> Future[TensorEntry]:
        """Copy ``data`` into its pack; the future gives the tensor's entry.

        ``unchanged``: the parent's record of ``path``, whose bytes equal ``data``. The tensor
        keeps citing it (frozen tensors, a LoRA base's, never move to a new object); when it
        goes back to its slot of a repack, its bytes are put there too (the delta is zero there).
        """
        fut: Future[TensorEntry] = Future()
        if unchanged is not None:
            fut.set_result(TensorEntry(dtype=dtype, shape=shape, nbytes=len(data), chunks=(unchanged,)))
        digest = hash_bytes(data)
        if self.repacks(path, dtype, len(data)) and self._refill(path, data, digest, itemsize, shape, fut, unchanged):
            self._added.add(path)
            return fut
        self._added.add(path)
        if unchanged is not None:
            return fut
        size = len(data)
        # a subtree's tensors (``model/...``) pack apart from other subtrees'; bare top-level tensors together
        group = (path.split("/", 1)[0] if "/" in path else "", dtype)
        with self._lock:
            pack = self._open.get(group)
            twin = pack.seen.get(digest) if pack is not None else None
            if pack is not None and twin is not None and twin.size == size:
                pack.members.append(_Member(path, twin.at, size, shape, fut))
                return fut
            if pack is not None and pack.used + size > self.capacity:
                self._seal(self._open.pop(group))
                pack = None
            if pack is None:
                pack = self._open[group] = _Pack(dtype, itemsize, scratch.lend(min(self.capacity, size)))
            elif pack.used + size > pack.buf.nbytes:
                pack.buf = _grown(pack.buf, pack.used, min(self.capacity, max(2 * pack.buf.nbytes, pack.used + size)))
            copy_into(pack.buf[pack.used : pack.used + size].data, data)
            member = _Member(path, pack.used, size, shape, fut)
            pack.members.append(member)
            pack.seen.setdefault(digest, member)
            pack.used += size
        return fut

    def _refill(
        self,
        path: str,
        data: memoryview,
        digest: str,
        itemsize: int,
        shape: tuple[int, ...],
        fut: Future[TensorEntry],
        unchanged: ChunkRef | None,
    ) -> bool:
        """Put ``data`` back in its slot of the parent's object; False: pack it anew."""
        found = self._parents[path]
        key = found.obj.key
        at = found.slices[path].at
        size = len(data)
        with self._lock:
            if key not in self._repacks:
                waiting = {p for p, _at, _size in found.layout}
                lent = scratch.lend(found.obj.size)
                buf = lent[: found.obj.size]
                self._start(buf, found.obj)
                self._repacks[key] = _Repack(found.obj, found.layout, found.dtype, itemsize, buf, lent, waiting)
            rp = self._repacks[key]
            if rp is None or path not in rp.waiting:
                return False
            if rp.filled.setdefault(at, digest) != digest:
                return False  # a twin in the parent, not any more: this one is packed apart
            rp.waiting.discard(path)
            copy_into(rp.buf[at : at + size].data, data)
            if unchanged is None:  # (an unchanged tensor's entry is settled: its parent record)
                rp.members.append(_Member(path, at, size, shape, fut))
            done = not rp.waiting
            if done:
                self._repacks[key] = None
        if done:
            self._close(rp)
        return True

    def _start(self, buf: np.ndarray, obj: ChunkRef) -> None:
        """A repack's buffer starts as the parent's object (or zeros when it cannot be read)."""
        raw = self.parent_bytes(obj) if self.parent_bytes is not None else None
        if raw is not None and len(raw) == len(buf):
            copy_into(buf.data, raw)
        else:
            buf.fill(0)  # never a former user's bytes

    def flush(self) -> None:
        """Write every open pack (the end of a save)."""
        with self._lock:
            packs = list(self._open.values())
            self._open.clear()
            repacks = [rp for rp in self._repacks.values() if rp is not None]
            self._repacks.clear()
        for rp in repacks:
            self._close(rp)
        for pack in packs:
            self._seal(pack)

    def _close(self, rp: _Repack) -> None:
        """Write a repack that some tensor changed; one whose tensors are all unchanged (they
        cite the parent's object) is not written."""
        if rp.members:
            self._submit(functools.partial(self._write_repack, rp), rp.members)
        else:
            scratch.give_back(rp.lent)

    def _write_repack(self, rp: _Repack) -> None:
        first = min(rp.members, key=lambda m: (m.at, m.path)).path
        self._finish(
            rp.members,
            rp.dtype,
            len(rp.buf),
            lambda: self.write(first, rp.buf.data, rp.dtype, rp.itemsize, rp.parent, rp.layout),
        )
        scratch.give_back(rp.lent)

    def _seal(self, pack: _Pack) -> None:
        self._submit(lambda: self._write_pack(pack), pack.members)

    def _submit(self, job: Callable[[], None], members: list[_Member]) -> None:
        try:
            self.pool.submit(job)
        except BaseException as exc:  # a pool shut down: the members' futures must not hang
            for m in members:
                m.future.set_exception(exc)
            raise

    def _write_pack(self, pack: _Pack) -> None:
        data = pack.buf[: pack.used].data
        first = pack.members[0].path
        self._finish(
            pack.members, pack.dtype, pack.used, lambda: self.write(first, data, pack.dtype, pack.itemsize, None, ())
        )
        scratch.give_back(pack.buf)

    def _finish(self, members: list[_Member], dtype: str, of: int, write: Callable[[], ChunkRef]) -> None:
        """Write one object and give each member its slice of it."""
        try:
            ref = write()
            self.packs += 1
        except BaseException as exc:  # noqa: BLE001 - forwarded to every member tensor
            for m in members:
                m.future.set_exception(exc)
            return
        obj = ref.object_ref()
        for m in members:
            chunk = replace(obj, size=m.size, at=m.at, of=of)
            m.future.set_result(TensorEntry(dtype=dtype, shape=m.shape, nbytes=m.size, chunks=(chunk,)))
