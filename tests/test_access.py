"""Access control and resource limits: who may connect, and for how long, and how much.

In-process tests drive :class:`nbdvma.server.NbdServer` over trio memory streams with
a virtual clock (deadlines, connection cap, buffered-bytes budgets); subprocess tests
check the same through ``nbdvma serve``'s options with real sockets and clients.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import time
from pathlib import Path
from types import ModuleType

import pytest
import trio
import trio.testing
from nbd_client_sansio import Reader, client_flags, info_payload, option, request
from servehelpers import ServeProcess, StartServe, poll_until

from nbdvma.backends import Export, NullBackend
from nbdvma.nbd.constants import NbdCommand, NbdOption, NbdRep
from nbdvma.server import NbdServer, ServerLimits

KiB = 1024
MiB = 1 << 20
O = NbdOption  # noqa: E741
R = NbdRep


# -- in process: a server on memory streams ------------------------------------------------


class GatedBackend(NullBackend):
    """A null backend whose writes wait for :attr:`gate`; counts writes in progress."""

    def __init__(self) -> None:
        super().__init__([Export("d0", 64 * MiB)])
        self.gate = trio.Event()
        self.in_progress = 0
        self.most = 0

    async def pwrite(self, export: str, offset: int, data: bytes, *, fua: bool) -> None:
        self.in_progress += 1
        self.most = max(self.most, self.in_progress)
        try:
            await self.gate.wait()
        finally:
            self.in_progress -= 1


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = await stream.receive_some(n - len(out))
        if not data:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += data
    return out


async def client_go(stream: trio.abc.Stream, export: bytes = b"d0") -> None:
    """Greeting, flags, GO; returns in transmission (simple replies)."""
    assert Reader(await receive_exactly(stream, 18)).greeting() == 3
    await stream.send_all(client_flags(3) + option(O.NBD_OPT_GO, info_payload(export)))
    while True:
        head = await receive_exactly(stream, 20)
        (length,) = struct.unpack(">I", head[16:])
        _, rep, _ = Reader(head + await receive_exactly(stream, length)).option_reply()
        if rep == R.NBD_REP_ACK:
            return
        assert rep == R.NBD_REP_INFO


def write_requests(n: int, size: int) -> bytes:
    return b"".join(
        request(NbdCommand.NBD_CMD_WRITE, cookie=i, offset=i * size, length=size, data=bytes(size))
        for i in range(n)
    )


#: What one reader may hold beyond a budget: the rest of one receive (256 KiB) of
#: requests already parsed, plus the request that crossed the limit.
SLACK = 256 * KiB + 64 * KiB


async def test_connection_buffer_bounds_writes_held_in_memory() -> None:
    backend = GatedBackend()
    limit = MiB
    server = NbdServer(backend, limits=ServerLimits(connection_buffer=limit))
    client, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_connection, server_end)
        with trio.fail_after(10):
            await client_go(client)
            nursery.start_soon(client.send_all, write_requests(64, 64 * KiB))
            await trio.testing.wait_all_tasks_blocked()
            # The reader stopped once the budget was spent (the rest waits in the socket).
            assert limit <= backend.in_progress * 64 * KiB <= limit + SLACK
            backend.gate.set()
            replies = Reader(await receive_exactly(client, 64 * 16))
            assert sorted(replies.simple()[1] for _ in range(64)) == list(range(64))
            assert backend.most * 64 * KiB <= limit + SLACK
            await client.send_all(request(NbdCommand.NBD_CMD_DISC))
    assert server.connections == 0


async def test_server_buffer_is_shared_by_connections() -> None:
    backend = GatedBackend()
    limit = MiB
    server = NbdServer(
        backend, limits=ServerLimits(connection_buffer=64 * MiB, server_buffer=limit)
    )
    clients = []
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            client, server_end = trio.testing.memory_stream_pair()
            clients.append(client)
            nursery.start_soon(server.handle_connection, server_end)
        with trio.fail_after(10):
            for client in clients:
                await client_go(client)
                nursery.start_soon(client.send_all, write_requests(32, 64 * KiB))
            await trio.testing.wait_all_tasks_blocked()
            assert limit <= backend.in_progress * 64 * KiB <= limit + 3 * SLACK  # not 96
            backend.gate.set()
            for client in clients:
                await receive_exactly(client, 32 * 16)
                await client.send_all(request(NbdCommand.NBD_CMD_DISC))


async def test_connection_cap(autojump_clock: trio.testing.MockClock) -> None:
    server = NbdServer(NullBackend([Export("d0", MiB)]), limits=ServerLimits(max_connections=2))
    async with trio.open_nursery() as nursery:
        held = []
        for _ in range(2):
            client, server_end = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle_connection, server_end)
            assert Reader(await receive_exactly(client, 18)).greeting() == 3
            held.append(client)
        assert server.connections == 2
        extra, server_end = trio.testing.memory_stream_pair()
        await server.handle_connection(server_end)  # returns at once: refused
        assert await extra.receive_some(100) == b""  # closed without a greeting
        await held[0].aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert server.connections == 1
        again, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_connection, server_end)
        assert Reader(await receive_exactly(again, 18)).greeting() == 3
        nursery.cancel_scope.cancel()


async def test_handshake_deadline(autojump_clock: trio.testing.MockClock) -> None:
    server = NbdServer(NullBackend([Export("d0", MiB)]), limits=ServerLimits(handshake_timeout=7))
    client, server_end = trio.testing.memory_stream_pair()
    start = trio.current_time()
    await server.handle_connection(server_end)  # the client never answers the greeting
    assert trio.current_time() - start == pytest.approx(7)
    await receive_exactly(client, 18)
    assert await client.receive_some(100) == b""


async def test_handshake_deadline_is_total_not_per_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client trickling one option every few seconds is still dropped at the deadline."""
    server = NbdServer(NullBackend([Export("d0", MiB)]), limits=ServerLimits(handshake_timeout=10))
    client, server_end = trio.testing.memory_stream_pair()

    async def trickle() -> None:
        await client.send_all(client_flags(3))
        for _ in range(20):
            await trio.sleep(3)
            await client.send_all(option(O.NBD_OPT_LIST))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        start = trio.current_time()
        await server.handle_connection(server_end)
        assert trio.current_time() - start == pytest.approx(10)
        nursery.cancel_scope.cancel()


async def test_idle_deadline_only_without_requests_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = GatedBackend()
    server = NbdServer(backend, limits=ServerLimits(idle_timeout=30))
    client, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_connection, server_end)
        await client_go(client)
        # A write the backend holds for 100 s: the connection is busy, not idle.
        await client.send_all(write_requests(1, 4096))
        await trio.sleep(100)
        assert server.connections == 1
        backend.gate.set()
        assert Reader(await receive_exactly(client, 16)).simple() == (0, 0)
        done = trio.current_time()
        assert await client.receive_some(100) == b""  # then 30 s of silence end it
        assert trio.current_time() - done == pytest.approx(30)
    assert server.connections == 0


# -- nbdvma serve --------------------------------------------------------------------------


def connect(server: ServeProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.tcp_port or 0), timeout=10)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += data
    return out


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.interop
def test_serve_max_connections(serve: StartServe) -> None:
    server = serve({"d0": MiB}, ["--max-connections", "2", "--backend", "null"], unix=False)
    a, b = connect(server), connect(server)
    for sock in (a, b):
        assert Reader(recv_exactly(sock, 18)).greeting() == 3
    with connect(server) as c:
        assert closed_by_server(c)  # the third: closed at once, no greeting
    a.close()

    def a_new_one_is_served() -> bool:
        with connect(server) as d:
            try:
                return len(recv_exactly(d, 18)) == 18
            except (EOFError, ConnectionResetError):
                return False

    poll_until(a_new_one_is_served, 10, "a connection accepted after one closed")
    b.close()


@pytest.mark.interop
def test_serve_handshake_timeout(serve: StartServe) -> None:
    server = serve({"d0": MiB}, ["--handshake-timeout", "0.5", "-v"], unix=False)
    with connect(server) as sock:
        recv_exactly(sock, 18)
        start = time.monotonic()
        assert closed_by_server(sock)
        assert 0.3 < time.monotonic() - start < 5
    poll_until(lambda: "deadline passed" in server.stderr(), 10, "the drop logged")


@pytest.mark.interop
def test_serve_idle_timeout(serve: StartServe, libnbd: ModuleType) -> None:
    server = serve({"d0": MiB}, ["--idle-timeout", "1", "--backend", "null"])
    busy = libnbd.NBD()
    busy.connect_uri(server.uri("d0"))
    idle = libnbd.NBD()
    idle.connect_uri(server.uri("d0", "tcp"))
    for _ in range(8):  # 2 s of a request every 0.25 s: never idle for 1 s
        busy.pread(512, 0)
        time.sleep(0.25)
    busy.shutdown()
    with pytest.raises(libnbd.Error):
        idle.pread(512, 0)  # silent for 2 s: dropped


@pytest.mark.interop
def test_serve_only_declared_exports(serve: StartServe, libnbd: ModuleType) -> None:
    server = serve({"d0": MiB}, ["--backend", "null"])
    h = libnbd.NBD()
    with pytest.raises(libnbd.Error):
        h.connect_uri(server.uri("d1"))
    with connect(server) as sock:
        recv_exactly(sock, 18)
        sock.sendall(client_flags(3) + option(O.NBD_OPT_GO, info_payload(b"../d0")))
        head = recv_exactly(sock, 20)
        _, rep, _ = Reader(
            head + recv_exactly(sock, struct.unpack(">I", head[16:])[0])
        ).option_reply()
        assert rep == R.NBD_REP_ERR_UNKNOWN
        sock.sendall(option(O.NBD_OPT_EXPORT_NAME, b"D0"))
        assert closed_by_server(sock)


@pytest.mark.interop
def test_serve_unix_socket_is_owner_only(serve: StartServe) -> None:
    server = serve({"d0": MiB}, ["--backend", "null"], tcp=False)
    assert server.unix is not None
    assert stat.S_IMODE(os.stat(server.unix).st_mode) == 0o600


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
