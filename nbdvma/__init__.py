"""nbdvma: an NBD server that writes QEMU backups into Proxmox VMA archives.

The library's surface, importable from ``nbdvma`` (each name is loaded on first use,
so ``import nbdvma.vma`` alone stays free of trio and the server):

Write and read archives (the I/O-free VMA core)
    :class:`VmaWriter` (disks by random-access writes, the VM state as a stream),
    :func:`open_sink` (a file, ``.zst``, a pipe), :class:`VmaReader` (streaming, with
    every check of Proxmox's reader), :func:`build_index` and :class:`IndexedArchive`
    (an archive's disks read in place, after one checking pass).
Serve NBD (trio)
    :class:`NbdServer` over a :class:`Backend` (yours, or :class:`VmaBackend`,
    :class:`NullBackend`), its exports as :class:`ExportInfo` with
    :class:`Capabilities`; :class:`ServerLimits`.
Serve an archive's disks, read-only; restore them
    :class:`ArchiveBackend` over :func:`open_archive` (what ``nbdvma export`` runs);
    :func:`restore_archive` (raw or qcow2 images).
Serve disks into one archive
    :class:`ArchiveSession` with :class:`SessionOptions` (what ``nbdvma serve`` runs).
Back up a running QEMU
    :func:`run_backup` with :class:`BackupOptions` (what ``nbdvma backup`` runs).
Proxmox's side
    :func:`generate_config`, :func:`archive_configs` (``qemu-server.conf`` with its
    ``#qmdump#map`` lines), :func:`vzdump_name`.
Errors
    :class:`NbdvmaError` is the base of every error raised on purpose.

``examples/`` has runnable scripts; the layout and the direction of imports are in the
README.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "VmaWriter": "nbdvma.vma.writer",
    "open_sink": "nbdvma.vma.sink",
    "VmaReader": "nbdvma.vma.reader",
    "build_index": "nbdvma.vma.index",
    "IndexedArchive": "nbdvma.vma.index",
    "ArchiveBackend": "nbdvma.archive_backend",
    "open_archive": "nbdvma.archive_backend",
    "restore_archive": "nbdvma.restore",
    "NbdServer": "nbdvma.server",
    "ServerLimits": "nbdvma.limits",
    "Backend": "nbdvma.backends",
    "VmaBackend": "nbdvma.backends",
    "NullBackend": "nbdvma.backends",
    "full_exports": "nbdvma.backends",
    "ExportInfo": "nbdvma.nbd",
    "Capabilities": "nbdvma.nbd",
    "ArchiveSession": "nbdvma.session",
    "SessionOptions": "nbdvma.session",
    "BackupOptions": "nbdvma.backup",
    "run_backup": "nbdvma.backup",
    "generate_config": "nbdvma.pve",
    "archive_configs": "nbdvma.pve",
    "vzdump_name": "nbdvma.pve",
    "UnixAddress": "nbdvma.addresses",
    "open_listener": "nbdvma.listeners",
    "TcpAddress": "nbdvma.addresses",
    "parse_address": "nbdvma.addresses",
    "NbdvmaError": "nbdvma.errors",
    "VmaFormatError": "nbdvma.errors",
    "VmaWriterError": "nbdvma.errors",
    "BackupError": "nbdvma.errors",
}

__all__ = [
    "ArchiveBackend",
    "ArchiveSession",
    "Backend",
    "BackupError",
    "BackupOptions",
    "Capabilities",
    "ExportInfo",
    "IndexedArchive",
    "NbdServer",
    "NbdvmaError",
    "NullBackend",
    "ServerLimits",
    "SessionOptions",
    "TcpAddress",
    "UnixAddress",
    "VmaBackend",
    "VmaFormatError",
    "VmaReader",
    "VmaWriter",
    "VmaWriterError",
    "__version__",
    "archive_configs",
    "build_index",
    "full_exports",
    "generate_config",
    "open_archive",
    "open_listener",
    "open_sink",
    "parse_address",
    "restore_archive",
    "run_backup",
    "vzdump_name",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nbdvma' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from nbdvma.addresses import TcpAddress, UnixAddress, parse_address
    from nbdvma.archive_backend import ArchiveBackend, open_archive
    from nbdvma.backends import Backend, NullBackend, VmaBackend, full_exports
    from nbdvma.backup import BackupOptions, run_backup
    from nbdvma.errors import BackupError, NbdvmaError, VmaFormatError, VmaWriterError
    from nbdvma.limits import ServerLimits
    from nbdvma.listeners import open_listener
    from nbdvma.nbd import Capabilities, ExportInfo
    from nbdvma.pve import archive_configs, generate_config, vzdump_name
    from nbdvma.restore import restore_archive
    from nbdvma.server import NbdServer
    from nbdvma.session import ArchiveSession, SessionOptions
    from nbdvma.vma.index import IndexedArchive, build_index
    from nbdvma.vma.reader import VmaReader
    from nbdvma.vma.sink import open_sink
    from nbdvma.vma.writer import VmaWriter
