"""The clusters of one disk a reader has seen, to find duplicates and gaps.

Proxmox's reader keeps one bit per cluster of each disk, in an array of ``unsigned
long`` sized from the disk's size in sectors; a cluster number past that array is an
assertion there (S8 of ``docs/vma-format.md``), a bit seen twice a duplicate (S9), a
bit never seen a missing cluster (S15).  :class:`SeenClusters` has the same bounds,
but allocates its bits in chunks as clusters occur: a header that claims a huge disk
costs memory only for the clusters that are really there.
"""

from __future__ import annotations

from nbdvma.vma.format import VMA_CLUSTER_SIZE

__all__ = ["SeenClusters"]

_SECTOR = 512
_SECTORS_PER_CLUSTER = VMA_CLUSTER_SIZE // _SECTOR  # 128
_BITS_PER_LONG = 64  # the C bitmap is an array of unsigned long (x86-64)
#: Clusters covered by one lazily allocated chunk (64 KiB of bits).
_CHUNK_SHIFT = 19
_CHUNK_CLUSTERS = 1 << _CHUNK_SHIFT
_CHUNK_MASK = _CHUNK_CLUSTERS - 1


class SeenClusters:
    """Seen-clusters bitmap of one disk, bounded like the C reader's (S8)."""

    __slots__ = ("chunks", "limit")

    def __init__(self, size: int) -> None:
        """The bitmap of a disk of ``size`` bytes (nothing allocated yet)."""
        longs = -(-(size // _SECTOR) // (_SECTORS_PER_CLUSTER * _BITS_PER_LONG))
        self.limit = longs * _BITS_PER_LONG  # clusters the C bitmap can hold
        self.chunks: dict[int, bytearray] = {}

    def test_and_set(self, cluster: int) -> bool:
        """Mark ``cluster`` seen; return whether it was seen before."""
        chunk = self.chunks.get(cluster >> _CHUNK_SHIFT)
        if chunk is None:
            chunk = self.chunks[cluster >> _CHUNK_SHIFT] = bytearray(_CHUNK_CLUSTERS // 8)
        byte = (cluster & _CHUNK_MASK) >> 3
        bit = 1 << (cluster & 7)
        old = chunk[byte]
        if old & bit:
            return True
        chunk[byte] = old | bit
        return False

    def mark_run(self, first: int, count: int) -> bool:
        """Mark ``count`` clusters from ``first`` seen, if none was and they lie in one
        chunk; whether they were marked (if not, nothing was)."""
        last = first + count - 1
        if first >> _CHUNK_SHIFT != last >> _CHUNK_SHIFT:
            return False
        chunk = self.chunks.get(first >> _CHUNK_SHIFT)
        if chunk is None:
            chunk = self.chunks[first >> _CHUNK_SHIFT] = bytearray(_CHUNK_CLUSTERS // 8)
        lo, hi = (first & _CHUNK_MASK) >> 3, ((last & _CHUNK_MASK) >> 3) + 1
        bits = ((1 << count) - 1) << (first & 7)  # bit k: byte k >> 3, bit k & 7
        old = int.from_bytes(chunk[lo:hi], "little")
        if old & bits:
            return False
        chunk[lo:hi] = (old | bits).to_bytes(hi - lo, "little")
        return True

    def first_missing(self, count: int) -> int | None:
        """The lowest cluster below ``count`` never seen, or ``None``."""
        for chunk_no in range(-(-count // _CHUNK_CLUSTERS)):
            base = chunk_no * _CHUNK_CLUSTERS
            chunk = self.chunks.get(chunk_no)
            if chunk is None:
                return base
            want = min(count - base, _CHUNK_CLUSTERS)
            full, rest = divmod(want, 8)
            head = bytes(chunk[:full])
            first = len(head) - len(head.lstrip(b"\xff"))
            if first < full:
                byte = chunk[first]
                for shift in range(8):
                    if not byte >> shift & 1:
                        return base + 8 * first + shift
            for shift in range(rest):
                if not chunk[full] >> shift & 1:
                    return base + 8 * full + shift
        return None
