"""NBD wire format: struct layouts, parsers of peer bytes, encoders of server bytes.

Every parser of bytes that came from the client ends in ``_untrusted`` and raises
only :class:`~nbdvma.errors.RemoteProtocolError` (never ``struct.error``,
``IndexError`` or ``UnicodeDecodeError``).  Encoders trust their arguments (they
come from our own code) but still check ranges, raising
:class:`~nbdvma.errors.LocalProtocolError`.

:class:`ReceiveBuffer` is the transactional input buffer of the connection: bytes
go in as the I/O layer receives them and come out only as whole messages, so a
WRITE payload is copied exactly once (or zero times, when one received chunk is
exactly the payload).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence

import attrs

from nbdvma.errors import LocalProtocolError, RemoteProtocolError

from .constants import (
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    NBD_OPT_REPLY_MAGIC,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    NbdClientFlag,
    NbdInfo,
    NbdRep,
    NbdReplyFlag,
    NbdReplyType,
)

__all__ = [
    "CLIENT_FLAGS",
    "GREETING",
    "MAX_ERROR_MESSAGE",
    "OPTION_HEADER",
    "OPTION_REPLY_HEADER",
    "REQUEST_HEADER",
    "SIMPLE_REPLY",
    "STRUCTURED_REPLY_HEADER",
    "InfoRequest",
    "MetaContextRequest",
    "OptionHeader",
    "ReceiveBuffer",
    "RequestHeader",
    "encode_block_status_chunk",
    "encode_error_chunk",
    "encode_export_name_reply",
    "encode_greeting",
    "encode_info_block_size",
    "encode_info_export",
    "encode_info_string",
    "encode_meta_context_reply",
    "encode_none_chunk",
    "encode_offset_data_header",
    "encode_offset_hole_chunk",
    "encode_option_reply",
    "encode_server_reply",
    "encode_simple_reply",
    "error_message",
    "parse_client_flags_untrusted",
    "parse_info_request_untrusted",
    "parse_meta_context_request_untrusted",
    "parse_option_header_untrusted",
    "parse_request_header_untrusted",
]

# --- layouts (all big-endian) -------------------------------------------------

#: NBDMAGIC, IHAVEOPT, handshake flags.
GREETING = struct.Struct(">QQH")
#: Client flags.
CLIENT_FLAGS = struct.Struct(">I")
#: IHAVEOPT, option, length.
OPTION_HEADER = struct.Struct(">QII")
#: reply magic, option, reply type, length.
OPTION_REPLY_HEADER = struct.Struct(">QIII")
#: export size, transmission flags (reply to NBD_OPT_EXPORT_NAME).
EXPORT_NAME_REPLY = struct.Struct(">QH")
#: info type, export size, transmission flags.
INFO_EXPORT = struct.Struct(">HQH")
#: info type, minimum, preferred, maximum.
INFO_BLOCK_SIZE = struct.Struct(">HIII")
#: magic, command flags, type, cookie, offset, length.
REQUEST_HEADER = struct.Struct(">IHHQQI")
#: magic, error, cookie.
SIMPLE_REPLY = struct.Struct(">IIQ")
#: magic, flags, type, cookie, payload length.
STRUCTURED_REPLY_HEADER = struct.Struct(">IHHQI")
#: chunk header + offset (OFFSET_DATA, the data follows).
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")
#: chunk header + offset + hole size.
OFFSET_HOLE_CHUNK = struct.Struct(">IHHQIQI")
#: chunk header + error + message length (the message follows).
ERROR_CHUNK_HEADER = struct.Struct(">IHHQIIH")
#: chunk header + context id (the extents follow).
BLOCK_STATUS_HEADER = struct.Struct(">IHHQII")
#: one base:allocation extent: length, flags.
BLOCK_STATUS_EXTENT = struct.Struct(">II")

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

#: Longest error message we put in an option reply or a structured error chunk.
#: QEMU 7.2 refuses non-data chunk payloads above 1000 bytes; stay well clear of that.
MAX_ERROR_MESSAGE = 200

_ZERO_PADDING = bytes(EXPORT_NAME_PADDING)
_U32_MAX = 0xFFFFFFFF


# --- receive buffer -----------------------------------------------------------


class ReceiveBuffer:
    """Bytes received from the peer, handed out only as whole messages.

    The chunks the I/O layer received are kept as they are (no concatenation on
    receipt), so taking a message of ``n`` bytes copies those ``n`` bytes once; a
    message that is exactly one received chunk is returned without any copy.
    """

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._head = 0  # bytes of _chunks[0] already consumed
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes (copied if not ``bytes``: the caller may reuse its buffer)."""
        if not data:
            return
        chunk = data if isinstance(data, bytes) else bytes(data)
        self._chunks.append(chunk)
        self._len += len(chunk)

    def consume_exactly(self, n: int) -> bytes | None:
        """Remove and return the next ``n`` bytes, or ``None`` (and nothing) if fewer."""
        if n > self._len:
            return None
        if n == 0:
            return b""
        first = self._chunks[0]
        head = self._head
        if len(first) - head >= n:
            if head == 0 and len(first) == n:
                self._chunks.popleft()
                out = first
            else:
                out = first[head : head + n]
                self._advance(n)
            self._len -= n
            return out
        parts: list[memoryview] = []
        need = n
        while need:
            first = self._chunks[0]
            take = min(need, len(first) - self._head)
            parts.append(memoryview(first)[self._head : self._head + take])
            self._advance(take)
            need -= take
        self._len -= n
        return b"".join(parts)

    def consume_into(self, view: memoryview) -> int:
        """Move up to ``len(view)`` bytes into ``view``; return how many.

        Straight from the received chunks: a WRITE payload that came with its header
        is copied once, not sliced out first.
        """
        done = 0
        end = min(len(view), self._len)
        while done < end:
            first = self._chunks[0]
            take = min(end - done, len(first) - self._head)
            view[done : done + take] = memoryview(first)[self._head : self._head + take]
            self._advance(take)
            done += take
        self._len -= done
        return done

    def discard(self, n: int) -> int:
        """Drop up to ``n`` bytes without copying them; return how many were dropped."""
        n = min(n, self._len)
        left = n
        while left:
            take = min(left, len(self._chunks[0]) - self._head)
            self._advance(take)
            left -= take
        self._len -= n
        return n

    def _advance(self, k: int) -> None:
        self._head += k
        if self._head == len(self._chunks[0]):
            self._chunks.popleft()
            self._head = 0


# --- records parsed from the client -------------------------------------------


@attrs.frozen
class OptionHeader:
    """An option request header (the payload follows on the wire)."""

    option: int
    length: int


@attrs.frozen
class RequestHeader:
    """A 28-byte transmission request header."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int


@attrs.frozen
class InfoRequest:
    """The payload of NBD_OPT_INFO / NBD_OPT_GO."""

    name: bytes
    info_types: tuple[int, ...]


@attrs.frozen
class MetaContextRequest:
    """The payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""

    export_name: bytes
    queries: tuple[bytes, ...]


def _need(data: bytes, n: int, what: str) -> None:
    if len(data) != n:
        raise RemoteProtocolError(f"{what}: expected {n} bytes, got {len(data)}")


def parse_client_flags_untrusted(data: bytes) -> NbdClientFlag:
    """Parse the 4 bytes of client flags.

    Raises:
        RemoteProtocolError: wrong size, or a flag we do not know (the spec says to
            drop the connection).
    """
    _need(data, CLIENT_FLAGS.size, "client flags")
    (flags,) = CLIENT_FLAGS.unpack(data)
    # int(): ``~`` on an IntFlag would drop the bits that have no name.
    known = int(NbdClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE | NbdClientFlag.NBD_FLAG_C_NO_ZEROES)
    if flags & ~known:
        raise RemoteProtocolError(f"unknown client flags 0x{flags:08x}")
    return NbdClientFlag(flags)


def parse_option_header_untrusted(data: bytes) -> OptionHeader:
    """Parse a 16-byte option request header.

    Raises:
        RemoteProtocolError: wrong size or bad magic (framing is lost).
    """
    _need(data, OPTION_HEADER.size, "option header")
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise RemoteProtocolError(f"bad option magic 0x{magic:016x}")
    return OptionHeader(option, length)


def parse_request_header_untrusted(data: bytes) -> RequestHeader:
    """Parse a 28-byte request header.

    Raises:
        RemoteProtocolError: wrong size or bad magic (framing is lost).
    """
    _need(data, REQUEST_HEADER.size, "request header")
    magic, flags, type_, cookie, offset, length = REQUEST_HEADER.unpack(data)
    if magic != NBD_REQUEST_MAGIC:
        raise RemoteProtocolError(f"bad request magic 0x{magic:08x}")
    return RequestHeader(flags, type_, cookie, offset, length)


class _Reader:
    """Bounds-checked cursor over an option payload."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def take(self, n: int) -> bytes:
        if n > len(self._data) - self._pos:
            raise RemoteProtocolError(f"{self._what}: length {n} runs past the end of the option")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u16(self) -> int:
        (v,) = U16.unpack(self.take(2))
        return int(v)

    def u32(self) -> int:
        (v,) = U32.unpack(self.take(4))
        return int(v)

    def string(self, max_len: int) -> bytes:
        n = self.u32()
        if n > max_len:
            raise RemoteProtocolError(f"{self._what}: string of {n} bytes is too long")
        return self.take(n)

    def end(self) -> None:
        if self._pos != len(self._data):
            raise RemoteProtocolError(
                f"{self._what}: {len(self._data) - self._pos} trailing bytes in the option"
            )


def parse_info_request_untrusted(payload: bytes, *, max_string: int) -> InfoRequest:
    """Parse the payload of NBD_OPT_INFO / NBD_OPT_GO.

    Layout: u32 name length, name, u16 count, count x u16 info type; the lengths
    must add up to exactly the option length.

    Raises:
        RemoteProtocolError: a length that does not fit (answer NBD_REP_ERR_INVALID).
    """
    r = _Reader(payload, "NBD_OPT_INFO/GO")
    name = r.string(max_string)
    count = r.u16()
    raw = r.take(2 * count)
    r.end()
    info_types = struct.unpack(f">{count}H", raw)
    return InfoRequest(name, info_types)


def parse_meta_context_request_untrusted(payload: bytes, *, max_string: int) -> MetaContextRequest:
    """Parse the payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.

    Layout: u32 name length, name, u32 query count, count x (u32 length, query).

    Raises:
        RemoteProtocolError: a length that does not fit (answer NBD_REP_ERR_INVALID).
    """
    r = _Reader(payload, "NBD_OPT_*_META_CONTEXT")
    name = r.string(max_string)
    count = r.u32()
    # Each query takes at least 4 bytes, so a huge count fails on the first short
    # read instead of looping: never trust the count for sizing.
    queries: list[bytes] = []
    for _ in range(count):
        queries.append(r.string(max_string))
    r.end()
    return MetaContextRequest(name, tuple(queries))


# --- encoders (server to client) ----------------------------------------------


def _check_u32(value: int, what: str) -> None:
    if not 0 <= value <= _U32_MAX:
        raise LocalProtocolError(f"{what} {value} does not fit in 32 bits")


def error_message(message: str) -> bytes:
    """``message`` as UTF-8, cut to :data:`MAX_ERROR_MESSAGE` bytes on a character boundary."""
    limited = message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE]
    return limited.decode("utf-8", "ignore").encode()


def encode_greeting(flags: int) -> bytes:
    """The 18-byte fixed-newstyle greeting."""
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def encode_option_reply(option: int, reply: NbdRep, data: bytes = b"") -> bytes:
    """An option reply: 20-byte header plus ``data``."""
    return OPTION_REPLY_HEADER.pack(NBD_OPT_REPLY_MAGIC, option, reply, len(data)) + data


def encode_server_reply(name: bytes, description: bytes) -> bytes:
    """The payload of NBD_REP_SERVER: u32 name length, name, description."""
    return U32.pack(len(name)) + name + description


def encode_meta_context_reply(context_id: int, name: bytes) -> bytes:
    """The payload of NBD_REP_META_CONTEXT: u32 context id, name."""
    return U32.pack(context_id) + name


def encode_info_export(size: int, flags: int) -> bytes:
    """The payload of NBD_REP_INFO / NBD_INFO_EXPORT (12 bytes)."""
    return INFO_EXPORT.pack(NbdInfo.NBD_INFO_EXPORT, size, flags)


def encode_info_string(info: NbdInfo, value: bytes) -> bytes:
    """The payload of NBD_REP_INFO / NBD_INFO_NAME or NBD_INFO_DESCRIPTION."""
    return U16.pack(info) + value


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    """The payload of NBD_REP_INFO / NBD_INFO_BLOCK_SIZE (14 bytes)."""
    return INFO_BLOCK_SIZE.pack(NbdInfo.NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum)


def encode_export_name_reply(size: int, flags: int, *, no_zeroes: bool) -> bytes:
    """The reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zeroes unless NO_ZEROES."""
    out = EXPORT_NAME_REPLY.pack(size, flags)
    return out if no_zeroes else out + _ZERO_PADDING


def encode_simple_reply(cookie: int, error: int) -> bytes:
    """A 16-byte simple reply header (READ data, if any, follows separately)."""
    return SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def encode_offset_data_header(cookie: int, flags: int, offset: int, data_length: int) -> bytes:
    """The 28 bytes preceding the data of an OFFSET_DATA chunk."""
    _check_u32(data_length + 8, "OFFSET_DATA payload length")
    return OFFSET_DATA_HEADER.pack(
        NBD_STRUCTURED_REPLY_MAGIC,
        flags,
        NbdReplyType.NBD_REPLY_TYPE_OFFSET_DATA,
        cookie,
        data_length + 8,
        offset,
    )


def encode_offset_hole_chunk(cookie: int, flags: int, offset: int, length: int) -> bytes:
    """A complete OFFSET_HOLE chunk (length must be nonzero)."""
    if length <= 0:
        raise LocalProtocolError("an OFFSET_HOLE chunk must have a nonzero size")
    _check_u32(length, "hole size")
    return OFFSET_HOLE_CHUNK.pack(
        NBD_STRUCTURED_REPLY_MAGIC,
        flags,
        NbdReplyType.NBD_REPLY_TYPE_OFFSET_HOLE,
        cookie,
        12,
        offset,
        length,
    )


def encode_none_chunk(cookie: int) -> bytes:
    """A NONE chunk with DONE (the end of a reply that carried no data)."""
    return STRUCTURED_REPLY_HEADER.pack(
        NBD_STRUCTURED_REPLY_MAGIC,
        NbdReplyFlag.NBD_REPLY_FLAG_DONE,
        NbdReplyType.NBD_REPLY_TYPE_NONE,
        cookie,
        0,
    )


def encode_error_chunk(cookie: int, error: int, message: bytes) -> bytes:
    """A complete NBD_REPLY_TYPE_ERROR chunk with DONE."""
    if error == 0:
        raise LocalProtocolError("an error chunk needs a nonzero error")
    return (
        ERROR_CHUNK_HEADER.pack(
            NBD_STRUCTURED_REPLY_MAGIC,
            NbdReplyFlag.NBD_REPLY_FLAG_DONE,
            NbdReplyType.NBD_REPLY_TYPE_ERROR,
            cookie,
            6 + len(message),
            error,
            len(message),
        )
        + message
    )


def encode_block_status_chunk(
    cookie: int, flags: int, context_id: int, extents: Sequence[tuple[int, int]]
) -> bytes:
    """A complete NBD_REPLY_TYPE_BLOCK_STATUS chunk."""
    body = bytearray(BLOCK_STATUS_HEADER.size + BLOCK_STATUS_EXTENT.size * len(extents))
    BLOCK_STATUS_HEADER.pack_into(
        body,
        0,
        NBD_STRUCTURED_REPLY_MAGIC,
        flags,
        NbdReplyType.NBD_REPLY_TYPE_BLOCK_STATUS,
        cookie,
        4 + BLOCK_STATUS_EXTENT.size * len(extents),
        context_id,
    )
    pos = BLOCK_STATUS_HEADER.size
    for length, ext_flags in extents:
        if not 0 < length <= _U32_MAX:
            raise LocalProtocolError(f"extent length {length} is not in 1..2**32-1")
        _check_u32(ext_flags, "extent flags")
        BLOCK_STATUS_EXTENT.pack_into(body, pos, length, ext_flags)
        pos += BLOCK_STATUS_EXTENT.size
    return bytes(body)
