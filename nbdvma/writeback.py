"""Early write-back: the kernel starts writing a file's data while more is being written.

A program that writes a large file and then fsyncs it leaves everything in the page
cache until the fsync, which then writes the whole file out at once: on a disk that
takes 0.3 s per GiB here, that is 0.3 s of waiting at the end (and a page cache full
of dirty pages, which makes the kernel throttle every writer on the machine).
:class:`Writeback` asks the kernel to *start* writing each range as soon as a few MiB
of it have accumulated (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, from a helper
thread, so that the submission work runs on another core).  The final fsync then
waits only for the last few MiB.

It is a hint and nothing more: durability still comes from fsync alone, and errors of
``sync_file_range`` are ignored because the fsync that follows reports the same ones
(``SYNC_FILE_RANGE_WRITE`` without a wait does not consume write-back errors).  Where
the call does not exist (not Linux, not glibc) nothing is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import threading
from collections.abc import Callable

__all__ = ["DEFAULT_STEP", "Writeback"]

#: Start the write-back of a range once this many bytes of it have been written.
DEFAULT_STEP = 8 << 20

_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>; the value is part of the kernel ABI


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


_sync_file_range = _load_sync_file_range()


class Writeback:
    """Starts the write-back of what has been written to ``fd``, a step at a time.

    Call :meth:`wrote` after each write and :meth:`close` before the file descriptor
    is closed (the helper thread must not touch a descriptor number that may already
    belong to another file).
    """

    def __init__(self, fd: int, *, step: int = DEFAULT_STEP) -> None:
        self.fd = fd
        self.step = step
        self._low = -1  # the range written since the last request, [low, high)
        self._high = 0
        self._bytes = 0
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = _sync_file_range is None

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
                self._thread = threading.Thread(
                    target=self._run, name=f"writeback-{self.fd}", daemon=True
                )
                self._thread.start()

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
            with contextlib.suppress(queue.Empty):
                while True:
                    more = self._queue.get_nowait()
                    if more is None:
                        func(self.fd, low, high - low, _SYNC_FILE_RANGE_WRITE)
                        return
                    low, high = min(low, more[0]), max(high, more[1])
            func(self.fd, low, high - low, _SYNC_FILE_RANGE_WRITE)
