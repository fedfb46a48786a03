"""Sans-IO NBD server protocol core (stdlib + attrs only; never imports trio).

The modules, from the outside in:

* :mod:`.connection`: :class:`NbdServerConnection`, what the I/O layer drives
  (bytes in, events out, replies to bytes);
* :mod:`.state`: the receive state machine, in one table (theory of operation);
* :mod:`.handshake`: the option phase, including STARTTLS;
* :mod:`.transmission`: request validation and reply encoding;
* :mod:`.events` and :mod:`.records`: the values that cross the API;
* :mod:`.wire` and :mod:`.constants`: layouts, parsers, encoders and the spec's numbers.
"""

from .connection import NbdServerConnection
from .events import (
    NEED_DATA,
    ConnectionClosed,
    DataChunk,
    Disconnect,
    Event,
    ExportRefused,
    HandshakeAborted,
    HoleChunk,
    NeedData,
    Outgoing,
    PassedData,
    RejectedRequest,
    Request,
    StartTLS,
    TransmissionStarted,
)
from .records import Capabilities, ExportInfo, Limits, TlsMode
from .state import NbdPhase

__all__ = [
    "NEED_DATA",
    "Capabilities",
    "ConnectionClosed",
    "DataChunk",
    "Disconnect",
    "Event",
    "ExportInfo",
    "ExportRefused",
    "HandshakeAborted",
    "HoleChunk",
    "Limits",
    "NbdPhase",
    "NbdServerConnection",
    "NeedData",
    "Outgoing",
    "PassedData",
    "RejectedRequest",
    "Request",
    "StartTLS",
    "TlsMode",
    "TransmissionStarted",
]
