"""``nbdvma serve``: NBD exports (one per guest disk) into one VMA archive.

The command runs one :class:`~nbdvma.session.ArchiveSession` until the archive is
complete, printing where it listens, progress per disk and a summary on stderr (every
line prefixed ``nbdvma serve:``).  SIGINT/SIGTERM leave ``ARCHIVE.part`` and name what
is incomplete.  ``--backend null`` serves the same exports into a
:class:`~nbdvma.backends.NullBackend` that discards every write (for benchmarks), and
ends the same way.

What users of qemu-nbd and nbdkit expect: ``--pid-file`` (:mod:`nbdvma.pidfile`),
``--run`` (:mod:`nbdvma.captive`: the run ends with the command), ``--tls-creds DIR``
and systemd socket activation (:mod:`nbdvma.activation`, instead of ``--listen``).
"""

from __future__ import annotations

import argparse
import errno
import functools
import signal
import sys

import attrs
import trio

from nbdvma.addresses import TcpAddress
from nbdvma.captive import CaptiveCommand, start_command, until_complete
from nbdvma.commands.common import (
    activated_sockets,
    add_access_options,
    add_compress_option,
    add_listen_options,
    add_output_options,
    address_argument,
    log_to_stderr,
    read_configs,
    run_reporting,
    server_limits,
    size_argument,
    tls_config,
)
from nbdvma.errors import NbdvmaError
from nbdvma.pidfile import pid_file
from nbdvma.pve import archive_configs, split_config_argument
from nbdvma.session import ArchiveSession, DiscardSession, ExportSession, SessionOptions
from nbdvma.signals import Interrupt, stop_on_signals

__all__ = ["add_arguments", "run"]

PREFIX = "nbdvma serve: "
#: Seconds between attempts to finish an archive whose file system is full.
FINISH_RETRY_INTERVAL = 1.0
#: Seconds between progress lines (printed only when they changed).
PROGRESS_INTERVAL = 2.0
#: Seconds without any progress after which serve says what it is still waiting for.
STATUS_INTERVAL = 30.0


def _say(message: str) -> None:
    print(f"{PREFIX}{message}", file=sys.stderr, flush=True)


async def report_progress(
    session: ExportSession, interval: float, *, quiet_limit: float = STATUS_INTERVAL
) -> None:
    """Print the progress lines when they change; when nothing has moved for
    ``quiet_limit`` seconds, say what is still awaited (never wait silently)."""
    last: list[str] = []
    quiet_since = trio.current_time()
    while True:
        await trio.sleep(interval)
        lines = session.progress_lines()
        now = trio.current_time()
        if lines != last:
            for line in lines:
                _say(line)
            last, quiet_since = lines, now
        elif now - quiet_since >= quiet_limit:
            waiting = ", ".join(_awaited(session, name) for name in session.incomplete())
            _say(f"still waiting for: {waiting}")
            quiet_since = now


def _awaited(session: ExportSession, name: str) -> str:
    """``d0 (25% written, no client connected)``; ``vmstate (its stream has not ended)``."""
    if name not in session.active:
        return f"{name} (its stream has not ended)"
    progress = session.progress(name)
    clients = session.active[name]
    who = f"{clients} client(s) connected" if clients else "no client connected"
    return f"{name} ({100 * progress.written // progress.size}% written, {who})"


async def _finish_when_space(session: ExportSession) -> None:
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
                _say(
                    "no space left to finish the archive; retrying "
                    f"every {FINISH_RETRY_INTERVAL:g}s (free space, or stop with a signal)"
                )
                warned = True
            await trio.sleep(FINISH_RETRY_INTERVAL)
        else:
            if warned:
                _say("space available again; archive finished")
            return


@attrs.frozen
class Conventions:
    """What serve does once it listens, as qemu-nbd and nbdkit users expect."""

    #: ``--pid-file``: written once listening, removed at exit.
    pid_file: str | None = None
    #: ``--run``: a shell command that runs while serve listens (nbdkit's captive mode).
    run: str | None = None


async def run_session(
    options: SessionOptions,
    *,
    progress_interval: float = PROGRESS_INTERVAL,
    discard: bool = False,
    conventions: Conventions = Conventions(),
) -> int:
    """Run one session until every disk is complete, a signal arrives, or the
    ``--run`` command exits.

    Args:
        options: the archive, disks, listeners...
        progress_interval: seconds between progress lines.
        discard: serve into a :class:`~nbdvma.session.DiscardSession` (``--backend
            null``): the same exports and the same end, no archive.
        conventions: ``--pid-file`` and ``--run``.

    Returns:
        The exit status: 0 when the archive is finished, 128 + the signal number
        when interrupted first; with ``--run``, the command's status when not 0, and
        1 when it exited 0 with the archive incomplete.
    """
    session = DiscardSession(options) if discard else ArchiveSession(options)
    if session.replaced:
        _say(f"replaced {session.replaced}, left by an earlier run no longer running")
    command: CaptiveCommand | None = None
    try:
        async with trio.open_nursery() as nursery, stop_on_signals(nursery.cancel_scope) as stop:
            await session.start(nursery)
            for address in session.listening:
                _say(f"listening on {address}")
            if session.vmstate_address is not None:
                _say(f"vmstate on {session.vmstate_address}")
            with pid_file(conventions.pid_file):
                command = await start_command(
                    nursery,
                    conventions.run,
                    session.listening,
                    options.disks[0][0],
                    options.tls.mode,
                    # The archive on stdout must not get the command's output mixed in.
                    stdout=sys.stderr.fileno() if options.archive == "-" else None,
                )
                nursery.start_soon(report_progress, session, progress_interval)
                await until_complete(session, command)
                if session.done.is_set():
                    await _finish_when_space(session)
                    if command is not None and not command.exited.is_set():
                        _say(f"{_complete(discard)}; waiting for the --run command to exit")
                        await command.exited.wait()
                nursery.cancel_scope.cancel()
    except BaseException:
        session.abort()
        raise
    finally:
        session.remove_sockets()
    # A signal during finish() does not stop it (it runs in a thread): then the archive
    # is complete after all, and that is what to report.
    if not session.finished:
        session.abort()
        return _report_incomplete(session, stop, command, discard=discard)
    for line in session.summary_lines():
        _say(line)
    if command is not None and command.stopped:
        _say(f"interrupted by {stop.name}; {_complete(discard)}; the --run command stopped")
        return 128 + (stop.signum or signal.SIGINT)
    if command is not None and command.status:
        _say(f"the --run command {command.describe()}; {_complete(discard)}")
        return command.status
    return 0


def _complete(discard: bool) -> str:
    return "every disk is complete" if discard else "the archive is complete"


def _report_incomplete(
    session: ExportSession, stop: Interrupt, command: CaptiveCommand | None, *, discard: bool
) -> int:
    """Say why the disks are incomplete and what is left of the archive; the exit status."""
    if stop.signum is not None or command is None:
        why, status = f"interrupted by {stop.name}", 128 + (stop.signum or signal.SIGINT)
    else:
        why, status = f"the --run command {command.describe()}", command.status or 1
    incomplete = ", ".join(session.incomplete()) or "nothing (not finalized)"
    if discard:
        _say(f"{why}; incomplete: {incomplete}")
    elif not isinstance(session, ArchiveSession):  # pragma: no cover - only the two kinds
        raise AssertionError(session)
    elif session.options.archive == "-":
        _say(f"{why}; the output stream is incomplete: {incomplete}")
    elif session.upload is not None or session.has_output:
        _say(f"{why}; {session.left_behind()}; incomplete: {incomplete}")
    else:  # abort() removes a .part that never received anything
        _say(f"{why} before anything was written; no archive left; incomplete: {incomplete}")
    return status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``nbdvma serve``."""
    parser.add_argument(
        "archive",
        metavar="ARCHIVE",
        help="the VMA archive to write: a file, '-' (stdout), or s3://BUCKET/KEY "
        "(object storage; a .zst name compresses)",
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
        type=split_config_argument,
        metavar="[NAME=]FILE",
        help="store FILE in the archive as config NAME (default: qemu-server.conf with "
        "#qmdump#map lines when the disks are named drive-KEY, else its basename)",
    )
    parser.add_argument(
        "--vmstate",
        type=address_argument,
        metavar="unix:PATH|tcp:HOST:PORT",
        help="accept one connection here and store what it sends as the VM state",
    )
    add_listen_options(parser, "serve")
    parser.add_argument(
        "--run",
        metavar="CMD",
        help="once listening, run the shell command CMD (nbdkit's captive mode) with $uri "
        "and $nbd (the NBD URI of the first --disk on the first listener), $exportname, "
        "$unixsocket, $port and $tls set; serve ends when CMD does, with CMD's exit "
        "status if not 0, else 0 only if the archive is complete; a signal to serve "
        "stops CMD and what it started",
    )
    _server_options(parser)


def _server_options(parser: argparse.ArgumentParser) -> None:
    """How the server runs: compression, output, backend, sockets, limits, deadlines, TLS."""
    add_compress_option(parser)
    add_output_options(parser)
    parser.add_argument(
        "--backend",
        choices=["vma", "null"],
        default="vma",
        help="vma: write the archive (default); null: discard every write, end as vma "
        "does once every disk was written (the protocol's own cost, for benchmarks)",
    )
    add_access_options(parser)


def _disk(text: str) -> tuple[str, int]:
    name, sep, size = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE, got {text!r}")
    if name == "vmstate":
        raise argparse.ArgumentTypeError(
            "the name vmstate is the VM state's: give it with --vmstate ADDRESS"
        )
    return name, size_argument(size)


def run(args: argparse.Namespace) -> int:
    """Run ``nbdvma serve`` from parsed arguments; return the exit status.

    Every error that ends it is one line on stderr with the command's prefix.
    """
    log_to_stderr(PREFIX, verbose=args.verbose)
    return run_reporting(_say, functools.partial(_run, args))


def _run(args: argparse.Namespace) -> int:
    activated = activated_sockets(args.listen, "serve")
    names = [name for name, _ in args.disk]
    if len(set(names)) != len(names):
        raise NbdvmaError("each --disk needs a different name")
    if args.backend == "null" and (args.vmstate or args.config):
        raise NbdvmaError("--backend null discards everything: --vmstate and --config need vma")
    try:
        configs, _, warnings = archive_configs(read_configs(args.config), names)
    except ValueError as exc:  # a config the archive cannot store as given
        raise NbdvmaError(str(exc)) from None
    for warning in warnings:
        _say(f"warning: {warning}")
    options = SessionOptions(
        archive=args.archive,
        disks=tuple(args.disk),
        configs=tuple(configs),
        vmstate=args.vmstate,
        listen=() if activated else tuple(args.listen or (TcpAddress("127.0.0.1", 10809),)),
        listen_fds=activated,
        compress=args.compress,
        unix_mode=args.socket_mode,
        tls=tls_config(args),
        limits=server_limits(args),
        force=args.force,
        s3_endpoint=args.s3_endpoint,
    )
    conventions = Conventions(pid_file=args.pid_file, run=args.run)
    return trio.run(
        functools.partial(
            run_session, options, discard=args.backend == "null", conventions=conventions
        )
    )
