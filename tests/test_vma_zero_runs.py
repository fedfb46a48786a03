"""Extents of consecutive zero clusters, recognised from the slot values at once.

A sparse disk's archive is mostly extents whose 59 slots are consecutive clusters of
one disk with mask 0; :meth:`ExtentHeader.zero_run` tells them apart without a tuple
per slot, and the reader then checks them in one step (``ZeroRun``).  The reader's
results for such extents are compared with a slot-by-slot model in
``test_vma_reader.py``; here: the recognition itself, against a model, and that the
reader takes the one-step path.
"""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdvma.vma.format import (
    VMA_BLOCKS_PER_EXTENT,
    VMA_CLUSTER_SIZE,
    ExtentHeader,
    build_header,
    encode_extent_header,
)
from nbdvma.vma.reader import VmaReader, ZeroRun

UUID = bytes(range(16))
_CLUSTER_BITS = 0xFFFFFFFF


def _value(dev: int, cluster: int, mask: int = 0, reserved: int = 0) -> int:
    return mask << 48 | reserved << 40 | dev << 32 | cluster


def _model(values: list[int]) -> tuple[int, int, int] | None:
    """Slot by slot: the used slots (dev_id != 0) must be the first ``count``, of one
    disk, with mask and reserved byte 0, each cluster one more than the last."""
    used = [v for v in values if v >> 32 & 0xFF]
    count = len(used)
    if not count or values[:count] != used:
        return None
    dev, first = used[0] >> 32 & 0xFF, used[0] & _CLUSTER_BITS
    for i, v in enumerate(used):
        if v >> 40 or v >> 32 != dev or (v & _CLUSTER_BITS) != first + i:
            return None
    return dev, first, count


@st.composite
def _slot_values(draw: st.DrawFn) -> list[int]:
    """Mostly a run (some crossing the 32-bit cluster limit), then perhaps one slot
    changed: unused, another disk, a mask, the reserved byte, a repeated cluster."""
    count = draw(st.integers(0, VMA_BLOCKS_PER_EXTENT))
    dev = draw(st.integers(1, 3))
    first = draw(st.sampled_from([0, 1, 1000, 2**32 - count, 2**32 - count + 1, 2**32 - 1]))
    if draw(st.booleans()):
        values = [_value(dev, (first + i) & _CLUSTER_BITS) for i in range(count)]
    else:  # past cluster 2**32 - 1 the values go on into the next dev_id
        values = [_value(dev, first) + i for i in range(count)]
    values += [0] * (VMA_BLOCKS_PER_EXTENT - count)
    if draw(st.booleans()):
        i = draw(st.integers(0, VMA_BLOCKS_PER_EXTENT - 1))
        values[i] = draw(
            st.sampled_from(
                [
                    0,
                    _value(dev % 3 + 1, first + i),
                    _value(dev, first + i, mask=1 << draw(st.integers(0, 15))),
                    _value(dev, first + i, reserved=1 << draw(st.integers(0, 7))),
                    values[i - 1] if i else 1,
                    _value(dev, first + i + 1),
                ]
            )
        )
    return values


@settings(max_examples=500, deadline=None)
@given(values=_slot_values())
def test_zero_run_is_what_the_slots_say(values: list[int]) -> None:
    head = ExtentHeader.from_bytes_untrusted(encode_extent_header(UUID, 0, values), UUID)
    assert head.zero_run() == _model(values)
    run = head.zero_run()
    if run is not None:  # the run says what the slots say
        dev, first, count = run
        assert head.triples == tuple((dev, first + i, 0) for i in range(count))


def _archive(*extents: list[int], size: int) -> bytes:
    header = build_header(uuid=UUID, ctime=0, configs=[], devices=[("drive-scsi0", size)])
    return header + b"".join(encode_extent_header(UUID, 0, values) for values in extents)


def test_the_reader_checks_a_run_in_one_step() -> None:
    run = [_value(1, c) for c in range(59)]
    broken = [_value(1, c, reserved=1 if c == 62 else 0) for c in range(59, 118)]
    archive = io.BytesIO(_archive(run, broken, size=118 * VMA_CLUSTER_SIZE))
    with VmaReader(archive) as reader:  # type: ignore[arg-type]
        got = list(reader.extents())
        reader.check_missing()
    assert type(got[0]) is ZeroRun
    # The reserved byte set: checked slot by slot, with the same result (ignored).
    assert type(got[1]) is list
    assert [c.cluster for ext in got for c in ext] == list(range(118))
