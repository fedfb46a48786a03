"""Read-only NBD exports of an archive's disks (``nbdvma export``, ``nbdvma restore``).

:class:`ArchiveBackend` serves each disk of an :class:`~nbdvma.vma.index.IndexedArchive`
as a read-only export of its exact size: reads come from the archive's file (or its
decompressed zstd frames) in worker threads, so that many reads run at once and none
holds the event loop; block status (``base:allocation``) says which clusters and 4 KiB
blocks the archive stores as zeros (``HOLE|ZERO``), so that ``qemu-img convert`` and
``nbdcopy`` skip them and write sparse images.  Writes never reach it: the core answers
them ``EPERM`` (``NBD_FLAG_READ_ONLY``); should one arrive anyway, it is refused the
same way.  Nothing is ever written, so ``CAN_MULTI_CONN`` holds trivially.

:func:`open_archive` gets an archive ready to serve: it indexes a plain ``.vma`` or an
nbdvma ``.vma.zst`` in place (a file, or an object in S3: :mod:`nbdvma.s3.archive`);
any other compressed archive (vzdump's single-stream ``.vma.zst``, ``.vma.gz``,
``.vma.lzo``) is first decompressed once into a sparse temporary file (next to the
file; for an object, in the temporary directory), unlinked as soon as it is open, so
that nothing is left behind.
:class:`PrepareState` tells the caller how far that has got (the library prints
nothing).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import tempfile
from collections.abc import Callable, Collection, Sequence
from typing import BinaryIO, cast

import attrs
import trio
import zstandard

from nbdvma.errors import NbdvmaError, UnindexableArchiveError, VmaFormatError
from nbdvma.nbd import Capabilities, ExportInfo
from nbdvma.nbd.constants import NbdStateFlag
from nbdvma.s3.location import S3Location, parse_s3_url
from nbdvma.tools.common import is_lzop, open_decompressed
from nbdvma.units import format_bytes
from nbdvma.vma.fileio import FileRuns, pwrite_all
from nbdvma.vma.format import VMA_BLOCK_SIZE
from nbdvma.vma.index import IndexedArchive, VmstateWriter, build_index
from nbdvma.vma.indexwords import STATUS_RUNS
from nbdvma.vma.sources import GZIP_MAGIC

__all__ = [
    "PROGRESS_INTERVAL",
    "READ_ONLY",
    "READ_THREADS",
    "ArchiveBackend",
    "PrepareState",
    "PrepareWatcher",
    "decompress_into",
    "open_archive",
    "prepare",
]

#: Reads served at once (each in a worker thread).
READ_THREADS = 8
#: Seconds between progress lines while an archive is read.
PROGRESS_INTERVAL = 5.0

_HOLE = NbdStateFlag.NBD_STATE_HOLE | NbdStateFlag.NBD_STATE_ZERO

#: A read-only export's capabilities: nothing to flush, any number of connections.
READ_ONLY = Capabilities(can_write=False, can_flush=False, can_multi_conn=True)


def _refuse() -> PermissionError:
    return PermissionError(errno.EPERM, "the export is read-only")


class ArchiveBackend:
    """The disks of an indexed archive, as read-only exports (a
    :class:`~nbdvma.backends.Backend`)."""

    def __init__(
        self, archive: IndexedArchive, *, limiter: trio.CapacityLimiter | None = None
    ) -> None:
        """Serve every disk of ``archive.index``; reads run in threads of ``limiter``
        (default: :data:`READ_THREADS` of them)."""
        self.archive = archive
        # A read's reply is in memory from its thread's start until it is sent: the
        # threads bound the memory a client's reads in flight cost (nbdcopy keeps 64
        # per connection), at no cost in speed on a machine of a few cores.
        self._limiter = limiter or trio.CapacityLimiter(READ_THREADS)
        self._exports = [
            ExportInfo(name, disk.dev.size, capabilities=READ_ONLY)
            for name, disk in archive.index.disks.items()
        ]

    @property
    def exports(self) -> Sequence[ExportInfo]:
        """See :meth:`Backend.exports <nbdvma.backends.Backend.exports>`."""
        return self._exports

    async def pread(self, export_name: str, offset: int, length: int) -> bytes:
        """See :meth:`Backend.pread <nbdvma.backends.Backend.pread>`."""
        data = await trio.to_thread.run_sync(
            self.archive.read, export_name, offset, length, limiter=self._limiter
        )
        # A bytearray, which the core sends as it is (it takes any buffer): no copy.
        return cast(bytes, data)

    def read_now(self, export_name: str, offset: int, length: int) -> bytearray | None:
        """See :class:`~nbdvma.backends.ReadNow`: data in the page cache or on a tmpfs,
        read in the event loop's thread, where a worker thread's hop would cost more."""
        return self.archive.read_now(export_name, offset, length)

    def runs_now(self, export_name: str, offset: int, length: int) -> FileRuns | None:
        """See :class:`~nbdvma.backends.SendNow`: where a READ's bytes lie in the
        archive file, when they can be sent from there at once."""
        return self.archive.runs_now(export_name, offset, length)

    async def pwrite(
        self, export_name: str, offset: int, data: bytes | bytearray, *, fua: bool
    ) -> None:
        """Refused (``EPERM``)."""
        raise _refuse()

    async def zero(self, export_name: str, offset: int, length: int, *, fua: bool) -> None:
        """Refused (``EPERM``)."""
        raise _refuse()

    async def trim(self, export_name: str, offset: int, length: int, *, fua: bool) -> None:
        """Refused (``EPERM``)."""
        raise _refuse()

    async def flush(self) -> None:
        """Nothing was ever written: nothing to flush."""

    async def extents(self, export_name: str, offset: int, length: int) -> list[tuple[int, int]]:
        """See :meth:`Backend.extents <nbdvma.backends.Backend.extents>`: zero clusters and
        blocks are ``HOLE|ZERO``, stored ones data; may cover less than ``length``."""
        return self.extents_now(export_name, offset, length, req_one=False)

    def extents_now(
        self, export_name: str, offset: int, length: int, *, req_one: bool
    ) -> list[tuple[int, int]]:
        """See :class:`~nbdvma.backends.StatusNow`: an in-memory lookup of a bounded
        number of runs (one with ``req_one``), answered without a thread hop."""
        runs = self.archive.block_status(
            export_name, offset, length, max_runs=1 if req_one else STATUS_RUNS
        )
        return [(n, _HOLE if zero else 0) for n, zero in runs]


@attrs.define
class PrepareState:
    """How far :func:`open_archive` has got; read by another thread to show progress,
    and the way to stop it (:attr:`cancelled`)."""

    #: ``"indexing"`` or ``"decompressing"``.
    phase: str = "indexing"
    #: Bytes of the file being indexed read so far, or bytes decompressed so far.
    done: int = 0
    #: Size of the file being indexed (0 while decompressing: unknown).
    total: int = 0
    #: Why the archive is being decompressed ("" if it is not).
    reason: str = ""
    #: The temporary file it is decompressed into.
    temporary: str = ""
    #: Set by the caller: the next progress report raises ``InterruptedError``.
    cancelled: bool = False

    def update(self, done: int) -> None:
        """Record progress; stop if :attr:`cancelled`."""
        if self.cancelled:
            raise InterruptedError("stopped")
        self.done = done


def _compression(path: str) -> str | None:
    """``"gzip"``, ``"lzo"`` for archives that are always decompressed first."""
    if is_lzop(path):
        return "lzo"
    with open(path, "rb") as f:
        return "gzip" if f.read(2) == GZIP_MAGIC else None


def open_archive(
    path: str,
    state: PrepareState,
    *,
    devices: Collection[str] | None = None,
    cache_dir: str | None = None,
    vmstate: VmstateWriter | None = None,
    s3_endpoint: str | None = None,
) -> IndexedArchive:
    """Check and index the archive at ``path`` (decompressing it first if it must be).

    Blocking (run it in a thread).  See :func:`~nbdvma.vma.index.build_index` for the
    checks and ``devices``, ``vmstate``.

    Args:
        path: a file, or ``s3://BUCKET/KEY``: an object in S3, streamed once to be
            indexed, then read by ranged GETs (:mod:`nbdvma.s3.archive`).
        cache_dir: where to decompress an archive that cannot be read in place
            (default: the archive's directory; for an object in S3, the system's
            temporary directory).
        s3_endpoint: the endpoint of an object in S3 (default: the environment's).

    Raises:
        OSError: a file cannot be read or written.
        S3Error: the object cannot be read.
        VmaFormatError: the archive is damaged or incomplete.
        NbdvmaError: an archive on stdin.
        InterruptedError: :attr:`PrepareState.cancelled` was set.
    """
    if path == "-":
        raise NbdvmaError(
            "an archive on stdin cannot be exported: it is read in place, so save it to a "
            "file first"
        )
    location = parse_s3_url(path)
    if location is not None:
        archive = _index_object(location, state, devices, vmstate, s3_endpoint)
        if archive is not None:
            return archive
        # An object has no directory: the one for temporary files, which export names.
        cache_dir = cache_dir or tempfile.gettempdir()
    else:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise NbdvmaError(f"{path} is not a regular file: an archive is exported from a file")
        state.total = info.st_size
        compression = _compression(path)
        if compression is None:
            try:
                index = build_index(path, devices=devices, progress=state.update, vmstate=vmstate)
                return IndexedArchive(path, index)
            except UnindexableArchiveError as exc:
                state.reason = f"{path}: {exc} (as vzdump and the zstd CLI write it)"
        else:
            state.reason = f"{path} is {compression}-compressed"
        cache_dir = cache_dir or os.path.dirname(path) or "."
    fd, temporary = tempfile.mkstemp(prefix=".nbdvma-export-", suffix=".vma", dir=cache_dir)
    state.temporary = temporary
    try:
        with os.fdopen(fd, "wb") as out:
            state.phase, state.total, state.done = "decompressing", 0, 0
            with open_decompressed(path, s3_endpoint=s3_endpoint) as source:
                decompress_into(source, out.fileno(), state.update)
            state.phase, state.total, state.done = "indexing", os.path.getsize(temporary), 0
            index = build_index(temporary, devices=devices, progress=state.update, vmstate=vmstate)
            return IndexedArchive(temporary, index)
    finally:
        # Served from the open descriptor: the file goes when the process does.
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def _index_object(
    location: S3Location,
    state: PrepareState,
    devices: Collection[str] | None,
    vmstate: VmstateWriter | None,
    s3_endpoint: str | None,
) -> IndexedArchive | None:
    """The object at ``location``, indexed in place; ``None`` (and
    :attr:`PrepareState.reason` set) if it must be decompressed first."""
    from nbdvma.s3.archive import LOADERS, index_object  # boto3: only for an object
    from nbdvma.s3.source import S3Object

    obj = S3Object.open(location, s3_endpoint, connections=LOADERS + 1)
    state.total = obj.size
    try:
        return index_object(obj, devices=devices, progress=state.update, vmstate=vmstate)
    except UnindexableArchiveError as exc:
        state.reason = f"{location.url}: {exc}"
    except BaseException:
        obj.client.close()
        raise
    obj.client.close()
    return None


class PrepareWatcher:
    """Progress lines of :func:`open_archive` (which runs in a thread): why the archive
    is decompressed, as soon as that is known, then how far it got, every
    ``interval`` seconds."""

    def __init__(self, state: PrepareState, say: Callable[[str], None], interval: float) -> None:
        self.state = state
        self.say = say
        self.interval = interval
        self.told = False
        self.last = ""

    def tell(self) -> None:
        """Say why the archive is decompressed, once."""
        state = self.state
        if state.temporary and not self.told:
            self.say(
                f"{state.reason}: it must be decompressed once, into {state.temporary} "
                "(removed at exit)"
            )
            self.told = True

    def progress(self) -> None:
        """Say how far the current phase has got (if it moved)."""
        state = self.state
        if state.phase == "decompressing":
            line = f"decompressing: {format_bytes(state.done)} so far"
        elif state.total:
            line = (
                f"reading the archive: {100 * state.done // state.total}% "
                f"({format_bytes(state.done)} of {format_bytes(state.total)})"
            )
        else:
            return
        if line != self.last:
            self.say(line)
            self.last = line

    async def run(self) -> None:
        """Until cancelled."""
        next_line = trio.current_time() + self.interval
        while True:
            await trio.sleep(min(0.1, self.interval))
            self.tell()
            if trio.current_time() >= next_line:
                self.progress()
                next_line += self.interval


async def prepare(
    nursery: trio.Nursery,
    path: str,
    devices: list[str] | None,
    cache: str | None,
    say: Callable[[str], None],
    *,
    interval: float = PROGRESS_INTERVAL,
    vmstate: VmstateWriter | None = None,
    s3_endpoint: str | None = None,
) -> IndexedArchive:
    """:func:`open_archive` in a thread, with progress lines; a cancellation stops it."""
    state = PrepareState()
    watcher = PrepareWatcher(state, say, interval)
    scope = trio.CancelScope()

    async def watch() -> None:
        with scope:
            await watcher.run()

    nursery.start_soon(watch)
    try:
        return await trio.to_thread.run_sync(
            functools.partial(
                open_archive,
                path,
                state,
                devices=devices,
                cache_dir=cache,
                vmstate=vmstate,
                s3_endpoint=s3_endpoint,
            ),
            abandon_on_cancel=True,
        )
    finally:
        state.cancelled = True  # an abandoned thread stops at its next progress report
        scope.cancel()
        watcher.tell()


# Bytes read at a time from a decompressing stream.
_DECOMPRESS_CHUNK = 1 << 20
_ZERO_BLOCK = bytes(VMA_BLOCK_SIZE)


def decompress_into(source: BinaryIO, fd: int, progress: Callable[[int], None]) -> int:
    """Copy a decompressed archive ``source`` into the file ``fd``, sparse: chunks of
    zeros are left as holes.

    Args:
        source: the decompressed stream (:func:`~nbdvma.vma.sources.open_source`...).
        fd: an empty file open for writing.
        progress: called with the bytes written so far, now and then (may raise).

    Returns:
        The decompressed length.

    Raises:
        OSError: a read or write failed.
        VmaFormatError: the stream is corrupt.
    """
    buf = bytearray(_DECOMPRESS_CHUNK)
    view = memoryview(buf)
    total = 0
    while True:
        try:
            n = source.readinto(view)  # type: ignore[attr-defined]
        except (zstandard.ZstdError, EOFError) as exc:
            raise VmaFormatError(f"read failed - {exc}") from exc
        if not n:
            break
        # Write only the runs of 4 KiB blocks that hold data: zeros stay holes.
        start = None
        for block in range(0, n, VMA_BLOCK_SIZE):
            stop = min(block + VMA_BLOCK_SIZE, n)
            # bytes.startswith compares at memcmp speed, memoryview == bytes item by item.
            if _ZERO_BLOCK.startswith(view[block:stop]):
                if start is not None:
                    pwrite_all(fd, [view[start:block]], total + start)
                    start = None
            elif start is None:
                start = block
        if start is not None:
            pwrite_all(fd, [view[start:n]], total + start)
        total += n
        progress(total)
    os.ftruncate(fd, total)
    return total
