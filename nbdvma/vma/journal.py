"""The partial-cluster journal (``ARCHIVE.part.journal``): its format, encoder and reader.

An NBD FLUSH must make every acknowledged write durable, but a cluster that is only
partly written cannot go into the archive yet: its other bytes may still come, and a
cluster is stored exactly once.  :meth:`~nbdvma.vma.writer.VmaWriter.flush` therefore
writes the whole clusters out as an extent and every partly written cluster (and the
VM-state stream's incomplete tail) into this side file, replaced atomically
(``.journal.tmp``, fsync, rename, fsync of the directory) on every FLUSH and removed when
the archive is finished.  After a crash, ``ARCHIVE.part`` holds the flushed extents
and the journal the flushed partial clusters; together they are every byte a client
saw acknowledged before its last FLUSH.

Format (all integers big-endian)::

    magic    8 bytes   b"NBDVMAJ1"
    uuid    16 bytes   the archive's uuid (as in the VMA header of ARCHIVE.part)
    records, up to the end of the file, each:
      nranges  u16     number of byte ranges that follow (>= 1)
      dev_id   u8      the device, as in the VMA header
      index    u64     a disk: the cluster number (byte offset index * 65536);
                       the VM-state stream: the byte offset of its tail
      nranges times:
        start  u32     first byte written, relative to the cluster (or tail)
        end    u32     one past the last byte written; start < end <= 65536
        data   end - start bytes

Ranges within a record are sorted and disjoint; bytes of a cluster outside them were
never written (they read as zero).  Disk records come first, sorted by device and
cluster; the stream's record, if any, is last and has one range starting at 0.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

import attrs

from nbdvma.errors import VmaFormatError
from nbdvma.vma.format import VMA_CLUSTER_SIZE

__all__ = [
    "JOURNAL_MAGIC",
    "Journal",
    "JournalRecord",
    "encode_journal",
    "parse_journal",
    "read_journal",
]

JOURNAL_MAGIC = b"NBDVMAJ1"
_RECORD = struct.Struct(">HBQ")
_RANGE = struct.Struct(">II")


@attrs.frozen
class JournalRecord:
    """One partly written cluster of a disk (or the stream's tail)."""

    dev_id: int
    #: A disk's cluster number, or the stream tail's byte offset.
    index: int
    #: ``(start, data)`` pieces relative to the cluster, sorted and disjoint.
    pieces: tuple[tuple[int, bytes], ...]

    def cluster_bytes(self) -> bytes:
        """The cluster as a client would read it: the pieces, zeros elsewhere."""
        out = bytearray(VMA_CLUSTER_SIZE)
        for start, data in self.pieces:
            out[start : start + len(data)] = data
        return bytes(out)


@attrs.frozen
class Journal:
    """A parsed journal."""

    uuid: bytes
    records: tuple[JournalRecord, ...]


def encode_journal(uuid: bytes, records: Iterable[JournalRecord]) -> bytes:
    """The journal's bytes: the magic, ``uuid`` and ``records`` in the given order."""
    out = bytearray(JOURNAL_MAGIC + uuid)
    for record in records:
        out += _RECORD.pack(len(record.pieces), record.dev_id, record.index)
        for start, data in record.pieces:
            out += _RANGE.pack(start, start + len(data))
            out += data
    return bytes(out)


def parse_journal(data: bytes) -> Journal:
    """Parse (and check) a journal's bytes; they are untrusted.

    Raises:
        VmaFormatError: a bad magic, a truncated record, or ranges that are empty,
            unsorted, overlapping or past 64 KiB.
    """
    if len(data) < 24 or data[:8] != JOURNAL_MAGIC:
        raise VmaFormatError("not an nbdvma partial-cluster journal (bad magic)")
    uuid = data[8:24]
    view = memoryview(data)
    pos = 24
    records: list[JournalRecord] = []
    while pos < len(data):
        if pos + _RECORD.size > len(data):
            raise VmaFormatError(f"journal truncated in a record header at byte {pos}")
        nranges, dev_id, index = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        if nranges == 0:
            raise VmaFormatError(f"journal record at byte {pos - _RECORD.size} has no ranges")
        pieces: list[tuple[int, bytes]] = []
        last_end = -1
        for _ in range(nranges):
            if pos + _RANGE.size > len(data):
                raise VmaFormatError(f"journal truncated in a range at byte {pos}")
            start, end = _RANGE.unpack_from(data, pos)
            pos += _RANGE.size
            if not start < end <= VMA_CLUSTER_SIZE or start <= last_end:
                raise VmaFormatError(
                    f"journal range {start}..{end} of device {dev_id} index {index} is "
                    "empty, unsorted, overlapping or past 64 KiB"
                )
            if pos + end - start > len(data):
                raise VmaFormatError(f"journal truncated in the data of a range at byte {pos}")
            pieces.append((start, bytes(view[pos : pos + end - start])))
            pos += end - start
            last_end = end
        records.append(JournalRecord(dev_id, index, tuple(pieces)))
    return Journal(uuid, tuple(records))


def read_journal(path: str | os.PathLike[str]) -> Journal:
    """Read and parse the journal file at ``path`` (``ARCHIVE.part.journal``).

    Raises:
        OSError: it cannot be read.
        VmaFormatError: see :func:`parse_journal`.
    """
    with open(path, "rb") as f:
        return parse_journal(f.read())
