"""SIGINT and SIGTERM for the long-running trio work (``serve``, ``backup``).

Both stop the same way: the work's cancel scope is cancelled, the work cleans up (in
QEMU, on disk), and the caller reports which signal it was with exit status 128 + N.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator

import attrs
import trio

__all__ = ["Interrupt", "stop_on_signals"]


@attrs.define
class Interrupt:
    """Which signal stopped the work (``None``: none did)."""

    signum: int | None = None

    @property
    def name(self) -> str:
        """``SIGINT``, ``SIGTERM``."""
        return signal.Signals(self.signum or signal.SIGINT).name


@contextlib.asynccontextmanager
async def stop_on_signals(scope: trio.CancelScope) -> AsyncIterator[Interrupt]:
    """Cancel ``scope`` at the first SIGINT or SIGTERM, and say which one it was.

    The receiver is open before the body runs: a supervisor that signals as soon as it
    sees the first output line gets the clean "interrupted" path, never a
    ``KeyboardInterrupt`` traceback or a bare SIGTERM death.
    """
    caught = Interrupt()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    caught.signum = signum
                    scope.cancel()
                    return

            nursery.start_soon(watch)
            try:
                yield caught
            finally:
                nursery.cancel_scope.cancel()
