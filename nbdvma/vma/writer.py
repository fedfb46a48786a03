"""The VMA archive writer: random-access writes in, Proxmox-valid extents out.

Theory of operation
-------------------
NBD clients write whatever they like, whenever they like; Proxmox's reader wants every
64 KiB cluster of every disk exactly once (``shared/docs/writer-invariants.md``).  The
writer bridges the two with one small state per cluster (a ``bytearray`` per device,
one byte a cluster, plus a 4-byte reference for stored clusters):

``UNTOUCHED``
    never written; emitted as a zero cluster (mask 0, no data) at :meth:`finish`.
``PARTIAL``
    some bytes written; the cluster is assembled in a 64 KiB buffer (bounded in total
    by ``max_partial_bytes``) with the byte ranges covered so far.
``ZERO``
    wholly written, and all zero.  Nothing is stored until :meth:`finish` emits it as a
    mask-0 slot, so a later data write (a client that zeroes first, writes after) is
    still honoured.
``PENDING``
    complete with data; waiting in the current extent (at most 58 clusters, as the C
    writer does).
``STORED``
    in an extent on the sink.  Immutable from now on: an identical rewrite (a client
    replaying after a reconnect) is a no-op, a differing one fails with
    :class:`~nbdvma.errors.ClusterConflictError`.  The reference is the extent's index
    on a readable sink (to read the bytes back) or a CRC-32 of the cluster on a stream.

Zero detection is per 4 KiB block against a zero buffer (memcmp speed); blocks at or
past the device end are always zero-marked, as the C writer has done since 2020.

The VM state is a *stream* (:class:`~nbdvma.vma.clusters.VmState`, which says why its
clusters are stored whole): appends of any size, packed into clusters in order (the
reader demands 0, 1, 2, ...), the tail padded at finish.  Its size in the header is a
hint until finish, which rewrites it with the true length when the sink allows it.

Data digest: where the header can be rewritten (a file), a config blob holds a BLAKE3
digest of the extents, patched in at :meth:`finish` (:mod:`nbdvma.vma.digest`).

FLUSH: whole clusters go out as a (short) extent, partly written ones to the side
journal ``ARCHIVE.part.journal`` (format: :mod:`nbdvma.vma.journal`).

Failures: a unit that fails to reach the sink is cut off by the sink and the clusters
stay pending, so the request that hit the error fails and a retry can succeed.
"""

from __future__ import annotations

import time
import uuid as uuidlib
import zlib

from nbdvma.errors import ClusterConflictError, PartialBufferFullError, VmaWriterError
from nbdvma.vma.clusters import (
    PARTIAL,
    PENDING,
    STORED,
    UNTOUCHED,
    ZERO,
    ZERO_CLUSTER,
    DeviceProgress,
    Disk,
    Partial,
    Slot,
    VmState,
    empty_runs,
    mask_and_blocks,
    retained,
)
from nbdvma.vma.extents import Extents
from nbdvma.vma.format import (
    FULL_MASK,
    VMA_CLUSTER_SIZE,
    VMA_VMSTATE_NAME,
)
from nbdvma.vma.journal import encode_journal
from nbdvma.vma.registry import Registry
from nbdvma.vma.sink import Buffer, Sink

__all__ = ["DeviceProgress", "VmaWriter"]


class VmaWriter:
    """Writes one VMA archive to a :class:`~nbdvma.vma.sink.Sink`.

    Register configs and devices, then write in any order; :meth:`finish` completes
    the archive.  Not thread-safe: the caller serialises calls.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        uuid: bytes | None = None,
        ctime: int | None = None,
        max_partial_bytes: int = 64 * 1024 * 1024,
        write_behind: bool = False,
    ) -> None:
        """Create a writer.

        Args:
            sink: where the archive goes (see :func:`nbdvma.vma.sink.open_sink`).
            uuid: the archive uuid (16 bytes); random by default.
            ctime: the header's creation time; by default the time the header is written.
            max_partial_bytes: bound on the memory of clusters being assembled.
            write_behind: seal a full extent for :meth:`write_sealed` (:mod:`~.extents`).
        """
        self._sink = sink
        self.uuid = uuid if uuid is not None else uuidlib.uuid4().bytes
        if len(self.uuid) != 16:
            raise VmaWriterError("the uuid must be 16 bytes")
        self._ctime = ctime
        self._max_partial = max(VMA_CLUSTER_SIZE, max_partial_bytes)
        # A digest only where finish can patch it in: a stream's header is written
        # once, and must not carry a digest that never comes.
        self._registry = Registry(with_digest=sink.seekable)
        self._extents = Extents(sink, self.uuid, self._build_header, defer=write_behind)
        self._partial_bytes = 0
        self._state = "open"  # open -> finished | aborted
        self._patched = b""  # the final header, once it is in place
        self._started = False  # a write came: the header's contents are fixed

    # -- registration ---------------------------------------------------------------

    def add_config(self, name: str, data: bytes) -> None:
        """Store a config blob (``qemu-server.conf``...) under ``basename(name)``.

        Raises:
            VmaWriterError: after the first data, or as :meth:`.Registry.add_config`.
        """
        self._check_registration()
        self._registry.add_config(name, data)

    def add_device(self, name: str, size: int) -> int:
        """Register a disk of ``size`` bytes; return its dev id (1..254).

        Raises:
            VmaWriterError: after the first data, or as :meth:`.Registry.add_device`.
        """
        self._check_registration()
        return self._registry.add_device(name, size).dev_id

    def add_stream(self, name: str = VMA_VMSTATE_NAME, size_hint: int = VMA_CLUSTER_SIZE) -> int:
        """Register a sequential stream (the VM state); return its dev id.

        The header carries ``size_hint`` until :meth:`finish` can rewrite it with the
        true length (regular-file sinks).

        Raises:
            VmaWriterError: after the first data, or as :meth:`.Registry.add_stream`.
        """
        self._check_registration()
        return self._registry.add_stream(name, size_hint).dev_id

    def _check_registration(self) -> None:
        self._check_open()
        if self._started:
            raise VmaWriterError("devices and configs must be registered before the first write")

    def _check_open(self) -> None:
        if self._state != "open":
            raise VmaWriterError(f"the archive writer is {self._state}")

    def _device(self, dev_id: int) -> Disk | VmState:
        return self._registry.device(dev_id)

    def _start_write(self, dev_id: int) -> Disk | VmState:
        self._check_open()
        self._started = True
        return self._device(dev_id)

    # -- writes -----------------------------------------------------------------------

    def write(self, dev_id: int, offset: int, data: Buffer, *, owned: bool = False) -> None:
        """Write ``data`` at ``offset`` of a disk (or append to the stream at its end).

        Complete clusters go to the archive at once; partial ones are assembled.  Whole
        clusters wait in the current extent as views of ``data``: ``bytes`` are kept as
        they are, anything else is copied first unless ``owned`` says that the caller
        hands the buffer over and will never change it.

        Raises:
            VmaWriterError: out of range, or a stream written anywhere but at its end.
            ClusterConflictError: different bytes for a cluster already stored.
            PartialBufferFullError: too many partial clusters at once.
            OSError: the sink failed (the failed part can be retried).
        """
        dev = self._start_write(dev_id)
        view = memoryview(data if owned or isinstance(data, bytes) else bytes(data)).cast("B")
        if isinstance(dev, VmState):
            if offset != dev.length:
                raise VmaWriterError(
                    f"{dev.name} is sequential: write at {offset}, expected {dev.length}"
                )
            dev.append(view, self._queue_vmstate)
            return
        end = offset + len(view)
        self._check_range(dev, offset, end)
        pos = offset
        while pos < end:
            cluster, inner = divmod(pos, VMA_CLUSTER_SIZE)
            n = min(VMA_CLUSTER_SIZE - inner, end - pos)
            self._write_cluster(dev, cluster, inner, view[pos - offset : pos - offset + n])
            pos += n

    def write_zeroes(self, dev_id: int, offset: int, length: int) -> None:
        """Write ``length`` zero bytes at ``offset``, allocating nothing of that size.

        Raises:
            The same as :meth:`write`.
        """
        dev = self._start_write(dev_id)
        if isinstance(dev, VmState):
            if offset != dev.length:
                raise VmaWriterError(f"{dev.name} is sequential")
            while length:
                n = min(length, VMA_CLUSTER_SIZE)
                dev.append(memoryview(ZERO_CLUSTER)[:n], self._queue_vmstate)
                length -= n
            return
        end = offset + length
        self._check_range(dev, offset, end)
        pos = offset
        while pos < end:
            cluster, inner = divmod(pos, VMA_CLUSTER_SIZE)
            limit = dev.cluster_limit(cluster)
            n = min(VMA_CLUSTER_SIZE - inner, end - pos)
            if inner == 0 and n >= limit and dev.state[cluster] == UNTOUCHED:
                # The fast path of large zero ranges: whole untouched clusters, no buffer.
                run = min((end - pos) // VMA_CLUSTER_SIZE, dev.cluster_count - cluster)
                run = max(run, 1)
                self._mark_zero_run(dev, cluster, run)
                pos += min(run * VMA_CLUSTER_SIZE, end - pos)
                continue
            self._write_cluster(dev, cluster, inner, memoryview(ZERO_CLUSTER)[:n])
            pos += n

    def _mark_zero_run(self, dev: Disk, first: int, count: int) -> None:
        """Mark up to ``count`` untouched clusters from ``first`` as ZERO; zero the
        clusters in other states among them the ordinary way."""
        stop = first + count
        nxt = first
        while nxt < stop:
            other = dev.mark_zero_run(nxt, stop)
            if other is None:
                break
            if dev.state[other] != ZERO:
                zeros = memoryview(ZERO_CLUSTER)[: dev.cluster_limit(other)]
                self._write_cluster(dev, other, 0, zeros)
            nxt = other + 1

    def _check_range(self, dev: Disk, start: int, end: int) -> None:
        if start < 0 or end > dev.size or end < start:
            raise VmaWriterError(
                f"{dev.name}: range {start}..{end} is outside the device ({dev.size} bytes)"
            )

    def _write_cluster(self, dev: Disk, cluster: int, inner: int, data: memoryview) -> None:
        """Apply ``data`` at byte ``inner`` of ``cluster`` (within one cluster)."""
        state = dev.state[cluster]
        limit = dev.cluster_limit(cluster)
        if state in (PENDING, STORED):
            self._check_rewrite(dev, cluster, inner, data)
            return
        if state in (UNTOUCHED, ZERO) and inner == 0 and len(data) >= limit:
            # A whole cluster needs no assembly buffer (a zeroed one is simply replaced).
            if state == ZERO:
                dev.state[cluster] = UNTOUCHED
                dev.done_clusters -= 1
                dev.zero_bytes -= limit
                try:
                    self._complete(dev, cluster, data[:limit], limit, counted=True)
                except BaseException:
                    dev.state[cluster] = ZERO
                    dev.done_clusters += 1
                    dev.zero_bytes += limit
                    raise
            else:
                self._complete(dev, cluster, data[:limit], limit)
            return
        part = dev.partial.get(cluster)
        if part is None:
            if self._partial_bytes + VMA_CLUSTER_SIZE > self._max_partial:
                raise PartialBufferFullError(
                    f"{dev.name}: more than {self._max_partial} bytes of partial clusters "
                    "are being assembled; write whole 64 KiB clusters"
                )
            part = Partial(bytearray(VMA_CLUSTER_SIZE))
            if state == ZERO:
                # Zeroed before, written now: the whole cluster is known, zeros elsewhere.
                # It stays "written"; it is counted as done again when it completes.
                part.ranges = [(0, limit)]
                dev.done_clusters -= 1
                dev.zero_bytes -= limit
            dev.partial[cluster] = part
            dev.state[cluster] = PARTIAL
            self._partial_bytes += VMA_CLUSTER_SIZE
        part.buf[inner : inner + len(data)] = data
        dev.written += part.add(inner, inner + len(data))
        if part.covers(limit):
            self._complete_partial(dev, cluster)

    def _complete(
        self, dev: Disk, cluster: int, data: memoryview, limit: int, *, counted: bool = False
    ) -> None:
        """A disk's cluster is whole (``limit`` bytes): zero-detect it and queue it."""
        mask, blocks, stored = mask_and_blocks(data, limit)
        if mask == 0:
            dev.state[cluster] = ZERO
        else:
            self._extents.queue(Slot(dev, cluster, mask, retained(data, blocks)))
            dev.state[cluster] = PENDING
            dev.stored_bytes += stored
        if not counted:
            dev.written += limit
        dev.zero_bytes += limit - min(stored, limit)
        dev.done_clusters += 1

    def _check_rewrite(self, dev: Disk, cluster: int, inner: int, data: memoryview) -> None:
        if dev.state[cluster] == STORED and not self._sink.readable:
            if inner == 0 and len(data) >= dev.cluster_limit(cluster):
                full = bytes(data) + bytes(VMA_CLUSTER_SIZE - len(data))
                if zlib.crc32(full) == dev.ref[cluster]:
                    return
            raise ClusterConflictError(
                f"{dev.name}: cluster {cluster} is already in the archive (a stream, "
                "which cannot be read back); only an identical whole-cluster rewrite is accepted"
            )
        current = self._cluster_bytes(dev, cluster)
        if not current.startswith(data, inner):
            raise ClusterConflictError(
                f"{dev.name}: cluster {cluster} (offset {cluster * VMA_CLUSTER_SIZE}) is "
                "already in the archive with different contents; each cluster is stored once"
            )

    # -- the stream -----------------------------------------------------------------

    def append(self, dev_id: int, data: Buffer) -> None:
        """Append ``data`` to a stream device (the VM state).

        Raises:
            VmaWriterError: ``dev_id`` is not a stream.
            OSError: the sink failed.
        """
        dev = self._start_write(dev_id)
        if not isinstance(dev, VmState):
            raise VmaWriterError(f"{dev.name} is a disk, not a stream")
        dev.append(memoryview(data).cast("B"), self._queue_vmstate)

    def _queue_vmstate(self, stream: VmState, data: memoryview) -> None:
        """Queue the stream's next cluster whole (its index is the count so far)."""
        cluster = len(stream.state)
        stream.state.append(UNTOUCHED)
        stream.ref.append(0)
        try:
            self._extents.queue(Slot(stream, cluster, FULL_MASK, retained(data, [data])))
        except BaseException:
            stream.state.pop()
            stream.ref.pop()
            raise
        stream.state[cluster] = PENDING
        stream.stored_bytes += VMA_CLUSTER_SIZE

    # -- the header ---------------------------------------------------------------------

    def _build_header(self, *, final: bool = False) -> bytes:
        """The header: as first written, or ``final`` (the stream's true length and
        the digest of the extents, for a rewrite in place at finish)."""
        if self._ctime is None:
            self._ctime = int(time.time())
        digest = self._sink.data_digest() if final and self._registry.with_digest else None
        return self._registry.header(self.uuid, self._ctime, final=final, digest=digest)

    # -- reads ----------------------------------------------------------------------

    def read(self, dev_id: int, offset: int, length: int) -> bytes:
        """What a disk holds so far: written bytes, zeros elsewhere.

        Raises:
            VmaWriterError: out of range, or a stored cluster on a stream sink.
        """
        self._check_open()
        dev = self._device(dev_id)
        end = offset + length
        if isinstance(dev, VmState):
            raise VmaWriterError(f"{dev.name} is a stream; it cannot be read")
        self._check_range(dev, offset, end)
        out = bytearray()
        pos = offset
        while pos < end:
            cluster, inner = divmod(pos, VMA_CLUSTER_SIZE)
            n = min(VMA_CLUSTER_SIZE - inner, end - pos)
            out += self._cluster_bytes(dev, cluster)[inner : inner + n]
            pos += n
        return bytes(out)

    def _cluster_bytes(self, dev: Disk, cluster: int) -> bytes:
        state = dev.state[cluster]
        if state in (UNTOUCHED, ZERO):
            return ZERO_CLUSTER
        if state == PARTIAL:
            return bytes(dev.partial[cluster].buf)
        return self._extents.cluster_bytes(dev, cluster)  # PENDING or STORED

    def block_status(self, dev_id: int, offset: int, length: int) -> list[tuple[int, bool]]:
        """Describe ``[offset, offset+length)`` as runs of ``(length, is_zero)``.

        Known-zero means never written or written as zeros (ZERO clusters, and
        clusters whose stored mask is 0); everything else counts as data.
        """
        return self._device(dev_id).block_status(offset, length)

    def progress(self, dev_id: int) -> DeviceProgress:
        """The device's progress and its byte counts so far."""
        return self._device(dev_id).progress()

    @property
    def devices(self) -> list[tuple[int, str, int]]:
        """``(dev_id, name, size)`` of every registered device."""
        return [(d.dev_id, d.name, d.size) for d in self._registry.devices]

    # -- durability and the end -----------------------------------------------------

    def flush(self) -> None:
        """Make every accepted write durable (NBD FLUSH).

        Complete clusters waiting in memory go out as a (short, legal) extent; clusters
        still being assembled cannot enter the archive without risking a duplicate
        later, so they go to a side journal (``ARCHIVE.part.journal``) that is replaced
        atomically on every flush and removed at finish.  Its format, and a reader, are
        in :mod:`nbdvma.vma.journal`.
        """
        self._check_open()
        self._extents.flush()
        self._extents.write_header()
        self._sink.write_journal(self._journal())
        self._sink.sync()

    def _journal(self) -> bytes | None:
        """The journal of the partly written clusters, then the stream's tail."""
        records = [r for dev in self._disks() for r in dev.journal_records()]
        if self._registry.vmstate is not None and self._registry.vmstate.tail:
            records.append(self._registry.vmstate.journal_record())
        return encode_journal(self.uuid, records) if records else None

    def _disks(self) -> list[Disk]:
        return [dev for dev in self._registry.devices if isinstance(dev, Disk)]

    def finish(self) -> None:
        """Complete the archive and give it its final name.

        Partial clusters are completed with zeros, never-written clusters are emitted
        as zero clusters, the stream's tail is padded, the last extent is written, the
        header is rewritten with the stream's true length and the data digest where
        the sink allows, and the sink commits (fsync, rename, fsync of the directory).

        A sink error (``ENOSPC``...) leaves the writer open: ``finish`` may be called
        again once the cause is gone.
        """
        self._check_open()
        for dev in self._registry.devices:  # in device order: the extents depend on it
            if isinstance(dev, VmState):
                dev.finish(self._queue_vmstate)
            else:
                for cluster in sorted(dev.partial):
                    self._complete_partial(dev, cluster)
        for disk in self._disks():
            self._queue_empty(disk)
        if self._extents.header is None and not self._extents.pending:
            # No device at all: the C writer still writes one empty extent.
            self._extents.write_empty()
        self._extents.flush()
        self._extents.write_header()
        if self._sink.seekable:
            final = self._build_header(final=True)
            if final != self._patched:  # a retried finish may have closed the file
                self._sink.patch_header(final)
                self._patched = final
        self._sink.commit()
        self._state = "finished"

    def _queue_empty(self, dev: Disk) -> None:
        """Queue the disk's never written and zeroed clusters as zero clusters."""
        for first, count in empty_runs(dev.state):
            for cluster in range(first, first + count):
                untouched = dev.state[cluster] == UNTOUCHED
                # Queued first: if that fails (ENOSPC), a retried finish counts once.
                self._extents.queue(Slot(dev, cluster, 0, []))
                dev.state[cluster] = PENDING
                if untouched:
                    dev.zero_bytes += dev.cluster_limit(cluster)

    def _complete_partial(self, dev: Disk, cluster: int) -> None:
        """Queue a partial cluster as it is (zeros where unwritten); undone on failure."""
        part = dev.partial.pop(cluster)
        self._partial_bytes -= VMA_CLUSTER_SIZE
        limit = dev.cluster_limit(cluster)
        dev.state[cluster] = UNTOUCHED
        try:
            self._complete(dev, cluster, memoryview(part.buf)[:limit], limit, counted=True)
        except BaseException:
            dev.partial[cluster] = part
            dev.state[cluster] = PARTIAL
            self._partial_bytes += VMA_CLUSTER_SIZE
            raise

    def abort(self, *, discard: bool = False) -> None:
        """Stop without completing: the sink keeps what it has under its temporary
        name, unless ``discard`` (or nothing reached it): then that is removed."""
        if self._state == "open":
            self._state = "aborted"
            self._sink.abort(discard=discard)

    def release(self, buffer: object) -> None:
        """Hold no view of ``buffer`` any more, so that the caller may fill it again.

        For callers that hand over buffers with ``owned=True`` and later reuse or unmap
        them (``nbdvma create``: views of a mapped image): an extent that refers to
        ``buffer`` is written now, maybe short (as the C writer's flush writes one); a
        sink that writes in the background is then waited for.

        Raises:
            OSError: the sink failed.
        """
        self._check_open()
        if self._extents.holds(buffer):
            self._extents.flush()
        self._sink.release(buffer)  # a sink that writes in the background waits here

    def may_write_extent(self, length: int, *, offset: int = -1, now: bool = False) -> bool:
        """Whether writing ``length`` more bytes may fill the current extent (a hint for
        callers on an event loop, which then make the call in a worker thread); ``now``:
        only whether the call itself may write one (write-behind seals the first)."""
        at = offset % VMA_CLUSTER_SIZE if offset >= 0 else VMA_CLUSTER_SIZE - 1
        clusters = -(-(at + length) // VMA_CLUSTER_SIZE)  # the clusters it can touch
        return self._extents.may_write(clusters, now=now)

    def sealed_waiting(self) -> bool:
        """Whether a sealed extent waits for :meth:`write_sealed` (write-behind)."""
        return bool(self._extents.sealed)

    def write_sealed(self) -> None:
        """Write the sealed extents, in a worker thread while the loop fills the next (no
        other use of the sink meanwhile); on ``OSError`` they stay, to be written again."""
        self._check_open()
        self._extents.write_sealed()

    def zeroes_may_write_extent(
        self, dev_id: int, offset: int, length: int, *, now: bool = False
    ) -> bool:
        """Like :meth:`may_write_extent`, for :meth:`write_zeroes`: zeroes queue at most
        the two clusters at the ends of their range, if partly written before; every
        cluster inside becomes a zero cluster, which stores nothing."""
        dev = self._device(dev_id)
        if not isinstance(dev, Disk):
            return self.may_write_extent(length, now=now)
        if length <= 0:
            return False
        ends = {offset // VMA_CLUSTER_SIZE, (offset + length - 1) // VMA_CLUSTER_SIZE}
        completed = sum(1 for c in ends if c < dev.cluster_count and dev.state[c] == PARTIAL)
        return self._extents.may_write(completed, now=now)

    @property
    def finished(self) -> bool:
        """Whether :meth:`finish` completed: the archive has its final name."""
        return self._state == "finished"

    @property
    def has_output(self) -> bool:
        """Whether anything has reached the sink yet (the header is written first)."""
        return self._extents.header is not None

    @property
    def incomplete_devices(self) -> list[str]:
        """Names of the disks not every byte of which has been written."""
        return [d.name for d in self._disks() if d.done_clusters < d.cluster_count]
