"""The ``vma``-compatible tools: list, config, verify, extract and create.

Each command behaves and prints like Proxmox's ``vma`` (format doc §8), except that
errors never abort with a core dump: every failure is a :class:`ToolError` carrying
the one line to print on stderr and the exit status.  Format errors keep the real
tool's wording (``verify failed - found duplicated cluster 5 for stream disk0``).

``extract`` differs from ``vma extract`` where the real tool is lossy or careless:
disks are restored to their exact size (not the last full sector), ``vmstate.bin``
gets every stored cluster including zero blocks, nothing is ever left half-written
under a final name, and existing files are never overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import mmap
import os
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TextIO

from nbdvma.errors import ToolError, VmaFormatError, VmaWriterError
from nbdvma.interrupts import deferred
from nbdvma.pve import archive_configs
from nbdvma.vma.background import BackgroundWriter
from nbdvma.vma.fileio import Writeback, preallocate
from nbdvma.vma.format import (
    VMA_BLOCK_SIZE,
    VMA_CLUSTER_SIZE,
    VMA_EXTENT_HEADER_SIZE,
    VMA_MAX_DEVICES,
    VMA_MAX_EXTENT_SIZE,
    WRITER_CLUSTERS_PER_EXTENT,
    DeviceInfo,
)
from nbdvma.vma.reader import Cluster, VmaReader, open_source

if TYPE_CHECKING:
    from nbdvma.vma.writer import VmaWriter

__all__ = [
    "DEFAULT_CONFIG",
    "ToolError",
    "create_archive",
    "extract_archive",
    "list_archive",
    "print_config",
    "verify_archive",
]

#: The config ``vma config`` prints when no ``-c`` is given.
DEFAULT_CONFIG = "qemu-server.conf"
_FULL_MASK = 0xFFFF
_IOV_MAX = 1024
_SECTOR = 512
# create maps images _WINDOW bytes at a time and keeps the last _KEEP_WINDOWS mapped.
_WINDOW = 8 << 20
_KEEP_WINDOWS = 3
# ... and lets this many bytes of extents wait for the sink's worker thread.
_IN_FLIGHT = 8 << 20
# extract reads extents into this many buffers, writing one while reading the next.
_EXTRACT_BUFFERS = 3
_MAX_CONFIG_READ = 65536 + 1  # one byte more than any config may hold


def _signed64(value: int) -> int:
    """How C's ``%zd`` prints a u64."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _open_reader(path: str, *, skip: Iterable[int] = ()) -> tuple[VmaReader, object]:
    """Open ``path`` and read its header; errors as the real tool prints them."""
    try:
        source = open_source(path)
    except OSError as exc:
        raise ToolError(f"can't open file {path} - {_strerror(exc)}") from exc
    try:
        reader = VmaReader(source, skip=frozenset(skip))
    except VmaFormatError as exc:
        source.close()
        raise ToolError(str(exc)) from exc
    except BaseException:
        source.close()
        raise
    return reader, source


def _close(source: object) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


def _content_lines(reader: VmaReader) -> Iterator[str]:
    """``vma list`` output (print_content in vma.c)."""
    head = reader.header
    for name, data in head.configs:
        yield f"CFG: size: {len(data)} name: {name}\n"
    for dev in head.devices:
        if dev.dev_id > VMA_MAX_DEVICES:
            continue
        if dev.is_vmstate:
            yield f"VMSTATE: dev_id={dev.dev_id} memory: {_signed64(dev.size)}\n"
        else:
            yield f"DEV: dev_id={dev.dev_id} size: {_signed64(dev.size)} devname: {dev.name}\n"
    try:
        ctime = time.ctime(head.ctime) + "\n"
    except (OverflowError, OSError, ValueError):
        ctime = "(null)\n"  # glibc's ctime() returns NULL, printf prints "(null)"
    yield f"CTIME: {ctime}"


def list_archive(path: str, out: TextIO) -> None:
    """``vma list``: print the configs, devices and ctime of the archive header.

    Raises:
        ToolError: the file cannot be opened or its header is invalid.
    """
    reader, source = _open_reader(path)
    try:
        out.writelines(_content_lines(reader))
    finally:
        _close(source)


def print_config(path: str, name: str, out: TextIO) -> None:
    """``vma config``: write the raw data of the first config called ``name``.

    Raises:
        ToolError: status 255 if there is no such config (as ``vma``).
    """
    reader, source = _open_reader(path)
    _close(source)
    data = reader.header.config(name)
    if data is None:
        raise ToolError(f"unable to find configuration data '{name}'", 255)
    out.flush()
    out.buffer.write(data)
    out.buffer.flush()


class _Progress:
    """The ``progress N% (read B bytes, duration S sec)`` lines of ``-v``."""

    def __init__(self, reader: VmaReader, disks: Iterable[DeviceInfo], out: TextIO | None) -> None:
        self.reader = reader
        self.out = out
        self.total = sum(d.size // VMA_CLUSTER_SIZE for d in disks)
        self.start = int(time.time())
        self.percent = 0
        self.read = 0

    def update(self, clusters: int = 1) -> None:
        """Count clusters; print a line for each percentage reached on the way.

        The lines are those that ``vma`` prints counting one cluster at a time.  As in
        ``vma``, the total counts whole clusters only (``size // 65536``), so a disk
        with a partial last cluster ends above 100%.
        """
        read = self.read
        self.read = read + clusters
        # The real tool divides by zero when every device is < 64 KiB; we stay quiet.
        if self.out is None or not self.total:
            return
        for count in range(read + 1, read + clusters + 1):
            percent = count * 100 // self.total
            if percent != self.percent:
                duration = int(time.time()) - self.start
                self.out.write(
                    f"progress {percent}% (read {count * VMA_CLUSTER_SIZE} bytes, "
                    f"duration {duration} sec)\n"
                )
                self.out.flush()
                self.percent = percent

    def totals(self) -> None:
        if self.out is None:
            return
        stats = self.reader.stats
        read = stats.clusters_read * VMA_CLUSTER_SIZE
        if not read:
            self.out.write("vma archive contains no image data\n")
            return
        sparse = stats.zero_cluster_bytes
        self.out.write(
            f"total bytes read {read}, sparse bytes {sparse} ({100.0 * sparse / read:.3g}%)\n"
        )
        datasize = read - sparse
        if datasize:
            self.out.write(
                "space reduction due to 4K zero blocks "
                f"{100.0 * stats.partial_zero_bytes / datasize:.3g}%\n"
            )


_ZERO_BLOCK = bytes(VMA_BLOCK_SIZE)


def _strict_check(cluster: Cluster) -> None:
    """``verify --strict``: what the C writer never produces.

    VM-state clusters are exempt: they must be stored whole, zero blocks included,
    or Proxmox's reader would drop those blocks from the stream (vma-format.md §6).
    """
    if cluster.dev.is_vmstate:
        return
    data = cluster.data
    for i in range(0, len(data), VMA_BLOCK_SIZE):
        if data[i : i + VMA_BLOCK_SIZE] == _ZERO_BLOCK:
            raise VmaFormatError(
                f"stored zero block in cluster {cluster.cluster} of stream {cluster.dev.name}"
            )


def verify_archive(path: str, out: TextIO, *, verbose: bool = False, strict: bool = False) -> None:
    """``vma verify``: read the whole archive and apply every check.

    Unlike ``vma verify``, missing clusters (S15, which only ``vma extract`` checks)
    fail verification too: such an archive cannot be restored, and it is what an
    interrupted backup leaves as ``ARCHIVE.part``.

    Args:
        path: the archive, ``-`` for stdin.
        out: where ``-v`` output goes.
        verbose: print the list output, progress and totals.
        strict: also reject what the C writer never writes but the reader accepts:
            stored all-zero blocks and data past a disk's end.

    Raises:
        ToolError: ``verify failed - <reason>``.
    """
    reader, source = _open_reader(path)
    try:
        if verbose:
            out.writelines(_content_lines(reader))
            out.flush()
        disks = [d for d in reader.header.devices if d.dev_id <= VMA_MAX_DEVICES]
        progress = _Progress(
            reader, [d for d in disks if not d.is_vmstate], out if verbose else None
        )
        for extent in reader.extents():
            if strict:
                for cluster in extent:
                    _strict_check(cluster)
            progress.update(len(extent))
        try:
            reader.check_missing()
        except VmaFormatError as exc:
            raise VmaFormatError(f"{exc} - the archive is incomplete") from None
        if strict:
            for dev_id, count in sorted(reader.stats.past_end.items()):
                dev = reader.device(dev_id)
                name = dev.name if dev is not None else str(dev_id)
                raise VmaFormatError(f"{count} cluster(s) of stream {name} store data past its end")
        progress.totals()
    except VmaFormatError as exc:
        raise ToolError(f"verify failed - {exc}") from exc
    finally:
        _close(source)
        reader.close()


# --------------------------------------------------------------------------- extract


def _check_name(name: str, what: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ToolError(f"unable to write file: invalid {what} name {name!r}")


def _pwrite_all(fd: int, views: Sequence[memoryview | bytes], offset: int) -> None:
    """Write ``views`` contiguously at ``offset`` (pwritev, retrying short writes)."""
    views = list(views)
    while views:
        batch = views[:_IOV_MAX]
        want = sum(len(v) for v in batch)
        done = os.pwritev(fd, batch, offset)
        offset += done
        if done == want:
            del views[:_IOV_MAX]
            continue
        # Short write: drop what went out and retry the rest.
        rest: list[memoryview | bytes] = []
        for v in batch:
            if done >= len(v):
                done -= len(v)
            else:
                rest.append(memoryview(v)[done:])
                done = 0
        views[: len(batch)] = rest


#: Contiguous bytes for an output file: (offset, views, end offset).
_Range = tuple[int, list[memoryview | bytes], int]


class _Target:
    """One output file of extract: collects an extent's writes as few contiguous ranges,
    which :func:`_write_ranges` then writes (in the worker thread)."""

    def __init__(self, tmp: str, final: str, size: int | None) -> None:
        self.tmp = tmp
        self.final = final
        self.size = size  # the disk size; None for vmstate (grows as it is written)
        self.fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        # The writes not yet handed to the worker.
        self.ranges: list[_Range] = []
        self.length = 0  # vmstate: bytes of clusters stored so far
        if size is not None:
            os.ftruncate(self.fd, size)
        # Each disk is fsynced at the end: start writing it to disk meanwhile.
        self.writeback = Writeback(self.fd, thread_guard=deferred)
        self.allocate_first = True  # until the file system says it cannot

    def write(self, offset: int, data: memoryview | bytes) -> None:
        if self.size is not None:
            if offset >= self.size:
                return
            if offset + len(data) > self.size:
                data = data[: self.size - offset]
        ranges = self.ranges
        if ranges and ranges[-1][2] == offset:
            at, views, end = ranges[-1]
            views.append(data)
            ranges[-1] = (at, views, end + len(data))
        else:
            ranges.append((offset, [data], offset + len(data)))

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self.writeback.close()
            os.close(fd)


def _write_ranges(batch: list[tuple[_Target, list[_Range]]]) -> None:
    """Write the ranges an extent gave each target (a job of the worker thread)."""
    for target, ranges in batch:
        for at, views, end in ranges:
            # Blocks allocated first are written without ext4's per-page delayed
            # allocation (a third of the write's cost); only what is written is
            # allocated, so holes stay holes.
            if target.allocate_first:
                target.allocate_first = preallocate(target.fd, at, end - at)
            _pwrite_all(target.fd, views, at)
            target.writeback.wrote(at, end - at)


def _submit_writes(worker: BackgroundWriter, targets: Iterable[_Target]) -> None:
    """Hand the writes collected from one extent to the worker, as one job."""
    batch = []
    parts: list[memoryview | bytes] = []
    nbytes = 0
    for target in targets:
        if target.ranges:
            batch.append((target, target.ranges))
            for at, views, end in target.ranges:
                parts.extend(views)
                nbytes += end - at
            target.ranges = []
    if batch:
        worker.submit(functools.partial(_write_ranges, batch), parts, nbytes)


def _write_cluster(target: _Target, cluster: Cluster) -> None:
    """Queue the stored blocks of a cluster (zero blocks are holes)."""
    mask, data = cluster.mask, cluster.data
    base = cluster.cluster * VMA_CLUSTER_SIZE
    if mask == _FULL_MASK:
        target.write(base, data)
        return
    pos = 0
    j = 0
    while mask >> j:
        if not mask >> j & 1:
            j += 1
            continue
        run = j
        while mask >> j & 1:
            j += 1
        length = (j - run) * VMA_BLOCK_SIZE
        target.write(base + run * VMA_BLOCK_SIZE, data[pos : pos + length])
        pos += length


def _finish_name(tmp: str, final: str) -> None:
    """Give a complete file its final name, never replacing an existing file."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError:
        # No hard links on this file system: rename after checking for the name.
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), final) from None
        os.rename(tmp, final)
        return
    os.unlink(tmp)


def extract_archive(
    path: str,
    dirname: str,
    out: TextIO,
    *,
    verbose: bool = False,
    drives: Sequence[str] | None = None,
) -> None:
    """``vma extract``: restore configs, disks and vmstate into a new directory.

    Args:
        path: the archive, ``-`` for stdin.
        dirname: the target directory; it must not exist.
        out: where ``DEVINFO`` lines and ``-v`` output go.
        verbose: print progress and totals.
        drives: restore only these devices (by name; ``vmstate`` included); the
            others are read and checked but not tracked for duplicates or gaps.

    Raises:
        ToolError: ``restore failed - <reason>`` and the like; temporary files are
            removed, so nothing incomplete remains under a final name.
    """
    reader, source = _open_reader(path)
    head = reader.header
    present = [d for d in head.devices if d.dev_id <= VMA_MAX_DEVICES]
    if drives is not None:
        names = {d.name for d in present}
        for name in drives:
            if name not in names:
                _close(source)
                raise ToolError(f"no device named '{name}' in archive")
    selected = [d for d in present if drives is None or d.name in drives]
    disks = [d for d in selected if not d.is_vmstate]
    reader.skip_devices(d.dev_id for d in present if d not in selected)
    targets: dict[int, _Target] = {}
    # The temporary files, named before they are created: the directory is new and
    # ours, so whatever of them exists after a failure (or a signal that landed while
    # one was being opened) is removed.
    temporary: list[str] = []
    # Writes of one extent run in a worker thread while the next extents are read
    # into the reader's other buffers (bounded: the reader waits for a buffer's
    # writes before it fills it again).
    worker = BackgroundWriter(
        max_bytes=_EXTRACT_BUFFERS * VMA_MAX_EXTENT_SIZE, thread_guard=deferred
    )
    try:
        try:
            os.mkdir(dirname)
        except OSError as exc:
            raise ToolError(f"unable to create target directory {_strerror(exc)}") from exc
        for name, data in head.configs:
            _check_name(name, "config")
            try:
                fd = os.open(
                    os.path.join(dirname, name),
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                    0o644,
                )
                try:
                    _pwrite_all(fd, [data], 0)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise ToolError(f"unable to write file: {name}: {_strerror(exc)}") from exc
        for dev in selected:
            if dev.is_vmstate:
                if dev.dev_id != reader.vmstate_id:
                    raise ToolError(f"create vmstate file '{dirname}/vmstate.bin' failed")
                tmp = os.path.join(dirname, "tmp-vmstate.bin")
                final = os.path.join(dirname, "vmstate.bin")
                size = None
            else:
                _check_name(dev.name, "device")
                tmp = os.path.join(dirname, f"tmp-disk-{dev.name}.raw")
                final = os.path.join(dirname, f"disk-{dev.name}.raw")
                size = dev.size
            temporary.append(tmp)
            try:
                targets[dev.dev_id] = _Target(tmp, final, size)
            except OSError as exc:
                raise ToolError(f"can't create file {tmp} - {_strerror(exc)}") from exc
            if size is not None:
                out.write(f"DEVINFO {tmp} {size}\n")
        out.flush()
        progress = _Progress(reader, disks, out if verbose else None)
        try:
            for extent in reader.extents(buffers=_EXTRACT_BUFFERS, reuse=worker.release):
                for cluster in extent:
                    target = targets.get(cluster.dev.dev_id)
                    if target is None:
                        continue
                    if target.size is None:
                        _write_vmstate(target, cluster)
                    else:
                        _write_cluster(target, cluster)
                progress.update(len(extent))
                _submit_writes(worker, targets.values())
            reader.check_missing(disks)
            worker.drain()
            for target in targets.values():
                if target.size is None:
                    _finish_vmstate(target, reader.device(reader.vmstate_id))
                os.fsync(target.fd)
                target.close()
        except VmaFormatError as exc:
            raise ToolError(f"restore failed - {exc}") from exc
        except OSError as exc:
            raise ToolError(f"restore failed - write failed: {_strerror(exc)}") from exc
        for target in targets.values():
            try:
                _finish_name(target.tmp, target.final)
            except OSError as exc:
                raise ToolError(
                    f"rename {target.tmp} to {target.final} failed - {_strerror(exc)}"
                ) from exc
        progress.totals()
    except BaseException:
        worker.close()  # no write may touch a descriptor after it is closed
        for target in targets.values():
            target.close()
        for tmp in temporary:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    finally:
        worker.close()
        _close(source)
        reader.close()


def _write_vmstate(target: _Target, cluster: Cluster) -> None:
    """Append a vmstate cluster, zero blocks included (as holes, then ftruncate)."""
    _write_cluster(target, cluster)
    target.length = (cluster.cluster + 1) * VMA_CLUSTER_SIZE


def _finish_vmstate(target: _Target, dev: DeviceInfo | None) -> None:
    """Cut vmstate.bin to the header's size when that falls in the last cluster."""
    length = target.length
    if dev is not None and length - VMA_CLUSTER_SIZE < dev.size <= length:
        length = dev.size
    os.ftruncate(target.fd, length)


# --------------------------------------------------------------------------- create


def _image_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _extents(fd: int, size: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is_data) ranges of an image, holes found with SEEK_DATA/SEEK_HOLE."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                yield pos, size, False
            else:  # no hole support (a block device, an old file system): all data
                yield pos, size, True
            return
        data = min(data, size)
        if data > pos:
            yield pos, data, False
        if data >= size:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        yield data, hole, True
        pos = hole


def _archive_bound(fd: int, size: int) -> int:
    """The most archive bytes an image can take: its allocated blocks (all of it for
    a device) and the extent headers."""
    st = os.fstat(fd)
    data = min(st.st_blocks * 512, size) if stat.S_ISREG(st.st_mode) else size
    headers = size // VMA_CLUSTER_SIZE // WRITER_CLUSTERS_PER_EXTENT + 2
    return data + headers * VMA_EXTENT_HEADER_SIZE


def _parse_image(arg: str, index: int) -> tuple[str, str]:
    name, sep, image = arg.partition("=")
    if not sep:
        return f"disk{index}", arg
    return name, image


def create_archive(
    path: str,
    configs: Sequence[str],
    images: Sequence[str],
    err: TextIO,
    *,
    verbose: bool = False,
) -> None:
    """``vma create``: write an archive of config files and raw disk images.

    Args:
        path: the new archive (must not exist; ``-`` for stdout; ``.zst``
            compresses).
        configs: ``[NAME=]FILE`` config files; when a device is named ``drive-KEY``
            an unnamed FILE is stored as ``qemu-server.conf`` with ``#qmdump#map``
            lines (:func:`nbdvma.pve.archive_configs`), else under its basename.
        images: ``[NAME=]PATH``; the default name is ``disk<N>``.
        err: where ``-v`` prints its ``image ...`` lines.
        verbose: print per-image statistics.

    Raises:
        ToolError: bad input, a limit of the format, or an I/O error; the partial
            archive is removed.
    """
    from nbdvma.vma.sink import BackgroundSink, FileSink, StreamSink, open_sink
    from nbdvma.vma.writer import VmaWriter

    config_items: list[tuple[str | None, str, bytes]] = []
    for cfg in configs:
        cname, sep, cpath = cfg.partition("=")
        if not sep or "/" in cname:
            cname, cpath = "", cfg
        try:
            with open(cpath, "rb") as f:
                config_items.append((cname or None, cpath, f.read(_MAX_CONFIG_READ)))
        except OSError as exc:
            raise ToolError(f"unable to read file '{cpath}' - {_strerror(exc)}") from exc
    opened: list[tuple[str, str, int, int]] = []  # name, path, fd, size
    try:
        for index, arg in enumerate(images):
            name, image = _parse_image(arg, index)
            try:
                fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
                size = _image_size(fd)
            except OSError as exc:
                raise ToolError(f"can't open file {image} - {_strerror(exc)}") from exc
            if size <= 0:
                os.close(fd)
                raise ToolError(f"image {image} is empty")
            opened.append((name, image, fd, size))
        try:
            config_data, _, warnings = archive_configs(config_items, [o[0] for o in opened])
        except ValueError as exc:
            raise ToolError(str(exc)) from exc
        for warning in warnings:
            err.write(f"warning: {warning}\n")
        output: FileSink | StreamSink | None = None
        sink: BackgroundSink | None = None
        writer: VmaWriter | None = None
        try:  # once output exists, any failure (a signal too) removes the .part file
            with deferred():  # a signal is raised only once output holds the file
                try:
                    output = open_sink(path, None, thread_guard=deferred)
                except OSError as exc:
                    raise ToolError(f"can't create file {path} - {_strerror(exc)}") from exc
                except VmaWriterError as exc:
                    raise ToolError(str(exc)) from exc
            # Extents are written by a worker thread while the next clusters are read
            # and zero-detected: the two halves of the work run on two cores.
            sink = BackgroundSink(output, max_bytes=_IN_FLIGHT, thread_guard=deferred)
            writer = VmaWriter(sink)
            # At most every allocated byte of the images, plus headers (the unused
            # rest is given back at the end); writes into allocated blocks cost less.
            sink.reserve(sum(_archive_bound(fd, size) for _, _, fd, size in opened))
            for cname, data in config_data:
                writer.add_config(cname, data)
            # Device sizes are whole 512-byte sectors, as QEMU reports a raw image's
            # size: Proxmox's reader cannot restore a block that starts in a partial
            # last sector (S12), so the tail is padded with zeros instead.
            dev_ids = [
                writer.add_device(name, -(-size // _SECTOR) * _SECTOR)
                for name, _, _, size in opened
            ]
            for dev_id, (name, image, fd, size) in zip(dev_ids, opened, strict=True):
                zeros = _copy_image(writer, dev_id, image, fd, size)
                if verbose:
                    err.write(f"image {name}: size={size} zeros={zeros} saved={zeros}\n")
            writer.finish()
        except BaseException:
            if output is None:  # nothing was created
                raise
            if writer is not None:
                writer.abort()
            (sink or output).abort()  # idempotent: what the writer did not close yet
            if path != "-":
                with contextlib.suppress(OSError):
                    os.unlink(path + ".part")
            raise
    except VmaWriterError as exc:
        raise ToolError(str(exc)) from exc
    except OSError as exc:
        raise ToolError(f"create failed - {_strerror(exc)}") from exc
    finally:
        for _, _, fd, _ in opened:
            os.close(fd)


class _ImageWindows:
    """An image seen a window at a time, mapped rather than read.

    ``mmap`` lets the writer zero-detect the page cache's own pages, and the archive
    write copies them once; ``read`` would copy every byte one more time (a quarter of
    the time of a ``create``).  Where a file cannot be mapped, the window is read into
    a buffer instead.  The writer holds views of whole clusters until their extent has
    been written (by the sink's worker thread), so a window is given back only
    ``_KEEP_WINDOWS`` windows later, by which time that has almost always happened.
    """

    def __init__(self, writer: VmaWriter, fd: int, size: int, image: str) -> None:
        self.writer = writer
        self.fd = fd
        self.size = size
        self.image = image
        self.start = self.end = 0
        self.view = memoryview(b"")
        self._open: list[tuple[mmap.mmap | bytearray, memoryview]] = []
        self._regular = stat.S_ISREG(os.fstat(fd).st_mode)

    def move(self, pos: int) -> None:
        """Make the current window the one holding byte ``pos``."""
        if len(self._open) >= _KEEP_WINDOWS:
            self._drop(*self._open.pop(0))
        self.start = pos - pos % _WINDOW
        self.end = min(self.start + _WINDOW, self.size)
        length = self.end - self.start
        # A mapped file that shrinks under us would kill the process with SIGBUS on
        # the next access; a size check per window turns the usual case (an image
        # truncated while it is backed up) into an error message.
        if self._regular and os.fstat(self.fd).st_size < self.end:
            raise ToolError(f"image {self.image}: it shrank while being read")
        buf: mmap.mmap | bytearray
        try:
            buf = mmap.mmap(self.fd, length, offset=self.start, prot=mmap.PROT_READ)
        except OSError:  # a file system or device without mmap
            buf = bytearray(length)
            got = os.preadv(self.fd, [buf], self.start)
            if got < length:
                raise ToolError(
                    f"image {self.image}: unexpected end of file at {self.start + got}"
                ) from None
        self.view = memoryview(buf)
        self._open.append((buf, self.view))

    def _drop(self, buf: mmap.mmap | bytearray, view: memoryview) -> None:
        self.writer.release(buf)
        view.release()
        if not isinstance(buf, bytearray):
            buf.close()

    def finish(self) -> None:
        """The image is read: wait until the writer holds no view of any window."""
        for buf, _ in self._open:
            self.writer.release(buf)

    def close(self) -> None:
        """Unmap every window.  One that the writer still holds (after an error) is
        unmapped when its last view goes."""
        self.view = memoryview(b"")
        while self._open:
            buf, view = self._open.pop()
            view.release()
            if not isinstance(buf, bytearray):
                with contextlib.suppress(BufferError):
                    buf.close()


def _copy_image(writer: VmaWriter, dev_id: int, image: str, fd: int, size: int) -> int:
    """Feed one image to the writer; return the bytes skipped as holes."""
    zeros = 0
    write = writer.write
    write_zeroes = writer.write_zeroes
    windows = _ImageWindows(writer, fd, size, image)
    try:
        for start, end, is_data in _extents(fd, size):
            if not is_data:
                write_zeroes(dev_id, start, end - start)
                zeros += end - start
                continue
            pos = start
            while pos < end:
                if not windows.start <= pos < windows.end:
                    windows.move(pos)
                n = min(end, windows.end) - pos
                inner = pos - windows.start
                write(dev_id, pos, windows.view[inner : inner + n], owned=True)
                pos += n
        windows.finish()
    finally:
        windows.close()
    return zeros
