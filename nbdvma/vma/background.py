"""Writes that run in a worker thread while the caller goes on producing the next ones.

The archive tools are a loop of "read, look at the bytes in Python, write": on two
cores, the write system calls (copying into the page cache and ext4's bookkeeping, about
half the time of a ``create``) can run beside the rest, since the GIL is released
for the duration of a system call.  :class:`BackgroundWriter` is that worker: jobs run
one at a time in submission order; the bytes in flight are bounded, so memory is too.

Failure model, for one-shot tools that give up on the first I/O error: the first
job that raises stops the worker, the jobs queued behind it are dropped, and the error
is raised to the caller from its next :meth:`~BackgroundWriter.submit`,
:meth:`~BackgroundWriter.release` or :meth:`~BackgroundWriter.drain` (and from every
one after: the writer stays failed).  Nothing may be assumed written until
:meth:`~BackgroundWriter.drain` has returned.

:class:`BackgroundSink` puts one in front of a :class:`~nbdvma.vma.sink.Sink`
(``nbdvma create``).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nbdvma.vma.digest import DataDigest
    from nbdvma.vma.sink import Sink

__all__ = ["BackgroundSink", "BackgroundWriter", "ThreadGuard", "holds_buffer"]

Buffer = bytes | bytearray | memoryview

#: What a thread is started inside: the command line passes a guard that holds
#: Ctrl-C back (:func:`nbdvma.interrupts.deferred`), the core knows no signals.
ThreadGuard = Callable[[], AbstractContextManager[object]]


def holds_buffer(parts: Sequence[Buffer], buffer: object) -> bool:
    """Whether one of ``parts`` is ``buffer`` or a view of it (then ``buffer`` must not
    be changed or closed until they are written)."""
    return any(p is buffer or (isinstance(p, memoryview) and p.obj is buffer) for p in parts)


class _Job:
    __slots__ = ("fn", "nbytes", "parts")

    def __init__(self, fn: Callable[[], object], parts: Sequence[Buffer], nbytes: int) -> None:
        self.fn = fn
        self.parts = parts
        self.nbytes = nbytes

    def holds(self, buffer: object) -> bool:
        return holds_buffer(self.parts, buffer)


class BackgroundWriter:
    """Runs write jobs in one worker thread, in order, with a bound on bytes in flight."""

    def __init__(
        self,
        *,
        max_bytes: int = 16 << 20,
        name: str = "nbdvma-writer",
        thread_guard: ThreadGuard = contextlib.nullcontext,
    ) -> None:
        """Create a writer; its thread starts with the first job, inside ``thread_guard()``."""
        self.max_bytes = max_bytes
        self.name = name
        self._thread_guard = thread_guard
        self._cond = threading.Condition()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._running: _Job | None = None
        self._bytes = 0  # of the queued and the running jobs
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], object], parts: Sequence[Buffer], nbytes: int) -> None:
        """Queue ``fn`` (which writes ``parts``, ``nbytes`` in all) behind the others.

        The caller must not change ``parts`` until the job is done (see :meth:`release`).
        Waits while more than ``max_bytes`` are in flight.

        Raises:
            BaseException: the error of a job that failed before.
        """
        with self._cond:
            while True:
                self._check()
                if not self._bytes or self._bytes + nbytes <= self.max_bytes:
                    break
                self._cond.wait()
            self._jobs.append(_Job(fn, parts, nbytes))
            self._bytes += nbytes
            if self._thread is None:
                # A signal raised between start() and the assignment would leave a
                # thread that close() cannot stop; one before start(), a thread that
                # close() cannot join: the guard holds signals back.
                with self._thread_guard():
                    thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                    thread.start()
                    self._thread = thread
            self._cond.notify_all()

    def release(self, buffer: object) -> None:
        """Wait until no queued or running job writes from ``buffer`` (or a view of it).

        Raises:
            BaseException: the error of a job that failed.
        """
        with self._cond:
            while True:
                self._check()
                running = self._running is not None and self._running.holds(buffer)
                if not running and not any(job.holds(buffer) for job in self._jobs):
                    return
                self._cond.wait()

    @property
    def idle(self) -> bool:
        """Whether no job is queued or running (work done now stays in order)."""
        with self._cond:
            return self._running is None and not self._jobs

    def drain(self) -> None:
        """Wait until every job submitted so far is done.

        Raises:
            BaseException: the error of a job that failed.
        """
        with self._cond:
            while True:
                self._check()
                if self._running is None and not self._jobs:
                    return
                self._cond.wait()

    def close(self) -> None:
        """Drop the queued jobs, wait for the running one and stop the thread.

        Does not raise a job's error (for clean-up after a failure; :meth:`drain`
        first to finish the work).  Idempotent.
        """
        with self._cond:
            self._closed = True
            self._jobs.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise RuntimeError(f"{self.name}: closed")

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._jobs and not self._closed:
                    cond.wait()
                if self._closed:
                    return
                job = self._running = self._jobs.popleft()
            try:
                job.fn()
            except BaseException as exc:  # handed to the caller, who decides
                with cond:
                    self._error = exc
                    self._running = None
                    self._bytes = 0
                    self._jobs.clear()
                    cond.notify_all()
                return
            with cond:
                self._running = None
                self._bytes -= job.nbytes
                # Drop the last reference to the parts before saying the job is done:
                # the caller may close the buffer they come from (an mmap) at once.
                del job
                cond.notify_all()


class BackgroundSink:
    """Another sink whose extents are written by a worker thread (``nbdvma create``).

    :meth:`append` queues the extent and returns at once, so the caller reads and
    zero-detects the next clusters while the previous ones are being written.  For
    one-shot writers that give up at the first error: a failed extent write is raised
    by a *later* call (and by every one after), so it cannot be retried the way the
    plain sinks allow.  Everything else first waits for the extents in flight; the
    caller must not reuse a buffer given to :meth:`append` before :meth:`release`.
    """

    def __init__(
        self,
        inner: Sink,
        *,
        max_bytes: int = 16 << 20,
        thread_guard: ThreadGuard = contextlib.nullcontext,
    ) -> None:
        """Write to ``inner`` from a thread started inside ``thread_guard()``."""
        self.inner = inner
        self.readable = inner.readable
        self.seekable = inner.seekable
        # At most max_bytes of extents in flight: four to five extents of 3.7 MiB.
        self._worker = BackgroundWriter(
            max_bytes=max_bytes, name="vma-sink", thread_guard=thread_guard
        )
        self._count = 0

    def reserve(self, nbytes: int) -> None:
        """See :meth:`Sink.reserve`."""
        self._worker.drain()
        self.inner.reserve(nbytes)

    def write_header(self, header: bytes) -> None:
        """See :meth:`Sink.write_header`."""
        self._worker.drain()
        self.inner.write_header(header)

    def append(self, parts: Sequence[Buffer]) -> int:
        """See :meth:`Sink.append`; the write itself happens later."""
        parts = list(parts)
        nbytes = sum(memoryview(p).nbytes for p in parts)
        self._worker.submit(functools.partial(self.inner.append, parts), parts, nbytes)
        # The inner sink numbers its units in the same order, one per append.
        self._count += 1
        return self._count - 1

    def read_unit(self, index: int, offset: int, length: int) -> bytes:
        """See :meth:`Sink.read_unit`."""
        self._worker.drain()
        return self.inner.read_unit(index, offset, length)

    def release(self, buffer: object) -> None:
        """See :meth:`Sink.release`: waits for the extents that still read from it.

        The inner sink may still hold views after its ``append`` returned (zstd
        compresses behind): it is asked too, in the worker thread, after the appends
        queued before (a job that names ``buffer``, so that this waits for it).
        """
        self._worker.submit(functools.partial(self.inner.release, buffer), (buffer,), 0)  # type: ignore[arg-type]
        self._worker.release(buffer)

    def patch_header(self, header: bytes) -> None:
        """See :meth:`Sink.patch_header`."""
        self._worker.drain()
        self.inner.patch_header(header)

    def data_digest(self) -> DataDigest | None:
        """See :meth:`Sink.data_digest`: once the extents in flight are written."""
        self._worker.drain()
        return self.inner.data_digest()

    def sync(self) -> None:
        """See :meth:`Sink.sync`."""
        self._worker.drain()
        self.inner.sync()

    def write_journal(self, data: bytes | None) -> None:
        """See :meth:`Sink.write_journal`."""
        self._worker.drain()
        self.inner.write_journal(data)

    def commit(self) -> None:
        """See :meth:`Sink.commit`."""
        self._worker.drain()
        self._worker.close()
        self.inner.commit()

    def abort(self, *, discard: bool = False) -> None:
        """See :meth:`Sink.abort`: extents not yet written are dropped."""
        self._worker.close()
        self.inner.abort(discard=discard)
