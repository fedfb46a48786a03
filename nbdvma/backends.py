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

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Protocol

import trio

from nbdvma.nbd import Capabilities, ExportInfo
from nbdvma.nbd.constants import NbdStateFlag
from nbdvma.vma.writer import DeviceProgress, VmaWriter

__all__ = ["Backend", "NullBackend", "VmaBackend", "full_exports"]

_HOLE = NbdStateFlag.NBD_STATE_HOLE | NbdStateFlag.NBD_STATE_ZERO


class Backend(Protocol):
    """The interface the trio server drives.

    Each export is an :class:`nbdvma.nbd.ExportInfo`: its name, size and the
    :class:`~nbdvma.nbd.Capabilities` the backend gives it (the server sets the block
    sizes it offers).  Every method may raise; the exception's errno (see
    :func:`nbdvma.errors.errno_for_exception`) is what the client sees.
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


def full_exports(disks: Iterable[tuple[str, int]]) -> list[ExportInfo]:
    """Exports of ``(name, size)`` with every capability (:meth:`Capabilities.full`)."""
    return [ExportInfo(name, size, capabilities=Capabilities.full()) for name, size in disks]


class VmaBackend:
    """Exports that write into one shared VMA archive writer.

    Calls into the writer are serialised by one lock.  Writes that only assemble
    clusters run on the event loop; one that may write an extent (every 58 clusters, a
    few MiB), and whatever else may block (fsync for FLUSH and FUA, finishing), runs in
    a worker thread while the lock is held.
    """

    def __init__(self, writer: VmaWriter, devices: dict[str, int]) -> None:
        """Serve ``devices`` (export name -> dev id of ``writer``)."""
        self.writer = writer
        self._dev_ids = dict(devices)
        sizes = {dev_id: size for dev_id, _, size in writer.devices}
        self._exports = full_exports((name, sizes[dev_id]) for name, dev_id in devices.items())
        self.lock = trio.Lock()

    @property
    def exports(self) -> Sequence[ExportInfo]:
        """See :meth:`Backend.exports`."""
        return self._exports

    def progress(self, export_name: str) -> DeviceProgress:
        """The writer's progress for the device behind ``export_name``."""
        return self.writer.progress(self._dev_ids[export_name])

    async def pread(self, export_name: str, offset: int, length: int) -> bytes:
        """See :meth:`Backend.pread`."""
        async with self.lock:
            return self.writer.read(self._dev_ids[export_name], offset, length)

    async def pwrite(
        self, export_name: str, offset: int, data: bytes | bytearray, *, fua: bool
    ) -> None:
        """See :meth:`Backend.pwrite`."""
        dev_id = self._dev_ids[export_name]
        async with self.lock:
            if self.writer.may_write_extent(len(data)):
                # An extent goes to the disk: off the event loop, so that a write the
                # kernel throttles (dirty pages) does not also stop every connection's
                # receive.  The lock keeps the writer to one caller at a time.
                await trio.to_thread.run_sync(
                    partial(self.writer.write, owned=True), dev_id, offset, data
                )
            else:
                self.writer.write(dev_id, offset, data, owned=True)
            if fua:
                await trio.to_thread.run_sync(self.writer.flush)

    async def zero(self, export_name: str, offset: int, length: int, *, fua: bool) -> None:
        """See :meth:`Backend.zero`: no buffer of ``length`` bytes is ever allocated."""
        async with self.lock:
            self.writer.write_zeroes(self._dev_ids[export_name], offset, length)
            if fua:
                await trio.to_thread.run_sync(self.writer.flush)

    async def trim(self, export_name: str, offset: int, length: int, *, fua: bool) -> None:
        """See :meth:`Backend.trim`: a no-op, as the spec allows (contents unspecified)."""

    async def flush(self) -> None:
        """See :meth:`Backend.flush`."""
        async with self.lock:
            await trio.to_thread.run_sync(self.writer.flush)

    async def extents(self, export_name: str, offset: int, length: int) -> list[tuple[int, int]]:
        """See :meth:`Backend.extents`: never-written and zeroed clusters are holes."""
        async with self.lock:
            runs = self.writer.block_status(self._dev_ids[export_name], offset, length)
        return [(n, _HOLE if zero else 0) for n, zero in runs]


class NullBackend:
    """Discards every write and reads zeros, like nbdkit's ``null`` plugin."""

    def __init__(self, disks: Iterable[tuple[str, int]]) -> None:
        """Serve ``disks`` (``(name, size)``) with every capability."""
        self._exports = full_exports(disks)

    @property
    def exports(self) -> Sequence[ExportInfo]:
        """See :meth:`Backend.exports`."""
        return self._exports

    async def pread(self, export_name: str, offset: int, length: int) -> bytes:
        """Zeros."""
        return bytes(length)

    async def pwrite(
        self, export_name: str, offset: int, data: bytes | bytearray, *, fua: bool
    ) -> None:
        """Discard."""

    async def zero(self, export_name: str, offset: int, length: int, *, fua: bool) -> None:
        """Discard."""

    async def trim(self, export_name: str, offset: int, length: int, *, fua: bool) -> None:
        """Discard."""

    async def flush(self) -> None:
        """Nothing to make durable."""

    async def extents(self, export_name: str, offset: int, length: int) -> list[tuple[int, int]]:
        """One hole."""
        return [(length, _HOLE)]
