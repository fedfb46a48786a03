"""Where the archive bytes go: a regular file, a pipe, optionally zstd-compressed.

The writer hands a sink whole *units* (the header, then one extent at a time) and
asks it for five things besides writing them: to read a unit back (so that a replayed
write can be compared with what is stored, and a READ can be answered), to rewrite the
header in place (the VM-state length and the data digest are known only at the end),
the digest of the extents written (:mod:`nbdvma.vma.digest`), to make everything
durable (FLUSH), and to give the archive its final name (finish).

Guarantees:

* A regular-file archive is written as ``PATH.part``; only :meth:`Sink.commit` renames
  it to ``PATH`` (after fsync of the file, and of the directory after the rename).
  Nothing ever exists under the final name before the archive is complete.
* The writer holds an exclusive ``flock`` on ``PATH.part`` from its creation to the end
  of the rename: a second writer of the same archive is refused, and a ``.part`` whose
  writer is gone (killed, the machine rebooted) is known stale by its lock, not its age,
  and is replaced (:attr:`FileSink.replaced` says what was).
* A unit whose write fails (``ENOSPC``...) is cut off again (``ftruncate``), so the
  next attempt starts at a unit boundary and the file never carries half an extent.
* A regular-file archive hashes every extent it has written (uncompressed, in file
  order), in the thread that writes it; a unit that failed is not hashed.
* zstd: every unit is its own zstd frame (a concatenation of frames is one valid zstd
  stream, what ``zstd -d`` and vzdump's restore read).  The header is stored as a
  frame of *raw* blocks, so that it keeps its length and can be rewritten in place,
  and each extent frame can be decompressed on its own to read it back.  Extents are
  compressed on every core (:mod:`nbdvma.vma.zstdframes`) and written in order by later
  calls; ``sync``, ``commit`` and the digest first write every unit accepted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import sys
from array import array
from collections.abc import Sequence
from typing import BinaryIO, Protocol

from nbdvma.errors import VmaWriterError
from nbdvma.vma.background import ThreadGuard
from nbdvma.vma.digest import DataDigest, StreamHasher
from nbdvma.vma.fileio import Writeback, preallocate
from nbdvma.vma.zstdframes import (
    FramePipeline,
    decompress_frame,
    parse_compression,
    zstd_raw_frame,
)

__all__ = ["FileSink", "Sink", "StreamSink", "open_sink"]

Buffer = bytes | bytearray | memoryview

# FileSink.reserve sets disk blocks aside this many bytes ahead of the writes.
_RESERVE_AHEAD = 64 << 20


class Sink(Protocol):
    """What :class:`~nbdvma.vma.writer.VmaWriter` needs from its output."""

    #: Units can be read back with :meth:`read_unit`.
    readable: bool
    #: The header can be rewritten in place with :meth:`patch_header`.
    seekable: bool

    def reserve(self, nbytes: int) -> None:
        """A hint: about ``nbytes`` more will be written (space may be set aside)."""

    def write_header(self, header: bytes) -> None:
        """Write the archive header: the first unit, exactly once."""

    def append(self, parts: Sequence[Buffer]) -> int:
        """Write one unit (an extent) made of ``parts``; return its index for read-back.

        On failure nothing of the unit remains and the error propagates.
        """

    def read_unit(self, index: int, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset`` inside unit ``index``."""

    def release(self, buffer: object) -> None:
        """Return once no part given to :meth:`append` is still to be read from ``buffer``."""

    def patch_header(self, header: bytes) -> None:
        """Rewrite the header (same length) in place."""

    def data_digest(self) -> DataDigest | None:
        """The digest of every unit appended so far, uncompressed, or ``None`` where
        the header cannot be rewritten to record it (a stream)."""

    def sync(self) -> None:
        """Make every unit written so far durable."""

    def write_journal(self, data: bytes | None) -> None:
        """Durably store (or, with ``None``, remove) the partial-cluster journal."""

    def commit(self) -> None:
        """Finish: sync, close and give the archive its final name."""

    def abort(self, *, discard: bool = False) -> None:
        """Close without committing; what was written stays under the temporary name,
        unless ``discard`` (or nothing was written at all): then it is removed."""


def _write_all(fd: int, parts: Sequence[Buffer]) -> int:
    """Write all of ``parts`` at the file position; return the number of bytes."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    total = sum(len(v) for v in views)
    while views:
        written = os.writev(fd, views[:1024])  # IOV_MAX
        while written:
            if written >= len(views[0]):
                written -= len(views.pop(0))
            else:
                views[0] = views[0][written:]
                written = 0
    return total


class FileSink:
    """An archive in a regular file, written as ``PATH.part`` and renamed at commit."""

    readable = True
    seekable = True

    def __init__(
        self,
        path: str,
        *,
        compress: str | None = None,
        force: bool = False,
        thread_guard: ThreadGuard = contextlib.nullcontext,
    ) -> None:
        """Create ``PATH.part``; ``thread_guard`` wraps the start of its write-back thread.

        ``force``: an archive that exists under ``PATH`` is replaced at commit (by the
        rename, atomically) instead of refused.

        Raises:
            VmaWriterError: ``PATH`` exists already (without ``force``), or another
                process is writing ``PATH.part``.
            OSError: the file cannot be created.
        """
        self.path = path
        self.force = force
        self.part_path = path + ".part"
        self.journal_path = self.part_path + ".journal"
        #: What an earlier, dead writer had left and this one replaced (``None``: nothing),
        #: e.g. ``"x.vma.part (65,536 bytes) and x.vma.part.journal"``, for the caller to log.
        self.replaced: str | None = None
        self._fd = self._open_part()
        try:
            self._replace_stale()
            self._rfd = os.open(self.part_path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(self._fd)  # the lock goes with it; a stale .part stays stale
            raise
        level = parse_compression(compress)
        self._zstd = (
            None
            if level is None
            else FramePipeline(self._write_frame, level=level, thread_guard=thread_guard)
        )
        self._hasher = StreamHasher()
        self._pos = 0
        self._header_len = 0
        # File offset of each unit's start; one more entry marks the current end.
        self._starts = array("Q")
        self._cache: tuple[int, bytes] | None = None
        self._closed = False
        self._renamed = False
        # The final fsync (or a FLUSH's) then finds little left to write.
        self._writeback = Writeback(self._fd, thread_guard=thread_guard)
        self._reserve_end = 0  # set aside up to here ...
        self._reserve_limit = 0  # ... of what reserve() announced

    def _open_part(self) -> int:
        """Open ``PATH.part`` with its lock held, creating it if need be.

        The lock is what tells a live writer's file from a dead one's (a lock dies with
        its process).  The name is checked again once locked: a writer that was just
        committing may have renamed the file we opened, which then is no ``.part`` any
        more; then try again with a new one.
        """
        for _ in range(10):
            self._check_free()
            fd = os.open(
                self.part_path,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise VmaWriterError(
                        f"{self.part_path}: another process is writing this archive "
                        "(it holds the file's lock); wait for it or choose another name"
                    ) from None
                opened = os.fstat(fd)
                try:
                    named = os.stat(self.part_path, follow_symlinks=False)
                except FileNotFoundError:
                    named = None
            except BaseException:
                os.close(fd)
                raise
            if named is not None and (named.st_dev, named.st_ino) == (
                opened.st_dev,
                opened.st_ino,
            ):
                try:
                    self._check_free()  # committed while we were opening
                except BaseException:
                    os.close(fd)
                    raise
                return fd
            os.close(fd)
        raise VmaWriterError(f"{self.part_path}: keeps being replaced by another process")

    def _check_free(self) -> None:
        if not self.force and os.path.lexists(self.path):
            raise VmaWriterError(
                f"{self.path}: archive exists already (give --force to replace it)"
            )

    def _replace_stale(self) -> None:
        """Empty a ``.part`` (and drop the journal) left by a writer that is gone."""
        size = os.fstat(self._fd).st_size
        left = [f"{self.part_path} ({size:,} bytes)"] if size else []
        for path in (self.journal_path, self.journal_path + ".tmp"):
            if os.path.lexists(path):
                os.unlink(path)
                left.append(path)
        if size:
            os.ftruncate(self._fd, 0)
        if left:
            self.replaced = " and ".join(left)

    def _write_unit(self, parts: Sequence[Buffer]) -> None:
        if self._reserve_end < self._reserve_limit and (
            self._pos + _RESERVE_AHEAD // 2 >= self._reserve_end
        ):
            self._reserve_more()
        try:
            written = _write_all(self._fd, parts)
        except BaseException:
            # Cut the half-written unit off so the next one starts at a boundary.
            os.ftruncate(self._fd, self._pos)
            os.lseek(self._fd, self._pos, os.SEEK_SET)
            raise
        self._writeback.wrote(self._pos, written)
        self._pos += written

    def reserve(self, nbytes: int) -> None:
        """See :meth:`Sink.reserve`: disk blocks past the end, given back at commit.

        Set aside ``_RESERVE_AHEAD`` bytes at a time as the archive grows, never more
        than announced: a large estimate (every allocated byte of the images, most
        of them zeros perhaps) never holds disk space that others could use.
        """
        self._reserve_end = self._pos
        self._reserve_limit = self._pos + nbytes
        self._reserve_more()

    def _reserve_more(self) -> None:
        start = max(self._reserve_end, self._pos)
        length = min(_RESERVE_AHEAD, self._reserve_limit - start)
        if preallocate(self._fd, start, length):
            self._reserve_end = start + length
        else:  # no space, or no fallocate: stop trying
            self._reserve_limit = 0

    def write_header(self, header: bytes) -> None:
        """See :meth:`Sink.write_header`."""
        data = zstd_raw_frame(header) if self._zstd is not None else header
        self._write_unit([data])
        self._header_len = len(data)

    def append(self, parts: Sequence[Buffer]) -> int:
        """See :meth:`Sink.append`.  With zstd the unit is compressed in the pool and
        written by a later call (see :class:`~nbdvma.vma.zstdframes.FramePipeline`)."""
        if self._zstd is not None:
            self._zstd.submit(parts)
            return len(self._starts) + self._zstd.queued - 1
        self._write_frame(None, parts)
        return len(self._starts) - 1

    def _write_frame(self, frame: bytes | None, parts: Sequence[Buffer]) -> None:
        """Write one unit (as ``frame`` when compressed), then account for it."""
        start = self._pos
        self._write_unit(parts if frame is None else [frame])
        # Hashed once written: a unit that failed was cut off again and is not part
        # of the archive.  (Here, in the thread that writes: off the event loop when
        # the server writes an extent, in the worker thread behind BackgroundSink.)
        self._hasher.update(parts)
        self._starts.append(start)

    def read_unit(self, index: int, offset: int, length: int) -> bytes:
        """See :meth:`Sink.read_unit`."""
        if index >= len(self._starts):  # still in the compression pipeline
            assert self._zstd is not None
            return self._zstd.pending(index - len(self._starts))[offset : offset + length]
        start = self._starts[index]
        if self._zstd is None:
            return os.pread(self._rfd, length, start + offset)
        if self._cache is None or self._cache[0] != index:
            end = self._starts[index + 1] if index + 1 < len(self._starts) else self._pos
            frame = os.pread(self._rfd, end - start, start)
            self._cache = (index, decompress_frame(frame))
        return self._cache[1][offset : offset + length]

    def release(self, buffer: object) -> None:
        """See :meth:`Sink.release`: waits for the units still to be compressed."""
        if self._zstd is not None:
            self._zstd.release(buffer)

    def patch_header(self, header: bytes) -> None:
        """See :meth:`Sink.patch_header`."""
        data = zstd_raw_frame(header) if self._zstd is not None else header
        if len(data) != self._header_len:
            raise VmaWriterError("a patched header must keep its length")
        os.pwrite(self._fd, data, 0)

    @property
    def compressed(self) -> bool:
        """Whether units are compressed (in a pool, written by later calls)."""
        return self._zstd is not None

    def data_digest(self) -> DataDigest:
        """See :meth:`Sink.data_digest` (every unit accepted is written first)."""
        if self._zstd is not None:
            self._zstd.drain()
        return self._hasher.result()

    def sync(self) -> None:
        """See :meth:`Sink.sync` (every unit accepted is written first)."""
        if self._zstd is not None:
            self._zstd.drain()
        os.fsync(self._fd)

    def write_journal(self, data: bytes | None) -> None:
        """See :meth:`Sink.write_journal`: written beside the archive, atomically."""
        if data is None:
            if os.path.exists(self.journal_path):
                os.unlink(self.journal_path)
                _fsync_dir(self.journal_path)
            return
        tmp = self.journal_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                _write_all(fd, [data])
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            # A full disk: do not keep half a journal occupying what space is left.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.replace(tmp, self.journal_path)
        _fsync_dir(self.journal_path)

    def commit(self) -> None:
        """See :meth:`Sink.commit`.  Each step is done once, so a failed commit can be
        retried (a failing fsync of the directory, say).  The file is closed (and its
        lock released) only after the rename: until then another writer that opens
        ``PATH.part`` finds it locked, never a finished archive it could take as stale.
        """
        if not self._closed:
            if not self._renamed:
                if self._zstd is not None:
                    self._zstd.drain()
                # Frees what reserve() set aside and was not needed (the size stays).
                os.ftruncate(self._fd, self._pos)
                os.fsync(self._fd)
                if not self.force and os.path.lexists(self.path):
                    raise VmaWriterError(f"{self.path}: appeared while the archive was written")
                os.rename(self.part_path, self.path)
                self._renamed = True
            self._close()
        _fsync_dir(self.path)
        self.write_journal(None)

    def abort(self, *, discard: bool = False) -> None:
        """See :meth:`Sink.abort`: removal happens with the lock still held."""
        if not self._closed and not self._renamed and (discard or self._pos == 0):
            for path in (self.part_path, self.journal_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._zstd is not None:
                self._zstd.close()
            self._writeback.close()
            os.close(self._fd)
            os.close(self._rfd)


class StreamSink:
    """An archive written to a pipe or stdout: no read-back, no header patch."""

    readable = False
    seekable = False

    def __init__(
        self,
        stream: BinaryIO,
        *,
        compress: str | None = None,
        thread_guard: ThreadGuard = contextlib.nullcontext,
    ) -> None:
        """Write to ``stream`` (its file descriptor, unbuffered)."""
        self._stream = stream
        self._fd = stream.fileno()
        level = parse_compression(compress)
        self._zstd = (
            None
            if level is None
            else FramePipeline(self._write_frame, level=level, thread_guard=thread_guard)
        )
        self._count = 0
        self._broken = False

    def _write(self, parts: Sequence[Buffer]) -> None:
        if self._broken:
            raise VmaWriterError("the archive stream failed earlier; it cannot continue")
        try:
            _write_all(self._fd, parts)
        except BaseException:
            # Half a unit went into a pipe: nothing can follow it that a reader accepts.
            self._broken = True
            raise

    def _write_frame(self, frame: bytes, parts: Sequence[Buffer]) -> None:
        self._write([frame])

    def reserve(self, nbytes: int) -> None:
        """Nothing to set aside in a stream."""

    def write_header(self, header: bytes) -> None:
        """See :meth:`Sink.write_header`."""
        self._write([zstd_raw_frame(header) if self._zstd is not None else header])

    def append(self, parts: Sequence[Buffer]) -> int:
        """See :meth:`Sink.append` (with zstd, written by a later call)."""
        if self._zstd is not None:
            self._zstd.submit(parts)
        else:
            self._write(parts)
        self._count += 1
        return self._count - 1

    def read_unit(self, index: int, offset: int, length: int) -> bytes:
        """Not possible on a stream."""
        raise VmaWriterError("the archive is a stream: what was written cannot be read back")

    def release(self, buffer: object) -> None:
        """See :meth:`Sink.release`: waits for the units still to be compressed."""
        if self._zstd is not None:
            self._zstd.release(buffer)

    def patch_header(self, header: bytes) -> None:
        """Not possible on a stream."""
        raise VmaWriterError("the archive is a stream: its header cannot be rewritten")

    def data_digest(self) -> None:
        """None: the header, written first, cannot be rewritten to record one."""
        return None

    def sync(self) -> None:
        """Push what was written to the reader; a pipe has no stable storage."""
        if self._zstd is not None:
            self._zstd.drain()
        try:
            os.fsync(self._fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EROFS, errno.ENOTSUP):
                raise

    def write_journal(self, data: bytes | None) -> None:
        """A stream has nowhere to keep a journal: partial clusters stay in memory."""

    def commit(self) -> None:
        """See :meth:`Sink.commit`."""
        self.sync()

    def abort(self, *, discard: bool = False) -> None:
        """Nothing to undo: the reader of the stream sees it end early."""
        if self._zstd is not None:
            self._zstd.close()


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_sink(
    path: str,
    compress: str | None = None,
    *,
    force: bool = False,
    thread_guard: ThreadGuard = contextlib.nullcontext,
) -> FileSink | StreamSink:
    """Open the output for an archive.

    Args:
        path: a file path, or ``-`` for stdout.  A path ending in ``.zst`` selects
            zstd compression; an existing FIFO or character device is written as a stream.
        compress: ``"zstd"``, ``"zstd:LEVEL"`` or ``None`` (then inferred from the
            ``.zst`` suffix).
        force: replace an archive that exists under ``path`` (at commit).
        thread_guard: what a file's helper thread is started inside (see
            :class:`~nbdvma.vma.background.BackgroundWriter`).

    Raises:
        VmaWriterError: an unknown compression, or the archive exists already.
        OSError: the file cannot be created.
    """
    if compress is None and path.endswith(".zst"):
        compress = "zstd"
    parse_compression(compress)  # an unknown one is refused before a file is made
    if path == "-":
        return StreamSink(sys.stdout.buffer, compress=compress, thread_guard=thread_guard)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = 0
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return StreamSink(
            open(path, "wb", buffering=0), compress=compress, thread_guard=thread_guard
        )
    return FileSink(path, compress=compress, force=force, thread_guard=thread_guard)
