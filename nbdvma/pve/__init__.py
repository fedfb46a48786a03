"""Proxmox VE's view of an archive: ``qemu-server.conf``, ``#qmdump#map`` lines, vzdump names.

Proxmox restores a VMA archive only through the VM config stored in it
(``shared/docs/proxmox-restore.md``): ``qmrestore`` reads the blob ``qemu-server.conf``,
and for every device of the archive it needs a line
``#qmdump#map:KEY:DEVNAME:STORAGE:FORMAT:`` naming the config key (``scsi0``) that the
device (``drive-scsi0``) restores; there is no fallback from the device name.  Restoring
from a file also needs vzdump's file name (``vzdump-qemu-100-2026_12_03-12_00_00.vma.zst``).

This package is pure (no I/O): it turns a user's config, or what QEMU says about a VM
(:class:`VmInfo`, gathered over QMP by :mod:`nbdvma.vminfo`), into the config text that
``vzdump`` would have stored, and names archives as vzdump does.  The rules follow
qemu-server's ``assemble`` (what is copied), ``parse_backup_hints`` (the map regex) and
``restore_update_config_line`` (what restore rewrites).
"""

from nbdvma.pve.config import (
    CONFIG_NAME,
    FIREWALL_NAME,
    KEY_LIMITS,
    VMID_MAX,
    VMID_MIN,
    VZDUMP_ARCHIVE,
    ConfigDisk,
    archive_configs,
    archive_log_name,
    device_name,
    format_size,
    is_disk_key,
    key_of_device,
    map_line,
    parse_config_disks,
    parse_disk_value,
    split_config_argument,
    stored_config_name,
    vzdump_name,
    vzdump_vmid,
    with_map_lines,
)
from nbdvma.pve.vm import (
    NIC_MODELS,
    SCSI_HW,
    BlockDevice,
    GuestDisk,
    Nic,
    VmInfo,
    assign_keys,
    generate_config,
)

__all__ = [
    "CONFIG_NAME",
    "FIREWALL_NAME",
    "KEY_LIMITS",
    "NIC_MODELS",
    "SCSI_HW",
    "VMID_MAX",
    "VMID_MIN",
    "VZDUMP_ARCHIVE",
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
