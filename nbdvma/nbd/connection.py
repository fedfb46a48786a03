"""The NBD server connection: bytes in, events out, replies to bytes.  No I/O.

How the I/O layer drives it
===========================

One :class:`NbdServerConnection` per client connection.  Like h11, it never
touches a socket:

* the I/O layer feeds what it receives with :meth:`~NbdServerConnection.receive_data`
  (``b""`` means EOF) and then calls :meth:`~NbdServerConnection.next_event` until it
  returns :data:`~.events.NEED_DATA`;
* whatever the core wants to send (the greeting, every option reply, error replies
  to requests it rejected itself, and the replies the I/O layer asks for with the
  ``send_*`` methods) accumulates in an output queue that the I/O layer drains with
  :meth:`~NbdServerConnection.data_to_send` (one ``bytes``) or
  :meth:`~NbdServerConnection.buffers_to_send` (a list of buffers, so a 1 MiB READ
  payload is never copied, and :class:`~.events.PassedData`, READ data the I/O layer
  writes itself, with ``sendfile`` say).  The greeting is queued by the constructor.

The connection is three parts around one receive buffer and one output queue: the
receive state machine (:mod:`.state`, whose theory-of-operation comment has the
diagram), the option phase (:mod:`.handshake`) and the transmission phase
(:mod:`.transmission`).  :meth:`~NbdServerConnection.next_event` runs the handler of
the current receive state until one returns an event or needs data.

The handshake is handled entirely inside the core: the only handshake events are
:class:`~.events.TransmissionStarted`, :class:`~.events.StartTLS` and
:class:`~.events.HandshakeAborted`.  In transmission the I/O layer answers each
:class:`~.events.Request` with exactly one of ``send_reply``, ``send_error``,
``send_read_reply``, ``send_read_reply_chunks`` or ``send_block_status``.

Hard disconnects: anything that breaks framing or is a denial of service raises
:class:`~nbdvma.errors.RemoteProtocolError` from ``next_event`` (bad magic, unknown
client flags, an option longer than 32 MiB, too many options, an unknown export on
EXPORT_NAME, a WRITE payload above the drain cap).  The I/O layer then closes the
socket (after sending what is queued, if it likes).  Every later ``next_event``
raises again.  EOF is the :class:`~.events.ConnectionClosed` event, with
``truncated=True`` if it cut a message short.

What the core does *not* do, and the I/O layer must:

* the handshake deadline (about 10 s, as qemu-nbd): wrap the time until
  :class:`~.events.TransmissionStarted` in ``trio.fail_after`` and close on expiry;
* concurrency: replies may be sent in any order; take a send lock around
  ``send_*`` + ``data_to_send``/``buffers_to_send`` + the socket write, also for the
  reader task, which must flush error replies the core queued on its own;
* on :class:`~.events.Disconnect`, finish the outstanding requests and close (no reply);
* on :class:`~.events.StartTLS`: send the ACK, wrap the stream in TLS, complete the
  TLS handshake (under the handshake deadline), call
  :meth:`~NbdServerConnection.tls_established` and from then on feed *decrypted*
  bytes (see :mod:`.handshake` for the TLS modes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Final

from nbdvma.errors import LocalProtocolError, RemoteProtocolError

from . import wire
from .events import (
    NEED_DATA,
    ConnectionClosed,
    DataChunk,
    Event,
    HoleChunk,
    NeedData,
    Outgoing,
    PassedData,
    Request,
    TransmissionStarted,
)
from .handshake import Handshake
from .records import ExportInfo, Limits, TlsMode
from .state import MID_MESSAGE, NbdPhase, ReceiveState, RxState
from .transmission import Transmission

__all__ = ["NbdServerConnection"]

_Handler = Callable[[], Event | NeedData | None]
_DEFAULT_LIMITS: Final = Limits()


class NbdServerConnection:
    """The server side of one NBD connection (fixed newstyle), without I/O.

    Args:
        exports: the exports offered, by name.  An empty name from the client
            selects the only export when there is exactly one and none is named "".
        limits: denial-of-service limits.
        tls: the TLS mode; with ``ON`` or ``REQUIRE`` the I/O layer must be able
            to act on :class:`~.events.StartTLS`.
    """

    def __init__(
        self,
        exports: Mapping[str, ExportInfo],
        *,
        limits: Limits = _DEFAULT_LIMITS,
        tls: TlsMode = TlsMode.OFF,
    ) -> None:
        self._limits = limits
        self._buf = wire.ReceiveBuffer()
        self._out: list[Outgoing] = []
        self._state = ReceiveState()
        self._eof = False
        self._error_message = ""
        self._handshake = Handshake(
            exports, limits, tls, buf=self._buf, out=self._out, state=self._state
        )
        self._transmission: Transmission | None = None
        # The handler of each receive state; the transmission ones join at GO.
        self._handlers: dict[RxState, _Handler] = {
            RxState.CLIENT_FLAGS: self._handshake.receive_client_flags,
            RxState.OPTION_HEADER: self._handshake.receive_option_header,
            RxState.OPTION_PAYLOAD: self._handshake.receive_option_payload,
            RxState.OPTION_DRAIN: self._handshake.receive_option_drain,
        }

    # --- public state -----------------------------------------------------

    @property
    def phase(self) -> NbdPhase:
        """The current phase (derived from the receive state)."""
        return self._state.phase

    @property
    def export(self) -> ExportInfo | None:
        """The export chosen by GO/EXPORT_NAME (``None`` during the handshake)."""
        return None if self._transmission is None else self._transmission.export

    @property
    def structured_replies(self) -> bool:
        """Whether replies are structured (valid once transmission started)."""
        return self._transmission is not None and self._transmission.structured

    @property
    def tls_mode(self) -> TlsMode:
        """The TLS mode in effect (``OFF`` for a client that is not fixed newstyle)."""
        return self._handshake.tls_mode

    @property
    def tls_active(self) -> bool:
        """Whether :meth:`tls_established` was called (the session is encrypted)."""
        return self._handshake.tls_active

    def tls_established(self) -> None:
        """Report that the TLS handshake after :class:`~.events.StartTLS` succeeded.

        The negotiation continues with the next option, received over TLS; all
        option state from before (structured replies, meta contexts) is forgotten.

        Raises:
            LocalProtocolError: no :class:`~.events.StartTLS` is pending.
        """
        if self._state.current is not RxState.TLS_HANDSHAKE:
            raise LocalProtocolError("tls_established() without a pending StartTLS")
        self._handshake.tls_established()

    # --- input --------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the client; ``b""`` means EOF.

        Data after a :class:`~.events.Disconnect`, :class:`~.events.HandshakeAborted`
        or a protocol error is ignored.

        Raises:
            LocalProtocolError: data fed after EOF, or while the TLS handshake is
                pending (the I/O layer must not read plain text then).
        """
        state = self._state.current
        if state is RxState.CLOSED or state is RxState.ERROR:
            return
        if state is RxState.TLS_HANDSHAKE:
            raise LocalProtocolError("receive_data() while the TLS handshake is pending")
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if not data:
            self._eof = True
        else:
            self._buf.append(data)

    def next_event(self) -> Event | NeedData:
        """Parse the next event from the received bytes.

        Returns:
            An event, or :data:`~.events.NEED_DATA`.  After the connection is finished
            (EOF, Disconnect, HandshakeAborted) it returns ``ConnectionClosed()``.

        Raises:
            RemoteProtocolError: the client broke the protocol badly enough that the
                connection must be dropped (again on every later call).
            LocalProtocolError: called while the TLS handshake is pending.
        """
        state = self._state
        if state.current is RxState.ERROR:
            raise RemoteProtocolError(f"connection already failed: {self._error_message}")
        if state.current is RxState.TLS_HANDSHAKE:
            raise LocalProtocolError("next_event() while the TLS handshake is pending")
        try:
            while True:
                if state.current is RxState.CLOSED:
                    return ConnectionClosed()
                result = self._handlers[state.current]()
                if result is NEED_DATA and self._eof:
                    truncated = len(self._buf) > 0 or state.current in MID_MESSAGE
                    state.goto(RxState.CLOSED)
                    return ConnectionClosed(truncated=truncated)
                if isinstance(result, TransmissionStarted):
                    self._start_transmission()
                if result is not None:
                    return result
        except RemoteProtocolError as exc:
            state.goto(RxState.ERROR)
            self._error_message = str(exc)
            raise

    def _start_transmission(self) -> None:
        agreement = self._handshake.agreement
        assert agreement is not None
        tx = Transmission(agreement, self._limits, buf=self._buf, out=self._out, state=self._state)
        self._transmission = tx
        self._handlers[RxState.REQUEST_HEADER] = tx.receive_request_header
        self._handlers[RxState.WRITE_PAYLOAD] = tx.receive_write_payload
        self._handlers[RxState.WRITE_DRAIN] = tx.receive_write_drain

    # --- a WRITE payload received in place --------------------------------------

    def payload_wanted(self) -> int:
        """Bytes of the current WRITE payload not received yet (0 if none is pending)."""
        return 0 if self._transmission is None else self._transmission.payload_wanted()

    def payload_buffer(self) -> memoryview:
        """Where the rest of the current WRITE payload can be received in place.

        Instead of :meth:`receive_data`, the I/O layer may receive straight into this
        view (``recv_into``) and report with :meth:`payload_received`: the payload then
        lands in its final buffer, copied once by the kernel and never joined from
        pieces.  The buffer is allocated here, once, with the payload's length (which
        was checked against the maximum payload): call this only for a payload that
        :meth:`payload_wanted` says is pending, and count it against your memory budget.

        Raises:
            LocalProtocolError: no WRITE payload is pending.
        """
        if self._transmission is None:
            raise LocalProtocolError("payload_buffer() without a pending WRITE payload")
        return self._transmission.payload_buffer()

    def payload_received(self, n: int) -> None:
        """``n`` more bytes of the payload were received into :meth:`payload_buffer`.

        Raises:
            LocalProtocolError: no payload buffer, or more than it holds.
        """
        if self._transmission is None:
            raise LocalProtocolError(f"payload_received({n}) does not fit the payload buffer")
        self._transmission.payload_received(n)

    # --- output -------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Return (and forget) everything queued for the client, as one ``bytes``.

        Raises:
            LocalProtocolError: a :class:`~.events.PassedData` is queued (only
                :meth:`buffers_to_send` can hand that back).
        """
        if any(isinstance(item, PassedData) for item in self._out):
            raise LocalProtocolError("data_to_send() with PassedData queued: use buffers_to_send()")
        out = b"".join(self._out)  # type: ignore[arg-type]  # checked above
        self._out.clear()
        return out

    def buffers_to_send(self) -> list[Outgoing]:
        """Return (and forget) the queued output, uncopied, in order.

        READ payloads passed to ``send_read_reply`` appear here as given, so they
        must not be modified until written; a :class:`~.events.PassedData` is the
        I/O layer's to write.
        """
        out = self._out[:]  # the queue itself is shared with the two phases
        self._out.clear()
        return out

    def _replies(self) -> Transmission:
        if self._transmission is None:
            raise LocalProtocolError("replies can only be sent once transmission started")
        return self._transmission

    def send_reply(self, cookie: int, error: int = 0) -> None:
        """Answer a request that returns no data: :meth:`.Transmission.send_reply`.

        Raises:
            LocalProtocolError: called during the handshake.
        """
        self._replies().send_reply(cookie, error)

    def send_error(self, cookie: int, error: int, message: str = "") -> None:
        """Answer any request with an error: :meth:`.Transmission.send_error`.

        Raises:
            LocalProtocolError: ``error`` is 0, or called during the handshake.
        """
        self._replies().send_error(cookie, error, message)

    def send_read_reply(
        self, cookie: int, offset: int, data: bytes | bytearray | memoryview | PassedData
    ) -> None:
        """Answer a READ with its data: :meth:`.Transmission.send_read_reply`.

        Raises:
            LocalProtocolError: empty data, or called during the handshake.
        """
        self._replies().send_read_reply(cookie, offset, data)

    def send_read_reply_chunks(self, cookie: int, chunks: Sequence[DataChunk | HoleChunk]) -> None:
        """Answer a READ with data and hole chunks: :meth:`.Transmission.send_read_reply_chunks`.

        Raises:
            LocalProtocolError: no chunks, an empty chunk, or called during the
                handshake.
        """
        self._replies().send_read_reply_chunks(cookie, chunks)

    def send_block_status(self, request: Request, extents: Sequence[tuple[int, int]]) -> None:
        """Answer BLOCK_STATUS with extents: :meth:`.Transmission.send_block_status`.

        Raises:
            LocalProtocolError: no (nonzero) extents, no context was selected, or
                called during the handshake.
        """
        self._replies().send_block_status(request, extents)
