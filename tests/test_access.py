"""Access control and resource limits through ``nbdvma serve``: who may connect, for
how long, on which listeners, checked with real sockets and clients.

The limits themselves (deadlines, connection cap, buffered-bytes budgets) are tested
exactly, on a virtual clock, in tests/test_server_memory.py; here it is their options.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from nbd_client_sansio import ServerClosed, SocketClient, info_payload, option
from servehelpers import ServeProcess, StartServe, poll_until

from nbdvma.nbd.constants import NbdOption, NbdRep

KiB = 1024
MiB = 1 << 20
O = NbdOption  # noqa: E741
R = NbdRep


# -- nbdvma serve --------------------------------------------------------------------------


def connect(server: ServeProcess) -> SocketClient:
    return SocketClient.tcp(server.tcp_port or 0)


@pytest.mark.interop
def test_serve_max_connections(serve: StartServe) -> None:
    server = serve({"d0": MiB}, ["--max-connections", "2", "--backend", "null"], unix=False)
    a, b = connect(server), connect(server)
    for c in (a, b):
        assert c.greeting() == 3
    with connect(server) as c:
        assert c.expect_closed() == b""  # the third: closed at once, no greeting
    a.close()

    def a_new_one_is_served() -> bool:
        with connect(server) as d:
            try:
                return d.greeting() == 3
            except ServerClosed:
                return False

    poll_until(a_new_one_is_served, 10, "a connection accepted after one closed")
    b.close()


@pytest.mark.interop
def test_serve_handshake_timeout(serve: StartServe) -> None:
    server = serve({"d0": MiB}, ["--handshake-timeout", "0.5", "-v"], unix=False)
    with connect(server) as c:
        assert c.greeting() == 3
        start = time.monotonic()
        assert c.expect_closed() == b""
        assert 0.3 < time.monotonic() - start < 5
    poll_until(lambda: "deadline passed" in server.stderr(), 10, "the drop logged")


@pytest.mark.interop
def test_serve_idle_timeout(serve: StartServe, libnbd: ModuleType) -> None:
    """``--idle-timeout 1``: a connection silent for 1 s is closed by the server (logged
    as the deadline, seen by libnbd as a dead connection); one with a request every
    0.25 s is kept."""
    server = serve({"d0": MiB}, ["--idle-timeout", "1", "--backend", "null", "-v"])
    dropped = "dropped: handshake or idle deadline passed"
    busy = libnbd.NBD()
    busy.connect_uri(server.uri("d0"))
    idle = libnbd.NBD()
    idle.connect_uri(server.uri("d0", "tcp"))
    quiet_since = time.monotonic()
    dropped_after = 0.0
    for _ in range(8):  # 2 s of a request every 0.25 s: never idle for 1 s
        if dropped not in server.stderr():
            dropped_after = time.monotonic() - quiet_since
        busy.pread(512, 0)
        time.sleep(0.25)
    busy.shutdown()
    log = server.stderr()
    assert log.count(dropped) == 1, log  # the idle one, not the busy one
    assert 0.75 <= dropped_after < 2, dropped_after
    (line,) = [ln for ln in log.splitlines() if dropped in ln]
    assert "127.0.0.1" in line, line  # the TCP (idle) connection
    with pytest.raises(libnbd.Error) as info:
        idle.pread(512, 0)  # silent for 2 s: dropped
    assert idle.aio_is_dead() or idle.aio_is_closed(), info.value
    # The server's close, not an error reply: ENOTCONN, the connection dead.
    assert info.value.errno == "ENOTCONN", info.value


@pytest.mark.interop
def test_serve_only_declared_exports(serve: StartServe, libnbd: ModuleType) -> None:
    server = serve({"d0": MiB}, ["--backend", "null"])
    h = libnbd.NBD()
    with pytest.raises(libnbd.Error):
        h.connect_uri(server.uri("d1"))
    with connect(server) as c:
        c.start()
        assert c.final(O.NBD_OPT_GO, info_payload(b"../d0")) == R.NBD_REP_ERR_UNKNOWN
        c.send(option(O.NBD_OPT_EXPORT_NAME, b"D0"))
        assert c.expect_closed() == b""


@pytest.mark.interop
def test_serve_unix_socket_is_owner_only(serve: StartServe) -> None:
    server = serve({"d0": MiB}, ["--backend", "null"], tcp=False)
    assert server.unix is not None
    assert stat.S_IMODE(os.stat(server.unix).st_mode) == 0o600
    # Stopped by a signal, it says so, exits 128 + 15 and leaves no socket behind.
    server.process.send_signal(signal.SIGTERM)
    assert server.wait() == 128 + signal.SIGTERM
    assert "nbdvma serve: interrupted by SIGTERM; incomplete: d0\n" in server.stderr()
    assert not os.path.exists(server.unix)


WARNING = "reachable from other hosts without --tls require"


@pytest.mark.interop
@pytest.mark.parametrize(
    ("listen", "tls", "warned"),
    [
        ("tcp:0.0.0.0:0", False, True),
        ("tcp:0.0.0.0:0", True, False),
        ("tcp:127.0.0.1:0", False, False),
        ("tcp:localhost:0", False, False),
    ],
)
def test_serve_warns_about_exposed_plain_listeners(
    serve: StartServe, tmp_path: Path, listen: str, tls: bool, warned: bool
) -> None:
    extra = ["--backend", "null", "--listen", listen]
    if tls:
        key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=x", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        extra += ["--tls", "require", "--tls-cert", str(cert), "--tls-key", str(key)]
    server = serve({"d0": MiB}, extra, unix=False)
    poll_until(lambda: server.stderr().count("listening on") == 2, 10, "both listeners")
    assert (WARNING in server.stderr()) == warned, server.stderr()
    if warned:
        assert "whoever connects can read and write the backup" in server.stderr()


@pytest.mark.interop
def test_serve_interrupted_says_what_happened_to_the_archive(
    serve: StartServe, workdir: Path, qemu_io: str
) -> None:
    """Nothing written: no .part is left, and the message says so; something written:
    the message names ARCHIVE.part, which is there, and what is incomplete."""
    server = serve({"d0": MiB}, [], tcp=False)
    server.process.send_signal(signal.SIGINT)
    assert server.wait() == 128 + signal.SIGINT
    assert "interrupted by SIGINT before anything was written; no archive left" in (server.stderr())
    assert not (workdir / "out.vma.part").exists()

    server = serve({"d0": MiB}, [], tcp=False)
    uri = f"nbd+unix:///d0?socket={server.unix}"
    subprocess.run(
        [qemu_io, "-f", "raw", "-c", "write -P 0x5a 0 64k", "-c", "flush", uri],
        check=True,
        capture_output=True,
        timeout=60,
    )
    server.process.send_signal(signal.SIGINT)
    assert server.wait() == 128 + signal.SIGINT
    assert (
        f"the archive is incomplete and left as {workdir / 'out.vma'}.part; incomplete: d0"
        in server.stderr()
    )
    assert (workdir / "out.vma.part").exists()


@pytest.mark.interop
def test_serve_says_when_a_client_leaves_a_disk_incomplete(
    serve: StartServe, qemu_io: str, nbdinfo: str
) -> None:
    """A client that wrote part of a disk and left: serve says which disk and how much
    is missing (a probe that wrote nothing is no news)."""
    server = serve({"d0": 4 * MiB}, [], tcp=False)
    uri = f"nbd+unix:///d0?socket={server.unix}"
    subprocess.run([nbdinfo, uri], check=True, capture_output=True, timeout=60)
    subprocess.run(
        [qemu_io, "-f", "raw", "-c", "write -P 0x5a 0 1M", uri],
        check=True,
        capture_output=True,
        timeout=60,
    )
    expected = (
        "nbdvma serve: warning: d0: its last client disconnected with 3.0 MiB of 4.0 MiB "
        "not written; waiting for a client to write the rest"
    )
    poll_until(lambda: expected in server.stderr(), 10, "the warning")
    assert server.stderr().count("its last client disconnected") == 1


@pytest.mark.interop
def test_serve_verbose_names_what_clients_asked_for(serve: StartServe, nbdinfo: str) -> None:
    """``-v``: a listing client ends the handshake normally (no "Broken pipe"), and a
    name that does not exist is logged as refused."""
    server = serve({"d0": MiB}, ["-v"], tcp=False)
    base = f"nbd+unix://?socket={server.unix}"
    subprocess.run([nbdinfo, "--list", base], check=True, capture_output=True, timeout=60)
    missing = subprocess.run(
        [nbdinfo, f"nbd+unix:///nope?socket={server.unix}"], capture_output=True, timeout=60
    )
    assert missing.returncode != 0
    poll_until(lambda: "refused: no export 'nope'" in server.stderr(), 10, "the refusal")
    err = server.stderr()
    assert "the client ended the handshake (NBD_OPT_ABORT)" in err
    assert "Broken pipe" not in err


@pytest.mark.interop
def test_a_unix_socket_in_use_is_refused_a_stale_one_replaced(
    serve: StartServe, sockdir: Path, workdir: Path, nbdinfo: str
) -> None:
    first = serve({"d0": MiB}, ["--backend", "null"], tcp=False)
    assert first.unix is not None
    second = subprocess.run(
        [
            *(sys.executable, "-m", "nbdvma", "serve", str(workdir / "b.vma")),
            *("--disk", "d0=1M", "--listen", f"unix:{first.unix}"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert f"unix:{first.unix}: another server is listening there" in second.stderr
    assert second.stderr.count("\n") == 1, second.stderr
    # The first one still serves, and its socket is still its own.
    subprocess.run([nbdinfo, f"nbd+unix:///d0?socket={first.unix}"], check=True, timeout=60)
    first.process.send_signal(signal.SIGTERM)
    assert first.wait() == 128 + signal.SIGTERM
    assert not os.path.exists(first.unix)

    stale = sockdir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # a socket file nobody listens on: a server that died
    third = serve({"d0": MiB}, ["--backend", "null", "--listen", f"unix:{stale}"], tcp=False)
    subprocess.run([nbdinfo, f"nbd+unix:///d0?socket={stale}"], check=True, timeout=60)
    third.kill()
