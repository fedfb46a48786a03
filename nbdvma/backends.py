"""What the NBD server serves: backends with declared capabilities, as nbdkit plugins.

A backend owns a set of exports (one per guest disk) and executes requests on them.
The server asks it what it can do (``can_zero``, ``can_multi_conn``...) to choose the
transmission flags, and maps any exception a backend raises to an NBD error with
:func:`nbdvma.errors.errno_for_exception` (``ENOSPC`` stays ``ENOSPC``, the rest ``EIO``).

* :class:`VmaBackend`: every export writes into one shared
  :class:`~nbdvma.vma.writer.VmaWriter`, so FLUSH is global across connections and
  ``CAN_MULTI_CONN`` holds.
* :class:`NullBackend`: discards writes and reads zeros (nbdkit's ``null`` plugin): a
  protocol ceiling for benchmarks.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Protocol

import attrs
import trio

from nbdvma.nbd import Capabilities, ExportInfo
from nbdvma.nbd.constants import NbdStateFlag
from nbdvma.vma.fileio import FileRuns
from nbdvma.vma.writer import DeviceProgress, VmaWriter

__all__ = [
    "Backend",
    "NullBackend",
    "ReadNow",
    "SendNow",
    "StatusNow",
    "VmaBackend",
    "WriteNow",
    "acquire_lock",
    "full_exports",
]

_HOLE = NbdStateFlag.NBD_STATE_HOLE | NbdStateFlag.NBD_STATE_ZERO


class Backend(Protocol):
    """The interface the trio server drives.

    Each export is an :class:`nbdvma.nbd.ExportInfo`: its name, size and the
    :class:`~nbdvma.nbd.Capabilities` the backend gives it (the server sets the block
    sizes it offers).  Every method may raise; the exception's errno (see
    :func:`nbdvma.errors.errno_for_exception`) is what the client sees.

    A backend may also offer :class:`WriteNow`'s two methods: the server then tries
    them first, in its reader task, and only spawns a task for a request they decline.
    """

    @property
    def exports(self) -> Sequence[ExportInfo]:
        """The exports, in a stable order."""

    async def pread(self, export_name: str, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset``."""

    async def pwrite(
        self, export_name: str, offset: int, data: bytes | bytearray, *, fua: bool
    ) -> None:
        """Write ``data``; return only once the backend has accepted it.

        ``data`` is the backend's from now on: the server never reuses or changes it,
        so a backend may keep it without a copy.
        """

    async def zero(self, export_name: str, offset: int, length: int, *, fua: bool) -> None:
        """Make ``[offset, offset+length)`` read as zeros."""

    async def trim(self, export_name: str, offset: int, length: int, *, fua: bool) -> None:
        """A hint that the range is no longer needed."""

    async def flush(self) -> None:
        """Make every acknowledged write durable (on every export and connection)."""

    async def extents(self, export_name: str, offset: int, length: int) -> list[tuple[int, int]]:
        """``(length, base:allocation flags)`` runs from ``offset``."""


class WriteNow(Protocol):
    """The optional fast path of a :class:`Backend` (see :class:`NbdServer`).

    Most writes need no waiting at all (the VMA writer assembles clusters in memory);
    doing those at once, in the task that parsed them, saves a task, a lock and a
    send per request: the replies go out together when the reader next waits for
    data.  Each method returns ``False``, having done nothing, when the request would
    have to wait (a lock held, a disk write due): the server then runs it as usual.
    """

    def write_now(self, export_name: str, offset: int, data: bytes | bytearray) -> bool:
        """Do :meth:`Backend.pwrite` (without FUA) now, or return ``False``."""

    def zero_now(self, export_name: str, offset: int, length: int) -> bool:
        """Do :meth:`Backend.zero` (without FUA) now, or return ``False``."""


class StatusNow(Protocol):
    """Another optional fast path: block status answered in the reader task, for a
    backend that knows it from memory (a client such as ``qemu-img convert`` asks
    thousands of them, one at a time, each with ``NBD_CMD_FLAG_REQ_ONE``)."""

    def extents_now(
        self, export_name: str, offset: int, length: int, *, req_one: bool
    ) -> list[tuple[int, int]]:
        """:meth:`Backend.extents`, at once; with ``req_one`` the first run is enough."""


class ReadNow(Protocol):
    """A third optional fast path: a READ answered in the reader task when the data
    can be had without waiting (already in the page cache, or on a tmpfs).  A thread
    hop costs more than copying a few MiB from memory; a read that would wait for a
    disk still goes to a worker thread, so the event loop never blocks on I/O."""

    def read_now(self, export_name: str, offset: int, length: int) -> bytearray | None:
        """:meth:`Backend.pread` at once, or ``None`` (nothing done) if it would wait."""


class SendNow(Protocol):
    """A fourth optional fast path, beside :class:`ReadNow`: a READ whose bytes lie in
    a file whose pages are in memory is answered with ``sendfile`` from there (on a
    plain socket), never copied into the server's memory."""

    def runs_now(self, export_name: str, offset: int, length: int) -> FileRuns | None:
        """Where the READ's bytes lie, if they can be sent at once; else ``None``."""


async def acquire_lock(lock: trio.Lock) -> None:
    """Acquire ``lock``; at once, without a pass through the scheduler, when it is free
    (trio's ``acquire`` makes one even then, holding the lock meanwhile)."""
    if lock.locked():
        await lock.acquire()
    else:
        lock.acquire_nowait()


def full_exports(disks: Iterable[tuple[str, int]], *, flush: bool = True) -> list[ExportInfo]:
    """Exports of ``(name, size)`` with every capability (:meth:`Capabilities.full`),
    but FLUSH and FUA unless ``flush``."""
    caps = Capabilities.full()
    if not flush:
        caps = attrs.evolve(caps, can_flush=False, can_fua=False)
    return [ExportInfo(name, size, capabilities=caps) for name, size in disks]


class VmaBackend:
    """Exports that write into one shared VMA archive writer.

    Calls into the writer are serialised by :attr:`lock`, uses of its sink by
    :attr:`sink_lock` (taken second).  Writes that only assemble clusters run on the
    event loop.  A write-behind writer seals the extent a write fills (every 58
    clusters, a few MiB): the request that filled it then writes it in a worker thread
    holding only the sink lock, so that the next requests go on at once, and is
    answered once it is written (so a failure, ``ENOSPC``, is that request's).  What
    else may block (a write that would write an extent itself, fsync for FLUSH and FUA,
    finishing) runs in a worker thread with both locks held.
    """

    def __init__(self, writer: VmaWriter, devices: dict[str, int], *, flush: bool = True) -> None:
        """Serve ``devices`` (export name -> dev id of ``writer``).

        ``flush``: offer FLUSH and FUA (``False`` where the sink cannot make anything
        durable before the end: an archive being uploaded).
        """
        self.writer = writer
        self._dev_ids = dict(devices)
        sizes = {dev_id: size for dev_id, _, size in writer.devices}
        self._exports = full_exports(
            ((name, sizes[dev_id]) for name, dev_id in devices.items()), flush=flush
        )
        self.lock = trio.Lock()
        self.sink_lock = trio.Lock()

    @property
    def exports(self) -> Sequence[ExportInfo]:
        """See :meth:`Backend.exports`."""
        return self._exports

    def progress(self, export_name: str) -> DeviceProgress:
        """The writer's progress for the device behind ``export_name``."""
        return self.writer.progress(self._dev_ids[export_name])

    async def pread(self, export_name: str, offset: int, length: int) -> bytes:
        """See :meth:`Backend.pread`."""
        async with self.lock, self.sink_lock:  # a stored cluster is read from the sink
            return self.writer.read(self._dev_ids[export_name], offset, length)

    async def pwrite(
        self, export_name: str, offset: int, data: bytes | bytearray, *, fua: bool
    ) -> None:
        """See :meth:`Backend.pwrite`."""
        dev_id = self._dev_ids[export_name]
        call = partial(self.writer.write, dev_id, offset, data, owned=True)
        await self.apply(
            call, lambda: self.writer.may_write_extent(len(data), offset=offset, now=True)
        )
        if fua:
            await self.flush()

    async def apply(self, call: Callable[[], None], writes_now: Callable[[], bool]) -> None:
        """``call()`` into the writer (a write, zeroes, a VM-state append): in a worker
        thread holding the sink too if ``writes_now()`` says the call itself may write
        an extent, else on the event loop; then the extent it sealed written (if any)."""
        # (Not ``async with``: a free lock held through a pass of the scheduler would
        # make every write_now in that pass decline.)
        lock = self.lock
        await acquire_lock(lock)
        try:
            if writes_now():
                # An extent goes to the disk: off the event loop, so that a write the
                # kernel throttles (dirty pages) does not also stop every connection's
                # receive.
                async with self.sink_lock:
                    await trio.to_thread.run_sync(call)
            else:
                call()
        finally:
            lock.release()
        await self._write_sealed()

    async def _write_sealed(self) -> None:
        """Write the extent a call sealed (if one waits), holding only the sink lock."""
        if self.writer.sealed_waiting():
            async with self.sink_lock:
                if self.writer.sealed_waiting():
                    await trio.to_thread.run_sync(self.writer.write_sealed)

    def write_now(self, export_name: str, offset: int, data: bytes | bytearray) -> bool:
        """See :meth:`WriteNow.write_now`: declined while the lock is held (another
        request is in the writer, in a thread) or when this one may fill an extent
        (which is then written, or sealed for this request to write)."""
        if self.lock.locked() or self.writer.may_write_extent(len(data), offset=offset):
            return False
        self.writer.write(self._dev_ids[export_name], offset, data, owned=True)
        return True

    def zero_now(self, export_name: str, offset: int, length: int) -> bool:
        """See :meth:`WriteNow.zero_now`: declined while the lock is held, or when the
        zeroes complete enough partly written clusters to write an extent (hashing and
        writing a few MiB, work for a thread, not the event loop)."""
        dev_id = self._dev_ids[export_name]
        if self.lock.locked() or self.writer.zeroes_may_write_extent(dev_id, offset, length):
            return False
        self.writer.write_zeroes(dev_id, offset, length)
        return True

    async def zero(self, export_name: str, offset: int, length: int, *, fua: bool) -> None:
        """See :meth:`Backend.zero`: no buffer of ``length`` bytes is ever allocated."""
        dev_id = self._dev_ids[export_name]
        call = partial(self.writer.write_zeroes, dev_id, offset, length)
        await self.apply(
            call, lambda: self.writer.zeroes_may_write_extent(dev_id, offset, length, now=True)
        )
        if fua:
            await self.flush()

    async def trim(self, export_name: str, offset: int, length: int, *, fua: bool) -> None:
        """See :meth:`Backend.trim`: a no-op, as the spec allows (contents unspecified)."""

    async def flush(self) -> None:
        """See :meth:`Backend.flush`."""
        async with self.lock, self.sink_lock:
            await trio.to_thread.run_sync(self.writer.flush)

    async def extents(self, export_name: str, offset: int, length: int) -> list[tuple[int, int]]:
        """See :meth:`Backend.extents`: never-written and zeroed clusters are holes."""
        async with self.lock:
            runs = self.writer.block_status(self._dev_ids[export_name], offset, length)
        return [(n, _HOLE if zero else 0) for n, zero in runs]


class _Coverage:
    """The byte ranges of a disk written so far: sorted, disjoint, adjacent ones merged.

    A client writing in order keeps one range, so a write costs a bisect and a compare.
    """

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.covered = 0

    def add(self, start: int, end: int) -> None:
        """Mark ``[start, end)`` written."""
        if start >= end:
            return
        starts, ends = self.starts, self.ends
        # The ranges that touch [start, end): from the first that ends at or after
        # start to the last that starts at or before end.
        first = bisect.bisect_left(ends, start)
        last = bisect.bisect_right(starts, end)
        if first < last:
            start = min(start, starts[first])
            end = max(end, ends[last - 1])
            self.covered -= sum(ends[i] - starts[i] for i in range(first, last))
        starts[first:last] = [start]
        ends[first:last] = [end]
        self.covered += end - start


class NullBackend:
    """Discards every write and reads zeros, like nbdkit's ``null`` plugin.

    It remembers which bytes were written, so that a session over it ends as one over
    an archive does: once every disk was written completely.
    """

    def __init__(self, disks: Iterable[tuple[str, int]]) -> None:
        """Serve ``disks`` (``(name, size)``) with every capability."""
        self._exports = full_exports(disks)
        self._written = {e.name: _Coverage() for e in self._exports}

    @property
    def exports(self) -> Sequence[ExportInfo]:
        """See :meth:`Backend.exports`."""
        return self._exports

    def progress(self, export_name: str) -> DeviceProgress:
        """How much of the disk was written (and discarded)."""
        size = next(e.size for e in self._exports if e.name == export_name)
        written = self._written[export_name].covered
        return DeviceProgress(
            name=export_name,
            size=size,
            written=written,
            zero_bytes=0,
            stored_bytes=0,
            complete=written == size,
        )

    async def pread(self, export_name: str, offset: int, length: int) -> bytes:
        """Zeros."""
        return bytes(length)

    async def pwrite(
        self, export_name: str, offset: int, data: bytes | bytearray, *, fua: bool
    ) -> None:
        """Discard (and remember the range)."""
        self._written[export_name].add(offset, offset + len(data))

    async def zero(self, export_name: str, offset: int, length: int, *, fua: bool) -> None:
        """Discard (and remember the range)."""
        self._written[export_name].add(offset, offset + length)

    def write_now(self, export_name: str, offset: int, data: bytes | bytearray) -> bool:
        """See :meth:`WriteNow.write_now`: always at once."""
        self._written[export_name].add(offset, offset + len(data))
        return True

    def zero_now(self, export_name: str, offset: int, length: int) -> bool:
        """See :meth:`WriteNow.zero_now`: always at once."""
        self._written[export_name].add(offset, offset + length)
        return True

    async def trim(self, export_name: str, offset: int, length: int, *, fua: bool) -> None:
        """Discard: a trimmed range is not written (as with the VMA backend)."""

    async def flush(self) -> None:
        """Nothing to make durable."""

    async def extents(self, export_name: str, offset: int, length: int) -> list[tuple[int, int]]:
        """One hole."""
        return [(length, _HOLE)]
