"""The one NBD *client* of the tests: a sans-IO core and two thin I/O adapters.

Written from the spec, independently of ``nbdvma.nbd.wire``, so that the server's own
encoders are never used to check themselves.

Theory of operation
-------------------

* **Encoders** (:func:`client_flags`, :func:`option`, :func:`info_payload`,
  :func:`meta_payload`, :func:`request`) turn what a client says into bytes.  They take
  any value, a wrong magic or a lying length included: a test that wants to send
  something malformed builds it here (or writes the bytes itself) and hands it to an
  adapter's ``send``, which sends *any* bytes as they are.
* :class:`ClientCore` is the decoder: bytes the server sent go in with
  :meth:`ClientCore.receive_data` (``b""`` is EOF); whole messages come out of its
  ``next_*`` methods as records (named tuples, so they compare equal to plain tuples),
  or :data:`NEED_DATA` while a message is incomplete (nothing is consumed then).  A
  wrong magic raises :class:`BadReply`; EOF inside a message raises
  :class:`ServerClosed`.  The two are deliberately different: a test that expects the
  server to hang up catches :class:`ServerClosed` only, so a garbled reply still fails it.
* :class:`Reader` is the core over a finished byte string (the output of a sans-IO
  server connection): every method returns the record or fails.
* :class:`SocketClient` (blocking socket, every read with a deadline) and
  :class:`TrioClient` (any ``trio.abc.Stream``) feed the core from their transport
  until a message is whole, and add the client's usual conversations: ``handshake``,
  ``call`` (one request, its whole reply), :meth:`SocketClient.expect_closed` (the
  server must hang up, and what it sent first is returned so that a test can assert it
  was nothing).
"""

from __future__ import annotations

import enum
import socket
import struct
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import trio

# -- numbers from the spec (independent of nbdvma.nbd.constants) --------------------------

IHAVEOPT = 0x49484156454F5054
NBDMAGIC = 0x4E42444D41474943
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

OPT_GO, OPT_STRUCTURED_REPLY = 7, 8
REP_ACK, REP_INFO = 1, 3
REP_ERR = 1 << 31
INFO_EXPORT = 0
REPLY_FLAG_DONE = 1
REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REPLY_TYPE_ERROR = 1, 2, (1 << 15) + 1
CMD_READ = 0

_GREETING = struct.Struct(">QQH")
_OPTION_REPLY = struct.Struct(">QIII")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_EXPORT_NAME_REPLY = struct.Struct(">QH")


# -- encoders --------------------------------------------------------------------------------


def client_flags(flags: int = 3) -> bytes:
    """The 4 bytes of client flags (default FIXED_NEWSTYLE | NO_ZEROES)."""
    return struct.pack(">I", flags)


def option(opt: int, payload: bytes = b"") -> bytes:
    """An option request: IHAVEOPT, option, length of ``payload``, payload."""
    return struct.pack(">QII", IHAVEOPT, opt, len(payload)) + payload


def info_payload(name: bytes, infos: tuple[int, ...] = ()) -> bytes:
    """The payload of NBD_OPT_INFO / NBD_OPT_GO."""
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_payload(name: bytes, queries: tuple[bytes, ...] = ()) -> bytes:
    """The payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q
    return out


def request(
    cmd: int,
    *,
    cookie: int = 1,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
    data: bytes = b"",
    magic: int = REQUEST_MAGIC,
) -> bytes:
    """A request header (any magic) followed by ``data`` (a WRITE payload, or not)."""
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + data


def parse_error_chunk(payload: bytes) -> tuple[int, bytes]:
    """The errno and message of an NBD_REPLY_TYPE_ERROR chunk's payload."""
    error, n = struct.unpack(">IH", payload[:6])
    assert len(payload) == 6 + n
    return int(error), payload[6:]


# -- records ---------------------------------------------------------------------------------


class OptionReply(NamedTuple):
    option: int
    reply: int
    data: bytes

    @property
    def final(self) -> bool:
        """An ACK or an error: the last reply to its option."""
        return self.reply == REP_ACK or bool(self.reply & REP_ERR)


class SimpleReply(NamedTuple):
    error: int
    cookie: int


class Chunk(NamedTuple):
    flags: int
    type: int
    cookie: int
    payload: bytes


class Reply(NamedTuple):
    """A whole reply, simple or structured: its error, cookie and READ data."""

    error: int
    cookie: int
    data: bytes


class ExportNameReply(NamedTuple):
    size: int
    flags: int


class NeedData(enum.Enum):
    NEED_DATA = enum.auto()


NEED_DATA = NeedData.NEED_DATA
T = TypeVar("T")


class ServerClosed(Exception):
    """The server closed the connection before a whole message arrived."""


class BadReply(AssertionError):
    """The server sent something that is not the message the client expected."""


class _Incomplete(Exception):
    pass


# -- the sans-IO core --------------------------------------------------------------------------


class ClientCore:
    """Decodes what the server sent; see the module docstring."""

    def __init__(self, *, structured: bool = False) -> None:
        #: Whether structured replies were negotiated (a READ then has no simple reply).
        self.structured = structured
        self._buf = bytearray()
        self._pos = 0  # read position of the message being parsed
        self.eof = False

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add bytes from the server; ``b""`` means the server closed."""
        if data:
            assert not self.eof, "data after EOF"
            self._buf += data
        else:
            self.eof = True

    def unread(self) -> bytes:
        """Everything received and not yet returned as a message."""
        return bytes(self._buf)

    def _take(self, n: int) -> bytes:
        if len(self._buf) - self._pos < n:
            if self.eof:
                raise ServerClosed(
                    f"server closed with {len(self._buf) - self._pos} of {n} bytes"
                    f" of a message ({len(self._buf)} unread)"
                )
            raise _Incomplete
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return out

    def _parse(self, parse: Callable[[], T]) -> T | NeedData:
        """Run ``parse``; consume its bytes only if the message was whole."""
        self._pos = 0
        try:
            out = parse()
        except _Incomplete:
            return NEED_DATA
        del self._buf[: self._pos]
        return out

    def next_bytes(self, n: int) -> bytes | NeedData:
        """``n`` raw bytes (for what the other methods do not know)."""
        return self._parse(lambda: self._take(n))

    def next_greeting(self) -> int | NeedData:
        """The fixed-newstyle greeting: its handshake flags."""

        def parse() -> int:
            magic, opt, flags = _GREETING.unpack(self._take(_GREETING.size))
            if (magic, opt) != (NBDMAGIC, IHAVEOPT):
                raise BadReply(f"bad greeting magic {magic:#x} {opt:#x}")
            return int(flags)

        return self._parse(parse)

    def next_option_reply(self) -> OptionReply | NeedData:
        return self._parse(self._option_reply)

    def _option_reply(self) -> OptionReply:
        magic, opt, rep, length = _OPTION_REPLY.unpack(self._take(_OPTION_REPLY.size))
        if magic != OPT_REPLY_MAGIC:
            raise BadReply(f"bad option reply magic {magic:#x}")
        return OptionReply(int(opt), int(rep), self._take(length))

    def next_option_replies(self) -> list[OptionReply] | NeedData:
        """All replies to one option, up to and including the final one."""

        def parse() -> list[OptionReply]:
            out = [self._option_reply()]
            while not out[-1].final:
                out.append(self._option_reply())
            return out

        return self._parse(parse)

    def next_export_name_reply(self, *, no_zeroes: bool = True) -> ExportNameReply | NeedData:
        def parse() -> ExportNameReply:
            size, flags = _EXPORT_NAME_REPLY.unpack(self._take(_EXPORT_NAME_REPLY.size))
            if not no_zeroes and self._take(124) != bytes(124):
                raise BadReply("export-name padding is not zeroes")
            return ExportNameReply(int(size), int(flags))

        return self._parse(parse)

    def next_simple(self) -> SimpleReply | NeedData:
        """A simple reply header (READ data, if any, is not part of it)."""

        def parse() -> SimpleReply:
            magic, error, cookie = _SIMPLE.unpack(self._take(_SIMPLE.size))
            if magic != SIMPLE_MAGIC:
                raise BadReply(f"bad simple reply magic {magic:#x}")
            return SimpleReply(int(error), int(cookie))

        return self._parse(parse)

    def next_chunk(self) -> Chunk | NeedData:
        return self._parse(self._chunk)

    def _chunk(self) -> Chunk:
        magic, flags, typ, cookie, length = _CHUNK.unpack(self._take(_CHUNK.size))
        if magic != STRUCTURED_MAGIC:
            raise BadReply(f"bad structured reply magic {magic:#x}")
        return Chunk(int(flags), int(typ), int(cookie), self._take(length))

    def next_reply(self, read_length: int = 0) -> Reply | NeedData:
        """One whole reply, simple or structured (chunks up to DONE).

        A successful simple reply carries ``read_length`` bytes of READ data; a simple
        reply with data once structured replies are on is a :class:`BadReply`.
        """
        return self._parse(lambda: self._reply(read_length))

    def _reply(self, read_length: int) -> Reply:
        start = self._pos
        (magic,) = struct.unpack(">I", self._take(4))
        self._pos = start
        if magic == SIMPLE_MAGIC:
            _, error, cookie = _SIMPLE.unpack(self._take(_SIMPLE.size))
            if self.structured and read_length:
                raise BadReply("a simple reply to a READ with structured replies on")
            data = self._take(read_length) if not error and read_length else b""
            return Reply(int(error), int(cookie), data)
        joined = bytearray()
        while True:
            chunk = self._chunk()
            if chunk.type == REPLY_TYPE_ERROR:
                if not chunk.flags & REPLY_FLAG_DONE:
                    raise BadReply("an error chunk without DONE")
                return Reply(parse_error_chunk(chunk.payload)[0], chunk.cookie, b"")
            if chunk.type == REPLY_TYPE_OFFSET_DATA:
                joined += chunk.payload[8:]
            elif chunk.type == REPLY_TYPE_OFFSET_HOLE:
                joined += bytes(struct.unpack(">QI", chunk.payload)[1])
            if chunk.flags & REPLY_FLAG_DONE:
                return Reply(0, chunk.cookie, bytes(joined))


def _got(value: T | NeedData) -> T:
    if value is NEED_DATA:
        raise BadReply("server output too short")
    return value


class Reader(ClientCore):
    """The core over finished output: every method returns its message or fails."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.receive_data(data)
        self.receive_data(b"")

    def take(self, n: int) -> bytes:
        return _got(self.next_bytes(n))

    def at_end(self) -> bool:
        return not self._buf

    def greeting(self) -> int:
        return _got(self.next_greeting())

    def option_reply(self) -> OptionReply:
        return _got(self.next_option_reply())

    def option_replies(self) -> list[OptionReply]:
        return _got(self.next_option_replies())

    def simple(self) -> SimpleReply:
        return _got(self.next_simple())

    def export_name_reply(self, *, no_zeroes: bool = True) -> ExportNameReply:
        return _got(self.next_export_name_reply(no_zeroes=no_zeroes))

    def chunk(self) -> Chunk:
        return _got(self.next_chunk())


def go_payload(export: str, infos: tuple[int, ...] = ()) -> bytes:
    """NBD_OPT_GO for ``export``."""
    return option(OPT_GO, info_payload(export.encode(), infos))


def check_go(replies: list[OptionReply]) -> tuple[int, int] | None:
    """The ``(size, transmission flags)`` of a successful GO's replies (None if no INFO)."""
    assert all(r.option == OPT_GO for r in replies), replies
    assert not replies[-1].reply & REP_ERR, f"GO failed: {replies[-1]}"
    out = None
    for r in replies:
        if r.reply == REP_INFO and struct.unpack(">H", r.data[:2])[0] == INFO_EXPORT:
            _, size, flags = struct.unpack(">HQH", r.data)
            out = int(size), int(flags)
    return out


# -- adapters ----------------------------------------------------------------------------------


class SocketClient:
    """The core over a blocking socket; every read waits at most ``timeout`` seconds."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.timeout = timeout
        sock.settimeout(timeout)
        self.core = ClientCore()

    @classmethod
    def unix(cls, path: str, timeout: float = 10.0) -> SocketClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(sock, timeout)

    @classmethod
    def tcp(cls, port: int, timeout: float = 10.0) -> SocketClient:
        return cls(socket.create_connection(("127.0.0.1", port), timeout), timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SocketClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        """Send ``data`` as it is (well-formed or not)."""
        self.sock.sendall(data)

    def send_option(self, opt: int, payload: bytes = b"") -> None:
        self.send(option(opt, payload))

    def send_request(
        self,
        cmd: int,
        *,
        cookie: int = 1,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        data: bytes = b"",
    ) -> None:
        self.send(request(cmd, cookie=cookie, offset=offset, length=length, flags=flags, data=data))

    def _receive(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            raise AssertionError(f"nothing from the server within {self.timeout} s") from None
        except ConnectionResetError:
            data = b""
        self.core.receive_data(data)

    def _pull(self, parse: Callable[[], T | NeedData]) -> T:
        while (out := parse()) is NEED_DATA:
            self._receive()
        return out

    def recv_exactly(self, n: int) -> bytes:
        return self._pull(lambda: self.core.next_bytes(n))

    def greeting(self) -> int:
        return self._pull(self.core.next_greeting)

    def option_reply(self) -> OptionReply:
        return self._pull(self.core.next_option_reply)

    def option_replies(self) -> list[OptionReply]:
        return self._pull(self.core.next_option_replies)

    def export_name_reply(self, *, no_zeroes: bool = True) -> ExportNameReply:
        return self._pull(lambda: self.core.next_export_name_reply(no_zeroes=no_zeroes))

    def chunk(self) -> Chunk:
        return self._pull(self.core.next_chunk)

    def reply(self, read_length: int = 0) -> Reply:
        return self._pull(lambda: self.core.next_reply(read_length))

    # conversations

    def start(self, flags: int = 3) -> None:
        """Read the greeting (FIXED_NEWSTYLE | NO_ZEROES) and send client ``flags``."""
        assert self.greeting() == 3
        self.send(client_flags(flags))

    def final(self, opt: int, payload: bytes = b"") -> int:
        """Send an option and return its final reply type (checking the echo)."""
        self.send(option(opt, payload))
        replies = self.option_replies()
        assert all(r.option == opt for r in replies), replies
        return replies[-1].reply

    def go(
        self, export: str, *, structured: bool = True, infos: tuple[int, ...] = ()
    ) -> tuple[int, int] | None:
        """STRUCTURED_REPLY (optional) and GO; the export's ``(size, flags)``."""
        if structured:
            assert self.final(OPT_STRUCTURED_REPLY) == REP_ACK
            self.core.structured = True
        self.send(go_payload(export, infos))
        return check_go(self.option_replies())

    def handshake(self, export: str, *, structured: bool = False) -> tuple[int, int] | None:
        """Greeting, flags and GO: the connection is then in transmission."""
        self.start()
        return self.go(export, structured=structured)

    def call(
        self,
        cmd: int,
        *,
        cookie: int = 0x1234_5678_9ABC_DEF0,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        data: bytes = b"",
    ) -> tuple[int, bytes]:
        """Send one request and return ``(error, READ data)`` of its reply (cookie checked)."""
        self.send_request(cmd, cookie=cookie, offset=offset, length=length, flags=flags, data=data)
        error, got, read = self.reply(length if cmd == CMD_READ else 0)
        assert got == cookie, (got, cookie)
        return error, read

    def expect_closed(self, timeout: float | None = None) -> bytes:
        """Read until the server closes; return what was unread and what came first.

        A test asserts this is ``b""`` when the server must hang up without a word.
        """
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            while not self.core.eof:
                try:
                    data = self.sock.recv(1 << 16)
                except ConnectionResetError:
                    data = b""
                self.core.receive_data(data)
        except TimeoutError:
            raise AssertionError(f"server did not close within {timeout} s") from None
        return self.core.unread()

    def closed_now(self) -> bool:
        """Whether the server has closed (EOF or reset), without waiting."""
        self.sock.setblocking(False)
        try:
            while not self.core.eof:
                try:
                    data = self.sock.recv(1 << 16)
                except ConnectionResetError:
                    data = b""
                self.core.receive_data(data)
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        return True


class TrioClient:
    """The core over a trio stream (memory streams, socket streams)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.core = ClientCore()

    async def send(self, data: bytes) -> None:
        """Send ``data`` as it is (well-formed or not)."""
        await self.stream.send_all(data)

    async def _receive(self) -> None:
        try:
            data = await self.stream.receive_some()
        except trio.BrokenResourceError:
            data = b""
        self.core.receive_data(data)

    async def _pull(self, parse: Callable[[], T | NeedData]) -> T:
        while (out := parse()) is NEED_DATA:
            await self._receive()
        return out

    async def recv_exactly(self, n: int) -> bytes:
        return await self._pull(lambda: self.core.next_bytes(n))

    async def greeting(self) -> int:
        return await self._pull(self.core.next_greeting)

    async def option_reply(self) -> OptionReply:
        return await self._pull(self.core.next_option_reply)

    async def option_replies(self) -> list[OptionReply]:
        return await self._pull(self.core.next_option_replies)

    async def simple(self) -> SimpleReply:
        return await self._pull(self.core.next_simple)

    async def handshake(self, export: str = "d0", *, structured: bool = False) -> None:
        """Greeting, flags, (STRUCTURED_REPLY,) GO: the connection is in transmission."""
        assert await self.greeting() == 3
        await self.send(client_flags(3))
        if structured:
            await self.send(option(OPT_STRUCTURED_REPLY))
            assert (await self.option_reply()).reply == REP_ACK
            self.core.structured = True
        await self.send(go_payload(export))
        check_go(await self.option_replies())

    #: Seconds (of trio time) :meth:`expect_closed` waits for the server to hang up.
    close_timeout = 60.0

    async def expect_closed(self) -> bytes:
        """Read until the server closes (within :attr:`close_timeout`); return what was
        unread and what came first, which a test asserts is ``b""``."""
        with trio.fail_after(self.close_timeout):
            while not self.core.eof:
                await self._receive()
        return self.core.unread()
