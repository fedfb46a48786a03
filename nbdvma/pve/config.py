"""A Proxmox config as vzdump stores it: keys, ``#qmdump#map`` lines, vzdump's names.

The rules follow qemu-server's ``assemble`` (what is copied), ``parse_backup_hints``
(the map regex) and ``restore_update_config_line`` (what restore rewrites); see
``docs/proxmox.md``.  Pure: no I/O.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping, Sequence

import attrs

__all__ = [
    "CONFIG_NAME",
    "FIREWALL_NAME",
    "KEY_LIMITS",
    "VMID_MAX",
    "VMID_MIN",
    "VZDUMP_ARCHIVE",
    "ConfigDisk",
    "archive_configs",
    "archive_log_name",
    "device_name",
    "format_size",
    "is_disk_key",
    "key_of_device",
    "map_line",
    "parse_config_disks",
    "parse_disk_value",
    "split_config_argument",
    "stored_config_name",
    "vzdump_name",
    "vzdump_vmid",
    "with_map_lines",
]

CONFIG_NAME = "qemu-server.conf"
FIREWALL_NAME = "qemu-server.fw"
#: Config keys of disks, with qemu-server's index limits (``Drive.pm``).
KEY_LIMITS = {"ide": 4, "sata": 6, "scsi": 31, "virtio": 16, "efidisk": 1, "tpmstate": 1}
_KEY = re.compile(r"^(ide|sata|scsi|virtio|efidisk|tpmstate)(\d+)$")
_DISK_LINE = re.compile(r"^((?:ide|sata|scsi|virtio|efidisk|tpmstate)\d+):\s*(\S+)\s*$")
#: pve-storage's volume id: ``STORAGE:VOLNAME``.
_VOLUME_ID = re.compile(r"^([a-z][a-z0-9\-_.]*[a-z0-9]):(.+)$", re.IGNORECASE)
_FORMATS = ("raw", "qcow2", "vmdk")
#: pve-storage ``archive_info`` for a QEMU VM (VMID 100..999999999).
VZDUMP_ARCHIVE = re.compile(
    r"^vzdump-qemu-([1-9][0-9]{2,8})-\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2}\.vma(?:\.(zst|lzo|gz))?$"
)
VMID_MIN, VMID_MAX = 100, 999_999_999
#: Config lines vzdump does not store, or that restore would copy to no purpose: a
#: ``vmstate:`` (a hibernated VM's state volume) would point at nothing restored.
_DROPPED = re.compile(r"^(lock|parent|vmstate):")
_UNUSED = re.compile(r"^unused\d+:\s*(\S+)")
#: A NIC model's qdev type -> Proxmox's model name.


def key_of_device(name: str) -> str | None:
    """``drive-scsi0`` -> ``scsi0`` (``drive-tpmstate0-backup`` -> ``tpmstate0``);
    ``None`` when the name is not a Proxmox device name."""
    if name == "drive-tpmstate0-backup":
        return "tpmstate0"
    if name.startswith("drive-") and is_disk_key(name[6:]):
        return name[6:]
    return None


def device_name(key: str) -> str:
    """The archive device of a config key, as vzdump names it (``scsi0`` -> ``drive-scsi0``)."""
    return "drive-tpmstate0-backup" if key == "tpmstate0" else f"drive-{key}"


def is_disk_key(key: str) -> bool:
    """Whether ``key`` is a disk key of a Proxmox config, within qemu-server's limits."""
    m = _KEY.match(key)
    if m is None or str(int(m.group(2))) != m.group(2):  # no "scsi01"
        return False
    return int(m.group(2)) < KEY_LIMITS[m.group(1)]


def format_size(size: int) -> str:
    """A size as Proxmox writes ``size=``: exact units only (``32G``, ``528K``, ``5255680``)."""
    unit = 0
    while unit < 4 and size and size % 1024 == 0:
        size //= 1024
        unit += 1
    return f"{size}{['', 'K', 'M', 'G', 'T'][unit]}"


def map_line(key: str, device: str, storage: str = "", fmt: str = "") -> str:
    """``#qmdump#map:KEY:DEVNAME:STORAGE:FORMAT:`` (the trailing colon is required)."""
    return f"#qmdump#map:{key}:{device}:{storage}:{fmt}:"


# -- a user's config ---------------------------------------------------------------------


@attrs.frozen
class ConfigDisk:
    """A disk line of a config (``scsi0: local-lvm:vm-100-disk-0,size=32G``).

    Attributes:
        key: ``scsi0``.
        volume: the ``file=`` value (``local-lvm:vm-100-disk-0``, ``/dev/sdb``).
        storage: the storage of a volume id, else ``""``.
        format: ``format=``, else the volume's extension when it is an image format,
            else ``""`` (restore then uses ``raw``).
        options: the other options, in order.
    """

    key: str
    volume: str
    storage: str
    format: str
    options: tuple[tuple[str, str], ...]

    @property
    def is_cdrom(self) -> bool:
        """``media=cdrom`` (a CD-ROM or a cloud-init drive): never backed up."""
        return dict(self.options).get("media") == "cdrom"

    @property
    def excluded(self) -> bool:
        """``backup=0``: vzdump leaves the disk out on purpose."""
        return dict(self.options).get("backup", "1") in ("0", "no", "off", "false")


def parse_disk_value(key: str, value: str) -> ConfigDisk:
    """Parse the value of a disk line (``[file=]VOLUME,opt=val,...``)."""
    items = value.split(",")
    volume = items[0]
    options: list[tuple[str, str]] = []
    for item in items[1:]:
        name, _, val = item.partition("=")
        if name == "file":
            volume = val
        else:
            options.append((name, val))
    if volume.startswith("file="):
        volume = volume[5:]
    storage = ""
    volname = volume
    m = _VOLUME_ID.match(volume)
    if m and not volume.startswith("/"):
        storage, volname = m.group(1), m.group(2)
    fmt = dict(options).get("format", "")
    if not fmt:
        ext = volname.rsplit(".", 1)[-1] if "." in volname else ""
        fmt = ext if ext in _FORMATS else ""
    return ConfigDisk(key, volume, storage, fmt, tuple(options))


def _current_section(text: str) -> list[str]:
    """The config's lines up to its first ``[section]`` (snapshots, pending, special)."""
    lines = []
    for line in text.split("\n"):
        if line.startswith("["):
            break
        lines.append(line.rstrip("\r"))
    return lines


def parse_config_disks(config: bytes) -> dict[str, ConfigDisk]:
    """The disk lines of a config's current section, by key (CD-ROMs included)."""
    disks = {}
    for line in _current_section(config.decode("utf-8", "surrogateescape")):
        m = _DISK_LINE.match(line)
        if m:
            disks[m.group(1)] = parse_disk_value(m.group(1), m.group(2))
    return disks


def with_map_lines(
    config: bytes,
    keys: Iterable[str],
    *,
    source: str = CONFIG_NAME,
    excluded: Iterable[str] = (),
) -> tuple[bytes, list[str], list[str]]:
    """A user's config as vzdump stores it, with one map line per backed-up disk.

    As qemu-server's ``assemble``: only the current section is kept (snapshots,
    ``[PENDING]`` and ``[special:...]`` sections are dropped), and so are old
    ``#qmdump#``/``#vzdump#`` lines, ``lock:``, ``parent:``, ``unusedN:`` and (beyond
    vzdump) ``vmstate:``, which would point at a volume that restore does not create.
    Line endings become LF.  Then come the map lines, sorted by key as Perl sorts
    strings, with STORAGE and FORMAT from the disk's line when it has one.

    Args:
        config: the config file's bytes.
        keys: the config keys of the disks stored in the archive.
        source: the file's name, for the messages.
        excluded: keys of disks left out on purpose (no warning for their lines).

    Returns:
        The config to store, INFO lines (what was left out) and WARN lines (a disk the
        config has and the archive lacks, or the reverse: Proxmox restores the latter
        as an unused volume).
    """
    text = config.decode("utf-8", "surrogateescape")
    keys = sorted(set(keys))
    infos: list[str] = []
    kept: list[str] = []
    lines = _current_section(text)
    if len(lines) < text.count("\n") + 1:
        infos.append(f"{source}: snapshot/pending sections not included into backup")
    for line in lines:
        if line.startswith(("#qmdump#", "#vzdump#")):
            continue
        unused = _UNUSED.match(line)
        if unused:
            infos.append(f"skip unused drive '{unused.group(1)}' (not included into backup)")
            continue
        if _DROPPED.match(line):
            if line.startswith("vmstate:"):
                infos.append(f"{source}: left out '{line}' (it names a state restore lacks)")
            continue
        kept.append(line)
    while kept and kept[-1] == "":
        kept.pop()
    disks = parse_config_disks(config)
    warnings = _disk_warnings(disks, keys, set(excluded), source)
    for key in keys:
        entry = disks.get(key)
        storage, fmt = (entry.storage, entry.format) if entry is not None else ("", "")
        kept.append(map_line(key, device_name(key), storage, fmt))
    return ("\n".join(kept) + "\n").encode("utf-8", "surrogateescape"), infos, warnings


def _disk_warnings(
    disks: Mapping[str, ConfigDisk], keys: Sequence[str], excluded: set[str], source: str
) -> list[str]:
    """A config disk the VM lacks (not left out on purpose), a VM disk the config lacks."""
    warnings = []
    for key, disk in sorted(disks.items()):
        if key not in keys and not disk.is_cdrom and not disk.excluded and key not in excluded:
            warnings.append(f"{source} has disk {key}, which the VM does not have")
    for key in keys:
        if key not in disks:
            warnings.append(
                f"the VM's disk {key} has no line in {source}: Proxmox would restore it "
                "as an unused volume"
            )
    return warnings


def split_config_argument(text: str) -> tuple[str | None, str]:
    """``[NAME=]FILE`` -> ``(NAME, FILE)``, NAME ``None`` when not given (a ``=`` after
    a ``/`` belongs to the path)."""
    name, sep, path = text.partition("=")
    if not sep or "/" in name:
        return None, text
    return name, path


def stored_config_name(name: str | None, path: str, *, keyed: bool) -> str:
    """The name a config file is stored under: NAME when given; else, when the devices
    have Proxmox keys (``keyed``), ``qemu-server.conf`` (``qemu-server.fw`` for a
    ``*.fw``) whatever the file is called; else its basename, as ``vma create`` does."""
    if name is not None:
        return name
    basename = path.rsplit("/", 1)[-1]
    if not keyed:
        return basename
    return FIREWALL_NAME if basename.endswith(".fw") else CONFIG_NAME


def archive_configs(
    items: Sequence[tuple[str | None, str, bytes]],
    devices: Sequence[str],
    excluded: Iterable[str] = (),
) -> tuple[list[tuple[str, bytes]], list[str], list[str]]:
    """Name the config files of ``--config [NAME=]FILE`` as vzdump stores them.

    When some device is named ``drive-KEY`` (so its config key is known), a FILE
    without NAME is stored as ``qemu-server.conf`` whatever it is called (a ``*.fw``
    file as ``qemu-server.fw``), and the ``qemu-server.conf`` gets the map lines of
    those devices (:func:`with_map_lines`).  Otherwise FILE keeps its basename, as
    ``vma create`` stores it.

    Args:
        items: ``(NAME or None, FILE, its bytes)`` in command-line order.
        devices: the archive's disk device names.
        excluded: config keys of disks left out on purpose.

    Returns:
        ``(name, data)`` to store, INFO lines and WARN lines.

    Raises:
        ValueError: two configs would have the same name.
    """
    keys = [k for k in map(key_of_device, devices) if k is not None]
    infos: list[str] = []
    warnings: list[str] = []
    out: list[tuple[str, bytes]] = []
    for given, path, data in items:
        name = stored_config_name(given, path, keyed=bool(keys))
        if any(name == other for other, _ in out):
            raise ValueError(f"two configs would be stored as {name!r}; name one with NAME=FILE")
        if name == CONFIG_NAME and keys:
            data, more_infos, more_warnings = with_map_lines(
                data, keys, source=path, excluded=excluded
            )
            infos += more_infos
            warnings += more_warnings
            for device in devices:
                if key_of_device(device) is None:
                    warnings.append(
                        f"device {device} is not named drive-KEY (drive-scsi0...): "
                        "Proxmox's restore cannot map it to a disk"
                    )
        out.append((name, data))
    return out, infos, warnings


# -- vzdump's file names -----------------------------------------------------------------------


def vzdump_name(vmid: int, when: datetime.datetime, compress: str | None) -> str:
    """``vzdump-qemu-VMID-YYYY_MM_DD-HH_MM_SS.vma[.zst]`` for a backup started at ``when``."""
    if not VMID_MIN <= vmid <= VMID_MAX:
        raise ValueError(f"VMID {vmid} is outside {VMID_MIN}..{VMID_MAX}")
    ext = ".vma.zst" if compress is not None and compress.partition(":")[0] == "zstd" else ".vma"
    return f"vzdump-qemu-{vmid}-{when.strftime('%Y_%m_%d-%H_%M_%S')}{ext}"


def vzdump_vmid(basename: str) -> int | None:
    """The VMID of a vzdump archive name, ``None`` when the name is not vzdump's."""
    m = VZDUMP_ARCHIVE.match(basename)
    return int(m.group(1)) if m else None


def archive_log_name(archive: str) -> str:
    """vzdump's log beside an archive: the name without ``.vma[.EXT]``, plus ``.log``."""
    return re.sub(r"\.vma(\.(zst|lzo|gz))?$", "", archive) + ".log"
