"""Socket addresses as the command line and QEMU spell them: ``unix:PATH`` and ``tcp:HOST:PORT``.

One parser for every option that names a socket (the QMP socket of ``nbdvma backup``,
the server's ``--listen`` and ``--vmstate``), so that they all accept the same strings
as QEMU's own ``-qmp`` and ``migrate`` URIs.  Parsing does no I/O: a TCP port of ``0``
stays ``0`` here and is resolved by whoever binds the listener (it then reports the
real port with :meth:`TcpAddress.with_port`).

:func:`open_stream` connects to either kind and is the one place that knows how.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from nbdvma.errors import AddressError

__all__ = [
    "Address",
    "AddressError",
    "TcpAddress",
    "UnixAddress",
    "open_stream",
    "parse_address",
]

# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_UNIX_PATH = 107


@attrs.frozen
class UnixAddress:
    """A unix-domain stream socket at ``path``."""

    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"

    def qemu_socket_address(self) -> dict[str, Any]:
        """The QAPI ``SocketAddress`` for QEMU (``blockdev-add`` of an NBD client, ...)."""
        return {"type": "unix", "path": self.path}


@attrs.frozen
class TcpAddress:
    """A TCP socket at ``host``:``port``; ``port`` 0 means "any free port" when binding."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    def with_port(self, port: int) -> TcpAddress:
        """The same host with ``port``: how a listener reports the port it bound for ``0``."""
        return TcpAddress(self.host, port)

    def qemu_socket_address(self) -> dict[str, Any]:
        """The QAPI ``SocketAddress`` for QEMU; QAPI wants the port as a string."""
        return {"type": "inet", "host": self.host, "port": str(self.port)}


Address = UnixAddress | TcpAddress


def parse_address(text: str) -> Address:
    """Parse ``unix:PATH`` or ``tcp:HOST:PORT`` (``tcp:[::1]:PORT`` for IPv6).

    Args:
        text: the address as given on a command line.

    Returns:
        A :class:`UnixAddress` or a :class:`TcpAddress`.  Port 0 is kept as 0.

    Raises:
        AddressError: the scheme is neither ``unix`` nor ``tcp``, the path is empty or
            too long for a unix socket, or the host or port is missing or invalid.
    """
    scheme, sep, rest = text.partition(":")
    if not sep:
        raise AddressError(f"{text!r}: expected unix:PATH or tcp:HOST:PORT")
    if scheme == "unix":
        if not rest:
            raise AddressError(f"{text!r}: empty unix socket path")
        if "\0" in rest:
            raise AddressError(f"{text!r}: NUL in unix socket path")
        if len(rest.encode()) > _MAX_UNIX_PATH:
            raise AddressError(f"{text!r}: unix socket path longer than {_MAX_UNIX_PATH} bytes")
        return UnixAddress(rest)
    if scheme == "tcp":
        return _parse_tcp(text, rest)
    raise AddressError(f"{text!r}: unknown scheme {scheme!r}; expected unix: or tcp:")


def _parse_tcp(text: str, rest: str) -> TcpAddress:
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or not tail.startswith(":"):
            raise AddressError(f"{text!r}: expected tcp:[IPV6]:PORT")
        port_text = tail[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise AddressError(f"{text!r}: expected tcp:HOST:PORT")
        if ":" in host:
            raise AddressError(f"{text!r}: put an IPv6 host in brackets: tcp:[{host}]:PORT")
    if not host:
        raise AddressError(f"{text!r}: empty host")
    if not (port_text.isascii() and port_text.isdigit()):
        raise AddressError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise AddressError(f"{text!r}: port {port} out of range 0..65535")
    return TcpAddress(host, port)


async def open_stream(address: Address | str) -> trio.SocketStream:
    """Connect a stream socket to ``address``.

    Args:
        address: an :data:`Address` or a string for :func:`parse_address`.

    Returns:
        The connected stream.

    Raises:
        AddressError: ``address`` is a string that does not parse, or a TCP port is 0.
        OSError: the connection failed (``ENOENT``, ``ECONNREFUSED``, ...).
    """
    if isinstance(address, str):
        address = parse_address(address)
    if isinstance(address, UnixAddress):
        return await trio.open_unix_socket(address.path)
    if address.port == 0:
        raise AddressError(f"{address}: cannot connect to port 0")
    return await trio.open_tcp_stream(address.host, address.port)
