"""Proxmox VE's restore rules, written out as a test oracle.

``qmrestore`` (qemu-server ``restore_vma_archive``, ``parse_backup_hints``,
``restore_update_config_line``; pve-storage ``archive_info``; pve-qemu's ``vma-reader.c``)
refuses an archive for reasons that nbdvma's own reader never checks.  This module states
those rules once, so that every test that produces an archive can apply them
(``shared/docs/proxmox-restore.md``):

* :func:`restore_problems`: what ``qmrestore`` would say about an archive's
  ``qemu-server.conf`` and device list (empty: it restores);
* :func:`vmstate_as_proxmox_extracts`: the ``vmstate.bin`` that Proxmox's reader writes,
  which appends only the 4 KiB blocks present in each VM-state cluster's mask;
* :data:`VZDUMP_ARCHIVE`: the file names ``archive_info`` accepts.

The archive is parsed with nbdvma's format layouts only (no reader), so a reader bug
cannot hide here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import zstandard

from nbdvma.vma.format import (
    VMA_BLOCK_SIZE,
    VMA_EXTENT_HEADER_SIZE,
    VMA_HEADER_SIZE,
    ExtentHeader,
    VmaHeader,
    header_size_untrusted,
)

#: ``parse_backup_hints``: the trailing colon is required; ``$`` with CRLF fails.
MAP_LINE = re.compile(r"^\#qmdump\#map:(\S+):(\S+):(\S*):(\S*):$")
#: ``restore_update_config_line``: the config keys whose ``file=`` restore rewrites.
DISK_KEY = re.compile(r"^((?:ide|scsi|virtio|sata|efidisk|tpmstate)\d+):\s*(\S+)\s*$")
#: pve-storage ``archive_info`` (for a QEMU VM: vzdump-qemu-VMID-DATE-TIME.vma[.EXT]).
VZDUMP_ARCHIVE = re.compile(
    r"^vzdump-qemu-([1-9][0-9]{2,8})-(\d{4})_(\d{2})_(\d{2})-(\d{2})_(\d{2})_(\d{2})"
    r"\.vma(\.(?:zst|lzo|gz))?$"
)
#: Keys that restore copies as they are although they point at nothing restored.
FORBIDDEN_KEYS = ("vmstate", "lock")

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _plain(archive: bytes) -> bytes:
    if archive.startswith(ZSTD_MAGIC):
        return zstandard.ZstdDecompressor().stream_reader(archive, read_across_frames=True).read()
    return archive


def archive_devices(archive: bytes) -> tuple[VmaHeader, list[str]]:
    """The header and the names of the devices ``vma extract`` prints as ``DEV:``
    lines (every device but ``vmstate``)."""
    data = _plain(archive)
    header = VmaHeader.from_bytes_untrusted(data[: header_size_untrusted(data[:VMA_HEADER_SIZE])])
    return header, [d.name for d in header.devices if not d.is_vmstate]


def archive_problems(archive: bytes) -> tuple[bytes | None, list[str]]:
    """The archive's ``qemu-server.conf`` (``None`` without one) and what ``qmrestore``
    would refuse about it (:func:`restore_problems`)."""
    header, devices = archive_devices(archive)
    config = header.config("qemu-server.conf")
    if config is None:
        return None, ["unable to read qemu-server.conf - No such file or directory"]
    return config, restore_problems(config, devices)


def restore_problems(config: bytes, devices: Sequence[str]) -> list[str]:
    """What ``qmrestore`` would refuse, in its own words, for this ``qemu-server.conf``
    and these ``DEV:`` device names; empty when restore goes through.

    Beyond what restore itself checks, a mapped key without a config line (its volume
    would end up ``unusedN``) and the keys restore copies blindly (``vmstate:``,
    ``lock:``) count as problems, and so do CR line endings.
    """
    problems: list[str] = []
    if b"\r" in config:
        problems.append("CR in qemu-server.conf: the map lines would not match")
    text = config.decode()
    lines = text.split("\n")
    mapping: dict[str, str] = {}  # devname -> key
    keys_with_lines: set[str] = set()
    for line in lines:
        if line.startswith("["):  # a snapshot section: restore stops reading here
            break
        m = MAP_LINE.match(line)
        if m:
            key, devname = m.group(1), m.group(2)
            if devname in mapping:
                problems.append(f"two map lines for {devname}")
            mapping[devname] = key
            continue
        if line.startswith("#qmdump#"):
            problems.append(f"malformed map line {line!r}")
            continue
        key = line.split(":", 1)[0]
        if key in FORBIDDEN_KEYS:
            problems.append(f"restore would copy {line!r}")
        if DISK_KEY.match(line):
            keys_with_lines.add(key)
    for name in devices:
        if name not in mapping:
            problems.append(f"found no device mapping information for device '{name}'")
    for devname, key in mapping.items():
        if devname not in devices:
            problems.append(f"archive does not contain data for drive '{key}'")
        if key not in keys_with_lines:
            problems.append(f"no config line for {key}: its volume would be unused")
    return problems


def vmstate_as_proxmox_extracts(archive: bytes) -> bytes:
    """``vmstate.bin`` as Proxmox's ``vma extract`` writes it.

    ``restore_extent`` appends, for each cluster of the ``vmstate`` device in archive
    order, only the 4 KiB blocks whose mask bit is set (the device is never registered,
    so zero blocks are not written).
    """
    data = _plain(archive)
    header_size = header_size_untrusted(data[:VMA_HEADER_SIZE])
    header = VmaHeader.from_bytes_untrusted(data[:header_size])
    vmstate = header.vmstate
    assert vmstate is not None, "the archive has no vmstate device"
    out = bytearray()
    pos = header_size
    while pos < len(data):
        ext = ExtentHeader.from_bytes_untrusted(
            data[pos : pos + VMA_EXTENT_HEADER_SIZE], header.uuid
        )
        pos += VMA_EXTENT_HEADER_SIZE
        for slot in ext.slots:
            for j in range(16):
                if slot.mask >> j & 1:
                    if slot.dev_id == vmstate.dev_id:
                        out += data[pos : pos + VMA_BLOCK_SIZE]
                    pos += VMA_BLOCK_SIZE
    return bytes(out)


def main(argv: Sequence[str]) -> int:
    """``python tests/pverules.py ARCHIVE [VMSTATE]``: print what ``qmrestore`` would
    refuse (nothing: exit 0), and write the ``vmstate.bin`` Proxmox's reader extracts."""
    with open(argv[0], "rb") as f:
        archive = f.read()
    _, problems = archive_problems(archive)
    name = argv[0].rsplit("/", 1)[-1]
    if not VZDUMP_ARCHIVE.match(name):
        problems.append(f"couldn't determine archive info from '{name}'")
    for problem in problems:
        print(f"qmrestore would fail: {problem}")
    if len(argv) > 1:
        with open(argv[1], "wb") as f:
            f.write(vmstate_as_proxmox_extracts(archive))
    return 1 if problems else 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
