"""The data digest: a BLAKE3 hash of an archive's extents, kept in a config blob.

VMA checks its headers (MD5 of the archive header, MD5 of each 512-byte extent
header) but nothing of the cluster data: one changed byte of a disk restores a
different disk without a word.  nbdvma therefore stores, in the archive it writes to
a regular file, a config blob named :data:`DIGEST_CONFIG` whose data is one line of
text (:data:`DIGEST_RECORD_SIZE` bytes, always)::

    blake3 <64 lowercase hex digits> <20 decimal digits>\\n

the BLAKE3 hash (32 bytes) and the length of the *extent stream*: every byte after
the header region, in file order, as a plain ``.vma`` stores it (for ``.vma.zst``,
the decompressed bytes).  By hand::

    tail -c +$((HEADER_SIZE + 1)) x.vma | b3sum
    zstd -dc x.vma.zst | tail -c +$((HEADER_SIZE + 1)) | b3sum

Until the archive is finished the blob holds :data:`PLACEHOLDER`, of the same length,
so that the header keeps its size and can be rewritten in place (with its MD5) at
finish; an archive that nbdvma did not finish never looks verified.  A stream (a
pipe, stdout) cannot be rewritten: an archive written to one has no digest blob.

Proxmox's tools treat the blob as any other config: ``vma list`` shows it,
``vma extract`` writes it into the target directory, and ``qmrestore`` uses only
``qemu-server.conf`` and ``qemu-server.fw``, deleting the rest.  The format is
documented in ``docs/integrity.md``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs
import blake3

from nbdvma.errors import DataDigestError

__all__ = [
    "DIGEST_ALGORITHM",
    "DIGEST_CONFIG",
    "DIGEST_RECORD_SIZE",
    "PLACEHOLDER",
    "DataDigest",
    "StreamHasher",
    "digest_config",
    "parse_digest_untrusted",
]

#: The name of the config blob that carries the digest (a plain file name: ``vma
#: extract`` writes every config into its target directory under its name).
DIGEST_CONFIG = "nbdvma-digest"
DIGEST_ALGORITHM = "blake3"
_LENGTH_DIGITS = 20  # a u64 in decimal: fixed width, so the record has one size
#: Bytes of the blob's data, final or placeholder.
DIGEST_RECORD_SIZE = len(DIGEST_ALGORITHM) + 1 + 64 + 1 + _LENGTH_DIGITS + 1
#: What the blob holds until the archive is finished.
_UNFINISHED = b"incomplete: nbdvma has not finished this archive; no data digest yet"
PLACEHOLDER = _UNFINISHED.ljust(DIGEST_RECORD_SIZE - 1) + b"\n"
_RECORD = re.compile(rb"blake3 ([0-9a-f]{64}) ([0-9]{20})\n")
assert len(PLACEHOLDER) == DIGEST_RECORD_SIZE


@attrs.frozen
class DataDigest:
    """The digest of an extent stream: its BLAKE3 hash and its length in bytes."""

    hexdigest: str
    length: int

    def encode(self) -> bytes:
        """The blob's data: ``blake3 <hex> <length>\\n``, :data:`DIGEST_RECORD_SIZE` bytes."""
        record = f"{DIGEST_ALGORITHM} {self.hexdigest} {self.length:0{_LENGTH_DIGITS}d}\n"
        data = record.encode()
        if len(data) != DIGEST_RECORD_SIZE:
            raise ValueError(f"not a digest record of {DIGEST_RECORD_SIZE} bytes: {record!r}")
        return data


def digest_config(digest: DataDigest | None) -> tuple[str, bytes]:
    """The config blob ``(name, data)`` recording ``digest``, or the placeholder."""
    return DIGEST_CONFIG, digest.encode() if digest is not None else PLACEHOLDER


def parse_digest_untrusted(data: bytes) -> DataDigest | None:
    """Read the blob's data: the digest, or ``None`` for the :data:`PLACEHOLDER`.

    Raises:
        DataDigestError: anything else (nbdvma writes nothing else under this name).
    """
    if data == PLACEHOLDER:
        return None
    match = _RECORD.fullmatch(data)
    if match is None:
        raise DataDigestError(
            f"config {DIGEST_CONFIG} is not a data digest nbdvma can read: {data[:100]!r}"
        )
    return DataDigest(match[1].decode(), int(match[2]))


class StreamHasher:
    """BLAKE3 over the extent stream, one unit (an extent) at a time.

    Single-threaded (the ``blake3`` default): it runs beside the work it checks, on
    a machine whose other core is busy too.  ``update`` releases the GIL, so hashing
    in a worker thread does not hold up the thread that produces the next extents.
    """

    def __init__(self) -> None:
        self._hasher = blake3.blake3()
        self.length = 0

    def update(self, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        """Add the bytes of one unit, in order."""
        for part in parts:
            self._hasher.update(part)
            self.length += memoryview(part).nbytes

    def result(self) -> DataDigest:
        """The digest of everything added so far."""
        return DataDigest(self._hasher.hexdigest(), self.length)
