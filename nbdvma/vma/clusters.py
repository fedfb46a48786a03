"""What the writer knows of each device: cluster states, partial clusters, zero masks.

:class:`~nbdvma.vma.writer.VmaWriter` keeps one record per registered device: a
:class:`Disk` (random access, one state byte per 64 KiB cluster, see the writer's
theory of operation) or the :class:`VmState` stream (appends only, packed into
clusters in order).  Both share :class:`Device`: the state and the reference of each
cluster that has reached an extent, which is all that writing an extent touches.

The functions at the end are the cluster codec of the writer: zero detection into a
16-bit mask and the stored blocks (:func:`mask_and_blocks`), and back
(:func:`expand`).
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Callable, Iterator
from typing import Self

import attrs

from nbdvma.vma.format import BLOCKS_PER_CLUSTER, FULL_MASK, VMA_BLOCK_SIZE, VMA_CLUSTER_SIZE
from nbdvma.vma.journal import JournalRecord

__all__ = [
    "PARTIAL",
    "PENDING",
    "STORED",
    "UNTOUCHED",
    "ZERO",
    "ZERO_CLUSTER",
    "Device",
    "DeviceProgress",
    "Disk",
    "Partial",
    "Slot",
    "VmState",
    "empty_runs",
    "expand",
    "mask_and_blocks",
    "retained",
]

UNTOUCHED, PARTIAL, ZERO, PENDING, STORED = range(5)

ZERO_CLUSTER = bytes(VMA_CLUSTER_SIZE)
# Pending clusters are views of the caller's buffers; buffers larger than this are not
# kept alive for them (58 pending clusters could otherwise pin 58 payloads of 32 MiB).
_MAX_RETAINED = 4 * 1024 * 1024
_ZERO_BLOCK = bytes(VMA_BLOCK_SIZE)
_WORDS_PER_BLOCK = VMA_BLOCK_SIZE // 8
_BLOCK_RANGES = [(j * VMA_BLOCK_SIZE, (j + 1) * VMA_BLOCK_SIZE) for j in range(BLOCKS_PER_CLUSTER)]
# Runs of clusters that finish() still has to emit as zero clusters.
_EMPTY_RUNS = re.compile(b"[\\x00\\x02]+")
_ZERO_STATES = bytes([ZERO]) * 65536
_NOT_UNTOUCHED = re.compile(b"[^\\x00]")
assert (UNTOUCHED, ZERO) == (0, 2)


@attrs.frozen
class DeviceProgress:
    """How far a device has got: what ``serve`` and ``backup`` report."""

    name: str
    size: int
    #: Bytes written by the client so far (data or zeroes), each byte counted once.
    written: int
    #: Bytes of the device that are zero in the archive (4 KiB blocks, clamped to size).
    zero_bytes: int
    #: Data bytes stored in the archive for this device.
    stored_bytes: int
    #: Every byte was written (streams: never, until finish).
    complete: bool


@attrs.define(eq=False)
class Partial:
    """A cluster being assembled: its bytes and the sorted, disjoint ranges written."""

    buf: bytearray
    ranges: list[tuple[int, int]] = attrs.Factory(list)

    def add(self, start: int, end: int) -> int:
        """Mark ``[start, end)`` written; return how many bytes were new."""
        merged: list[tuple[int, int]] = []
        new = end - start
        for a, b in self.ranges:
            if b < start or a > end:
                merged.append((a, b))
            else:
                new -= max(0, min(b, end) - max(a, start))
                start, end = min(a, start), max(b, end)
        merged.append((start, end))
        merged.sort()
        self.ranges = merged
        return new

    def covers(self, limit: int) -> bool:
        """Whether the ranges written cover ``[0, limit)``."""
        return len(self.ranges) == 1 and self.ranges[0][0] == 0 and self.ranges[0][1] >= limit


@attrs.define(eq=False)
class Device:
    """What disks and the stream share: each cluster's state and stored reference."""

    dev_id: int
    name: str
    #: A disk's size; the stream's size hint (its true length is known at the end).
    size: int
    state: bytearray
    #: Per STORED cluster: its extent's index (readable sink) or its CRC-32 (stream sink).
    ref: array[int]
    zero_bytes: int = 0
    stored_bytes: int = 0

    @classmethod
    def new(cls, dev_id: int, name: str, size: int, clusters: int) -> Self:
        """A device of ``clusters`` clusters, all UNTOUCHED."""
        return cls(dev_id, name, size, bytearray(clusters), array("I", [0]) * clusters)

    def block_status(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """``[offset, offset+length)`` as runs of ``(length, is_zero)``; known-zero:
        never written, or written as zeros."""
        end = min(offset + length, self.size)
        runs: list[tuple[int, bool]] = []
        pos = offset
        while pos < end:
            cluster = pos // VMA_CLUSTER_SIZE
            n = min((cluster + 1) * VMA_CLUSTER_SIZE, end) - pos
            zero = self.state[cluster] in (UNTOUCHED, ZERO)
            if runs and runs[-1][1] == zero:
                runs[-1] = (runs[-1][0] + n, zero)
            else:
                runs.append((n, zero))
            pos += n
        return runs


@attrs.define(eq=False)
class Disk(Device):
    """A disk: random-access writes, one state byte a cluster."""

    partial: dict[int, Partial] = attrs.Factory(dict)
    #: Bytes written by the client so far, each byte counted once.
    written: int = 0
    #: Clusters that are ZERO, PENDING or STORED.
    done_clusters: int = 0

    @property
    def cluster_count(self) -> int:
        """Clusters covering the disk."""
        return len(self.state)

    def cluster_limit(self, cluster: int) -> int:
        """Bytes of ``cluster`` that lie inside the device."""
        return min(VMA_CLUSTER_SIZE, self.size - cluster * VMA_CLUSTER_SIZE)

    def progress(self) -> DeviceProgress:
        """The disk's progress and its byte counts so far."""
        complete = self.done_clusters == self.cluster_count
        return DeviceProgress(
            self.name, self.size, self.written, self.zero_bytes, self.stored_bytes, complete
        )

    def journal_records(self) -> list[JournalRecord]:
        """The partly written clusters, in cluster order, as the journal stores them."""
        return [
            JournalRecord(self.dev_id, cluster, tuple((a, bytes(p.buf[a:b])) for a, b in p.ranges))
            for cluster, p in sorted(self.partial.items())
        ]

    def mark_zero_run(self, first: int, stop: int) -> int | None:
        """Mark the UNTOUCHED clusters from ``first`` on as ZERO, up to ``stop`` or the
        first cluster in another state, whose index is returned (else ``None``)."""
        state = self.state
        # Find the extent of untouched clusters at C speed.
        other = _NOT_UNTOUCHED.search(state, first, stop)
        run_end = other.start() if other else stop
        for k in range(first, run_end, len(_ZERO_STATES)):  # no buffer sized by the range
            state[k : min(k + len(_ZERO_STATES), run_end)] = _ZERO_STATES[: run_end - k]
        if run_end > first:
            covered = min(run_end * VMA_CLUSTER_SIZE, self.size) - first * VMA_CLUSTER_SIZE
            self.written += covered
            self.zero_bytes += covered
            self.done_clusters += run_end - first
        return None if other is None else run_end


@attrs.define(eq=False)
class VmState(Device):
    """The VM-state stream: appended in order, packed into whole clusters.

    Every cluster is stored whole, mask ``0xffff`` and zero blocks included:
    Proxmox's reader appends only the stored blocks of a VM-state cluster to
    ``vmstate.bin``, so a masked zero block would shift the rest (vma-format.md §6).
    """

    #: Bytes appended so far.
    length: int = 0
    #: The bytes of the next, not yet complete cluster.
    tail: bytearray = attrs.Factory(bytearray)

    def append(self, view: memoryview, emit: Callable[[VmState, memoryview], None]) -> None:
        """Append ``view``, passing each completed cluster to ``emit``.

        If ``emit`` fails, the bytes not yet taken stay the caller's (the request fails);
        a full tail stays here and goes first on the next call.
        """
        if len(self.tail) == VMA_CLUSTER_SIZE:
            self._emit_tail(emit)
        pos = 0
        while pos < len(view):
            if not self.tail and len(view) - pos >= VMA_CLUSTER_SIZE:
                chunk = view[pos : pos + VMA_CLUSTER_SIZE]
                if not isinstance(chunk.obj, bytes):
                    chunk = memoryview(bytes(chunk))
                emit(self, chunk)
                self.length += VMA_CLUSTER_SIZE
                pos += VMA_CLUSTER_SIZE
                continue
            n = min(VMA_CLUSTER_SIZE - len(self.tail), len(view) - pos)
            self.tail += view[pos : pos + n]
            self.length += n
            pos += n
            if len(self.tail) == VMA_CLUSTER_SIZE:
                self._emit_tail(emit)

    def finish(self, emit: Callable[[VmState, memoryview], None]) -> None:
        """Emit the tail padded with zeros to a whole cluster (kept if ``emit`` fails)."""
        if self.tail:
            emit(self, memoryview(bytes(self.tail) + bytes(VMA_CLUSTER_SIZE - len(self.tail))))
            self.tail.clear()

    def _emit_tail(self, emit: Callable[[VmState, memoryview], None]) -> None:
        emit(self, memoryview(bytes(self.tail)))
        self.tail.clear()

    def progress(self) -> DeviceProgress:
        """The stream's progress: its length so far, never complete before the end."""
        size = self.length
        return DeviceProgress(self.name, size, size, self.zero_bytes, self.stored_bytes, False)

    def journal_record(self) -> JournalRecord:
        """The tail, at its stream offset, as the journal stores it."""
        return JournalRecord(self.dev_id, self.length - len(self.tail), ((0, bytes(self.tail)),))


@attrs.define(eq=False)
class Slot:
    """A cluster waiting in the current extent."""

    dev: Device
    cluster: int
    mask: int
    blocks: list[memoryview]  # the stored blocks, runs of set bits


def mask_and_blocks(data: memoryview, limit: int) -> tuple[int, list[memoryview], int]:
    """Zero-detect a cluster of ``limit`` valid bytes.

    Returns the mask, the stored blocks (runs of consecutive set bits as one view each)
    and the number of stored bytes.  Blocks at or past ``limit`` are zero-marked; the
    bytes of the last stored block past ``limit`` are zeros in the output.
    """
    # bytes.startswith compares a memoryview at memcmp speed; memoryview == bytes
    # compares item by item, thirty times slower.
    if limit == VMA_CLUSTER_SIZE and ZERO_CLUSTER.startswith(data):
        return 0, [], 0
    if limit == VMA_CLUSTER_SIZE:
        # Data is rarely zero from a block's first word on: when no block starts with
        # a zero word, no block is zero (one probe of 16 words instead of 16 scans).
        if 0 not in data.cast("Q")[::_WORDS_PER_BLOCK].tolist():
            return FULL_MASK, [data], VMA_CLUSTER_SIZE
        full = data
    else:
        padded = bytearray(VMA_CLUSTER_SIZE)
        padded[:limit] = data[:limit]
        full = memoryview(bytes(padded))
    mask = 0
    bit = 1
    is_zero = _ZERO_BLOCK.startswith
    for a, b in _BLOCK_RANGES[: -(-limit // VMA_BLOCK_SIZE)]:
        if not is_zero(full[a:b]):
            mask |= bit
        bit <<= 1
    if mask == FULL_MASK:  # the common case of data: one run, nothing to split
        return mask, [full], VMA_CLUSTER_SIZE
    blocks: list[memoryview] = []
    j = 0
    while j < BLOCKS_PER_CLUSTER:
        if mask >> j & 1:
            k = j
            while k < BLOCKS_PER_CLUSTER and mask >> k & 1:
                k += 1
            blocks.append(full[j * VMA_BLOCK_SIZE : k * VMA_BLOCK_SIZE])
            j = k
        else:
            j += 1
    return mask, blocks, mask.bit_count() * VMA_BLOCK_SIZE


def expand(mask: int, stored: bytes) -> bytes:
    """A cluster's 64 KiB from its mask and its stored blocks."""
    if mask == FULL_MASK:
        return stored
    out = bytearray(VMA_CLUSTER_SIZE)
    pos = 0
    for j in range(BLOCKS_PER_CLUSTER):
        if mask >> j & 1:
            out[j * VMA_BLOCK_SIZE : (j + 1) * VMA_BLOCK_SIZE] = stored[pos : pos + VMA_BLOCK_SIZE]
            pos += VMA_BLOCK_SIZE
    return bytes(out)


def empty_runs(state: bytearray) -> Iterator[tuple[int, int]]:
    """``(first, count)`` runs of clusters still to be emitted as zero clusters."""
    for m in _EMPTY_RUNS.finditer(state):
        yield m.start(), m.end() - m.start()


def retained(data: memoryview, blocks: list[memoryview]) -> list[memoryview]:
    """``blocks`` (views of ``data``) as a pending slot may keep them.

    A view keeps its whole buffer alive until the extent is written: for a large
    payload that left only a few clusters pending, the blocks are copied.
    """
    obj = data.obj
    if isinstance(obj, bytes | bytearray) and len(obj) > _MAX_RETAINED:
        return [memoryview(bytes(b)) for b in blocks]
    return blocks
