"""Two Linux hints that make writing a large file cheaper; neither changes what is written.

**Early write-back.**  A program that writes a large file and then fsyncs it leaves
everything in the page cache until the fsync, which then writes the whole file out at
once: on a disk that takes 0.3 s per GiB here, that is 0.3 s of waiting at the end
(and a page cache full of dirty pages, which makes the kernel throttle every writer on
the machine).  :class:`Writeback` asks the kernel to *start* writing each range as
soon as a few MiB of it have accumulated (``sync_file_range(SYNC_FILE_RANGE_WRITE)``,
from a helper thread, so that the submission work runs on another core).  The final
fsync then waits only for the last few MiB.  Durability still comes from fsync alone;
errors of ``sync_file_range`` are ignored because the fsync that follows reports the
same ones (``SYNC_FILE_RANGE_WRITE`` without a wait does not consume write-back errors).

**Preallocation.**  Buffered writes into blocks that ext4 has already allocated skip
its delayed-allocation bookkeeping for every 4 KiB page (a third of the cost of the
write system call here).  :func:`preallocate` reserves blocks past the end of a file
without changing its size (``fallocate(FALLOC_FL_KEEP_SIZE)``); truncating the file to
its own size gives back what was not used.  Unlike ``posix_fallocate`` it never falls
back to writing zeros where the file system cannot allocate.

**Reads that never wait.**  :func:`nowait_read_flags` tells how a file can be read
without waiting for a disk: on a tmpfs every read is a copy from memory, and elsewhere
``preadv(RWF_NOWAIT)`` reads what is in the page cache and fails with ``EAGAIN``
instead of starting I/O.  A server uses it to answer a READ at once, without the cost
of a thread, whenever that cannot block its event loop.

:func:`pwrite_all` writes several buffers at an offset, retrying short writes (what
``extract`` and ``export``'s one-off decompression need).

Where the calls do not exist (not Linux, not glibc) the hints do nothing; on a tmpfs
there is nothing to write back, and :class:`Writeback` does nothing either.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from nbdvma.vma.background import ThreadGuard

__all__ = [
    "DEFAULT_STEP",
    "FileRuns",
    "PageCache",
    "Writeback",
    "nowait_read_flags",
    "preadv_nowait",
    "preallocate",
    "pwrite_all",
]

#: Start the write-back of a range once this many bytes of it have been written.
DEFAULT_STEP = 8 << 20

# Buffers one pwritev takes at most (Linux's IOV_MAX).
_IOV_MAX = 1024
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>; the values are part of the kernel ABI
_FALLOC_FL_KEEP_SIZE = 1


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    # ctypes releases the GIL for the call, so the helper runs beside the writer.
    return func


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


def _load_fstatfs() -> Callable[[int, ctypes.Array[ctypes.c_long]], int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).fstatfs
    except (OSError, AttributeError):
        return None
    func.restype = ctypes.c_int
    return func


def _load_mapping() -> tuple[Any, Any, Any]:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mmap_, munmap, mincore = libc.mmap, libc.munmap, libc.mincore
    except (OSError, AttributeError):
        return None, None, None
    mmap_.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int64,
    ]
    mmap_.restype = ctypes.c_void_p
    munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    munmap.restype = ctypes.c_int
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    mincore.restype = ctypes.c_int
    return mmap_, munmap, mincore


_libc_mmap, _libc_munmap, _libc_mincore = _load_mapping()
_MAP_FAILED = ctypes.c_void_p(-1).value
_sync_file_range = _load_sync_file_range()
_fallocate = _load_fallocate()
_fstatfs = _load_fstatfs()

# statfs.f_type (<linux/magic.h>) of the file systems that keep every page in memory.
_MEMORY_FS = {0x01021994, 0x858458F6}  # TMPFS_MAGIC, RAMFS_MAGIC


def _in_memory(fd: int) -> bool:
    if _fstatfs is None:
        return False
    # struct statfs is 15 longs or less on 64-bit Linux, f_type first; 32 are plenty.
    buf = (ctypes.c_long * 32)()
    return _fstatfs(fd, buf) == 0 and buf[0] & 0xFFFFFFFF in _MEMORY_FS


def nowait_read_flags(fd: int) -> int | None:
    """The ``preadv`` flags that read ``fd`` without waiting for a disk, or ``None``.

    ``0`` on a tmpfs or ramfs (where no read waits), ``os.RWF_NOWAIT`` where the file
    system supports it (reads of cached pages succeed, others fail with ``EAGAIN``),
    ``None`` where neither holds.
    """
    if _in_memory(fd):
        return 0
    flag: int | None = getattr(os, "RWF_NOWAIT", None)
    if flag is None:
        return None
    try:
        os.preadv(fd, [bytearray(1)], 0, flag)
    except BlockingIOError:
        return flag  # supported: the page was just not cached
    except OSError:
        return None  # EOPNOTSUPP: the file system cannot promise it
    return flag


@attrs.frozen
class FileRuns:
    """Bytes that lie in a file: ``runs`` of ``[position in the bytes, file offset,
    length]``, in order, within ``length``; the bytes between them are zeros.  What
    a server can send with ``sendfile`` instead of reading into memory first."""

    fd: int
    length: int
    runs: list[list[int]]


class PageCache:
    """Whether ranges of a file are in memory, so that ``sendfile`` from them cannot
    wait for a disk (a regular file has no non-blocking ``sendfile``).

    ``mincore`` over a read-only mapping of the whole file that is never touched
    (mapping costs address space only; a page is never faulted in, so a file cut
    short later raises no ``SIGBUS``).  On a tmpfs every page is in memory and
    nothing is mapped.  Since Linux 5.0 ``mincore`` reports the page cache only to
    the file's owner, root, or a process that may write the file, and claims
    everything in memory to others: :meth:`open` then gives ``None``.
    """

    def __init__(self, fd: int, size: int) -> None:
        """Answer for ``size`` bytes of ``fd`` (use :meth:`open`)."""
        self._size = size
        self._address = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        if not _in_memory(fd) and size > 0:
            address = _libc_mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address in (None, _MAP_FAILED):
                raise OSError(ctypes.get_errno(), "mmap for mincore failed")
            self._address = address

    @classmethod
    def open(cls, fd: int) -> PageCache | None:
        """A :class:`PageCache` for ``fd``, or ``None`` where it cannot tell."""
        if _in_memory(fd):
            return cls(fd, 0)
        st = os.fstat(fd)
        # The checks Linux makes before it reports the page cache of a mapped file.
        allowed = os.geteuid() in (0, st.st_uid) or os.access(f"/proc/self/fd/{fd}", os.W_OK)
        if _libc_mincore is None or not allowed:
            return None
        try:
            return cls(fd, st.st_size)
        except OSError:
            return None

    def close(self) -> None:
        """Unmap (idempotent)."""
        if self._address and _libc_munmap is not None:
            address, self._address = self._address, 0
            _libc_munmap(address, self._size)

    def cached(self, offset: int, length: int) -> bool:
        """Whether every page of ``length`` bytes at ``offset`` is in memory."""
        if not self._address:
            return True  # on a tmpfs (or nothing to read)
        if offset < 0 or length <= 0 or offset + length > self._size:
            return False
        first = offset - offset % self._page
        pages = (offset + length - first + self._page - 1) // self._page
        vec = (ctypes.c_ubyte * pages)()
        assert _libc_mincore is not None
        if _libc_mincore(self._address + first, offset + length - first, vec) != 0:
            return False
        return 0 not in bytes(vec)  # bit 0: resident; the other bits are reserved


def preadv_nowait(fd: int, view: memoryview, offset: int, flags: int) -> bool:
    """Fill ``view`` from ``offset`` with ``flags`` from :func:`nowait_read_flags`;
    ``False`` (``view`` partly filled) where that would have waited for a disk."""
    while len(view):
        try:
            n = os.preadv(fd, [view], offset, flags)
        except BlockingIOError:
            return False
        if n <= 0:
            # Past the end: the caller's plain read reports it.
            return False
        view, offset = view[n:], offset + n
    return True


def preallocate(fd: int, offset: int, length: int) -> bool:
    """Reserve disk blocks for ``length`` bytes at ``offset``, keeping the file size.

    A hint: returns whether it was done (not on a file system without ``fallocate``,
    nor when the space is not there; the writes themselves then report ``ENOSPC``).
    """
    if _fallocate is None or length <= 0:
        return False
    if _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    # A failed fallocate may have allocated part of the range: give it back (a
    # truncation to the file's own size frees the blocks past its end).
    with contextlib.suppress(OSError):
        os.ftruncate(fd, os.fstat(fd).st_size)
    return False


class Writeback:
    """Starts the write-back of what has been written to ``fd``, a step at a time.

    Call :meth:`wrote` after each write and :meth:`close` before the file descriptor
    is closed (the helper thread must not touch a descriptor number that may already
    belong to another file).
    """

    def __init__(
        self,
        fd: int,
        *,
        step: int = DEFAULT_STEP,
        thread_guard: ThreadGuard = contextlib.nullcontext,
    ) -> None:
        """Watch ``fd``; a helper thread starts, inside ``thread_guard()``, at the first step."""
        self.fd = fd
        self.step = step
        self._thread_guard = thread_guard
        self._low = -1  # the range written since the last request, [low, high)
        self._high = 0
        self._bytes = 0
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # A tmpfs has no disk to write back to: no thread, no calls.
        self._closed = _sync_file_range is None or _in_memory(fd)

    @property
    def available(self) -> bool:
        """Whether this system has ``sync_file_range`` at all."""
        return _sync_file_range is not None

    def wrote(self, offset: int, length: int) -> None:
        """Record a write of ``length`` bytes at ``offset``; maybe start its write-back."""
        if self._closed or length <= 0:
            return
        end = offset + length
        if self._low < 0:
            self._low, self._high = offset, end
        else:
            self._low = min(self._low, offset)
            self._high = max(self._high, end)
        self._bytes += length
        if self._bytes >= self.step:
            self._queue.put((self._low, self._high))
            self._low, self._high, self._bytes = -1, 0, 0
            if self._thread is None:
                # Started on the first full step only: small files never pay for a thread.
                # Signals held back: see BackgroundWriter.submit.
                with self._thread_guard():
                    thread = threading.Thread(
                        target=self._run, name=f"writeback-{self.fd}", daemon=True
                    )
                    thread.start()
                    self._thread = thread

    def close(self) -> None:
        """Stop the helper thread, waiting for a request it has begun.  Idempotent."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        func = _sync_file_range
        assert func is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            low, high = item
            # Requests that queued up meanwhile become one (the ranges of an archive
            # follow each other; a gap in between costs nothing to scan).
            last = False
            while not last:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    last = True
                else:
                    low, high = min(low, more[0]), max(high, more[1])
            func(self.fd, low, high - low, _SYNC_FILE_RANGE_WRITE)
            if last:
                return


def pwrite_all(fd: int, views: Sequence[memoryview | bytes], offset: int) -> None:
    """Write ``views`` contiguously at ``offset`` (pwritev, retrying short writes)."""
    views = list(views)
    while views:
        batch = views[:_IOV_MAX]
        want = sum(len(v) for v in batch)
        done = os.pwritev(fd, batch, offset)
        offset += done
        if done == want:
            del views[:_IOV_MAX]
            continue
        # Short write: drop what went out and retry the rest.
        rest: list[memoryview | bytes] = []
        for v in batch:
            if done >= len(v):
                done -= len(v)
            else:
                rest.append(memoryview(v)[done:])
                done = 0
        views[: len(batch)] = rest
