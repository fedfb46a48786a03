"""The server's resource limits, and the byte budget that holds WRITE payloads to them.

Every limit here bounds what a client can make the server hold or wait for
(``docs/security.md``): connections, the handshake's duration, idleness, and the WRITE
payload bytes buffered per connection and server-wide.
"""

from __future__ import annotations

import math

import attrs
import trio

from nbdvma.nbd import Limits

__all__ = ["ByteBudget", "ServerLimits"]

_MiB = 1024 * 1024


@attrs.frozen
class ServerLimits:
    """Resource limits of the server (see ``docs/security.md``)."""

    #: Open connections at once; more are closed at accept.
    max_connections: int = 100
    #: Seconds a client may take from connect to the end of the handshake.
    handshake_timeout: float = 10.0
    #: Seconds a connection in transmission may stay silent with nothing in flight.
    idle_timeout: float = math.inf
    #: WRITE payload bytes one connection may hold in memory.
    connection_buffer: int = 96 * _MiB
    #: WRITE payload bytes all connections together may hold in memory.
    server_buffer: int = 192 * _MiB
    #: Largest READ/WRITE payload advertised in NBD_INFO_BLOCK_SIZE and enforced.
    max_payload: int = 32 * _MiB
    #: Protocol limits of the handshake.
    protocol: Limits = attrs.Factory(Limits)


class ByteBudget:
    """A weighted semaphore for buffered bytes.

    ``acquire(n)`` waits while the budget is spent, but lets a request through when
    nothing else is held, so one request larger than the whole budget cannot stall.
    """

    def __init__(self, limit: int) -> None:
        """A budget of ``limit`` bytes."""
        self.limit = limit
        self.used = 0
        self._changed = trio.Event()

    async def wait_for_room(self) -> None:
        """Wait until something is left of the budget."""
        while self.used >= self.limit:
            await self._changed.wait()

    def take(self, n: int) -> None:
        """Take ``n`` bytes (the caller waited for room first)."""
        self.used += n

    def release(self, n: int) -> None:
        """Give ``n`` bytes back."""
        self.used -= n
        self._changed.set()
        self._changed = trio.Event()
