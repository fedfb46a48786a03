"""The index word of a cluster (its layout: :mod:`nbdvma.vma.index`), and block status
read from runs of words.

:func:`block_runs` answers NBD's ``base:allocation`` query from a disk's words alone,
in C where the clusters are whole runs.
"""

from __future__ import annotations

import re
import sys
from array import array

from nbdvma.vma.format import FULL_MASK, VMA_BLOCK_SIZE, VMA_CLUSTER_SIZE

__all__ = [
    "BLOCK_SHIFT",
    "CLUSTER_SHIFT",
    "OFFSET_BITS",
    "OFFSET_MASK",
    "STATUS_CLUSTERS",
    "STATUS_RUNS",
    "block_runs",
]

#: Bits 0-47: the offset of the first stored block (48 bits reach 256 TiB).
OFFSET_BITS = 48
OFFSET_MASK = (1 << OFFSET_BITS) - 1
CLUSTER_SHIFT = 16  # log2(VMA_CLUSTER_SIZE)
BLOCK_SHIFT = 12  # log2(VMA_BLOCK_SIZE)
_BLOCKS = VMA_CLUSTER_SIZE // VMA_BLOCK_SIZE
#: Clusters one block-status answer looks at (1 GiB): a client asks again for the rest.
STATUS_CLUSTERS = 16384
#: Runs one block-status answer gives at most.
STATUS_RUNS = 64
# A run of index words of one kind, matched in the words' bytes in C rather than by
# a Python loop per cluster (a 4 MiB stored run is 64 clusters): the mask is a word's
# top 16 bits, its bytes 6-7 in memory on a little-endian machine (0-1 on a big one).
_MASK_AT = 6 if sys.byteorder == "little" else 0


def _run_of(mask: bytes) -> re.Pattern[bytes]:
    """Words whose mask bytes are ``mask``, as many as follow one another."""
    word = b"." * _MASK_AT + re.escape(mask) + b"." * (6 - _MASK_AT)
    return re.compile(b"(?:" + word + b")*", re.DOTALL)


_ZERO_RUN = _run_of(b"\x00\x00")
_FULL_RUN = _run_of(b"\xff\xff")


def block_runs(
    clusters: array[int], size: int, offset: int, length: int, max_runs: int
) -> list[tuple[int, bool]]:
    """``(length, is zero)`` runs of a disk of ``size`` bytes from ``offset``, from
    its index words: zero clusters and 4 KiB blocks are holes.  At most
    :data:`STATUS_CLUSTERS` clusters are looked at and at most ``max_runs`` runs
    returned, each whole (:meth:`~nbdvma.vma.index.IndexedArchive.block_status`)."""
    end = min(offset + length, size, offset + STATUS_CLUSTERS * VMA_CLUSTER_SIZE)
    last = (end - 1) >> CLUSTER_SHIFT  # the last cluster to look at
    runs: list[tuple[int, bool]] = []
    pos = offset
    while pos < end:
        c = pos >> CLUSTER_SHIFT
        cluster_start = c << CLUSTER_SHIFT
        mask = clusters[c] >> OFFSET_BITS
        if mask in (0, FULL_MASK):
            if c < last and clusters[c + 1] >> OFFSET_BITS == mask:
                # The clusters of this kind from here on, at once.
                same = (_FULL_RUN if mask else _ZERO_RUN).match(
                    memoryview(clusters).cast("B"),
                    c * clusters.itemsize,
                    (last + 1) * clusters.itemsize,
                )
                assert same is not None  # (a pattern that matches the empty string)
                stop = min((same.end() // clusters.itemsize) << CLUSTER_SHIFT, end)
            else:
                stop = min(cluster_start + VMA_CLUSTER_SIZE, end)
            zero = mask == 0
        else:
            # The blocks from here that are stored, or not, like this one.
            j = (pos - cluster_start) >> BLOCK_SHIFT
            rest = mask >> j
            zero = not rest & 1
            same_bits = rest if zero else ~rest  # its trailing zeros count them
            n = (same_bits & -same_bits).bit_length() - 1 if same_bits else _BLOCKS - j
            stop = min(cluster_start + ((j + n) << BLOCK_SHIFT), end)
        # A step that does not move on would spin the serving thread for ever.
        assert stop > pos, (pos, stop)
        if _add_run(runs, stop - pos, zero) and len(runs) > max_runs:
            runs.pop()  # the run just begun may go on: only whole ones
            return runs
        pos = stop
    return runs


def _add_run(runs: list[tuple[int, bool]], length: int, zero: bool) -> bool:
    """Extend the last run or begin a new one; whether a new one was begun."""
    if runs and runs[-1][1] == zero:
        runs[-1] = (runs[-1][0] + length, zero)
        return False
    runs.append((length, zero))
    return True
