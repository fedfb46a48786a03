"""What a backup is asked to do: its options, the disks it takes, where the archive goes."""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence

import attrs

from nbdvma.addresses import Address
from nbdvma.errors import BackupError, S3UrlError
from nbdvma.pve import (
    VMID_MAX,
    VMID_MIN,
    ConfigDisk,
    GuestDisk,
    vzdump_name,
    vzdump_vmid,
)
from nbdvma.s3.location import parse_s3_url
from nbdvma.tls import TlsConfig

__all__ = ["BackupOptions", "archive_path", "select_disks"]


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


@attrs.frozen
class BackupOptions:
    """What ``nbdvma backup``'s command line says."""

    qmp: Address
    #: The archive file, or an existing directory for a vzdump-named one (``vmid``);
    #: ``s3://BUCKET/KEY``, or ``s3://BUCKET/PREFIX/`` for a vzdump-named one.
    archive: str
    #: ``--config [NAME=]FILE``: ``(NAME or None, FILE, its bytes)``.
    configs: tuple[tuple[str | None, str, bytes], ...] = ()
    #: Store a ``qemu-server.conf`` made from what QEMU says when none is given.
    generate_config: bool = True
    vmstate: bool = False
    drives: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    #: The Proxmox VM id, for vzdump's names and lines (needed with a directory).
    vmid: int | None = None
    #: ``--notes``: written to ``ARCHIVE.notes``.
    notes: str | None = None
    compress: str | None = None
    #: Backup job ``speed`` in bytes/s (``None``: unlimited).
    bandwidth_limit: int | None = None
    #: Seconds between progress polls.
    progress_interval: float = 1.0
    #: Fail when a job or the migration makes no progress for this many seconds.
    stall_timeout: float = 300.0
    #: Where QEMU's NBD clients connect (``None``: a unix socket in a private directory).
    listen: Address | None = None
    #: A credentials directory in QEMU's ``tls-creds-x509`` layout (``None``: no TLS);
    #: made absolute, since QEMU resolves it from its own working directory.
    tls_creds: str | None = attrs.field(default=None, converter=_absolute)
    #: The name QEMU checks the server certificate against (``--tls-hostname``).
    tls_hostname: str | None = None
    #: Require QEMU's client certificate (``client-cert.pem``) signed by ``ca-cert.pem``.
    tls_verify_client: bool = False
    #: ``--force``: replace an archive that exists (at the end).
    force: bool = False
    #: ``--s3-endpoint``: the endpoint of an ``s3://`` archive.
    s3_endpoint: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.tls_creds is None and (self.tls_hostname is not None or self.tls_verify_client):
            raise BackupError("--tls-hostname and --tls-verify-client need --tls-creds")

    def tls_config(self) -> TlsConfig:
        """The session's TLS: required, with ``server-cert.pem``/``server-key.pem``
        (and ``ca-cert.pem`` for client certificates) of :attr:`tls_creds`."""
        if self.tls_creds is None:
            return TlsConfig()
        return TlsConfig.from_creds_dir(self.tls_creds, verify_client=self.tls_verify_client)


# -- discovery ---------------------------------------------------------------------------


def select_disks(
    guest: Sequence[GuestDisk],
    *,
    drives: Sequence[str] = (),
    excludes: Sequence[str] = (),
    config_disks: Mapping[str, ConfigDisk] | None = None,
) -> tuple[list[GuestDisk], list[str]]:
    """Choose the disks to back up among the VM's (:func:`nbdvma.pve.assign_keys`).

    Every disk is backed up, read-only ones included, but those left out on purpose:
    not named by ``--drive`` when it is given, named by ``--exclude``, or ``backup=0``
    in the user's config (as vzdump).  A disk is named by its key (``scsi0``), archive
    name (``drive-scsi0``), qdev id, BlockBackend or node name.

    Returns:
        The disks in key order, and vzdump's ``exclude disk ...`` line for each one
        left out.

    Raises:
        BackupError: a ``--drive`` or ``--exclude`` names no disk, or no disk is left.
    """
    config_disks = config_disks or {}
    picked: set[str] = set()
    disks: list[GuestDisk] = []
    lines: list[str] = []
    for g in guest:
        aliases = {g.key, g.name, g.block.qdev_id, g.block.backend, g.block.node} - {None, ""}
        entry = config_disks.get(g.key)
        volume = entry.volume if entry is not None else g.block.filename
        reason = None
        if drives and not aliases & set(drives):
            reason = "not named by --drive"
        if aliases & set(excludes):
            reason = "--exclude"
        if entry is not None and entry.excluded:
            reason = "backup=no"
        picked |= {str(a) for a in aliases}
        if reason is not None:
            lines.append(f"exclude disk '{g.key}' '{volume}' ({reason})")
            continue
        if g.block.node is None or g.block.size <= 0:
            raise BackupError(f"disk {g.key}: QEMU reports no node or size for it")
        disks.append(attrs.evolve(g, volume=volume))
    for option, names in (("--drive", drives), ("--exclude", excludes)):
        unknown = sorted(set(names) - picked)
        if unknown:
            raise BackupError(f"{option} {', '.join(unknown)}: the VM has no such disk")
    if not disks:
        raise BackupError("no disk left to back up")
    return disks, lines


def archive_path(options: BackupOptions, now: datetime.datetime) -> tuple[str, int | None]:
    """Where the archive goes (an absolute path, or ``s3://BUCKET/KEY``), and the VMID
    for vzdump's lines.

    An existing directory, or an ``s3://BUCKET/PREFIX/`` (ending in ``/``), gets
    vzdump's name (``--vmid`` required); a file name or key is used as given, its VMID
    read from it when it is vzdump's.

    Raises:
        BackupError: a directory or prefix without ``--vmid``, a VMID out of range, a
            bad ``s3://`` URL.
    """
    try:
        location = parse_s3_url(options.archive)
    except S3UrlError as exc:
        raise BackupError(str(exc)) from None
    directory = location.is_prefix if location is not None else os.path.isdir(options.archive)
    if directory:
        if options.vmid is None:
            what = "an S3 prefix" if location is not None else "a directory"
            raise BackupError(
                f"{options.archive} is {what}: --vmid N is needed to name the archive "
                "as vzdump does (vzdump-qemu-N-DATE-TIME.vma)"
            )
        try:
            name = vzdump_name(options.vmid, now, options.compress)
        except ValueError as exc:
            raise BackupError(str(exc)) from None
        if location is not None:
            return location.child(name).url, options.vmid
        return os.path.abspath(os.path.join(options.archive, name)), options.vmid
    vmid = options.vmid
    if vmid is not None and not VMID_MIN <= vmid <= VMID_MAX:
        raise BackupError(f"VMID {vmid} is outside {VMID_MIN}..{VMID_MAX}")
    if location is not None:
        return location.url, vmid or vzdump_vmid(os.path.basename(location.key))
    return os.path.abspath(options.archive), vmid or vzdump_vmid(os.path.basename(options.archive))
