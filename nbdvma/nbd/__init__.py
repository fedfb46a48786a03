"""Sans-IO NBD server protocol core (stdlib + attrs only; never imports trio).

See :mod:`nbdvma.nbd.server` for the theory of operation.
"""

from .server import (
    NEED_DATA,
    ConnectionClosed,
    DataChunk,
    Disconnect,
    Event,
    ExportInfo,
    HandshakeAborted,
    HoleChunk,
    Limits,
    NbdPhase,
    NbdServerConnection,
    NeedData,
    RejectedRequest,
    Request,
    StartTLS,
    TlsMode,
    TransmissionStarted,
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
