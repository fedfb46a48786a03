"""zstd for archives: one frame per unit, compressed on every core, written in order.

A ``.vma.zst`` is the archive with each unit (the header, then each extent) in a zstd
frame of its own: a concatenation of frames is one valid zstd stream (what ``zstd -d``
and vzdump's restore read), and a frame can be decompressed alone to read an extent
back.  The header's frame is made of *raw* blocks, so that it keeps its length and can
be rewritten in place; extent frames carry zstd's content checksum (XXH64), as the zstd
CLI (and so vzdump) writes them.

Compression is the costly part of writing a ``.vma.zst`` (about 4 CPU seconds per GiB
of data at level 3), so :class:`FramePipeline` compresses extents on a pool of threads
(``zstandard`` releases the GIL while it compresses) while the caller goes on: the
caller's :meth:`~FramePipeline.submit` returns at once, and the frames are written by
the caller's own later calls, always in submission order, so the archive is the same
sequence of frames whatever the timing.  At most ``workers + 1`` units are in flight,
so memory stays bounded.

Failure model (what the writer's retries rely on): a frame whose write fails stays at
the head of the queue and is written again first by the next call; the error is raised
from :meth:`~FramePipeline.submit` *before* the new unit is accepted, so the caller
knows that unit is not in the archive and may offer it again; nothing accepted is lost.
"""

from __future__ import annotations

import collections
import contextlib
import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import zstandard

from nbdvma.errors import VmaWriterError
from nbdvma.vma.background import ThreadGuard, holds_buffer

__all__ = [
    "ZSTD_DEFAULT_LEVEL",
    "FramePipeline",
    "decompress_frame",
    "parse_compression",
    "zstd_raw_frame",
]

Buffer = bytes | bytearray | memoryview

#: zstd's own default level, which vzdump also uses.
ZSTD_DEFAULT_LEVEL = 3
_ZSTD_MAGIC = struct.pack("<I", 0xFD2FB528)
_ZSTD_MAX_RAW_BLOCK = 128 * 1024


def parse_compression(text: str | None) -> int | None:
    """The zstd level of ``"zstd"`` (:data:`ZSTD_DEFAULT_LEVEL`) or ``"zstd:LEVEL"``
    (1..19); ``None`` for no compression.

    Raises:
        VmaWriterError: another compression, or a level out of range.
    """
    if text is None:
        return None
    name, sep, level = text.partition(":")
    if name != "zstd":
        raise VmaWriterError(f"unknown compression {text!r} (only zstd[:LEVEL] is supported)")
    if not sep:
        return ZSTD_DEFAULT_LEVEL
    if not level.isdigit() or not 1 <= int(level) <= 19:
        raise VmaWriterError(f"zstd level {level!r}: expected a whole number from 1 to 19")
    return int(level)


def zstd_raw_frame(data: bytes) -> bytes:
    """A zstd frame holding ``data`` uncompressed (RFC 8878 raw blocks).

    Its length depends only on ``len(data)``, so it can be overwritten in place.
    """
    # Frame header descriptor: 4-byte content size (flag 2), single segment.
    out = bytearray(_ZSTD_MAGIC + bytes([0xA0]) + struct.pack("<I", len(data)))
    view = memoryview(data)
    pos = 0
    while True:
        block = view[pos : pos + _ZSTD_MAX_RAW_BLOCK]
        pos += len(block)
        last = pos >= len(data)
        out += (len(block) << 3 | last).to_bytes(3, "little")  # block type 0: raw
        out += block
        if last:
            return bytes(out)


def decompress_frame(frame: bytes) -> bytes:
    """The content of one frame written by :class:`FramePipeline` (or a raw one)."""
    data: bytes = zstandard.ZstdDecompressor().decompress(frame)
    return data


class _Unit:
    __slots__ = ("frame", "parts")

    def __init__(self, frame: Future[bytes], parts: Sequence[Buffer]) -> None:
        self.frame = frame
        self.parts = parts

    def holds(self, buffer: object) -> bool:
        return holds_buffer(self.parts, buffer)


class FramePipeline:
    """Compress units on a thread pool; write their frames in order through ``write``.

    ``write(frame, parts)`` is called by whichever of this object's methods finds the
    oldest unit compressed, in the caller's thread, never concurrently; it must write
    the frame completely or raise (leaving nothing of it).
    """

    def __init__(
        self,
        write: Callable[[bytes, Sequence[Buffer]], None],
        *,
        level: int = ZSTD_DEFAULT_LEVEL,
        workers: int | None = None,
        thread_guard: ThreadGuard = contextlib.nullcontext,
    ) -> None:
        """Start ``workers`` compression threads (default: one per CPU) inside
        ``thread_guard()``."""
        self._write = write
        self._level = level
        self.workers = workers or os.cpu_count() or 1
        self._queue: collections.deque[_Unit] = collections.deque()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="nbdvma-zstd")
        with thread_guard():
            # Start the threads now, where the guard is (the pool would start them at
            # the first compressions, anywhere).
            for f in [self._pool.submit(self._compressor) for _ in range(self.workers)]:
                f.result()

    def _compressor(self) -> zstandard.ZstdCompressor:
        cctx: zstandard.ZstdCompressor | None = getattr(self._local, "cctx", None)
        if cctx is None:
            # One per thread: a compression context is not thread-safe.
            cctx = zstandard.ZstdCompressor(level=self._level, write_checksum=True)
            self._local.cctx = cctx
        return cctx

    def _compress(self, parts: Sequence[Buffer]) -> bytes:
        frame: bytes = self._compressor().compress(b"".join(parts))
        return frame

    @property
    def queued(self) -> int:
        """Units accepted and not written yet."""
        return len(self._queue)

    def submit(self, parts: Sequence[Buffer]) -> None:
        """Accept one unit: its frame is written later, after every earlier one.

        ``parts`` must stay unchanged until written (see :meth:`release`).

        Raises:
            OSError: the write of an earlier frame failed; this unit was not accepted.
        """
        self._write_done()
        while len(self._queue) > self.workers:
            self._write_head()
        self._queue.append(_Unit(self._pool.submit(self._compress, parts), parts))

    def _write_done(self) -> None:
        """Write the oldest units as far as they are compressed, without waiting."""
        while self._queue and self._queue[0].frame.done():
            self._write_head()

    def _write_head(self) -> None:
        unit = self._queue[0]
        self._write(unit.frame.result(), unit.parts)
        self._queue.popleft()  # only once written: a failed one is tried again first

    def drain(self) -> None:
        """Write every accepted unit.

        Raises:
            OSError: a write failed (that unit and those after it stay queued).
        """
        while self._queue:
            self._write_head()

    def release(self, buffer: object) -> None:
        """Return once no unit still to be written refers to ``buffer``."""
        while any(u.holds(buffer) for u in self._queue):
            self._write_head()

    def pending(self, index: int) -> bytes:
        """The content of the ``index``-th unit not written yet (0: the oldest)."""
        return b"".join(self._queue[index].parts)

    def close(self) -> None:
        """Drop what is not written and stop the threads (idempotent)."""
        self._queue.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
