"""Hand-built VMA archives for the reader and tool tests.

These helpers use only :mod:`nbdvma.vma.format` (``build_header`` and
``encode_extent_header``), so the reader is tested independently of the writer.
:func:`image_archive` is a tiny reference writer with the C writer's conventions
(4 KiB zero detection, blocks past the end zero-marked, 58 clusters per extent);
:class:`Slot`/:func:`extent` build any extent, valid or not, byte by byte.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import attrs

from nbdvma.vma.format import (
    VMA_BLOCK_SIZE,
    VMA_CLUSTER_SIZE,
    WRITER_CLUSTERS_PER_EXTENT,
    BlockInfo,
    build_header,
    encode_extent_header,
)

UUID = bytes(range(16))
CTIME = 1_700_000_000
ZERO_BLOCK = bytes(VMA_BLOCK_SIZE)


def block(fill: int) -> bytes:
    """A 4 KiB block of one repeated byte value."""
    return bytes([fill]) * VMA_BLOCK_SIZE


@attrs.frozen
class Slot:
    """One blockinfo slot and the blocks stored for it."""

    dev_id: int
    cluster: int
    mask: int
    blocks: bytes = b""

    @classmethod
    def from_cluster(cls, dev_id: int, cluster: int, data: bytes, size: int | None = None) -> Slot:
        """Zero-detect a 64 KiB cluster like the C writer (blocks past ``size`` are zero)."""
        data = data.ljust(VMA_CLUSTER_SIZE, b"\0")
        mask = 0
        stored = bytearray()
        base = cluster * VMA_CLUSTER_SIZE
        for j in range(16):
            chunk = data[j * VMA_BLOCK_SIZE : (j + 1) * VMA_BLOCK_SIZE]
            offset = base + j * VMA_BLOCK_SIZE
            if (size is None or offset < size) and chunk != ZERO_BLOCK:
                mask |= 1 << j
                if size is not None and offset + VMA_BLOCK_SIZE > size:
                    chunk = chunk[: size - offset].ljust(VMA_BLOCK_SIZE, b"\0")
                stored += chunk
        return cls(dev_id, cluster, mask, bytes(stored))


def extent(slots: Sequence[Slot], *, uuid: bytes = UUID, block_count: int | None = None) -> bytes:
    """An extent: header (with md5) + stored blocks; ``block_count`` may lie."""
    data = b"".join(s.blocks for s in slots)
    if block_count is None:
        block_count = len(data) // VMA_BLOCK_SIZE
    infos = [BlockInfo(s.dev_id, s.cluster, s.mask).pack() for s in slots]
    return encode_extent_header(uuid, block_count, infos) + data


def header(
    devices: Sequence[tuple[str, int]] = (("disk0", 4 * VMA_CLUSTER_SIZE),),
    configs: Sequence[tuple[str, bytes]] = (("qemu-server.conf", b"memory: 512\n"),),
    *,
    uuid: bytes = UUID,
    ctime: int = CTIME,
) -> bytes:
    """A valid header region, as the C writer lays it out."""
    return build_header(uuid=uuid, ctime=ctime, configs=list(configs), devices=list(devices))


def image_archive(
    images: Sequence[tuple[str, bytes]],
    configs: Sequence[tuple[str, bytes]] = (("qemu-server.conf", b"memory: 512\n"),),
    *,
    sizes: Sequence[int] | None = None,
    order: str = "sequential",
) -> bytes:
    """A complete archive of whole images (device sizes default to the data lengths).

    ``order="interleaved"`` alternates the devices' clusters, as ``vma create``'s
    coroutines may.
    """
    sizes = list(sizes) if sizes is not None else [len(d) for _, d in images]
    devices = [(name, size) for (name, _), size in zip(images, sizes, strict=True)]
    per_dev: list[list[Slot]] = []
    for dev_id, ((_, data), size) in enumerate(zip(images, sizes, strict=True), start=1):
        count = -(-size // VMA_CLUSTER_SIZE)
        per_dev.append(
            [
                Slot.from_cluster(
                    dev_id, c, data[c * VMA_CLUSTER_SIZE : (c + 1) * VMA_CLUSTER_SIZE], size
                )
                for c in range(count)
            ]
        )
    if order == "interleaved":
        slots: list[Slot] = []
        for i in range(max((len(p) for p in per_dev), default=0)):
            slots.extend(p[i] for p in per_dev if i < len(p))
    else:
        slots = [s for p in per_dev for s in p]
    out = bytearray(header(devices, configs))
    if not slots:
        out += extent([])
    for i in range(0, len(slots), WRITER_CLUSTERS_PER_EXTENT):
        out += extent(slots[i : i + WRITER_CLUSTERS_PER_EXTENT])
    return bytes(out)


def refresh_header_md5(head: bytearray) -> bytearray:
    """Recompute the header md5 after a test edited ``head`` (the whole header region)."""
    head[32:48] = bytes(16)
    head[32:48] = hashlib.md5(head).digest()
    return head


def refresh_extent_md5(ext: bytearray) -> bytearray:
    """Recompute the md5 of a 512-byte extent header after an edit."""
    ext[24:40] = bytes(16)
    ext[24:40] = hashlib.md5(ext[:512]).digest()
    return ext


def header_size_of(archive: bytes) -> int:
    """``header_size`` of an archive (bytes 56..59)."""
    return int(struct.unpack_from(">I", archive, 56)[0])
