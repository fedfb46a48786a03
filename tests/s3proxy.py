"""A TCP proxy in front of an S3 endpoint that counts, slows down or breaks what it passes.

The S3 read tests put it between ``nbdvma`` and SeaweedFS to see what the client really
fetched, independently of both (the bytes the endpoint sent, HTTP headers included),
and to make failures happen at a chosen point: a transfer slowed to a known rate (so
that the endpoint can be killed mid-read), connections cut after N bytes (so that a
resume must happen, or fail), a proxy that stops accepting (an endpoint gone).

Requests pass unchanged: SigV4 signs the ``Host`` header as the client sent it, the
proxy's address, and the endpoint checks it as received.
"""

from __future__ import annotations

import collections
import contextlib
import re
import socket
import threading
import time
from collections.abc import Sequence

__all__ = ["S3Proxy"]

_CHUNK = 64 * 1024
_REQUEST_LINE = re.compile(rb"(?:^|\r\n)(GET|HEAD|PUT|POST|DELETE) /[^ ]* HTTP/1\.1\r\n")


class S3Proxy:
    """Listen on 127.0.0.1 (a free port), forward each connection to ``upstream``.

    Args:
        upstream: ``(host, port)`` of the endpoint.
        rate: bytes per second from the endpoint to the client (``None``: no limit).
        cut_after: the ``i``-th cut drops a connection once it has passed
            ``cut_after[i]`` bytes from the endpoint; after the last, connections pass
            everything.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        rate: float | None = None,
        cut_after: Sequence[int] = (),
    ) -> None:
        self.upstream = upstream
        self.rate = rate
        self.cut_after = list(cut_after)
        self._lock = threading.Lock()
        #: Bytes passed from the endpoint to clients, all connections.
        self.received = 0
        #: Connections accepted.
        self.connections = 0
        #: Requests sent by clients, by method (``GET``, ``HEAD``...), from their
        #: request lines.
        self.requests: collections.Counter[str] = collections.Counter()
        #: Connections cut (see ``cut_after``).
        self.cuts = 0
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: the endpoint URL to give the client."""
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        """Count from zero again."""
        with self._lock:
            self.received = 0
            self.connections = 0
            self.requests.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stopped
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()  # the endpoint is gone: the client sees a reset
                continue
            server.settimeout(None)
            with self._lock:
                self.connections += 1
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        passed = 0
        started = time.monotonic()
        try:
            while data := src.recv(_CHUNK):
                cut = self._cut(passed, len(data)) if down else None
                if cut is not None:
                    # Exactly cut_after bytes pass: the answer's headers get through.
                    dst.sendall(data[:cut])
                    with self._lock:
                        self.received += cut
                    break
                dst.sendall(data)
                passed += len(data)
                if not down:
                    # S3 requests have no body but PUTs and POSTs, which the read tests
                    # never send: every request line starts a line of its own.
                    methods = _REQUEST_LINE.findall(data)
                    with self._lock:
                        self.requests.update(m.decode() for m in methods)
                if down:
                    with self._lock:
                        self.received += len(data)
                    if self.rate:
                        # Sleep until this connection is back under the rate.
                        ahead = passed / self.rate - (time.monotonic() - started)
                        if ahead > 0:
                            time.sleep(ahead)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _cut(self, passed: int, more: int) -> int | None:
        """``None``, or how many of ``more`` bytes may pass before the connection is cut."""
        with self._lock:
            if self.cuts >= len(self.cut_after):
                return None
            limit = self.cut_after[self.cuts]
            if passed + more < limit:
                return None
            self.cuts += 1
            return max(0, limit - passed)

    def stop(self) -> None:
        """Stop accepting (new connections are refused) and drop every connection."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread in accept()
        self._listener.close()
        self._thread.join(5)
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
