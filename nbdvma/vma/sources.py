"""Where an archive's bytes come from: a file or stdin, decompressed on the fly.

The reader reads strictly front to back (:mod:`nbdvma.vma.reader`), so its source can
be a pipe, stdin, or a zstd or gzip decompression stream; this module opens them.
"""

from __future__ import annotations

import gzip
import os
import sys
from typing import BinaryIO, cast

import zstandard

__all__ = ["GZIP_MAGIC", "ZSTD_MAGIC", "decompressing", "open_source"]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


def open_source(path: str) -> BinaryIO:
    """Open an archive for sequential reading.

    ``-`` is stdin (a duplicate of fd 0, so closing the result leaves stdin open).
    A zstd-compressed archive is recognised by its magic number, or by a ``.zst``
    suffix when the magic cannot be peeked, and decompressed on the fly (all frames);
    so is a gzip-compressed one (``.vma.gz``, as vzdump writes with ``--compress gzip``).

    Args:
        path: a file name, or ``-``.

    Returns:
        A binary stream; the caller closes it.

    Raises:
        OSError: the file cannot be opened.
    """
    # Opened here, closed by the caller (via the returned stream).
    fd = os.dup(sys.stdin.fileno()) if path == "-" else os.open(path, os.O_RDONLY)
    return decompressing(os.fdopen(fd, "rb"), path)


def decompressing(raw: BinaryIO, name: str) -> BinaryIO:
    """``raw`` (a buffered stream at an archive's start), decompressed on the fly if
    its first bytes say it is zstd or gzip (as :func:`open_source` opens a file).

    Args:
        raw: a stream with ``peek``; the result owns it (closing one closes both).
        name: the archive's name: a ``.zst`` suffix means zstd where nothing can be
            peeked.

    Raises:
        OSError: the first bytes cannot be read (``raw`` is closed then).
    """
    try:
        head = raw.peek(4)[:4]  # type: ignore[attr-defined]
    except BaseException:
        raw.close()
        raise
    if head.startswith(GZIP_MAGIC):
        return cast(BinaryIO, _GzipSource(raw))  # a GzipFile is a binary stream
    is_zstd = head == ZSTD_MAGIC if len(head) == 4 else name.endswith(".zst")
    if not is_zstd:
        return raw
    dctx = zstandard.ZstdDecompressor()
    reader: BinaryIO = dctx.stream_reader(raw, read_across_frames=True, closefd=True)
    return reader


class _GzipSource(gzip.GzipFile):
    """A gzip stream that closes the file it reads (a ``GzipFile`` leaves a
    ``fileobj`` it was given open)."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        """Close the stream and the file under it."""
        try:
            super().close()
        finally:
            self._raw.close()
