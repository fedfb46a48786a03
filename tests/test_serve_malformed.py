"""``nbdvma serve`` against a hostile or broken client, over raw sockets.

Each *probe* below opens its own socket to a running ``nbdvma serve`` (a subprocess)
and sends something malformed: bad magic, unknown flags, oversize or unknown options,
unknown commands and flags, requests past the end, a WRITE longer than the maximum, a
truncated payload, a client that never finishes the handshake.  It then checks the
reply or the close the NBD spec requires (see docs/nbd-protocol.md §1.3, §2.4).

Every probe runs twice: alone, against a shared server (and then a fresh connection
must still work), and all together while ``qemu-img`` backs up another disk of the
same server, whose archive must come out intact.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from nbd_client_sansio import (
    ServerClosed,
    SocketClient,
    info_payload,
    meta_payload,
    option,
    request,
)
from servehelpers import (
    ServeProcess,
    extract_disks,
    nbdvma,
    poll_until,
    start_serve,
)

pytestmark = pytest.mark.interop

KiB = 1024
MiB = 1024 * KiB
PROBE = "probe"
PROBE_SIZE = 48 * MiB
#: Seconds the server gives a client to finish the handshake (``--handshake-timeout``).
HANDSHAKE_TIMEOUT = 1.0
#: Seconds a probe waits for any one reply or close.
IO_TIMEOUT = 10.0

# Options, replies, commands, errors (numbers straight from the spec).
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META, OPT_EXTENDED_HEADERS = 8, 9, 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID, REP_ERR_UNKNOWN = ERR + 1, ERR + 2, ERR + 3, ERR + 6
REP_ERR_TOO_BIG = ERR + 9
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = range(7)
CMD_BLOCK_STATUS = 7
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF = 1, 2, 4
EPERM, EIO, EINVAL, ENOSPC, EOVERFLOW = 1, 5, 22, 28, 75
REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_ERROR = 1, (1 << 15) + 1
TF_HAS_FLAGS, TF_SEND_FLUSH, TF_SEND_WRITE_ZEROES = 1, 4, 64


# -- the client -----------------------------------------------------------------------------


#: Every client socket opened by a probe, closed by the test that ran it.
_OPEN: list[SocketClient] = []


def close_all() -> None:
    while _OPEN:
        _OPEN.pop().close()


def open_client(server: ServeProcess, transport: str = "unix") -> SocketClient:
    """A client socket to ``server`` (every read with a deadline), closed by the test."""
    if transport == "unix":
        assert server.unix is not None
        c = SocketClient.unix(server.unix, IO_TIMEOUT)
    else:
        assert server.tcp_port is not None
        c = SocketClient.tcp(server.tcp_port, IO_TIMEOUT)
    _OPEN.append(c)
    return c


def go(c: SocketClient, *, structured: bool = True) -> int:
    """STRUCTURED_REPLY (optional) and GO on the probe export; its transmission flags."""
    got = c.go(PROBE, structured=structured, infos=(INFO_BLOCK_SIZE,))
    assert got is not None, "no NBD_INFO_EXPORT"
    assert got[0] == PROBE_SIZE
    return got[1]


def healthy(server: ServeProcess) -> None:
    """A fresh client can still handshake, write and read back."""
    c = open_client(server, "tcp")
    try:
        c.start()
        go(c)
        assert c.call(CMD_WRITE, offset=4096, length=512, data=b"\x99" * 512)[0] == 0
        assert c.call(CMD_READ, offset=4096, length=512) == (0, b"\x99" * 512)
        c.send_request(CMD_DISC)
        assert c.expect_closed() == b""
    finally:
        c.close()


# -- probes: the handshake -----------------------------------------------------------------


def probe_garbage_instead_of_handshake(server: ServeProcess) -> None:
    """An HTTP client: its first bytes are not valid client flags; the server hangs up."""
    c = open_client(server)
    c.greeting()
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.expect_closed() == b""


def probe_unknown_client_flags(server: ServeProcess) -> None:
    c = open_client(server)
    c.start(flags=0x3 | 0x4)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        c.send_option(OPT_LIST)  # never answered: the server MUST drop the connection
    assert c.expect_closed() == b""


def probe_bad_option_magic(server: ServeProcess) -> None:
    c = open_client(server)
    c.start()
    c.send(struct.pack(">QII", 0x1122334455667788, OPT_LIST, 0))
    assert c.expect_closed() == b""


def probe_unknown_option_drained(server: ServeProcess) -> None:
    """An unknown option with 100 KiB of data gets ERR_UNSUP, and the next one works."""
    c = open_client(server)
    c.start()
    c.send_option(4242, b"\xee" * (100 * KiB))
    assert c.option_reply()[:2] == (4242, REP_ERR_UNSUP)
    c.send_option(4, b"")  # NBD_OPT_PEEK_EXPORT: withdrawn, so unknown
    assert c.option_reply()[:2] == (4, REP_ERR_UNSUP)
    c.send_option(OPT_LIST)
    replies = c.option_replies()
    assert [r[1] for r in replies] == [REP_SERVER, REP_SERVER, REP_ACK]
    go(c)


def probe_oversize_known_option(server: ServeProcess) -> None:
    """A known option longer than the 64 KiB cap: drained, ERR_TOO_BIG, next one parsed."""
    c = open_client(server)
    c.start()
    name = b"x" * (80 * KiB)
    c.send_option(OPT_INFO, info_payload(name))
    assert c.option_reply()[:2] == (OPT_INFO, REP_ERR_TOO_BIG)
    c.send_option(OPT_SET_META, meta_payload(PROBE.encode(), (b"q" * 70000,)))
    assert c.option_reply()[:2] == (OPT_SET_META, REP_ERR_TOO_BIG)
    go(c)


def probe_option_past_absolute_cap(server: ServeProcess) -> None:
    """An option claiming more than 32 MiB is a denial of service: hard disconnect."""
    c = open_client(server)
    c.start()
    c.send(struct.pack(">QII", 0x49484156454F5054, 4242, 0xFFFFFFF0))
    assert c.expect_closed() == b""


def probe_bad_option_payloads(server: ServeProcess) -> None:
    c = open_client(server)
    c.start()
    assert c.final(OPT_LIST, b"junk") == REP_ERR_INVALID
    # INFO whose name length points past the end of the option.
    assert c.final(OPT_INFO, struct.pack(">I", 1000) + b"abc") == REP_ERR_INVALID
    # INFO with a trailing byte after the info list.
    assert c.final(OPT_INFO, info_payload(PROBE.encode()) + b"\0") == REP_ERR_INVALID
    # LIST_META_CONTEXT with a query length past the end.
    bad_meta = struct.pack(">I", len(PROBE)) + PROBE.encode() + struct.pack(">II", 1, 99) + b"b"
    assert c.final(OPT_LIST_META, bad_meta) == REP_ERR_INVALID
    assert c.final(OPT_INFO, info_payload(b"no-such-export")) == REP_ERR_UNKNOWN
    assert c.final(OPT_GO, info_payload(b"no-such-export")) == REP_ERR_UNKNOWN
    assert c.final(OPT_STARTTLS) in (REP_ERR_UNSUP, REP_ERR_POLICY)
    assert c.final(OPT_EXTENDED_HEADERS) == REP_ERR_UNSUP
    assert c.final(OPT_STRUCTURED_REPLY, b"x") == REP_ERR_INVALID
    go(c)


def probe_meta_contexts(server: ServeProcess) -> None:
    """LIST/SET_META_CONTEXT, which libnbd 1.14 cannot send on its own."""
    c = open_client(server)
    c.start()
    # SET before structured replies: INVALID.
    assert c.final(OPT_SET_META, meta_payload(PROBE.encode(), (b"base:allocation",))) == (
        REP_ERR_INVALID
    )
    c.send_option(OPT_LIST_META, meta_payload(PROBE.encode(), (b"base:",)))
    (ctx, ack) = c.option_replies()
    assert ctx[1] == REP_META_CONTEXT
    assert ctx[2][4:] == b"base:allocation"
    assert ack[1] == REP_ACK
    assert c.final(OPT_STRUCTURED_REPLY) == REP_ACK
    c.send_option(OPT_SET_META, meta_payload(PROBE.encode(), (b"qemu:nothing", b"base:allocation")))
    (ctx, ack) = c.option_replies()
    assert ctx[1] == REP_META_CONTEXT
    context_id = struct.unpack(">I", ctx[2][:4])[0]
    assert context_id != 0
    assert ctx[2][4:] == b"base:allocation"
    assert ack[1] == REP_ACK
    c.send_option(OPT_GO, info_payload(PROBE.encode()))
    assert c.option_replies()[-1][1] == REP_ACK
    c.core.structured = True
    c.send_request(CMD_BLOCK_STATUS, cookie=7, offset=0, length=PROBE_SIZE, flags=8)
    flags, typ, cookie, payload = c.chunk()
    assert (flags & 1, typ, cookie) == (1, 5, 7)
    assert struct.unpack(">I", payload[:4])[0] == context_id
    assert len(payload) == 12  # REQ_ONE: one extent
    c.send_request(CMD_DISC)
    c.expect_closed()


def probe_too_many_options(server: ServeProcess) -> None:
    c = open_client(server)
    c.start()
    for _ in range(60):
        c.send_option(4242)
        try:
            opt, rep, _ = c.option_reply()
        except ServerClosed:  # a reply that is not one (a wrong magic...) still fails
            assert c.core.unread() == b"", "half a reply, then the close"
            return  # dropped: fine, a client this chatty is a DoS
        assert (opt, rep) == (4242, REP_ERR_UNSUP)
    raise AssertionError("60 options without GO were all answered")


def probe_export_name(server: ServeProcess) -> None:
    """EXPORT_NAME: an unknown name closes the connection; a known one starts
    transmission with size, flags and no padding (NO_ZEROES)."""
    c = open_client(server)
    c.start()
    c.send_option(OPT_EXPORT_NAME, b"no-such-export")
    assert c.expect_closed() == b""
    c = open_client(server)
    c.start(flags=1)  # no NO_ZEROES: 124 bytes of padding follow
    c.send_option(OPT_EXPORT_NAME, PROBE.encode())
    size, flags = c.export_name_reply(no_zeroes=False)  # the padding: zeroes
    assert size == PROBE_SIZE
    assert flags & TF_HAS_FLAGS
    assert flags & TF_SEND_FLUSH
    assert c.call(CMD_READ, offset=0, length=16)[0] == 0
    c.send_request(CMD_DISC)
    assert c.expect_closed() == b""


def probe_abort(server: ServeProcess) -> None:
    c = open_client(server)
    c.start()
    c.send_option(OPT_ABORT, b"ignored data")
    assert c.option_reply()[:2] == (OPT_ABORT, REP_ACK)
    assert c.expect_closed() == b""


def probe_handshake_never_finished(server: ServeProcess) -> None:
    """Connect and say nothing, or stop half-way: dropped at the handshake deadline."""
    silent, half = open_client(server), open_client(server, "tcp")
    start = time.monotonic()
    half.start()
    half.send(option(OPT_LIST)[:7])  # half an option header, then silence
    assert silent.expect_closed(HANDSHAKE_TIMEOUT + IO_TIMEOUT)[:8] == b"NBDMAGIC"
    assert half.expect_closed(HANDSHAKE_TIMEOUT + IO_TIMEOUT) == b""
    elapsed = time.monotonic() - start
    assert HANDSHAKE_TIMEOUT * 0.8 <= elapsed < HANDSHAKE_TIMEOUT + 5, elapsed


# -- probes: transmission ------------------------------------------------------------------


def probe_unknown_commands_and_flags(server: ServeProcess) -> None:
    for structured in (True, False):
        c = open_client(server)
        c.start()
        go(c, structured=structured)
        assert c.call(42, offset=0, length=512)[0] == EINVAL
        assert c.call(8, offset=PROBE_SIZE)[0] == EINVAL  # NBD_CMD_RESIZE: not advertised
        assert c.call(CMD_READ, offset=0, length=512, flags=1 << 9)[0] == EINVAL
        assert c.call(CMD_READ, offset=0, length=512, flags=FLAG_NO_HOLE)[0] == EINVAL
        assert c.call(CMD_FLUSH, offset=512, length=0)[0] == EINVAL
        # READ must not get a simple reply once structured replies are on: answer() checks.
        assert c.call(CMD_READ, offset=0, length=512, flags=FLAG_FUA)[0] == 0
        df = c.call(CMD_READ, offset=0, length=512, flags=FLAG_DF)[0]
        assert df == (0 if structured else EINVAL)  # DF needs structured replies
        assert c.call(CMD_BLOCK_STATUS, offset=0, length=512)[0] == EINVAL  # no context
        assert c.call(CMD_CACHE, offset=0, length=512)[0] == 0
        assert c.call(CMD_TRIM, offset=0, length=512)[0] == 0
        assert c.call(CMD_FLUSH)[0] == 0
        c.send_request(CMD_DISC)
        assert c.expect_closed() == b""


def probe_past_the_end(server: ServeProcess) -> None:
    c = open_client(server)
    c.start()
    go(c)
    end = PROBE_SIZE
    assert c.call(CMD_READ, offset=end - 256, length=512)[0] == EINVAL
    assert c.call(CMD_READ, offset=2**63, length=512)[0] == EINVAL
    assert c.call(CMD_TRIM, offset=end, length=1)[0] == EINVAL
    assert c.call(CMD_WRITE_ZEROES, offset=end - 512, length=1024)[0] == ENOSPC
    assert c.call(CMD_WRITE_ZEROES, offset=2**64 - 512, length=1024)[0] == ENOSPC
    # A WRITE past the end: its payload is consumed, the next header parsed.
    assert c.call(CMD_WRITE, offset=end - 256, length=512, data=b"\xab" * 512)[0] == ENOSPC
    assert c.call(CMD_READ, offset=end - 256, length=256)[0] == 0


def probe_write_longer_than_max(server: ServeProcess) -> None:
    """A WRITE of 32 MiB + 512 (over the advertised maximum, under the drain cap) is
    drained and refused; one claiming more than the drain cap is a hard disconnect."""
    c = open_client(server)
    c.start()
    go(c)
    n = 32 * MiB + 512
    c.send_request(CMD_WRITE, cookie=5, offset=0, length=n)
    chunk = bytes(MiB)
    for _ in range(32):
        c.send(chunk)
    c.send(bytes(512))
    assert c.reply()[:2] == (EINVAL, 5)
    assert "WRITE larger than the maximum payload" in server.stderr()
    assert c.call(CMD_READ, offset=0, length=512)[0] == 0
    c.send_request(CMD_WRITE, cookie=6, offset=0, length=0xFFFF_FFFF)
    # The server may drop the connection as soon as it has the header: then this
    # part of the payload meets a closed socket, which is the expected outcome too.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        c.send(bytes(4096))
    assert c.expect_closed() == b""


def probe_bad_request_magic(server: ServeProcess) -> None:
    c = open_client(server)
    c.start()
    go(c)
    c.send(request(CMD_READ, length=512, magic=0xDEADBEEF))
    assert c.expect_closed() == b""


def probe_truncated_payload(server: ServeProcess) -> None:
    """A WRITE whose payload stops short (EOF): nothing of it is written or answered."""
    c = open_client(server)
    c.start()
    go(c)
    c.send_request(CMD_WRITE, cookie=9, offset=512 * KiB, length=64 * KiB, data=b"\x5c" * 1000)
    c.sock.shutdown(socket.SHUT_WR)
    assert c.expect_closed() == b""
    c = open_client(server)
    c.start()
    go(c)
    assert c.call(CMD_READ, offset=512 * KiB, length=64 * KiB) == (0, bytes(64 * KiB))


def probe_disconnect_mid_payload(server: ServeProcess) -> None:
    """Connections reset in the middle of a WRITE payload and of the handshake."""
    for _ in range(3):
        c = open_client(server, "tcp")
        c.start()
        go(c)
        c.send_request(CMD_WRITE, offset=768 * KiB, length=MiB, data=b"\x6d" * (300 * KiB))
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # RST
        c = open_client(server)
        c.start()
        c.send(option(OPT_GO, info_payload(PROBE.encode()))[:20])
        c.close()
    c = open_client(server)
    c.start()
    go(c)
    assert c.call(CMD_READ, offset=768 * KiB, length=MiB) == (0, bytes(MiB))


def probe_disc_finishes_outstanding(server: ServeProcess) -> None:
    """Requests sent before DISC are still answered; then the server closes."""
    c = open_client(server)
    c.start()
    go(c)
    burst = b"".join(
        request(
            CMD_WRITE, cookie=100 + i, offset=1 * MiB + i * 4096, length=4096, data=b"\x21" * 4096
        )
        for i in range(16)
    )
    c.send(burst + request(CMD_DISC))
    cookies = set()
    for _ in range(16):
        error, cookie, _ = c.reply()
        assert error == 0
        cookies.add(cookie)
    assert cookies == set(range(100, 116))
    assert c.expect_closed() == b""


def probe_zero_length_and_huge_zero(server: ServeProcess) -> None:
    c = open_client(server)
    c.start()
    go(c)
    assert c.call(CMD_WRITE, offset=0, length=0)[0] in (0, EINVAL)
    assert c.call(CMD_READ, offset=0, length=0)[0] in (0, EINVAL)
    assert c.call(CMD_READ, offset=0, length=33 * MiB)[0] in (EINVAL, EOVERFLOW)
    c.send_request(CMD_DISC)
    c.expect_closed()


PROBES: list[Callable[[ServeProcess], None]] = [
    probe_garbage_instead_of_handshake,
    probe_unknown_client_flags,
    probe_bad_option_magic,
    probe_unknown_option_drained,
    probe_oversize_known_option,
    probe_option_past_absolute_cap,
    probe_bad_option_payloads,
    probe_meta_contexts,
    probe_too_many_options,
    probe_export_name,
    probe_abort,
    probe_handshake_never_finished,
    probe_unknown_commands_and_flags,
    probe_past_the_end,
    probe_write_longer_than_max,
    probe_bad_request_magic,
    probe_truncated_payload,
    probe_disconnect_mid_payload,
    probe_disc_finishes_outstanding,
    probe_zero_length_and_huge_zero,
]


# -- the tests --------------------------------------------------------------------------------


def _serve(
    sockdir: Path, logdir: Path, disks: dict[str, int], archive: str = "out.vma"
) -> ServeProcess:
    return start_serve(
        logdir / archive,
        disks,
        sockdir=sockdir,
        logdir=logdir,
        extra=["--handshake-timeout", str(HANDSHAKE_TIMEOUT), "--verbose"],
    )


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One server for the single probes; its disk ``never`` keeps it from finishing."""
    logdir = tmp_path_factory.mktemp("malformed")
    sockdir = Path(tempfile.mkdtemp(prefix="nbdvma-", dir="/tmp"))  # short: sun_path
    server = _serve(sockdir, logdir, {PROBE: PROBE_SIZE, "never": MiB})
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.mark.parametrize("probe", PROBES, ids=[p.__name__.removeprefix("probe_") for p in PROBES])
def test_probe(shared_server: ServeProcess, probe: Callable[[ServeProcess], None]) -> None:
    assert shared_server.alive(), shared_server.stderr()
    try:
        probe(shared_server)
    finally:
        close_all()
    assert shared_server.alive(), shared_server.stderr()
    healthy(shared_server)
    assert "Traceback" not in shared_server.stderr()


def test_malformed_clients_during_a_backup(
    sockdir: Path, workdir: Path, qemu_img: str, nbdkit: str, libnbd: ModuleType
) -> None:
    """Every probe, while qemu-img slowly copies a disk into the same server: the copy
    finishes, and the archive verifies and restores byte for byte."""
    size = 4 * MiB
    data = bytearray(random.Random(3).randbytes(size))
    data[MiB : 2 * MiB] = bytes(MiB)
    src = workdir / "src.raw"
    src.write_bytes(data)
    server = _serve(sockdir, workdir, {"main": size, PROBE: PROBE_SIZE})
    slow_sock = sockdir / "slow.sock"
    slow = subprocess.Popen(
        [
            *(nbdkit, "-f", "-r", "-U", str(slow_sock), "--filter=blocksize", "--filter=delay"),
            *("file", str(src), "rdelay=40ms", "maxlen=64k"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    copy: subprocess.Popen[str] | None = None
    try:
        poll_until(slow_sock.exists, 10, "nbdkit's socket")
        copy = subprocess.Popen(
            [
                *(qemu_img, "convert", "-m", "1", "-n", "-f", "raw", "-O", "raw"),
                f"nbd+unix://?socket={slow_sock}",
                server.uri("main", "tcp"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            for probe in PROBES:
                probe(server)
        finally:
            close_all()
        still_copying = copy.poll() is None
        out, _ = copy.communicate(timeout=60)
        assert copy.returncode == 0, out
        # Complete the probe disk: read back what the probes left and write it again
        # (identical rewrites of stored clusters are no-ops; the rest fills the gaps).
        h = libnbd.NBD()
        h.connect_uri(server.uri(PROBE))
        step = 8 * MiB
        probe_bytes = b"".join(h.pread(step, off) for off in range(0, PROBE_SIZE, step))
        for off in range(0, PROBE_SIZE, step):
            h.pwrite(probe_bytes[off : off + step], off)
        h.shutdown()
        assert server.wait() == 0, server.stderr()
    finally:
        if copy is not None and copy.poll() is None:
            copy.kill()
            copy.communicate()
        slow.kill()
        slow.wait()
        server.kill()
    assert still_copying, "the backup finished before the probes: make the source slower"
    archive = Path(server.archive)
    nbdvma("verify", "--strict", str(archive))
    got = extract_disks(archive, workdir / "x")
    assert got["main"] == bytes(data)
    assert got[PROBE] == probe_bytes
    assert "Traceback" not in server.stderr()
