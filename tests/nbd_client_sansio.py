"""A tiny sans-IO NBD *client* for the tests: encodes what a client sends and
decodes what the server sent, straight from the spec (independent of wire.py)."""

from __future__ import annotations

import struct

IHAVEOPT = 0x49484156454F5054
NBDMAGIC = 0x4E42444D41474943
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF


def client_flags(flags: int = 3) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(payload)) + payload


def info_payload(name: bytes, infos: tuple[int, ...] = ()) -> bytes:
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_payload(name: bytes, queries: tuple[bytes, ...] = ()) -> bytes:
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
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + data


class Reader:
    """Decode server output; every method asserts on the magic."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        assert self.pos + n <= len(self.data), "server output too short"
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def at_end(self) -> bool:
        return self.pos == len(self.data)

    def greeting(self) -> int:
        magic, opt, flags = struct.unpack(">QQH", self.take(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        return int(flags)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.take(20))
        assert magic == OPT_REPLY_MAGIC
        return opt, rep, self.take(length)

    def option_replies(self) -> list[tuple[int, int, bytes]]:
        """All replies up to and including a final one (ACK or error)."""
        out = []
        while True:
            r = self.option_reply()
            out.append(r)
            if r[1] == 1 or r[1] & (1 << 31):
                return out

    def simple(self) -> tuple[int, int]:
        magic, error, cookie = struct.unpack(">IIQ", self.take(16))
        assert magic == SIMPLE_MAGIC
        return int(error), int(cookie)

    def chunk(self) -> tuple[int, int, int, bytes]:
        magic, flags, typ, cookie, length = struct.unpack(">IHHQI", self.take(20))
        assert magic == STRUCTURED_MAGIC
        return int(flags), int(typ), int(cookie), self.take(length)


def parse_error_chunk(payload: bytes) -> tuple[int, bytes]:
    error, n = struct.unpack(">IH", payload[:6])
    assert len(payload) == 6 + n
    return int(error), payload[6:]
