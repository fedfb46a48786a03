"""Streaming VMA reader: the checks of Proxmox's ``vma-reader.c``, in its order.

Theory of operation
-------------------
An archive is read strictly front to back, without seeking, so the source can be a
pipe, stdin or a zstd decompression stream (:func:`~nbdvma.vma.sources.open_source`).

1. :class:`VmaReader` reads the header region and applies H1-H9 (format doc §7) via
   :func:`~nbdvma.vma.format.header_size_untrusted` and
   :meth:`~nbdvma.vma.format.VmaHeader.from_bytes_untrusted`.
2. :meth:`VmaReader.extents` reads one extent at a time into a reused buffer of
   ``VMA_MAX_EXTENT_SIZE`` bytes (so memory stays bounded by one extent, or by a few
   when the consumer asks for more buffers to write in the background), applies
   S2-S6 to its header and S7-S13 to its blockinfo slots in slot order, and only then
   yields the extent's clusters: a consumer never sees a cluster of an extent that
   fails a check.  The cluster data are memoryview slices of that buffer, valid until
   the buffer's turn comes again.
3. :meth:`VmaReader.check_missing` is S15 (``vma extract`` only) and is called by the
   consumer after the last extent.
4. :meth:`VmaReader.check_digest`, also called after the last extent, compares the
   extents with the data digest that nbdvma records in the header
   (:mod:`nbdvma.vma.digest`); :meth:`VmaReader.extents` hashes them as it reads them
   when the header has one.  Proxmox's reader has no such check: VMA checks no data.

Duplicate and missing clusters are tracked in one bitmap per disk, with the bounds of
the C reader's bitmap (S8), allocated as clusters occur
(:class:`~nbdvma.vma.bitmap.SeenClusters`).
Where the real tool aborts on an assertion (S7 under ``verify``, S8), we raise a
:class:`~nbdvma.errors.VmaFormatError` with a clear message instead.

The reader accepts what the real one accepts, including data stored past a disk's
end (a ``0xffff`` mask on a partial last cluster, or a ``mask == 0`` cluster past the
last one but inside the bitmap); such clusters are counted in
:attr:`ReadStats.past_end` so that a stricter tool can report or reject them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import BinaryIO, NamedTuple, overload

import attrs
import zstandard

from nbdvma.errors import DataDigestError, VmaFormatError
from nbdvma.vma.background import BackgroundWriter, ThreadGuard
from nbdvma.vma.bitmap import SeenClusters
from nbdvma.vma.digest import DIGEST_CONFIG, DataDigest, StreamHasher, parse_digest_untrusted
from nbdvma.vma.format import (
    FULL_MASK,
    VMA_BLOCK_SIZE,
    VMA_CLUSTER_SIZE,
    VMA_EXTENT_HEADER_SIZE,
    VMA_HEADER_SIZE,
    VMA_MAGIC,
    VMA_MAX_DEVICES,
    VMA_MAX_EXTENT_SIZE,
    DeviceInfo,
    ExtentHeader,
    VmaHeader,
    header_size_untrusted,
)
from nbdvma.vma.sources import open_source

__all__ = ["Cluster", "ReadStats", "VmaReader", "ZeroRun"]

_SECTOR = 512
_HEADER_READ_CHUNK = 1 << 20
#: The data of a zero cluster (mask 0): no blocks, one shared empty view.
_NO_DATA = memoryview(b"")


class Cluster(NamedTuple):
    """One stored cluster, as :meth:`VmaReader.clusters` yields it."""

    #: The device (a disk, or the vmstate stream).
    dev: DeviceInfo
    #: Cluster index within the device (byte offset ``cluster * 65536``).
    cluster: int
    #: Bit ``j`` set: 4 KiB block ``j`` is stored; unset: a zero block.
    mask: int
    #: The stored blocks, in bit order (``popcount(mask) * 4096`` bytes); a view into
    #: the reader's extent buffer, valid until that buffer is read into again.
    data: memoryview


class ZeroRun(Sequence[Cluster]):
    """An extent of consecutive zero clusters of one disk (a sparse disk's empty
    stretch, checked at once): its :class:`Cluster` records made only when asked."""

    __slots__ = ("dev", "first", "stop")

    def __init__(self, dev: DeviceInfo, first: int, stop: int) -> None:
        self.dev, self.first, self.stop = dev, first, stop

    def __len__(self) -> int:
        return self.stop - self.first

    @overload
    def __getitem__(self, i: int) -> Cluster: ...
    @overload
    def __getitem__(self, i: slice) -> list[Cluster]: ...
    def __getitem__(self, i: int | slice) -> Cluster | list[Cluster]:
        clusters = range(self.first, self.stop)[i]
        if isinstance(clusters, int):
            return tuple.__new__(Cluster, (self.dev, clusters, 0, _NO_DATA))
        return [tuple.__new__(Cluster, (self.dev, c, 0, _NO_DATA)) for c in clusters]

    def __iter__(self) -> Iterator[Cluster]:
        dev, new = self.dev, tuple.__new__
        return (new(Cluster, (dev, c, 0, _NO_DATA)) for c in range(self.first, self.stop))


@attrs.define
class ReadStats:
    """Counters of what has been read so far (for ``verify -v`` and careful tools)."""

    #: Clusters read (all devices, vmstate included).
    clusters_read: int = 0
    #: Bytes in clusters stored with mask 0 (whole zero clusters).
    zero_cluster_bytes: int = 0
    #: Bytes of zero blocks inside partially stored clusters.
    partial_zero_bytes: int = 0
    #: Stored data bytes (4 KiB blocks with their mask bit set).
    stored_bytes: int = 0
    #: Extents read.
    extents: int = 0
    #: Per dev_id: clusters that store blocks at or past the disk's end, or lie
    #: wholly past it (accepted by the real reader, never written by the C writer).
    past_end: dict[int, int] = attrs.Factory(dict)


# Extents smaller than this are hashed in the reading thread (see VmaReader._hash).
_HASH_BEHIND_MIN = 256 * 1024
# Bytes of extents queued for hashing at most (the buffers bound them already).
_HASH_IN_FLIGHT = 64 << 20


def _read_into(source: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``source`` until it is full or EOF; return the bytes read."""
    total = 0
    end = len(view)
    try:
        while total < end:
            n = source.readinto(view[total:])  # type: ignore[attr-defined]
            if not n:
                break
            total += n
    except (OSError, zstandard.ZstdError, EOFError) as exc:  # EOFError: a cut gzip stream
        raise VmaFormatError(f"read failed - {exc}") from exc
    return total


class VmaReader:
    """A streaming reader of one archive, and the owner of its source.

    Construction reads and checks the header; iterate :meth:`clusters` (or
    :meth:`extents`) once to read and check the rest.  :meth:`close` (or the end of
    a ``with`` block) closes the source; so does a construction that fails.

    Args:
        source: a binary stream positioned at the archive start (see
            :func:`~nbdvma.vma.sources.open_source`, or :meth:`open`); the reader never
            seeks in it.
        skip: dev_ids whose clusters are not tracked for duplicates or missing
            clusters (``extract -d``); all other checks still apply to them.
        thread_guard: what the thread that hashes the extents is started inside
            (see :class:`~nbdvma.vma.background.BackgroundWriter`).

    Raises:
        VmaFormatError: H1-H9, with the real tool's message.
    """

    def __init__(
        self,
        source: BinaryIO,
        *,
        skip: Collection[int] = (),
        thread_guard: ThreadGuard = contextlib.nullcontext,
    ) -> None:
        self._source = source
        try:
            self.header: VmaHeader = self._read_header()
        except BaseException:
            source.close()
            raise
        self.stats = ReadStats()
        vmstate = self.header.vmstate
        #: dev_id of the vmstate stream (the last device named ``vmstate``), or 0.
        self.vmstate_id = vmstate.dev_id if vmstate is not None else 0
        self._vmstate_next = 0
        self._devices: dict[int, DeviceInfo] = {d.dev_id: d for d in self.header.devices}
        # Disks with reader state: present, ids 1..254, not named "vmstate" (the C
        # reader sets up only these; a cluster of any other non-vmstate id is S7).
        self._tracked: dict[int, SeenClusters | None] = {
            d.dev_id: None if d.dev_id in skip else SeenClusters(d.size)
            for d in self.header.devices
            if d.dev_id <= VMA_MAX_DEVICES and not d.is_vmstate
        }
        self._bufs = [bytearray(VMA_MAX_EXTENT_SIZE)]
        self._done = False
        # The extents are hashed only where there is a digest to compare them with.
        self._digest_record = self.header.config(DIGEST_CONFIG)
        self._hasher = StreamHasher() if self._digest_record is not None else None
        # The hash of each extent runs in one helper thread while the next extents are
        # read and checked (both release the GIL: on two cores an index pass or a
        # verify takes the longer of the two, not their sum).  A buffer is read into
        # again only once its extent is hashed (release).
        self._hash_worker = BackgroundWriter(
            max_bytes=_HASH_IN_FLIGHT, name="vma-hash", thread_guard=thread_guard
        )

    @classmethod
    def open(cls, path: str, *, skip: Collection[int] = ()) -> VmaReader:
        """Open ``path`` (``-`` for stdin, zstd recognised; see
        :func:`~nbdvma.vma.sources.open_source`)
        and read its header.

        Raises:
            OSError: the file cannot be opened.
            VmaFormatError: H1-H9.
        """
        return cls(open_source(path), skip=skip)

    def __enter__(self) -> VmaReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read_header(self) -> VmaHeader:
        fixed = bytearray(VMA_HEADER_SIZE)
        got = _read_into(self._source, memoryview(fixed))
        if got < VMA_HEADER_SIZE and fixed[: min(got, 4)] != VMA_MAGIC[:got]:
            # A short file that is not even a VMA prefix: say so rather than H1.
            raise VmaFormatError("not a vma file - wrong magic number")
        header_size = header_size_untrusted(bytes(fixed[:got]))
        head = fixed
        # Read the rest in chunks so a lying header_size (up to 2 GiB) costs memory
        # only for bytes that are really there.
        while len(head) < header_size:
            chunk = bytearray(min(_HEADER_READ_CHUNK, header_size - len(head)))
            n = _read_into(self._source, memoryview(chunk))
            head += chunk[:n]
            if n < len(chunk):
                break
        return VmaHeader.from_bytes_untrusted(bytes(head))

    def skip_devices(self, dev_ids: Iterable[int]) -> None:
        """Stop tracking these disks for duplicate and missing clusters (``-d``).

        Call before reading extents; all other checks still apply to them.
        """
        for dev_id in dev_ids:
            if dev_id in self._tracked:
                self._tracked[dev_id] = None

    def device(self, dev_id: int) -> DeviceInfo | None:
        """The present device with this id (1..255), or ``None``."""
        return self._devices.get(dev_id)

    def extents(
        self, *, buffers: int = 1, reuse: Callable[[bytearray], object] | None = None
    ) -> Iterator[Sequence[Cluster]]:
        """Read, check and yield the remaining extents, each as its list of clusters.

        The clusters' data views are valid until the next extent is requested, or
        with ``buffers=N``, until N more have been: extents are read into N buffers
        in turn, so that a consumer can still be writing out one extent while the
        next is read.  ``reuse(buffer)`` is called before a buffer is filled again
        (a consumer that writes in the background waits there for its writes).

        Raises:
            VmaFormatError: S1-S13, with the real tool's message (or a clear one where
                it would crash).
        """
        if self._done:
            return
        if self._hasher is not None:
            buffers = max(buffers, 2)  # one hashed behind, one read
        while len(self._bufs) < buffers:
            self._bufs.append(bytearray(VMA_MAX_EXTENT_SIZE))
        turn = 0
        while True:
            raw = self._bufs[turn]
            turn = (turn + 1) % buffers
            self._hash_worker.release(raw)
            if reuse is not None:
                reuse(raw)
            buf = memoryview(raw)
            got = _read_into(self._source, buf[:VMA_EXTENT_HEADER_SIZE])
            if got == 0:
                break
            ehead = ExtentHeader.from_bytes_untrusted(buf[:got], self.header.uuid)
            payload = ehead.block_count * VMA_BLOCK_SIZE
            extent_size = VMA_EXTENT_HEADER_SIZE + payload
            # The C reader's buffer holds at most VMA_MAX_EXTENT_SIZE bytes: a larger
            # block_count can never be satisfied and reports what fits (S6).
            want = min(extent_size, VMA_MAX_EXTENT_SIZE)
            got += _read_into(self._source, buf[VMA_EXTENT_HEADER_SIZE:want])
            if got < extent_size:
                raise VmaFormatError(f"short vma extent ({got} < {extent_size})")
            clusters = self._check_extent(ehead, buf, extent_size)
            if self._hasher is not None:
                self._hash(buf[:extent_size])
            self.stats.extents += 1
            yield clusters
        self._done = True

    def clusters(self) -> Iterator[Cluster]:
        """Like :meth:`extents`, one cluster at a time.

        Raises:
            VmaFormatError: as :meth:`extents`.
        """
        for extent in self.extents():
            yield from extent

    def _check_extent(
        self, ehead: ExtentHeader, buf: memoryview, extent_size: int
    ) -> Sequence[Cluster]:
        """S7-S13 for every used slot, in slot order (reader:543-712).

        This runs once per cluster of the archive (1.6 million for a 100 GiB disk,
        mostly whole zero clusters), so it keeps its state in locals and gives the
        common cases, a full or an empty mask well inside the disk, the fewest steps.
        """
        if extent_size == VMA_EXTENT_HEADER_SIZE:
            run = self._zero_run(ehead)
            if run is not None:
                return run
        start = VMA_EXTENT_HEADER_SIZE
        out: list[Cluster] = []
        append = out.append
        vmstate_id = self.vmstate_id
        devices = self._devices
        zero_clusters = stored_blocks = 0
        new = tuple.__new__
        tracked = self._tracked
        end_byte: int | None
        for dev_id, cluster, mask in ehead.triples:
            if dev_id == vmstate_id:
                dev = devices[dev_id]
                if cluster != self._vmstate_next:  # S10
                    raise VmaFormatError("found out of order vmstate data")
                self._vmstate_next += 1
                end_byte = None  # no size bound for vmstate
            else:  # S7-S9, inline: this runs once per cluster of a disk
                if dev_id not in tracked:  # S7
                    raise VmaFormatError(f"got wrong dev id {dev_id}")
                bitmap = tracked[dev_id]
                dev = devices[dev_id]
                if bitmap is not None:
                    if cluster >= bitmap.limit:  # S8: an assertion in the C reader
                        raise VmaFormatError(
                            f"cluster {cluster} out of range for stream {dev.name}"
                        )
                    if bitmap.test_and_set(cluster):  # S9
                        raise VmaFormatError(
                            f"found duplicated cluster {cluster} for stream {dev.name}"
                        )
                end_byte = dev.size // _SECTOR * _SECTOR  # max_sector, in bytes
            base = cluster * VMA_CLUSTER_SIZE
            if mask:
                nblocks = 16 if mask == FULL_MASK else mask.bit_count()
                stop = start + nblocks * VMA_BLOCK_SIZE
                if stop > extent_size or (
                    end_byte is not None and base + VMA_CLUSTER_SIZE > end_byte
                ):
                    self._check_edge(mask, base, (extent_size - start) // VMA_BLOCK_SIZE, end_byte)
                stored_blocks += nblocks
            else:
                zero_clusters += 1  # stores nothing: S11/S12 cannot apply
                stop = start
            if (
                end_byte is not None
                and base + VMA_CLUSTER_SIZE > dev.size
                and self._past_end(dev, cluster, mask, buf, start)
            ):
                past_end = self.stats.past_end
                past_end[dev_id] = past_end.get(dev_id, 0) + 1
            # tuple.__new__: a named tuple's own __new__ is a Python-level call.
            data = buf[start:stop] if mask else _NO_DATA
            append(new(Cluster, (dev, cluster, mask, data)))
            start = stop
        if start != extent_size:  # S13
            raise VmaFormatError("vma extent error - missing blocks")
        self._count(len(out), zero_clusters, stored_blocks)
        return out

    def _zero_run(self, ehead: ExtentHeader) -> ZeroRun | None:
        """An extent that stores nothing, of consecutive new clusters of one tracked
        disk inside its size (how a sparse disk's empty stretches come), checked at
        once: S7-S13 all pass.  ``None``: anything else, for the slot by slot checks
        (which report the errors)."""
        run = ehead.zero_run()
        if run is None:
            return None
        dev_id, first, count = run
        bitmap = self._tracked.get(dev_id)
        if (
            bitmap is None
            # (Whole clusters inside the disk lie inside the bitmap too: S8 passes.)
            or (first + count) * VMA_CLUSTER_SIZE > self._devices[dev_id].size
            or not bitmap.mark_run(first, count)
        ):
            return None
        self._count(count, count, 0)
        return ZeroRun(self._devices[dev_id], first, first + count)

    def _count(self, clusters: int, zero_clusters: int, stored_blocks: int) -> None:
        """Add an extent's clusters to :attr:`stats`."""
        stats = self.stats
        stats.clusters_read += clusters
        stats.zero_cluster_bytes += zero_clusters * VMA_CLUSTER_SIZE
        stats.stored_bytes += stored_blocks * VMA_BLOCK_SIZE
        stats.partial_zero_bytes += (
            (clusters - zero_clusters) * 16 - stored_blocks
        ) * VMA_BLOCK_SIZE

    @staticmethod
    def _check_edge(mask: int, base: int, room: int, end_byte: int | None) -> None:
        """S11/S12 in the C reader's order, for a cluster near a limit."""
        if mask == FULL_MASK:
            if room < 16:  # S11
                raise VmaFormatError("short vma extent - too many blocks")
            if end_byte is not None and base >= end_byte:  # S12
                raise VmaFormatError("got wrong block address - write beyond end")
            return
        for j in range(16):
            if not mask >> j & 1:
                continue
            if room <= 0:  # S11
                raise VmaFormatError("short vma extent - too many blocks")
            if end_byte is not None and base + j * VMA_BLOCK_SIZE >= end_byte:  # S12
                raise VmaFormatError("got wrong block address - write beyond end")
            room -= 1

    @staticmethod
    def _past_end(dev: DeviceInfo, cluster: int, mask: int, buf: memoryview, start: int) -> bool:
        """Whether a disk cluster that reaches past ``dev.size`` stores anything there
        but zeros (the caller has checked that it reaches past)."""
        base = cluster * VMA_CLUSTER_SIZE
        if base >= dev.size:
            return True  # a (mask 0) cluster wholly past the end
        if mask != FULL_MASK:
            # S12 let through only set bits of blocks starting before the last full
            # sector; the one crossing the end must be zero past it.
            last = (dev.size - base - 1) // VMA_BLOCK_SIZE
            if not mask >> last & 1:
                return False
            index = (mask & ((1 << last) - 1)).bit_count()
            tail_start = start + index * VMA_BLOCK_SIZE + (dev.size - base - last * VMA_BLOCK_SIZE)
            tail_end = start + (index + 1) * VMA_BLOCK_SIZE
        else:
            if base + VMA_CLUSTER_SIZE - dev.size >= VMA_BLOCK_SIZE:
                return True  # stores a whole block past the end
            tail_start = start + (dev.size - base)
            tail_end = start + VMA_CLUSTER_SIZE
        tail = buf[tail_start:tail_end]
        return tail != bytes(len(tail))

    def check_missing(self, devices: Iterable[DeviceInfo] | None = None) -> None:
        """S15: every cluster of each disk must have appeared (``vma extract``).

        Call after the last extent.

        Args:
            devices: the disks to check (default: every tracked disk); the vmstate
                stream and skipped disks are never checked.

        Raises:
            VmaFormatError: ``detected missing cluster N for stream NAME``.
        """
        if devices is None:
            devices = [self._devices[i] for i in self._tracked]
        for dev in devices:
            bitmap = self._tracked.get(dev.dev_id)
            if bitmap is None:
                continue
            missing = bitmap.first_missing(dev.cluster_count)
            if missing is not None:
                raise VmaFormatError(f"detected missing cluster {missing} for stream {dev.name}")

    def check_digest(self) -> DataDigest | None:
        """Compare the extents read with the data digest of the header.

        Call after the last extent.

        Returns:
            The digest the header records, which the extents match; ``None`` for an
            archive that has none (not written by nbdvma, or written to a stream):
            then nothing checked the extents' data.

        Raises:
            DataDigestError: the extents differ from the digest (a changed byte, a cut
                or extended archive), the archive was never finished (the digest is
                still the placeholder), or the record is not one nbdvma writes.
        """
        if self._digest_record is None or self._hasher is None:
            return None
        self._hash_worker.drain()
        expected = parse_digest_untrusted(self._digest_record)
        if expected is None:
            raise DataDigestError(
                "the archive is incomplete: nbdvma did not finish it (its data digest is "
                "still the placeholder written at the start)"
            )
        actual = self._hasher.result()
        if actual.length != expected.length:
            raise DataDigestError(
                f"data length mismatch: the extents are {actual.length} bytes, the header "
                f"records {expected.length} (the archive was cut or extended after it was "
                "written)"
            )
        if actual.hexdigest != expected.hexdigest:
            raise DataDigestError(
                f"data digest mismatch: the extents hash to {actual.hexdigest}, the header "
                f"records {expected.hexdigest} (the archive was changed after it was written)"
            )
        return expected

    def _hash(self, view: memoryview) -> None:
        """Hash an extent: in the helper thread, or here if it is small and nothing is
        being hashed behind (which keeps the order).  A small extent (zero clusters'
        headers: a sparse disk's archive is mostly those) costs more to hand over than
        to hash."""
        assert self._hasher is not None
        if len(view) < _HASH_BEHIND_MIN and self._hash_worker.idle:
            self._hasher.update((view,))
        else:
            job = functools.partial(self._hasher.update, (view,))
            self._hash_worker.submit(job, (view,), len(view))

    def close(self) -> None:
        """Close the source and drop the extent buffers.  Idempotent."""
        self._hash_worker.close()
        self._bufs = []
        self._done = True
        self._source.close()
