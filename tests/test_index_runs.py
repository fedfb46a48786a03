"""Block status from an archive's index (nbdvma.vma.indexwords.block_runs) against a model
that looks at every 4 KiB block: runs of whole clusters are matched in the index
words' bytes at once, runs inside a cluster counted from its mask's bits."""

from __future__ import annotations

from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdvma.vma.format import FULL_MASK, VMA_BLOCK_SIZE, VMA_CLUSTER_SIZE
from nbdvma.vma.indexwords import STATUS_CLUSTERS, block_runs

_OFFSET_BITS = 48  # the index word: mask << 48 | offset of the first stored block

# Masks as archives have them: mostly whole clusters stored or zero, in runs.
masks = st.lists(
    st.one_of(
        st.just(0),
        st.just(FULL_MASK),
        st.integers(1, FULL_MASK - 1),
        st.sampled_from([1, 0x8000, 0x7FFF, 0xFFFE, 0x00FF, 0xFF00]),
    ),
    min_size=1,
    max_size=40,
)


def _words(cluster_masks: list[int], runs: list[int]) -> array[int]:
    """The index words: each mask repeated as ``runs`` say, with made-up offsets."""
    words = array("Q")
    for mask, repeat in zip(cluster_masks, runs, strict=False):
        for _ in range(repeat):
            offset = 0 if mask == 0 else 4096 * (len(words) + 1)
            words.append(mask << _OFFSET_BITS | offset)
    return words


def _model(words: array[int], size: int, offset: int, length: int) -> list[tuple[int, bool]]:
    end = min(offset + length, size, offset + STATUS_CLUSTERS * VMA_CLUSTER_SIZE)
    runs: list[tuple[int, bool]] = []
    pos = offset
    while pos < end:
        c, b = divmod(pos, VMA_CLUSTER_SIZE)
        stop = min(pos - b % VMA_BLOCK_SIZE + VMA_BLOCK_SIZE, end)
        zero = not (words[c] >> _OFFSET_BITS) >> (b // VMA_BLOCK_SIZE) & 1
        if runs and runs[-1][1] == zero:
            runs[-1] = (runs[-1][0] + stop - pos, zero)
        else:
            runs.append((stop - pos, zero))
        pos = stop
    return runs


@settings(max_examples=400, deadline=None)
@given(
    cluster_masks=masks,
    repeats=st.lists(st.integers(1, 5), min_size=40, max_size=40),
    start=st.floats(0, 1),
    span=st.floats(0, 1.2),
    tail=st.integers(0, VMA_CLUSTER_SIZE - 1),
    max_runs=st.sampled_from([1, 2, 3, 64, 10_000]),
)
def test_block_runs_match_a_block_by_block_model(
    cluster_masks: list[int],
    repeats: list[int],
    start: float,
    span: float,
    tail: int,
    max_runs: int,
) -> None:
    words = _words(cluster_masks, repeats)
    # A disk whose last cluster may be cut short, as a disk of odd size is.
    size = len(words) * VMA_CLUSTER_SIZE - tail
    offset = min(int(start * size), size - 1)
    length = max(1, int(span * size))
    model = _model(words, size, offset, length)
    got = block_runs(words, size, offset, length, max_runs)
    if len(model) <= max_runs:
        assert got == model
    else:
        # Only whole runs: the last one the model has may go on past the answer.
        assert got == model[:max_runs]
