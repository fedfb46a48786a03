"""The ``nbdvma`` command line: the archive tools and ``serve``.

The archive commands mirror Proxmox's ``vma`` (format doc §8).  Every failure is one
line on stderr and a non-zero exit status, never a traceback; usage errors exit 1,
as ``vma`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Collection, Sequence
from typing import NoReturn

from nbdvma import __version__
from nbdvma.commands.s3opts import add_s3_endpoint_option
from nbdvma.errors import NbdvmaError
from nbdvma.interrupts import Terminated, install
from nbdvma.tools import ToolError

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with ``vma``'s exit status (1) for a bad command line."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


_SERVER_COMMANDS = ("serve", "backup", "export")
_S3_HELP = "; or s3://BUCKET/KEY, see --s3-endpoint"

EXPORT_DESCRIPTION = (
    "Serve each disk of ARCHIVE as a read-only NBD export named as in the archive "
    "(drive-scsi0...), of its exact size, until SIGINT or SIGTERM. The archive is read "
    "and checked once first (as verify does): a damaged one is refused. Zero blocks are "
    "reported as holes, so qemu-img convert and nbdcopy write sparse images. "
    "The VM state and the configs are not exports (use extract or restore for them). "
    "A .vma or a .vma.zst written by nbdvma is read in place; vzdump's .vma.zst, "
    ".vma.gz and .vma.lzo are decompressed once into a temporary file first. "
    "ARCHIVE may be s3://BUCKET/KEY: streamed once to be checked, then read by ranged GETs."
)


def build_parser(
    *, server_commands: Collection[str] = ("serve", "backup", "export")
) -> argparse.ArgumentParser:
    """The argument parser of ``nbdvma`` (exposed for documentation and tests).

    Args:
        server_commands: the server commands (``serve``, ``backup``, ``export``)
            whose options to define: each imports trio and its own modules, so a
            command starts faster with only its own (the archive tools with none).
    """
    parser = _Parser(prog="nbdvma", description="Proxmox VMA archive tools.")
    parser.add_argument("--version", action="version", version=f"nbdvma {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _add_archive_tools(sub)
    _add_server_commands(sub, server_commands)
    return parser


def _add_archive_tools(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``list``, ``config``, ``verify``, ``extract``, ``create`` (as Proxmox's ``vma``)."""
    p = sub.add_parser("list", help="print the configs and devices of an archive")
    p.add_argument("file", help=f"archive (- for stdin; .zst is decompressed{_S3_HELP})")
    add_s3_endpoint_option(p)

    p = sub.add_parser("config", help="print one config file of an archive")
    p.add_argument("file", help=f"archive (- for stdin{_S3_HELP})")
    p.add_argument("-c", "--config", help="config name (default qemu-server.conf)")
    add_s3_endpoint_option(p)

    p = sub.add_parser("verify", help="read and check a whole archive")
    p.add_argument("file", help=f"archive (- for stdin{_S3_HELP})")
    add_s3_endpoint_option(p)
    p.add_argument("-v", "--verbose", action="store_true", help="print progress")
    p.add_argument(
        "--strict",
        action="store_true",
        help="also reject stored zero blocks and data past a disk's end",
    )

    p = sub.add_parser("extract", help="restore an archive into a new directory")
    p.add_argument("file", help=f"archive (- for stdin{_S3_HELP})")
    add_s3_endpoint_option(p)
    p.add_argument("dir", help="target directory (must not exist)")
    p.add_argument("-v", "--verbose", action="store_true", help="print progress")
    p.add_argument("-d", "--drives", help="comma-separated device names to restore")

    p = sub.add_parser(
        "restore",
        help="restore the disks of an archive as raw or qcow2 images into a new directory",
        description="Restore each disk of ARCHIVE as DIR/disk-NAME.raw or .qcow2 (sparse: "
        "zero blocks stay holes), with its configs and vmstate.bin as extract writes them. "
        "Every file is 0600; nothing incomplete is left under a final name.",
    )
    p.add_argument(
        "file",
        metavar="ARCHIVE",
        help=f"archive (.vma, .vma.zst, .vma.gz, .vma.lzo{_S3_HELP})",
    )
    add_s3_endpoint_option(p)
    p.add_argument(
        "dir", metavar="DIR", nargs="?", help="target directory (must not exist; not --live)"
    )
    p.add_argument(
        "--live",
        action="store_true",
        help="instead of writing images: export the archive on --listen, wait for the VM "
        "behind --qmp (started on qcow2 overlays over the export), block-stream every "
        "overlay, and exit once the VM no longer needs the export (docs/restore.md)",
    )
    p.add_argument("--qmp", metavar="unix:PATH|tcp:HOST:PORT", help="the VM's QMP (--live)")
    p.add_argument(
        "--listen",
        action="append",
        metavar="unix:PATH|tcp:HOST:PORT",
        help="where the export listens (--live; repeatable): the socket the overlays name",
    )
    p.add_argument(
        "--format",
        choices=["raw", "qcow2"],
        default="raw",
        help="image format (default raw; qcow2 goes through qemu-img convert from an "
        "in-process read-only NBD export)",
    )
    p.add_argument("-d", "--drives", help="comma-separated device names to restore")

    p = sub.add_parser("create", help="write an archive of config files and raw images")
    p.add_argument("file", help="new archive (- for stdout, s3://BUCKET/KEY; .zst compresses)")
    p.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        help="[NAME=]FILE: a config file (repeatable); with images named drive-KEY "
        "it is stored as qemu-server.conf with #qmdump#map lines",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print per-image figures")
    p.add_argument("images", nargs="*", metavar="[NAME=]IMAGE", help="raw disk images")
    from nbdvma.commands.common import add_output_options

    add_output_options(p)

    p = sub.add_parser(
        "s3-uploads",
        help="list (and --abort) the incomplete S3 uploads nbdvma left under a prefix",
        description="List the incomplete multipart uploads under s3://BUCKET/PREFIX that "
        "nbdvma left (a process killed with SIGKILL cannot abort its upload), one per "
        "line: URL, upload id, when it began; with --abort, abort them. Only nbdvma's "
        "uploads unless --all. A bucket lifecycle rule does the same unattended "
        "(docs/s3.md).",
    )
    from nbdvma.commands import s3uploads

    s3uploads.add_arguments(p)


def _add_server_commands(
    sub: argparse._SubParsersAction[_Parser], options: Collection[str]
) -> None:
    """``serve``, ``backup`` and ``export``; the options of those in ``options``."""
    p = sub.add_parser(
        "serve",
        help="serve NBD exports (one per guest disk) that write into one VMA archive",
        description="Serve one NBD export per --disk; every write goes into ARCHIVE. "
        "The archive is finalized and serve exits 0 once every disk was written "
        "completely and its clients disconnected (and the VM state, if declared, ended).",
    )
    if "serve" in options:
        from nbdvma.commands import serve

        serve.add_arguments(p)

    p = sub.add_parser(
        "backup",
        help="back up a running QEMU VM (all disks, VM state, config) into a VMA archive",
        description="Back up the disks of the QEMU VM behind --qmp (and, with --vmstate, "
        "its VM state) into ARCHIVE, from one point in time.",
    )
    if "backup" in options:
        from nbdvma.commands import backup

        backup.add_arguments(p)

    p = sub.add_parser(
        "export",
        help="serve the disks of an archive as read-only NBD exports (to restore them)",
        description=EXPORT_DESCRIPTION,
    )
    if "export" in options:
        from nbdvma.commands import export

        export.add_arguments(p)


def _drives(text: str | None) -> list[str] | None:
    """``-d drive-scsi0,drive-virtio1``."""
    if text is None:
        return None
    drives = [d for d in text.split(",") if d]
    if not drives:
        raise ToolError("-d names no device: give drive-scsi0,drive-virtio1...")
    return drives


def _run(args: argparse.Namespace) -> None:
    # Each command imports what it runs, and no more (start-up time).
    from nbdvma import tools

    out = sys.stdout
    s3 = getattr(args, "s3_endpoint", None)
    if args.command == "list":
        tools.list_archive(args.file, out, s3_endpoint=s3)
    elif args.command == "config":
        config = args.config or tools.DEFAULT_CONFIG
        tools.print_config(args.file, config, out, s3_endpoint=s3)
    elif args.command == "verify":
        tools.verify_archive(
            args.file, out, verbose=args.verbose, strict=args.strict, s3_endpoint=s3
        )
    elif args.command == "extract":
        drives = _drives(args.drives)
        tools.extract_archive(
            args.file, args.dir, out, verbose=args.verbose, drives=drives, s3_endpoint=s3
        )
    elif args.command == "restore" and (args.live or args.qmp or args.listen):
        if not (args.live and args.qmp and args.listen) or args.dir is not None:
            raise ToolError("restore --live takes --qmp ADDRESS and --listen ADDRESS, and no DIR")
        from nbdvma.commands.export import live_restore

        status = live_restore(args.file, args.qmp, args.listen, s3_endpoint=s3)
        if status:
            raise SystemExit(status)
    elif args.command == "restore":
        from nbdvma.restore import restore_archive

        if args.dir is None:
            raise ToolError("restore needs a target DIR (or --live)")

        def say(line: str) -> None:
            print(f"nbdvma restore: {line}", file=sys.stderr, flush=True)

        restore_archive(
            args.file,
            args.dir,
            image_format=args.format,
            drives=_drives(args.drives),
            say=say,
            s3_endpoint=s3,
        )
    elif args.command == "create":
        tools.create_archive(
            args.file,
            args.config,
            args.images,
            sys.stderr,
            verbose=args.verbose,
            force=args.force,
            s3_endpoint=args.s3_endpoint,
        )
    elif args.command == "s3-uploads":
        from nbdvma.commands import s3uploads

        status = s3uploads.run(args)
        if status:
            raise SystemExit(status)
    elif args.command in _SERVER_COMMANDS:
        command = importlib.import_module(f"nbdvma.commands.{args.command}")
        status = command.run(args)
        if status:
            raise SystemExit(status)
    else:  # pragma: no cover - argparse only accepts the commands above
        raise ToolError(f"unknown command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``nbdvma`` with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 on errors and bad usage, 255 when
        ``config`` finds no such config (as ``vma``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(server_commands=[a for a in argv[:1] if a in _SERVER_COMMANDS])
    try:
        # create takes images on both sides of its options ("FILE -c CFG IMG..."),
        # which plain parse_args cannot mix with a nargs="*" positional.
        args, extra = parser.parse_known_args(argv)
        if extra:
            if args.command != "create" or any(a.startswith("-") for a in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.images.extend(extra)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    # SIGTERM ends an archive command as Ctrl-C does, so that it removes its
    # temporary files (ARCHIVE.part, tmp-disk-*.raw); the servers handle their
    # signals themselves, on trio's loop.
    # restore --format qcow2 runs trio, which takes the signals as the servers do.
    on_trio = args.command in _SERVER_COMMANDS or getattr(args, "format", "") == "qcow2"
    signals = contextlib.nullcontext() if on_trio else install()
    try:
        with signals:
            _run(args)
            sys.stdout.flush()
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except ToolError as exc:
        _flush_quietly()
        print(exc.message, file=sys.stderr)
        return exc.status
    except NbdvmaError as exc:  # a tool let one through: still one line
        _flush_quietly()
        print(str(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our stdout went away: stop quietly, and keep Python's exit
        # flush from complaining about the same pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    except OSError as exc:
        _flush_quietly()
        print(exc.strerror or str(exc), file=sys.stderr)
        return 1
    return 0


def _flush_quietly() -> None:
    with contextlib.suppress(OSError):
        sys.stdout.flush()
