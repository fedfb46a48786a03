"""Run ``nbdvma serve`` as a subprocess for the interop tests.

:func:`start_serve` starts ``python -m nbdvma serve`` with the given disks and
listeners, waits (with a deadline) for its ``nbdvma serve: listening on ADDR`` lines on
stderr and returns a :class:`ServeProcess` that knows the resolved addresses.  The
context manager :func:`serving` always kills the process at the end, whatever the test
did.  stderr goes to a file (never a pipe nobody reads, which could block the server).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import attrs

#: Seconds to wait for the listening lines.
START_TIMEOUT = 20.0
#: Seconds to wait for a server to exit by itself once its disks are written.
EXIT_TIMEOUT = 30.0

_LISTEN = re.compile(r"^nbdvma serve: listening on (unix|tcp):(.+)$", re.MULTILINE)
_VMSTATE = re.compile(r"^nbdvma serve: vmstate on (unix|tcp):(.+)$", re.MULTILINE)


class ServeError(AssertionError):
    """``serve`` did not start, or did not exit as expected (its stderr is in the text)."""


@attrs.define(eq=False)
class ServeProcess:
    """A running ``nbdvma serve``.

    Attributes:
        process: the child.
        archive: the archive path given (``-`` for stdout).
        stderr_path: where its stderr goes.
        unix: the unix socket path it listens on, if any.
        tcp_port: the TCP port on 127.0.0.1 it listens on, if any.
        vmstate: the ``--vmstate`` address it printed, if any (``unix:...``/``tcp:...``).
    """

    process: subprocess.Popen[bytes]
    archive: str
    stderr_path: Path
    unix: str | None = None
    tcp_port: int | None = None
    vmstate: str | None = None

    def uri(self, export: str, transport: str = "unix") -> str:
        """An NBD URI for ``export`` over ``"unix"`` or ``"tcp"``."""
        if transport == "unix":
            assert self.unix is not None, "serve has no unix listener"
            return f"nbd+unix:///{export}?socket={self.unix}"
        assert self.tcp_port is not None, "serve has no TCP listener"
        return f"nbd://127.0.0.1:{self.tcp_port}/{export}"

    def stderr(self) -> str:
        """Everything it wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Wait for it to exit by itself; fail (and kill it) after ``timeout`` s."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ServeError(
                f"nbdvma serve did not exit within {timeout} s:\n{self.stderr()}"
            ) from None

    def signal(self, signum: int) -> None:
        """Send ``signum`` (SIGINT, SIGTERM...)."""
        self.process.send_signal(signum)

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL it and reap it; harmless if it already exited."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def serve_command(
    archive: str | os.PathLike[str],
    disks: Mapping[str, int],
    listen: Sequence[str],
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of ``python -m nbdvma serve``."""
    cmd = [sys.executable, "-m", "nbdvma", "serve", os.fspath(archive)]
    for name, size in disks.items():
        cmd += ["--disk", f"{name}={size}"]
    for address in listen:
        cmd += ["--listen", address]
    return [*cmd, *extra]


#: The ``serve`` fixture (tests/conftest.py): ``serve(disks, extra, **kw) -> ServeProcess``.
StartServe = Callable[..., "ServeProcess"]


def start_serve(
    archive: str | os.PathLike[str],
    disks: Mapping[str, int],
    *,
    sockdir: Path,
    logdir: Path,
    unix: bool = True,
    tcp: bool = True,
    extra: Sequence[str] = (),
    stdout: int | IO[bytes] = subprocess.DEVNULL,
    timeout: float = START_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> ServeProcess:
    """Start ``serve`` and wait until it listens on every requested address.

    Args:
        archive: the archive path (or ``-``).
        disks: export name -> size.
        sockdir: a short directory for the unix socket (``serve.sock``).
        logdir: where stderr is written (``serve-N.err``).
        unix / tcp: which listeners to ask for (TCP on 127.0.0.1 port 0).
        extra: more options (``--vmstate ...``, ``--backend null``...).
        stdout: the child's stdout (``subprocess.PIPE`` for ``serve -``).
        timeout: seconds to wait for the listening lines.
        env: the child's environment (default: this process's).

    Raises:
        ServeError: it exited or did not print its listening lines in time (it is
            killed first).
    """
    listen = []
    if unix:
        listen.append(f"unix:{sockdir / 'serve.sock'}")
    if tcp:
        listen.append("tcp:127.0.0.1:0")
    n = len(list(logdir.glob("serve-*.err")))
    stderr_path = logdir / f"serve-{n}.err"
    with stderr_path.open("wb") as err:
        process = subprocess.Popen(
            serve_command(archive, disks, listen, extra),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=err,
            env=env,
        )
    serve = ServeProcess(process, os.fspath(archive), stderr_path)
    want_vmstate = "--vmstate" in extra
    deadline = time.monotonic() + timeout
    while True:
        text = serve.stderr()
        found = _LISTEN.findall(text)
        vm = _VMSTATE.search(text)
        if len(found) >= len(listen) and (vm is not None or not want_vmstate):
            break
        if process.poll() is not None:
            raise ServeError(f"nbdvma serve exited with {process.returncode} at start:\n{text}")
        if time.monotonic() > deadline:
            serve.kill()
            raise ServeError(f"nbdvma serve not listening after {timeout} s:\n{text}")
        time.sleep(0.01)
    for kind, where in found:
        if kind == "unix":
            serve.unix = where
        else:
            serve.tcp_port = int(where.rsplit(":", 1)[1])
    if vm is not None:
        serve.vmstate = f"{vm.group(1)}:{vm.group(2)}"
    return serve


@contextmanager
def serving(
    archive: str | os.PathLike[str],
    disks: Mapping[str, int],
    *,
    sockdir: Path,
    logdir: Path,
    **kwargs: object,
) -> Iterator[ServeProcess]:
    """:func:`start_serve` as a context manager that always kills the server."""
    serve = start_serve(archive, disks, sockdir=sockdir, logdir=logdir, **kwargs)  # type: ignore[arg-type]
    try:
        yield serve
    finally:
        serve.kill()


def run_tool(
    args: Sequence[str], *, timeout: float = 60.0, check: bool = True, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run a client program with a deadline; on failure, fail with its output."""
    try:
        result = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,  # type: ignore[call-overload]
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{args[0]} timed out after {timeout} s: {exc.stderr!r}") from None
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited with {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


def nbdvma(
    *args: str,
    timeout: float = 60.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the ``nbdvma`` CLI (``extract``, ``verify``, ``list``) of this checkout."""
    return run_tool([sys.executable, "-m", "nbdvma", *args], timeout=timeout, check=check, env=env)


def extract_disks(archive: Path, into: Path) -> dict[str, bytes]:
    """``nbdvma extract`` the archive and return ``{device name: contents}``."""
    nbdvma("extract", os.fspath(archive), os.fspath(into))
    out = {}
    for path in sorted(into.glob("disk-*.raw")):
        out[path.name.removeprefix("disk-").removesuffix(".raw")] = path.read_bytes()
    return out


def poll_until(predicate: object, timeout: float, what: str, interval: float = 0.01) -> None:
    """Poll ``predicate()`` until true; fail with ``what`` after ``timeout`` s."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


__all__ = [
    "EXIT_TIMEOUT",
    "START_TIMEOUT",
    "ServeError",
    "ServeProcess",
    "extract_disks",
    "nbdvma",
    "poll_until",
    "run_tool",
    "serve_command",
    "serving",
    "start_serve",
]
