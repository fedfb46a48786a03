"""Ctrl-C and SIGTERM for the archive commands: exceptions, deferred where a file is born.

The commands remove their temporary files when they fail, a signal included, but
only files they know of: a signal whose handler runs between the ``open`` that
creates a file and the assignment that records it would leave that file behind
(Python runs handlers between bytecodes, right after a call returns).  Code that
creates such a file does so inside :func:`deferred`; a signal that arrives meanwhile
is raised when the block ends, once the file is recorded.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["Terminated", "deferred", "install"]


class Terminated(BaseException):
    """SIGTERM, raised like :class:`KeyboardInterrupt` is for SIGINT."""


_depth = 0
_pending: BaseException | None = None


def _interrupt(exc: BaseException) -> None:
    global _pending
    if _depth:
        if _pending is None:
            _pending = exc
        return
    raise exc


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _interrupt(KeyboardInterrupt())


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _interrupt(Terminated())


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends (then raise what came)."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending is not None:
            exc, _pending = _pending, None
            raise exc


@contextlib.contextmanager
def install() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into exceptions for the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, _on_sigint),
        signal.SIGTERM: signal.signal(signal.SIGTERM, _on_sigterm),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
