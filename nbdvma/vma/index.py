"""An index of where an archive keeps each cluster: read once, then served in place.

:func:`build_index` reads a whole archive once with :class:`~nbdvma.vma.reader.VmaReader`
(so with every check ``verify`` makes: structure, extent MD5s, the data digest where
there is one, every cluster of every disk present exactly once) and records, for each
64 KiB cluster of each disk, one 64-bit word (:class:`DiskIndex`):

* ``0``: a cluster stored with mask 0, all zeros;
* else the 16-bit block mask in bits 48-63 and, in bits 0-47, the offset of the
  cluster's first stored 4 KiB block in the archive's *extent stream* (the bytes of a
  plain ``.vma``; the decompressed bytes of a ``.vma.zst``).  The other stored blocks
  follow it, in mask order, as the format stores them.

So an index costs 8 bytes per cluster, 128 MiB per TiB of disk, whatever the archive's
length; 48 bits of offset reach 256 TiB.

A plain archive is read from its file at those offsets.  An nbdvma ``.vma.zst`` is one
zstd frame per unit (the header, then each extent; :mod:`nbdvma.vma.zstdframes`):
:class:`FrameTable` keeps each frame's place in the file and in the extent stream
(20 bytes per extent of up to 59 clusters), and :class:`IndexedArchive` decompresses
only the frames a read needs, keeping the last few in a small LRU cache.  A zstd
archive framed otherwise (one stream, as vzdump or the ``zstd`` CLI writes it) raises
:class:`~nbdvma.errors.UnindexableArchiveError` early:
:func:`~nbdvma.archive_backend.decompress_into` turns it (or a gzip or lzo stream) into
a plain sparse file once, which is then indexed.
An archive in object storage is indexed from a stream and read by ranged GETs
(:mod:`nbdvma.s3.archive`, a subclass of :class:`IndexedArchive`).

Everything here is synchronous and thread-safe for reads: the NBD backend calls
:meth:`IndexedArchive.read` from worker threads.
"""

from __future__ import annotations

import bisect
import collections
import errno
import io
import os
import threading
from array import array
from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeAlias

import attrs
import zstandard

from nbdvma.errors import UnindexableArchiveError, VmaFormatError
from nbdvma.vma.digest import DataDigest
from nbdvma.vma.fileio import FileRuns, PageCache, nowait_read_flags, preadv_nowait
from nbdvma.vma.format import (
    FULL_MASK,
    VMA_BLOCK_SIZE,
    VMA_CLUSTER_SIZE,
    VMA_EXTENT_HEADER_SIZE,
    VMA_MAX_DEVICES,
    VMA_MAX_EXTENT_SIZE,
    VMA_MAX_HEADER_SIZE,
    DeviceInfo,
    VmaHeader,
)
from nbdvma.vma.indexwords import (
    BLOCK_SHIFT,
    CLUSTER_SHIFT,
    OFFSET_BITS,
    OFFSET_MASK,
    STATUS_RUNS,
    block_runs,
)
from nbdvma.vma.reader import VmaReader, ZeroRun
from nbdvma.vma.sources import ZSTD_MAGIC

__all__ = [
    "ArchiveIndex",
    "DiskIndex",
    "FrameTable",
    "IndexedArchive",
    "VmstateWriter",
    "build_index",
]

#: Decompressed frames kept for reads (each at most one extent, 3.7 MiB).  Two are
#: enough for readers that go through the disk in order (qemu-img, nbdcopy: the same
#: copy time with 8), and keep export's peak RSS on a 64 GiB sparse .vma.zst under
#: 100 MiB while nbdcopy copies it (91 MiB; 102 with 4, 123 with 8).
FRAME_CACHE = 2
#: Frames decompressed at once (by as many reading threads).
DECOMPRESSORS = 2
_READ_CHUNK = 1 << 20
_SKIPPABLE_MAGIC_MIN = 0x184D2A50  # zstd skippable frames: 0x184D2A50..0x184D2A5F
#: An archive read front to back: a file, or an object in S3 (:mod:`nbdvma.s3.source`).
_Raw: TypeAlias = "io.BufferedReader[Any]"
#: A cached frame (or piece) of an archive.
Piece = bytes | bytearray
#: Called for each cluster of the VM state: ``(cluster, mask, data)``.
VmstateWriter = Callable[[int, int, memoryview], None]


@attrs.frozen
class DiskIndex:
    """Where the clusters of one disk lie: one word per cluster (see the module)."""

    dev: DeviceInfo
    clusters: array[int]

    @property
    def nbytes(self) -> int:
        """Memory the index holds for this disk."""
        return self.clusters.itemsize * len(self.clusters)


@attrs.frozen
class FrameTable:
    """The zstd frames of a ``.vma.zst``: for frame ``i``, where its content starts in
    the extent stream, and the frame's offset and length in the file."""

    starts: array[int]
    offsets: array[int]
    lengths: array[int]

    def find(self, position: int) -> int:
        """The frame whose content holds extent-stream byte ``position``."""
        return bisect.bisect_right(self.starts, position) - 1


@attrs.frozen
class ArchiveIndex:
    """What :func:`build_index` learnt: the header, each indexed disk, the frames."""

    header: VmaHeader
    disks: dict[str, DiskIndex]
    #: ``None`` for a plain archive (extent-stream offsets are file offsets).
    frames: FrameTable | None
    #: The data digest the extents matched (``None``: the archive has none).
    digest: DataDigest | None

    @property
    def nbytes(self) -> int:
        """Memory the index holds (cluster words and frame table)."""
        total = sum(d.nbytes for d in self.disks.values())
        if self.frames is not None:
            total += sum(a.itemsize * len(a) for a in attrs.astuple(self.frames, recurse=False))
        return total


class _FrameSource:
    """The decompressed content of a one-frame-per-unit ``.vma.zst``, as a stream for
    the reader, recording each frame's place (a frame of unknown or too large a size
    means another framing: :class:`UnindexableArchiveError`)."""

    def __init__(self, raw: _Raw, progress: Callable[[int], None]) -> None:
        self._raw = raw
        self._progress = progress
        self._dctx = zstandard.ZstdDecompressor()
        self._content = memoryview(b"")
        self._pos = 0
        self._file_pos = 0
        self.stream_pos = 0
        self.starts = array("Q")
        self.offsets = array("Q")
        self.lengths = array("L")

    def _need(self, n: int, frame: bytearray) -> bytes:
        data = self._raw.read(n)
        if len(data) != n:
            raise VmaFormatError("read failed - truncated zstd frame")
        frame += data
        return data

    def _next_frame(self) -> bool:
        """Read, decompress and record the next frame; ``False`` at EOF."""
        while True:
            frame = bytearray()
            magic = self._raw.read(4)
            if not magic:
                return False
            if len(magic) != 4:
                raise VmaFormatError("read failed - truncated zstd frame")
            value = int.from_bytes(magic, "little")
            if value & 0xFFFFFFF0 != _SKIPPABLE_MAGIC_MIN:
                break
            skip = int.from_bytes(self._need(4, frame), "little")
            self._need(skip, frame)
            self._file_pos += 4 + len(frame)
        if magic != ZSTD_MAGIC:
            raise VmaFormatError("read failed - not a zstd frame")
        frame += magic
        fhd = self._need(1, frame)[0]
        single, checksum = fhd >> 5 & 1, fhd >> 2 & 1
        fcs_size = (1 if single else 0, 2, 4, 8)[fhd >> 6]
        header_rest = (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs_size
        self._need(header_rest, frame)
        size = zstandard.frame_content_size(bytes(frame))
        limit = VMA_MAX_HEADER_SIZE if not self.starts else VMA_MAX_EXTENT_SIZE
        if size < 0 or size > limit:
            # vzdump's and the zstd CLI's archives are one frame for everything.
            raise UnindexableArchiveError("the archive is one zstd stream, not a frame per extent")
        while True:
            block = int.from_bytes(self._need(3, frame), "little")
            kind, length = block >> 1 & 3, block >> 3
            self._need(1 if kind == 1 else length, frame)
            if block & 1:
                break
        if checksum:
            self._need(4, frame)
        try:
            content = self._dctx.decompress(bytes(frame))
        except zstandard.ZstdError as exc:
            raise VmaFormatError(f"read failed - {exc}") from exc
        if len(content) != size:
            raise VmaFormatError("read failed - zstd frame content size mismatch")
        self.starts.append(self.stream_pos)
        self.offsets.append(self._file_pos)
        self.lengths.append(len(frame))
        self._file_pos += len(frame)
        self.stream_pos += len(content)
        self._content, self._pos = memoryview(content), 0
        self._progress(self._file_pos)
        return True

    def readinto(self, buffer: memoryview) -> int:
        """Fill ``buffer`` from the current frame (the next one once it is used up)."""
        while self._pos >= len(self._content):
            if not self._next_frame():
                return 0
        n = min(len(buffer), len(self._content) - self._pos)
        buffer[:n] = self._content[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        """Close the file."""
        self._raw.close()


class _PlainSource:
    """A plain archive file, reporting how far it has been read."""

    def __init__(self, raw: _Raw, progress: Callable[[int], None]) -> None:
        self._raw = raw
        self._progress = progress
        self._pos = 0

    def readinto(self, buffer: memoryview) -> int:
        n = self._raw.readinto(buffer)
        self._pos += n or 0
        return int(n or 0)

    def report(self) -> None:
        self._progress(self._pos)

    def close(self) -> None:
        self._raw.close()


def build_index(
    path: str | _Raw,
    *,
    devices: Collection[str] | None = None,
    progress: Callable[[int], None] = lambda done: None,
    vmstate: VmstateWriter | None = None,
) -> ArchiveIndex:
    """Read and check the whole archive at ``path``; index its disks.

    Args:
        path: a plain ``.vma`` or an nbdvma ``.vma.zst`` (one frame per unit), or
            such an archive as a buffered stream at its start (closed here).
        devices: the disk names to index (default: every disk); every disk is checked.
        progress: called now and then with the bytes of the file read so far (it may
            raise, to stop the pass).
        vmstate: called with each cluster of the VM state, in order (to restore it).

    Raises:
        OSError: the file cannot be read.
        VmaFormatError: the archive is damaged or incomplete (the reason, as ``verify``
            gives it).
        UnindexableArchiveError: a zstd archive framed otherwise: decompress it first
            (:func:`~nbdvma.archive_backend.decompress_into`).
    """
    # Closed by the reader (through the source), even if its construction fails.
    raw = io.BufferedReader(io.FileIO(path), _READ_CHUNK) if isinstance(path, str) else path
    source: _FrameSource | _PlainSource
    if raw.peek(4)[:4] == ZSTD_MAGIC:
        source = _FrameSource(raw, progress)
    else:
        source = _PlainSource(raw, progress)
    with VmaReader(source) as reader:  # type: ignore[arg-type]
        if isinstance(source, _FrameSource) and source.stream_pos != reader.header.header_size:
            # The first frame holds more than the header: not one frame per unit.
            raise UnindexableArchiveError("the archive is one zstd stream, not a frame per extent")
        disks = _disk_arrays(reader, devices)
        position = reader.header.header_size
        extent_starts = array("Q")
        vmstate_id = reader.vmstate_id
        for extent in reader.extents():
            extent_starts.append(position)
            block = position + VMA_EXTENT_HEADER_SIZE
            # A run of a disk's zero clusters (a sparse disk): their words stay 0.
            clusters = () if type(extent) is ZeroRun else extent
            for dev, number, mask, data in clusters:
                dev_id = dev.dev_id
                if not mask and dev_id != vmstate_id:
                    continue  # a zero cluster of a disk: its index word stays 0
                index = disks.get(dev_id)
                if index is not None and number < len(index.clusters):
                    if block > OFFSET_MASK:
                        raise UnindexableArchiveError("the archive is larger than 256 TiB")
                    index.clusters[number] = mask << OFFSET_BITS | block
                elif vmstate is not None and dev_id == vmstate_id:
                    vmstate(number, mask, data)
                block += len(data)
            position = block
            if isinstance(source, _PlainSource):
                source.report()
        digest = reader.check_digest()
        reader.check_missing()
        frames = None
        if isinstance(source, _FrameSource):
            frames = FrameTable(source.starts, source.offsets, source.lengths)
            # Each extent must be a frame of its own, or reads would need others.
            units = array("Q", [0])
            units.extend(extent_starts)
            if units != source.starts:
                raise UnindexableArchiveError("the archive's zstd frames are not one per extent")
        by_name = {index.dev.name: index for index in disks.values()}
        return ArchiveIndex(reader.header, by_name, frames, digest)


def _disk_arrays(reader: VmaReader, names: Collection[str] | None) -> dict[int, DiskIndex]:
    """An all-zero word per cluster for each disk to index, by dev_id."""
    disks = [d for d in reader.header.devices if d.dev_id <= VMA_MAX_DEVICES and not d.is_vmstate]
    if names is not None:
        known = {d.name for d in disks}
        for name in names:
            if name not in known:
                raise VmaFormatError(
                    f"no disk named {name!r} in the archive (it has: {', '.join(sorted(known))})"
                )
        disks = [d for d in disks if d.name in names]
    # array * n fills without a temporary list of n words.
    return {d.dev_id: DiskIndex(d, array("Q", [0]) * d.cluster_count) for d in disks}


#: The largest read :meth:`IndexedArchive.read_now` does: a copy of 4 MiB holds the
#: event loop well under a millisecond; a larger one (up to NBD's 32 MiB) goes to a thread.
READ_NOW_MAX = 4 << 20


class IndexedArchive:
    """Reads of an indexed archive's disks, safe from many threads at once.

    A subclass that reads the archive from elsewhere (an object in S3:
    :class:`nbdvma.s3.archive.S3IndexedArchive`) calls :meth:`_start` instead of this
    constructor and overrides :meth:`_pread_into`, :meth:`_fetch` and :meth:`close`.
    """

    #: Frames (pieces) kept in the cache, and loaded at once.
    cache_size = FRAME_CACHE
    #: Which pages of a plain archive file are in memory (None: not a local file).
    _page_cache: PageCache | None = None
    loaders = DECOMPRESSORS

    def __init__(self, path: str, index: ArchiveIndex) -> None:
        """Open ``path`` (the file ``index`` was built from) for reading."""
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._nowait = nowait_read_flags(self._fd)
        self._page_cache = PageCache.open(self._fd) if index.frames is None else None
        self._start(index)

    def _start(self, index: ArchiveIndex) -> None:
        """The state every read shares: the index, the cache of frames."""
        self.index = index
        self._cache: collections.OrderedDict[int, Piece] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[int, threading.Event] = {}
        self._decompressors = threading.BoundedSemaphore(self.loaders)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            if self._page_cache is not None:
                self._page_cache.close()
            os.close(fd)

    def read(self, disk: str, offset: int, length: int) -> bytearray:
        """``length`` bytes of ``disk`` at ``offset`` (zero blocks are not read).

        Raises:
            OSError: ``EIO`` if the file has changed (shorter) since it was indexed.
        """
        out = bytearray(length)
        view = memoryview(out)
        frames = self.index.frames
        for at, source, n in self._runs(disk, offset, length):
            if frames is None:
                self._pread_into(view[at : at + n], source)
            else:
                self._copy_frames(frames, view[at : at + n], source)
        return out

    def read_now(self, disk: str, offset: int, length: int) -> bytearray | None:
        """:meth:`read` if no byte of it has to wait for a disk, else ``None``.

        Only a plain archive: a ``.vma.zst`` read may have to decompress a frame, work
        for a thread.  ``None`` too where the file system cannot tell
        (:func:`~nbdvma.vma.fileio.nowait_read_flags`).
        """
        flags = self._nowait
        if flags is None or self.index.frames is not None or length > READ_NOW_MAX:
            return None
        out = bytearray(length)
        view = memoryview(out)
        for at, source, n in self._runs(disk, offset, length):
            if not preadv_nowait(self._fd, view[at : at + n], source, flags):
                return None
        return out

    def runs_now(self, disk: str, offset: int, length: int) -> FileRuns | None:
        """Where the stored bytes of a read lie in the archive file, if they can be
        sent from there without waiting for a disk (a plain archive whose pages are in
        memory); ``None`` otherwise."""
        cache = self._page_cache
        if cache is None:
            return None
        runs = self._runs(disk, offset, length)
        if runs:
            start, end = runs[0][1], runs[-1][1] + runs[-1][2]
            if start <= end <= start + 2 * length:
                # The span, gaps included, in one call: the gaps are other clusters
                # written just before or after (a miss only costs a worker thread).
                if not cache.cached(start, end - start):
                    return None
            elif not all(cache.cached(source, n) for _, source, n in runs):
                return None
        return FileRuns(self._fd, length, runs)

    def _runs(self, disk: str, offset: int, length: int) -> list[list[int]]:
        """``[position in the result, stream offset, length]`` of the stored bytes,
        neighbours joined (the blocks of one extent lie one after another)."""
        runs: list[list[int]] = []
        for at, source, n in self._segments(self.index.disks[disk], offset, length):
            last = runs[-1] if runs else None
            if last is not None and last[0] + last[2] == at and last[1] + last[2] == source:
                last[2] += n
            else:
                runs.append([at, source, n])
        return runs

    @staticmethod
    def _segments(index: DiskIndex, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """``(position in the result, stream offset, length)`` of the stored bytes."""
        clusters = index.clusters
        end = min(offset + length, index.dev.size)
        pos = offset
        while pos < end:
            c = pos >> CLUSTER_SHIFT
            cluster_start = c << CLUSTER_SHIFT
            stop = min(cluster_start + VMA_CLUSTER_SIZE, end)
            word = clusters[c]
            if word:
                mask, base = word >> OFFSET_BITS, word & OFFSET_MASK
                if mask == FULL_MASK:
                    yield pos - offset, base + pos - cluster_start, stop - pos
                else:
                    while pos < stop:
                        j = (pos - cluster_start) >> BLOCK_SHIFT
                        block_start = cluster_start + (j << BLOCK_SHIFT)
                        block_stop = min(block_start + VMA_BLOCK_SIZE, stop)
                        if mask >> j & 1:
                            stored = (mask & ((1 << j) - 1)).bit_count()
                            source = base + stored * VMA_BLOCK_SIZE + pos - block_start
                            yield pos - offset, source, block_stop - pos
                        pos = block_stop
            pos = stop

    def _pread_into(self, view: memoryview, offset: int) -> None:
        while len(view):
            n = os.preadv(self._fd, [view], offset)
            if n <= 0:
                raise OSError(errno.EIO, "the archive is shorter than when it was indexed")
            view, offset = view[n:], offset + n

    def _copy_frames(self, frames: FrameTable, view: memoryview, source: int) -> None:
        while len(view):
            i = frames.find(source)
            content = self._frame(frames, i)
            inside = source - frames.starts[i]
            piece = content[inside : inside + len(view)]
            if not piece:
                raise OSError(errno.EIO, "the archive changed since it was indexed")
            view[: len(piece)] = piece
            view, source = view[len(piece) :], source + len(piece)

    def _frame(self, frames: FrameTable, i: int) -> Piece:
        """The content of frame ``i``, from the cache or decompressed now."""

        def load() -> Piece:
            data = self._fetch(frames.offsets[i], frames.lengths[i])
            try:
                return zstandard.ZstdDecompressor().decompress(data)
            except zstandard.ZstdError as exc:
                why = f"the archive changed since it was indexed: {exc}"
                raise OSError(errno.EIO, why) from exc

        return self._cached(i, load)

    def _fetch(self, offset: int, length: int) -> Piece:
        """``length`` bytes of the archive's file at ``offset`` (a frame)."""
        return os.pread(self._fd, length, offset)

    def _cached(self, key: int, load: Callable[[], Piece]) -> Piece:
        """Piece ``key`` (a frame) from the cache, or ``load()`` now.

        Reads that need the same piece wait for one load of it, and at most
        :attr:`loaders` run at once: with 64 reads in flight (nbdcopy) memory
        stays at the cache plus a few pieces, not a piece per reading thread.
        """
        while True:
            with self._lock:
                content = self._cache.get(key)
                if content is not None:
                    self._cache.move_to_end(key)
                    return content
                loading = self._loading.get(key)
                if loading is None:
                    loading = self._loading[key] = threading.Event()
                    break
            loading.wait()  # then take it from the cache (or load it, if evicted)
        try:
            with self._decompressors:
                content = load()
            with self._lock:
                self._cache[key] = content
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return content
        finally:
            with self._lock:
                del self._loading[key]
            loading.set()

    def block_status(
        self, disk: str, offset: int, length: int, *, max_runs: int = STATUS_RUNS
    ) -> list[tuple[int, bool]]:
        """``(length, is zero)`` runs from ``offset``: zero clusters and 4 KiB blocks
        are holes.  At most :data:`STATUS_CLUSTERS` clusters are looked at and at most
        ``max_runs`` runs returned, each whole; the runs may cover less than ``length``
        (the client asks again for the rest).

        Why the bound on runs: ``qemu-img convert`` asks with ``NBD_CMD_FLAG_REQ_ONE``
        from the end of each extent to the end of the disk, and keeps one run of each
        answer; walking a whole window for each would make a restore quadratic.
        """
        index = self.index.disks[disk]
        return block_runs(index.clusters, index.dev.size, offset, length, max_runs)
