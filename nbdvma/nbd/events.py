"""Events the protocol core returns, and the parts of a READ reply it is given.

After h11's ``_events.py``: plain frozen values, no behaviour.  The handshake
produces only :class:`TransmissionStarted`, :class:`StartTLS` and
:class:`HandshakeAborted` (every option is answered inside the core); transmission
produces :class:`Request`, :class:`RejectedRequest` and :class:`Disconnect`; EOF is
:class:`ConnectionClosed`.  :data:`NEED_DATA` means "feed me more bytes".
"""

from __future__ import annotations

from typing import Final, TypeAlias

import attrs

from .constants import NbdCmdFlag, NbdCommand, NbdError, NbdTransmissionFlag

__all__ = [
    "NEED_DATA",
    "ConnectionClosed",
    "DataChunk",
    "Disconnect",
    "Event",
    "ExportRefused",
    "HandshakeAborted",
    "HoleChunk",
    "NeedData",
    "Outgoing",
    "PassedData",
    "RejectedRequest",
    "Request",
    "StartTLS",
    "TransmissionStarted",
]


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
class PassedData:
    """READ reply data the I/O layer writes itself, queued in its place.

    For data the I/O layer can move without holding it in memory, such as file
    ranges sent with ``sendfile``: the core counts its ``length`` and hands it back,
    in order, from :meth:`NbdServerConnection.buffers_to_send`; it never looks at
    ``source``.  The I/O layer must then write exactly ``length`` bytes.
    """

    length: int
    source: object = attrs.field(repr=False)

    def __len__(self) -> int:
        return self.length


#: What the core queues for the peer: its own encoded messages, READ data as the I/O
#: layer gave it, and :class:`PassedData` for the I/O layer to write itself.
Outgoing: TypeAlias = "bytes | bytearray | memoryview | PassedData"


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
class ExportRefused:
    """A client asked for an export that does not exist (NBD_OPT_INFO or NBD_OPT_GO);
    the NBD_REP_ERR_UNKNOWN reply is queued and the handshake goes on.

    Attributes:
        option: the option number (NBD_OPT_INFO, NBD_OPT_GO).
        name: the name asked for, as the client sent it (undecodable bytes replaced).
    """

    option: int
    name: str


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
    | ExportRefused
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
