"""NbdServerConnection: bytes in, events and bytes out (no I/O)."""

from __future__ import annotations

import errno
import itertools
import socket
import struct
import threading

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_client_sansio import (
    Reader,
    client_flags,
    info_payload,
    meta_payload,
    option,
    parse_error_chunk,
    request,
)

from nbdvma.errors import LocalProtocolError, RemoteProtocolError
from nbdvma.nbd import (
    NEED_DATA,
    Capabilities,
    ConnectionClosed,
    DataChunk,
    Disconnect,
    ExportInfo,
    ExportRefused,
    HandshakeAborted,
    HoleChunk,
    Limits,
    NbdPhase,
    NbdServerConnection,
    PassedData,
    RejectedRequest,
    Request,
    TransmissionStarted,
)
from nbdvma.nbd.constants import (
    NbdCmdFlag,
    NbdCommand,
    NbdInfo,
    NbdOption,
    NbdRep,
    NbdReplyFlag,
    NbdReplyType,
    NbdTransmissionFlag,
)
from nbdvma.nbd.state import PHASE, TRANSITIONS, ReceiveState, RxState

O = NbdOption  # noqa: E741
R = NbdRep
C = NbdCommand
F = NbdCmdFlag
T = NbdTransmissionFlag
ACK = R.NBD_REP_ACK
DONE = NbdReplyFlag.NBD_REPLY_FLAG_DONE
SIZE = 1 << 20
FULL = {
    "can_fua": True,
    "can_trim": True,
    "can_zero": True,
    "can_fast_zero": True,
    "can_cache": True,
    "can_multi_conn": True,
}


def make(**kw: object) -> NbdServerConnection:
    """A connection to one export; ``can_*`` arguments go to its :class:`Capabilities`."""
    caps = Capabilities(**{k: kw.pop(k) for k in list(kw) if k.startswith("can_")})  # type: ignore[arg-type]
    exports = {"disk": ExportInfo("disk", SIZE, "the disk", capabilities=caps, **kw)}  # type: ignore[arg-type]
    return NbdServerConnection(exports)


def events(conn: NbdServerConnection) -> list[object]:
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
        if isinstance(ev, ConnectionClosed | Disconnect | HandshakeAborted):
            break  # what an I/O loop does: these end the connection
    return out


def feed(conn: NbdServerConnection, data: bytes) -> list[object]:
    conn.receive_data(data)
    return events(conn)


def start(conn: NbdServerConnection, *, flags: int = 3) -> None:
    greeting = Reader(conn.data_to_send()).greeting()
    assert greeting == 3
    assert feed(conn, client_flags(flags)) == []


def replies(conn: NbdServerConnection, data: bytes) -> list[tuple[int, int, bytes]]:
    """Send one option, return its replies (and check nothing else was sent)."""
    assert feed(conn, data) == []
    r = Reader(conn.data_to_send())
    out = r.option_replies()
    assert r.at_end()
    return out


def go(
    conn: NbdServerConnection,
    *,
    structured: bool = False,
    meta: bool = False,
    infos: tuple[int, ...] = (NbdInfo.NBD_INFO_BLOCK_SIZE,),
) -> TransmissionStarted:
    start(conn)
    msg = b""
    if structured:
        msg += option(O.NBD_OPT_STRUCTURED_REPLY)
    if meta:
        msg += option(O.NBD_OPT_SET_META_CONTEXT, meta_payload(b"disk", (b"base:allocation",)))
    msg += option(O.NBD_OPT_GO, info_payload(b"disk", infos))
    evs = feed(conn, msg)
    conn.data_to_send()
    assert len(evs) == 1
    ev = evs[0]
    assert isinstance(ev, TransmissionStarted)
    return ev


# --- handshake ------------------------------------------------------------------


def test_greeting_is_available_at_once() -> None:
    conn = make()
    assert conn.data_to_send().hex() == "4e42444d41474943" + "49484156454f5054" + "0003"
    assert conn.phase is NbdPhase.HANDSHAKE
    assert conn.next_event() is NEED_DATA


@pytest.mark.parametrize("flags", [4, 0x80000000, 0xFFFFFFFF])
def test_unknown_client_flags_disconnect(flags: int) -> None:
    conn = make()
    conn.receive_data(client_flags(flags))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.phase is NbdPhase.ERROR
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    conn.receive_data(b"ignored")


@pytest.mark.parametrize(("flags", "padding"), [(3, 0), (1, 124), (0, 124), (2, 0)])
def test_export_name(flags: int, padding: int) -> None:
    conn = make(can_flush=True)
    start(conn, flags=flags)
    (ev,) = feed(conn, option(O.NBD_OPT_EXPORT_NAME, b"disk"))
    assert ev == TransmissionStarted(
        "disk", False, False, T.NBD_FLAG_HAS_FLAGS | T.NBD_FLAG_SEND_FLUSH
    )
    out = conn.data_to_send()
    assert out == struct.pack(">QH", SIZE, 0x5) + bytes(padding)
    assert conn.phase is NbdPhase.TRANSMISSION


def test_export_name_default_export_and_structured() -> None:
    conn = make()
    start(conn)
    assert replies(conn, option(O.NBD_OPT_STRUCTURED_REPLY)) == [(8, ACK, b"")]
    (ev,) = feed(conn, option(O.NBD_OPT_EXPORT_NAME, b""))
    assert isinstance(ev, TransmissionStarted)
    assert ev.export_name == "disk"
    assert ev.structured_replies
    assert ev.transmission_flags & T.NBD_FLAG_SEND_DF


@pytest.mark.parametrize("name", [b"nope", b"\xff", b"x" * 5000])
def test_export_name_unknown_disconnects(name: bytes) -> None:
    conn = make()
    start(conn)
    conn.receive_data(option(O.NBD_OPT_EXPORT_NAME, name))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_export_name_over_cap_disconnects() -> None:
    conn = make()
    start(conn)
    conn.receive_data(struct.pack(">QII", 0x49484156454F5054, 1, 65 * 1024))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


@pytest.mark.parametrize("payload", [b"", b"junk"])
def test_abort(payload: bytes) -> None:
    conn = make()
    start(conn)
    assert feed(conn, option(O.NBD_OPT_ABORT, payload)) == [HandshakeAborted()]
    r = Reader(conn.data_to_send())
    assert r.option_reply() == (2, ACK, b"")
    assert r.at_end()
    assert conn.phase is NbdPhase.CLOSED
    conn.receive_data(b"whatever")  # ignored
    assert conn.next_event() == ConnectionClosed()


def test_list() -> None:
    exports = {
        "a": ExportInfo("a", 512, "first"),
        "b": ExportInfo("b", 512),
    }
    conn = NbdServerConnection(exports)
    start(conn)
    assert replies(conn, option(O.NBD_OPT_LIST)) == [
        (3, R.NBD_REP_SERVER, b"\0\0\0\x01afirst"),
        (3, R.NBD_REP_SERVER, b"\0\0\0\x01b"),
        (3, ACK, b""),
    ]
    ((opt, rep, _),) = replies(conn, option(O.NBD_OPT_LIST, b"x"))
    assert (opt, rep) == (3, R.NBD_REP_ERR_INVALID)


def test_info_then_go() -> None:
    conn = make()
    start(conn)
    info = replies(conn, option(O.NBD_OPT_INFO, info_payload(b"disk")))
    flags = T.NBD_FLAG_HAS_FLAGS | T.NBD_FLAG_SEND_FLUSH
    assert info == [
        (6, R.NBD_REP_INFO, struct.pack(">HQH", 0, SIZE, flags)),
        (6, ACK, b""),
    ]
    assert conn.phase is NbdPhase.HANDSHAKE
    (ev,) = feed(conn, option(O.NBD_OPT_GO, info_payload(b"disk")))
    assert isinstance(ev, TransmissionStarted)
    r = Reader(conn.data_to_send())
    assert r.option_replies() == [(7, *x[1:]) for x in info]
    assert r.at_end()


def test_go_infos_in_order_unknown_ignored() -> None:
    conn = make(min_block=512, preferred_block=65536, max_block=1 << 21)
    start(conn)
    infos = (99, NbdInfo.NBD_INFO_BLOCK_SIZE, 2, 1, 0, 1)
    (ev,) = feed(conn, option(O.NBD_OPT_GO, info_payload(b"disk", infos)))
    assert isinstance(ev, TransmissionStarted)
    r = Reader(conn.data_to_send())
    assert [(rep, data) for _, rep, data in r.option_replies()] == [
        (R.NBD_REP_INFO, struct.pack(">HQH", 0, SIZE, 0x5)),
        (R.NBD_REP_INFO, struct.pack(">HIII", 3, 512, 65536, 1 << 21)),
        (R.NBD_REP_INFO, b"\0\x02the disk"),
        (R.NBD_REP_INFO, b"\0\x01disk"),
        (R.NBD_REP_ACK, b""),
    ]


def test_go_unknown_export_then_next_option() -> None:
    conn = make()
    start(conn)
    # The I/O layer hears which name was refused (so an operator can be told).
    assert feed(conn, option(O.NBD_OPT_GO, info_payload(b"other"))) == [
        ExportRefused(O.NBD_OPT_GO, "other")
    ]
    r = Reader(conn.data_to_send())
    ((opt, rep, msg),) = r.option_replies()
    assert r.at_end()
    assert (opt, rep) == (7, R.NBD_REP_ERR_UNKNOWN)
    assert msg == b"unknown export"
    assert isinstance(
        feed(conn, option(O.NBD_OPT_GO, info_payload(b"disk")))[0], TransmissionStarted
    )


GOOD_GO = info_payload(b"disk", (3,))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\0\0\0",
        GOOD_GO[:-1],
        GOOD_GO + b"\0",
        b"\0\0\0\x05disk\0\0",  # name length past the end
        b"\xff\xff\xff\xffdisk\0\0",
        b"\0\0\0\x04disk\0\x02\0\x03",  # count says 2, one given
        b"\0\0\0\x04disk",  # no count
    ],
)
@pytest.mark.parametrize("opt", [O.NBD_OPT_INFO, O.NBD_OPT_GO])
def test_info_go_malformed(opt: int, payload: bytes) -> None:
    conn = make()
    start(conn)
    ((o, rep, _),) = replies(conn, option(opt, payload))
    assert (o, rep) == (opt, R.NBD_REP_ERR_INVALID)
    assert conn.phase is NbdPhase.HANDSHAKE


def test_structured_reply_with_data_invalid() -> None:
    conn = make()
    start(conn)
    ((_, rep, _),) = replies(conn, option(O.NBD_OPT_STRUCTURED_REPLY, b"x"))
    assert rep == R.NBD_REP_ERR_INVALID
    ev = go(make())
    assert not ev.transmission_flags & T.NBD_FLAG_SEND_DF


@pytest.mark.parametrize(
    ("queries", "listed"),
    [
        ((), True),
        ((b"base:",), True),
        ((b"base:allocation",), True),
        ((b"qemu:dirty-bitmap:x", b"base:allocation"), True),
        ((b"qemu:dirty-bitmap:x",), False),
        ((b"base:other",), False),
    ],
)
def test_list_meta_context(queries: tuple[bytes, ...], listed: bool) -> None:
    conn = make()
    start(conn)  # LIST works without structured replies
    got = replies(conn, option(O.NBD_OPT_LIST_META_CONTEXT, meta_payload(b"disk", queries)))
    want = [(9, R.NBD_REP_META_CONTEXT, b"\0\0\0\0base:allocation")] if listed else []
    assert got == [*want, (9, ACK, b"")]


def test_set_meta_context() -> None:
    conn = make()
    start(conn)
    set_ba = option(O.NBD_OPT_SET_META_CONTEXT, meta_payload(b"disk", (b"base:allocation",)))
    ((_, rep, _),) = replies(conn, set_ba)
    assert rep == R.NBD_REP_ERR_INVALID  # before STRUCTURED_REPLY
    replies(conn, option(O.NBD_OPT_STRUCTURED_REPLY))
    assert replies(conn, set_ba) == [
        (10, R.NBD_REP_META_CONTEXT, b"\0\0\0\x01base:allocation"),
        (10, ACK, b""),
    ]
    # A later SET replaces the selection.
    other = meta_payload(b"disk", (b"base:",))
    assert replies(conn, option(O.NBD_OPT_SET_META_CONTEXT, other)) == [(10, ACK, b"")]
    (ev,) = feed(conn, option(O.NBD_OPT_GO, info_payload(b"disk")))
    assert isinstance(ev, TransmissionStarted)
    assert not ev.meta_context_selected


def test_set_meta_context_for_other_export_does_not_count() -> None:
    exports = {"a": ExportInfo("a", 512), "b": ExportInfo("b", 512)}
    conn = NbdServerConnection(exports)
    start(conn)
    replies(conn, option(O.NBD_OPT_STRUCTURED_REPLY))
    replies(conn, option(O.NBD_OPT_SET_META_CONTEXT, meta_payload(b"a", (b"base:allocation",))))
    (ev,) = feed(conn, option(O.NBD_OPT_GO, info_payload(b"b")))
    assert isinstance(ev, TransmissionStarted)
    assert ev.structured_replies
    assert not ev.meta_context_selected


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\0\0\0\x04disk",
        meta_payload(b"disk", (b"base:allocation",))[:-1],
        meta_payload(b"disk", (b"base:allocation",)) + b"x",
        b"\0\0\0\x04disk\xff\xff\xff\xff",  # huge query count
        b"\0\0\0\x04disk\0\0\0\x01\0\0\0\x40base:",
    ],
)
@pytest.mark.parametrize("opt", [O.NBD_OPT_LIST_META_CONTEXT, O.NBD_OPT_SET_META_CONTEXT])
def test_meta_context_malformed(opt: int, payload: bytes) -> None:
    conn = make()
    start(conn)
    replies(conn, option(O.NBD_OPT_STRUCTURED_REPLY))
    ((_, rep, _),) = replies(conn, option(opt, payload))
    assert rep == R.NBD_REP_ERR_INVALID


def test_meta_context_unknown_export() -> None:
    conn = make()
    start(conn)
    ((_, rep, _),) = replies(conn, option(O.NBD_OPT_LIST_META_CONTEXT, meta_payload(b"zz")))
    assert rep == R.NBD_REP_ERR_UNKNOWN


@pytest.mark.parametrize("opt", [O.NBD_OPT_STARTTLS, O.NBD_OPT_EXTENDED_HEADERS])
def test_starttls_and_extended_headers_unsupported(opt: int) -> None:
    conn = make()
    start(conn)
    ((o, rep, _),) = replies(conn, option(opt))
    assert (o, rep) == (opt, R.NBD_REP_ERR_UNSUP)


@pytest.mark.parametrize("opt", [0, 4, 12, 0x7FFFFFFF, 0xFFFFFFFF])
def test_unknown_option_drained_then_next_parsed(opt: int) -> None:
    conn = make()
    start(conn)
    payload = bytes(range(256)) * 4096  # 1 MiB, not buffered
    data = option(opt, payload) + option(O.NBD_OPT_LIST)
    for i in range(0, len(data), 65536):
        assert feed(conn, data[i : i + 65536]) == []
        assert len(conn._buf) < 65536 + 16  # the drain does not buffer
    r = Reader(conn.data_to_send())
    assert r.option_reply()[:2] == (opt, R.NBD_REP_ERR_UNSUP)
    assert r.option_replies()[-1] == (3, ACK, b"")


def test_known_option_over_cap_too_big() -> None:
    conn = make()
    start(conn)
    big = option(O.NBD_OPT_GO, b"\0" * (64 * 1024 + 1))
    ((o, rep, _),) = replies(conn, big)
    assert (o, rep) == (7, R.NBD_REP_ERR_TOO_BIG)
    assert isinstance(
        feed(conn, option(O.NBD_OPT_GO, info_payload(b"disk")))[0], TransmissionStarted
    )


def test_option_over_absolute_cap_disconnects() -> None:
    conn = make()
    start(conn)
    conn.receive_data(struct.pack(">QII", 0x49484156454F5054, 99, 32 * 1024 * 1024 + 1))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_too_many_options_disconnect() -> None:
    conn = make()  # 32 + 1 export
    start(conn)
    for _ in range(33):
        replies(conn, option(O.NBD_OPT_LIST))
    conn.receive_data(option(O.NBD_OPT_LIST))
    with pytest.raises(RemoteProtocolError, match="options"):
        conn.next_event()


def test_limits_are_configurable() -> None:
    conn = NbdServerConnection({"d": ExportInfo("d", 512)}, limits=Limits(max_option_payload=4))
    start(conn)
    ((_, rep, _),) = replies(conn, option(O.NBD_OPT_GO, info_payload(b"d")))
    assert rep == R.NBD_REP_ERR_TOO_BIG


def test_bad_option_magic() -> None:
    conn = make()
    start(conn)
    conn.receive_data(b"IHAVEOPX" + bytes(8))
    with pytest.raises(RemoteProtocolError, match="magic"):
        conn.next_event()


@pytest.mark.parametrize(
    ("data", "truncated"),
    [
        (b"", False),
        (client_flags(), False),
        (client_flags()[:2], True),
        (client_flags() + option(O.NBD_OPT_LIST)[:5], True),
        (client_flags() + option(O.NBD_OPT_GO, info_payload(b"disk"))[:20], True),
        (client_flags() + option(99, b"abc")[:17], True),
    ],
)
def test_eof_in_handshake(data: bytes, truncated: bool) -> None:
    conn = make()
    if data:
        conn.receive_data(data)
    conn.receive_data(b"")
    assert events(conn) == [ConnectionClosed(truncated=truncated)]
    assert conn.next_event() == ConnectionClosed()


def test_data_after_eof_is_local_error() -> None:
    conn = make()
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")


# --- transmission -----------------------------------------------------------------


def test_read_simple_reply_is_not_copied() -> None:
    conn = make()
    go(conn)
    (ev,) = feed(conn, request(C.NBD_CMD_READ, cookie=0xDEADBEEFCAFE, offset=512, length=4))
    assert ev == Request(0xDEADBEEFCAFE, C.NBD_CMD_READ, F(0), 512, 4, None)
    payload = bytearray(b"abcd")
    conn.send_read_reply(0xDEADBEEFCAFE, 512, payload)
    bufs = conn.buffers_to_send()
    assert bufs[1] is payload
    assert Reader(bytes(bufs[0])).simple() == (0, 0xDEADBEEFCAFE)


@pytest.mark.parametrize("structured", [False, True])
def test_read_reply_with_passed_data_is_handed_back_in_place(structured: bool) -> None:
    """Data the I/O layer sends itself (sendfile) keeps its place after the header,
    between the replies queued before and after it; ``data_to_send`` cannot join it."""
    conn = make()
    go(conn, structured=structured)
    feed(conn, request(C.NBD_CMD_FLUSH, cookie=1))
    feed(conn, request(C.NBD_CMD_READ, cookie=2, offset=4096, length=8192))
    feed(conn, request(C.NBD_CMD_FLUSH, cookie=3))
    conn.send_reply(1)
    passed = PassedData(8192, source=object())
    conn.send_read_reply(2, 4096, passed)
    conn.send_reply(3)
    before, header, item, after = conn.buffers_to_send()
    assert item is passed
    assert len(item) == 8192
    assert Reader(bytes(before)).simple() == (0, 1)  # (success without data: simple)
    if structured:
        assert bytes(header) == struct.pack(">LHHQLQ", 0x668E33EF, DONE, 1, 2, 8 + 8192, 4096)
    else:
        assert Reader(bytes(header)).simple() == (0, 2)
    assert Reader(bytes(after)).simple() == (0, 3)
    conn.send_read_reply(4, 0, PassedData(1, None))
    with pytest.raises(LocalProtocolError, match="PassedData"):
        conn.data_to_send()


def test_read_structured_reply() -> None:
    conn = make()
    go(conn, structured=True)
    feed(conn, request(C.NBD_CMD_READ, cookie=7, offset=512, length=4, flags=F.NBD_CMD_FLAG_DF))
    conn.send_read_reply(7, 512, b"abcd")
    r = Reader(conn.data_to_send())
    assert r.chunk() == (DONE, 1, 7, struct.pack(">Q", 512) + b"abcd")
    assert r.at_end()


def test_read_reply_chunks() -> None:
    chunks = [DataChunk(0, b"ab"), HoleChunk(2, 3), DataChunk(5, memoryview(b"c"))]
    conn = make()
    go(conn, structured=True)
    conn.send_read_reply_chunks(9, chunks)
    r = Reader(conn.data_to_send())
    assert r.chunk() == (0, 1, 9, bytes(8) + b"ab")
    assert r.chunk() == (0, 2, 9, struct.pack(">QI", 2, 3))
    assert r.chunk() == (DONE, 1, 9, struct.pack(">Q", 5) + b"c")
    assert r.at_end()
    conn = make()
    go(conn)
    conn.send_read_reply_chunks(9, chunks)
    r = Reader(conn.data_to_send())
    assert r.simple() == (0, 9)
    assert r.take(6) == b"ab\0\0\0c"
    assert r.at_end()
    with pytest.raises(LocalProtocolError):
        conn.send_read_reply_chunks(9, [])


def test_write_payload_split_and_zero_copy() -> None:
    conn = make()
    go(conn)
    assert feed(conn, request(C.NBD_CMD_WRITE, cookie=3, offset=4096, length=6)) == []
    assert feed(conn, b"abc") == []
    (ev,) = feed(conn, b"def" + request(C.NBD_CMD_FLUSH, cookie=4)[:10])
    assert ev == Request(3, C.NBD_CMD_WRITE, F(0), 4096, 6, b"abcdef")
    (ev,) = feed(conn, request(C.NBD_CMD_FLUSH, cookie=4)[10:])
    assert ev == Request(4, C.NBD_CMD_FLUSH, F(0), 0, 0, None)
    # A payload received as exactly one chunk is handed on without a copy.
    feed(conn, request(C.NBD_CMD_WRITE, cookie=5, length=4096))
    payload = bytes(range(256)) * 16
    (ev,) = feed(conn, payload)
    assert isinstance(ev, Request)
    assert ev.data is payload
    conn.send_reply(3)
    conn.send_reply(4)
    r = Reader(conn.data_to_send())
    assert [r.simple(), r.simple()] == [(0, 3), (0, 4)]


def test_disconnect() -> None:
    conn = make()
    go(conn)
    assert feed(conn, request(C.NBD_CMD_DISC) + b"trailing junk") == [Disconnect()]
    assert conn.phase is NbdPhase.CLOSED
    assert conn.data_to_send() == b""
    conn.receive_data(b"more")
    assert conn.next_event() == ConnectionClosed()


def test_bad_request_magic() -> None:
    conn = make()
    go(conn)
    conn.receive_data(request(C.NBD_CMD_READ, length=1, magic=0x21E41C71))
    with pytest.raises(RemoteProtocolError, match="magic"):
        conn.next_event()


@pytest.mark.parametrize(
    "data",
    [
        request(C.NBD_CMD_WRITE, length=10, data=b"12345"),
        request(C.NBD_CMD_WRITE, offset=SIZE, length=10, data=b"12345"),  # draining
        request(C.NBD_CMD_READ, length=10)[:27],
    ],
)
def test_truncated_at_eof(data: bytes) -> None:
    conn = make()
    go(conn)
    conn.receive_data(data)
    conn.receive_data(b"")
    assert events(conn) == [ConnectionClosed(truncated=True)]


def test_clean_eof_in_transmission() -> None:
    conn = make()
    go(conn)
    assert feed(conn, b"") == [ConnectionClosed(truncated=False)]


EINVAL, EPERM, ENOSPC, EOVERFLOW = 22, 1, 28, 75
RO = {"can_write": False}
NOFLUSH = {"can_flush": False}
ALIGNED = {"min_block": 512}
SMALLMAX = {"max_block": 1 << 16}


# (export kwargs, structured, meta, command, flags, offset, length, expected errno)
VALIDATION = [
    ({}, False, False, 9, 0, 0, 512, EINVAL),
    ({}, False, False, 0xFFFF, 0, 0, 512, EINVAL),
    (NOFLUSH, False, False, C.NBD_CMD_FLUSH, 0, 0, 0, EINVAL),
    ({}, False, False, C.NBD_CMD_TRIM, 0, 0, 512, EINVAL),
    ({}, False, False, C.NBD_CMD_WRITE_ZEROES, 0, 0, 512, EINVAL),
    ({}, False, False, C.NBD_CMD_CACHE, 0, 0, 512, EINVAL),
    (FULL, True, False, C.NBD_CMD_BLOCK_STATUS, 0, 0, 512, EINVAL),
    ({}, False, False, C.NBD_CMD_WRITE, F.NBD_CMD_FLAG_FUA, 0, 512, EINVAL),
    ({}, False, False, C.NBD_CMD_READ, F.NBD_CMD_FLAG_FUA, 0, 512, EINVAL),
    (FULL, False, False, C.NBD_CMD_READ, F.NBD_CMD_FLAG_DF, 0, 512, EINVAL),
    (FULL, True, False, C.NBD_CMD_WRITE, F.NBD_CMD_FLAG_DF, 0, 512, EINVAL),
    (FULL, False, False, C.NBD_CMD_WRITE, F.NBD_CMD_FLAG_NO_HOLE, 0, 512, EINVAL),
    (FULL, True, True, C.NBD_CMD_READ, F.NBD_CMD_FLAG_REQ_ONE, 0, 512, EINVAL),
    (
        {"can_zero": True},
        False,
        False,
        C.NBD_CMD_WRITE_ZEROES,
        F.NBD_CMD_FLAG_FAST_ZERO,
        0,
        512,
        EINVAL,
    ),
    (FULL, False, False, C.NBD_CMD_READ, 1 << 9, 0, 512, EINVAL),
    (FULL, False, False, C.NBD_CMD_WRITE, F.NBD_CMD_FLAG_PAYLOAD_LEN, 0, 512, EINVAL),
    (FULL, False, False, C.NBD_CMD_FLUSH, F.NBD_CMD_FLAG_NO_HOLE, 0, 0, EINVAL),
    ({}, False, False, C.NBD_CMD_READ, 0, SIZE - 512, 1024, EINVAL),
    ({}, False, False, C.NBD_CMD_READ, 0, 2**64 - 1, 1, EINVAL),
    ({}, False, False, C.NBD_CMD_WRITE, 0, SIZE - 512, 1024, ENOSPC),
    (FULL, False, False, C.NBD_CMD_WRITE_ZEROES, 0, SIZE, 1, ENOSPC),
    (FULL, False, False, C.NBD_CMD_TRIM, 0, SIZE, 1, EINVAL),
    (FULL, False, False, C.NBD_CMD_CACHE, 0, SIZE, 1, EINVAL),
    (FULL, True, True, C.NBD_CMD_BLOCK_STATUS, 0, SIZE - 1, 2, EINVAL),
    ({}, False, False, C.NBD_CMD_FLUSH, 0, 1, 0, EINVAL),
    ({}, False, False, C.NBD_CMD_FLUSH, 0, 0, 1, EINVAL),
    (RO, False, False, C.NBD_CMD_WRITE, 0, 0, 512, EPERM),
    (RO | FULL, False, False, C.NBD_CMD_WRITE_ZEROES, 0, 0, 512, EPERM),
    (RO | FULL, False, False, C.NBD_CMD_TRIM, 0, 0, 512, EPERM),
    (ALIGNED, False, False, C.NBD_CMD_READ, 0, 1, 512, EINVAL),
    (ALIGNED, False, False, C.NBD_CMD_WRITE, 0, 0, 511, EINVAL),
    (ALIGNED | FULL, False, False, C.NBD_CMD_WRITE_ZEROES, 0, 100, 512, EINVAL),
    ({}, False, False, C.NBD_CMD_READ, 0, 0, 0, EINVAL),
    ({}, False, False, C.NBD_CMD_WRITE, 0, 0, 0, EINVAL),
    (SMALLMAX, False, False, C.NBD_CMD_READ, 0, 0, (1 << 16) + 512, EOVERFLOW),
    (SMALLMAX, False, False, C.NBD_CMD_WRITE, 0, 0, (1 << 16) + 512, EINVAL),
]


@pytest.mark.parametrize(
    ("structured_errors", "kw", "structured", "meta", "cmd", "flags", "offset", "length", "want"),
    [
        (se, *case)
        for se in (False, True)
        for case in VALIDATION
        # DF without structured replies is only a meaningful case with simple replies.
        if not (se and case[4] & F.NBD_CMD_FLAG_DF and not case[1])
    ],
)
def test_request_validation(
    structured_errors: bool,
    kw: dict[str, object],
    structured: bool,
    meta: bool,
    cmd: int,
    flags: int,
    offset: int,
    length: int,
    want: int,
) -> None:
    structured = structured or structured_errors
    conn = make(**kw)
    go(conn, structured=structured, meta=meta)
    data = bytes(length) if cmd == C.NBD_CMD_WRITE else b""
    msg = request(cmd, cookie=42, flags=flags, offset=offset, length=length, data=data)
    ev, nxt = feed(conn, msg + request(C.NBD_CMD_READ, cookie=43, length=512))
    assert nxt == Request(43, C.NBD_CMD_READ, F(0), 0, 512)  # parsing goes on
    assert isinstance(ev, RejectedRequest)
    assert (ev.cookie, ev.command, ev.flags, ev.offset, ev.length) == (
        42,
        cmd,
        flags,
        offset,
        length,
    )
    assert ev.error == want
    r = Reader(conn.data_to_send())
    if structured:
        fl, typ, cookie, payload = r.chunk()
        assert (fl, typ, cookie) == (DONE, NbdReplyType.NBD_REPLY_TYPE_ERROR, 42)
        error, message = parse_error_chunk(payload)
        assert error == want
        assert message.decode() == ev.reason
    else:
        assert r.simple() == (want, 42)
    assert r.at_end()


VALID = [
    (FULL, False, False, C.NBD_CMD_READ, F.NBD_CMD_FLAG_FUA, 0, 512),
    (FULL, True, False, C.NBD_CMD_READ, F.NBD_CMD_FLAG_DF | F.NBD_CMD_FLAG_FUA, 0, 512),
    (FULL, False, False, C.NBD_CMD_WRITE, F.NBD_CMD_FLAG_FUA, SIZE - 1, 1),
    (FULL, False, False, C.NBD_CMD_WRITE_ZEROES, F.NBD_CMD_FLAG_NO_HOLE, 0, SIZE),
    (FULL, False, False, C.NBD_CMD_WRITE_ZEROES, F.NBD_CMD_FLAG_FAST_ZERO, 0, SIZE),
    (FULL, False, False, C.NBD_CMD_TRIM, 0, 0, SIZE),
    (FULL, False, False, C.NBD_CMD_CACHE, 0, 0, SIZE),
    (FULL, False, False, C.NBD_CMD_FLUSH, F.NBD_CMD_FLAG_FUA, 0, 0),
    (FULL, True, True, C.NBD_CMD_BLOCK_STATUS, F.NBD_CMD_FLAG_REQ_ONE, 0, SIZE),
    (RO, False, False, C.NBD_CMD_READ, 0, 0, 1),
    (RO, False, False, C.NBD_CMD_FLUSH, 0, 0, 0),
    ({}, False, False, C.NBD_CMD_READ, 0, 0, 32 << 20),  # default max payload
]


@pytest.mark.parametrize(("kw", "structured", "meta", "cmd", "flags", "offset", "length"), VALID)
def test_valid_requests(
    kw: dict[str, object],
    structured: bool,
    meta: bool,
    cmd: int,
    flags: int,
    offset: int,
    length: int,
) -> None:
    conn = make(**kw)
    if length > SIZE:
        conn = NbdServerConnection({"disk": ExportInfo("disk", 64 << 20)})
    go(conn, structured=structured, meta=meta)
    data = bytes(length) if cmd == C.NBD_CMD_WRITE else b""
    (ev,) = feed(conn, request(cmd, cookie=5, flags=flags, offset=offset, length=length, data=data))
    assert ev == Request(5, C(cmd), F(flags), offset, length, data or None)
    assert conn.data_to_send() == b""


def test_alignment_only_when_advertised() -> None:
    conn = make(min_block=512)
    go(conn, infos=())  # no NBD_INFO_BLOCK_SIZE: the default minimum of 1 applies
    (ev,) = feed(conn, request(C.NBD_CMD_READ, offset=1, length=3))
    assert isinstance(ev, Request)
    # The tail of an export whose size is not a multiple of min_block is fine.
    conn = NbdServerConnection({"d": ExportInfo("d", 1000, min_block=512)})
    start(conn)
    feed(conn, option(O.NBD_OPT_GO, info_payload(b"d", (3,))))
    (ev,) = feed(conn, request(C.NBD_CMD_READ, offset=512, length=488))
    assert isinstance(ev, Request)


def test_oversize_write_drained_then_next_request() -> None:
    conn = make(max_block=1 << 16)
    go(conn)
    length = (1 << 16) + 1
    data = request(C.NBD_CMD_WRITE, cookie=1, length=length, data=bytes(length))
    data += request(C.NBD_CMD_READ, cookie=2, length=512)
    evs = []
    for i in range(0, len(data), 1000):
        evs += feed(conn, data[i : i + 1000])
        assert len(conn._buf) < 1100  # draining does not buffer
    assert [type(e) for e in evs] == [RejectedRequest, Request]
    assert Reader(conn.data_to_send()).simple() == (EINVAL, 1)


def test_write_above_drain_cap_disconnects() -> None:
    conn = make(max_block=1 << 16)
    go(conn)
    conn.receive_data(request(C.NBD_CMD_WRITE, length=64 * 1024 * 1024 + 1))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


@pytest.mark.parametrize(
    ("err", "nbd"),
    [
        (errno.EPERM, 1),
        (errno.EIO, 5),
        (errno.ENOMEM, 12),
        (errno.EINVAL, 22),
        (errno.ENOSPC, 28),
        (errno.EDQUOT, 28),
        (errno.EFBIG, 28),
        (errno.EOVERFLOW, 75),
        (errno.ENOTSUP, 95),
        (errno.ESHUTDOWN, 108),
        (errno.EOPNOTSUPP, 95),
        (errno.EACCES, 1),
        (errno.EROFS, 1),
        (errno.ENOENT, 5),
        (9999, 5),
    ],
)
def test_errno_mapping(err: int, nbd: int) -> None:
    conn = make()
    go(conn)
    conn.send_reply(1, err)
    conn.send_error(2, err, "ignored in simple mode")
    r = Reader(conn.data_to_send())
    assert [r.simple(), r.simple()] == [(nbd, 1), (nbd, 2)]


def test_structured_errors_and_message_cap() -> None:
    conn = make()
    go(conn, structured=True)
    conn.send_error(1, errno.EIO, "é" * 300)
    conn.send_reply(2, errno.ENOSPC)  # an error as a chunk (right for READ too)
    conn.send_reply(3)  # success: a simple reply is allowed for non-READ commands
    r = Reader(conn.data_to_send())
    flags, typ, cookie, payload = r.chunk()
    assert (flags, typ, cookie) == (DONE, NbdReplyType.NBD_REPLY_TYPE_ERROR, 1)
    error, message = parse_error_chunk(payload)
    assert error == 5
    assert message == "é".encode() * 100
    assert parse_error_chunk(r.chunk()[3]) == (28, b"")
    assert r.simple() == (0, 3)
    with pytest.raises(LocalProtocolError):
        conn.send_error(4, 0)


def test_send_before_transmission_is_local_error() -> None:
    conn = make()
    with pytest.raises(LocalProtocolError):
        conn.send_reply(1)
    with pytest.raises(LocalProtocolError):
        conn.send_read_reply(1, 0, b"x")


def test_block_status() -> None:
    conn = make(**FULL)
    ev = go(conn, structured=True, meta=True)
    assert ev.meta_context_selected
    (req,) = feed(
        conn,
        request(C.NBD_CMD_BLOCK_STATUS, cookie=8, offset=SIZE - 4096, length=1024, flags=8),
    )
    assert isinstance(req, Request)
    conn.send_block_status(req, [(1 << 20, 3), (512, 0)])
    r = Reader(conn.data_to_send())
    assert r.chunk() == (DONE, 5, 8, struct.pack(">III", 1, 1024, 3))
    req = Request(9, C.NBD_CMD_BLOCK_STATUS, F(0), SIZE - 4096, 1024, None)
    conn.send_block_status(req, [(1024, 0), (2048, 1), (4096, 2), (1, 0)])
    assert Reader(conn.data_to_send()).chunk() == (
        DONE,
        5,
        9,
        struct.pack(">IIIIIII", 1, 1024, 0, 2048, 1, 1024, 2),
    )
    with pytest.raises(LocalProtocolError):
        conn.send_block_status(req, [])
    conn = make()
    go(conn, structured=True)
    with pytest.raises(LocalProtocolError):
        conn.send_block_status(req, [(1, 0)])


# --- splitting and fuzzing ----------------------------------------------------------

SESSION_EXPORTS = {
    "disk": ExportInfo("disk", SIZE, "d", capabilities=Capabilities.full(), min_block=512)
}
SESSION = (
    client_flags()
    + option(O.NBD_OPT_LIST)
    + option(77, b"unknown option data")
    + option(O.NBD_OPT_STRUCTURED_REPLY)
    + option(O.NBD_OPT_LIST_META_CONTEXT, meta_payload(b"disk"))
    + option(O.NBD_OPT_SET_META_CONTEXT, meta_payload(b"disk", (b"base:allocation",)))
    + option(O.NBD_OPT_INFO, info_payload(b"disk", (1, 2, 3)))
    + option(O.NBD_OPT_GO, info_payload(b"disk", (3,)))
    + request(C.NBD_CMD_WRITE, cookie=1, offset=0, length=1024, data=bytes(range(256)) * 4)
    + request(C.NBD_CMD_WRITE, cookie=2, offset=1, length=3, data=b"bad")
    + request(C.NBD_CMD_READ, cookie=3, offset=512, length=512)
    + request(C.NBD_CMD_WRITE_ZEROES, cookie=4, offset=0, length=SIZE, flags=2)
    + request(C.NBD_CMD_BLOCK_STATUS, cookie=5, offset=0, length=SIZE, flags=8)
    + request(C.NBD_CMD_FLUSH, cookie=6)
    + request(C.NBD_CMD_DISC)
)


def run_session(pieces: list[bytes]) -> tuple[list[object], bytes]:
    conn = NbdServerConnection(SESSION_EXPORTS)
    evs: list[object] = []
    for p in pieces:
        if not p:
            continue  # b"" would mean EOF
        conn.receive_data(p)
        evs += events(conn)
    return evs, conn.data_to_send()


WHOLE = run_session([SESSION])


def test_session_whole() -> None:
    evs, out = WHOLE
    assert [type(e).__name__ for e in evs] == [
        "TransmissionStarted",
        "Request",
        "RejectedRequest",
        "Request",
        "Request",
        "Request",
        "Request",
        "Disconnect",
    ]
    flags = (
        T.NBD_FLAG_HAS_FLAGS
        | T.NBD_FLAG_SEND_FLUSH
        | T.NBD_FLAG_SEND_FUA
        | T.NBD_FLAG_SEND_TRIM
        | T.NBD_FLAG_SEND_WRITE_ZEROES
        | T.NBD_FLAG_SEND_FAST_ZERO
        | T.NBD_FLAG_SEND_DF
        | T.NBD_FLAG_CAN_MULTI_CONN
        | T.NBD_FLAG_SEND_CACHE
    )
    assert evs[0] == TransmissionStarted("disk", True, True, flags)
    assert [
        (e.cookie, e.command, e.flags, e.offset, e.length) for e in evs if isinstance(e, Request)
    ] == [
        (1, C.NBD_CMD_WRITE, 0, 0, 1024),
        (3, C.NBD_CMD_READ, 0, 512, 512),
        (4, C.NBD_CMD_WRITE_ZEROES, F.NBD_CMD_FLAG_NO_HOLE, 0, SIZE),
        (5, C.NBD_CMD_BLOCK_STATUS, F.NBD_CMD_FLAG_REQ_ONE, 0, SIZE),
        (6, C.NBD_CMD_FLUSH, 0, 0, 0),
    ]
    assert isinstance(evs[1], Request)
    assert evs[1].data == bytes(range(256)) * 4
    # Every byte the core sent on its own: greeting, option replies, one rejection.
    r = Reader(out)
    assert r.greeting() == 3  # FIXED_NEWSTYLE | NO_ZEROES
    assert r.option_replies() == [
        (O.NBD_OPT_LIST, R.NBD_REP_SERVER, struct.pack(">I", 4) + b"disk" + b"d"),
        (O.NBD_OPT_LIST, ACK, b""),
    ]
    assert r.option_replies() == [(77, R.NBD_REP_ERR_UNSUP, b"option 77 not supported")]
    assert r.option_replies() == [(O.NBD_OPT_STRUCTURED_REPLY, ACK, b"")]
    context = b"base:allocation"
    assert r.option_replies() == [
        (O.NBD_OPT_LIST_META_CONTEXT, R.NBD_REP_META_CONTEXT, struct.pack(">I", 0) + context),
        (O.NBD_OPT_LIST_META_CONTEXT, ACK, b""),
    ]
    assert r.option_replies() == [
        (O.NBD_OPT_SET_META_CONTEXT, R.NBD_REP_META_CONTEXT, struct.pack(">I", 1) + context),
        (O.NBD_OPT_SET_META_CONTEXT, ACK, b""),
    ]
    export = struct.pack(">HQH", NbdInfo.NBD_INFO_EXPORT, SIZE, flags)
    block_size = struct.pack(">HIII", NbdInfo.NBD_INFO_BLOCK_SIZE, 512, 4096, 32 << 20)
    INFO = R.NBD_REP_INFO
    assert r.option_replies() == [
        (O.NBD_OPT_INFO, INFO, export),
        (O.NBD_OPT_INFO, INFO, struct.pack(">H", NbdInfo.NBD_INFO_NAME) + b"disk"),
        (O.NBD_OPT_INFO, INFO, struct.pack(">H", NbdInfo.NBD_INFO_DESCRIPTION) + b"d"),
        (O.NBD_OPT_INFO, INFO, block_size),
        (O.NBD_OPT_INFO, ACK, b""),
    ]
    assert r.option_replies() == [
        (O.NBD_OPT_GO, INFO, export),
        (O.NBD_OPT_GO, INFO, block_size),
        (O.NBD_OPT_GO, ACK, b""),
    ]
    rejected = r.chunk()
    assert rejected[:3] == (DONE, NbdReplyType.NBD_REPLY_TYPE_ERROR, 2)
    assert parse_error_chunk(rejected[3]) == (22, b"request not aligned to 512 bytes")
    assert r.at_end()


def test_session_one_byte_at_a_time() -> None:
    assert run_session([bytes([b]) for b in SESSION]) == WHOLE


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(SESSION)), max_size=30))
def test_session_split_anywhere(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(SESSION)]
    assert run_session([SESSION[a:b] for a, b in itertools.pairwise(bounds)]) == WHOLE


def drive_untrusted(conn: NbdServerConnection, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            for ev in events(conn):
                assert isinstance(
                    ev,
                    TransmissionStarted
                    | Request
                    | RejectedRequest
                    | Disconnect
                    | HandshakeAborted
                    | ConnectionClosed,
                )
        conn.receive_data(b"")
        events(conn)
    except RemoteProtocolError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_handshake(chunks: list[bytes]) -> None:
    conn = NbdServerConnection(SESSION_EXPORTS)
    drive_untrusted(conn, [client_flags(), *chunks])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8), st.integers(0, len(SESSION)))
def test_fuzz_mutated_session(chunks: list[bytes], cut: int) -> None:
    conn = NbdServerConnection(SESSION_EXPORTS)
    drive_untrusted(conn, [SESSION[:cut], *chunks])


_MAGIC = struct.pack(">I", 0x25609513)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 0xFFFF),
            st.integers(0, 10),
            st.integers(0, 2**64 - 1),
            st.integers(0, 2 * SIZE),
            st.integers(0, 4096),
        ),
        max_size=6,
    )
)
def test_fuzz_requests(reqs: list[tuple[int, int, int, int, int]]) -> None:
    conn = NbdServerConnection(SESSION_EXPORTS)
    conn.receive_data(SESSION[: SESSION.index(_MAGIC)])
    events(conn)
    for flags, cmd, cookie, offset, length in reqs:
        data = bytes(length) if cmd == 1 else b""
        conn.receive_data(
            request(cmd, cookie=cookie, flags=flags, offset=offset, length=length, data=data)
        )
        for ev in events(conn):
            if isinstance(ev, Request):
                assert ev.offset + ev.length <= SIZE
                assert ev.length > 0 or ev.command == C.NBD_CMD_FLUSH
                assert ev.data is None or len(ev.data) == ev.length
            else:
                assert isinstance(ev, RejectedRequest | Disconnect | ConnectionClosed)


# --- interop smoke test: libnbd against the core, over a socketpair ---------------


def _serve_blocking(sock: socket.socket, conn: NbdServerConnection, disk: bytearray) -> None:
    """The simplest possible I/O layer: one thread, blocking socket, no concurrency."""
    with sock:
        sock.sendall(conn.data_to_send())
        while True:
            conn.receive_data(sock.recv(65536))
            while (ev := conn.next_event()) is not NEED_DATA:
                if isinstance(ev, Request):
                    end = ev.offset + ev.length
                    if ev.command == C.NBD_CMD_READ:
                        conn.send_read_reply(ev.cookie, ev.offset, bytes(disk[ev.offset : end]))
                    elif ev.command == C.NBD_CMD_BLOCK_STATUS:
                        conn.send_block_status(ev, [(ev.length, 0)])
                    else:
                        if ev.command == C.NBD_CMD_WRITE:
                            assert ev.data is not None
                            disk[ev.offset : end] = ev.data
                        elif ev.command in (C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_TRIM):
                            disk[ev.offset : end] = bytes(ev.length)
                        conn.send_reply(ev.cookie)
                elif isinstance(ev, ConnectionClosed | Disconnect | HandshakeAborted):
                    sock.sendall(conn.data_to_send())
                    return
            for buf in conn.buffers_to_send():
                sock.sendall(buf)


@pytest.mark.interop
def test_libnbd_smoke() -> None:
    nbd = pytest.importorskip("nbd")
    disk = bytearray(SIZE)
    conn = NbdServerConnection(
        {
            "disk": ExportInfo(
                "disk",
                SIZE,
                "smoke",
                capabilities=Capabilities.full(),
                min_block=512,
                preferred_block=65536,
            )
        }
    )
    ours, theirs = socket.socketpair()
    server = threading.Thread(target=_serve_blocking, args=(ours, conn, disk), daemon=True)
    server.start()
    h = nbd.NBD()
    h.set_export_name("disk")
    h.add_meta_context("base:allocation")
    h.set_full_info(True)
    h.connect_socket(theirs.detach())
    assert h.get_size() == SIZE
    assert h.get_export_description() == "smoke"
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
    assert h.is_read_only() == 0
    assert h.can_flush()
    assert h.can_fua()
    assert h.can_zero()
    assert h.can_fast_zero()
    assert h.can_meta_context("base:allocation")
    assert h.get_structured_replies_negotiated()
    h.pwrite(b"\xab" * 4096, 8192, nbd.CMD_FLAG_FUA)
    assert h.pread(4096, 8192) == b"\xab" * 4096
    assert h.pread(512, 0) == bytes(512)
    h.zero(1024, 8192, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(2048, 8192) == bytes(1024) + b"\xab" * 1024
    seen = []
    h.block_status(4096, 0, lambda ctx, off, ext, err: seen.append((ctx, list(ext))) or 0)
    assert seen == [("base:allocation", [4096, 0])]
    h.set_strict_mode(0)  # let bad requests reach the server
    with pytest.raises(nbd.Error) as info:
        h.pread(512, SIZE)
    assert info.value.errno == "EINVAL"
    with pytest.raises(nbd.Error) as info:
        h.pwrite(b"x" * 512, SIZE)
    assert info.value.errno == "ENOSPC"
    with pytest.raises(nbd.Error) as info:
        h.pread(100, 1)
    assert info.value.errno == "EINVAL"  # misaligned
    h.flush()
    h.shutdown()
    server.join(5)
    assert not server.is_alive()


# --- WRITE payloads received in place ----------------------------------------------


def _write_header(conn: NbdServerConnection, length: int, first: bytes = b"") -> None:
    conn.receive_data(request(C.NBD_CMD_WRITE, cookie=7, offset=4096, length=length) + first)
    assert conn.next_event() is NEED_DATA


def test_payload_received_in_place() -> None:
    conn = make()
    go(conn)
    payload = bytes(range(256)) * 1024  # 256 KiB
    _write_header(conn, len(payload), payload[:1000])  # a piece came with the header
    assert conn.payload_wanted() == len(payload) - 1000
    view = conn.payload_buffer()
    assert len(view) == len(payload) - 1000  # the piece was moved in first
    view[:5000] = payload[1000:6000]
    conn.payload_received(5000)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(payload[6000:10000])  # plain receive_data in between still counts
    assert conn.next_event() is NEED_DATA
    view = conn.payload_buffer()
    view[:] = payload[10000:]
    conn.payload_received(len(view))
    assert conn.payload_wanted() == 0
    ev = conn.next_event()
    assert isinstance(ev, Request)
    assert (ev.cookie, ev.offset, ev.length) == (7, 4096, len(payload))
    assert isinstance(ev.data, bytearray)
    assert ev.data == payload
    # The next request parses as usual.
    assert feed(conn, request(C.NBD_CMD_READ, cookie=8, length=512)) == [
        Request(8, C.NBD_CMD_READ, F(0), 0, 512)
    ]


def test_payload_in_place_cut_short_by_eof() -> None:
    conn = make()
    go(conn)
    _write_header(conn, 128 * 1024)
    view = conn.payload_buffer()
    view[:100] = b"x" * 100
    conn.payload_received(100)
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed(truncated=True)


def _in_place_write(conn: NbdServerConnection, payload: bytes) -> Request:
    _write_header(conn, len(payload))
    view = conn.payload_buffer()
    view[:] = payload
    conn.payload_received(len(payload))
    del view
    ev = conn.next_event()
    assert isinstance(ev, Request)
    return ev


def test_payload_buffers_are_recycled_only_once_nothing_refers_to_them() -> None:
    """A payload's buffer comes back for a later payload of its size only when no
    request, memoryview (the writer keeps views) or other reference is left."""
    conn = make()
    go(conn)
    size = 128 * 1024
    first = _in_place_write(conn, b"a" * size)
    assert first.data is not None
    kept = memoryview(first.data)[4096:8192]  # as a writer's cluster record keeps it
    buffer_id = id(first.data)
    del first
    second = _in_place_write(conn, b"b" * size)
    assert second.data is not None
    assert id(second.data) != buffer_id  # still viewed: never handed out again
    assert bytes(kept) == b"a" * 4096  # and never overwritten
    del kept
    del second
    third = _in_place_write(conn, b"c" * size)
    assert third.data is not None
    assert third.data == b"c" * size
    assert id(third.data) in {buffer_id}  # the oldest free one of that size, reused
    other = _in_place_write(conn, b"d" * (size + 512))  # another size: a new buffer
    assert other.data is not None
    assert id(other.data) != id(third.data)


def test_payload_buffer_misuse() -> None:
    conn = make()
    go(conn)
    assert conn.payload_wanted() == 0
    with pytest.raises(LocalProtocolError):
        conn.payload_buffer()
    _write_header(conn, 4096)
    view = conn.payload_buffer()
    with pytest.raises(LocalProtocolError):
        conn.payload_received(len(view) + 1)
    with pytest.raises(LocalProtocolError):
        conn.payload_received(0)


def test_receive_state_table() -> None:
    # Every state has a phase and a row of moves; the final states have no way out.
    assert set(PHASE) == set(RxState) == set(TRANSITIONS)
    assert TRANSITIONS[RxState.CLOSED] == TRANSITIONS[RxState.ERROR] == frozenset()
    state = ReceiveState()
    assert state.phase is NbdPhase.HANDSHAKE
    with pytest.raises(LocalProtocolError):
        state.goto(RxState.REQUEST_HEADER)  # no request before an option was answered
    for step in (RxState.OPTION_HEADER, RxState.OPTION_PAYLOAD, RxState.REQUEST_HEADER):
        state.goto(step)
    assert state.phase is NbdPhase.TRANSMISSION
    with pytest.raises(LocalProtocolError):
        state.goto(RxState.OPTION_HEADER)  # no way back to the handshake
    state.goto(RxState.CLOSED)
    assert state.phase is NbdPhase.CLOSED
    with pytest.raises(LocalProtocolError):
        state.goto(RxState.ERROR)


def test_capabilities_full_is_every_flag() -> None:
    assert Capabilities.full() == Capabilities(**FULL)  # type: ignore[arg-type]
    assert set(FULL) | {"can_write", "can_flush"} == set(attrs.fields_dict(Capabilities))
    conn = NbdServerConnection({"disk": ExportInfo("disk", SIZE, capabilities=Capabilities.full())})
    assert go(conn).transmission_flags == (
        T.NBD_FLAG_HAS_FLAGS
        | T.NBD_FLAG_SEND_FLUSH
        | T.NBD_FLAG_SEND_FUA
        | T.NBD_FLAG_SEND_TRIM
        | T.NBD_FLAG_SEND_WRITE_ZEROES
        | T.NBD_FLAG_SEND_FAST_ZERO
        | T.NBD_FLAG_CAN_MULTI_CONN
        | T.NBD_FLAG_SEND_CACHE
    )
