"""The backends apart from the server: the null backend's record of what was written (it
decides when ``--backend null`` ends), against a model; where the VMA backend does its work."""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

import trio
from hypothesis import given
from hypothesis import strategies as st

from nbdvma.backends import VmaBackend, _Coverage, acquire_lock
from nbdvma.vma.format import VMA_CLUSTER_SIZE as CLUSTER
from nbdvma.vma.format import WRITER_CLUSTERS_PER_EXTENT
from nbdvma.vma.sink import open_sink
from nbdvma.vma.writer import VmaWriter

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


def _zero_writer(path: Path) -> tuple[VmaBackend, VmaWriter, list[str]]:
    """A VMA backend whose sink records the thread each extent is written in."""
    sink = open_sink(str(path))
    writer = VmaWriter(sink)
    dev_id = writer.add_device("drive-scsi0", 4096 * CLUSTER)
    backend = VmaBackend(writer, {"drive-scsi0": dev_id})
    threads: list[str] = []
    append = sink.append

    def recording_append(*args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread().name)
        return append(*args, **kwargs)

    sink.append = recording_append  # type: ignore[method-assign]
    return backend, writer, threads


async def test_zeroes_that_complete_an_extent_are_written_off_the_event_loop(
    tmp_path: Path,
) -> None:
    """Zeroes that complete a partly written cluster queue it; once that fills an
    extent, the extent is hashed and written: never on the event loop (``zero_now``
    declines, ``zero`` takes a thread).  Zeroes over untouched clusters, which queue
    nothing, are done at once however large."""
    backend, writer, threads = _zero_writer(tmp_path / "a.vma")
    name = "drive-scsi0"
    dev_id = writer.devices[0][0]
    full = WRITER_CLUSTERS_PER_EXTENT  # an extent, written when one more is queued
    writer.write(dev_id, 0, os.urandom(full * CLUSTER))
    for c in (100, 200):  # the first block of each: partial
        writer.write(dev_id, c * CLUSTER, os.urandom(4096))
    threads.clear()  # the archive's header went out with the first extent's queueing
    assert backend.zero_now(name, 1000 * CLUSTER, 3000 * CLUSTER)  # untouched: marked
    assert backend.zero_now(name, 300 * CLUSTER + 4096, 9 * CLUSTER)  # partial, no data
    # Completing cluster 100 fills the extent: declined, and nothing done.
    rest = (100 * CLUSTER + 4096, CLUSTER - 4096)
    assert not backend.zero_now(name, *rest)
    assert threads == []
    await backend.zero(name, *rest, fua=False)
    assert threads
    assert threading.main_thread().name not in threads
    # Zeroes inside partly written clusters only: no extent, at once.
    threads.clear()
    assert backend.zero_now(name, 200 * CLUSTER + 4096, 4096)
    assert threads == []


async def test_acquire_lock_takes_a_free_lock_without_a_pass_through_the_scheduler() -> None:
    """A free lock is taken at once (no other task runs meanwhile, so none sees it held
    and declines); a held one is waited for."""
    lock = trio.Lock()
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await acquire_lock(lock)
        assert ran == []
        lock.release()
    assert ran == ["other"]

    async def holder(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with lock:
            task_status.started()
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        await nursery.start(holder)
        assert lock.locked()
        with trio.fail_after(5):
            await acquire_lock(lock)  # waits for the holder
        lock.release()
