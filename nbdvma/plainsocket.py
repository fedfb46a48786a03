"""A connection's plain (non-TLS) socket, driven with trio's readiness waits only.

trio's socket methods pass through the scheduler around every call that succeeds at
once (a checkpoint before, a cancel-shielded one after): one more turn of the run
loop, with its ``epoll_wait``, per receive and per send.  On the path of an NBD
request that is two to three turns per request; the one after a receive lies between
the request's arrival and its answer.  ``strace`` of ``export`` while ``qemu-img
convert`` read a 2 GiB archive counted 19,220 ``epoll_wait`` for 11,776 requests.

:class:`PlainSocket` calls the socket directly (it is non-blocking: trio made it so)
and waits with :func:`trio.lowlevel.wait_readable` / ``wait_writable`` only when the
kernel says it would block.  A wait is a checkpoint; so that a connection whose data
always arrives at once still lets other tasks run (and sees cancellation), every
:data:`CHECKPOINT_EVERY` calls that did not wait are followed by one
:func:`trio.lowlevel.checkpoint`.

Errors are raised as trio's streams raise them: ``trio.BrokenResourceError`` from the
``OSError``.  Also here: READ replies sent from a file with ``sendfile``
(:meth:`PlainSocket.send_file_runs`), and the options every accepted socket gets
(:func:`tune_socket`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

import trio

from nbdvma.vma.fileio import FileRuns

__all__ = ["CHECKPOINT_EVERY", "UNIX_SEND_BUFFER", "PlainSocket", "tune_socket"]

#: Calls that completed without waiting before one checkpoint.
CHECKPOINT_EVERY = 16
#: Zeros sent between runs, a slice at a time.
_ZEROS = memoryview(bytes(1 << 20))
#: Buffers one ``writev`` takes (Linux's ``IOV_MAX``).
_IOV_MAX = 1024

#: The send buffer asked for on a unix socket; Linux doubles it, to 2 MiB: room for a
#: whole 2 MiB READ reply, the size ``qemu-img convert`` reads in.  With the default
#: (208 KiB) the server stops ten times per such reply until the client has taken
#: some; ``qemu-img convert`` of a 2 GiB archive from ``export`` took 1.84 s against
#: 1.53 s with this (median of 8, alternating; 512 KiB asked: 1.64 s).
UNIX_SEND_BUFFER = 1 << 20
#: Linux's ``SO_SNDBUFFORCE`` (``asm-generic/socket.h``), which Python does not name.
_SO_SNDBUFFORCE = 32

Buffer = bytes | bytearray | memoryview
_T = TypeVar("_T")


def tune_socket(sock: trio.socket.SocketType) -> None:
    """Set the options of an accepted connection's socket.

    TCP: ``TCP_NODELAY`` (a reply goes out at once, not after the previous one's ACK).
    Unix: a send buffer of :data:`UNIX_SEND_BUFFER`.  ``SO_SNDBUF`` is capped at
    ``net.core.wmem_max`` (208 KiB on a stock kernel), which ``SO_SNDBUFFORCE``
    passes where permitted (``CAP_NET_ADMIN``: root), as systemd does for its
    sockets; otherwise the buffer is what the cap allows, which is no fault.  TCP's
    buffers are left to the kernel's autotuning, which a fixed ``SO_SNDBUF`` would
    turn off.
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    elif sock.family == socket.AF_UNIX:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 2 * UNIX_SEND_BUFFER:
            with contextlib.suppress(PermissionError):
                sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, UNIX_SEND_BUFFER)


class PlainSocket:
    """The non-blocking socket ``sock`` of one connection; one receiving task, and
    one sending task at a time (the server's send lock)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        """Drive ``sock`` (its owner closes it; nothing is called after that)."""
        self._sock = sock
        self._fd = sock.fileno()
        self._unwaited = 0

    async def _no_wait(self) -> None:
        """A call completed without waiting: checkpoint now and then."""
        self._unwaited += 1
        if self._unwaited >= CHECKPOINT_EVERY:
            self._unwaited = 0
            await trio.lowlevel.checkpoint()

    async def _wait_readable(self) -> None:
        self._unwaited = 0
        await trio.lowlevel.wait_readable(self._sock)

    async def _wait_writable(self) -> None:
        self._unwaited = 0
        await trio.lowlevel.wait_writable(self._sock)

    async def receive_some(self, max_bytes: int) -> bytes:
        """At most ``max_bytes`` bytes, once some have come; ``b""`` at the end."""
        return await self._receive(partial(os.read, self._fd, max_bytes))

    async def receive_into(self, view: memoryview) -> int:
        """Bytes received into the start of ``view``, once some have come; 0 at the end."""
        return await self._receive(partial(os.readv, self._fd, (view,)))

    async def _receive(self, call: Callable[[], _T]) -> _T:
        """``call()`` (a receive), again once the socket is readable if it would block."""
        while True:
            try:
                result = call()
            except BlockingIOError:
                await self._wait_readable()
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc
            await self._no_wait()
            return result

    async def send_all(self, buffers: Sequence[Buffer]) -> None:
        """Send every byte of ``buffers``, in order, gathered (``writev``): one
        system call for a reply's header and its data, or many small replies."""
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        while views:
            try:
                sent = os.writev(self._fd, views[:_IOV_MAX])
            except BlockingIOError:
                await self._wait_writable()
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc
            while sent:  # drop what went out, keep the rest of a partly sent buffer
                if sent >= len(views[0]):
                    sent -= len(views.pop(0))
                else:
                    views[0] = views[0][sent:]
                    sent = 0
        await self._no_wait()

    async def send_file_runs(self, head: Sequence[Buffer], data: FileRuns) -> None:
        """Send ``head``, then the ``data.length`` bytes of ``data``: ``sendfile`` from
        the file for its runs, zeros between them.

        Raises:
            OSError: the file is shorter than its runs (``EIO``), or ``sendfile``
                failed (reading the file or writing the socket).
            trio.BrokenResourceError: sending the zeros or the head failed.
        """
        await self.send_all(head)
        pos = 0
        for at, source, n in data.runs:
            while pos < at:
                await self.send_all((_ZEROS[: at - pos],))
                pos = min(at, pos + len(_ZEROS))
            end = source + n
            while source < end:
                try:
                    sent = os.sendfile(self._fd, data.fd, source, end - source)
                except BlockingIOError:
                    await self._wait_writable()
                    continue
                # (Another OSError may be the file's as well as the socket's: as it is.)
                if not sent:
                    raise OSError(errno.EIO, "the archive is shorter than when it was indexed")
                source += sent
            pos = at + n
        while pos < data.length:
            await self.send_all((_ZEROS[: data.length - pos],))
            pos = min(data.length, pos + len(_ZEROS))
