"""Linux file hints (nbdvma.vma.fileio): early write-back, preallocation, reads that never wait."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

import nbdvma.vma.fileio as wb
from nbdvma.vma.fileio import PageCache, Writeback, nowait_read_flags, preadv_nowait

MiB = 1 << 20


def helpers_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("writeback-")]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int, int]]:
    """Record the sync_file_range calls instead of making them."""
    seen: list[tuple[int, int, int, int]] = []

    def record(fd: int, offset: int, nbytes: int, flags: int) -> int:
        seen.append((fd, offset, nbytes, flags))
        return 0

    monkeypatch.setattr(wb, "_sync_file_range", record)
    # The descriptors here are made up: whatever they are in this process, not a tmpfs.
    monkeypatch.setattr(wb, "_in_memory", lambda fd: False)
    return seen


def test_ranges_are_started_a_step_at_a_time(calls: list[tuple[int, int, int, int]]) -> None:
    w = Writeback(7, step=4 * MiB)
    for off in range(0, 3 * MiB, MiB):
        w.wrote(off, MiB)
    assert not helpers_alive()
    assert not calls
    w.wrote(3 * MiB, MiB)  # the step is reached: [0, 4 MiB) is started
    for off in range(4 * MiB, 9 * MiB, MiB):
        w.wrote(off, MiB)  # [4, 8 MiB) next; the last MiB stays for fsync
    w.close()
    assert not helpers_alive()
    # Requests that queued up may have been merged; together they cover [0, 8 MiB).
    covered = sorted((off, off + n) for _, off, n, _ in calls)
    assert covered[0][0] == 0
    assert covered[-1][1] == 8 * MiB
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))
    assert {(fd, flags) for fd, _, _, flags in calls} == {(7, 2)}  # SYNC_FILE_RANGE_WRITE


def test_out_of_order_writes_are_started_as_their_hull(
    calls: list[tuple[int, int, int, int]],
) -> None:
    w = Writeback(3, step=2 * MiB)
    w.wrote(10 * MiB, MiB)
    w.wrote(2 * MiB, MiB)
    w.close()
    assert calls == [(3, 2 * MiB, 9 * MiB, 2)]


def test_closed_means_silent(calls: list[tuple[int, int, int, int]]) -> None:
    w = Writeback(3, step=MiB)
    w.close()
    w.close()  # idempotent
    w.wrote(0, 8 * MiB)
    assert not calls
    assert not helpers_alive()


def test_without_sync_file_range_nothing_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wb, "_sync_file_range", None)
    w = Writeback(3, step=MiB)
    assert not w.available
    w.wrote(0, 8 * MiB)
    assert not helpers_alive()
    w.close()


def test_nothing_to_write_back_on_a_tmpfs() -> None:
    path = Path("/dev/shm") / f"nbdvma-writeback-{os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        w = Writeback(fd, step=MiB)
        for off in range(0, 4 * MiB, MiB):
            os.pwrite(fd, bytes(MiB), off)
            w.wrote(off, MiB)
        assert not helpers_alive()
        w.close()
    finally:
        os.close(fd)
        path.unlink()


def test_real_call_on_a_file(tmp_path: Path) -> None:
    # On this Linux the call exists; the data written is what fsync makes durable.
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        w = Writeback(fd, step=MiB)
        assert w.available
        chunk = os.urandom(MiB)
        for off in range(0, 6 * MiB, MiB):
            os.pwrite(fd, chunk, off)
            w.wrote(off, MiB)
        assert helpers_alive()
        w.close()
        assert not helpers_alive()
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == chunk * 6


def test_preallocate_keeps_the_size_and_truncation_gives_it_back(tmp_path: Path) -> None:
    path = tmp_path / "p"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 4096)
        assert wb.preallocate(fd, 4096, 32 * MiB)
        st = os.fstat(fd)
        assert st.st_size == 4096
        assert st.st_blocks * 512 >= 32 * MiB
        os.ftruncate(fd, st.st_size)
        assert os.fstat(fd).st_blocks * 512 < MiB
    finally:
        os.close(fd)


def test_preallocate_that_cannot_be_done_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "p"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        # Far more than the disk holds: ENOSPC, and what part was allocated is freed.
        assert not wb.preallocate(fd, 0, 1 << 60)
        assert os.fstat(fd).st_blocks == 0
        monkeypatch.setattr(wb, "_fallocate", None)
        assert not wb.preallocate(fd, 0, MiB)
    finally:
        os.close(fd)


def test_file_sink_gives_back_what_it_reserved(tmp_path: Path) -> None:
    from nbdvma.vma.sink import FileSink

    sink = FileSink(str(tmp_path / "r.vma"))
    sink.reserve(64 * MiB)
    sink.write_header(b"h" * 4096)
    sink.append([b"e" * 8192])
    assert os.stat(tmp_path / "r.vma.part").st_blocks * 512 >= 64 * MiB
    sink.commit()
    st = os.stat(tmp_path / "r.vma")
    assert st.st_size == 4096 + 8192
    assert st.st_blocks * 512 < MiB


def test_file_sink_reserves_a_step_ahead_never_all_at_once(tmp_path: Path) -> None:
    import nbdvma.vma.sink as sink_module

    ahead = sink_module._RESERVE_AHEAD
    sink = sink_module.FileSink(str(tmp_path / "s.vma"))
    sink.reserve(1 << 40)  # an estimate far beyond the disk: only a step is taken
    assert ahead <= os.stat(tmp_path / "s.vma.part").st_blocks * 512 < 2 * ahead
    sink.write_header(b"h" * 512)
    unit = b"u" * (4 * MiB)
    for _ in range(ahead // len(unit)):
        sink.append([unit])
    # The writes went past half the step: the next step was set aside.
    size = 512 + ahead
    assert os.stat(tmp_path / "s.vma.part").st_blocks * 512 >= size + ahead // 2
    sink.commit()
    st = os.stat(tmp_path / "s.vma")
    assert st.st_size == size
    assert st.st_blocks * 512 < size + MiB


def test_nowait_read_flags_by_file_system(tmp_path: Path) -> None:
    """A tmpfs never waits (plain reads), ext4 says so per read (RWF_NOWAIT): the
    machine's /dev/shm and the test's directory (on its disk)."""
    shm = Path("/dev/shm") / f"nbdvma-nowait-{os.getpid()}"
    on_disk = tmp_path / "f"
    data = os.urandom(256 * 1024)
    for path in (shm, on_disk):
        path.write_bytes(data)
    try:
        fd = os.open(shm, os.O_RDONLY)
        try:
            assert nowait_read_flags(fd) == 0
        finally:
            os.close(fd)
        fd = os.open(on_disk, os.O_RDONLY)
        try:
            flags = nowait_read_flags(fd)
            assert flags == os.RWF_NOWAIT
            view = memoryview(bytearray(len(data)))
            assert preadv_nowait(fd, view, 0, flags)  # just written: in the page cache
            assert view == data
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert not preadv_nowait(fd, memoryview(bytearray(len(data))), 0, flags)
            assert not preadv_nowait(fd, memoryview(bytearray(10)), len(data), flags)  # EOF
        finally:
            os.close(fd)
    finally:
        shm.unlink()


def test_page_cache_tells_which_pages_are_in_memory(tmp_path: Path) -> None:
    """What decides whether export may ``sendfile`` from the archive in its event
    loop: pages just written are in memory, pages dropped are not, per range; on a
    tmpfs everything is."""
    page = os.sysconf("SC_PAGE_SIZE")
    path = tmp_path / "f"
    path.write_bytes(os.urandom(64 * page))
    fd = os.open(path, os.O_RDONLY)
    cache = PageCache.open(fd)
    assert cache is not None
    try:
        assert cache.cached(0, 64 * page)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert not cache.cached(0, 64 * page)
        os.pread(fd, 8 * page, 16 * page)  # pages 16-23 read back (no readahead past EOF)
        os.posix_fadvise(fd, 24 * page, 0, os.POSIX_FADV_DONTNEED)  # whatever readahead took
        assert cache.cached(16 * page + 100, 8 * page - 200)
        assert cache.cached(16 * page, 8 * page)
        assert not cache.cached(16 * page, 8 * page + 1)  # one byte into page 24
        assert not cache.cached(15 * page + page - 1, 2)  # one byte of page 15
        assert not cache.cached(60 * page, 8 * page)  # past the end
    finally:
        cache.close()
        cache.close()
        os.close(fd)
    shm = Path("/dev/shm") / f"nbdvma-pages-{os.getpid()}"
    shm.write_bytes(b"x" * page)
    fd = os.open(shm, os.O_RDONLY)
    try:
        cache = PageCache.open(fd)
        assert cache is not None
        assert cache.cached(0, page)
        cache.close()
    finally:
        os.close(fd)
        shm.unlink()


def test_page_cache_refuses_where_mincore_would_lie(tmp_path: Path) -> None:
    """Linux reports the page cache of a file only to its owner, root, or a writer,
    and claims every page in memory to anyone else: such a reader gets no
    :class:`PageCache` (and export reads through a thread instead of ``sendfile``)."""
    top = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        top.chmod(0o755)
        path = top / "f"
        path.write_bytes(os.urandom(1 << 20))
        path.chmod(0o644)
        with path.open("rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        probe = (
            "import os, sys; from nbdvma.vma.fileio import PageCache; "
            "fd = os.open(sys.argv[1], os.O_RDONLY); print(PageCache.open(fd))"
        )
        out = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-c",
                probe,
                str(path),
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent.parent,
        )
        assert out.stdout.strip() == "None"
    finally:
        shutil.rmtree(top)
