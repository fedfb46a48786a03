"""A VM as QEMU describes it, and the Proxmox config that describes it as well as QEMU can.

:mod:`nbdvma.vminfo` gathers a :class:`VmInfo` over QMP; :func:`assign_keys` gives each
disk its config key from its bus, and :func:`generate_config` writes the
``qemu-server.conf`` stored when the user gives none (``docs/proxmox.md``).  Pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import attrs

from nbdvma.pve.config import (
    KEY_LIMITS,
    device_name,
    format_size,
    is_disk_key,
    key_of_device,
    map_line,
)

__all__ = [
    "NIC_MODELS",
    "SCSI_HW",
    "BlockDevice",
    "GuestDisk",
    "Nic",
    "VmInfo",
    "assign_keys",
    "generate_config",
]

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
    """A disk of the VM under its Proxmox config key: what a backup takes.

    Attributes:
        key: the config key (``scsi0``); its archive device is ``drive-KEY``.
        block: what QEMU said of it.
        bus_note: how the key was chosen, when it was not the device's own id.
        volume: what the log calls it: the volume of its line in the user's config
            (``local-lvm:vm-100-disk-0``), else QEMU's image name.
    """

    key: str
    block: BlockDevice
    bus_note: str = ""
    volume: str = ""

    @property
    def name(self) -> str:
        """The archive device name (``drive-scsi0``)."""
        return device_name(self.key)

    @property
    def node(self) -> str:
        """The block node the backup job reads (``""`` for a drive without medium)."""
        return self.block.node or ""

    @property
    def size(self) -> int:
        """Its exact size in bytes."""
        return self.block.size


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
