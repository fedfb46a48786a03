"""NBD_OPT_STARTTLS in the sans-IO core: the three TLS modes, bytes only (no TLS here).

The real TLS handshake is tested in ``test_tls.py``; here the "handshake" is the call
to ``tls_established()`` that the I/O layer makes after it.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nbd_client_sansio import Reader, client_flags, info_payload, meta_payload, option

from nbdvma.errors import LocalProtocolError, RemoteProtocolError
from nbdvma.nbd import (
    NEED_DATA,
    ConnectionClosed,
    ExportInfo,
    HandshakeAborted,
    NbdServerConnection,
    StartTLS,
    TlsMode,
    TransmissionStarted,
)
from nbdvma.nbd.constants import NbdInfo, NbdOption, NbdRep

O = NbdOption  # noqa: E741
R = NbdRep
ACK = R.NBD_REP_ACK
SIZE = 1 << 20


def feed(conn: NbdServerConnection, data: bytes) -> list[object]:
    """Feed bytes, return the events up to NEED_DATA (or the end of the connection)."""
    conn.receive_data(data)
    out: list[object] = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
        if isinstance(ev, ConnectionClosed | HandshakeAborted | StartTLS):
            break
    return out


def make(tls: TlsMode, *, flags: int = 3) -> NbdServerConnection:
    """A connection with one export ``disk``, past the greeting and client flags."""
    conn = NbdServerConnection({"disk": ExportInfo("disk", SIZE)}, tls=tls)
    assert Reader(conn.data_to_send()).greeting() == 3
    assert feed(conn, client_flags(flags)) == []
    return conn


def replies_of(conn: NbdServerConnection) -> list[tuple[int, int, bytes]]:
    r = Reader(conn.data_to_send())
    out = []
    while not r.at_end():
        out.append(r.option_reply())
    return out


def starttls(conn: NbdServerConnection) -> None:
    """Send STARTTLS, check the ACK and the event, then 'complete' the handshake."""
    assert feed(conn, option(O.NBD_OPT_STARTTLS)) == [StartTLS()]
    assert replies_of(conn) == [(O.NBD_OPT_STARTTLS, ACK, b"")]
    conn.tls_established()
    assert conn.tls_active


def go(conn: NbdServerConnection, *, structured: bool = False) -> TransmissionStarted:
    msg = option(O.NBD_OPT_STRUCTURED_REPLY) if structured else b""
    msg += option(O.NBD_OPT_GO, info_payload(b"disk", (NbdInfo.NBD_INFO_BLOCK_SIZE,)))
    evs = feed(conn, msg)
    conn.data_to_send()
    assert len(evs) == 1
    assert isinstance(evs[0], TransmissionStarted)
    return evs[0]


PLAIN_OPTIONS = [
    option(O.NBD_OPT_LIST),
    option(O.NBD_OPT_INFO, info_payload(b"disk")),
    option(O.NBD_OPT_GO, info_payload(b"disk")),
    option(O.NBD_OPT_GO, info_payload(b"")),
    option(O.NBD_OPT_STRUCTURED_REPLY),
    option(O.NBD_OPT_LIST_META_CONTEXT, meta_payload(b"disk")),
    option(O.NBD_OPT_SET_META_CONTEXT, meta_payload(b"disk", (b"base:allocation",))),
    option(O.NBD_OPT_EXTENDED_HEADERS),
    option(4),  # PEEK_EXPORT, withdrawn
    option(0x7FFFFFFF, b"x" * 100),  # unknown
    option(O.NBD_OPT_LIST, b"x" * 200_000),  # over the payload cap
]


# --- OFF (NOTLS) ------------------------------------------------------------------


def test_off_starttls_unsupported_and_never_tls_reqd() -> None:
    conn = make(TlsMode.OFF)
    assert feed(conn, option(O.NBD_OPT_STARTTLS)) == []
    assert replies_of(conn) == [(O.NBD_OPT_STARTTLS, R.NBD_REP_ERR_UNSUP, b"TLS not supported")]
    assert feed(conn, option(O.NBD_OPT_LIST)) == []
    assert [rep for _, rep, _ in replies_of(conn)] == [R.NBD_REP_SERVER, ACK]
    assert not conn.tls_active


# --- REQUIRE (FORCEDTLS) ----------------------------------------------------------


@pytest.mark.parametrize("msg", PLAIN_OPTIONS)
def test_require_every_option_before_tls_is_tls_reqd(msg: bytes) -> None:
    conn = make(TlsMode.REQUIRE)
    for i in range(0, len(msg), 4096):
        assert feed(conn, msg[i : i + 4096]) == []
        assert len(conn._buf) < 4096 + 16  # drained unread, never buffered
    ((opt, rep, data),) = replies_of(conn)
    assert opt == int.from_bytes(msg[8:12], "big")
    assert rep == R.NBD_REP_ERR_TLS_REQD
    assert b"disk" not in data


def test_require_lists_nothing_then_everything_after_tls() -> None:
    conn = make(TlsMode.REQUIRE)
    assert feed(conn, option(O.NBD_OPT_LIST)) == []
    assert replies_of(conn) == [(O.NBD_OPT_LIST, R.NBD_REP_ERR_TLS_REQD, b"TLS required")]
    starttls(conn)
    assert feed(conn, option(O.NBD_OPT_LIST)) == []
    ((_, server, name), (_, ack, _)) = replies_of(conn)
    assert (server, ack) == (R.NBD_REP_SERVER, ACK)
    assert name[4:8] == b"disk"


def test_require_go_after_tls() -> None:
    conn = make(TlsMode.REQUIRE)
    starttls(conn)
    ev = go(conn, structured=True)
    assert ev.export_name == "disk"
    assert ev.structured_replies


def test_require_export_name_after_tls() -> None:
    conn = make(TlsMode.REQUIRE)
    starttls(conn)
    (ev,) = feed(conn, option(O.NBD_OPT_EXPORT_NAME, b"disk"))
    assert isinstance(ev, TransmissionStarted)


@pytest.mark.parametrize("name", [b"disk", b"", b"nope"])
def test_require_export_name_before_tls_disconnects(name: bytes) -> None:
    conn = make(TlsMode.REQUIRE)
    with pytest.raises(RemoteProtocolError, match="TLS"):
        feed(conn, option(O.NBD_OPT_EXPORT_NAME, name))
    assert conn.data_to_send() == b""  # not even the export's size


def test_require_abort_before_tls() -> None:
    conn = make(TlsMode.REQUIRE)
    assert feed(conn, option(O.NBD_OPT_ABORT)) == [HandshakeAborted()]
    assert replies_of(conn) == [(O.NBD_OPT_ABORT, ACK, b"")]


@pytest.mark.parametrize("flags", [0, 2])
def test_require_client_without_fixed_newstyle_disconnects(flags: int) -> None:
    conn = NbdServerConnection({"disk": ExportInfo("disk", SIZE)}, tls=TlsMode.REQUIRE)
    conn.data_to_send()
    conn.receive_data(client_flags(flags))
    with pytest.raises(RemoteProtocolError, match="fixed newstyle"):
        conn.next_event()


def test_require_never_tls_reqd_after_tls() -> None:
    conn = make(TlsMode.REQUIRE)
    starttls(conn)
    for msg in PLAIN_OPTIONS:
        if int.from_bytes(msg[8:12], "big") == O.NBD_OPT_GO:
            continue  # would enter transmission
        assert feed(conn, msg) == []
        ((_, rep, _), *_) = replies_of(conn)
        assert rep != R.NBD_REP_ERR_TLS_REQD


# --- ON (SELECTIVETLS) ------------------------------------------------------------


def test_on_plain_text_allowed() -> None:
    conn = make(TlsMode.ON)
    assert go(conn).export_name == "disk"
    assert not conn.tls_active


def test_on_starttls_then_go() -> None:
    conn = make(TlsMode.ON)
    starttls(conn)
    assert go(conn).export_name == "disk"


def test_on_client_without_fixed_newstyle_gets_notls() -> None:
    conn = make(TlsMode.ON, flags=0)
    assert conn.tls_mode is TlsMode.OFF
    assert feed(conn, option(O.NBD_OPT_STARTTLS)) == []
    ((_, rep, _),) = replies_of(conn)
    assert rep == R.NBD_REP_ERR_UNSUP


# --- the STARTTLS state machine (both TLS modes) -----------------------------------

TLS_MODES = pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.REQUIRE])


@TLS_MODES
def test_negotiation_forgotten(mode: TlsMode) -> None:
    conn = make(mode)
    starttls(conn)  # (in ON mode the options below would also work before TLS)
    conn2 = make(TlsMode.ON)
    feed(
        conn2,
        option(O.NBD_OPT_STRUCTURED_REPLY)
        + option(O.NBD_OPT_SET_META_CONTEXT, meta_payload(b"disk", (b"base:allocation",))),
    )
    assert [rep for _, rep, _ in replies_of(conn2)] == [ACK, R.NBD_REP_META_CONTEXT, ACK]
    starttls(conn2)
    ev = go(conn2)  # no STRUCTURED_REPLY after TLS: both are forgotten
    assert not ev.structured_replies
    assert not ev.meta_context_selected


def test_structured_reply_again_after_tls_counts() -> None:
    conn = make(TlsMode.ON)
    feed(conn, option(O.NBD_OPT_STRUCTURED_REPLY))
    conn.data_to_send()
    starttls(conn)
    feed(
        conn,
        option(O.NBD_OPT_STRUCTURED_REPLY)
        + option(O.NBD_OPT_SET_META_CONTEXT, meta_payload(b"disk", (b"base:allocation",))),
    )
    conn.data_to_send()
    ev = go(conn)
    assert ev.structured_replies
    assert ev.meta_context_selected


@TLS_MODES
def test_second_starttls_invalid(mode: TlsMode) -> None:
    conn = make(mode)
    starttls(conn)
    assert feed(conn, option(O.NBD_OPT_STARTTLS)) == []
    ((_, rep, _),) = replies_of(conn)
    assert rep == R.NBD_REP_ERR_INVALID


@TLS_MODES
def test_starttls_with_data_invalid(mode: TlsMode) -> None:
    conn = make(mode)
    assert feed(conn, option(O.NBD_OPT_STARTTLS, b"x")) == []
    ((_, rep, _),) = replies_of(conn)
    assert rep == R.NBD_REP_ERR_INVALID
    assert not conn.tls_active
    starttls(conn)  # the client may try again properly


@TLS_MODES
@pytest.mark.parametrize("extra", [b"\x16", b"\x16\x03\x01\x00", option(O.NBD_OPT_LIST)])
def test_data_buffered_behind_starttls_is_a_protocol_error(mode: TlsMode, extra: bytes) -> None:
    conn = make(mode)
    conn.receive_data(option(O.NBD_OPT_STARTTLS) + extra)
    with pytest.raises(RemoteProtocolError, match="before the TLS handshake"):
        conn.next_event()
    assert conn.data_to_send() == b""  # no ACK: the session is dropped instead


@TLS_MODES
def test_io_layer_misuse_while_handshake_pending(mode: TlsMode) -> None:
    conn = make(mode)
    assert feed(conn, option(O.NBD_OPT_STARTTLS)) == [StartTLS()]
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"plain text")
    conn.tls_established()
    with pytest.raises(LocalProtocolError):
        conn.tls_established()  # only once per StartTLS


def test_tls_established_without_starttls() -> None:
    conn = make(TlsMode.ON)
    with pytest.raises(LocalProtocolError):
        conn.tls_established()


@TLS_MODES
def test_eof_after_tls(mode: TlsMode) -> None:
    conn = make(mode)
    starttls(conn)
    assert feed(conn, b"") == [ConnectionClosed(truncated=False)]


@TLS_MODES
def test_starttls_split_at_every_byte(mode: TlsMode) -> None:
    conn = make(mode)
    msg = option(O.NBD_OPT_STARTTLS)
    for b in msg[:-1]:
        assert feed(conn, bytes([b])) == []
    assert feed(conn, msg[-1:]) == [StartTLS()]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 0xFFFFFFFF).filter(
                lambda o: o not in (O.NBD_OPT_STARTTLS, O.NBD_OPT_ABORT, O.NBD_OPT_EXPORT_NAME)
            ),
            st.binary(max_size=300),
        ),
        max_size=20,
    ),
    st.integers(1, 64),
)
def test_fuzz_require_reveals_nothing_before_tls(opts: list[tuple[int, bytes]], piece: int) -> None:
    conn = make(TlsMode.REQUIRE)
    data = b"".join(option(o, p) for o, p in opts)
    for i in range(0, len(data), piece):
        assert feed(conn, data[i : i + piece]) == []
    got = replies_of(conn)
    assert [(o, rep) for o, rep, _ in got] == [(o, R.NBD_REP_ERR_TLS_REQD) for o, _ in opts]


def test_option_budget_spans_tls() -> None:
    """Options before STARTTLS count against the same per-handshake limit."""
    conn = make(TlsMode.REQUIRE)
    for _ in range(32):  # limit 32 + 1 export
        feed(conn, option(O.NBD_OPT_LIST))
    conn.data_to_send()
    starttls(conn)  # the 33rd
    with pytest.raises(RemoteProtocolError, match="options"):
        feed(conn, option(O.NBD_OPT_LIST))
