"""Write-behind: full extents sealed on the event loop and written by a worker thread.

The writer's side against a model (what each call may do to the sink, what the archive
holds at the end, a failed write retried), and the VMA backend's: the next requests are
taken while an extent is being written.  Archives are parsed with the format layer of
``test_vma_writer`` (not nbdvma's reader).
"""

from __future__ import annotations

import errno
import random
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_vma_writer import parse

from nbdvma.backends import VmaBackend
from nbdvma.errors import ClusterConflictError
from nbdvma.vma.extents import SEALED_MAX
from nbdvma.vma.format import VMA_CLUSTER_SIZE as C
from nbdvma.vma.format import WRITER_CLUSTERS_PER_EXTENT as FULL
from nbdvma.vma.sink import FileSink, open_sink
from nbdvma.vma.writer import VmaWriter

CLUSTERS = 6 * FULL
SIZE = CLUSTERS * C
# The disk written: every fifth cluster zero, so zeroes over it rewrite nothing.
IMAGE = bytearray(random.Random(7).randbytes(SIZE))
for _c in range(0, CLUSTERS, 5):
    IMAGE[_c * C : (_c + 1) * C] = bytes(C)
ZERO_CLUSTERS = list(range(0, CLUSTERS, 5))
#: Data in every cluster: each one queued.
DATA = random.Random(8).randbytes(SIZE)


class Recorder:
    """Counts the units a sink is asked to append (the extents)."""

    def __init__(self, sink: FileSink) -> None:
        self.appends = 0
        real = sink.append

        def append(parts: Sequence[bytes | bytearray | memoryview]) -> int:
            self.appends += 1
            return real(parts)

        sink.append = append  # type: ignore[method-assign]


def new_writer(path: Path) -> tuple[VmaWriter, int, Recorder]:
    sink = open_sink(str(path))
    assert isinstance(sink, FileSink)
    recorder = Recorder(sink)
    writer = VmaWriter(sink, write_behind=True)
    return writer, writer.add_device("drive-scsi0", SIZE), recorder


writes = st.tuples(
    st.integers(0, CLUSTERS - 1),  # first cluster
    st.integers(0, 15).map(lambda b: b * 4096),  # start inside it
    st.integers(1, 40 * C // 4096).map(lambda n: n * 4096),  # length
).map(lambda t: ("write", t[0] * C + t[1], min(t[2], SIZE - t[0] * C - t[1])))
zeroes = st.tuples(st.sampled_from(ZERO_CLUSTERS), st.integers(1, 4096)).map(
    lambda t: ("zero", t[0] * C, min(t[1] * 16, C))
)
ops = st.lists(st.one_of(writes, writes, zeroes, st.just(("write_sealed", 0, 0))), max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_write_behind_against_a_model(steps: list[tuple[str, int, int]]) -> None:
    """``may_write_extent(now=True)`` says when a call may write to the sink itself
    (never while fewer than SEALED_MAX extents are sealed); the plain hint, when it may
    fill an extent (written or sealed); reads see sealed clusters; the archive holds
    every byte written exactly once, zeros elsewhere."""
    expected = bytearray(SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.vma"
        writer, dev, rec = new_writer(path)
        for op, offset, length in steps:
            if op == "write_sealed":
                writer.write_sealed()
                assert not writer.sealed_waiting()
                continue
            if op == "write":
                now = writer.may_write_extent(length, offset=offset, now=True)
                fill = writer.may_write_extent(length, offset=offset)
            else:
                now = writer.zeroes_may_write_extent(dev, offset, length, now=True)
                fill = writer.zeroes_may_write_extent(dev, offset, length)
            appends = rec.appends
            sealed = len(writer._extents.sealed)
            if op == "write":
                writer.write(dev, offset, IMAGE[offset : offset + length])
                expected[offset : offset + length] = IMAGE[offset : offset + length]
            else:
                writer.write_zeroes(dev, offset, length)
            wrote = rec.appends > appends
            assert not wrote or now, (op, offset, length)
            assert not (wrote or len(writer._extents.sealed) > sealed) or fill
            assert len(writer._extents.sealed) <= SEALED_MAX
            if op == "write":  # what is there now reads back, sealed or not
                assert writer.read(dev, offset, length) == IMAGE[offset : offset + length]
        writer.finish()
        assert parse(path.read_bytes()).disk(dev) == expected


def test_sealed_extents_wait_for_write_sealed_and_read_back(tmp_path: Path) -> None:
    writer, dev, rec = new_writer(tmp_path / "a.vma")
    data = DATA[C : (1 + SEALED_MAX * FULL + 1) * C]
    writer.write(dev, C, data)  # fills SEALED_MAX extents: all sealed, nothing written
    assert rec.appends == 0
    assert len(writer._extents.sealed) == SEALED_MAX
    assert writer.read(dev, C, 2 * C) == data[: 2 * C]  # from a sealed extent
    writer.write(dev, C, data[:C])  # an identical rewrite of a sealed cluster: a no-op
    with pytest.raises(ClusterConflictError):
        writer.write(dev, C, bytes(C))
    writer.write_sealed()
    assert rec.appends == SEALED_MAX
    assert not writer.sealed_waiting()
    assert writer.read(dev, C, 2 * C) == data[: 2 * C]  # now from the file
    writer.finish()
    expected = bytearray(SIZE)
    expected[C : C + len(data)] = data
    assert parse((tmp_path / "a.vma").read_bytes()).disk(dev) == expected


class _PopsWhileIterated(list):  # type: ignore[type-arg]
    """The sealed list as a reader on the event loop may meet it: the write-behind
    thread pops the oldest extent (written) after the reader took its first item."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        first = True
        for item in list.__iter__(self):
            yield item
            if first:
                first = False
                self.pop(0)


def test_a_sealed_cluster_reads_back_while_the_oldest_is_popped(tmp_path: Path) -> None:
    writer, dev, _ = new_writer(tmp_path / "a.vma")
    data = DATA[: (3 * FULL + 1) * C]
    writer.write(dev, 0, data)  # three extents sealed
    extents = writer._extents
    extents._write(extents.sealed[0][0])  # the first one written, not yet popped
    extents.sealed = _PopsWhileIterated(extents.sealed)
    at = (FULL + 3) * C  # a cluster of the second sealed extent
    assert writer.read(dev, at, C) == data[at : at + C]


def test_a_full_extent_beyond_sealed_max_is_written_by_the_call(tmp_path: Path) -> None:
    writer, dev, rec = new_writer(tmp_path / "a.vma")
    end = (SEALED_MAX * FULL + 1) * C
    writer.write(dev, 0, DATA[:end])  # SEALED_MAX sealed, one cluster pending
    assert writer.may_write_extent(FULL * C, offset=end, now=True)
    assert not writer.may_write_extent((FULL - 1) * C, offset=end, now=True)
    writer.write(dev, end, DATA[end : end + (FULL - 1) * C])  # the extent is full
    assert rec.appends == 0
    writer.write(dev, end + (FULL - 1) * C, DATA[end + (FULL - 1) * C : end + FULL * C])
    assert rec.appends == SEALED_MAX + 1  # the sealed ones first, then the full one
    assert not writer.sealed_waiting()
    writer.finish()
    assert (
        parse((tmp_path / "a.vma").read_bytes()).disk(dev)[: end + FULL * C]
        == DATA[: end + FULL * C]
    )


@pytest.mark.parametrize("write_behind", [False, True])
def test_may_write_extent_counts_the_clusters_a_write_can_complete(
    tmp_path: Path, write_behind: bool
) -> None:
    """Exact at the edge: an extent goes when its 59th cluster comes.  A write that is
    not cluster-aligned can complete one cluster more than its length covers."""
    sink = open_sink(str(tmp_path / "a.vma"))
    writer = VmaWriter(sink, write_behind=write_behind)
    dev = writer.add_device("drive-scsi0", SIZE)
    writer.write(dev, 0, DATA[: (FULL - 2) * C])  # room for two more
    half = C // 2
    writer.write(dev, 100 * C, DATA[100 * C : 100 * C + half])  # partial clusters
    writer.write(dev, 102 * C + half, DATA[102 * C + half : 103 * C])
    aligned = 200 * C
    assert not writer.may_write_extent(2 * C, offset=aligned)  # 58: the extent is full
    assert writer.may_write_extent(3 * C, offset=aligned)
    assert writer.may_write_extent(2 * C, offset=100 * C + half)  # completes 100, 101, 102
    assert writer.may_write_extent(2 * C)  # offset unknown: as many as it could
    assert not writer.may_write_extent(C + 1)  # at most two clusters
    assert writer.may_write_extent(2 * C, offset=100 * C + half, now=True) != write_behind
    assert not writer.zeroes_may_write_extent(dev, 100 * C + half, half)  # one more
    writer.write(dev, 100 * C + half, DATA[100 * C + half : 102 * C + half])
    assert writer.sealed_waiting() == write_behind  # the 59th cluster came


def test_a_sealed_extent_that_failed_is_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while writing a sealed extent: it stays sealed (its clusters in memory),
    the next write_sealed writes it, nothing is lost or duplicated."""
    import nbdvma.vma.sink as sink_module

    real = sink_module._write_all
    fail = [True]

    def flaky(fd: int, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        if fail[0] and len(parts) > 1:  # an extent, not the header
            fail[0] = False
            real(fd, [b"".join(bytes(p) for p in parts)[:1000]])  # half a unit, then full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, parts)

    monkeypatch.setattr(sink_module, "_write_all", flaky)
    writer, dev, _ = new_writer(tmp_path / "a.vma")
    data = DATA[: (FULL + 1) * C]
    writer.write(dev, 0, data)
    assert writer.sealed_waiting()
    with pytest.raises(OSError, match="No space"):
        writer.write_sealed()
    assert writer.sealed_waiting()
    assert writer.read(dev, 0, C) == data[:C]
    writer.write_sealed()
    writer.finish()
    expected = bytearray(SIZE)
    expected[: len(data)] = data
    assert parse((tmp_path / "a.vma").read_bytes()).disk(dev) == expected


def test_release_writes_a_sealed_extent_that_holds_the_buffer(tmp_path: Path) -> None:
    writer, dev, rec = new_writer(tmp_path / "a.vma")
    buf = bytearray(DATA[: FULL * C])
    writer.write(dev, 0, buf, owned=True)
    writer.write(dev, FULL * C, DATA[FULL * C : (FULL + 1) * C])  # seals buf's extent
    assert writer.sealed_waiting()
    writer.release(buf)  # the caller may now reuse buf: nothing refers to it
    assert not writer.sealed_waiting()
    assert rec.appends == 2  # the sealed extent and the one cluster pending
    buf[:] = bytes(len(buf))
    writer.finish()
    assert (
        parse((tmp_path / "a.vma").read_bytes()).disk(dev)[: (FULL + 1) * C]
        == DATA[: (FULL + 1) * C]
    )


async def test_requests_go_on_while_a_sealed_extent_is_written(tmp_path: Path) -> None:
    """The request that fills an extent writes it in a worker thread holding only the
    sink lock: a write that arrives meanwhile is taken at once (``write_now``), and
    the filling request is answered only once its extent is written."""
    path = tmp_path / "a.vma"
    sink = open_sink(str(path))
    writer = VmaWriter(sink, write_behind=True)
    dev = writer.add_device("drive-scsi0", SIZE)
    backend = VmaBackend(writer, {"drive-scsi0": dev})
    entered, go = threading.Event(), threading.Event()
    threads: list[str] = []
    real = sink.append

    def slow_append(parts: Sequence[bytes | bytearray | memoryview]) -> int:
        threads.append(threading.current_thread().name)
        entered.set()
        go.wait(10)
        return real(parts)

    sink.append = slow_append  # type: ignore[method-assign]
    writer.write(dev, 0, DATA[: (FULL - 1) * C])
    done = trio.Event()

    async def fill() -> None:
        data = DATA[(FULL - 1) * C : (FULL + 1) * C]
        await backend.pwrite("drive-scsi0", (FULL - 1) * C, data, fua=False)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fill)
        await trio.to_thread.run_sync(entered.wait, 10)
        assert not done.is_set()
        far = 200 * C
        assert backend.write_now("drive-scsi0", far, DATA[far : far + C])
        go.set()
    assert done.is_set()
    assert threads
    assert threading.main_thread().name not in threads
    writer.finish()
    expected = bytearray(SIZE)
    expected[: (FULL + 1) * C] = DATA[: (FULL + 1) * C]
    expected[200 * C : 201 * C] = DATA[200 * C : 201 * C]
    assert parse(path.read_bytes()).disk(dev) == expected
