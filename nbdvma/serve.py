"""``nbdvma serve``: NBD exports (one per guest disk) into one VMA archive.

An :class:`ArchiveSession` owns the writer, the server, the optional VM-state
listener and the rule that ends the backup:

* a disk is complete when every byte of it has been written (data or zeroes) and no
  client is connected to it any more (QEMU flushes and disconnects when its target
  node is removed); a client that only looks completes nothing;
* the VM state is complete at EOF of the one connection its listener accepts;
* when all are complete the archive is finished (fsync, rename) and the session ends.

``nbdvma backup`` runs the same session in-process on a private unix socket.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence

import attrs
import trio

from nbdvma.addresses import Address, TcpAddress, UnixAddress, parse_address
from nbdvma.backends import Export, NullBackend, VmaBackend
from nbdvma.errors import NbdvmaError
from nbdvma.listeners import open_listener
from nbdvma.pve import archive_configs
from nbdvma.server import ConnectionObserver, NbdServer, ServerLimits
from nbdvma.tls import TlsConfig, TlsMode
from nbdvma.vma.sink import open_sink
from nbdvma.vma.writer import VmaWriter

__all__ = [
    "ArchiveSession",
    "SessionOptions",
    "add_arguments",
    "config_argument",
    "first_error",
    "format_bytes",
    "parse_size",
    "run",
]

log = logging.getLogger(__name__)

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse ``123``, ``64K``, ``1.5G``... (binary suffixes, optional ``iB``/``B``)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = t[-1:] if t[-1:] in _SUFFIXES else ""
    number = t[: len(t) - len(suffix)]
    try:
        value = (
            float(number) * _SUFFIXES[suffix] if "." in number else int(number) * _SUFFIXES[suffix]
        )
    except ValueError:
        raise ValueError(f"invalid size {text!r} (bytes, or with a K/M/G/T suffix)") from None
    if value <= 0 or value != int(value):
        raise ValueError(f"invalid size {text!r}: must be a positive whole number of bytes")
    return int(value)


def format_bytes(n: float) -> str:
    """``860.0 MiB``, as vzdump prints sizes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError  # pragma: no cover


@attrs.frozen
class SessionOptions:
    """Everything a session needs: what ``nbdvma serve``'s options say."""

    archive: str
    disks: tuple[tuple[str, int], ...]
    configs: tuple[tuple[str, bytes], ...] = ()
    vmstate: Address | None = None
    listen: tuple[Address, ...] = (TcpAddress("127.0.0.1", 10809),)
    compress: str | None = None
    backend: str = "vma"
    unix_mode: int = 0o600
    limits: ServerLimits = attrs.Factory(ServerLimits)
    #: Header estimate of the VM-state size, until finish knows the real one.
    vmstate_size_hint: int = 65536
    #: TLS for the NBD listeners (``--tls``...); off by default.
    tls: TlsConfig = attrs.Factory(TlsConfig)


class _Observer(ConnectionObserver):
    def __init__(self, session: ArchiveSession) -> None:
        self.session = session

    def transmission_started(self, export: str) -> None:
        self.session.active[export] += 1

    def connection_ended(self, export: str) -> None:
        self.session.active[export] -= 1
        self.session.check_complete()


class ArchiveSession:
    """One archive being written through NBD (and a VM-state socket)."""

    def __init__(self, options: SessionOptions) -> None:
        """Open the archive (as ``ARCHIVE.part``) and register every device.

        Raises:
            NbdvmaError: bad options or an existing archive.
            OSError: the archive cannot be created.
        """
        self.options = options
        # Certificates first: a bad one must not leave an archive behind.
        ssl_context = options.tls.server_context()
        self.active: dict[str, int] = {name: 0 for name, _ in options.disks}
        self.done = trio.Event()
        self.vmstate_done = options.vmstate is None
        self.listening: list[Address] = []
        self.vmstate_address: Address | None = None
        self.writer: VmaWriter | None = None
        self._vmstate_id = 0
        self._started = time.monotonic()
        exports = [Export(name, size) for name, size in options.disks]
        if options.backend == "null":
            self.backend: VmaBackend | NullBackend = NullBackend(exports)
            self.vma: VmaBackend | None = None
        elif options.backend == "vma":
            writer = VmaWriter(open_sink(options.archive, options.compress))
            try:
                for name, data in options.configs:
                    writer.add_config(name, data)
                devices = {name: writer.add_device(name, size) for name, size in options.disks}
                if options.vmstate is not None:
                    self._vmstate_id = writer.add_stream(size_hint=options.vmstate_size_hint)
            except BaseException:
                writer.abort()
                _remove_part(options.archive)
                raise
            self.writer = writer
            self.vma = VmaBackend(writer, devices)
            self.backend = self.vma
        else:
            raise NbdvmaError(f"unknown backend {options.backend!r} (vma or null)")
        self.server = NbdServer(
            self.backend,
            limits=options.limits,
            observer=_Observer(self),
            tls_mode=options.tls.mode,
            ssl_context=ssl_context,
        )

    def check_complete(self) -> None:
        """Set :attr:`done` once every disk and the VM state are complete."""
        if self.vma is None or not self.vmstate_done:
            return
        for name in self.active:
            if self.active[name] or not self.vma.progress(name).complete:
                return
        self.done.set()

    def incomplete(self) -> list[str]:
        """Names of what is not complete yet (disks, then ``vmstate``)."""
        out = []
        for name in self.active:
            if self.vma is None or not self.vma.progress(name).complete or self.active[name]:
                out.append(name)
        if not self.vmstate_done:
            out.append("vmstate")
        return out

    async def start(self, nursery: trio.Nursery) -> None:
        """Open the listeners and serve in ``nursery``; returns once listening."""
        listeners = []
        for address in self.options.listen:
            listener, real = await open_listener(address, unix_mode=self.options.unix_mode)
            listeners.append(listener)
            self.listening.append(real)
            if _exposed(listener) and self.options.tls.mode is not TlsMode.REQUIRE:
                _warn(
                    f"{real} is reachable from other hosts without --tls require: "
                    "whoever connects can read and write the backup (see docs/security.md)"
                )
        await nursery.start(self.server.serve, listeners)
        if self.options.vmstate is not None:
            listener, real = await open_listener(
                self.options.vmstate, unix_mode=self.options.unix_mode
            )
            self.vmstate_address = real
            if _exposed(listener):
                _warn(f"--vmstate {real} is reachable from other hosts and never encrypted")
            nursery.start_soon(self._receive_vmstate, listener)

    async def _receive_vmstate(self, listener: trio.SocketListener) -> None:
        async with listener:
            stream = await listener.accept()
        async with stream:
            while data := await stream.receive_some(1 << 20):
                if self.vma is not None:
                    async with self.vma.lock:
                        self.vma.writer.append(self._vmstate_id, data)
        self.vmstate_done = True
        log.info("vmstate: complete")
        self.check_complete()

    async def finish(self) -> None:
        """Finish the archive: the last extents, fsync, rename to the final name."""
        if self.vma is not None:
            async with self.vma.lock:
                await trio.to_thread.run_sync(self.vma.writer.finish)

    def remove_sockets(self) -> None:
        """Remove the unix socket files this session created."""
        for address in [*self.listening, self.vmstate_address]:
            if isinstance(address, UnixAddress):
                with contextlib.suppress(OSError):
                    os.unlink(address.path)

    def abort(self) -> None:
        """Leave the archive incomplete under ``ARCHIVE.part``.

        A ``.part`` that never received anything (a failure at start-up) is removed.
        """
        if self.writer is not None:
            self.writer.abort()
            if not self.writer.has_output:
                _remove_part(self.options.archive)

    def vmstate_bytes(self) -> int:
        """Bytes of VM state received so far (0 without a VM-state stream)."""
        if self.writer is None or not self._vmstate_id:
            return 0
        return self.writer.progress(self._vmstate_id).written

    def progress_lines(self) -> list[str]:
        """One line per disk: ``drive-scsi0: 42% (860.0 MiB of 2.0 GiB)``."""
        lines: list[str] = []
        if self.vma is None:
            return lines
        for name in self.active:
            p = self.vma.progress(name)
            pct = int(100 * p.written / p.size)
            lines.append(f"{name}: {pct}% ({format_bytes(p.written)} of {format_bytes(p.size)})")
        if self.options.vmstate is not None and self.writer is not None:
            p = self.writer.progress(self._vmstate_id)
            state = "complete" if self.vmstate_done else "receiving"
            lines.append(f"vmstate: {format_bytes(p.written)} ({state})")
        return lines

    def summary_lines(self) -> list[str]:
        """Per disk: size, zero bytes, stored bytes; then the archive and the duration."""
        lines: list[str] = []
        if self.vma is None:
            return lines
        for name in self.active:
            p = self.vma.progress(name)
            lines.append(
                f"{name}: size {format_bytes(p.size)}, zero {format_bytes(p.zero_bytes)}, "
                f"stored {format_bytes(p.stored_bytes)}"
            )
        if self.options.archive != "-" and os.path.exists(self.options.archive):
            size = os.path.getsize(self.options.archive)
            lines.append(f"archive {self.options.archive}: {format_bytes(size)}")
        lines.append(f"duration {time.monotonic() - self._started:.1f}s")
        return lines


def _exposed(listener: trio.SocketListener) -> bool:
    """Whether a listener is a TCP socket bound to a non-loopback address."""
    name = listener.socket.getsockname()
    if not isinstance(name, tuple):
        return False  # a unix socket: guarded by its file mode
    return not ipaddress.ip_address(name[0]).is_loopback


def _warn(message: str) -> None:
    print(f"nbdvma serve: warning: {message}", file=sys.stderr, flush=True)


def _remove_part(archive: str) -> None:
    """Remove the empty ``.part`` of an archive that never got any data."""
    if archive != "-":
        with contextlib.suppress(OSError):
            os.unlink(archive + ".part")


async def _report_progress(session: ArchiveSession, interval: float) -> None:
    last: list[str] = []
    while True:
        await trio.sleep(interval)
        lines = session.progress_lines()
        if lines != last:
            for line in lines:
                print(f"nbdvma serve: {line}", file=sys.stderr, flush=True)
            last = lines


#: Seconds between attempts to finish an archive whose file system is full.
FINISH_RETRY_INTERVAL = 1.0


async def _finish_when_space(session: ArchiveSession) -> None:
    """Finish the archive; while its file system is full, say so once and retry.

    Every client is done by now, so nothing is lost by waiting: the writer's finish
    is retryable after an ``OSError``, and an administrator can free space (or stop
    ``serve`` with a signal, which leaves ``ARCHIVE.part``).
    """
    warned = False
    while True:
        try:
            await session.finish()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if not warned:
                print(
                    "nbdvma serve: no space left to finish the archive; retrying "
                    f"every {FINISH_RETRY_INTERVAL:g}s (free space, or stop with a signal)",
                    file=sys.stderr,
                    flush=True,
                )
                warned = True
            await trio.sleep(FINISH_RETRY_INTERVAL)
        else:
            if warned:
                print("nbdvma serve: space available again; archive finished", file=sys.stderr)
            return


async def run_session(options: SessionOptions, *, progress_interval: float = 2.0) -> int:
    """Run ``serve`` until the archive is complete or a signal arrives; return the exit status."""
    session = ArchiveSession(options)
    interrupted: int | None = None
    try:
        # The signal receiver is open before the listening lines are printed: a
        # supervisor that signals as soon as it sees them must get the clean
        # "interrupted" exit, not a KeyboardInterrupt traceback or a bare SIGTERM death.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    nonlocal interrupted
                    async for signum in signals:
                        interrupted = signum
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(on_signal)
                await session.start(nursery)
                for address in session.listening:
                    print(f"nbdvma serve: listening on {address}", file=sys.stderr, flush=True)
                if session.vmstate_address is not None:
                    print(
                        f"nbdvma serve: vmstate on {session.vmstate_address}",
                        file=sys.stderr,
                        flush=True,
                    )
                nursery.start_soon(_report_progress, session, progress_interval)
                await session.done.wait()
                await _finish_when_space(session)
                nursery.cancel_scope.cancel()
    except BaseException:
        session.abort()
        raise
    finally:
        session.remove_sockets()
    # A signal during finish() does not stop it (it runs in a thread): then the archive
    # is complete after all, and that is what to report.
    if interrupted is not None and not (session.writer is not None and session.writer.finished):
        session.abort()
        name = signal.Signals(interrupted).name
        if session.vma is None:
            print(f"nbdvma serve: stopped by {name}", file=sys.stderr)
            return 0
        where = options.archive + ".part" if options.archive != "-" else "the output stream"
        print(
            f"nbdvma serve: interrupted by {name}; the archive is incomplete and left as {where}; "
            f"incomplete: {', '.join(session.incomplete()) or 'nothing (not finalized)'}",
            file=sys.stderr,
        )
        return 128 + interrupted
    for line in session.summary_lines():
        print(f"nbdvma serve: {line}", file=sys.stderr)
    return 0


def _disk(text: str) -> tuple[str, int]:
    name, sep, size = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE, got {text!r}")
    try:
        return name, parse_size(size)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def config_argument(text: str) -> tuple[str | None, str]:
    """``--config [NAME=]FILE`` → ``(NAME, FILE)``; NAME is ``None`` when not given
    (:func:`nbdvma.pve.archive_configs` chooses it)."""
    name, sep, path = text.partition("=")
    if not sep or "/" in name:
        return None, text
    return name, path


def read_configs(
    args: Sequence[tuple[str | None, str]],
) -> list[tuple[str | None, str, bytes]]:
    """Read the files of ``--config`` options.

    Raises:
        NbdvmaError: one cannot be read (the message names it and why).
    """
    items = []
    for name, path in args:
        try:
            with open(path, "rb") as f:
                items.append((name, path, f.read()))
        except OSError as exc:
            raise NbdvmaError(f"config {path}: {exc.strerror or exc}") from None
    return items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``nbdvma serve``."""
    parser.add_argument(
        "archive", metavar="ARCHIVE", help="the VMA archive to write ('-' = stdout)"
    )
    parser.add_argument(
        "--disk",
        action="append",
        required=True,
        type=_disk,
        metavar="NAME=SIZE",
        help="an export (guest disk) of SIZE bytes (K/M/G/T suffixes); repeatable",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        type=config_argument,
        metavar="[NAME=]FILE",
        help="store FILE in the archive as config NAME (default: its basename)",
    )
    parser.add_argument(
        "--vmstate",
        type=parse_address,
        metavar="unix:PATH|tcp:HOST:PORT",
        help="accept one connection here and store what it sends as the VM state",
    )
    parser.add_argument(
        "--listen",
        action="append",
        type=parse_address,
        metavar="unix:PATH|tcp:HOST:PORT",
        help="where to accept NBD clients (repeatable; default tcp:127.0.0.1:10809)",
    )
    parser.add_argument("--compress", choices=["zstd"], help="compress the archive with zstd")
    parser.add_argument("--backend", choices=["vma", "null"], default="vma")
    parser.add_argument(
        "--socket-mode",
        type=lambda s: int(s, 8),
        default=0o600,
        metavar="MODE",
        help="permissions of unix sockets (octal, default 0600)",
    )
    parser.add_argument(
        "--max-connections", type=int, default=100, help="connection cap (default 100)"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log every connection (peer, export, how it ended) on stderr",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="drop a client that has not finished the handshake by then (default 10)",
    )

    parser.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=math.inf,
        metavar="SECONDS",
        help="drop a client that sends nothing for this long with no request in flight "
        "(default: never)",
    )
    tls = parser.add_argument_group("TLS (NBD_OPT_STARTTLS, X.509; see docs/security.md)")
    tls.add_argument(
        "--tls",
        choices=[m.value for m in TlsMode],
        default=TlsMode.OFF.value,
        help="off: refuse STARTTLS; on: offer TLS, allow plain text; "
        "require: nothing works before TLS (default off)",
    )
    tls.add_argument("--tls-cert", metavar="PEM", help="the server certificate (chain)")
    tls.add_argument("--tls-key", metavar="PEM", help="its private key (unencrypted)")
    tls.add_argument("--tls-ca", metavar="PEM", help="the CA that signs client certificates")
    tls.add_argument(
        "--tls-verify-client",
        action="store_true",
        help="require a client certificate signed by --tls-ca",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Run ``nbdvma serve`` from parsed arguments."""
    try:
        configs, _, warnings = archive_configs(
            read_configs(args.config), [name for name, _ in args.disk]
        )
    except (NbdvmaError, ValueError) as exc:
        print(f"nbdvma serve: {exc}", file=sys.stderr)
        return 1
    for warning in warnings:
        _warn(warning)
    options = SessionOptions(
        archive=args.archive,
        disks=tuple(args.disk),
        configs=tuple(configs),
        vmstate=args.vmstate,
        listen=tuple(args.listen or (TcpAddress("127.0.0.1", 10809),)),
        compress=args.compress,
        backend=args.backend,
        unix_mode=args.socket_mode,
        tls=TlsConfig(
            mode=TlsMode(args.tls),
            cert=args.tls_cert,
            key=args.tls_key,
            ca=args.tls_ca,
            verify_client=args.tls_verify_client,
        ),
        limits=ServerLimits(
            idle_timeout=args.idle_timeout,
            max_connections=args.max_connections,
            handshake_timeout=args.handshake_timeout,
        ),
    )
    names = [name for name, _ in options.disks]
    if len(set(names)) != len(names):
        raise NbdvmaError("each --disk needs a different name")
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.INFO, format="nbdvma serve: %(message)s")
    try:
        return trio.run(run_session, options)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a nursery's exception group: its first leaf.

    trio wraps whatever fails inside a nursery in a group; the CLI reports one line.
    """
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nbdvma.serve``: for tests and debugging."""
    parser = argparse.ArgumentParser(prog="nbdvma serve")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
