"""Tests of nbdvma.addresses: parsing ``unix:``/``tcp:`` addresses and connecting to them."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import trio

from nbdvma.addresses import (
    AddressError,
    TcpAddress,
    UnixAddress,
    open_stream,
    parse_address,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/qemu/100.qmp", UnixAddress("/run/qemu/100.qmp")),
        ("unix:relative.sock", UnixAddress("relative.sock")),
        ("unix:/a:b", UnixAddress("/a:b")),
        ("tcp:127.0.0.1:10809", TcpAddress("127.0.0.1", 10809)),
        ("tcp:localhost:0", TcpAddress("localhost", 0)),
        ("tcp:[::1]:4444", TcpAddress("::1", 4444)),
        ("tcp:127.0.0.1:65535", TcpAddress("127.0.0.1", 65535)),
    ],
)
def test_parse_valid(text: str, expected: UnixAddress | TcpAddress) -> None:
    address = parse_address(text)
    assert address == expected
    assert str(address) == text


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("", "expected unix:PATH"),
        ("/run/x.sock", "expected unix:PATH"),
        ("unix:", "empty unix socket path"),
        ("unix:/" + "x" * 107, "longer than 107"),
        ("unix:/a\0b", "NUL"),
        ("tcp:127.0.0.1", "expected tcp:HOST:PORT"),
        ("tcp::80", "empty host"),
        ("tcp:host:", "not a number"),
        ("tcp:host:http", "not a number"),
        ("tcp:host:-1", "not a number"),
        ("tcp:host:65536", "out of range"),
        ("tcp:host:１２", "not a number"),
        ("tcp:::1:80", "brackets"),
        ("tcp:[::1]80", r"expected tcp:\[IPV6\]:PORT"),
        ("tcp:[::1", r"expected tcp:\[IPV6\]:PORT"),
        ("vsock:3:1", "unknown scheme"),
        ("UNIX:/x", "unknown scheme"),
    ],
)
def test_parse_invalid(text: str, hint: str) -> None:
    with pytest.raises(AddressError, match=hint):
        parse_address(text)


def test_longest_unix_path_is_accepted() -> None:
    path = "/" + "x" * 106
    assert parse_address(f"unix:{path}") == UnixAddress(path)


def test_address_error_is_a_value_error_for_argparse() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--listen", type=parse_address)
    assert parser.parse_args(["--listen", "tcp:127.0.0.1:0"]).listen == TcpAddress("127.0.0.1", 0)
    with pytest.raises(argparse.ArgumentError, match="invalid parse_address value"):
        parser.parse_args(["--listen", "bogus"])


def test_with_port_and_qemu_socket_address() -> None:
    bound = TcpAddress("127.0.0.1", 0).with_port(10809)
    assert bound == TcpAddress("127.0.0.1", 10809)
    assert bound.qemu_socket_address() == {"type": "inet", "host": "127.0.0.1", "port": "10809"}
    assert UnixAddress("/s").qemu_socket_address() == {"type": "unix", "path": "/s"}


async def test_open_stream_unix_and_tcp(sockdir: Path) -> None:
    async def echo_once(stream: trio.SocketStream) -> None:
        await stream.send_all(await stream.receive_some())

    unix_path = str(sockdir / "echo.sock")
    unix_socket = trio.socket.socket(trio.socket.AF_UNIX)
    await unix_socket.bind(unix_path)
    unix_socket.listen()
    listeners = [
        trio.SocketListener(unix_socket),
        *await trio.open_tcp_listeners(0, host="127.0.0.1"),
    ]
    port = listeners[1].socket.getsockname()[1]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, echo_once, listeners)
            for address in (f"unix:{unix_path}", parse_address(f"tcp:127.0.0.1:{port}")):
                with trio.fail_after(5):
                    stream = await open_stream(address)
                    async with stream:
                        await stream.send_all(b"ping")
                        assert await stream.receive_some() == b"ping"
            nursery.cancel_scope.cancel()
    finally:
        for listener in listeners:
            await listener.aclose()


async def test_open_stream_refuses_port_zero_and_reports_missing_socket(sockdir: Path) -> None:
    with pytest.raises(AddressError, match="port 0"):
        await open_stream("tcp:127.0.0.1:0")
    with pytest.raises(FileNotFoundError):
        await open_stream(f"unix:{sockdir / 'absent.sock'}")
