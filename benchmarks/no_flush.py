"""Run ``nbdvma`` with its durability switched off: for measurement only.

``bench_archive.py`` runs ``create`` and ``extract`` through this beside the real
commands, to show in the same run how much of their time is the write to disk that
makes their output durable (``fsync``, and the early write-back that spreads it over
the run), which ``cp`` leaves to the kernel after it exits.  Nothing else changes.
Never use it for real work: a crash after it returns can lose what it wrote.

    python benchmarks/no_flush.py extract ARCHIVE DIR
"""

from __future__ import annotations

import os
import sys

import nbdvma.vma.fileio
from nbdvma.cli import main


def _no_fsync(fd: object) -> None:
    """Stands in for ``os.fsync``."""


def _no_writeback(self: nbdvma.vma.fileio.Writeback, offset: int, length: int) -> None:
    """Stands in for :meth:`nbdvma.vma.fileio.Writeback.wrote`."""


if __name__ == "__main__":
    os.fsync = _no_fsync
    nbdvma.vma.fileio.Writeback.wrote = _no_writeback  # type: ignore[method-assign]
    sys.exit(main())
