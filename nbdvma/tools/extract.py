"""``extract``: restore configs, disks and the VM state from an archive into a new directory.

Differs from ``vma extract`` where the real tool is lossy or careless: disks are
restored to their exact size (not the last full sector), ``vmstate.bin`` gets every
stored cluster including zero blocks, nothing is ever left half-written under a final
name, existing files are never overwritten, and the data are checked against
nbdvma's data digest, which is not written out as a config file.

Each file is written under a temporary name (``tmp-disk-NAME.raw``) and renamed only
once the whole archive has been read and checked.  The writes of one extent run in a
worker thread while the reader fills its next buffer.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Iterable, Sequence
from typing import TextIO

from nbdvma.errors import ToolError, VmaFormatError
from nbdvma.interrupts import deferred
from nbdvma.tools.common import Progress, check_name, digest_line, open_reader, strerror
from nbdvma.vma.background import BackgroundWriter
from nbdvma.vma.digest import DIGEST_CONFIG, DataDigest
from nbdvma.vma.fileio import Writeback, preallocate, pwrite_all
from nbdvma.vma.format import (
    FULL_MASK,
    VMA_BLOCK_SIZE,
    VMA_CLUSTER_SIZE,
    VMA_MAX_DEVICES,
    VMA_MAX_EXTENT_SIZE,
    DeviceInfo,
)
from nbdvma.vma.reader import Cluster, VmaReader

__all__ = ["extract_archive"]

# extract reads extents into this many buffers, writing one while reading the next.
_EXTRACT_BUFFERS = 3

#: Restored disks, VM state and configs hold what the archive holds: the archive is
#: 0600, and so are they.
RESTORED_FILE_MODE = 0o600


#: Contiguous bytes for an output file: (offset, views, end offset).
_Range = tuple[int, list[memoryview | bytes], int]


class _Target:
    """One output file of extract: collects an extent's writes as few contiguous ranges,
    which :func:`_write_ranges` then writes (in the worker thread)."""

    def __init__(self, tmp: str, final: str, size: int | None) -> None:
        self.tmp = tmp
        self.final = final
        self.size = size  # the disk size; None for vmstate (grows as it is written)
        self.fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, RESTORED_FILE_MODE
        )
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
            pwrite_all(target.fd, views, at)
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
    if mask == FULL_MASK:
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


class _Outputs:
    """The files of one extract, and their removal should it fail."""

    def __init__(self, dirname: str) -> None:
        self.dirname = dirname
        self.targets: dict[int, _Target] = {}
        # The temporary files, named before they are created: the directory is new
        # and ours, so whatever of them exists after a failure (or a signal that
        # landed while one was being opened) is removed.
        self.temporary: list[str] = []

    def make_dir(self) -> None:
        """Create the (new) directory."""
        try:
            os.mkdir(self.dirname)
        except OSError as exc:
            raise ToolError(f"unable to create target directory {strerror(exc)}") from exc

    def write_config(self, name: str, data: bytes) -> None:
        """Write a config file under its own name (never replacing a file)."""
        check_name(name, "config")
        try:
            fd = os.open(
                os.path.join(self.dirname, name),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                RESTORED_FILE_MODE,
            )
            try:
                pwrite_all(fd, [data], 0)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ToolError(f"unable to write file: {name}: {strerror(exc)}") from exc

    def add(self, dev: DeviceInfo, vmstate_id: int) -> _Target:
        """Create the temporary file of a disk, or of the VM state."""
        if dev.is_vmstate:
            if dev.dev_id != vmstate_id:
                raise ToolError(f"create vmstate file '{self.dirname}/vmstate.bin' failed")
            tmp = os.path.join(self.dirname, "tmp-vmstate.bin")
            final = os.path.join(self.dirname, "vmstate.bin")
            size = None
        else:
            check_name(dev.name, "device")
            tmp = os.path.join(self.dirname, f"tmp-disk-{dev.name}.raw")
            final = os.path.join(self.dirname, f"disk-{dev.name}.raw")
            size = dev.size
        self.temporary.append(tmp)
        try:
            target = self.targets[dev.dev_id] = _Target(tmp, final, size)
        except OSError as exc:
            raise ToolError(f"can't create file {tmp} - {strerror(exc)}") from exc
        return target

    def give_names(self) -> None:
        """Give every complete file its final name."""
        for target in self.targets.values():
            try:
                _finish_name(target.tmp, target.final)
            except OSError as exc:
                raise ToolError(
                    f"rename {target.tmp} to {target.final} failed - {strerror(exc)}"
                ) from exc

    def discard(self) -> None:
        """Close every file and remove the temporary ones (after a failure)."""
        for target in self.targets.values():
            target.close()
        for tmp in self.temporary:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def extract_archive(
    path: str,
    dirname: str,
    out: TextIO,
    *,
    verbose: bool = False,
    drives: Sequence[str] | None = None,
    s3_endpoint: str | None = None,
) -> None:
    """``vma extract``: restore configs, disks and vmstate into a new directory.

    Args:
        path: the archive, ``-`` for stdin, ``s3://BUCKET/KEY`` for an object (streamed
            with one GET from ``s3_endpoint``, or the environment's endpoint).
        dirname: the target directory; it must not exist.
        out: where ``DEVINFO`` lines and ``-v`` output go.
        verbose: print progress and totals.
        drives: restore only these devices (by name; ``vmstate`` included); the
            others are read and checked but not tracked for duplicates or gaps.

    Raises:
        ToolError: ``restore failed - <reason>`` and the like; temporary files are
            removed, so nothing incomplete remains under a final name.
        S3Error: the object cannot be read (the temporary files are removed too).
    """
    with open_reader(path, thread_guard=deferred, s3_endpoint=s3_endpoint) as reader:
        selected = _select(reader, drives)
        disks = [d for d in selected if not d.is_vmstate]
        outputs = _Outputs(dirname)
        # Writes of one extent run in a worker thread while the next extents are read
        # into the reader's other buffers (bounded: the reader waits for a buffer's
        # writes before it fills it again).
        worker = BackgroundWriter(
            max_bytes=_EXTRACT_BUFFERS * VMA_MAX_EXTENT_SIZE, thread_guard=deferred
        )
        try:
            _create_files(reader, outputs, selected, out)
            progress = Progress(reader, disks, out if verbose else None)
            digest = _restore(reader, worker, outputs.targets, disks, progress)
            outputs.give_names()
            progress.totals()
            if verbose:
                out.write(digest_line(digest))
        except BaseException:
            worker.close()  # no write may touch a descriptor after it is closed
            outputs.discard()
            raise
        finally:
            worker.close()


def _select(reader: VmaReader, drives: Sequence[str] | None) -> list[DeviceInfo]:
    """The devices to restore; the reader stops tracking the others."""
    present = [d for d in reader.header.devices if d.dev_id <= VMA_MAX_DEVICES]
    if drives is not None:
        names = {d.name for d in present}
        for name in drives:
            if name not in names:
                raise ToolError(f"no device named '{name}' in archive")
    selected = [d for d in present if drives is None or d.name in drives]
    reader.skip_devices(d.dev_id for d in present if d not in selected)
    return selected


def _create_files(
    reader: VmaReader, outputs: _Outputs, selected: list[DeviceInfo], out: TextIO
) -> None:
    """The directory, the configs, and a temporary file for each selected device."""
    outputs.make_dir()
    for name, data in reader.header.configs:
        # The data digest is checked, not restored: it describes the archive's
        # extents, and nothing in the directory could be checked against it.
        if name != DIGEST_CONFIG:
            outputs.write_config(name, data)
    for dev in selected:
        target = outputs.add(dev, reader.vmstate_id)
        if target.size is not None:
            out.write(f"DEVINFO {target.tmp} {target.size}\n")
    out.flush()


def _restore(
    reader: VmaReader,
    worker: BackgroundWriter,
    targets: dict[int, _Target],
    disks: list[DeviceInfo],
    progress: Progress,
) -> DataDigest | None:
    """Read every extent into the files, check the whole, make the files durable.

    Returns:
        The data digest the extents matched (``None``: the archive has none).

    Raises:
        ToolError: ``restore failed - <reason>``, a changed byte included.
    """
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
        # No file gets its final name unless the data are those written.
        digest = reader.check_digest()
        reader.check_missing(disks)
        worker.drain()
        for target in targets.values():
            if target.size is None:
                _finish_vmstate(target, reader.device(reader.vmstate_id))
            os.fsync(target.fd)
            target.close()
        return digest
    except VmaFormatError as exc:
        raise ToolError(f"restore failed - {exc}") from exc
    except BrokenPipeError:
        raise  # the reader of -v's progress (stdout) went away, not the disk: quietly
    except OSError as exc:
        raise ToolError(f"restore failed - write failed: {strerror(exc)}") from exc


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
