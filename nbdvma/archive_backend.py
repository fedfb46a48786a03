"""Read-only NBD exports of an archive's disks (``nbdvma export``, ``nbdvma restore``).

:class:`ArchiveBackend` serves each disk of an :class:`~nbdvma.vma.index.IndexedArchive`
as a read-only export of its exact size: reads come from the archive's file (or its
decompressed zstd frames) in worker threads, so that many reads run at once and none
holds the event loop; block status (``base:allocation``) says which clusters and 4 KiB
blocks the archive stores as zeros (``HOLE|ZERO``), so that ``qemu-img convert`` and
``nbdcopy`` skip them and write sparse images.  Writes never reach it: the core answers
them ``EPERM`` (``NBD_FLAG_READ_ONLY``); should one arrive anyway, it is refused the
same way.  Nothing is ever written, so ``CAN_MULTI_CONN`` holds trivially.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import cast

import trio

from nbdvma.nbd import Capabilities, ExportInfo
from nbdvma.nbd.constants import NbdStateFlag
from nbdvma.vma.index import IndexedArchive

__all__ = ["READ_ONLY", "ArchiveBackend"]

_HOLE = NbdStateFlag.NBD_STATE_HOLE | NbdStateFlag.NBD_STATE_ZERO

#: A read-only export's capabilities: nothing to flush, any number of connections.
READ_ONLY = Capabilities(can_write=False, can_flush=False, can_multi_conn=True)


def _refuse() -> PermissionError:
    return PermissionError(errno.EPERM, "the export is read-only")


class ArchiveBackend:
    """The disks of an indexed archive, as read-only exports (a
    :class:`~nbdvma.backends.Backend`)."""

    def __init__(
        self, archive: IndexedArchive, *, limiter: trio.CapacityLimiter | None = None
    ) -> None:
        """Serve every disk of ``archive.index``; reads run in threads of ``limiter``
        (default: trio's, 40 threads)."""
        self.archive = archive
        self._limiter = limiter
        self._exports = [
            ExportInfo(name, disk.dev.size, capabilities=READ_ONLY)
            for name, disk in archive.index.disks.items()
        ]

    @property
    def exports(self) -> Sequence[ExportInfo]:
        """See :meth:`Backend.exports <nbdvma.backends.Backend.exports>`."""
        return self._exports

    async def pread(self, export_name: str, offset: int, length: int) -> bytes:
        """See :meth:`Backend.pread <nbdvma.backends.Backend.pread>`."""
        data = await trio.to_thread.run_sync(
            self.archive.read, export_name, offset, length, limiter=self._limiter
        )
        # A bytearray, which the core sends as it is (it takes any buffer): no copy.
        return cast(bytes, data)

    async def pwrite(
        self, export_name: str, offset: int, data: bytes | bytearray, *, fua: bool
    ) -> None:
        """Refused (``EPERM``)."""
        raise _refuse()

    async def zero(self, export_name: str, offset: int, length: int, *, fua: bool) -> None:
        """Refused (``EPERM``)."""
        raise _refuse()

    async def trim(self, export_name: str, offset: int, length: int, *, fua: bool) -> None:
        """Refused (``EPERM``)."""
        raise _refuse()

    async def flush(self) -> None:
        """Nothing was ever written: nothing to flush."""

    async def extents(self, export_name: str, offset: int, length: int) -> list[tuple[int, int]]:
        """See :meth:`Backend.extents <nbdvma.backends.Backend.extents>`: zero clusters and
        blocks are ``HOLE|ZERO``, stored ones data; may cover less than ``length``."""
        runs = await trio.to_thread.run_sync(
            self.archive.block_status, export_name, offset, length, limiter=self._limiter
        )
        return [(n, _HOLE if zero else 0) for n, zero in runs]
