"""The transmission phase of an NBD server connection: requests in, replies out.  No I/O.

:class:`Transmission` takes over from the handshake with its
:class:`~.handshake.Agreement`.  It parses request headers from the connection's
receive buffer and validates every request against the spec and what was
advertised (unknown commands and flags, features not advertised, bounds,
alignment, read-only, payload size).  A request that fails is answered with an
error reply at once and reported as :class:`~.events.RejectedRequest`, so the I/O
layer only ever sees :class:`~.events.Request` events it can execute as they are.
An invalid WRITE's payload is drained (never buffered) up to
``Limits.max_write_drain``; above that the connection is dropped.

The reply encoders (``send_*``) know whether structured replies were negotiated and
encode accordingly; each appends whole messages to the connection's output queue.
A WRITE payload may be received in place (:meth:`Transmission.payload_buffer`), so
that it is copied once, by the kernel.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TypeAlias

from nbdvma.errors import LocalProtocolError, RemoteProtocolError

from . import wire
from .constants import (
    BASE_ALLOCATION_CONTEXT_ID,
    MAX_EXTENTS,
    NbdCmdFlag,
    NbdCommand,
    NbdError,
    NbdReplyFlag,
    NbdTransmissionFlag,
    nbd_error_from_errno,
)
from .events import (
    NEED_DATA,
    DataChunk,
    Disconnect,
    Event,
    HoleChunk,
    NeedData,
    Outgoing,
    PassedData,
    RejectedRequest,
    Request,
)
from .handshake import Agreement
from .records import ExportInfo, Limits
from .state import ReceiveState, RxState

#: Recycled payload buffers, per connection: at most this many bytes in all ...
_POOL_BYTES = 8 << 20
#: ... of buffers of at most this size (a larger payload gets a buffer of its own).
_POOL_MAX_BUFFER = 2 << 20


def _unshared_refcount() -> int:
    """``sys.getrefcount`` of a pooled buffer only its pool refers to, measured the way
    :meth:`Transmission._new_payload` measures (it depends on the interpreter)."""
    pool = [bytearray(1)]
    return sys.getrefcount(pool[0])


_UNSHARED = _unshared_refcount()

__all__ = ["Transmission"]

_OutQueue = list[Outgoing]
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
# Raw command numbers to their enum: a dict lookup, where NbdCommand(n) runs enum's
# Python-level machinery on every request.
_COMMANDS: dict[int, NbdCommand] = {int(c): c for c in NbdCommand}
_REQ_ONE = int(NbdCmdFlag.NBD_CMD_FLAG_REQ_ONE)


class Transmission:
    """The transmission phase of one connection.

    Args:
        agreement: what the handshake settled.
        limits: denial-of-service limits.
        buf: the connection's receive buffer.
        out: the connection's output queue.
        state: the connection's receive state (``REQUEST_HEADER`` by now).
    """

    def __init__(
        self,
        agreement: Agreement,
        limits: Limits,
        *,
        buf: wire.ReceiveBuffer,
        out: _OutQueue,
        state: ReceiveState,
    ) -> None:
        started = agreement.started
        self.export: ExportInfo = agreement.export
        self.structured = started.structured_replies
        self._meta = started.meta_context_selected
        self._flags = started.transmission_flags
        self._allowed = self._allowed_flags()
        # Request flags seen so far, as NbdCmdFlag (at most the 2**5 valid combinations).
        self._flag_values: dict[int, NbdCmdFlag] = {}
        self._min_block = agreement.min_block
        self._max_payload = agreement.max_payload
        self._limits = limits
        self._buf = buf
        self._out = out
        self._state = state
        self._request: wire.RequestHeader | None = None
        # A WRITE payload being received in place (see payload_buffer)
        self._payload: bytearray | None = None
        self._pool: list[bytearray] = []
        self._payload_pos = 0
        self._drain_left = 0
        self._rejection: _Rejection | None = None

    # --- requests: one handler per receive state -------------------------------

    def receive_request_header(self) -> Event | NeedData | None:
        """``REQUEST_HEADER``: a request, or its header before a WRITE payload."""
        data = self._buf.consume_exactly(wire.REQUEST_HEADER.size)
        if data is None:
            return NEED_DATA
        hdr = wire.parse_request_header_untrusted(data)
        if hdr.type == NbdCommand.NBD_CMD_DISC:
            self._state.goto(RxState.CLOSED)
            return Disconnect()
        rejection = self._validate(hdr)
        if hdr.type == NbdCommand.NBD_CMD_WRITE:
            self._request = hdr
            if rejection is None:
                self._state.goto(RxState.WRITE_PAYLOAD)
                return None
            # The payload must be consumed before the next header, or the
            # connection dropped if that is a denial of service.
            if hdr.length > self._limits.max_write_drain:
                raise RemoteProtocolError(f"WRITE of {hdr.length} bytes: {rejection[1]}")
            self._rejection = rejection
            self._drain_left = hdr.length
            self._state.goto(RxState.WRITE_DRAIN)
            return None
        if rejection is not None:
            return self._reject(hdr, rejection)
        flags = self._flag_values.get(hdr.flags)
        if flags is None:
            flags = self._flag_values[hdr.flags] = NbdCmdFlag(hdr.flags)
        return Request(hdr.cookie, _COMMANDS[hdr.type], flags, hdr.offset, hdr.length)

    def receive_write_payload(self) -> Event | NeedData | None:
        """``WRITE_PAYLOAD``: the payload of a valid WRITE."""
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
        self._state.goto(RxState.REQUEST_HEADER)
        self._request = None
        return Request(
            hdr.cookie,
            NbdCommand.NBD_CMD_WRITE,
            NbdCmdFlag(hdr.flags),
            hdr.offset,
            hdr.length,
            data,
        )

    def receive_write_drain(self) -> Event | NeedData | None:
        """``WRITE_DRAIN``: discard an invalid WRITE's payload, then answer it."""
        self._drain_left -= self._buf.discard(self._drain_left)
        if self._drain_left:
            return NEED_DATA
        hdr, rejection = self._request, self._rejection
        assert hdr is not None
        assert rejection is not None
        self._state.goto(RxState.REQUEST_HEADER)
        self._request = self._rejection = None
        return self._reject(hdr, rejection)

    # --- receiving a WRITE payload in place -------------------------------------

    def payload_wanted(self) -> int:
        """Bytes of the current WRITE payload not received yet (0 if none is pending)."""
        if self._state.current is not RxState.WRITE_PAYLOAD:
            return 0
        assert self._request is not None
        have = self._payload_pos if self._payload is not None else 0
        return max(0, self._request.length - have - len(self._buf))

    def payload_buffer(self) -> memoryview:
        """Where the rest of the current WRITE payload can be received in place.

        See :meth:`.NbdServerConnection.payload_buffer`; allocated once, with the
        payload's length (already checked against the maximum payload).

        Raises:
            LocalProtocolError: no WRITE payload is pending.
        """
        if not self.payload_wanted():
            raise LocalProtocolError("payload_buffer() without a pending WRITE payload")
        hdr = self._request
        assert hdr is not None
        if self._payload is None:
            self._payload = self._new_payload(hdr.length)
            self._payload_pos = 0
        self._absorb_buffered_payload()  # what receive_data already brought goes first
        return memoryview(self._payload)[self._payload_pos :]

    def _new_payload(self, length: int) -> bytearray:
        """A buffer for a payload: a recycled one that nothing refers to any more, or a
        new one.  Recycling saves a zero-filled allocation (and its page faults) per
        WRITE: a tenth of the server's CPU for a stream of 2 MiB WRITEs."""
        pool = self._pool
        for i in range(len(pool)):
            # Only the pool refers to it: no request, no writer record, no memoryview
            # (a view holds its exporter), no thread writing or hashing it.
            if len(pool[i]) == length and sys.getrefcount(pool[i]) <= _UNSHARED:
                buf = pool.pop(i)
                pool.append(buf)
                return buf
        buf = bytearray(length)
        if length <= _POOL_MAX_BUFFER:
            pool.append(buf)
            while sum(map(len, pool)) > _POOL_BYTES:
                del pool[0]
        return buf

    def _absorb_buffered_payload(self) -> None:
        """Move received bytes of the current payload into its in-place buffer."""
        assert self._payload is not None
        if len(self._buf):
            with memoryview(self._payload) as view:
                self._payload_pos += self._buf.consume_into(view[self._payload_pos :])

    def payload_received(self, n: int) -> None:
        """``n`` more bytes of the payload were received into :meth:`payload_buffer`.

        Raises:
            LocalProtocolError: no payload buffer, or more than it holds.
        """
        if self._payload is None or not 0 < n <= len(self._payload) - self._payload_pos:
            raise LocalProtocolError(f"payload_received({n}) does not fit the payload buffer")
        self._payload_pos += n

    # --- validation ----------------------------------------------------------------

    def _reject(self, hdr: wire.RequestHeader, rejection: _Rejection) -> RejectedRequest:
        error, reason = rejection
        self._queue_error(hdr.cookie, error, reason)
        return RejectedRequest(
            hdr.cookie, hdr.type, hdr.flags, hdr.offset, hdr.length, error, reason
        )

    def _allowed_flags(self) -> dict[int, int]:
        """The commands this connection may send, each with the request flags it may
        carry (as a plain int: ``~`` on an IntFlag would drop the bits that have no
        name).  Known once the handshake is done; :meth:`_validate` looks them up."""
        allowed: dict[int, int] = {}  # int keys: an enum's hash is a Python-level method
        for cmd in NbdCommand:
            if cmd == NbdCommand.NBD_CMD_DISC:
                continue
            if cmd in _WRITES and self.export.read_only:
                continue
            need = _CMD_NEEDS_FLAG.get(cmd)
            if need is not None and not self._flags & need:
                continue
            if cmd == NbdCommand.NBD_CMD_BLOCK_STATUS and not self._meta:
                continue
            flags = int(_FUA) if self._flags & _T.NBD_FLAG_SEND_FUA else 0
            for flag, needed in _CMD_FLAGS.get(cmd, ()):
                if self._flags & needed:
                    flags |= int(flag)
            allowed[int(cmd)] = flags
        return allowed

    def _validate(self, hdr: wire.RequestHeader) -> _Rejection | None:
        """Check a request against the spec and what was advertised (§2.4)."""
        EINVAL = NbdError.NBD_EINVAL
        cmd = _COMMANDS.get(hdr.type)
        if cmd is None:
            return EINVAL, f"unknown command {hdr.type}"
        export = self.export
        allowed = self._allowed.get(hdr.type)
        if allowed is None:  # refused whatever its flags: say why
            if cmd in _WRITES and export.read_only:
                return NbdError.NBD_EPERM, "export is read-only"
            if cmd == NbdCommand.NBD_CMD_BLOCK_STATUS and not self._meta:
                return EINVAL, "no metadata context selected"
            return EINVAL, f"{cmd.name} not advertised"
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

    # --- replies ------------------------------------------------------------------

    def _queue_error(self, cookie: int, error: NbdError, message: str) -> None:
        if self.structured:
            self._out.append(wire.encode_error_chunk(cookie, error, wire.error_message(message)))
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
        """
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
            LocalProtocolError: ``error`` is 0.
        """
        if not error:
            raise LocalProtocolError("send_error() needs a nonzero errno")
        self._queue_error(cookie, nbd_error_from_errno(error), message)

    def send_read_reply(
        self, cookie: int, offset: int, data: bytes | bytearray | memoryview | PassedData
    ) -> None:
        """Answer a READ with its data (queued uncopied after a small header; or a
        :class:`~.events.PassedData` that the I/O layer writes itself).

        Simple replies: a 16-byte header and the data.  Structured replies: one
        OFFSET_DATA chunk with DONE (which also satisfies ``NBD_CMD_FLAG_DF``).

        Args:
            cookie: the request's cookie.
            offset: the request's offset.
            data: exactly the requested bytes; it must not change until sent.  Or
                :class:`~.events.PassedData` of the requested length.

        Raises:
            LocalProtocolError: empty data.
        """
        if not len(data):
            raise LocalProtocolError("a READ reply needs data (zero-length READs are rejected)")
        if self.structured:
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
            LocalProtocolError: no chunks, or an empty chunk.
        """
        if not chunks:
            raise LocalProtocolError("a READ reply needs at least one chunk")
        if not self.structured:
            self._out.append(wire.encode_simple_reply(cookie, 0))
        last = len(chunks) - 1
        for i, chunk in enumerate(chunks):
            flags = NbdReplyFlag.NBD_REPLY_FLAG_DONE if i == last else 0
            if isinstance(chunk, HoleChunk):
                if chunk.length <= 0:
                    raise LocalProtocolError("empty hole chunk")
                if self.structured:
                    self._out.append(
                        wire.encode_offset_hole_chunk(cookie, flags, chunk.offset, chunk.length)
                    )
                else:
                    self._out.append(bytes(chunk.length))
            else:
                if not len(chunk.data):
                    raise LocalProtocolError("empty data chunk")
                if self.structured:
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
        if not self._meta:
            raise LocalProtocolError("BLOCK_STATUS reply without a selected metadata context")
        left = self.export.size - request.offset
        # int(): IntFlag's own & is a Python-level method, slow on this hot path.
        req_one = int(request.flags) & _REQ_ONE
        if req_one:
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
            if req_one or len(out) == MAX_EXTENTS:
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
