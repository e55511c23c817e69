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

A small tensor whose bytes equal its slice of the parent's packed object keeps citing
that slice (:func:`unchanged_slice`): frozen tensors are never written again, only the
changed ones are packed. The order is the save's order, so a changed set packs the same
way at every save. A changed pack whose layout (tensor
paths, offsets and sizes) is the same as the parent's pack holding its first tensor may
be stored as a delta of that object.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from ckpt.errors import CheckpointError
from ckpt.io.hashing import hash_bytes
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
    buf: bytearray
    used: int = 0
    members: list[_Member] = field(default_factory=list)
    #: content hash of each member's bytes -> the member (equal tensors share a slice)
    seen: dict[str, _Member] = field(default_factory=dict)


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


def parent_layouts(parent: Manifest | None) -> dict[str, tuple[Layout, ChunkRef]]:
    """For each packed tensor of ``parent``: its object's layout and the object's record."""
    if parent is None:
        return {}
    by_object: dict[tuple[str, str, int], list[tuple[str, int, int]]] = {}
    first: dict[tuple[str, str, int], tuple[str, ChunkRef]] = {}
    for path, entry in parent.tensors.items():
        if len(entry.chunks) != 1 or not entry.chunks[0].packed:
            continue
        ref = entry.chunks[0]
        ident = (ref.key, ref.hash, ref.of)
        by_object.setdefault(ident, []).append((path, ref.at, ref.size))
        first.setdefault(ident, (entry.dtype, ref))
    out: dict[str, tuple[Layout, ChunkRef]] = {}
    for ident, members in by_object.items():
        layout = _layout(members)
        obj = first[ident][1].object_ref()
        for path, _at, _size in members:
            out[path] = (layout, obj)
    return out


def _layout(members: Iterable[tuple[str, int, int]]) -> Layout:
    """Members in offset order (then path: twins share an offset)."""
    return tuple(sorted(members, key=lambda m: (m[1], m[0])))


class Packer:
    """Collects small tensors into packs and writes each full pack with ``write`` on ``pool``."""

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        write: WriteObject,
        *,
        capacity: int,
        parent: Manifest | None = None,
    ) -> None:
        self.pool = pool
        self.write = write
        #: raw bytes of a pack at most (the chunk size)
        self.capacity = capacity
        self._open: dict[tuple[str, str], _Pack] = {}
        self._lock = threading.Lock()
        self._parents = parent_layouts(parent)
        self._parent_dtypes = {p: e.dtype for p, e in parent.tensors.items()} if parent is not None else {}
        #: packs written (objects or dedup hits)
        self.packs = 0
        self._added: set[str] = set()

    def holds(self, path: str) -> bool:
        """Whether tensor ``path`` was copied into a pack (its own memory is no longer needed)."""
        return path in self._added

    def add(
        self, path: str, data: memoryview, dtype: str, itemsize: int, shape: tuple[int, ...]
    ) -> Future[TensorEntry]:
        """Copy ``data`` into the open pack of ``dtype``; the future gives the tensor's entry."""
        fut: Future[TensorEntry] = Future()
        self._added.add(path)
        size = len(data)
        # a subtree's tensors (``model/...``) pack apart from other subtrees'; bare top-level tensors together
        group = (path.split("/", 1)[0] if "/" in path else "", dtype)
        digest = hash_bytes(data)
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
                pack = self._open[group] = _Pack(dtype, itemsize, bytearray())
            pack.buf += data
            member = _Member(path, pack.used, size, shape, fut)
            pack.members.append(member)
            pack.seen.setdefault(digest, member)
            pack.used += size
        return fut

    def flush(self) -> None:
        """Write every open pack (the end of a save)."""
        with self._lock:
            packs = list(self._open.values())
            self._open.clear()
        for pack in packs:
            self._seal(pack)

    def _seal(self, pack: _Pack) -> None:
        try:
            self.pool.submit(self._write_pack, pack)
        except BaseException as exc:  # a pool shut down: the members' futures must not hang
            for m in pack.members:
                m.future.set_exception(exc)
            raise

    def _write_pack(self, pack: _Pack) -> None:
        try:
            data = memoryview(pack.buf)[: pack.used]
            layout = _layout((m.path, m.at, m.size) for m in pack.members)
            parent = self._delta_parent(pack, layout)
            ref = self.write(pack.members[0].path, data, pack.dtype, pack.itemsize, parent, layout)
            self.packs += 1
        except BaseException as exc:  # noqa: BLE001 - forwarded to every member tensor
            for m in pack.members:
                m.future.set_exception(exc)
            return
        obj = ref.object_ref()
        for m in pack.members:
            chunk = replace(obj, size=m.size, at=m.at, of=pack.used)
            m.future.set_result(TensorEntry(dtype=pack.dtype, shape=m.shape, nbytes=m.size, chunks=(chunk,)))

    def _delta_parent(self, pack: _Pack, layout: Layout) -> ChunkRef | None:
        """The parent's object of the same layout and dtype, if there is one."""
        found = self._parents.get(pack.members[0].path)
        if found is None or found[0] != layout or self._parent_dtypes.get(layout[0][0]) != pack.dtype:
            return None
        if found[1].size != pack.used:
            return None
        return found[1]
