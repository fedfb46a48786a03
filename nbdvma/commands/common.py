"""What ``serve`` and ``backup`` share on the command line: signals, options, one-line errors."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

from nbdvma.addresses import Address, parse_address
from nbdvma.errors import AddressError, NbdvmaError, VmaWriterError
from nbdvma.units import parse_size
from nbdvma.vma.zstdframes import parse_compression

__all__ = [
    "address_argument",
    "compress_argument",
    "count_argument",
    "describe_error",
    "first_error",
    "log_to_stderr",
    "mode_argument",
    "read_configs",
    "seconds_argument",
    "size_argument",
]


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a nursery's exception group: its first leaf.

    trio wraps whatever fails inside a nursery in a group; the CLI reports one line.
    """
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def describe_error(exc: BaseException) -> str:
    """One line for an error that ends a command: the thing it concerns, then why.

    An ``OSError`` names its file (``/srv/x.vma.part: No space left on device``);
    a nursery's exception group is reported by its first error.
    """
    if isinstance(exc, BaseExceptionGroup):
        exc = first_error(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def log_to_stderr(prefix: str, *, verbose: bool) -> None:
    """Show the library's log records (``nbdvma.*``) on stderr: warnings always, as
    ``PREFIXwarning: …``; with ``verbose`` the INFO records too, as ``PREFIX…``."""

    class _Format(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            level = "warning: " if record.levelno >= logging.WARNING else ""
            return f"{prefix}{level}{record.getMessage()}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    logger = logging.getLogger("nbdvma")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


def read_configs(
    args: Sequence[tuple[str | None, str]],
) -> list[tuple[str | None, str, bytes]]:
    """Read the files of ``--config`` options.

    Raises:
        NbdvmaError: one cannot be read (the message names it and why).
    """
    items = []
    for name, path in args:
        try:
            with open(path, "rb") as f:
                items.append((name, path, f.read()))
        except OSError as exc:
            raise NbdvmaError(f"config {path}: {exc.strerror or exc}") from None
    return items


def compress_argument(text: str) -> str:
    """``--compress zstd`` or ``zstd:LEVEL`` (1..19), as argparse wants its errors."""
    try:
        parse_compression(text)
    except VmaWriterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def address_argument(text: str) -> Address:
    """An option's ``unix:PATH`` or ``tcp:HOST:PORT``, as argparse wants its errors."""
    try:
        return parse_address(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def mode_argument(text: str) -> int:
    """A unix socket's permissions in octal; the owner must keep read and write."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600:
        raise argparse.ArgumentTypeError(
            f"expected an octal mode from 0600 to 0777 (the owner needs read and write), "
            f"got {text!r}"
        )
    return mode


def count_argument(text: str) -> int:
    """An option's whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def size_argument(text: str) -> int:
    """An option's size (``64K``, ``1.5G``), as argparse wants its errors."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def seconds_argument(text: str) -> float:
    """An option's positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value
