"""``--run CMD``: a command that runs while the server listens (nbdkit's captive mode).

The command runs through ``/bin/sh -c`` with the server's addresses in its environment,
under the names nbdkit gives them (``nbdkit-captive(1)``), so that the shell expands
them wherever the command says ``"$uri"``:

``uri``, ``nbd``
    The NBD URI of the first export on the first listener (``nbd://127.0.0.1:10809/d0``,
    ``nbd+unix:///d0?socket=/run/s.sock``; ``nbds``/``nbds+unix`` when TLS is required).
    ``nbd`` is the same URI, as in nbdkit since 1.24 (before, it was QEMU's legacy
    ``nbd:unix:PATH`` syntax); every client here takes URIs.
``exportname``
    That export's name (the first ``--disk``).
``unixsocket`` / ``port``
    The path of the first unix listener / the port of the first TCP one; empty if none.
``tls``
    ``1`` with TLS offered, ``2`` with TLS required; unset without TLS.

The command inherits stdin, stdout and stderr (its stdout goes to stderr when the
archive is written to stdout: it must not mix into the archive), and stays in the
server's process group,
so that it can be interactive (``nbdsh``) and a Ctrl-C reaches it too.  When the server
stops it (a signal), :class:`CaptiveCommand` sends SIGTERM to the command *and every
process it started* (found through ``/proc``: a shell running a script does not pass
the signal on, and its children would be left behind), then SIGKILL after
:data:`KILL_AFTER` seconds.  This module prints nothing; ``nbdvma serve`` reports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import urllib.parse
from collections.abc import Mapping, Sequence

import attrs
import trio

from nbdvma.addresses import Address, TcpAddress, UnixAddress
from nbdvma.nbd import TlsMode
from nbdvma.session import ExportSession

__all__ = [
    "KILL_AFTER",
    "SETTLE_TIMEOUT",
    "CaptiveCommand",
    "captive_environment",
    "nbd_uri",
    "start_command",
    "until_complete",
]

#: Seconds a stopped command gets between SIGTERM and SIGKILL.
KILL_AFTER = 5.0
#: Seconds to wait, after the command has exited, for the connections it made to end.
SETTLE_TIMEOUT = 5.0
#: The variables this module sets (or unsets): every one is replaced, never inherited.
VARIABLES = ("uri", "nbd", "exportname", "unixsocket", "port", "tls")

# A listener bound to every address is reached through loopback from this host.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def nbd_uri(address: Address, export: str, *, tls: bool = False) -> str:
    """The NBD URI of ``export`` at ``address`` (NBD URI spec, ``doc/uri.md``).

    Args:
        address: where the server listens (a wildcard host becomes loopback).
        export: the export name; percent-encoded into the URI's path.
        tls: ``nbds``/``nbds+unix``, which make a client insist on TLS.
    """
    path = urllib.parse.quote(export)
    if isinstance(address, UnixAddress):
        scheme = "nbds+unix" if tls else "nbd+unix"
        return f"{scheme}:///{path}?socket={urllib.parse.quote(address.path)}"
    host = _WILDCARDS.get(address.host, address.host)
    if ":" in host:
        host = f"[{host}]"
    return f"{'nbds' if tls else 'nbd'}://{host}:{address.port}/{path}"


def captive_environment(
    listening: Sequence[Address],
    export: str,
    tls: TlsMode,
    base: Mapping[str, str],
) -> dict[str, str]:
    """``base`` with the variables of the module's docstring for the command.

    Args:
        listening: the server's listeners, as they really listen (ports resolved).
        export: the export ``$uri`` names (the first disk).
        tls: the server's TLS mode.
        base: the environment to extend (normally ``os.environ``).
    """
    env = {k: v for k, v in base.items() if k not in VARIABLES}
    unix = next((a for a in listening if isinstance(a, UnixAddress)), None)
    tcp = next((a for a in listening if isinstance(a, TcpAddress)), None)
    uri = nbd_uri(listening[0], export, tls=tls is TlsMode.REQUIRE) if listening else ""
    env.update(
        uri=uri,
        nbd=uri,
        exportname=export,
        unixsocket=unix.path if unix is not None else "",
        port=str(tcp.port) if tcp is not None else "",
    )
    if tls is not TlsMode.OFF:
        env["tls"] = "2" if tls is TlsMode.REQUIRE else "1"
    return env


@attrs.define(eq=False)
class CaptiveCommand:
    """One ``--run`` command: run it with :meth:`run` in a nursery.

    Attributes:
        command: the shell command line.
        env: its whole environment.
        exited: set once the command has exited (by itself or stopped).
        returncode: its status as :mod:`subprocess` gives it (negative: killed by
            that signal); ``None`` while it runs.
        stopped: whether the server stopped it (rather than it ending by itself).
        stdout: the fd its stdout is (``None``: inherited).
    """

    command: str
    env: Mapping[str, str]
    stdout: int | None = None
    exited: trio.Event = attrs.field(factory=trio.Event)
    returncode: int | None = None
    stopped: bool = False

    @property
    def status(self) -> int:
        """The exit status a shell would report: 128 + N when killed by signal N."""
        assert self.returncode is not None
        return 128 - self.returncode if self.returncode < 0 else self.returncode

    def describe(self) -> str:
        """``exited with status 7``, ``was killed by SIGKILL``."""
        assert self.returncode is not None
        if self.returncode < 0:
            return f"was killed by {_signal_name(-self.returncode)}"
        return f"exited with status {self.returncode}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the command (``task_status.started()`` once it runs), wait for it.

        Cancelled, it stops the command and every process it started (SIGTERM, then
        SIGKILL after :data:`KILL_AFTER` s) and waits for it before returning.

        Raises:
            OSError: ``/bin/sh`` cannot be started.
        """
        # stdin/stderr are inherited (None), as the command is the user's.
        process = await trio.lowlevel.open_process(
            ["/bin/sh", "-c", self.command], env=self.env, stdout=self.stdout
        )
        task_status.started()
        try:
            await process.wait()
        except BaseException:
            with trio.CancelScope(shield=True):
                self.stopped = True
                _signal_tree(process.pid, signal.SIGTERM)
                with trio.move_on_after(KILL_AFTER):
                    await process.wait()
                if process.returncode is None:
                    _signal_tree(process.pid, signal.SIGKILL)
                    await process.wait()
            raise
        finally:
            self.returncode = process.returncode
            self.exited.set()


async def start_command(
    nursery: trio.Nursery,
    command: str | None,
    listening: Sequence[Address],
    export: str,
    tls: TlsMode,
    *,
    stdout: int | None = None,
) -> CaptiveCommand | None:
    """Start ``command`` (if any) in ``nursery``, with the server's addresses in its
    environment (:func:`captive_environment` of ``os.environ``) and ``stdout`` as its
    stdout (``None``: inherited); returns once it runs.

    Raises:
        OSError: ``/bin/sh`` cannot be started.
    """
    if command is None:
        return None
    env = captive_environment(listening, export, tls, os.environ)
    captive = CaptiveCommand(command, env, stdout=stdout)
    await nursery.start(captive.run)
    return captive


async def until_complete(session: ExportSession, command: CaptiveCommand | None) -> None:
    """Wait until every disk is complete (:attr:`ExportSession.done`), or until
    ``command`` has exited and the connections it made are gone: what its clients sent
    before they exited is in the archive then, and a disk they completed counts."""
    if command is None:
        await session.done.wait()
        return
    async with trio.open_nursery() as nursery:

        async def complete() -> None:
            await session.done.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(complete)
        await command.exited.wait()
        # The server learns of a client's end only after the client has exited.  No
        # event marks the end of the last connection (one may never have reached
        # transmission), so poll, briefly and only now.
        with trio.move_on_after(SETTLE_TIMEOUT):
            while session.server.connections or any(session.active.values()):  # noqa: ASYNC110
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _signal_tree(pid: int, signum: int) -> None:
    """Send ``signum`` to ``pid`` and all its descendants (gathered first: a child
    whose parent dies is re-parented and could not be found any more)."""
    for target in [pid, *_descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):  # it has just exited
            os.kill(target, signum)


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid``, from the parent pids in ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue  # gone meanwhile
            # "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
            fields = stat[stat.rfind(b")") + 2 :].split()
            if len(fields) > 1:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found
