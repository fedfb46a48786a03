"""The NBD server connection: bytes in, events out, replies to bytes.  No I/O.

Theory of operation
===================

One :class:`NbdServerConnection` per client connection.  Like h11, it never
touches a socket:

* the I/O layer feeds what it receives with :meth:`~NbdServerConnection.receive_data`
  (``b""`` means EOF) and then calls :meth:`~NbdServerConnection.next_event` until it
  returns :data:`NEED_DATA`;
* whatever the core wants to send (the greeting, every option reply, error replies
  to requests it rejected itself, and the replies the I/O layer asks for with the
  ``send_*`` methods) accumulates in an output queue that the I/O layer drains with
  :meth:`~NbdServerConnection.data_to_send` (one ``bytes``) or
  :meth:`~NbdServerConnection.buffers_to_send` (a list of buffers, so a 1 MiB READ
  payload is never copied).  The greeting is queued by the constructor.

The connection goes through two phases, and its input parser through these states
(``_Rx``), each consuming whole messages from a :class:`~.wire.ReceiveBuffer`::

    CLIENT_FLAGS --> OPTION_HEADER --+--> OPTION_PAYLOAD --(handled)--+--> OPTION_HEADER
         (4 bytes)      (16 bytes)   |    (known option <= 64 KiB)    |
                                     +--> OPTION_DRAIN ---(ERR_*)-----+
                                          (unknown or oversize: discarded, never buffered)
    GO + ACK, or EXPORT_NAME -------------------> REQUEST_HEADER  (emits TransmissionStarted)
    ABORT --------------------------------------> CLOSED          (emits HandshakeAborted)

    REQUEST_HEADER --+--> (READ, FLUSH, ... valid) ----------> Request
       (28 bytes)    +--> (invalid, no payload) -------------> RejectedRequest (answered)
                     +--> WRITE_PAYLOAD --(length bytes)-----> Request(data=...)
                     +--> WRITE_DRAIN ---(invalid WRITE)-----> RejectedRequest (answered)
                     +--> DISC --------------------------------> Disconnect; CLOSED

The handshake is handled entirely inside the core: the only handshake events are
:class:`TransmissionStarted` and :class:`HandshakeAborted`.  In transmission every
request is validated here (unknown commands and flags, features that were not
advertised, bounds, alignment, read-only, payload size); a request that fails is
answered with an error reply at once and reported as :class:`RejectedRequest`, so
the I/O layer only ever sees :class:`Request` events it can execute as they are.
The I/O layer answers each one with exactly one of ``send_reply``, ``send_error``,
``send_read_reply``, ``send_read_reply_chunks`` or ``send_block_status``; the core
knows whether structured replies were negotiated and encodes accordingly.

Hard disconnects: anything that breaks framing or is a denial of service raises
:class:`~nbdvma.errors.RemoteProtocolError` from ``next_event`` (bad magic, unknown
client flags, an option longer than 32 MiB, too many options, an unknown export on
EXPORT_NAME, a WRITE payload above the drain cap).  The I/O layer then closes the
socket (after sending what is queued, if it likes).  Every later ``next_event``
raises again.  EOF is the :class:`ConnectionClosed` event, with ``truncated=True``
if it cut a message short.

What the core does *not* do, and the I/O layer must:

* the handshake deadline (about 10 s, as qemu-nbd): wrap the time until
  :class:`TransmissionStarted` in ``trio.fail_after`` and close on expiry;
* concurrency: replies may be sent in any order; take a send lock around
  ``send_*`` + ``data_to_send``/``buffers_to_send`` + the socket write, also for the
  reader task, which must flush error replies the core queued on its own;
* on :class:`Disconnect`, finish the outstanding requests and close (no reply).

TLS (``NBD_OPT_STARTTLS``)
--------------------------

The core implements the spec's three modes (:class:`TlsMode`), chosen per server:

* ``OFF`` (NOTLS): STARTTLS is answered ``NBD_REP_ERR_UNSUP``; ``NBD_REP_ERR_TLS_REQD``
  is never sent.
* ``ON`` (SELECTIVETLS with no TLS-only export): STARTTLS is accepted, and every
  option also works in plain text.
* ``REQUIRE`` (FORCEDTLS): until TLS is up, every option but STARTTLS and ABORT is
  drained unread and answered ``NBD_REP_ERR_TLS_REQD`` (LIST, INFO and GO too, so no
  export name is visible), and EXPORT_NAME, which cannot be answered with an error,
  ends the session.  A client without ``NBD_FLAG_C_FIXED_NEWSTYLE`` cannot negotiate
  TLS at all and is disconnected at once.

On an acceptable STARTTLS (no payload, TLS not yet started) the core queues the ACK
and returns :class:`StartTLS`; its input state becomes ``TLS_HANDSHAKE``::

    OPTION_HEADER --STARTTLS--> TLS_HANDSHAKE --tls_established()--> OPTION_HEADER
                                (no input accepted)                  (negotiation forgotten)

The I/O layer then sends the ACK, wraps its stream in TLS, completes the TLS
handshake (under the handshake deadline) and calls
:meth:`~NbdServerConnection.tls_established`; from then on it feeds *decrypted*
bytes.  Everything negotiated before (structured replies, the meta context
selection) lives in one ``_Negotiation`` object, which is replaced then, as the spec
requires.  Any byte the client sent after its STARTTLS and before the TLS handshake
is a protocol violation (plain-text injection: a man in the middle could otherwise
prepend options to the encrypted session), so the core raises
:class:`~nbdvma.errors.RemoteProtocolError` instead of returning :class:`StartTLS`
when bytes are buffered behind the option.  A second STARTTLS is answered
``NBD_REP_ERR_INVALID``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TypeAlias

import attrs

from nbdvma.errors import LocalProtocolError, RemoteProtocolError

from . import wire
from .constants import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_CONTEXT_ID,
    DEFAULT_MAX_PAYLOAD,
    MAX_STRING_LENGTH,
    NbdClientFlag,
    NbdCmdFlag,
    NbdCommand,
    NbdError,
    NbdHandshakeFlag,
    NbdInfo,
    NbdOption,
    NbdRep,
    NbdReplyFlag,
    NbdTransmissionFlag,
    nbd_error_from_errno,
)

__all__ = [
    "NEED_DATA",
    "ConnectionClosed",
    "DataChunk",
    "Disconnect",
    "Event",
    "ExportInfo",
    "HandshakeAborted",
    "HoleChunk",
    "Limits",
    "NbdPhase",
    "NbdServerConnection",
    "NeedData",
    "RejectedRequest",
    "Request",
    "StartTLS",
    "TlsMode",
    "TransmissionStarted",
]

_KiB = 1024
_MiB = 1024 * 1024
#: Longest error message we put in a structured error chunk.  QEMU 7.2 refuses
#: non-data chunk payloads above 1000 bytes; stay well clear of that.
MAX_ERROR_MESSAGE = 200
#: At most this many extents in one BLOCK_STATUS chunk [SPEC].
MAX_EXTENTS = 1 << 20


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --- configuration ------------------------------------------------------------


class TlsMode(enum.Enum):
    """How the server treats ``NBD_OPT_STARTTLS`` (the spec's TLS modes)."""

    #: NOTLS: STARTTLS is answered NBD_REP_ERR_UNSUP.
    OFF = "off"
    #: SELECTIVETLS: TLS is offered, plain text is allowed too.
    ON = "on"
    #: FORCEDTLS: nothing but STARTTLS and ABORT works before TLS.
    REQUIRE = "require"


@attrs.frozen
class ExportInfo:
    """What the server offers under one export name, and what it can do.

    The transmission flags are derived from the capabilities
    (:meth:`transmission_flags`).  Block sizes are advertised only to clients that
    ask for NBD_INFO_BLOCK_SIZE, and alignment is enforced only for those.

    Raises:
        ValueError: (from the constructor) sizes that the spec or QEMU would reject.
    """

    name: str
    size: int
    description: str = ""
    can_write: bool = True
    can_flush: bool = True
    can_fua: bool = False
    can_trim: bool = False
    can_zero: bool = False
    can_fast_zero: bool = False
    can_cache: bool = False
    can_multi_conn: bool = False
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = DEFAULT_MAX_PAYLOAD

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.size < 1 << 63:
            raise ValueError(f"export size {self.size} out of range")
        for what, s in (("name", self.name), ("description", self.description)):
            b = s.encode()
            if len(b) > MAX_STRING_LENGTH or b"\0" in b:
                raise ValueError(f"export {what} longer than 4096 bytes or containing NUL")
        if not (_is_pow2(self.min_block) and self.min_block <= 64 * _KiB):
            raise ValueError("min_block must be a power of 2 <= 64 KiB")
        if not (
            _is_pow2(self.preferred_block) and self.preferred_block >= max(self.min_block, 512)
        ):
            raise ValueError("preferred_block must be a power of 2 >= max(min_block, 512)")
        if not self.preferred_block <= self.max_block <= DEFAULT_MAX_PAYLOAD:
            raise ValueError("max_block must be in preferred_block..32 MiB")
        if self.max_block % self.min_block:
            raise ValueError("max_block must be a multiple of min_block")

    @property
    def read_only(self) -> bool:
        """True if the export cannot be written (``NBD_FLAG_READ_ONLY``)."""
        return not self.can_write

    def transmission_flags(self, *, structured_replies: bool) -> NbdTransmissionFlag:
        """The transmission flags to advertise.

        Args:
            structured_replies: whether structured replies were negotiated (only
                then is ``NBD_FLAG_SEND_DF`` set).

        Returns:
            ``HAS_FLAGS`` plus a flag per capability; write-side flags (FUA, TRIM,
            WRITE_ZEROES, FAST_ZERO) only on writable exports; FAST_ZERO only with
            WRITE_ZEROES.
        """
        f = NbdTransmissionFlag.NBD_FLAG_HAS_FLAGS
        if self.read_only:
            f |= NbdTransmissionFlag.NBD_FLAG_READ_ONLY
        else:
            if self.can_fua:
                f |= NbdTransmissionFlag.NBD_FLAG_SEND_FUA
            if self.can_trim:
                f |= NbdTransmissionFlag.NBD_FLAG_SEND_TRIM
            if self.can_zero:
                f |= NbdTransmissionFlag.NBD_FLAG_SEND_WRITE_ZEROES
                if self.can_fast_zero:
                    f |= NbdTransmissionFlag.NBD_FLAG_SEND_FAST_ZERO
        if self.can_flush:
            f |= NbdTransmissionFlag.NBD_FLAG_SEND_FLUSH
        if structured_replies:
            f |= NbdTransmissionFlag.NBD_FLAG_SEND_DF
        if self.can_multi_conn:
            f |= NbdTransmissionFlag.NBD_FLAG_CAN_MULTI_CONN
        if self.can_cache:
            f |= NbdTransmissionFlag.NBD_FLAG_SEND_CACHE
        return f


@attrs.frozen
class Limits:
    """Denial-of-service limits of one connection (see the NBD notes §1.3, §2.4).

    Attributes:
        max_option_payload: payload of a known option we buffer; longer ones are
            drained and answered NBD_REP_ERR_TOO_BIG.
        max_option_length: an option longer than this is a hard disconnect.
        max_options: options per handshake (plus one per export) before a hard
            disconnect.
        max_write_drain: an invalid or oversize WRITE whose payload is at most this
            is drained and answered; a longer one is a hard disconnect.
    """

    max_option_payload: int = 64 * _KiB
    max_option_length: int = 32 * _MiB
    max_options: int = 32
    max_write_drain: int = 64 * _MiB


# --- events -------------------------------------------------------------------


class NeedData:
    """Type of :data:`NEED_DATA`: ``next_event`` needs more bytes first."""

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`NbdServerConnection.next_event` when it needs more input.
NEED_DATA: Final = NeedData()


@attrs.frozen
class TransmissionStarted:
    """The handshake ended with GO or EXPORT_NAME; requests follow.

    Attributes:
        export_name: the canonical name (the key in ``exports``).
        structured_replies: whether structured replies were negotiated.
        meta_context_selected: whether ``base:allocation`` was selected for this
            export (BLOCK_STATUS is allowed only then).
        transmission_flags: the flags that were advertised.
    """

    export_name: str
    structured_replies: bool
    meta_context_selected: bool
    transmission_flags: NbdTransmissionFlag


@attrs.frozen
class Request:
    """A valid request the I/O layer must execute and answer exactly once.

    ``data`` is the complete payload of a WRITE and ``None`` otherwise: ``bytes``, or
    a ``bytearray`` received in place (:meth:`NbdServerConnection.payload_buffer`) that
    the core never touches again.  ``offset +
    length`` never exceeds the export size, and ``length`` is never 0 except for
    NBD_CMD_FLUSH, whose offset and length are always 0.
    """

    cookie: int
    command: NbdCommand
    flags: NbdCmdFlag
    offset: int
    length: int
    data: bytes | bytearray | None = attrs.field(default=None, repr=False)


@attrs.frozen
class RejectedRequest:
    """A request the core refused and has *already answered* (for logging only).

    ``command`` and ``flags`` are the raw values (the command may be unknown).
    """

    cookie: int
    command: int
    flags: int
    offset: int
    length: int
    error: NbdError
    reason: str


@attrs.frozen
class StartTLS:
    """NBD_OPT_STARTTLS was accepted and its ACK is queued.

    The I/O layer must send the ACK, run the TLS handshake on the stream (as the
    server), call :meth:`NbdServerConnection.tls_established` and then feed only
    decrypted bytes.
    """


@attrs.frozen
class Disconnect:
    """NBD_CMD_DISC: finish outstanding requests, then close.  No reply."""


@attrs.frozen
class HandshakeAborted:
    """NBD_OPT_ABORT: the ACK is queued; send it and close."""


@attrs.frozen
class ConnectionClosed:
    """The peer closed its side (or the connection is finished).

    ``truncated`` is True if EOF cut a message (header or payload) short.
    """

    truncated: bool = False


Event: TypeAlias = (
    TransmissionStarted
    | StartTLS
    | Request
    | RejectedRequest
    | Disconnect
    | HandshakeAborted
    | ConnectionClosed
)


@attrs.frozen
class DataChunk:
    """Part of a READ reply: ``data`` found at ``offset``."""

    offset: int
    data: bytes | bytearray | memoryview = attrs.field(repr=False)


@attrs.frozen
class HoleChunk:
    """Part of a READ reply: ``length`` bytes of zeroes at ``offset``."""

    offset: int
    length: int


class NbdPhase(enum.Enum):
    """Where the connection is (see the theory of operation)."""

    HANDSHAKE = "handshake"
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"


class _Rx(enum.Enum):
    CLIENT_FLAGS = enum.auto()
    OPTION_HEADER = enum.auto()
    OPTION_PAYLOAD = enum.auto()
    OPTION_DRAIN = enum.auto()
    TLS_HANDSHAKE = enum.auto()
    REQUEST_HEADER = enum.auto()
    WRITE_PAYLOAD = enum.auto()
    WRITE_DRAIN = enum.auto()
    CLOSED = enum.auto()
    ERROR = enum.auto()


# States in which EOF cuts a message short even if the buffer is empty.
_MID_MESSAGE = frozenset({_Rx.OPTION_PAYLOAD, _Rx.OPTION_DRAIN, _Rx.WRITE_PAYLOAD, _Rx.WRITE_DRAIN})


@attrs.define
class _Negotiation:
    """Option state that a STARTTLS ACK must forget (kept together for that reason)."""

    structured_replies: bool = False
    #: canonical export name for which base:allocation was selected, if any
    meta_context_export: str | None = None


_Rejection: TypeAlias = tuple[NbdError, str]

_FUA = NbdCmdFlag.NBD_CMD_FLAG_FUA
_T = NbdTransmissionFlag
_C = NbdCommand

# Commands that need a transmission flag.
_CMD_NEEDS_FLAG: dict[NbdCommand, NbdTransmissionFlag] = {
    _C.NBD_CMD_FLUSH: _T.NBD_FLAG_SEND_FLUSH,
    _C.NBD_CMD_TRIM: _T.NBD_FLAG_SEND_TRIM,
    _C.NBD_CMD_WRITE_ZEROES: _T.NBD_FLAG_SEND_WRITE_ZEROES,
    _C.NBD_CMD_CACHE: _T.NBD_FLAG_SEND_CACHE,
}
# Command flags valid per command: (flag, transmission flag that must be advertised).
_CMD_FLAGS: dict[NbdCommand, tuple[tuple[NbdCmdFlag, NbdTransmissionFlag], ...]] = {
    _C.NBD_CMD_READ: ((NbdCmdFlag.NBD_CMD_FLAG_DF, _T.NBD_FLAG_SEND_DF),),
    _C.NBD_CMD_WRITE_ZEROES: (
        (NbdCmdFlag.NBD_CMD_FLAG_NO_HOLE, _T.NBD_FLAG_SEND_WRITE_ZEROES),
        (NbdCmdFlag.NBD_CMD_FLAG_FAST_ZERO, _T.NBD_FLAG_SEND_FAST_ZERO),
    ),
    _C.NBD_CMD_BLOCK_STATUS: ((NbdCmdFlag.NBD_CMD_FLAG_REQ_ONE, _T.NBD_FLAG_HAS_FLAGS),),
}
_WRITES = frozenset({_C.NBD_CMD_WRITE, _C.NBD_CMD_WRITE_ZEROES, _C.NBD_CMD_TRIM})
_KNOWN_COMMANDS = frozenset(int(c) for c in NbdCommand)


def _utf8_prefix(message: str, limit: int) -> bytes:
    return message.encode("utf-8", "replace")[:limit].decode("utf-8", "ignore").encode()


# --- the connection -----------------------------------------------------------


class NbdServerConnection:
    """The server side of one NBD connection (fixed newstyle), without I/O.

    Args:
        exports: the exports offered, by name.  An empty name from the client
            selects the only export when there is exactly one and none is named "".
        limits: denial-of-service limits.
        tls: the TLS mode; with ``ON`` or ``REQUIRE`` the I/O layer must be able
            to act on :class:`StartTLS`.
    """

    def __init__(
        self,
        exports: Mapping[str, ExportInfo],
        *,
        limits: Limits = Limits(),
        tls: TlsMode = TlsMode.OFF,
    ) -> None:
        self._exports = dict(exports)
        self._limits = limits
        self._tls_mode = tls
        self._tls_active = False
        self._buf = wire.ReceiveBuffer()
        self._out: list[bytes | bytearray | memoryview] = []
        self._rx = _Rx.CLIENT_FLAGS
        self._eof = False
        self._phase = NbdPhase.HANDSHAKE
        self._error_message = ""
        # handshake
        self._no_zeroes = False
        self._option_count = 0
        self._max_options = limits.max_options + len(self._exports)
        self._neg = _Negotiation()
        self._option: wire.OptionHeader | None = None
        self._drain_left = 0
        self._drain_reply: tuple[NbdRep, str] | None = None  # None: ABORT
        # transmission (set by _start_transmission)
        self._export: ExportInfo | None = None
        self._structured = False
        self._meta = False
        self._flags = NbdTransmissionFlag(0)
        self._min_block = 1
        self._max_payload = DEFAULT_MAX_PAYLOAD
        self._request: wire.RequestHeader | None = None
        # A WRITE payload being received in place (see payload_buffer)
        self._payload: bytearray | None = None
        self._payload_pos = 0
        self._rejection: _Rejection | None = None
        self._option_handlers: dict[int, Callable[[int, bytes], Event | None]] = {
            NbdOption.NBD_OPT_EXPORT_NAME: self._opt_export_name,
            NbdOption.NBD_OPT_LIST: self._opt_list,
            NbdOption.NBD_OPT_STARTTLS: self._opt_starttls,
            NbdOption.NBD_OPT_INFO: self._opt_info_or_go,
            NbdOption.NBD_OPT_GO: self._opt_info_or_go,
            NbdOption.NBD_OPT_STRUCTURED_REPLY: self._opt_structured_reply,
            NbdOption.NBD_OPT_LIST_META_CONTEXT: self._opt_meta_context,
            NbdOption.NBD_OPT_SET_META_CONTEXT: self._opt_meta_context,
            NbdOption.NBD_OPT_EXTENDED_HEADERS: self._opt_extended_headers,
        }
        self._rx_handlers: dict[_Rx, Callable[[], Event | NeedData | None]] = {
            _Rx.CLIENT_FLAGS: self._rx_client_flags,
            _Rx.OPTION_HEADER: self._rx_option_header,
            _Rx.OPTION_PAYLOAD: self._rx_option_payload,
            _Rx.OPTION_DRAIN: self._rx_option_drain,
            _Rx.REQUEST_HEADER: self._rx_request_header,
            _Rx.WRITE_PAYLOAD: self._rx_write_payload,
            _Rx.WRITE_DRAIN: self._rx_write_drain,
        }
        self._out.append(
            wire.encode_greeting(
                NbdHandshakeFlag.NBD_FLAG_FIXED_NEWSTYLE | NbdHandshakeFlag.NBD_FLAG_NO_ZEROES
            )
        )

    # --- public state -----------------------------------------------------

    @property
    def phase(self) -> NbdPhase:
        """The current phase."""
        return self._phase

    @property
    def export(self) -> ExportInfo | None:
        """The export chosen by GO/EXPORT_NAME (``None`` during the handshake)."""
        return self._export

    @property
    def structured_replies(self) -> bool:
        """Whether replies are structured (valid once transmission started)."""
        return self._structured

    @property
    def tls_mode(self) -> TlsMode:
        """The TLS mode in effect (``OFF`` for a client that is not fixed newstyle)."""
        return self._tls_mode

    @property
    def tls_active(self) -> bool:
        """Whether :meth:`tls_established` was called (the session is encrypted)."""
        return self._tls_active

    def tls_established(self) -> None:
        """Report that the TLS handshake after :class:`StartTLS` succeeded.

        The negotiation continues with the next option, received over TLS; all
        option state from before (structured replies, meta contexts) is forgotten.

        Raises:
            LocalProtocolError: no :class:`StartTLS` is pending.
        """
        if self._rx is not _Rx.TLS_HANDSHAKE:
            raise LocalProtocolError("tls_established() without a pending StartTLS")
        self._tls_active = True
        self._neg = _Negotiation()
        self._rx = _Rx.OPTION_HEADER

    # --- input --------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the client; ``b""`` means EOF.

        Data after a :class:`Disconnect`, :class:`HandshakeAborted` or a protocol
        error is ignored.

        Raises:
            LocalProtocolError: data fed after EOF, or while the TLS handshake is
                pending (the I/O layer must not read plain text then).
        """
        if self._rx in (_Rx.CLOSED, _Rx.ERROR):
            return
        if self._rx is _Rx.TLS_HANDSHAKE:
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
            An event, or :data:`NEED_DATA`.  After the connection is finished
            (EOF, Disconnect, HandshakeAborted) it returns ``ConnectionClosed()``.

        Raises:
            RemoteProtocolError: the client broke the protocol badly enough that the
                connection must be dropped (again on every later call).
            LocalProtocolError: called while the TLS handshake is pending.
        """
        if self._rx is _Rx.ERROR:
            raise RemoteProtocolError(f"connection already failed: {self._error_message}")
        if self._rx is _Rx.TLS_HANDSHAKE:
            raise LocalProtocolError("next_event() while the TLS handshake is pending")
        try:
            while True:
                if self._rx is _Rx.CLOSED:
                    return ConnectionClosed()
                result = self._rx_handlers[self._rx]()
                if result is NEED_DATA and self._eof:
                    truncated = len(self._buf) > 0 or self._rx in _MID_MESSAGE
                    self._close()
                    return ConnectionClosed(truncated=truncated)
                if result is not None:
                    return result
        except RemoteProtocolError as exc:
            self._rx = _Rx.ERROR
            self._phase = NbdPhase.ERROR
            self._error_message = str(exc)
            raise

    def _close(self) -> None:
        self._rx = _Rx.CLOSED
        self._phase = NbdPhase.CLOSED

    # --- output -------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Return (and forget) everything queued for the client, as one ``bytes``."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def payload_wanted(self) -> int:
        """Bytes of the current WRITE payload not received yet (0 if none is pending)."""
        if self._rx is not _Rx.WRITE_PAYLOAD:
            return 0
        assert self._request is not None
        have = self._payload_pos if self._payload is not None else 0
        return max(0, self._request.length - have - len(self._buf))

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
        if not self.payload_wanted():
            raise LocalProtocolError("payload_buffer() without a pending WRITE payload")
        hdr = self._request
        assert hdr is not None
        if self._payload is None:
            self._payload = bytearray(hdr.length)
            self._payload_pos = 0
        self._absorb_buffered_payload()  # what receive_data already brought goes first
        return memoryview(self._payload)[self._payload_pos :]

    def _absorb_buffered_payload(self) -> None:
        """Move received bytes of the current payload into its in-place buffer."""
        assert self._payload is not None
        take = min(len(self._buf), len(self._payload) - self._payload_pos)
        if take:
            piece = self._buf.consume_exactly(take)
            assert piece is not None
            self._payload[self._payload_pos : self._payload_pos + take] = piece
            self._payload_pos += take

    def payload_received(self, n: int) -> None:
        """``n`` more bytes of the payload were received into :meth:`payload_buffer`.

        Raises:
            LocalProtocolError: no payload buffer, or more than it holds.
        """
        if self._payload is None or not 0 < n <= len(self._payload) - self._payload_pos:
            raise LocalProtocolError(f"payload_received({n}) does not fit the payload buffer")
        self._payload_pos += n

    def buffers_to_send(self) -> list[bytes | bytearray | memoryview]:
        """Return (and forget) the queued output as a list of buffers, uncopied.

        READ payloads passed to ``send_read_reply`` appear here as given, so they
        must not be modified until written.
        """
        out = self._out
        self._out = []
        return out

    # --- handshake ----------------------------------------------------------

    def _rx_client_flags(self) -> NeedData | None:
        data = self._buf.consume_exactly(wire.CLIENT_FLAGS.size)
        if data is None:
            return NEED_DATA
        flags = wire.parse_client_flags_untrusted(data)
        # We always offer NO_ZEROES, so the client may set it.  A client without
        # C_FIXED_NEWSTYLE is served as fixed newstyle anyway (the spec allows it),
        # but in NOTLS mode, as the spec requires: it cannot do TLS.
        self._no_zeroes = bool(flags & NbdClientFlag.NBD_FLAG_C_NO_ZEROES)
        if not flags & NbdClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE:
            if self._tls_mode is TlsMode.REQUIRE:
                raise RemoteProtocolError("TLS is required, but the client is not fixed newstyle")
            self._tls_mode = TlsMode.OFF
        self._rx = _Rx.OPTION_HEADER
        return None

    def _rx_option_header(self) -> NeedData | None:
        data = self._buf.consume_exactly(wire.OPTION_HEADER.size)
        if data is None:
            return NEED_DATA
        hdr = wire.parse_option_header_untrusted(data)
        self._option_count += 1
        if self._option_count > self._max_options:
            raise RemoteProtocolError(f"more than {self._max_options} options in the handshake")
        if hdr.length > self._limits.max_option_length:
            raise RemoteProtocolError(f"option {hdr.option} of {hdr.length} bytes is too long")
        self._option = hdr
        if hdr.option == NbdOption.NBD_OPT_ABORT:
            self._start_option_drain(hdr.length, None)  # data SHOULD be ignored
        elif self._tls_required() and hdr.option != NbdOption.NBD_OPT_STARTTLS:
            # FORCEDTLS: nothing is parsed (or revealed) before TLS.
            if hdr.option == NbdOption.NBD_OPT_EXPORT_NAME:
                raise RemoteProtocolError("NBD_OPT_EXPORT_NAME without TLS, which is required")
            self._start_option_drain(hdr.length, (NbdRep.NBD_REP_ERR_TLS_REQD, "TLS required"))
        elif hdr.option not in self._option_handlers:
            self._start_option_drain(
                hdr.length, (NbdRep.NBD_REP_ERR_UNSUP, f"option {hdr.option} not supported")
            )
        elif hdr.length > self._limits.max_option_payload:
            if hdr.option == NbdOption.NBD_OPT_EXPORT_NAME:
                raise RemoteProtocolError("NBD_OPT_EXPORT_NAME payload too long")
            self._start_option_drain(hdr.length, (NbdRep.NBD_REP_ERR_TOO_BIG, "option too long"))
        else:
            self._rx = _Rx.OPTION_PAYLOAD
        return None

    def _start_option_drain(self, length: int, reply: tuple[NbdRep, str] | None) -> None:
        self._drain_left = length
        self._drain_reply = reply
        self._rx = _Rx.OPTION_DRAIN

    def _rx_option_drain(self) -> Event | NeedData | None:
        self._drain_left -= self._buf.discard(self._drain_left)
        if self._drain_left:
            return NEED_DATA
        assert self._option is not None
        option = self._option.option
        self._rx = _Rx.OPTION_HEADER
        if self._drain_reply is None:  # NBD_OPT_ABORT
            self._reply(option, NbdRep.NBD_REP_ACK)
            self._close()
            return HandshakeAborted()
        self._reply_error(option, *self._drain_reply)
        return None

    def _rx_option_payload(self) -> Event | NeedData | None:
        assert self._option is not None
        payload = self._buf.consume_exactly(self._option.length)
        if payload is None:
            return NEED_DATA
        self._rx = _Rx.OPTION_HEADER  # a handler may move on to transmission
        return self._dispatch_option(self._option.option, payload)

    def _dispatch_option(self, option: int, payload: bytes) -> Event | None:
        return self._option_handlers[option](option, payload)

    def _tls_required(self) -> bool:
        return self._tls_mode is TlsMode.REQUIRE and not self._tls_active

    def _reply(self, option: int, reply: NbdRep, data: bytes = b"") -> None:
        self._out.append(wire.encode_option_reply(option, reply, data))

    def _reply_error(self, option: int, reply: NbdRep, message: str) -> None:
        self._reply(option, reply, _utf8_prefix(message, MAX_ERROR_MESSAGE))

    def _lookup(self, raw_name: bytes) -> tuple[str, ExportInfo] | None:
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            return None
        export = self._exports.get(name)
        if export is None and name == "" and len(self._exports) == 1:
            ((name, export),) = self._exports.items()
        return None if export is None else (name, export)

    def _opt_export_name(self, option: int, payload: bytes) -> Event | None:
        # No error reply is possible: an unknown export ends the session.
        found = self._lookup(payload) if len(payload) <= MAX_STRING_LENGTH else None
        if found is None:
            raise RemoteProtocolError(f"NBD_OPT_EXPORT_NAME: unknown export {payload[:64]!r}")
        name, export = found
        flags = export.transmission_flags(structured_replies=self._neg.structured_replies)
        self._out.append(
            wire.encode_export_name_reply(export.size, flags, no_zeroes=self._no_zeroes)
        )
        return self._start_transmission(name, export, flags, block_sizes_advertised=False)

    def _opt_list(self, option: int, payload: bytes) -> None:
        if payload:
            self._reply_error(option, NbdRep.NBD_REP_ERR_INVALID, "LIST takes no data")
            return None
        for name, export in self._exports.items():
            self._reply(
                option,
                NbdRep.NBD_REP_SERVER,
                wire.encode_server_reply(name.encode(), export.description.encode()),
            )
        self._reply(option, NbdRep.NBD_REP_ACK)

    def _opt_starttls(self, option: int, payload: bytes) -> Event | None:
        if self._tls_mode is TlsMode.OFF:
            # NOTLS mode: the spec requires ERR_UNSUP or ERR_POLICY, never TLS_REQD.
            self._reply_error(option, NbdRep.NBD_REP_ERR_UNSUP, "TLS not supported")
            return None
        if self._tls_active:
            self._reply_error(option, NbdRep.NBD_REP_ERR_INVALID, "TLS already negotiated")
            return None
        if payload:
            self._reply_error(option, NbdRep.NBD_REP_ERR_INVALID, "STARTTLS takes no data")
            return None
        if len(self._buf):
            # The client must wait for our ACK: bytes already here would be taken
            # as sent inside TLS, which is how plain text gets injected.
            raise RemoteProtocolError("data sent after NBD_OPT_STARTTLS before the TLS handshake")
        self._reply(option, NbdRep.NBD_REP_ACK)
        self._rx = _Rx.TLS_HANDSHAKE
        return StartTLS()

    def _opt_extended_headers(self, option: int, payload: bytes) -> None:
        self._reply_error(option, NbdRep.NBD_REP_ERR_UNSUP, "extended headers not supported")

    def _opt_structured_reply(self, option: int, payload: bytes) -> None:
        if payload:
            self._reply_error(option, NbdRep.NBD_REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            return None
        self._neg.structured_replies = True  # a repeat is harmless: ACK again
        self._reply(option, NbdRep.NBD_REP_ACK)

    def _opt_info_or_go(self, option: int, payload: bytes) -> Event | None:
        try:
            req = wire.parse_info_request_untrusted(payload, max_string=MAX_STRING_LENGTH)
        except RemoteProtocolError as exc:
            self._reply_error(option, NbdRep.NBD_REP_ERR_INVALID, str(exc))
            return None
        found = self._lookup(req.name)
        if found is None:
            self._reply_error(option, NbdRep.NBD_REP_ERR_UNKNOWN, "unknown export")
            return None
        name, export = found
        flags = export.transmission_flags(structured_replies=self._neg.structured_replies)
        self._reply(option, NbdRep.NBD_REP_INFO, wire.encode_info_export(export.size, flags))
        block_sizes = False
        for info in dict.fromkeys(req.info_types):  # each once, in the client's order
            if info == NbdInfo.NBD_INFO_NAME:
                data = wire.encode_info_string(NbdInfo.NBD_INFO_NAME, name.encode())
            elif info == NbdInfo.NBD_INFO_DESCRIPTION:
                data = wire.encode_info_string(
                    NbdInfo.NBD_INFO_DESCRIPTION, export.description.encode()
                )
            elif info == NbdInfo.NBD_INFO_BLOCK_SIZE:
                block_sizes = True
                data = wire.encode_info_block_size(
                    export.min_block, export.preferred_block, export.max_block
                )
            else:  # NBD_INFO_EXPORT was sent already; unknown types MUST be ignored
                continue
            self._reply(option, NbdRep.NBD_REP_INFO, data)
        self._reply(option, NbdRep.NBD_REP_ACK)
        if option != NbdOption.NBD_OPT_GO:
            return None
        return self._start_transmission(name, export, flags, block_sizes_advertised=block_sizes)

    def _opt_meta_context(self, option: int, payload: bytes) -> None:
        is_set = option == NbdOption.NBD_OPT_SET_META_CONTEXT
        if is_set:
            self._neg.meta_context_export = None  # every SET replaces the selection
            if not self._neg.structured_replies:
                self._reply_error(
                    option, NbdRep.NBD_REP_ERR_INVALID, "structured replies not negotiated"
                )
                return None
        try:
            req = wire.parse_meta_context_request_untrusted(payload, max_string=MAX_STRING_LENGTH)
        except RemoteProtocolError as exc:
            self._reply_error(option, NbdRep.NBD_REP_ERR_INVALID, str(exc))
            return None
        found = self._lookup(req.export_name)
        if found is None:
            self._reply_error(option, NbdRep.NBD_REP_ERR_UNKNOWN, "unknown export")
            return None
        if is_set:
            if BASE_ALLOCATION in req.queries:
                self._neg.meta_context_export = found[0]
                self._reply(
                    option,
                    NbdRep.NBD_REP_META_CONTEXT,
                    wire.encode_meta_context_reply(BASE_ALLOCATION_CONTEXT_ID, BASE_ALLOCATION),
                )
        elif not req.queries or any(q in (b"base:", BASE_ALLOCATION) for q in req.queries):
            # LIST: no queries means "everything"; "base:" is a mandatory wildcard.
            self._reply(
                option,
                NbdRep.NBD_REP_META_CONTEXT,
                wire.encode_meta_context_reply(0, BASE_ALLOCATION),
            )
        self._reply(option, NbdRep.NBD_REP_ACK)

    def _start_transmission(
        self,
        name: str,
        export: ExportInfo,
        flags: NbdTransmissionFlag,
        *,
        block_sizes_advertised: bool,
    ) -> TransmissionStarted:
        self._export = export
        self._structured = self._neg.structured_replies
        # A selection counts only if it was made for the export finally chosen.
        self._meta = self._structured and self._neg.meta_context_export == name
        self._flags = flags
        if block_sizes_advertised:
            self._min_block, self._max_payload = export.min_block, export.max_block
        self._rx = _Rx.REQUEST_HEADER
        self._phase = NbdPhase.TRANSMISSION
        return TransmissionStarted(name, self._structured, self._meta, flags)

    # --- transmission: requests ------------------------------------------------

    def _rx_request_header(self) -> Event | NeedData | None:
        data = self._buf.consume_exactly(wire.REQUEST_HEADER.size)
        if data is None:
            return NEED_DATA
        hdr = wire.parse_request_header_untrusted(data)
        if hdr.type == NbdCommand.NBD_CMD_DISC:
            self._close()
            return Disconnect()
        rejection = self._validate(hdr)
        if hdr.type == NbdCommand.NBD_CMD_WRITE:
            self._request = hdr
            if rejection is None:
                self._rx = _Rx.WRITE_PAYLOAD
                return None
            # The payload must be consumed before the next header, or the
            # connection dropped if that is a denial of service.
            if hdr.length > self._limits.max_write_drain:
                raise RemoteProtocolError(f"WRITE of {hdr.length} bytes: {rejection[1]}")
            self._rejection = rejection
            self._drain_left = hdr.length
            self._rx = _Rx.WRITE_DRAIN
            return None
        if rejection is not None:
            return self._reject(hdr, rejection)
        return Request(
            hdr.cookie, NbdCommand(hdr.type), NbdCmdFlag(hdr.flags), hdr.offset, hdr.length
        )

    def _rx_write_payload(self) -> Event | NeedData | None:
        hdr = self._request
        assert hdr is not None
        data: bytes | bytearray | None
        if self._payload is not None:
            # Receiving in place; bytes fed with receive_data meanwhile go there too.
            self._absorb_buffered_payload()
            if self._payload_pos < hdr.length:
                return NEED_DATA
            data, self._payload = self._payload, None
        else:
            data = self._buf.consume_exactly(hdr.length)
            if data is None:
                return NEED_DATA
        self._rx = _Rx.REQUEST_HEADER
        self._request = None
        return Request(
            hdr.cookie,
            NbdCommand.NBD_CMD_WRITE,
            NbdCmdFlag(hdr.flags),
            hdr.offset,
            hdr.length,
            data,
        )

    def _rx_write_drain(self) -> Event | NeedData | None:
        self._drain_left -= self._buf.discard(self._drain_left)
        if self._drain_left:
            return NEED_DATA
        hdr, rejection = self._request, self._rejection
        assert hdr is not None
        assert rejection is not None
        self._rx = _Rx.REQUEST_HEADER
        self._request = self._rejection = None
        return self._reject(hdr, rejection)

    def _reject(self, hdr: wire.RequestHeader, rejection: _Rejection) -> RejectedRequest:
        error, reason = rejection
        self._queue_error(hdr.cookie, error, reason)
        return RejectedRequest(
            hdr.cookie, hdr.type, hdr.flags, hdr.offset, hdr.length, error, reason
        )

    def _validate(self, hdr: wire.RequestHeader) -> _Rejection | None:
        """Check a request against the spec and what was advertised (§2.4)."""
        EINVAL = NbdError.NBD_EINVAL
        if hdr.type not in _KNOWN_COMMANDS:
            return EINVAL, f"unknown command {hdr.type}"
        cmd = NbdCommand(hdr.type)
        export = self._export
        assert export is not None
        if cmd in _WRITES and export.read_only:
            return NbdError.NBD_EPERM, "export is read-only"
        need = _CMD_NEEDS_FLAG.get(cmd)
        if need is not None and not self._flags & need:
            return EINVAL, f"{cmd.name} not advertised"
        if cmd == NbdCommand.NBD_CMD_BLOCK_STATUS and not self._meta:
            return EINVAL, "no metadata context selected"
        # Plain ints: ``~`` on an IntFlag would drop the bits that have no name.
        allowed = int(_FUA) if self._flags & _T.NBD_FLAG_SEND_FUA else 0
        for flag, needed in _CMD_FLAGS.get(cmd, ()):
            if self._flags & needed:
                allowed |= int(flag)
        if hdr.flags & ~allowed:
            return EINVAL, f"flags 0x{hdr.flags:x} not valid for {cmd.name}"
        if cmd == NbdCommand.NBD_CMD_FLUSH:
            if hdr.offset or hdr.length:
                return EINVAL, "FLUSH with nonzero offset or length"
            return None
        if hdr.length == 0:
            return EINVAL, "zero-length request"
        end = hdr.offset + hdr.length
        if end > export.size:
            if cmd in (NbdCommand.NBD_CMD_WRITE, NbdCommand.NBD_CMD_WRITE_ZEROES):
                return NbdError.NBD_ENOSPC, "request past the end of the export"
            return EINVAL, "request past the end of the export"
        m = self._min_block
        if m > 1 and (hdr.offset % m or (hdr.length % m and end != export.size)):
            return EINVAL, f"request not aligned to {m} bytes"
        if hdr.length > self._max_payload:
            if cmd == NbdCommand.NBD_CMD_WRITE:
                return EINVAL, "WRITE larger than the maximum payload"
            if cmd == NbdCommand.NBD_CMD_READ:
                return NbdError.NBD_EOVERFLOW, "READ larger than the maximum payload"
        return None

    # --- transmission: replies ----------------------------------------------

    def _check_transmission(self) -> None:
        if self._export is None:
            raise LocalProtocolError("replies can only be sent once transmission started")

    def _queue_error(self, cookie: int, error: NbdError, message: str) -> None:
        if self._structured:
            msg = _utf8_prefix(message, MAX_ERROR_MESSAGE)
            self._out.append(wire.encode_error_chunk(cookie, error, msg))
        else:
            self._out.append(wire.encode_simple_reply(cookie, error))

    def send_reply(self, cookie: int, error: int = 0) -> None:
        """Answer a request that returns no data (WRITE, FLUSH, TRIM, ...).

        Args:
            cookie: the request's cookie.
            error: 0 for success, else a host ``errno`` value (mapped to an NBD
                error; anything the protocol cannot express becomes EIO).  With
                structured replies an error goes out as an error chunk, which is
                also right for READ and BLOCK_STATUS.

        Raises:
            LocalProtocolError: called during the handshake.
        """
        self._check_transmission()
        if error:
            self.send_error(cookie, error)
        else:
            self._out.append(wire.encode_simple_reply(cookie, 0))

    def send_error(self, cookie: int, error: int, message: str = "") -> None:
        """Answer any request with an error.

        Args:
            cookie: the request's cookie.
            error: a nonzero host ``errno`` value, e.g. from
                :func:`nbdvma.errors.errno_for_exception`.
            message: for structured replies only; cut to 200 bytes of UTF-8.

        Raises:
            LocalProtocolError: ``error`` is 0, or called during the handshake.
        """
        self._check_transmission()
        if not error:
            raise LocalProtocolError("send_error() needs a nonzero errno")
        self._queue_error(cookie, nbd_error_from_errno(error), message)

    def send_read_reply(
        self, cookie: int, offset: int, data: bytes | bytearray | memoryview
    ) -> None:
        """Answer a READ with its data (queued uncopied after a small header).

        Simple replies: a 16-byte header and the data.  Structured replies: one
        OFFSET_DATA chunk with DONE (which also satisfies ``NBD_CMD_FLAG_DF``).

        Args:
            cookie: the request's cookie.
            offset: the request's offset.
            data: exactly the requested bytes; it must not change until sent.

        Raises:
            LocalProtocolError: empty data, or called during the handshake.
        """
        self._check_transmission()
        if not len(data):
            raise LocalProtocolError("a READ reply needs data (zero-length READs are rejected)")
        if self._structured:
            done = NbdReplyFlag.NBD_REPLY_FLAG_DONE
            self._out.append(wire.encode_offset_data_header(cookie, done, offset, len(data)))
        else:
            self._out.append(wire.encode_simple_reply(cookie, 0))
        self._out.append(data)

    def send_read_reply_chunks(self, cookie: int, chunks: Sequence[DataChunk | HoleChunk]) -> None:
        """Answer a READ with data and hole chunks that together cover the request.

        With structured replies each becomes an OFFSET_DATA or OFFSET_HOLE chunk, the
        last one flagged DONE; without, holes are sent as zero bytes after one simple
        header, so chunks must then be in ascending, contiguous order.  (The caller
        must send a single chunk if the request had ``NBD_CMD_FLAG_DF``.)

        Raises:
            LocalProtocolError: no chunks, an empty chunk, or called during the
                handshake.
        """
        self._check_transmission()
        if not chunks:
            raise LocalProtocolError("a READ reply needs at least one chunk")
        if not self._structured:
            self._out.append(wire.encode_simple_reply(cookie, 0))
        last = len(chunks) - 1
        for i, chunk in enumerate(chunks):
            flags = NbdReplyFlag.NBD_REPLY_FLAG_DONE if i == last else 0
            if isinstance(chunk, HoleChunk):
                if chunk.length <= 0:
                    raise LocalProtocolError("empty hole chunk")
                if self._structured:
                    self._out.append(
                        wire.encode_offset_hole_chunk(cookie, flags, chunk.offset, chunk.length)
                    )
                else:
                    self._out.append(bytes(chunk.length))
            else:
                if not len(chunk.data):
                    raise LocalProtocolError("empty data chunk")
                if self._structured:
                    self._out.append(
                        wire.encode_offset_data_header(cookie, flags, chunk.offset, len(chunk.data))
                    )
                self._out.append(chunk.data)

    def send_block_status(self, request: Request, extents: Sequence[tuple[int, int]]) -> None:
        """Answer a BLOCK_STATUS request with ``base:allocation`` extents.

        Args:
            request: the request being answered (its offset, length and REQ_ONE
                flag shape the reply).
            extents: ``(length, flags)`` pairs from the request's offset onwards,
                flags from :class:`~.constants.NbdStateFlag`.  They are cut at the
                end of the export; with ``NBD_CMD_FLAG_REQ_ONE`` only the first is
                sent, clamped to the request length.

        Raises:
            LocalProtocolError: no (nonzero) extents, or no context was selected.
        """
        self._check_transmission()
        assert self._export is not None
        if not self._meta:
            raise LocalProtocolError("BLOCK_STATUS reply without a selected metadata context")
        left = self._export.size - request.offset
        if request.flags & NbdCmdFlag.NBD_CMD_FLAG_REQ_ONE:
            left = min(left, request.length)
        out: list[tuple[int, int]] = []
        for length, flags in extents:
            if length <= 0:
                raise LocalProtocolError(f"extent length {length} must be positive")
            length = min(length, left, 0xFFFFFFFF)
            if length <= 0:
                break
            out.append((length, flags))
            left -= length
            if request.flags & NbdCmdFlag.NBD_CMD_FLAG_REQ_ONE or len(out) == MAX_EXTENTS:
                break
        if not out:
            raise LocalProtocolError("a BLOCK_STATUS reply needs at least one extent")
        self._out.append(
            wire.encode_block_status_chunk(
                request.cookie,
                NbdReplyFlag.NBD_REPLY_FLAG_DONE,
                BASE_ALLOCATION_CONTEXT_ID,
                out,
            )
        )
