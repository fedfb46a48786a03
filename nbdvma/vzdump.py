"""vzdump's task log: its line format, its wording of sizes and durations, its log file.

``nbdvma backup`` logs as vzdump does, so that what parses vzdump's logs parses ours:
``INFO: msg`` lines on stderr, ``YYYY-MM-DD HH:MM:SS INFO: msg`` lines in the
``vzdump-qemu-VMID-….log`` beside the archive.  The formatters are those of
pve-common's ``PVE::Format`` (``render_bytes``, ``render_duration``) and pve-manager's
``PVE::VZDump`` (``format_size``, ``format_time``).
"""

from __future__ import annotations

import math
import time
from typing import TextIO

__all__ = [
    "BackupLog",
    "archive_size",
    "render_bytes",
    "render_duration",
    "render_hms",
]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def render_bytes(value: float, precision: int = 2) -> str:
    """``PVE::Format::render_bytes``: ``1.6 GiB`` (precision 1), ``32.00 GiB`` (2)."""
    unit = 0
    if value > 1023:
        unit = min(int(math.log(value) / math.log(1024)), len(_UNITS) - 1)
        value /= 1024**unit
    return f"{value:.{precision}f} {_UNITS[unit]}"


def render_duration(seconds: float) -> str:
    """``PVE::Format::render_duration``: ``3s``, ``1m 2s``, ``1h 5s`` (a unit whose
    value is 0 is left out; ``0s`` for nothing)."""
    rest = round(seconds)
    parts = []
    for unit, length in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        value, rest = divmod(rest, length)
        if value:
            parts.append(f"{value}{unit}")
    return " ".join(parts) or "0s"


def archive_size(size: int) -> str:
    """``PVE::VZDump::format_size``: ``512KB``, ``37MB``, ``1.23GB``, ``2.00TB``."""
    kib = size / 1024
    if kib < 1024:
        return f"{int(kib)}KB"
    mib = size / (1 << 20)
    if mib < 1024:
        return f"{int(mib)}MB"
    gib = mib / 1024
    if gib < 1024:
        return f"{gib:.2f}GB"
    return f"{gib / 1024:.2f}TB"


def render_hms(seconds: float) -> str:
    """``PVE::VZDump::format_time``: ``00:01:02``."""
    total = int(seconds)
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


class BackupLog:
    """A backup's lines: ``LEVEL: msg`` to ``out``, and with a timestamp to the log file.

    Args:
        out: the task log (stderr).
        path: vzdump's ``.log`` file beside the archive, or ``None``.
    """

    def __init__(self, out: TextIO, path: str | None = None) -> None:
        self.out = out
        self.path = path
        self._file: TextIO | None = None
        if path is not None:
            self._file = open(path, "x", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def line(self, level: str, message: str) -> None:
        """One line (or one per line of ``message``) at ``level`` (INFO, WARN, ERROR)."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for text in message.split("\n"):
            print(f"{level}: {text}", file=self.out, flush=True)
            if self._file is not None:
                self._file.write(f"{stamp} {level}: {text}\n")
                self._file.flush()

    def info(self, message: str) -> None:
        """An ``INFO:`` line."""
        self.line("INFO", message)

    def warn(self, message: str) -> None:
        """A ``WARN:`` line."""
        self.line("WARN", message)

    def error(self, message: str) -> None:
        """An ``ERROR:`` line."""
        self.line("ERROR", message)

    def close(self) -> None:
        """Close the log file (the lines are on disk already: each is flushed)."""
        if self._file is not None:
            self._file.close()
            self._file = None
