"""The plain socket of a connection (nbdvma.plainsocket): calls the socket directly and
waits with trio only when the kernel would block; still checkpoints now and then."""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from nbdvma.plainsocket import CHECKPOINT_EVERY, UNIX_SEND_BUFFER, PlainSocket, tune_socket
from nbdvma.vma.fileio import FileRuns

Pair = tuple[PlainSocket, trio.socket.SocketType]


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    """Our end driven by :class:`PlainSocket`, the peer a plain trio socket; small
    socket buffers, so that large sends must wait for the peer."""
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with a, b:
        yield PlainSocket(a), b


async def _read_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = await sock.recv(min(65536, n - len(out)))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


async def test_send_all_gathers_many_buffers_and_waits_for_room(pair: Pair) -> None:
    """More buffers than one writev takes (1024), more bytes than the socket holds:
    everything arrives, in order."""
    ours, peer = pair
    buffers = [bytes([i % 251]) * (1 + i % 7) for i in range(3000)]
    buffers.append(bytearray(os.urandom(1 << 20)))
    buffers.append(memoryview(b"tail"))
    expected = b"".join(buffers)
    got = b""
    async with trio.open_nursery() as nursery:

        async def read() -> None:
            nonlocal got
            got = await _read_exactly(peer, len(expected))

        nursery.start_soon(read)
        await ours.send_all(buffers)
    assert got == expected


async def test_receive_waits_for_data_then_returns_it_at_once(pair: Pair) -> None:
    ours, peer = pair
    async with trio.open_nursery() as nursery:

        async def later() -> None:
            await trio.sleep(0.05)
            await peer.send(b"hello")

        nursery.start_soon(later)
        assert await ours.receive_some(100) == b"hello"
    await peer.send(b"world!")
    buf = bytearray(3)
    assert await ours.receive_into(memoryview(buf)) == 3
    assert buf == b"wor"
    assert await ours.receive_some(100) == b"ld!"
    peer.shutdown(socket.SHUT_WR)
    assert await ours.receive_some(100) == b""
    assert await ours.receive_into(memoryview(buf)) == 0


async def test_calls_that_never_wait_still_let_other_tasks_run(pair: Pair) -> None:
    """Data always there: no receive waits, yet every CHECKPOINT_EVERY calls another
    task gets its turn (and a cancellation would be seen)."""
    ours, peer = pair
    await peer.send(b"x" * (4 * CHECKPOINT_EVERY))
    await trio.testing.wait_all_tasks_blocked()
    turns: list[int] = []
    received = 0
    async with trio.open_nursery() as nursery:

        async def other() -> None:
            while received < 4 * CHECKPOINT_EVERY:
                turns.append(received)
                await trio.lowlevel.checkpoint()

        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()  # let it start
        turns.clear()
        while received < 4 * CHECKPOINT_EVERY:
            received += len(await ours.receive_some(1))
    # It ran between the receives: every CHECKPOINT_EVERY of them, the two tasks' order
    # within a turn of the run loop being trio's random choice (so up to twice that).
    assert len(turns) >= 2, turns
    assert turns[0] <= 2 * CHECKPOINT_EVERY, turns
    assert all(b - a <= 2 * CHECKPOINT_EVERY for a, b in itertools.pairwise(turns)), turns


async def test_errors_are_broken_resource_errors(pair: Pair) -> None:
    ours, peer = pair
    peer.close()
    with pytest.raises(trio.BrokenResourceError):
        await ours.send_all([b"x" * 100_000])


async def test_send_file_runs_sends_runs_and_the_zeros_between(pair: Pair, tmp_path: Path) -> None:
    """Runs from the file (sendfile, which must wait for room), zeros between them and
    after the last, the head first."""
    ours, peer = pair
    content = os.urandom(300_000)
    path = tmp_path / "file"
    path.write_bytes(content)
    length = 3 << 20
    runs = [[0, 1000, 5000], [(1 << 20) + 3, 100_000, 150_000], [2 << 20, 0, 7]]
    expected = bytearray(length)
    for at, source, n in runs:
        expected[at : at + n] = content[source : source + n]
    fd = os.open(path, os.O_RDONLY)
    try:
        got = b""
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                nonlocal got
                got = await _read_exactly(peer, 10 + length)

            nursery.start_soon(read)
            await ours.send_file_runs([b"head", b"er:123"], FileRuns(fd, length, runs))
        assert got[:10] == b"header:123"
        assert got[10:] == expected
        # A file shorter than its runs: EIO, not a hang or zeros.
        with pytest.raises(OSError, match="shorter"):
            await ours.send_file_runs([], FileRuns(fd, 10, [[0, 300_000 - 2, 10]]))
    finally:
        os.close(fd)


async def test_tune_socket_gives_a_unix_socket_room_for_a_whole_2_mib_reply() -> None:
    """Asked for 1 MiB, Linux doubles it: 2 MiB, past the default cap of 208 KiB
    (``SO_SNDBUFFORCE`` as root, or a raised ``net.core.wmem_max``)."""
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 2 * UNIX_SEND_BUFFER
        tune_socket(a)
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 2 * UNIX_SEND_BUFFER
        assert UNIX_SEND_BUFFER >= 1 << 20


async def test_tune_socket_sets_nodelay_and_leaves_tcp_buffers_to_the_kernel() -> None:
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with client:
            await client.connect(listener.getsockname())
            server, _ = await listener.accept()
            with server:
                before = server.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                tune_socket(server)
                assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                assert server.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == before
