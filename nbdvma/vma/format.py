"""Byte layouts and constants of the Proxmox VMA format (vma.h), and their codecs.

Everything here is pure: encoders build bytes, ``*_untrusted`` parsers take bytes
from a file and raise only :class:`~nbdvma.errors.VmaFormatError`.  The layout is the
one Proxmox's C writer produces (see ``shared/docs/vma-format.md``):

* a 12288-byte fixed header (big-endian), then the blob buffer (little-endian 2-byte
  lengths, strings with their NUL), zero padded to a multiple of 512;
* extents: a 512-byte header with 59 blockinfo slots, then the stored 4 KiB blocks.
"""

from __future__ import annotations

import hashlib
import struct
from typing import NamedTuple

import attrs

from nbdvma.errors import VmaFormatError

__all__ = [
    "BLOCKS_PER_CLUSTER",
    "FULL_MASK",
    "VMA_BLOCKS_PER_EXTENT",
    "VMA_BLOCK_SIZE",
    "VMA_CLUSTER_SIZE",
    "VMA_EXTENT_HEADER_SIZE",
    "VMA_EXTENT_MAGIC",
    "VMA_HEADER_SIZE",
    "VMA_MAGIC",
    "VMA_MAX_CONFIGS",
    "VMA_MAX_DEVICES",
    "VMA_MAX_EXTENT_SIZE",
    "VMA_MAX_HEADER_SIZE",
    "VMA_VERSION",
    "VMA_VMSTATE_NAME",
    "WRITER_CLUSTERS_PER_EXTENT",
    "BlockInfo",
    "DeviceInfo",
    "ExtentHeader",
    "VmaHeader",
    "build_header",
    "encode_extent_header",
]

VMA_BLOCK_SIZE = 4096
VMA_CLUSTER_SIZE = 65536
BLOCKS_PER_CLUSTER = VMA_CLUSTER_SIZE // VMA_BLOCK_SIZE  # 16: one mask bit each
#: The mask of a cluster stored whole: every 4 KiB block present.
FULL_MASK = (1 << BLOCKS_PER_CLUSTER) - 1
VMA_EXTENT_HEADER_SIZE = 512
#: Cluster slots per extent (the name in vma.h says "blocks"; they are clusters).
VMA_BLOCKS_PER_EXTENT = 59
#: The C writer flushes an extent before a 59th cluster; we do the same.
WRITER_CLUSTERS_PER_EXTENT = VMA_BLOCKS_PER_EXTENT - 1
VMA_MAX_CONFIGS = 256
VMA_MAX_DEVICES = 254  # dev ids 1..254; 0 means "empty slot", 255 is reserved
VMA_MAX_EXTENT_SIZE = VMA_EXTENT_HEADER_SIZE + VMA_BLOCKS_PER_EXTENT * VMA_CLUSTER_SIZE
VMA_MAX_EXTENT_BLOCKS = VMA_BLOCKS_PER_EXTENT * BLOCKS_PER_CLUSTER  # 944
VMA_MAGIC = b"VMA\0"
VMA_EXTENT_MAGIC = b"VMAE"
VMA_VERSION = 1
#: sizeof(VmaHeader): also the blob buffer offset the C writer stores.
VMA_HEADER_SIZE = 12288
#: HEADERBUF_SIZE of the C writer: the largest header it can emit.
VMA_MAX_HEADER_SIZE = 8 * 65536
VMA_MAX_BLOB_SIZE = 65535
VMA_VMSTATE_NAME = "vmstate"

# magic, version, uuid, ctime, md5, blob_buffer_offset, blob_buffer_size, header_size
_HEADER_FIXED = struct.Struct(">4sI16sq16sIII")
_CONFIG_NAMES_OFFSET = 2044
_CONFIG_DATA_OFFSET = 3068
_DEV_INFO_OFFSET = 4096
_PTR_TABLE = struct.Struct(">256I")
_DEV_INFO = struct.Struct(">II Q Q Q")  # devname_ptr, reserved0, size, reserved1, reserved2
_MD5_SLICE = slice(32, 48)
_BLOB_LEN = struct.Struct("<H")  # the one little-endian field of the format

_EXTENT_FIXED = struct.Struct(">4sHH16s16s")  # magic, reserved1, block_count, uuid, md5
_BLOCKINFO = struct.Struct(">59Q")
#: The dev_id byte of a packed blockinfo value (0: an unused slot).
_SLOT_DEV_ID_BITS = 0xFF << 32
_EXTENT_MD5_SLICE = slice(24, 40)
assert _EXTENT_FIXED.size + _BLOCKINFO.size == VMA_EXTENT_HEADER_SIZE


def _c_int(value: int) -> int:
    """A u32 as the C reader's ``%d`` prints it (wrapped to a signed int)."""
    return value - (1 << 32) if value >= 1 << 31 else value


@attrs.frozen
class DeviceInfo:
    """One present device of the archive header."""

    dev_id: int
    name: str
    size: int

    @property
    def is_vmstate(self) -> bool:
        """Whether this is the VM-state stream (a device named ``vmstate``)."""
        return self.name == VMA_VMSTATE_NAME

    @property
    def cluster_count(self) -> int:
        """Number of 64 KiB clusters covering ``size`` bytes."""
        return -(-self.size // VMA_CLUSTER_SIZE)


@attrs.frozen
class VmaHeader:
    """The parsed archive header: what ``vma list`` shows."""

    uuid: bytes
    ctime: int
    header_size: int
    configs: tuple[tuple[str, bytes], ...]
    devices: tuple[DeviceInfo, ...]

    @classmethod
    def from_bytes_untrusted(cls, head: bytes) -> VmaHeader:
        """Parse and check a complete header region (``header_size`` bytes).

        Applies the reader's checks H5-H9 in its order; H1-H4 (lengths, magic) are
        the caller's, see :func:`header_size_untrusted`.

        Raises:
            VmaFormatError: with the message Proxmox's reader uses.
        """
        _magic, version, uuid, ctime, md5, blob_off, blob_size, header_size = (
            _HEADER_FIXED.unpack_from(head, 0)
        )
        if len(head) != header_size:
            raise VmaFormatError(f"can't read vma header data - got {len(head)} bytes")
        zeroed = bytearray(head)
        zeroed[_MD5_SLICE] = bytes(16)
        if hashlib.md5(zeroed).digest() != md5:
            raise VmaFormatError("wrong vma header chechsum")
        if version != VMA_VERSION:
            raise VmaFormatError(f"wrong vma version {_c_int(version)}")
        bstart = (blob_off + 1) & 0xFFFFFFFF
        bend = (blob_off + blob_size) & 0xFFFFFFFF
        if bstart <= VMA_HEADER_SIZE:
            raise VmaFormatError(f"wrong vma blob buffer offset {_c_int(blob_off)}")
        if bend > header_size:
            raise VmaFormatError(
                f"wrong vma blob buffer size {_c_int(blob_off)}/{_c_int(blob_size)}"
            )
        blobs = _read_blobs(head, blob_off, bstart, bend)
        configs = _read_configs(head, blobs)
        devices = _read_devices(head, blobs)
        return cls(bytes(uuid), ctime, header_size, configs, devices)

    @property
    def vmstate(self) -> DeviceInfo | None:
        """The VM-state device: the reader takes the last one named ``vmstate``."""
        found = None
        for dev in self.devices:
            if dev.is_vmstate:
                found = dev
        return found

    def config(self, name: str) -> bytes | None:
        """The data of the first config called ``name``, or ``None``."""
        for cname, data in self.configs:
            if cname == name:
                return data
        return None


def _read_blobs(head: bytes, blob_off: int, bstart: int, bend: int) -> dict[int, bytes]:
    """The blobs of the blob buffer by their pointer, walked as the C reader does."""
    blobs: dict[int, bytes] = {}
    pos = bstart
    while pos + 2 <= bend:
        (length,) = _BLOB_LEN.unpack_from(head, pos)
        if pos + length + 2 <= bend:
            blobs[pos - blob_off] = bytes(head[pos + 2 : pos + 2 + length])
        pos += length + 2
    return blobs


def _blob_string(blobs: dict[int, bytes], ptr: int) -> str | None:
    """The NUL-terminated string at ``ptr``, or ``None`` where the C reader finds none."""
    blob = blobs.get(ptr)
    if blob is None:
        return None
    # The C reader tests the byte before the data for an empty blob: that is the high
    # byte of the length, 0, so an empty blob passes as "".
    if blob and blob[-1] != 0:
        return None
    return blob.split(b"\0", 1)[0].decode("utf-8", "replace")


def _read_configs(head: bytes, blobs: dict[int, bytes]) -> tuple[tuple[str, bytes], ...]:
    """The (name, data) configs, in slot order (H9: their pointers must be valid)."""
    names = _PTR_TABLE.unpack_from(head, _CONFIG_NAMES_OFFSET)
    datas = _PTR_TABLE.unpack_from(head, _CONFIG_DATA_OFFSET)
    configs: list[tuple[str, bytes]] = []
    for name_ptr, data_ptr in zip(names, datas, strict=True):
        if not name_ptr or not data_ptr:
            continue
        name = _blob_string(blobs, name_ptr)
        data = blobs.get(data_ptr)
        if name is None or data is None:
            raise VmaFormatError("vma contains invalid data pointers")
        configs.append((name, data))
    return tuple(configs)


def _read_devices(head: bytes, blobs: dict[int, bytes]) -> tuple[DeviceInfo, ...]:
    """The present devices: a size and a valid name."""
    devices: list[DeviceInfo] = []
    for dev_id in range(1, 256):
        devname_ptr, _r0, size, _r1, _r2 = _DEV_INFO.unpack_from(
            head, _DEV_INFO_OFFSET + 32 * dev_id
        )
        if not size:
            continue
        name = _blob_string(blobs, devname_ptr)
        if name is None:
            continue
        devices.append(DeviceInfo(dev_id, name, size))
    return tuple(devices)


def header_size_untrusted(fixed: bytes) -> int:
    """Check the first 12288 bytes (H1-H3) and return ``header_size``.

    Raises:
        VmaFormatError: short header, wrong magic or impossible header size.
    """
    if len(fixed) < VMA_HEADER_SIZE:
        raise VmaFormatError(f"can't read vma header - got {len(fixed)} bytes")
    if fixed[:4] != VMA_MAGIC:
        raise VmaFormatError("not a vma file - wrong magic number")
    header_size = _HEADER_FIXED.unpack_from(fixed, 0)[7]
    need = header_size - VMA_HEADER_SIZE
    # The C reader computes this in an int: a header_size past 2**31 wraps negative.
    if need <= 0 or need >= 2**31:
        raise VmaFormatError(f"wrong vma header size {_c_int(header_size)}")
    return int(header_size)


class _BlobTable:
    """The blob buffer as the C writer fills it, and the room it allocates for it."""

    def __init__(self) -> None:
        self.table = bytearray(1)  # relative byte 0 is never a blob: pointer 0 means "none"
        self.allocated = 0

    def add(self, data: bytes) -> int:
        """Append a blob; return its pointer (relative to the buffer)."""
        if len(data) > VMA_MAX_BLOB_SIZE:
            raise ValueError(f"blob of {len(data)} bytes exceeds {VMA_MAX_BLOB_SIZE}")
        # The C writer's growth rule (writer:101-110): when the blob does not fit, grow
        # the table by the blob's size rounded up to 512.  That rule decides
        # header_size.  (The C writer grows once; when its first blob is an exact
        # multiple of 512 that is one byte short, a heap overrun: we grow again.)
        need = len(data) + 2
        while self.allocated < len(self.table) + need:
            self.allocated += -(-need // 512) * 512
        ptr = len(self.table)
        self.table.extend(_BLOB_LEN.pack(len(data)))
        self.table.extend(data)
        return ptr


def build_header(
    *,
    uuid: bytes,
    ctime: int,
    configs: list[tuple[str, bytes]],
    devices: list[tuple[str, int]],
) -> bytes:
    """Encode a header exactly as the C writer lays it out.

    Args:
        uuid: 16 bytes, repeated in every extent header.
        ctime: seconds since the epoch.
        configs: (name, data) in slot order; at most 256, each blob at most 65535 bytes.
        devices: (name, size) for dev ids 1, 2, ... in order; at most 254.

    Returns:
        ``header_size`` bytes: the md5 set, the blob table padded to 512.

    Raises:
        ValueError: a limit of the format is exceeded.
    """
    if len(configs) > VMA_MAX_CONFIGS:
        raise ValueError(f"too many configs ({len(configs)} > {VMA_MAX_CONFIGS})")
    if len(devices) > VMA_MAX_DEVICES:
        raise ValueError(f"too many devices ({len(devices)} > {VMA_MAX_DEVICES})")
    blobs = _BlobTable()
    name_ptrs = [0] * 256
    data_ptrs = [0] * 256
    for slot, (name, data) in enumerate(configs):
        name_ptrs[slot] = blobs.add(name.encode() + b"\0")
        data_ptrs[slot] = blobs.add(data)
    dev_entries = []
    for name, size in devices:
        dev_entries.append((blobs.add(name.encode() + b"\0"), size))
    table = blobs.table
    blob_size = len(table)
    header_size = VMA_HEADER_SIZE + blobs.allocated
    if header_size > VMA_MAX_HEADER_SIZE:
        raise ValueError(f"header of {header_size} bytes exceeds {VMA_MAX_HEADER_SIZE}")
    head = bytearray(header_size)
    _HEADER_FIXED.pack_into(
        head, 0, VMA_MAGIC, VMA_VERSION, uuid, ctime, bytes(16),
        VMA_HEADER_SIZE, blob_size, header_size,
    )  # fmt: skip
    _PTR_TABLE.pack_into(head, _CONFIG_NAMES_OFFSET, *name_ptrs)
    _PTR_TABLE.pack_into(head, _CONFIG_DATA_OFFSET, *data_ptrs)
    for dev_id, (ptr, size) in enumerate(dev_entries, start=1):
        _DEV_INFO.pack_into(head, _DEV_INFO_OFFSET + 32 * dev_id, ptr, 0, size, 0, 0)
    head[VMA_HEADER_SIZE : VMA_HEADER_SIZE + blob_size] = table
    head[_MD5_SLICE] = hashlib.md5(head).digest()
    return bytes(head)


class BlockInfo(NamedTuple):
    """One blockinfo slot: a cluster of a device and its 16-bit zero mask.

    A named tuple rather than an attrs record: the reader makes one per cluster of
    an archive (millions for a large disk), and a tuple is made and unpacked
    several times faster.
    """

    dev_id: int
    cluster: int
    mask: int

    def pack(self) -> int:
        """The big-endian u64 value: ``mask<<48 | dev_id<<32 | cluster``."""
        return (self.mask << 48) | (self.dev_id << 32) | self.cluster


def encode_extent_header(uuid: bytes, block_count: int, blockinfo: list[int]) -> bytes:
    """Encode a 512-byte extent header with its md5.

    Args:
        uuid: the archive uuid.
        block_count: number of 4 KiB blocks stored after the header.
        blockinfo: packed u64 slots (at most 59; the rest are zero).
    """
    slots = blockinfo + [0] * (VMA_BLOCKS_PER_EXTENT - len(blockinfo))
    head = bytearray(VMA_EXTENT_HEADER_SIZE)
    _EXTENT_FIXED.pack_into(head, 0, VMA_EXTENT_MAGIC, 0, block_count, uuid, bytes(16))
    _BLOCKINFO.pack_into(head, _EXTENT_FIXED.size, *slots)
    head[_EXTENT_MD5_SLICE] = hashlib.md5(head).digest()
    return bytes(head)


@attrs.frozen
class ExtentHeader:
    """A parsed extent header: its block count and its 59 blockinfo slots."""

    block_count: int
    #: Every slot's u64 value (``BlockInfo.pack``), unused ones (dev_id 0) included.
    values: tuple[int, ...]

    @property
    def triples(self) -> tuple[tuple[int, int, int], ...]:
        """The used slots as plain ``(dev_id, cluster, mask)`` tuples, in slot order:
        made without a Python-level call per slot (a reader sees one per cluster of
        the archive).  The reserved byte (bits 40-47) is ignored, as the C reader
        ignores it."""
        return tuple(
            [
                ((v >> 32) & 0xFF, v & 0xFFFFFFFF, v >> 48)
                for v in self.values
                if v & _SLOT_DEV_ID_BITS
            ]
        )

    @property
    def slots(self) -> tuple[BlockInfo, ...]:
        """The used slots as :class:`BlockInfo` records."""
        return tuple(BlockInfo._make(t) for t in self.triples)

    def zero_run(self) -> tuple[int, int, int] | None:
        """``(dev_id, first_cluster, count)`` when the used slots are the first
        ``count`` and hold consecutive clusters of one device with mask 0 (how a
        sparse disk's empty stretches are stored); ``None`` otherwise.

        Answered by comparing the slot values with a ``range`` in C, not slot by slot:
        an index pass over a sparse 64 GiB disk meets a million such slots.
        """
        values = self.values
        first = values[0]
        # Slot 0 used, its mask and reserved byte 0.
        if first >> 40 or not first & _SLOT_DEV_ID_BITS:
            return None
        count = values.index(0) if values[-1] == 0 else len(values)
        if (first & 0xFFFFFFFF) + count > 1 << 32:
            return None  # the cluster numbers would carry into the dev_id
        if values[:count] != tuple(range(first, first + count)) or any(values[count:]):
            return None
        return (first >> 32, first & 0xFFFFFFFF, count)

    @classmethod
    def from_bytes_untrusted(
        cls, head: bytes | bytearray | memoryview, uuid: bytes
    ) -> ExtentHeader:
        """Check a 512-byte extent header (S3-S5, in the reader's order) and parse it.

        Raises:
            VmaFormatError: with the reader's message.
        """
        if len(head) != VMA_EXTENT_HEADER_SIZE:
            raise VmaFormatError(f"read short extent ({len(head)} bytes)")
        magic, reserved1, block_count, ext_uuid, md5 = _EXTENT_FIXED.unpack_from(head, 0)
        zeroed = bytearray(head)
        zeroed[_EXTENT_MD5_SLICE] = bytes(16)
        if hashlib.md5(zeroed).digest() != md5:
            raise VmaFormatError("wrong vma extent header chechsum")
        if ext_uuid != uuid:
            raise VmaFormatError("wrong vma extent uuid")
        if magic != VMA_EXTENT_MAGIC or reserved1 != 0:
            raise VmaFormatError("wrong vma extent header magic")
        return cls(block_count, _BLOCKINFO.unpack_from(head, _EXTENT_FIXED.size))
