"""The trio server (nbdvma.server) in-process, over trio memory streams.

The peer is the tests' NBD client (tests/nbd_client_sansio.py, its trio adapter);
the backend is one recording fake whose calls can be held, so that concurrency,
ordering, back-pressure, the buffered-bytes budgets, the connection cap and the
deadlines can be observed exactly.  Deadlines run on trio's autojump clock: a 10 s
handshake timeout costs no wall time.  (tests/test_access.py checks the same limits
through ``nbdvma serve``'s options, with real sockets and clients.)
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

import pytest
import trio
import trio.testing
from nbd_client_sansio import TrioClient, client_flags, option, request

from nbdvma.backends import full_exports
from nbdvma.errors import ClusterConflictError
from nbdvma.limits import ServerLimits
from nbdvma.nbd import ExportInfo
from nbdvma.server import ConnectionObserver, NbdServer

KiB = 1024
MiB = 1024 * KiB
SIZE = 8 * MiB
OPT_LIST, OPT_GO = 3, 7
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_WRITE_ZEROES = 0, 1, 2, 3, 6
NBD_EIO, NBD_EINVAL, NBD_ENOSPC = 5, 22, 28


class FakeBackend:
    """Records calls; a call blocks while its offset is in :attr:`held` (or, for every
    offset, while :attr:`gate` is set to an unset event); counts calls in progress."""

    def __init__(self, exports: Sequence[tuple[str, int]] = (("d0", SIZE),)) -> None:
        self._exports = full_exports(exports)
        self.calls: list[tuple[str, int, int]] = []
        self.started: list[int] = []
        self.held: dict[int, trio.Event] = {}
        self.fail: dict[int, BaseException] = {}
        self.gate: trio.Event | None = None
        self.data: list[bytes] = []  # what WRITEs carried
        self.kinds: list[object] = []  # and the objects they carried it in
        self.in_progress = 0
        self.most = 0

    @property
    def exports(self) -> Sequence[ExportInfo]:
        return self._exports

    async def _op(self, name: str, offset: int, length: int) -> None:
        self.started.append(offset)
        self.in_progress += 1
        self.most = max(self.most, self.in_progress)
        try:
            if offset in self.held:
                await self.held[offset].wait()
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.in_progress -= 1
        if offset in self.fail:
            raise self.fail[offset]
        self.calls.append((name, offset, length))

    async def pread(self, export: str, offset: int, length: int) -> bytes:
        await self._op("read", offset, length)
        return bytes(length)

    async def pwrite(self, export: str, offset: int, data: bytes | bytearray, *, fua: bool) -> None:
        await self._op("write", offset, len(data))
        self.data.append(bytes(data))
        self.kinds.append(data)

    async def zero(self, export: str, offset: int, length: int, *, fua: bool) -> None:
        await self._op("zero", offset, length)

    async def trim(self, export: str, offset: int, length: int, *, fua: bool) -> None:
        await self._op("trim", offset, length)

    async def flush(self) -> None:
        await self._op("flush", -1, 0)

    async def extents(self, export: str, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 3)]


async def connect(
    nursery: trio.Nursery, server: NbdServer, export: str = "d0", *, structured: bool = False
) -> TrioClient:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_connection, server_stream)
    client = TrioClient(client_stream)
    await client.handshake(export, structured=structured)
    return client


def write(cookie: int, offset: int, length: int = 4096) -> bytes:
    return request(CMD_WRITE, cookie=cookie, offset=offset, length=length, data=b"w" * length)


# -- concurrency and ordering ---------------------------------------------------------------


async def test_replies_go_out_as_requests_finish() -> None:
    backend = FakeBackend()
    backend.held[0] = trio.Event()
    server = NbdServer(backend)
    async with trio.open_nursery() as nursery:
        c = await connect(nursery, server)
        await c.send(write(1, 0) + write(2, 65536))
        assert await c.simple() == (0, 2)  # not blocked behind cookie 1
        backend.held[0].set()
        assert await c.simple() == (0, 1)
        await c.send(request(CMD_DISC))
        assert await c.expect_closed() == b""


async def test_disc_waits_for_outstanding_requests() -> None:
    backend = FakeBackend()
    backend.held[0] = trio.Event()
    server = NbdServer(backend)
    async with trio.open_nursery() as nursery:
        c = await connect(nursery, server)
        await c.send(write(1, 0) + request(CMD_DISC))
        await trio.testing.wait_all_tasks_blocked()
        assert server.connections == 1  # still open: the write is outstanding
        backend.held[0].set()
        assert await c.simple() == (0, 1)
        assert await c.expect_closed() == b""
    assert backend.calls == [("write", 0, 4096)]
    assert server.connections == 0


#: What one reader may hold beyond a budget: the rest of one receive (256 KiB) of
#: requests already parsed, plus the request that crossed the limit.
SLACK = 256 * KiB + 64 * KiB


@pytest.mark.parametrize(("size", "slack"), [(MiB, 0), (64 * KiB, SLACK)])
async def test_connection_budget_stops_reading_when_spent(size: int, slack: int) -> None:
    """The reader stops once the payloads held in memory reach ``connection_buffer``
    (the rest waits in the stream), and goes on as they are released.  With payloads
    of 1 MiB exactly two are held; small ones may overshoot by one receive."""
    backend = FakeBackend()
    backend.gate = trio.Event()
    limit = 2 * MiB
    n = 6 * MiB // size
    server = NbdServer(backend, limits=ServerLimits(connection_buffer=limit))
    async with trio.open_nursery() as nursery:
        c = await connect(nursery, server)
        nursery.start_soon(c.send, b"".join(write(i, i * size, size) for i in range(n)))
        await trio.testing.wait_all_tasks_blocked()
        held = len(backend.started)  # then no more reads
        assert sorted(backend.started) == [i * size for i in range(held)]  # in order
        assert limit <= held * size <= limit + slack
        backend.gate.set()
        cookies = {(await c.simple())[1] for _ in range(n)}
        assert cookies == set(range(n))
        assert backend.most * size <= limit + slack  # also after the release
        await c.send(request(CMD_DISC))
        assert await c.expect_closed() == b""
    assert server.connections == 0


async def test_server_budget_is_shared_by_connections() -> None:
    backend = FakeBackend()
    backend.gate = trio.Event()
    server = NbdServer(backend, limits=ServerLimits(connection_buffer=64 * MiB, server_buffer=MiB))
    async with trio.open_nursery() as nursery:
        c1 = await connect(nursery, server)
        c2 = await connect(nursery, server)
        await c1.send(write(1, 0, MiB))
        await trio.testing.wait_all_tasks_blocked()
        await c2.send(write(2, MiB, MiB))
        await trio.testing.wait_all_tasks_blocked()
        assert backend.started == [0]  # c2's payload waits for c1's to be released
        backend.gate.set()
        assert await c1.simple() == (0, 1)
        assert await c2.simple() == (0, 2)
        assert backend.started == [0, MiB]
        for c in (c1, c2):
            await c.send(request(CMD_DISC))
            assert await c.expect_closed() == b""


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "nbd_error"),
    [
        (OSError(errno.ENOSPC, "disk full"), NBD_ENOSPC),
        (OSError(errno.EDQUOT, "quota"), NBD_ENOSPC),
        (ClusterConflictError("cluster 3 differs"), NBD_EIO),
        (RuntimeError("a bug"), NBD_EIO),
    ],
)
async def test_backend_errors_become_nbd_errors(exc: BaseException, nbd_error: int) -> None:
    backend = FakeBackend()
    backend.fail[4096] = exc
    server = NbdServer(backend)
    async with trio.open_nursery() as nursery:
        c = await connect(nursery, server)
        await c.send(write(7, 4096))
        assert await c.simple() == (nbd_error, 7)
        await c.send(write(8, 8192))  # the connection goes on
        assert await c.simple() == (0, 8)
        await c.send(request(CMD_DISC))
        assert await c.expect_closed() == b""


async def test_protocol_error_drops_only_that_connection() -> None:
    """Regression: errors raised inside the request nursery arrive as an
    ExceptionGroup; they must end the connection, not the server."""
    server = NbdServer(FakeBackend())
    async with trio.open_nursery() as nursery:
        bad = await connect(nursery, server)
        good = await connect(nursery, server)
        await bad.send(request(CMD_READ, length=512, magic=0xDEADBEEF))
        assert await bad.expect_closed() == b""
        await good.send(write(1, 0))
        assert await good.simple() == (0, 1)
        await good.send(request(CMD_DISC))
        assert await good.expect_closed() == b""
    assert server.connections == 0


async def test_client_gone_while_replies_are_sent() -> None:
    backend = FakeBackend()
    backend.held[0] = trio.Event()
    server = NbdServer(backend)
    async with trio.open_nursery() as nursery:
        c = await connect(nursery, server)
        await c.send(write(1, 0))
        await trio.testing.wait_all_tasks_blocked()
        await c.stream.aclose()
        backend.held[0].set()  # the reply now goes to a closed stream
    assert server.connections == 0  # handle_connection returned; nothing escaped


# -- limits and deadlines -------------------------------------------------------------------


async def test_handshake_deadline(autojump_clock: trio.testing.MockClock) -> None:
    """A client that stops half-way through an option is dropped at the deadline."""
    server = NbdServer(FakeBackend(), limits=ServerLimits(handshake_timeout=10))
    client_stream, server_stream = trio.testing.memory_stream_pair()
    c = TrioClient(client_stream)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_connection, server_stream)
        assert await c.greeting() == 3
        await c.send(client_flags(3) + option(OPT_GO)[:10])  # then silence
        assert await c.expect_closed() == b""
    assert trio.current_time() - start == pytest.approx(10)
    assert server.connections == 0


async def test_handshake_deadline_is_total_not_per_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client trickling one option every few seconds is still dropped at the deadline."""
    server = NbdServer(FakeBackend(), limits=ServerLimits(handshake_timeout=10))
    client_stream, server_end = trio.testing.memory_stream_pair()
    c = TrioClient(client_stream)

    async def trickle() -> None:
        await c.send(client_flags(3))
        for _ in range(20):
            await trio.sleep(3)
            await c.send(option(OPT_LIST))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        start = trio.current_time()
        await server.handle_connection(server_end)
        assert trio.current_time() - start == pytest.approx(10)
        nursery.cancel_scope.cancel()


async def test_no_deadline_once_transmitting(autojump_clock: trio.testing.MockClock) -> None:
    server = NbdServer(FakeBackend(), limits=ServerLimits(handshake_timeout=10))
    async with trio.open_nursery() as nursery:
        c = await connect(nursery, server)
        await trio.sleep(3600)
        await c.send(write(1, 0))
        assert await c.simple() == (0, 1)
        await c.send(request(CMD_DISC))
        assert await c.expect_closed() == b""


async def test_idle_deadline_only_without_requests_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = FakeBackend()
    backend.gate = trio.Event()
    server = NbdServer(backend, limits=ServerLimits(idle_timeout=30))
    async with trio.open_nursery() as nursery:
        c = await connect(nursery, server)
        # A write the backend holds for 100 s: the connection is busy, not idle.
        await c.send(write(1, 0))
        await trio.sleep(100)
        assert server.connections == 1
        backend.gate.set()
        assert await c.simple() == (0, 1)
        done = trio.current_time()
        assert await c.expect_closed() == b""  # then 30 s of silence end it
        assert trio.current_time() - done == pytest.approx(30)
    assert server.connections == 0


async def test_connection_cap(autojump_clock: trio.testing.MockClock) -> None:
    """Past ``max_connections`` a connection is closed without a greeting; a slot
    freed is taken again."""
    server = NbdServer(FakeBackend(), limits=ServerLimits(max_connections=2))
    async with trio.open_nursery() as nursery:
        held = []
        for _ in range(2):
            client_stream, server_end = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle_connection, server_end)
            c = TrioClient(client_stream)
            assert await c.greeting() == 3
            held.append(c)
        assert server.connections == 2
        extra, server_end = trio.testing.memory_stream_pair()
        await server.handle_connection(server_end)  # returns at once: refused
        assert await TrioClient(extra).expect_closed() == b""  # no greeting
        await held[0].stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert server.connections == 1
        again, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_connection, server_end)
        assert await TrioClient(again).greeting() == 3
        nursery.cancel_scope.cancel()


# -- observer ---------------------------------------------------------------------------------


class Recorder(ConnectionObserver):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def transmission_started(self, export: str) -> None:
        self.events.append(("start", export))

    def connection_ended(self, export: str) -> None:
        self.events.append(("end", export))


async def test_observer_sees_transmissions_only() -> None:
    rec = Recorder()
    exports = [("a", SIZE), ("b", SIZE)]
    server = NbdServer(FakeBackend(exports), observer=rec)
    async with trio.open_nursery() as nursery:
        # A probe that never reaches transmission is not reported.
        s, srv = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_connection, srv)
        assert await TrioClient(s).greeting() == 3
        await s.aclose()
        c = await connect(nursery, server, "b", structured=True)
        await c.send(request(CMD_WRITE_ZEROES, cookie=3, length=SIZE))
        assert await c.simple() == (0, 3)
        assert rec.events == [("start", "b")]
        await c.stream.aclose()  # no DISC: still reported as ended
    assert rec.events == [("start", "b"), ("end", "b")]


# -- WRITE payloads received in place (real sockets) ------------------------------------------


async def _socket_client(nursery: trio.Nursery, server: NbdServer) -> TrioClient:
    a, b = trio.socket.socketpair()
    nursery.start_soon(server.handle_connection, trio.SocketStream(b))
    client = TrioClient(trio.SocketStream(a))
    await client.handshake()
    return client


async def test_large_payloads_on_a_socket_arrive_whole() -> None:
    backend = FakeBackend()
    server = NbdServer(backend)
    payloads = [bytes([i]) * (1 * MiB + 512 * i) for i in range(1, 4)]
    async with trio.open_nursery() as nursery:
        c = await _socket_client(nursery, server)
        for i, data in enumerate(payloads):
            await c.send(request(CMD_WRITE, cookie=i, offset=0, length=len(data), data=data))
        for _ in payloads:
            assert (await c.simple())[0] == 0
        await c.send(request(CMD_DISC))
        assert await c.expect_closed() == b""
        await c.stream.aclose()
    assert backend.data == payloads
    assert all(isinstance(d, bytearray) for d in backend.kinds)
    assert server._budget.used == 0


async def test_payload_cut_short_on_a_socket_gives_its_budget_back() -> None:
    backend = FakeBackend()
    server = NbdServer(backend)
    async with trio.open_nursery() as nursery:
        c = await _socket_client(nursery, server)
        await c.send(request(CMD_WRITE, cookie=1, offset=0, length=4 * MiB) + bytes(300 * KiB))
        await trio.testing.wait_all_tasks_blocked()
        # The payload's buffer exists and counts (less what came with the header).
        assert 3 * MiB < server._budget.used <= 4 * MiB
        await c.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert server.connections == 0
    assert server._budget.used == 0
    assert backend.data == []
