"""``create``: an archive of config files and raw disk images, as ``vma create`` writes it.

Images are read a window at a time through ``mmap`` and zero-detected by the writer,
while a worker thread writes the previous extents (:class:`~nbdvma.vma.background.BackgroundSink`):
the two halves of the work run on two cores.  Holes (``SEEK_HOLE``) are written as zero
ranges without being read.  Nothing exists under the archive's name before it is
complete: a failure, Ctrl-C included, removes ``ARCHIVE.part``.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple, TextIO

from nbdvma.errors import ToolError, VmaWriterError
from nbdvma.interrupts import deferred
from nbdvma.pve import archive_configs, split_config_argument
from nbdvma.tools.common import strerror
from nbdvma.vma.format import VMA_CLUSTER_SIZE, VMA_EXTENT_HEADER_SIZE, WRITER_CLUSTERS_PER_EXTENT

if TYPE_CHECKING:
    from nbdvma.vma.background import BackgroundSink
    from nbdvma.vma.sink import Sink
    from nbdvma.vma.writer import VmaWriter

__all__ = ["create_archive"]

_SECTOR = 512
# create maps images _WINDOW bytes at a time and keeps the last _KEEP_WINDOWS mapped.
_WINDOW = 8 << 20
_KEEP_WINDOWS = 3
# ... and lets this many bytes of extents wait for the sink's worker thread.
_IN_FLIGHT = 8 << 20
_MAX_CONFIG_READ = 65536 + 1  # one byte more than any config may hold


class _Image(NamedTuple):
    """An image opened for reading: its device name, path, descriptor and size."""

    name: str
    path: str
    fd: int
    size: int


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
    force: bool = False,
    s3_endpoint: str | None = None,
) -> None:
    """``vma create``: write an archive of config files and raw disk images.

    Args:
        path: the new archive (must not exist unless ``force``; ``-`` for stdout;
            ``s3://BUCKET/KEY``; ``.zst`` compresses).
        configs: ``[NAME=]FILE`` config files; when a device is named ``drive-KEY``
            an unnamed FILE is stored as ``qemu-server.conf`` with ``#qmdump#map``
            lines (:func:`nbdvma.pve.archive_configs`), else under its basename.
        images: ``[NAME=]PATH``; the default name is ``disk<N>``.
        err: where ``-v`` prints its ``image ...`` lines.
        verbose: print per-image statistics.
        force: replace an archive that exists (once the new one is complete).
        s3_endpoint: the endpoint of an ``s3://`` archive (default: the environment's).

    Raises:
        ToolError: bad input, a limit of the format, or an I/O error; the partial
            archive is removed (an upload aborted).
        S3Error: object storage refused or failed.
    """
    if not images and not configs:
        raise ToolError("nothing to archive: give at least one image or config (-c)")
    config_items = [_read_config(cfg) for cfg in configs]
    try:
        with contextlib.ExitStack() as stack:
            opened = []
            for index, arg in enumerate(images):
                opened.append(_open_image(arg, index, stack))
            try:
                config_data, _, warnings = archive_configs(config_items, [i.name for i in opened])
            except ValueError as exc:
                raise ToolError(str(exc)) from exc
            for image in opened:
                if image.size % _SECTOR:
                    warnings.append(
                        f"image {image.path} is {image.size} bytes, not whole 512-byte "
                        f"sectors: stored as {-(-image.size // _SECTOR) * _SECTOR}, zeros "
                        "at the end"
                    )
            for warning in warnings:
                err.write(f"warning: {warning}\n")
            target = _Target(path, force, s3_endpoint)
            _write_archive(target, config_data, opened, err, verbose=verbose)
    except VmaWriterError as exc:
        raise ToolError(str(exc)) from exc
    except OSError as exc:
        raise ToolError(f"create failed - {strerror(exc)}") from exc


def _read_config(arg: str) -> tuple[str | None, str, bytes]:
    """``[NAME=]FILE``: the name given (or ``None``), the file and its bytes."""
    cname, cpath = split_config_argument(arg)
    try:
        with open(cpath, "rb") as f:
            return cname, cpath, f.read(_MAX_CONFIG_READ)
    except OSError as exc:
        raise ToolError(f"unable to read file '{cpath}' - {strerror(exc)}") from exc


#: The first bytes of the image formats QEMU reads besides raw (block/*.c probes).
IMAGE_MAGICS = (
    (b"QFI\xfb", "qcow2"),
    (b"KDMV", "vmdk"),
    (b"# Disk DescriptorFile", "vmdk"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),
    (b"QED\0", "qed"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"),
    (b"<<< Sun VirtualBox Disk Image >>>", "vdi"),
    (b"<<< innotek VirtualBox Disk Image >>>", "vdi"),
    (b"LUKS\xba\xbe", "luks"),
)


def image_format(head: bytes) -> str:
    """The format a QEMU image starting with ``head`` has (``"raw"`` if none matches)."""
    for magic, name in IMAGE_MAGICS:
        if head.startswith(magic):
            return name
    return "raw"


def _open_image(arg: str, index: int, stack: contextlib.ExitStack) -> _Image:
    """Open ``[NAME=]PATH`` for reading; ``stack`` closes it.

    Raises:
        ToolError: it cannot be opened, is no file or device, is empty, or is an image
            of another format than raw (its bytes would be archived as the disk).
    """
    name, image = _parse_image(arg, index)
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ToolError(f"can't open file {image} - {strerror(exc)}") from exc
    stack.callback(os.close, fd)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise ToolError(f"image {image} is not a regular file or block device")
        size = _image_size(fd)
        head = os.pread(fd, 64, 0)
    except OSError as exc:
        raise ToolError(f"can't open file {image} - {strerror(exc)}") from exc
    if size <= 0:
        raise ToolError(f"image {image} is empty")
    fmt = image_format(head)
    if fmt != "raw":
        raise ToolError(
            f"image {image} is {fmt}, not raw: convert it first "
            f"(qemu-img convert -O raw {image} {image}.raw)"
        )
    return _Image(name, image, fd, size)


class _Target(NamedTuple):
    """Where the archive goes: ``path`` (or ``s3://``), ``--force``, ``--s3-endpoint``."""

    path: str
    force: bool
    s3_endpoint: str | None


def _open_output(target: _Target) -> Sink:
    """The archive's sink (``PATH.part`` for a file, an upload for ``s3://``), its
    threads started with signals held."""
    from nbdvma.output import open_output

    try:
        return open_output(
            target.path,
            None,
            force=target.force,
            s3_endpoint=target.s3_endpoint,
            thread_guard=deferred,
        )
    except OSError as exc:
        raise ToolError(f"can't create file {target.path} - {strerror(exc)}") from exc
    except VmaWriterError as exc:
        raise ToolError(str(exc)) from exc


def _write_archive(
    target: _Target,
    config_data: list[tuple[str, bytes]],
    images: list[_Image],
    err: TextIO,
    *,
    verbose: bool,
) -> None:
    """Write the archive; on any failure (a signal too) remove what was written."""
    from nbdvma.output import UploadSink
    from nbdvma.vma.background import BackgroundSink
    from nbdvma.vma.sink import FileSink
    from nbdvma.vma.writer import VmaWriter

    output: Sink | None = None
    sink: BackgroundSink | None = None
    writer: VmaWriter | None = None
    try:
        with deferred():  # a signal is raised only once output holds the file
            output = _open_output(target)
        if isinstance(output, FileSink) and output.replaced:
            err.write(f"replaced {output.replaced}, left by an earlier run no longer running\n")
        # Extents are written by a worker thread while the next clusters are read
        # and zero-detected: the two halves of the work run on two cores.
        sink = BackgroundSink(output, max_bytes=_IN_FLIGHT, thread_guard=deferred)
        writer = VmaWriter(sink)
        _fill(writer, sink, config_data, images, err, verbose=verbose)
        writer.finish()
    except BaseException:
        if output is not None:
            if isinstance(output, UploadSink):
                # The worker thread may wait for the endpoint: make it give up now.
                output.interrupt()
            if writer is not None:
                writer.abort(discard=True)
            # Idempotent: what the writer did not close yet (the .part is removed
            # while its lock is held, so never another writer's).
            (sink or output).abort(discard=True)
        raise


def _fill(
    writer: VmaWriter,
    sink: BackgroundSink,
    config_data: list[tuple[str, bytes]],
    images: list[_Image],
    err: TextIO,
    *,
    verbose: bool,
) -> None:
    """Register the configs and devices, then copy every image into the writer."""
    # At most every allocated byte of the images, plus headers (the unused rest is
    # given back at the end); writes into allocated blocks cost less.
    sink.reserve(sum(_archive_bound(i.fd, i.size) for i in images))
    for cname, data in config_data:
        writer.add_config(cname, data)
    # Device sizes are whole 512-byte sectors, as QEMU reports a raw image's size:
    # Proxmox's reader cannot restore a block that starts in a partial last sector
    # (S12), so the tail is padded with zeros instead.
    dev_ids = [writer.add_device(i.name, -(-i.size // _SECTOR) * _SECTOR) for i in images]
    for dev_id, image in zip(dev_ids, images, strict=True):
        zeros = _copy_image(writer, dev_id, image.path, image.fd, image.size)
        if verbose:
            err.write(f"image {image.name}: size={image.size} zeros={zeros} saved={zeros}\n")


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
