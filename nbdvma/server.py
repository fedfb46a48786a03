"""The trio NBD server: listeners, a task per connection, requests to a backend.

Each connection runs the sans-IO core (:mod:`nbdvma.nbd`) over a trio stream:

* a *reader* task feeds received bytes to the core and handles its events; every
  :class:`~nbdvma.nbd.Request` is executed in a task of its own, so a client can keep
  many requests in flight (QEMU keeps 16, nbdcopy 64), answered in any order;
* replies go out under one send lock per connection, each whole;
* back-pressure: WRITE payloads held in memory count against a per-connection and a
  server-wide byte budget.  While either is spent the reader stops reading, so TCP
  flow control slows the client down; nothing is ever allocated by a size the client
  claims (the core drains oversize payloads without buffering them);
* every wait has a deadline: the handshake (10 s by default, as qemu-nbd since
  CVE-2024-7409; it includes a TLS handshake) and, optionally, idleness;
* a connection cap: past it, a new connection is closed at once;
* TLS: when the core reports :class:`~nbdvma.nbd.StartTLS`, the ACK goes out, the
  stream is replaced by a ``trio.SSLStream`` (server side) and the handshake runs
  before the core sees another byte.  A DISC or ABORT over TLS ends with a
  ``close_notify``.

The server reports the life of each connection (which export, whether it ended
cleanly) to an observer, which is how ``nbdvma serve`` knows when a disk is done.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import ssl
from collections.abc import Sequence
from typing import cast

import attrs
import trio

from nbdvma.backends import Backend, ReadNow, SendNow, StatusNow, WriteNow, acquire_lock
from nbdvma.errors import RemoteProtocolError, errno_for_exception
from nbdvma.limits import ByteBudget, ServerLimits
from nbdvma.nbd import (
    NEED_DATA,
    ConnectionClosed,
    Disconnect,
    ExportRefused,
    HandshakeAborted,
    NbdServerConnection,
    Outgoing,
    PassedData,
    RejectedRequest,
    Request,
    StartTLS,
    TlsMode,
    TransmissionStarted,
)
from nbdvma.nbd.constants import NbdCmdFlag, NbdCommand
from nbdvma.nbd.wire import REQUEST_HEADER
from nbdvma.plainsocket import PlainSocket, tune_socket
from nbdvma.vma.fileio import FileRuns

__all__ = ["ConnectionObserver", "NbdServer"]

log = logging.getLogger(__name__)

_RECEIVE_SIZE = 256 * 1024
_HEADER_SIZE = REQUEST_HEADER.size  # all a receive takes after a large payload
_IN_PLACE_MIN = 64 * 1024  # payloads smaller than this are joined from pieces as usual
_SMALL = 64 * 1024  # replies smaller than this are joined into one send
_TLS_CLOSE_TIMEOUT = 1.0  # seconds to send a close_notify at the end


class ConnectionObserver:
    """Told about connections; ``nbdvma serve`` uses it to decide completion.

    The default does nothing.  Methods run in the server's tasks and must not block.
    """

    def transmission_started(self, export_name: str) -> None:
        """A client chose the export ``export_name`` and may now send requests."""

    def connection_ended(self, export_name: str) -> None:
        """The connection to the export ``export_name`` is closed (cleanly or not)."""

    def request_failed(self, export_name: str, command: str, error: int) -> None:
        """A request on ``export_name`` was answered with the errno ``error``."""

    def requests_recovered(self, export_name: str, command: str) -> None:
        """A write-type request (not READ) succeeded after requests had failed."""


@attrs.define(eq=False)
class _Connection:
    stream: trio.abc.Stream
    core: NbdServerConnection
    peer: str
    send_lock: trio.Lock = attrs.Factory(trio.Lock)
    budget: ByteBudget = attrs.Factory(lambda: ByteBudget(0))
    export_name: str | None = None
    in_flight: int = 0
    #: the reader's receive, while it waits under a deadline
    receive_scope: trio.CancelScope | None = None
    #: the plain socket under ``stream`` (None under TLS): the hot path goes through it,
    #: and payloads are received in place
    raw: PlainSocket | None = None
    #: budget bytes taken for a payload being received in place
    reserved: int = 0
    # The last message was a WRITE payload received in place (see _receive).
    after_payload: bool = False


class NbdServer:
    """Serves a :class:`~nbdvma.backends.Backend`'s exports over NBD."""

    def __init__(
        self,
        backend: Backend,
        *,
        limits: ServerLimits | None = None,
        observer: ConnectionObserver | None = None,
        tls_mode: TlsMode = TlsMode.OFF,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Create a server for ``backend``; nothing listens until :meth:`serve`.

        Args:
            backend: where requests go.
            limits: resource limits.
            observer: told when connections start transmission and end.
            tls_mode: ``ON``/``REQUIRE`` accept NBD_OPT_STARTTLS (and need
                ``ssl_context``); ``REQUIRE`` refuses everything else before TLS.
            ssl_context: the server's TLS context (see :class:`nbdvma.tls.TlsConfig`).

        Raises:
            ValueError: a TLS mode without an SSL context.
        """
        if tls_mode is not TlsMode.OFF and ssl_context is None:
            raise ValueError(f"TLS mode {tls_mode.value} needs an SSL context")
        self.backend = backend
        self.limits = limits or ServerLimits()
        self.observer = observer or ConnectionObserver()
        # The backend's optional fast path (nbdvma.backends.WriteNow), if it has one.
        self._write_now: WriteNow | None = (
            cast("WriteNow", backend) if hasattr(backend, "write_now") else None
        )
        self._status_now: StatusNow | None = (
            cast("StatusNow", backend) if hasattr(backend, "extents_now") else None
        )
        self._read_now: ReadNow | None = (
            cast("ReadNow", backend) if hasattr(backend, "read_now") else None
        )
        self._send_now: SendNow | None = (
            cast("SendNow", backend) if hasattr(backend, "runs_now") else None
        )
        # A request failed and no write has succeeded since (see requests_recovered).
        self._failing = False
        self.tls_mode = tls_mode
        self.ssl_context = ssl_context
        # The block sizes are the server's to offer: a preferred 64 KiB (a VMA
        # cluster) and the payload limit the connections enforce.
        self.exports = {
            e.name: attrs.evolve(
                e, min_block=1, preferred_block=64 * 1024, max_block=self.limits.max_payload
            )
            for e in backend.exports
        }
        self._budget = ByteBudget(self.limits.server_buffer)
        self.connections = 0

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on every listener until cancelled."""
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started()

    async def _accept_loop(
        self, listener: trio.abc.Listener[trio.abc.Stream], nursery: trio.Nursery
    ) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # EMFILE and friends: do not die, do not spin.
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self.handle_connection, stream)

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one client on ``stream`` until it disconnects; always closes it."""
        peer = _peer_name(stream)
        if self.connections >= self.limits.max_connections:
            log.warning("%s: refused, %d connections open", peer, self.connections)
            await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        if sock is not None:
            tune_socket(sock)
        conn = _Connection(
            stream,
            NbdServerConnection(self.exports, limits=self.limits.protocol, tls=self.tls_mode),
            peer,
            budget=ByteBudget(self.limits.connection_buffer),
            raw=PlainSocket(sock) if sock is not None else None,
        )
        clean = False
        try:
            await self._run(conn)
            clean = True
        # except*: _run's reader raises inside its requests nursery, so trio delivers
        # these wrapped in an ExceptionGroup; a plain except would let one client's
        # protocol error or broken pipe escape and take the whole server down.
        except* _TlsHandshakeFailed as group:
            log.warning("%s: TLS handshake failed: %s", peer, _first_leaf(group))
        except* RemoteProtocolError as group:
            log.info("%s: dropped: %s", peer, _first_leaf(group))
        except* trio.TooSlowError:
            log.info("%s: dropped: handshake or idle deadline passed", peer)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
            log.info("%s: connection lost: %s", peer, _first_leaf(group))
        finally:
            self.connections -= 1
            self._budget.release(conn.reserved)  # a payload cut short while received
            try:
                if clean and isinstance(conn.stream, trio.SSLStream):
                    with trio.move_on_after(_TLS_CLOSE_TIMEOUT):
                        await conn.stream.aclose()  # sends close_notify, waits for nothing
            finally:
                await trio.aclose_forcefully(conn.stream)
            if conn.export_name is not None:
                self.observer.connection_ended(conn.export_name)
                if clean:
                    log.info("%s: disconnected from export %r", peer, conn.export_name)

    async def _send(self, conn: _Connection) -> None:
        """Write what the core has queued (taken now, so messages stay whole)."""
        buffers = conn.core.buffers_to_send()
        if not buffers:
            return
        lock = conn.send_lock
        await acquire_lock(lock)  # one pass of the run loop per reply saved
        try:
            raw = conn.raw
            if raw is None:
                await self._send_stream(conn.stream, buffers)
                return
            pending: list[bytes | bytearray | memoryview] = []
            for buf in buffers:
                if isinstance(buf, PassedData):
                    assert isinstance(buf.source, FileRuns)
                    await raw.send_file_runs(pending, buf.source)
                    pending = []
                else:
                    pending.append(buf)
            await raw.send_all(pending)
        finally:
            lock.release()

    @staticmethod
    async def _send_stream(stream: trio.abc.Stream, buffers: Sequence[Outgoing]) -> None:
        """Send ``buffers`` on a stream (TLS): small ones joined into one send."""
        small = bytearray()
        for buf in buffers:
            assert not isinstance(buf, PassedData)  # only passed on a plain socket
            if len(buf) < _SMALL:
                small += buf
                continue
            if small:
                await stream.send_all(small)
                small = bytearray()
            await stream.send_all(buf)
        if small:
            await stream.send_all(small)

    async def _run(self, conn: _Connection) -> None:
        core = conn.core
        async with trio.open_nursery() as requests:
            deadline = trio.current_time() + self.limits.handshake_timeout
            while True:
                event = core.next_event()
                if event is NEED_DATA:
                    await self._send(conn)
                    if conn.export_name is not None:
                        await conn.budget.wait_for_room()
                        await self._budget.wait_for_room()
                        if conn.in_flight == 0:
                            deadline = trio.current_time() + self.limits.idle_timeout
                        else:
                            deadline = math.inf
                    if deadline == math.inf and self.limits.idle_timeout == math.inf:
                        # no cancel scope per receive on the hot path
                        await self._receive(conn)
                    else:
                        # _execute re-arms the idle deadline when the last request ends.
                        with trio.CancelScope(deadline=deadline) as scope:
                            conn.receive_scope = scope
                            await self._receive(conn)
                        conn.receive_scope = None
                        if scope.cancelled_caught:
                            raise trio.TooSlowError
                elif isinstance(event, Request):
                    if self._write_now is not None and self._done_now(conn, event):
                        continue  # answered; the reply goes with the next _send
                    if (
                        self._status_now is not None
                        and event.command == NbdCommand.NBD_CMD_BLOCK_STATUS
                    ):
                        self._status_at_once(conn, event)
                        continue
                    if (
                        (self._read_now is not None or self._send_now is not None)
                        and event.command == NbdCommand.NBD_CMD_READ
                        and self._read_at_once(conn, event)
                    ):
                        if event.length >= _SMALL:
                            # Sent now: replies read at once never pile up in memory.
                            await self._send(conn)
                        continue
                    cost = len(event.data) if event.data is not None else 0
                    # A payload received in place was counted when its buffer was made.
                    conn.budget.take(cost - conn.reserved)
                    self._budget.take(cost - conn.reserved)
                    conn.reserved = 0
                    conn.in_flight += 1
                    requests.start_soon(self._execute, conn, event, cost)
                elif isinstance(event, StartTLS):
                    await self._send(conn)  # the ACK, in plain text
                    with trio.fail_at(deadline):
                        await self._start_tls(conn)
                elif isinstance(event, TransmissionStarted):
                    conn.export_name = event.export_name
                    log.info("%s: transmission on export %r", conn.peer, conn.export_name)
                    self.observer.transmission_started(event.export_name)
                    await self._send(conn)
                elif isinstance(event, ExportRefused):
                    log.info("%s: refused: no export %r", conn.peer, event.name)
                elif isinstance(event, RejectedRequest):
                    log.info("%s: rejected: %s", conn.peer, event.reason)
                    await self._send(conn)
                elif isinstance(event, HandshakeAborted):
                    # NBD_OPT_ABORT (nbdinfo --list, a probe): the spec lets the client
                    # close without reading our ACK, so a broken pipe here is normal.
                    log.info("%s: the client ended the handshake (NBD_OPT_ABORT)", conn.peer)
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self._send(conn)
                    return
                elif isinstance(event, Disconnect | ConnectionClosed):
                    # DISC: the outstanding requests finish (the nursery waits), then close.
                    if isinstance(event, ConnectionClosed) and event.truncated:
                        log.info("%s: connection closed in the middle of a message", conn.peer)
                    # The replies of requests answered at once (a client that only
                    # shut down its sending side still reads them).
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self._send(conn)
                    return

    async def _receive(self, conn: _Connection) -> None:
        """Receive what comes next and hand it to the core.

        A large WRITE payload on a plain socket is received in place, into the buffer
        the core hands out: one copy (the kernel's) instead of pieces joined later.  Its
        whole length counts against the budgets from the moment the buffer exists.
        """
        core = conn.core
        raw = conn.raw
        if raw is not None and core.payload_wanted() >= _IN_PLACE_MIN:
            if not conn.reserved:
                view = core.payload_buffer()
                conn.reserved = len(view)
                conn.budget.take(conn.reserved)
                self._budget.take(conn.reserved)
            else:
                view = core.payload_buffer()
            with view:
                # The whole payload in this loop: a Unix socket brings at most the
                # sender's buffer (208 KiB) per receive, and a pass through the core
                # and the budgets for each piece cost a tenth of the server's CPU.
                got = 0
                while got < len(view):
                    n = await raw.receive_into(view[got:])
                    if not n:
                        core.receive_data(b"")
                        return
                    core.payload_received(n)
                    got += n
            conn.after_payload = True
            return
        if conn.after_payload:
            # After a large WRITE, the next is likely one too: take its header alone,
            # so that its payload lands in place whole rather than partly in a
            # receive buffer and copied from there.
            conn.after_payload = False
            size = _HEADER_SIZE
        else:
            size = _RECEIVE_SIZE
        if raw is not None:
            core.receive_data(await raw.receive_some(size))
        else:
            core.receive_data(await conn.stream.receive_some(size))

    async def _start_tls(self, conn: _Connection) -> None:
        assert self.ssl_context is not None
        tls = trio.SSLStream(conn.stream, self.ssl_context, server_side=True)
        conn.stream = tls  # closed from now on through the TLS layer
        conn.raw = None
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            reason = getattr(cause, "reason", None) or str(cause or exc) or "connection closed"
            raise _TlsHandshakeFailed(reason) from exc
        conn.core.tls_established()
        log.info("%s: TLS %s established", conn.peer, tls.version())

    def _done_now(self, conn: _Connection, req: Request) -> bool:
        """Answer a WRITE or WRITE_ZEROES (without FUA) at once through the backend's
        :class:`~nbdvma.backends.WriteNow`, if it accepts; ``False``: spawn it as usual."""
        write_now = self._write_now
        assert write_now is not None
        assert conn.export_name is not None
        if int(req.flags) & _FUA:
            return False
        try:
            if req.command == NbdCommand.NBD_CMD_WRITE:
                assert req.data is not None
                done = write_now.write_now(conn.export_name, req.offset, req.data)
            elif req.command == NbdCommand.NBD_CMD_WRITE_ZEROES:
                done = write_now.zero_now(conn.export_name, req.offset, req.length)
            else:
                return False
        except Exception as exc:
            self._answer_error(conn, req, exc)
        else:
            if not done:
                return False
            conn.core.send_reply(req.cookie)
            self._answered(conn.export_name, req)
        # A payload received in place was counted when its buffer was made.
        conn.budget.release(conn.reserved)
        self._budget.release(conn.reserved)
        conn.reserved = 0
        return True

    def _status_at_once(self, conn: _Connection, req: Request) -> None:
        """Answer BLOCK_STATUS in the reader task (:class:`~nbdvma.backends.StatusNow`)."""
        assert self._status_now is not None
        assert conn.export_name is not None
        req_one = bool(int(req.flags) & _REQ_ONE)
        try:
            extents = self._status_now.extents_now(
                conn.export_name, req.offset, req.length, req_one=req_one
            )
        except Exception as exc:
            self._answer_error(conn, req, exc)
        else:
            conn.core.send_block_status(req, extents)

    def _read_at_once(self, conn: _Connection, req: Request) -> bool:
        """Answer a READ in the reader task if the data is at hand
        (:class:`~nbdvma.backends.SendNow`, :class:`~nbdvma.backends.ReadNow`);
        ``False``: spawn it as usual."""
        assert conn.export_name is not None
        data = None
        try:
            if self._send_now is not None and conn.raw is not None and req.length >= _SMALL:
                # (A small read is cheaper copied and joined with other replies into
                # one send than sent with a header send, a mincore and a sendfile.)
                runs = self._send_now.runs_now(conn.export_name, req.offset, req.length)
                if runs is not None:
                    conn.core.send_read_reply(req.cookie, req.offset, PassedData(runs.length, runs))
                    return True
            if self._read_now is not None:
                data = self._read_now.read_now(conn.export_name, req.offset, req.length)
        except Exception as exc:
            self._answer_error(conn, req, exc)
            return True
        if data is None:
            return False
        conn.core.send_read_reply(req.cookie, req.offset, data)
        return True

    def _answer_error(self, conn: _Connection, req: Request, exc: Exception) -> None:
        """Queue the error reply to a request that raised ``exc``."""
        assert conn.export_name is not None
        err = errno_for_exception(exc)
        if err != errno.ENOSPC:
            log.warning("%s: %s failed: %s", conn.peer, req.command.name, exc)
        # (A full disk is the observer's to report: once, not per request.)
        self._failing = True
        self.observer.request_failed(conn.export_name, req.command.name, err)
        conn.core.send_error(req.cookie, err, str(exc))

    def _answered(self, export_name: str, req: Request) -> None:
        """A request succeeded: tell the observer when that ends a run of failures."""
        if self._failing and req.command in _WRITE_COMMANDS:
            self._failing = False
            self.observer.requests_recovered(export_name, req.command.name)

    async def _execute(self, conn: _Connection, req: Request, cost: int) -> None:
        core = conn.core
        export_name = conn.export_name
        assert export_name is not None
        backend = self.backend
        fua = bool(int(req.flags) & _FUA)
        try:
            try:
                if req.command == NbdCommand.NBD_CMD_READ:
                    data = await backend.pread(export_name, req.offset, req.length)
                    core.send_read_reply(req.cookie, req.offset, data)
                elif req.command == NbdCommand.NBD_CMD_WRITE:
                    assert req.data is not None
                    await backend.pwrite(export_name, req.offset, req.data, fua=fua)
                    core.send_reply(req.cookie)
                elif req.command == NbdCommand.NBD_CMD_WRITE_ZEROES:
                    await backend.zero(export_name, req.offset, req.length, fua=fua)
                    core.send_reply(req.cookie)
                elif req.command == NbdCommand.NBD_CMD_TRIM:
                    await backend.trim(export_name, req.offset, req.length, fua=fua)
                    core.send_reply(req.cookie)
                elif req.command == NbdCommand.NBD_CMD_FLUSH:
                    await backend.flush()
                    core.send_reply(req.cookie)
                elif req.command == NbdCommand.NBD_CMD_BLOCK_STATUS:
                    extents = await backend.extents(export_name, req.offset, req.length)
                    core.send_block_status(req, extents)
                else:  # NBD_CMD_CACHE: a hint
                    core.send_reply(req.cookie)
            except Exception as exc:
                self._answer_error(conn, req, exc)
            else:
                self._answered(export_name, req)
            await self._send(conn)
        finally:
            conn.in_flight -= 1
            if conn.in_flight == 0 and conn.receive_scope is not None:
                # The reader has been waiting without an idle deadline (requests were
                # in flight); the connection is idle from now.
                conn.receive_scope.deadline = trio.current_time() + self.limits.idle_timeout
            conn.budget.release(cost)
            self._budget.release(cost)


# Request flags as plain ints: IntFlag's own & is a Python-level method, and these
# tests run on every request.
_FUA = int(NbdCmdFlag.NBD_CMD_FLAG_FUA)
_REQ_ONE = int(NbdCmdFlag.NBD_CMD_FLAG_REQ_ONE)

_WRITE_COMMANDS = frozenset(
    {
        NbdCommand.NBD_CMD_WRITE,
        NbdCommand.NBD_CMD_WRITE_ZEROES,
        NbdCommand.NBD_CMD_FLUSH,
    }
)


class _TlsHandshakeFailed(Exception):
    """The TLS handshake after STARTTLS failed (bad certificate, not TLS, EOF...)."""


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _peer_name(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "client"
    try:
        name = sock.getpeername()
    except OSError:
        return "client"
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return str(name) or "unix client"
