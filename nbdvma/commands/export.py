"""``nbdvma export``: an archive's disks as read-only NBD exports, until stopped.

The archive is read once first, to check it (as ``verify`` does) and index where each
cluster lies (:mod:`nbdvma.vma.index`), with a progress line every few seconds; a
damaged archive is refused before anything listens.  Then the command listens as
``serve`` does (same listener, access and TLS options), prints ``export ready``, and
serves until SIGINT or SIGTERM.

Exit status: 0 when stopped by a signal once ready (its normal end); 128 + N when a
signal stops it before (while indexing), as ``serve`` reports an interrupted run;
1 for any error.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import time
from collections.abc import Awaitable, Callable

import trio

from nbdvma.addresses import Address, TcpAddress
from nbdvma.archive_backend import ArchiveBackend, prepare
from nbdvma.commands.common import (
    activated_sockets,
    add_access_options,
    add_listen_options,
    log_to_stderr,
    run_reporting,
    server_limits,
    tls_config,
)
from nbdvma.commands.s3opts import add_s3_endpoint_option
from nbdvma.errors import NbdvmaError, QmpConnectError, VmaFormatError
from nbdvma.listeners import remove_socket
from nbdvma.pidfile import pid_file
from nbdvma.server import NbdServer
from nbdvma.session import SessionOptions, open_nbd_listeners
from nbdvma.signals import stop_on_signals
from nbdvma.units import format_bytes
from nbdvma.vma.index import IndexedArchive

__all__ = ["add_arguments", "export", "live_restore", "ready_line", "run"]

PREFIX = "nbdvma export: "


def _say(message: str) -> None:
    print(f"{PREFIX}{message}", file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``nbdvma export``."""
    parser.add_argument(
        "archive",
        metavar="ARCHIVE",
        help="the archive (.vma, .vma.zst, .vma.gz, .vma.lzo; not stdin), or "
        "s3://BUCKET/KEY (see --s3-endpoint)",
    )
    parser.add_argument(
        "--device",
        action="append",
        metavar="NAME",
        help="export only this disk (repeatable; default: every disk)",
    )
    parser.add_argument(
        "--cache",
        metavar="DIR",
        help="where to decompress an archive that cannot be read in place (default: "
        "next to it; for s3://, the system's temporary directory, TMPDIR; removed at exit)",
    )
    add_s3_endpoint_option(parser)
    add_listen_options(parser, "export")
    add_access_options(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``nbdvma export`` from parsed arguments; return the exit status.

    Every error that ends it is one line on stderr with the command's prefix.
    """
    log_to_stderr(PREFIX, verbose=args.verbose)
    return run_reporting(_say, functools.partial(_run, args))


def _run(args: argparse.Namespace) -> int:
    activated = activated_sockets(args.listen, "export")
    options = SessionOptions(
        archive=args.archive,
        disks=(),
        listen=() if activated else tuple(args.listen or (TcpAddress("127.0.0.1", 10809),)),
        listen_fds=activated,
        unix_mode=args.socket_mode,
        tls=tls_config(args),
        limits=server_limits(args),
    )
    return trio.run(
        functools.partial(
            export,
            options,
            args.device,
            args.cache,
            args.pid_file,
            s3_endpoint=args.s3_endpoint,
        )
    )


def ready_line(archive: IndexedArchive, seconds: float) -> str:
    """``export ready: 2 devices (drive-scsi0 32.0 GiB, ...); index 4.0 MiB, read in 3.2s``."""
    disks = archive.index.disks
    names = ", ".join(f"{n} {format_bytes(d.dev.size)}" for n, d in disks.items())
    return (
        f"export ready: {len(disks)} device{'s' if len(disks) != 1 else ''} ({names}); "
        f"index {format_bytes(archive.index.nbytes)}, archive read in {seconds:.1f}s"
    )


async def export(
    options: SessionOptions,
    devices: list[str] | None,
    cache: str | None,
    pid_path: str | None = None,
    then: Callable[[list[Address]], Awaitable[None]] | None = None,
    *,
    s3_endpoint: str | None = None,
) -> int:
    """Index the archive, then serve it until a signal (or, with ``then``, until that
    returns, given the addresses listened on); the exit status.

    ``options.archive`` may be ``s3://BUCKET/KEY``, read from ``s3_endpoint`` (default:
    the environment's endpoint).
    """
    ssl_context = options.tls.server_context()  # bad certificates: before the long read
    archive: IndexedArchive | None = None
    addresses: list[Address] = []
    started = time.monotonic()
    finished = False
    try:
        async with trio.open_nursery() as nursery, stop_on_signals(nursery.cancel_scope) as stop:
            try:
                archive = await prepare(
                    nursery, options.archive, devices, cache, _say, s3_endpoint=s3_endpoint
                )
            except VmaFormatError as exc:
                raise NbdvmaError(f"{options.archive}: {exc}; not exported") from None
            listeners, real = await open_nbd_listeners(options, read_only=True)
            addresses.extend(real)
            server = NbdServer(
                ArchiveBackend(archive),
                limits=options.limits,
                tls_mode=options.tls.mode,
                ssl_context=ssl_context,
            )
            await nursery.start(server.serve, listeners)
            for address in real:
                _say(f"listening on {address}")
            with pid_file(pid_path):
                # Ready once the pid file is there: a script that waits for either can
                # connect at once.
                _say(ready_line(archive, time.monotonic() - started))
                if then is None:
                    await trio.sleep_forever()
                await then(real)
                nursery.cancel_scope.cancel()
                finished = True
    finally:
        for address in addresses:
            remove_socket(address)
        if archive is not None:
            archive.close()
    if finished:
        return 0
    if archive is None or not addresses or then is not None:
        what = "the export was ready" if then is None else "the disks were streamed"
        _say(f"interrupted by {stop.name} before {what}")
        return 128 + (stop.signum or signal.SIGINT)
    _say(f"stopped by {stop.name}")
    return 0


def live_restore(
    archive: str, qmp: str, listen: list[str], *, s3_endpoint: str | None = None
) -> int:
    """``nbdvma restore --live``: export ``archive`` on ``listen``, then stream it into
    the overlays of the VM behind ``qmp`` (:mod:`nbdvma.live_restore`); the exit status.

    Lines are prefixed ``nbdvma restore:``; every error is one of them.
    """
    from nbdvma.addresses import parse_address
    from nbdvma.live_restore import stream_overlays
    from nbdvma.qmp import QmpClient

    def say(line: str) -> None:
        print(f"nbdvma restore: {line}", file=sys.stderr, flush=True)

    async def stream(qmp_address: Address, addresses: list[Address]) -> None:
        waited = 0.0
        while True:  # QEMU is started once the export is ready: wait for its QMP
            try:
                async with QmpClient.connect(qmp_address) as client:
                    streamed = await stream_overlays(client, addresses, say)
                    break
            except QmpConnectError:
                if waited % 30 == 0:
                    say(f"waiting for QEMU's QMP at {qmp_address} (start the VM on its overlays)")
                await trio.sleep(0.5)
                waited += 0.5
        say(
            f"{len(streamed)} disk(s) streamed into their overlays; the VM no longer needs "
            "the export"
        )

    def body() -> int:
        options = SessionOptions(
            archive=archive,
            disks=(),
            listen=tuple(parse_address(a) for a in listen),
        )
        then = functools.partial(stream, parse_address(qmp))
        return trio.run(
            functools.partial(export, options, None, None, None, then, s3_endpoint=s3_endpoint)
        )

    log_to_stderr("nbdvma restore: ", verbose=False)
    return run_reporting(say, body)
