"""READ replies sent from a file with ``sendfile``, on a trio socket.

A READ of a plain archive whose pages are in memory (:class:`~nbdvma.backends.SendNow`)
needs no copy through the server: the reply's header is sent, then each stored run goes
from the page cache to the socket with ``sendfile``, with zeros between the runs (the
zero blocks the archive does not store).  The socket is non-blocking: a full socket
buffer is waited for with trio, like any other send.
"""

from __future__ import annotations

import errno
import os

import trio

from nbdvma.vma.fileio import FileRuns

__all__ = ["send_file_runs"]

#: Zeros sent between runs, a slice at a time.
_ZEROS = memoryview(bytes(1 << 20))


async def send_file_runs(
    sock: trio.socket.SocketType, head: bytes | bytearray, data: FileRuns
) -> None:
    """Send ``head``, then the ``data.length`` bytes of ``data``: ``sendfile`` from the
    file for its runs, zeros between them.

    Raises:
        OSError: the file is shorter than its runs (``EIO``), or the socket failed.
    """
    out = sock.fileno()
    if head:
        await _send_bytes(sock, memoryview(head))
    pos = 0
    for at, source, n in data.runs:
        while pos < at:
            pos += await _send_bytes(sock, _ZEROS[: at - pos])
        end = source + n
        while source < end:
            try:
                sent = os.sendfile(out, data.fd, source, end - source)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            if not sent:
                raise OSError(errno.EIO, "the archive is shorter than when it was indexed")
            source += sent
        pos = at + n
    while pos < data.length:
        pos += await _send_bytes(sock, _ZEROS[: data.length - pos])


async def _send_bytes(sock: trio.socket.SocketType, view: memoryview) -> int:
    """Send all of ``view``; its length."""
    done = 0
    while done < len(view):
        done += await sock.send(view[done:])
    return done
