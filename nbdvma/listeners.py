"""Listening sockets for ``--listen`` and ``--vmstate``: unix (mode 0600) and TCP, bound
here or passed already listening (systemd socket activation)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat

import trio

from nbdvma.addresses import Address, TcpAddress, UnixAddress
from nbdvma.errors import ListenError

__all__ = ["ListenError", "adopt_listener", "open_listener", "remove_socket"]

#: The unix socket files this process created: path -> (st_dev, st_ino), so that
#: :func:`remove_socket` never removes a file another server put there since.
_CREATED: dict[str, tuple[int, int]] = {}


async def open_listener(
    address: Address, *, unix_mode: int = 0o600, backlog: int = 128
) -> tuple[trio.SocketListener, Address]:
    """Bind and listen on ``address``.

    A unix socket is created with ``unix_mode`` (owner only by default: whoever can
    connect can write the backup).  A socket file at the path that a live server
    listens on is an error (two servers on one path would leave the first unreachable);
    a stale one (nobody accepts) is replaced; any other file is an error.  A TCP port 0
    is resolved to the port the kernel chose.

    Returns:
        The listener and the address it really listens on.

    Raises:
        ListenError: the address cannot be bound.
    """
    try:
        if isinstance(address, UnixAddress):
            return await _unix(address, unix_mode, backlog), address
        return await _tcp(address, backlog)
    except OSError as exc:
        raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}") from None


async def _unix(address: UnixAddress, mode: int, backlog: int) -> trio.SocketListener:
    path = address.path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenError(f"cannot listen on {address}: a file that is not a socket is there")
        if await _someone_listens(path):
            raise ListenError(f"{address}: another server is listening there")
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bind under a umask that leaves no window in which others could connect.
        old = os.umask(0o777 & ~mode)
        try:
            await sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        sock.listen(backlog)
        st = os.lstat(path)
        _CREATED[path] = (st.st_dev, st.st_ino)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def _someone_listens(path: str) -> bool:
    """Whether a server accepts on the unix socket at ``path`` (a stale file refuses)."""
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.move_on_after(1.0):  # a server too busy to accept still holds the path
            await probe.connect(path)
            return True
        return True
    except OSError:
        return False  # ECONNREFUSED: nobody listens; the file is stale
    finally:
        probe.close()


def remove_socket(address: Address | None) -> None:
    """Remove a unix socket file this process created, if it is still that file."""
    if not isinstance(address, UnixAddress):
        return
    created = _CREATED.pop(address.path, None)
    try:
        st = os.lstat(address.path)
    except OSError:
        return
    if created == (st.st_dev, st.st_ino):
        with contextlib.suppress(OSError):
            os.unlink(address.path)


async def _tcp(address: TcpAddress, backlog: int) -> tuple[trio.SocketListener, TcpAddress]:
    infos = await trio.socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    if not infos:
        raise ListenError(f"cannot resolve {address}")
    family, type_, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(sockaddr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    return trio.SocketListener(sock), address.with_port(port)


def adopt_listener(fd: int) -> tuple[trio.SocketListener, Address]:
    """Accept on ``fd``, a socket that is already listening (socket activation).

    Its family (unix or TCP over IPv4/IPv6) is read from the socket itself.  A unix
    socket adopted here is never removed by :func:`remove_socket`: whoever bound it
    (systemd) owns the file.

    Returns:
        The listener (which owns ``fd`` from now on) and the address it listens on.

    Raises:
        ListenError: ``fd`` is not a listening stream socket of those families.
    """
    try:
        sock = socket.socket(fileno=fd)  # family and type from the kernel
    except OSError as exc:
        raise ListenError(f"fd {fd}: {exc.strerror or exc}") from None
    try:
        address = _listening_address(sock, fd)
    except BaseException:
        sock.detach()  # not ours to close: the error is reported, the fd left as it was
        raise
    sock.set_inheritable(False)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock)), address


def _listening_address(sock: socket.socket, fd: int) -> Address:
    if sock.type != socket.SOCK_STREAM:
        raise ListenError(f"fd {fd} is not a stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ListenError(f"fd {fd} is a socket that does not listen")
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if isinstance(name, bytes):  # the abstract namespace: shown as ss and systemd do
            return UnixAddress("@" + name[1:].decode(errors="replace"))
        return UnixAddress(name)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return TcpAddress(name[0], name[1])
    raise ListenError(f"fd {fd} is neither a unix nor a TCP socket")
