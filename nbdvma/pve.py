"""Proxmox VE's view of an archive: ``qemu-server.conf``, ``#qmdump#map`` lines, vzdump names.

Proxmox restores a VMA archive only through the VM config stored in it
(``shared/docs/proxmox-restore.md``): ``qmrestore`` reads the blob ``qemu-server.conf``,
and for every device of the archive it needs a line
``#qmdump#map:KEY:DEVNAME:STORAGE:FORMAT:`` naming the config key (``scsi0``) that the
device (``drive-scsi0``) restores; there is no fallback from the device name.  Restoring
from a file also needs vzdump's file name (``vzdump-qemu-100-2026_12_03-12_00_00.vma.zst``).

This module is pure (no I/O): it turns a user's config, or what QEMU says about a VM
(:class:`VmInfo`, gathered over QMP by :mod:`nbdvma.vminfo`), into the config text that
``vzdump`` would have stored, and names archives as vzdump does.  The rules follow
qemu-server's ``assemble`` (what is copied), ``parse_backup_hints`` (the map regex) and
``restore_update_config_line`` (what restore rewrites).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping, Sequence

import attrs

__all__ = [
    "CONFIG_NAME",
    "FIREWALL_NAME",
    "BlockDevice",
    "ConfigDisk",
    "GuestDisk",
    "Nic",
    "VmInfo",
    "archive_configs",
    "archive_log_name",
    "assign_keys",
    "device_name",
    "format_size",
    "generate_config",
    "key_of_device",
    "map_line",
    "parse_config_disks",
    "vzdump_name",
    "vzdump_vmid",
    "with_map_lines",
]

#: The one config blob ``qmrestore`` reads (and ``qemu-server.fw``, the firewall's).
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
NIC_MODELS = {
    "virtio-net-pci": "virtio",
    "e1000": "e1000",
    "e1000e": "e1000e",
    "rtl8139": "rtl8139",
    "vmxnet3": "vmxnet3",
    "i82551": "i82551",
    "i82557b": "i82557b",
    "i82559er": "i82559er",
    "ne2k_pci": "ne2k_pci",
    "pcnet": "pcnet",
}
#: A SCSI controller's qdev type -> Proxmox's ``scsihw``.
SCSI_HW = {
    "virtio-scsi-pci": "virtio-scsi-pci",
    "lsi53c895a": "lsi",
    "lsi53c810": "lsi53c810",
    "megasas": "megasas",
    "pvscsi": "pvscsi",
}
_AHCI = ("ich9-ahci", "ahci")
_NET_KEY = re.compile(r"net([0-9]|[12][0-9]|3[01])")


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
    warnings: list[str] = []
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
    for key, disk in sorted(disks.items()):
        if key not in keys and not disk.is_cdrom and not disk.excluded and key not in excluded:
            warnings.append(f"{source} has disk {key}, which the VM does not have")
    for key in keys:
        if key not in disks:
            warnings.append(
                f"the VM's disk {key} has no line in {source}: Proxmox would restore it "
                "as an unused volume"
            )
    for key in keys:
        entry = disks.get(key)
        storage, fmt = (entry.storage, entry.format) if entry is not None else ("", "")
        kept.append(map_line(key, device_name(key), storage, fmt))
    return ("\n".join(kept) + "\n").encode("utf-8", "surrogateescape"), infos, warnings


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
    for name, path, data in items:
        if name is None:
            name = path.rsplit("/", 1)[-1]
            if keys:
                name = FIREWALL_NAME if name.endswith(".fw") else CONFIG_NAME
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


# -- what QEMU says about a VM ---------------------------------------------------------------


@attrs.frozen
class BlockDevice:
    """One entry of ``query-block``, with the qdev device behind it.

    Attributes:
        backend: the BlockBackend name (``drive-scsi0`` for ``-drive``; ``""`` for
            ``-blockdev``).
        qdev_id: the device's id (``scsi0``), or ``None`` for an anonymous device.
        device_type: its qdev type (``scsi-hd``, ``virtio-blk-pci``, ``ide-cd``;
            ``pflash0``/``pflash1`` for the firmware flash), ``None`` if unknown.
        controller: the qdev type of the controller it hangs on (``virtio-scsi-pci``,
            ``ich9-ahci``), ``None`` for a PCI device.
        controller_path: the controller's QOM path (tells controllers apart).
        node: the node to back up; ``None`` when the drive has no medium.
        size: the node's virtual size.
        filename: the image, as QEMU names it.
        read_only: the node is read-only.
        bootindex: the device's ``bootindex`` (``None``: not set).
    """

    backend: str
    qdev_id: str | None
    device_type: str | None
    controller: str | None = None
    controller_path: str | None = None
    node: str | None = None
    size: int = 0
    filename: str = ""
    read_only: bool = False
    bootindex: int | None = None

    @property
    def is_cdrom(self) -> bool:
        """A CD-ROM (or floppy) drive: removable media, never backed up (as vzdump)."""
        return self.device_type is not None and (
            self.device_type.endswith("-cd") or self.device_type == "floppy"
        )


@attrs.frozen
class Nic:
    """A network card: its id, qdev type, MAC and ``bootindex``."""

    qdev_id: str | None
    device_type: str
    mac: str
    bootindex: int | None = None


@attrs.frozen
class VmInfo:
    """What QMP tells about a VM that a Proxmox config can say.

    Attributes:
        name: ``-name`` (``""`` when unset).
        memory: the base memory in bytes.
        sockets, cores, threads: the CPU topology of the present vCPUs.
        machine: the machine type (``pc-q35-7.2``, ``pc-i440fx-7.2``).
        uuid: the SMBIOS UUID (``None`` when all zero).
        vmgenid: the VM generation id (``None`` without a ``vmgenid`` device).
        blocks: every ``query-block`` entry.
        nics: every network card.
    """

    name: str = ""
    memory: int = 0
    sockets: int = 1
    cores: int = 1
    threads: int = 1
    machine: str = ""
    uuid: str | None = None
    vmgenid: str | None = None
    blocks: tuple[BlockDevice, ...] = ()
    nics: tuple[Nic, ...] = ()


@attrs.frozen
class GuestDisk:
    """A disk to back up, under its Proxmox config key.

    Attributes:
        key: the config key (``scsi0``); its archive device is ``drive-KEY``.
        block: what QEMU said of it.
        bus_note: how the key was chosen, when it was not the device's own id.
    """

    key: str
    block: BlockDevice
    bus_note: str = ""

    @property
    def name(self) -> str:
        """The archive device name (``drive-scsi0``)."""
        return device_name(self.key)


def _bus_prefix(block: BlockDevice) -> tuple[str, str]:
    """The key prefix a device's bus gives, and a note when it is a guess."""
    kind = block.device_type or ""
    if kind == "pflash1":
        return "efidisk", ""
    if kind.startswith("virtio-blk"):
        return "virtio", ""
    if kind.startswith("scsi-"):
        return "scsi", ""
    if kind.startswith("ide-"):
        return ("sata", "") if block.controller in _AHCI else ("ide", "")
    return "scsi", f"{kind or 'unknown device'}, which Proxmox has no bus for: stored as SCSI"


def assign_keys(blocks: Sequence[BlockDevice]) -> tuple[list[GuestDisk], list[str]]:
    """Choose the disks of a VM and their Proxmox keys.

    A device whose id (or ``drive-KEY`` BlockBackend name) already is a Proxmox key
    keeps it; the others get the lowest free index of their bus's key (virtio-blk ->
    ``virtioN``, scsi-hd -> ``scsiN``, ide-hd on IDE -> ``ideN``, on AHCI -> ``sataN``,
    the OVMF variables flash -> ``efidisk0``).  CD-ROMs, empty drives and the firmware
    code flash are left out, one line each; read-only disks are disks.

    Returns:
        The disks sorted by key, and the lines saying what was left out and why.

    Raises:
        ValueError: a bus has no free key left.
    """
    skipped: list[str] = []
    own: dict[int, str] = {}
    candidates: list[tuple[int, BlockDevice]] = []
    for i, block in enumerate(blocks):
        label = block.qdev_id or block.backend or block.node or f"#{i}"
        if block.device_type == "pflash0":
            skipped.append(f"'{label}': the firmware code flash (not a disk of the VM)")
            continue
        if block.is_cdrom:
            skipped.append(f"'{label}': CD-ROM drive")
            continue
        if block.node is None:
            skipped.append(f"'{label}': empty drive")
            continue
        candidates.append((i, block))
        for ident in (block.qdev_id, key_of_device(block.backend), block.backend):
            if ident is not None and is_disk_key(ident) and ident not in own.values():
                own[i] = ident
                break
    taken = set(own.values())
    disks = []
    for i, block in candidates:
        if i in own:
            disks.append(GuestDisk(own[i], block))
            continue
        prefix, note = _bus_prefix(block)
        index = next((n for n in range(KEY_LIMITS[prefix]) if f"{prefix}{n}" not in taken), None)
        if index is None:
            who = block.qdev_id or block.backend or block.node
            raise ValueError(f"no free Proxmox key {prefix}N left for disk {who}")
        taken.add(f"{prefix}{index}")
        disks.append(GuestDisk(f"{prefix}{index}", block, note))
    return sorted(disks, key=lambda d: d.key), skipped


def _scsihw(disks: Sequence[GuestDisk]) -> str | None:
    scsi = [d.block for d in disks if d.key.startswith("scsi") and d.block.controller]
    if not scsi:
        return None
    kind = scsi[0].controller or ""
    hw = SCSI_HW.get(kind)
    if hw == "virtio-scsi-pci":
        paths = [b.controller_path for b in scsi]
        if len(paths) > 1 and len(set(paths)) == len(paths):
            hw = "virtio-scsi-single"  # a controller per disk
    return hw


def _boot_order(disks: Sequence[GuestDisk], nics: Mapping[str, Nic]) -> list[str]:
    indexed = [(d.block.bootindex, d.key) for d in disks if d.block.bootindex is not None]
    indexed += [(n.bootindex, key) for key, n in nics.items() if n.bootindex is not None]
    if indexed:
        return [key for _, key in sorted(indexed)]
    # No bootindex: the firmware's default order, disks first.
    return [d.key for d in disks if not d.key.startswith("efidisk")]


def _disk_value(disk: GuestDisk) -> str:
    # Restore replaces file= of every mapped line, but the line must parse: an absolute
    # path is a valid value; anything else becomes a placeholder volume id.
    filename = disk.block.filename
    volume = filename if filename.startswith("/") and "," not in filename else "nbdvma:" + disk.key
    options = [f"size={format_size(disk.block.size)}"]
    if disk.key.startswith("efidisk") and disk.block.size >= 540672:
        options.insert(0, "efitype=4m")
    return ",".join([volume, *options])


def generate_config(vm: VmInfo, disks: Sequence[GuestDisk]) -> bytes:
    """A ``qemu-server.conf`` that describes ``vm`` as well as QEMU can tell.

    ``name``, ``memory`` (MiB), ``sockets``/``cores``, ``machine`` (``q35``; i440fx is
    Proxmox's default and is left out), ``bios: ovmf`` when the VM has an OVMF
    variables flash, ``scsihw``, one line per disk (file: the image's path, restore
    replaces it; ``size=``), the NICs (``net0: virtio=MAC,bridge=vmbr0``: QEMU does
    not know the host's bridge), ``boot: order=``, ``smbios1: uuid=``, ``vmgenid``, and
    the map lines.  What QEMU cannot tell (OS type, storage names, bridges, VLANs,
    CPU flags, display) is left to Proxmox's defaults.
    """
    lines: list[str] = []
    nics: dict[str, Nic] = {}
    used = {
        n.qdev_id
        for n in vm.nics
        if n.qdev_id and re.fullmatch(r"net([0-9]|[12][0-9]|3[01])", n.qdev_id)
    }
    free = (f"net{i}" for i in range(32) if f"net{i}" not in used)
    for nic in vm.nics:
        model = NIC_MODELS.get(nic.device_type)
        if model is None:
            continue
        key = nic.qdev_id if nic.qdev_id in used else next(free, None)
        if key is not None:
            nics[key] = nic
    order = _boot_order(disks, nics)
    if order:
        lines.append(f"boot: order={';'.join(order)}")
    if any(d.key.startswith("efidisk") for d in disks):
        lines.append("bios: ovmf")
    lines.append(f"cores: {max(1, vm.cores * vm.threads)}")
    if "q35" in vm.machine:
        lines.append("machine: q35")
    if vm.memory:
        lines.append(f"memory: {vm.memory // (1 << 20)}")
    name = _dns_name(vm.name)
    if name:
        lines.append(f"name: {name}")
    for key, nic in sorted(nics.items()):
        lines.append(f"{key}: {NIC_MODELS[nic.device_type]}={nic.mac.upper()},bridge=vmbr0")
    hw = _scsihw(disks)
    if hw:
        lines.append(f"scsihw: {hw}")
    if vm.uuid:
        lines.append(f"smbios1: uuid={vm.uuid}")
    lines.append(f"sockets: {max(1, vm.sockets)}")
    for disk in disks:
        lines.append(f"{disk.key}: {_disk_value(disk)}")
    if vm.vmgenid:
        lines.append(f"vmgenid: {vm.vmgenid}")
    lines.sort(key=lambda line: line.split(":", 1)[0])  # Proxmox writes keys sorted
    for disk in disks:
        lines.append(map_line(disk.key, disk.name))
    return ("\n".join(lines) + "\n").encode()


def _dns_name(name: str) -> str:
    """Proxmox's ``name`` must be a DNS name: other characters become ``-``."""
    cleaned = re.sub(r"[^A-Za-z0-9.-]", "-", name).strip("-.")
    return cleaned[:63]


# -- vzdump's file names -----------------------------------------------------------------------


def vzdump_name(vmid: int, when: datetime.datetime, compress: str | None) -> str:
    """``vzdump-qemu-VMID-YYYY_MM_DD-HH_MM_SS.vma[.zst]`` for a backup started at ``when``."""
    if not VMID_MIN <= vmid <= VMID_MAX:
        raise ValueError(f"VMID {vmid} is outside {VMID_MIN}..{VMID_MAX}")
    ext = ".vma.zst" if compress == "zstd" else ".vma"
    return f"vzdump-qemu-{vmid}-{when.strftime('%Y_%m_%d-%H_%M_%S')}{ext}"


def vzdump_vmid(basename: str) -> int | None:
    """The VMID of a vzdump archive name, ``None`` when the name is not vzdump's."""
    m = VZDUMP_ARCHIVE.match(basename)
    return int(m.group(1)) if m else None


def archive_log_name(archive: str) -> str:
    """vzdump's log beside an archive: the name without ``.vma[.EXT]``, plus ``.log``."""
    return re.sub(r"\.vma(\.(zst|lzo|gz))?$", "", archive) + ".log"
