"""The receive state machine of one NBD server connection, in one table.

Theory of operation
===================

A connection's input parser is always in exactly one :class:`RxState`, and that
state says which message (or part of one) comes next.  Each state has one
handler (:mod:`.handshake` for the option phase, :mod:`.transmission` for
requests), which consumes one whole message from the receive buffer and moves
to the next state.  Every move goes through :meth:`ReceiveState.goto`, which
checks it against :data:`TRANSITIONS`, so the diagram below *is* the code::

    CLIENT_FLAGS --> OPTION_HEADER --+--> OPTION_PAYLOAD --(answered)---+--> OPTION_HEADER
     (4 bytes)        (16 bytes)     |    (known option <= 64 KiB)      |
                                     +--> OPTION_DRAIN ---(ERR_*)-------+
                                          (unknown or oversize: discarded, never buffered)
    OPTION_PAYLOAD --STARTTLS ACK--> TLS_HANDSHAKE --tls_established()--> OPTION_HEADER
                                     (no input accepted)                (negotiation forgotten)
    OPTION_PAYLOAD --GO + ACK, or EXPORT_NAME--> REQUEST_HEADER  (TransmissionStarted)
    OPTION_DRAIN ---ABORT + ACK----------------> CLOSED          (HandshakeAborted)

    REQUEST_HEADER --+--> (READ, FLUSH, ... valid) -----------> Request
      (28 bytes)     +--> (invalid, no payload) --------------> RejectedRequest (answered)
                     +--> WRITE_PAYLOAD --(length bytes)------> Request(data=...)
                     +--> WRITE_DRAIN ---(invalid WRITE)------> RejectedRequest (answered)
                     +--> DISC ---------------------------------> CLOSED (Disconnect)

Besides these, EOF moves every state that reads input to ``CLOSED``, and a
protocol violation (:class:`~nbdvma.errors.RemoteProtocolError`) moves every
state but the two final ones to ``ERROR``.  ``CLOSED`` and ``ERROR`` have no
way out.

The connection's *phase* (:class:`NbdPhase`: handshake, transmission, closed,
error) is not kept anywhere: it is a function of the receive state
(:data:`PHASE`), so the two cannot disagree.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from nbdvma.errors import LocalProtocolError

__all__ = ["MID_MESSAGE", "PHASE", "TRANSITIONS", "NbdPhase", "ReceiveState", "RxState"]


class NbdPhase(enum.Enum):
    """Where the connection is (derived from its :class:`RxState`)."""

    HANDSHAKE = "handshake"
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"


class RxState(enum.Enum):
    """What the input parser expects next (see the theory of operation)."""

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


_S = RxState
_END = frozenset({_S.CLOSED, _S.ERROR})

#: The phase of each receive state.
PHASE: Final[Mapping[RxState, NbdPhase]] = {
    _S.CLIENT_FLAGS: NbdPhase.HANDSHAKE,
    _S.OPTION_HEADER: NbdPhase.HANDSHAKE,
    _S.OPTION_PAYLOAD: NbdPhase.HANDSHAKE,
    _S.OPTION_DRAIN: NbdPhase.HANDSHAKE,
    _S.TLS_HANDSHAKE: NbdPhase.HANDSHAKE,
    _S.REQUEST_HEADER: NbdPhase.TRANSMISSION,
    _S.WRITE_PAYLOAD: NbdPhase.TRANSMISSION,
    _S.WRITE_DRAIN: NbdPhase.TRANSMISSION,
    _S.CLOSED: NbdPhase.CLOSED,
    _S.ERROR: NbdPhase.ERROR,
}

#: Every allowed move: state -> the states it may go to.
TRANSITIONS: Final[Mapping[RxState, frozenset[RxState]]] = {
    _S.CLIENT_FLAGS: _END | {_S.OPTION_HEADER},
    _S.OPTION_HEADER: _END | {_S.OPTION_PAYLOAD, _S.OPTION_DRAIN},
    _S.OPTION_PAYLOAD: _END | {_S.OPTION_HEADER, _S.TLS_HANDSHAKE, _S.REQUEST_HEADER},
    _S.OPTION_DRAIN: _END | {_S.OPTION_HEADER},
    # No input is accepted while TLS is negotiated, so neither EOF nor an error.
    _S.TLS_HANDSHAKE: frozenset({_S.OPTION_HEADER}),
    _S.REQUEST_HEADER: _END | {_S.WRITE_PAYLOAD, _S.WRITE_DRAIN},
    _S.WRITE_PAYLOAD: _END | {_S.REQUEST_HEADER},
    _S.WRITE_DRAIN: _END | {_S.REQUEST_HEADER},
    _S.CLOSED: frozenset(),
    _S.ERROR: frozenset(),
}

#: States in which EOF cuts a message short even if the buffer is empty.
MID_MESSAGE: Final = frozenset(
    {_S.OPTION_PAYLOAD, _S.OPTION_DRAIN, _S.WRITE_PAYLOAD, _S.WRITE_DRAIN}
)


class ReceiveState:
    """The receive state of one connection; its phase is derived from it."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        """Start where every connection starts: waiting for the client flags."""
        #: The current state: read it freely (it is read several times per request,
        #: so it is a plain attribute, not a property); change it only with :meth:`goto`.
        self.current = RxState.CLIENT_FLAGS

    @property
    def phase(self) -> NbdPhase:
        """The phase of the current state."""
        return PHASE[self.current]

    def goto(self, new: RxState) -> None:
        """Move to ``new``.

        Raises:
            LocalProtocolError: the move is not in :data:`TRANSITIONS` (a bug in the
                core, never the peer's doing).
        """
        if new not in TRANSITIONS[self.current]:
            raise LocalProtocolError(f"no move from {self.current.name} to {new.name}")
        self.current = new
