"""What an archive's header holds: its configs and devices, checked as they come.

:class:`~nbdvma.vma.writer.VmaWriter` registers every config and device before the
first data (the header is written first and keeps its size); this is that register,
with the format's limits and Proxmox's expectations checked at each call, and the
header it makes (:func:`~nbdvma.vma.format.build_header`), with the data digest's
config where the archive carries one (:mod:`nbdvma.vma.digest`).
"""

from __future__ import annotations

import os

from nbdvma.errors import VmaWriterError
from nbdvma.vma.clusters import Disk, VmState
from nbdvma.vma.digest import DIGEST_CONFIG, DataDigest, digest_config
from nbdvma.vma.format import (
    VMA_CLUSTER_SIZE,
    VMA_MAX_BLOB_SIZE,
    VMA_MAX_CONFIGS,
    VMA_MAX_DEVICES,
    VMA_VMSTATE_NAME,
    build_header,
)

__all__ = ["Registry"]

_MAX_NAME = 200  # bytes; Proxmox device names are short ("drive-scsi0")


class Registry:
    """The configs and devices of one archive, in registration order (dev ids 1, 2...)."""

    def __init__(self, *, with_digest: bool) -> None:
        """An empty register; ``with_digest``: the header carries the data digest's
        config (which takes one of the 256 config slots)."""
        self.with_digest = with_digest
        self.configs: list[tuple[str, bytes]] = []
        self.devices: list[Disk | VmState] = []
        self.vmstate: VmState | None = None

    def add_config(self, name: str, data: bytes) -> None:
        """Store a config blob under ``basename(name)``.

        Raises:
            VmaWriterError: more than 256 configs (255 with the data digest), data over
                65535 bytes, a name that does not fit or the digest's own name.
        """
        name = os.path.basename(name)
        if name == DIGEST_CONFIG:
            raise VmaWriterError(f"config name {name!r} is reserved for the data digest")
        limit = VMA_MAX_CONFIGS - self.with_digest  # the digest takes a slot
        if len(self.configs) >= limit:
            raise VmaWriterError(f"too many configs (at most {limit})")
        if len(data) > VMA_MAX_BLOB_SIZE:
            raise VmaWriterError(
                f"config {name!r} is {len(data)} bytes; the format allows {VMA_MAX_BLOB_SIZE}"
            )
        _check_name(name, "config name")
        self.configs.append((name, bytes(data)))

    def add_device(self, name: str, size: int) -> Disk:
        """Register a disk of ``size`` bytes.

        Raises:
            VmaWriterError: more than 254 devices, a bad name or size.
        """
        _check_name(name, "device name")
        if name == VMA_VMSTATE_NAME:
            raise VmaWriterError(f"{VMA_VMSTATE_NAME!r} is the VM-state stream: use add_stream")
        if size <= 0:
            raise VmaWriterError(f"device {name!r}: size must be positive, not {size}")
        if size % 512:
            # Proxmox's reader restores whole 512-byte sectors: data in a partial last
            # sector is "write beyond end" (S12).  QEMU's disk sizes are sector multiples.
            raise VmaWriterError(
                f"device {name!r}: size {size} is not a multiple of 512 bytes, which "
                "Proxmox's reader cannot restore"
            )
        if size > 0xFFFFFFFF * VMA_CLUSTER_SIZE:
            raise VmaWriterError(f"device {name!r}: {size} bytes is past the format's 256 TiB")
        clusters = -(-size // VMA_CLUSTER_SIZE)
        disk = Disk.new(self._next_id(name), name, size, clusters)
        self.devices.append(disk)
        return disk

    def add_stream(self, name: str, size_hint: int) -> VmState:
        """Register the VM-state stream, its size in the header ``size_hint`` until
        the header is rewritten with the true length.

        Raises:
            VmaWriterError: a second stream, a bad name, more than 254 devices.
        """
        _check_name(name, "stream name")
        if self.vmstate is not None:
            raise VmaWriterError("an archive holds one VM-state stream")
        self.vmstate = VmState.new(self._next_id(name), name, max(1, size_hint), 0)
        self.devices.append(self.vmstate)
        return self.vmstate

    def _next_id(self, name: str) -> int:
        """The id of a new device called ``name``, if there is room for it."""
        if len(self.devices) >= VMA_MAX_DEVICES:
            raise VmaWriterError(f"too many devices (at most {VMA_MAX_DEVICES})")
        if any(d.name == name for d in self.devices):
            raise VmaWriterError(f"device name {name!r} is used twice")
        return len(self.devices) + 1

    def device(self, dev_id: int) -> Disk | VmState:
        """The device with this id.

        Raises:
            VmaWriterError: no such device.
        """
        if not 1 <= dev_id <= len(self.devices):
            raise VmaWriterError(f"no device with id {dev_id}")
        return self.devices[dev_id - 1]

    def header(self, uuid: bytes, ctime: int, *, final: bool, digest: DataDigest | None) -> bytes:
        """The header region: as first written (the stream's size hint, the digest's
        placeholder), or ``final`` (the stream's true length, and ``digest``)."""
        devices = []
        for dev in self.devices:
            size = dev.size
            if isinstance(dev, VmState) and final and dev.length:
                size = dev.length
            devices.append((dev.name, size))
        configs = self.configs
        if self.with_digest:
            configs = [*configs, digest_config(digest)]
        return build_header(uuid=uuid, ctime=ctime, configs=configs, devices=devices)


def _check_name(name: str, what: str) -> None:
    raw = name.encode()
    if not raw or b"\0" in raw or b"/" in raw:
        raise VmaWriterError(f"invalid {what} {name!r}")
    if len(raw) > _MAX_NAME:
        raise VmaWriterError(f"{what} too long ({len(raw)} bytes, at most {_MAX_NAME})")
