"""The zstandard codecs: ``zstd`` (plain) and ``bgzstd`` (byte-grouped, for floating point).

``bgzstd`` puts byte *k* of every element into plane *k* and compresses each plane on its
own (the exponent plane compresses ~2.7x, the mantissa planes barely); a plane that does
not compress is stored raw. Both decoders are bounded by the expected raw size: a frame
header is never trusted for an allocation.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Mapping
from typing import IO, Any, cast

import numpy as np
import zstandard

from ckpt import config
from ckpt.codecs import planes as byte_planes
from ckpt.codecs.base import DecodeContext, EncodeContext
from ckpt.errors import CorruptCheckpointError
from ckpt.io.memory import Scatter, copy_into
from ckpt.io.scratch import scratch

_local = threading.local()


def _compressor(level: int | str) -> zstandard.ZstdCompressor:
    """A per-thread compressor: an int zstd level, ``"planes"`` or ``"repeats"`` (see :data:`PLANE_PARAMS`)."""
    # ZstdCompressor objects must not be shared between threads that use them at once.
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    c = cache.get(level)
    if c is None:
        if level in _PLANE_SETTINGS:
            params = zstandard.ZstdCompressionParameters(write_content_size=True, **_PLANE_SETTINGS[level])
            c = zstandard.ZstdCompressor(compression_params=params)
        else:
            c = zstandard.ZstdCompressor(level=int(level), write_content_size=True)
        cache[level] = c
    return c


#: zstd settings for byte planes of float data. A plane is mostly a skewed byte histogram
#: with few long repeats, so almost all the gain is zstd's Huffman coding of literals:
#: the fast strategy with a tiny hash table and the longest minimum match skips futile
#: match search. Measured on this project's benchmark data (all-MiniLM-L6-v2, an MLP's
#: weights and Adam moments) against level 1: exponent planes compress 2.92x instead of
#: 2.70x at 2-3x the speed (fp32 overall 1.217x at 1.65 GB/s vs 1.207x at 0.9 GB/s).
#: Frames stay standard zstd: decoding needs no parameters.
PLANE_PARAMS = dict(strategy=1, min_match=7, hash_log=6, chain_log=6, search_log=1, window_log=17, target_length=0)
#: settings for a plane whose sample shows long repeats, which PLANE_PARAMS' tiny hash table
#: cannot see: the exponent plane of Adam moments after small-batch steps (a low-rank gradient
#: repeats whole rows' exponent patterns, up to ~1 MB apart) compresses 7x smaller with these
#: (20x instead of 2.5x, 1.2 GB/s); on weights' exponent planes they lose (2.9x instead of
#: 3.3x at half the speed), so the sample decides, plane by plane.
REPEAT_PARAMS = dict(PLANE_PARAMS, hash_log=14, window_log=20)
_PLANE_SETTINGS = {"planes": PLANE_PARAMS, "repeats": REPEAT_PARAMS}
#: a sample that REPEAT_PARAMS makes this much smaller than PLANE_PARAMS picks them
_REPEATS_GAIN = 1.25


def release_thread_contexts() -> None:
    """Drop this thread's compressors, its decompressors of frames in part or streamed (which
    may hold a window of up to :data:`PREFIX_WINDOW` each) and its stream buffer: a thread
    kept idle between calls (:func:`ckpt.snapshot.executor.io_pool`) must not hold them meanwhile."""
    _local.cctx = None
    _local.prefix_dctx = None
    _local.stream_dctx = None
    _local.stream_planes = None


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def _decompress_exact(payload: memoryview | bytes, size: int, what: str) -> bytes:
    try:
        # One-shot decompression allocates what the frame header declares and honours
        # max_output_size only when the header declares nothing: a forged header asking for
        # a terabyte is refused here, before anything is allocated.
        declared = zstandard.get_frame_parameters(payload).content_size
        if declared not in (size, zstandard.CONTENTSIZE_UNKNOWN):
            raise CorruptCheckpointError(f"zstd frame of {what} declares {declared} bytes, expected {size}")
        # bytes after the frame are damage too, even if the frame decodes to the right content
        raw = _decompressor().decompress(payload, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CorruptCheckpointError(f"zstd frame of {what} does not decode: {exc}") from None
    if len(raw) != size:
        raise CorruptCheckpointError(f"{what} decodes to {len(raw)} bytes, expected {size}")
    return raw


#: the largest window a frame decoded in part may declare: decoding a frame in part (unlike
#: whole, straight into the destination) allocates its window, which a hostile frame could
#: declare up to zstd's limit of 128 MiB per thread. ckpt's own frames of 16 MiB chunks use
#: 128 KiB to 2 MiB windows, 8 MiB at ``CKPT_ZSTD_LEVEL=19``; a larger one is decoded whole.
PREFIX_WINDOW = 8 * 1024 * 1024


def _prefix_decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "prefix_dctx", None)
    if d is None:
        d = _local.prefix_dctx = zstandard.ZstdDecompressor(max_window_size=PREFIX_WINDOW)
    return d


def _decompress_prefix(payload: memoryview | bytes, nbytes: int) -> bytes | None:
    """The first ``nbytes`` a zstd frame decodes to, decoding no more of it than that takes
    (a block, at most 128 KiB, past them); None when it holds fewer, does not decode, or
    declares a window over :data:`PREFIX_WINDOW`."""
    try:
        reader = _prefix_decompressor().stream_reader(payload, read_across_frames=False)
        parts: list[bytes] = []
        got = 0
        while got < nbytes:
            part = reader.read(nbytes - got)
            if not part:
                return None
            parts.append(part)
            got += len(part)
    except zstandard.ZstdError:
        return None
    return parts[0] if len(parts) == 1 else b"".join(parts)


#: a zstd object is stored compressed only when that saves at least this fraction of it
_MIN_SAVING = 0.02
#: a byte plane is compressed only when that saves at least this fraction of it. Below that,
#: Huffman coding a plane costs more than it saves: it is ~1 ns a byte to encode and as
#: much to decode, for a few percent of the bytes. The low mantissa planes of
#: all-MiniLM-L6-v2's fp32 weights save 2.8% and 1.5%: compressing them took about 19 of
#: the ~100 ms of CPU its save took, for 0.5% of its store (1.216x instead of 1.210x).
_PLANE_MIN_SAVING = 0.05
#: bytes of a plane compressed to decide, by the saving, whether to compress all of it; a
#: plane of 4 samples or fewer is compressed and kept or not as a whole
_SAMPLE = 32 * 1024


class ZstdCodec:
    """Plain zstandard."""

    name = "zstd"

    def __init__(self, level: int | None = None) -> None:
        self.level = config.zstd_level() if level is None else level

    def encode(self, data: memoryview, ctx: EncodeContext) -> tuple[bytes, dict[str, Any]] | None:
        out = _compressor(self.level).compress(data)
        if len(out) >= len(data) * (1 - _MIN_SAVING):
            return None
        return out, {}

    def decode(self, payload: memoryview, out: memoryview, params: Mapping[str, Any], ctx: DecodeContext) -> None:
        raw = _decompress_exact(payload, len(out), "zstd object")
        copy_into(out, raw)

    def decode_prefix(self, payload: memoryview, size: int, nbytes: int, params: Mapping[str, Any]) -> bytes | None:
        """The first ``min(nbytes, size)`` bytes of a ``size``-byte chunk (see :func:`ckpt.codecs.base.decode_prefix`)."""
        return _decompress_prefix(payload, min(nbytes, size))

    def decode_prefix_from(
        self, read: ReadRange, stored: int, size: int, nbytes: int, params: Mapping[str, Any]
    ) -> bytes | None:
        """:meth:`decode_prefix` of a payload of ``stored`` bytes that ``read(start, end)``
        gives in ranges: only the frame's first bytes are read."""
        want = min(nbytes, size)
        return _decompress_prefix(read(0, min(stored, prefix_input_bound(want))), want)


def prefix_input_bound(nbytes: int) -> int:
    """The bytes of a zstd frame that decoding its first ``nbytes`` takes, as zstd's encoder
    writes frames: the frame header and every block up to the one holding byte ``nbytes``
    (a block decodes to at most 128 KiB and is never stored larger than that plus its
    3-byte header). A valid frame padded with empty blocks can take more: its prefix is
    then None, and a caller decodes the object whole (verified) instead."""
    return 18 + nbytes + _BLOCK + 3 * (nbytes // _BLOCK + 2)


#: zstd's largest block (decoded)
_BLOCK = 128 * 1024
#: ``read(start, end)``: bytes ``[start, end)`` of a payload (fewer when it is shorter)
ReadRange = Callable[[int, int], "bytes | memoryview"]


_PLANE = struct.Struct("<BQ")  # mode (0 raw, 1 zstd), stored length
#: element sizes bgzstd groups bytes by (every dtype of 2 bytes or more)
ITEMSIZES = frozenset({2, 4, 8, 16})
_RAW, _ZSTD = 0, 1


class ByteGroupZstdCodec:
    """Byte-grouped zstandard for floating-point data (see module docstring)."""

    name = "bgzstd"

    def __init__(self, level: int | None = None) -> None:
        # None: the tuned plane settings; CKPT_ZSTD_LEVEL or ``level`` forces a plain level.
        self.level = config.zstd_level_override() if level is None else level

    def _compress_plane(self, plane: np.ndarray) -> tuple[int, bytes | np.ndarray]:
        comp = _compressor("planes" if self.level is None else self.level)
        n = plane.nbytes
        if n > 4 * _SAMPLE:
            # Mantissa planes are close to random: samples decide cheaply. Stored raw only
            # when its start, middle and end all are: a plane random in part only (a delta
            # of an embedding whose first rows changed and the rest did not) is compressed.
            for at in (0, (n - _SAMPLE) // 2, n - _SAMPLE):
                part = plane[at : at + _SAMPLE].data
                sample = comp.compress(part)
                if len(sample) < _SAMPLE * (1 - _PLANE_MIN_SAVING):
                    break
            else:
                return _RAW, plane
            if self.level is None:  # long repeats (see REPEAT_PARAMS) show in the sample too
                repeats = _compressor("repeats")
                if len(repeats.compress(part)) * _REPEATS_GAIN <= len(sample):
                    comp = repeats
        out = comp.compress(plane.data)
        if len(out) >= n * (1 - _PLANE_MIN_SAVING):
            return _RAW, plane
        return _ZSTD, out

    def encode(self, data: memoryview, ctx: EncodeContext) -> tuple[memoryview, dict[str, Any]] | None:
        k = ctx.itemsize
        if k not in ITEMSIZES or len(data) % k:
            return None
        n = len(data) // k
        # The planes are split straight into the payload, where each would lie if every plane
        # before it were stored raw: a raw plane (the low mantissa bytes, which come first)
        # stays where it is, and one after a compressed plane moves down. A compressed plane
        # is written over its own rows, already read, and never reaches the next plane's
        # (it is shorter than them). No plane is copied out of a buffer of its own.
        table = _PLANE.size * k
        # (what is returned is fully written); on a page, so that a local store's O_DIRECT
        # write sends it as it is; reused from one object to the next within a writer's scope
        out = scratch(table + len(data))
        planes = out[table:].reshape(k, n)
        byte_planes.split(data, planes)
        view = out.data
        pos = table
        compressed = False
        for i in range(k):
            mode, part = self._compress_plane(planes[i])
            size = len(part) if isinstance(part, bytes) else part.nbytes
            if mode == _ZSTD:
                compressed = True
                copy_into(view[pos : pos + size], part if isinstance(part, bytes) else part.data)
            elif pos != table + i * n:
                np.copyto(out[pos : pos + size], planes[i])  # down over what is already written out
            _PLANE.pack_into(view, i * _PLANE.size, mode, size)
            pos += size
        if not compressed:
            return None
        return view[:pos], {"itemsize": k}

    def decode(self, payload: memoryview, out: memoryview, params: Mapping[str, Any], ctx: DecodeContext) -> None:
        k = params.get("itemsize")
        if type(k) is not int or k not in ITEMSIZES or len(out) % k:
            raise CorruptCheckpointError(f"bgzstd: bad itemsize {str(k)[:40]} for {len(out)} bytes")
        n = len(out) // k
        planes: list[np.ndarray] = []
        pos = _PLANE.size * k
        if len(payload) < pos:
            raise CorruptCheckpointError("bgzstd: truncated plane table")
        for i in range(k):
            mode, length = _PLANE.unpack_from(payload, i * _PLANE.size)
            body = payload[pos : pos + length]
            if len(body) != length:
                raise CorruptCheckpointError(f"bgzstd: plane {i} truncated ({len(body)} of {length} bytes)")
            pos += length
            if mode == _RAW:
                if length != n:
                    raise CorruptCheckpointError(f"bgzstd: raw plane {i} has {length} bytes, expected {n}")
                plane = np.frombuffer(body, dtype=np.uint8)
            elif mode == _ZSTD:
                plane = np.frombuffer(_decompress_exact(body, n, f"bgzstd plane {i}"), dtype=np.uint8)
            else:
                raise CorruptCheckpointError(f"bgzstd: plane {i} has unknown mode {mode}")
            planes.append(plane)
        if pos != len(payload):
            raise CorruptCheckpointError(f"bgzstd: {len(payload) - pos} trailing bytes")
        byte_planes.join(planes, out)

    def decode_file(
        self, fd: int, stored: int, out: memoryview | Scatter, params: Mapping[str, Any], digest: Any, what: str
    ) -> bool:
        """:meth:`decode` of the payload of ``stored`` bytes in open file ``fd``, streamed:
        a block of elements at a time, each plane's part of it read (raw) or decompressed
        into a small buffer of this thread, joined into ``out`` and hashed into ``digest``
        while in the CPU's cache. No buffer the size of the payload or of a plane: a
        restore's memory stays the live tensors' (fresh buffers cost a page fault per page).
        ``out`` a :class:`~ckpt.io.memory.Scatter`: each block is joined into a buffer of
        this thread, hashed, and its ranges copied on (a packed object's tensors).

        False, with nothing written, where it does not apply (a plane table :meth:`decode`
        refuses, a compressed plane that is not one zstd frame of the plane's size, or whose
        window is over :data:`PREFIX_WINDOW`): decode the payload whole then, which says what
        is wrong with it. A frame that fails midway has written part of ``out``; the caller's
        ``digest`` check is what verifies it (for payloads whose stored bytes were verified).
        Memory: a window per compressed plane (128 KiB to 1 MiB for ckpt's own frames).
        """
        table = _plane_table(lambda a, b: os.pread(fd, b - a, a), stored, len(out), params)
        if table is None:
            return False
        k, n, planes = table
        sources: list[Any] = []
        for mode, pos, length in planes:
            if mode == _RAW:
                sources.append(pos)
                continue
            head = os.pread(fd, min(length, _FRAME_HEADER_MAX), pos)
            try:
                frame = zstandard.get_frame_parameters(head)
            except zstandard.ZstdError:
                return False
            # one zstd frame filling the plane, as the whole decode demands (no skippable or
            # empty frames around it), declaring the plane's size and a bounded window
            if not head.startswith(_ZSTD_MAGIC) or frame.content_size != n or frame.window_size > PREFIX_WINDOW:
                return False
            if _frame_size(fd, pos, head, length, n) != length:
                return False
            # a decompressor of its own for each plane: they are read in turns, block by block
            dctx = _stream_decompressor(sum(not isinstance(x, int) for x in sources))
            span = cast(IO[bytes], _FileSpan(fd, pos, length))
            sources.append(dctx.stream_reader(span, read_size=_BLOCK, read_across_frames=False))
        m = max(1, _STREAM_MAX_BLOCK // k)
        scatter = out if isinstance(out, Scatter) else None
        bufs, joined = _stream_buffers(k, m, joined=scatter is not None)
        dest = joined if joined is not None else np.frombuffer(cast(memoryview, out), dtype=np.uint8)
        try:
            for a in range(0, n, m):
                b = min(n, a + m)
                parts = [buf[: b - a] for buf in bufs]
                for i, src in enumerate(sources):
                    part = parts[i]
                    if isinstance(src, int):
                        got = os.preadv(fd, [part.data], src + a)
                        if got != b - a:
                            raise CorruptCheckpointError(f"bgzstd: raw plane {i} ends at byte {a + got} of {n}")
                        continue
                    got = 0
                    view = part.data
                    while got < b - a:
                        r = src.readinto(view[got:])
                        if not r:
                            raise CorruptCheckpointError(
                                f"zstd frame of bgzstd plane {i} decodes to {a + got} bytes, expected {n}"
                            )
                        got += r
                block = dest[: (b - a) * k] if scatter is not None else dest[a * k : b * k]
                byte_planes.join(parts, block.data)
                digest.update(block.data)
                if scatter is not None:
                    scatter.write(a * k, block.data)
            for i, src in enumerate(sources):
                if not isinstance(src, int) and src.read(1):
                    raise CorruptCheckpointError(f"zstd frame of bgzstd plane {i} decodes to more than {n} bytes")
        except zstandard.ZstdError as exc:
            raise CorruptCheckpointError(f"zstd frame of {what} does not decode: {exc}") from None
        return True

    def raw_planes(self, payload: memoryview, size: int, params: Mapping[str, Any]) -> dict[int, memoryview] | None:
        """The planes of a ``size``-byte chunk stored raw (byte *i* of every element, by *i*),
        read in place: no decoding. None for a plane table :meth:`decode` would refuse.
        **Unverified**, like :meth:`decode_prefix`: for estimates only."""
        table = _plane_table(lambda a, b: payload[a:b], len(payload), size, params)
        if table is None:
            return None
        return {i: payload[pos : pos + length] for i, (mode, pos, length) in enumerate(table[2]) if mode == _RAW}

    def raw_planes_from(
        self, read: ReadRange, stored: int, size: int, params: Mapping[str, Any]
    ) -> dict[int, PlaneRange] | None:
        """:meth:`raw_planes` of a payload of ``stored`` bytes that ``read(start, end)`` gives
        in ranges: each plane is read only where it is sliced (:class:`PlaneRange`)."""
        table = _plane_table(read, stored, size, params)
        if table is None:
            return None
        return {i: PlaneRange(read, pos, length) for i, (mode, pos, length) in enumerate(table[2]) if mode == _RAW}

    def decode_prefix(
        self, payload: memoryview, size: int, nbytes: int, params: Mapping[str, Any]
    ) -> memoryview | None:
        """The first whole elements, at least ``min(nbytes, size)`` bytes, of a ``size``-byte
        chunk: only the first bytes of each plane are decompressed (see
        :func:`ckpt.codecs.base.decode_prefix`). None for a payload :meth:`decode` would refuse
        in its table or in those first bytes."""
        return self.decode_prefix_from(lambda a, b: payload[a:b], len(payload), size, nbytes, params)

    def decode_prefix_from(
        self, read: ReadRange, stored: int, size: int, nbytes: int, params: Mapping[str, Any]
    ) -> memoryview | None:
        """:meth:`decode_prefix` of a payload of ``stored`` bytes that ``read(start, end)``
        gives in ranges: only the plane table and each plane's first bytes are read."""
        table = _plane_table(read, stored, size, params, whole=False)
        if table is None:
            return None
        k, n, planes = table
        m = min(n, -(-nbytes // k))  # elements
        parts: list[np.ndarray] = []
        for mode, pos, length in planes:
            if mode == _RAW:
                body = read(pos, pos + m)
                raw: bytes | memoryview | None = body if len(body) == m else None
            else:
                raw = _decompress_prefix(read(pos, pos + min(length, prefix_input_bound(m))), m)
            if raw is None:
                return None
            parts.append(np.frombuffer(raw, dtype=np.uint8, count=m))
        out = np.empty(m * k, dtype=np.uint8)  # fully written below
        byte_planes.join(parts, out.data)
        return out.data


#: bytes of output a streamed bgzstd decode (:meth:`ByteGroupZstdCodec.decode_file`) joins
#: at a time: they and their planes stay in the CPU's cache (1, 2 and 4 MiB measured alike)
_STREAM_MAX_BLOCK = 1 << 20
#: the longest zstd frame header (ZSTD_FRAMEHEADERSIZE_MAX)
_FRAME_HEADER_MAX = 18


#: the magic number that starts a zstd frame (RFC 8878), little-endian
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BLOCK_HEADER = 3


def _frame_size(fd: int, start: int, head: bytes, limit: int, content: int) -> int | None:
    """The length of the zstd frame at byte ``start`` of file ``fd``, whose header is ``head``
    (RFC 8878: its header, then blocks up to the last, then a checksum when the header says
    so), reading each block's header; None for a block of the reserved type, a frame running
    past ``limit`` bytes, or one of more blocks than a frame of ``content`` bytes needs
    (zstd writes blocks of up to 128 KiB; a hostile frame of tiny blocks would cost a read
    each, where the whole decode runs through them in C). What libzstd's
    ``ZSTD_findFrameCompressedSize`` says, which python-zstandard does not expose: a plane
    must be exactly one frame."""
    try:
        pos = zstandard.frame_header_size(head)
    except zstandard.ZstdError:
        return None
    checksum = 4 if head[4] & 0x04 else 0
    blocks = 16 + content // 4096
    while pos + _BLOCK_HEADER <= limit and blocks > 0:
        blocks -= 1
        header = int.from_bytes(os.pread(fd, _BLOCK_HEADER, start + pos), "little")
        kind, size = (header >> 1) & 3, header >> 3
        if kind == 3:  # reserved
            return None
        pos += _BLOCK_HEADER + (1 if kind == 1 else size)  # an RLE block stores one byte
        if header & 1:  # the last block
            return pos + checksum
    return None


class _FileSpan:
    """``read(n)`` over bytes ``[pos, pos + length)`` of an open file (positional reads: no
    shared offset), what zstd's stream reader takes as its source."""

    def __init__(self, fd: int, pos: int, length: int) -> None:
        self._fd, self._pos, self._left = fd, pos, length

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        if n <= 0:
            return b""
        got = os.pread(self._fd, n, self._pos)
        self._pos += len(got)
        self._left -= len(got) if got else self._left  # a file cut short ends the span
        return got


def _stream_decompressor(i: int) -> zstandard.ZstdDecompressor:
    """This thread's ``i``-th decompressor for :meth:`ByteGroupZstdCodec.decode_file`
    (windows bounded as :func:`_prefix_decompressor`'s)."""
    have: list[zstandard.ZstdDecompressor] | None = getattr(_local, "stream_dctx", None)
    if have is None:
        have = _local.stream_dctx = []
    while len(have) <= i:
        have.append(zstandard.ZstdDecompressor(max_window_size=PREFIX_WINDOW))
    return have[i]


def _stream_buffers(k: int, m: int, *, joined: bool) -> tuple[list[np.ndarray], np.ndarray | None]:
    """This thread's ``k`` plane buffers of ``m`` bytes for :meth:`ByteGroupZstdCodec.decode_file`,
    and (``joined``) one of ``k * m`` bytes that a block is joined into."""
    need = k * m * (2 if joined else 1)
    bufs: np.ndarray | None = getattr(_local, "stream_planes", None)
    if bufs is None or bufs.size < need:
        bufs = _local.stream_planes = np.empty(need, dtype=np.uint8)
    return [bufs[i * m : (i + 1) * m] for i in range(k)], bufs[k * m : 2 * k * m] if joined else None


class PlaneRange:
    """A plane stored raw in a payload read in ranges: its length, and its bytes where sliced."""

    def __init__(self, read: ReadRange, pos: int, length: int) -> None:
        self._read, self._pos, self._len = read, pos, length

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, part: slice) -> bytes | memoryview:
        a, b, step = part.indices(self._len)
        if step != 1:
            raise ValueError("a plane is read in contiguous ranges only")
        return self._read(self._pos + a, self._pos + max(a, b))


def _plane_table(
    read: ReadRange, stored: int, size: int, params: Mapping[str, Any], *, whole: bool = True
) -> tuple[int, int, list[tuple[int, int, int]]] | None:
    """``(itemsize, elements, [(mode, position, length) of each plane])`` of a bgzstd payload
    of ``stored`` bytes; None for a table :meth:`ByteGroupZstdCodec.decode` would refuse
    (bytes past the last plane aside unless ``whole``: a prefix does not look that far)."""
    k = params.get("itemsize")
    if type(k) is not int or k not in ITEMSIZES or size % k or stored < _PLANE.size * k:
        return None
    head = read(0, _PLANE.size * k)
    if len(head) != _PLANE.size * k:
        return None
    n = size // k
    planes: list[tuple[int, int, int]] = []
    pos = _PLANE.size * k
    for i in range(k):
        mode, length = _PLANE.unpack_from(head, i * _PLANE.size)
        if mode not in (_RAW, _ZSTD) or (mode == _RAW and length != n) or pos + length > stored:
            return None
        planes.append((mode, pos, length))
        pos += length
    return (k, n, planes) if pos == stored or not whole else None
