"""The null backend's record of what was written (it decides when ``--backend null``
ends), against a model: a set of bytes."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from nbdvma.backends import _Coverage

ranges = st.lists(
    st.tuples(st.integers(0, 200), st.integers(0, 40)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=30,
)


@given(ranges)
def test_coverage_counts_each_byte_once_and_keeps_disjoint_sorted_ranges(
    writes: list[tuple[int, int]],
) -> None:
    coverage = _Coverage()
    model: set[int] = set()
    for start, end in writes:
        coverage.add(start, end)
        model.update(range(start, end))
        assert coverage.covered == len(model)
    pairs = list(zip(coverage.starts, coverage.ends, strict=True))
    assert {i for s, e in pairs for i in range(s, e)} == model
    assert all(s < e for s, e in pairs)
    # Merged: each range ends strictly before the next one starts (no touching ranges).
    assert all(e < s2 for (_, e), (s2, _) in itertools.pairwise(pairs))


def test_sequential_writes_keep_one_range() -> None:
    coverage = _Coverage()
    for off in range(0, 1 << 20, 65536):
        coverage.add(off, off + 65536)
    assert (coverage.starts, coverage.ends, coverage.covered) == ([0], [1 << 20], 1 << 20)
