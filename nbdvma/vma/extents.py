"""The writer's output side: the header, the extent being filled, the extents written.

:class:`Extents` is what :class:`~nbdvma.vma.writer.VmaWriter` hands complete
clusters to.  It writes the header before the first extent, collects up to 58
clusters (as the C writer does) and writes them as one extent, after which each
cluster is STORED and immutable; it answers where a cluster's bytes are now, waiting
in the current extent or read back from the sink.

Write-behind (``defer``, for a server): a full extent is *sealed* instead of written
while fewer than :data:`SEALED_MAX` sealed ones wait, so that filling it does no I/O;
the caller then writes them with :meth:`Extents.write_sealed` in a worker thread while
clusters keep coming into the next one (the caller sees to it that nothing else uses
the sink meanwhile).  A sealed extent whose write failed stays sealed, its clusters
PENDING, and is written again first by the next :meth:`~Extents.write_sealed` or
:meth:`~Extents.flush`: nothing accepted is lost.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from nbdvma.errors import VmaWriterError
from nbdvma.vma.clusters import STORED, Device, Slot, expand
from nbdvma.vma.format import (
    VMA_BLOCK_SIZE,
    VMA_CLUSTER_SIZE,
    VMA_EXTENT_HEADER_SIZE,
    WRITER_CLUSTERS_PER_EXTENT,
    ExtentHeader,
    encode_extent_header,
)
from nbdvma.vma.sink import Buffer, Sink

__all__ = ["SEALED_MAX", "ZERO_CLUSTER_CRC", "Extents"]

#: Extents sealed and not yet written, at most (write-behind): a few MiB each.  More
#: than one, so that clusters keep coming while the sink is slower for a moment.
SEALED_MAX = 4

_Index = dict[tuple[int, int], Slot]

#: The CRC-32 of a cluster of zeros: what a stored zero cluster is checked against
#: when it cannot be read back (a stream, an upload).
ZERO_CLUSTER_CRC = zlib.crc32(bytes(VMA_CLUSTER_SIZE))


class Extents:
    """Clusters in, extents out to ``sink``, the header written first.

    Args:
        sink: where the archive goes.
        uuid: the archive uuid, repeated in every extent header.
        build_header: the header's bytes, asked for once, before the first unit.
    """

    def __init__(
        self, sink: Sink, uuid: bytes, build_header: Callable[[], bytes], *, defer: bool = False
    ) -> None:
        self.sink = sink
        self.uuid = uuid
        self._build_header = build_header
        self.defer = defer
        #: The header as written, once it is.
        self.header: bytes | None = None
        self.pending: list[Slot] = []
        self._index: _Index = {}
        #: Full extents sealed and not yet written, oldest first, each with its index.
        self.sealed: list[tuple[list[Slot], _Index]] = []

    def write_header(self) -> None:
        """Write the header unless it is written already."""
        if self.header is None:
            header = self._build_header()
            self.sink.write_header(header)
            self.header = header

    def queue(self, slot: Slot) -> None:
        """Add a cluster to the current extent, writing the extent out when it is full."""
        # Flush *before* adding, as the C writer does: if that fails, the new cluster
        # is not taken and the caller's request fails as a whole.
        if len(self.pending) >= WRITER_CLUSTERS_PER_EXTENT:
            if self.defer and len(self.sealed) < SEALED_MAX:
                self.sealed.append((self.pending, self._index))
                self.pending = []
                self._index = {}
            else:
                self.flush()
        self.pending.append(slot)
        self._index[(slot.dev.dev_id, slot.cluster)] = slot

    def may_write(self, clusters: int, *, now: bool = False) -> bool:
        """Whether queueing ``clusters`` more fills the current extent (then written, or
        sealed); with ``now``, whether :meth:`queue` then writes to the sink itself."""
        room = WRITER_CLUSTERS_PER_EXTENT - len(self.pending)
        if now and self.defer:  # full extents are only sealed, up to SEALED_MAX
            room += WRITER_CLUSTERS_PER_EXTENT * (SEALED_MAX - len(self.sealed))
        return clusters > room  # a full extent goes when one more cluster comes

    def write_sealed(self) -> None:
        """Write the sealed extents, oldest first; each one's clusters become STORED."""
        while self.sealed:
            slots, _ = self.sealed[0]
            self._write(slots)
            self.sealed.pop(0)

    def flush(self) -> None:
        """Write the sealed extents, then the clusters waiting (if any) as one extent;
        they become STORED.  On failure the clusters waiting stay where they were."""
        self.write_sealed()
        if self.pending:
            self._write(self.pending)
            self.pending = []
            self._index = {}

    def _write(self, slots: list[Slot]) -> None:
        """Write ``slots`` as one extent (the header first, once)."""
        self.write_header()
        # BlockInfo.pack, inline: a finish queues a slot per zero cluster (a million
        # for a sparse 64 GiB disk), and a record per slot cost a fifth of the time.
        infos = [s.mask << 48 | s.dev.dev_id << 32 | s.cluster for s in slots]
        count = sum(s.mask.bit_count() for s in slots)
        parts: list[Buffer] = [encode_extent_header(self.uuid, count, infos)]
        for s in slots:
            parts.extend(s.blocks)
        index = self.sink.append(parts)
        readable = self.sink.readable
        # The reference before the state: a reader on another thread that finds a
        # cluster STORED (write-behind) finds where it is stored too.
        for s in slots:
            if readable:
                s.dev.ref[s.cluster] = index
            elif not s.mask:
                # A zero cluster: a finish queues one per cluster never written (a
                # million for a sparse 64 GiB disk); 64 KiB of zeros each took 27 s.
                s.dev.ref[s.cluster] = ZERO_CLUSTER_CRC
            else:
                s.dev.ref[s.cluster] = zlib.crc32(slot_bytes(s))
            s.dev.state[s.cluster] = STORED

    def write_empty(self) -> None:
        """Write the header and one extent of no cluster (an archive of no device)."""
        self.write_header()
        self.sink.append([encode_extent_header(self.uuid, 0, [])])

    def holds(self, buffer: object) -> bool:
        """Whether a cluster waiting in the current extent is a view of ``buffer``."""
        batches = [self.pending, *(slots for slots, _ in self.sealed.copy())]
        return any(b.obj is buffer for slots in batches for s in slots for b in s.blocks)

    def cluster_bytes(self, dev: Device, cluster: int) -> bytes:
        """The 64 KiB of a PENDING or STORED cluster: from its extent still in memory,
        else read back from the sink (a write-behind in another thread may have stored
        a PENDING one meanwhile: its reference is set before its state).

        Raises:
            VmaWriterError: the sink is a stream, or the extent lacks the cluster.
        """
        key = (dev.dev_id, cluster)
        # A copy of the sealed list (one step for the interpreter): write_sealed may pop
        # its first extent in another thread meanwhile, and iterating the list itself
        # would then skip the next one, whose clusters are PENDING and not in the sink.
        for waiting in (self._index, *(index for _, index in self.sealed.copy())):
            slot = waiting.get(key)
            if slot is not None:
                return slot_bytes(slot)
        if not self.sink.readable:
            raise VmaWriterError(
                f"{dev.name}: cluster {cluster} went to a stream and cannot be read back"
            )
        index = dev.ref[cluster]
        head = ExtentHeader.from_bytes_untrusted(
            self.sink.read_unit(index, 0, VMA_EXTENT_HEADER_SIZE), self.uuid
        )
        offset = VMA_EXTENT_HEADER_SIZE
        for info in head.slots:
            nblocks = info.mask.bit_count()
            if info.dev_id == dev.dev_id and info.cluster == cluster:
                data = self.sink.read_unit(index, offset, nblocks * VMA_BLOCK_SIZE)
                return expand(info.mask, data)
            offset += nblocks * VMA_BLOCK_SIZE
        raise VmaWriterError(f"{dev.name}: cluster {cluster} is missing from its extent")


def slot_bytes(slot: Slot) -> bytes:
    """The 64 KiB of a cluster waiting in an extent."""
    return expand(slot.mask, b"".join(slot.blocks))
