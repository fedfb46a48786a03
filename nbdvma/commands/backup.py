"""``nbdvma backup``: the command line of :func:`nbdvma.backup.run_backup`."""

from __future__ import annotations

import argparse
import math
import sys

import trio

from nbdvma.backup import BackupOptions, run_backup
from nbdvma.backup.job import DEFAULT_UNIX_TLS_HOSTNAME
from nbdvma.commands.common import (
    add_compress_option,
    add_output_options,
    address_argument,
    read_configs,
    size_argument,
)
from nbdvma.errors import BackupError, NbdvmaError
from nbdvma.pve import (
    VMID_MAX,
    VMID_MIN,
    split_config_argument,
)

__all__ = ["add_arguments", "run"]


# -- command line --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``nbdvma backup``."""
    parser.add_argument(
        "archive",
        metavar="ARCHIVE",
        help="the VMA archive to write, or an existing directory: the archive is then "
        "DIR/vzdump-qemu-VMID-YYYY_MM_DD-HH_MM_SS.vma[.zst] (needs --vmid), with its .log; "
        "s3://BUCKET/KEY, or s3://BUCKET/PREFIX/ (a trailing /) for the same name there",
    )
    parser.add_argument(
        "--qmp",
        required=True,
        type=address_argument,
        metavar="unix:PATH|tcp:HOST:PORT",
        help="QEMU's QMP socket",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        type=split_config_argument,
        metavar="[NAME=]FILE",
        help="store FILE in the archive as config NAME (default: qemu-server.conf, or "
        "qemu-server.fw for *.fw), with #qmdump#map lines for the disks; 'none' stores "
        "no config (default: a qemu-server.conf made from what QEMU tells); repeatable",
    )
    parser.add_argument(
        "--vmstate",
        action="store_true",
        help="also save the VM state (RAM and devices), consistent with the disks",
    )
    parser.add_argument(
        "--drive",
        action="append",
        default=[],
        metavar="ID",
        help="back up only this drive (scsi0, drive-scsi0, a node name); repeatable",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="KEY",
        help="leave this disk out (scsi0, drive-scsi0, a node name); repeatable",
    )
    parser.add_argument(
        "--vmid",
        type=int,
        metavar="N",
        help=f"the Proxmox VM id ({VMID_MIN}..{VMID_MAX}) for vzdump's archive name and log",
    )
    parser.add_argument(
        "--notes", metavar="TEXT", help="write TEXT to ARCHIVE.notes (Proxmox's backup notes)"
    )
    _how_options(parser)


def _how_options(parser: argparse.ArgumentParser) -> None:
    """How the archive is written and reached: compression, output, rates, deadlines,
    the NBD listener and TLS."""
    add_compress_option(parser)
    add_output_options(parser)
    parser.add_argument(
        "--bandwidth-limit",
        type=size_argument,
        metavar="RATE",
        help="limit each backup job to RATE bytes/s (K/M/G suffixes)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="fail when nothing progresses for this long (default 300)",
    )
    parser.add_argument(
        "--listen",
        type=address_argument,
        metavar="unix:PATH|tcp:HOST:PORT",
        help="where QEMU connects to send the disks (default: a unix socket in a private "
        "directory); a TCP address is reachable by every local user: use --tls-creds",
    )
    tls = parser.add_argument_group("TLS (X.509; see docs/security.md)")
    tls.add_argument(
        "--tls-creds",
        metavar="DIR",
        help="require TLS: a directory in QEMU's tls-creds-x509 layout readable by nbdvma "
        "and QEMU; nbdvma serves server-cert.pem/server-key.pem, QEMU checks them with "
        "ca-cert.pem and presents client-cert.pem/client-key.pem if present",
    )
    tls.add_argument(
        "--tls-hostname",
        metavar="NAME",
        help="the name QEMU checks in the server certificate (default: the --listen TCP "
        f"host, or {DEFAULT_UNIX_TLS_HOSTNAME} on a unix socket)",
    )
    tls.add_argument(
        "--tls-verify-client",
        action="store_true",
        help="require QEMU's client certificate, signed by ca-cert.pem",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``nbdvma backup`` from parsed arguments; return the exit status."""
    generate = True
    config_args = list(args.config)
    if (None, "none") in config_args:
        config_args.remove((None, "none"))
        generate = False
    try:
        configs = read_configs(config_args)
    except NbdvmaError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    if args.archive == "-":
        print("ERROR: backup writes a file; '-' is not supported", file=sys.stderr)
        return 1
    try:
        options = BackupOptions(
            qmp=args.qmp,
            archive=args.archive,
            configs=tuple(configs),
            generate_config=generate,
            vmstate=args.vmstate,
            drives=tuple(args.drive),
            excludes=tuple(args.exclude),
            vmid=args.vmid,
            notes=args.notes,
            compress=args.compress,
            bandwidth_limit=args.bandwidth_limit,
            stall_timeout=args.stall_timeout if args.stall_timeout > 0 else math.inf,
            listen=args.listen,
            tls_creds=args.tls_creds,
            tls_hostname=args.tls_hostname,
            tls_verify_client=args.tls_verify_client,
            force=args.force,
            s3_endpoint=args.s3_endpoint,
        )
    except BackupError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    return trio.run(run_backup, options, sys.stderr)
