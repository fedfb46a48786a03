"""Restore an archive's disks as images: raw (``extract``'s way) or qcow2 (through an
in-process read-only export and ``qemu-img convert``).

For qcow2, the archive is checked and indexed once (:func:`~nbdvma.archive_backend.open_archive`,
which also writes the VM state out as it passes), served on a private unix socket in
a 0700 temporary directory, and each disk converted by ``qemu-img convert -f raw -O
qcow2 nbd+unix:///NAME?socket=...``: the export reports zero blocks as holes, so the
images are sparse.  The configs and ``vmstate.bin`` are written as ``extract`` writes
them.  Every file is created 0600 under a temporary name (``tmp-disk-NAME.qcow2``) and
renamed only once everything is done; a failure removes the temporary files, so
nothing incomplete is left under a final name.

The module prints nothing: ``say`` gets the lines to show.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence

import trio

from nbdvma.addresses import UnixAddress
from nbdvma.archive_backend import ArchiveBackend, prepare
from nbdvma.errors import NbdvmaError, ToolError, VmaFormatError
from nbdvma.listeners import open_listener
from nbdvma.server import NbdServer
from nbdvma.signals import stop_on_signals
from nbdvma.tools.extract import RESTORED_FILE_MODE, extract_archive
from nbdvma.vma.digest import DIGEST_CONFIG
from nbdvma.vma.format import VMA_CLUSTER_SIZE, VMA_VMSTATE_NAME
from nbdvma.vma.index import IndexedArchive

__all__ = ["FORMATS", "restore_archive"]

#: Seconds between a conversion's progress lines.
PROGRESS_INTERVAL = 5.0

#: The image formats :func:`restore_archive` writes.
FORMATS = ("raw", "qcow2")


def restore_archive(
    path: str,
    dirname: str,
    *,
    image_format: str = "raw",
    drives: Sequence[str] | None = None,
    say: Callable[[str], None] = lambda line: None,
    qemu_img: str = "qemu-img",
    progress_interval: float = PROGRESS_INTERVAL,
    s3_endpoint: str | None = None,
) -> None:
    """Restore the disks (as ``disk-NAME.raw`` or ``.qcow2``), configs and
    ``vmstate.bin`` of the archive at ``path`` into the new directory ``dirname``.

    Args:
        image_format: ``raw`` or ``qcow2``.
        drives: restore only these devices (by name; ``vmstate`` included).
        say: called with progress lines.
        qemu_img: the ``qemu-img`` program (qcow2).
        progress_interval: seconds between a conversion's progress lines (qcow2).
        s3_endpoint: the endpoint of an ``s3://BUCKET/KEY`` archive (default: the
            environment's).

    Raises:
        ToolError: the archive is damaged, a file cannot be written, ``qemu-img``
            failed...; no file is left under a final name for what failed.
    """
    if image_format == "raw":
        extract_archive(path, dirname, io.StringIO(), drives=drives, s3_endpoint=s3_endpoint)
        return
    if image_format != "qcow2":
        raise ToolError(f"unknown image format {image_format!r} (raw or qcow2)")
    if path == "-":
        raise ToolError("--format qcow2 reads the archive in place: save stdin to a file first")
    try:
        trio.run(
            _restore_qcow2, path, dirname, drives, say, qemu_img, progress_interval, s3_endpoint
        )
    except BaseExceptionGroup as group:
        # trio's nurseries wrap what fails in groups: report the error itself.
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        if isinstance(leaf, NbdvmaError | OSError):
            raise leaf from None
        raise


# qemu-img convert -p redraws "    (12.34/100%)\r" on its stdout.
_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


async def _run_convert(
    command: list[str], progress: Callable[[float], None], interval: float
) -> tuple[int, str]:
    """Run ``qemu-img convert -p``: report its percentage every ``interval`` seconds;
    return its exit status and the last line of its stderr.  Cancelled, it is killed.
    """
    errors = bytearray()

    async def drain_stderr(stream: trio.abc.ReceiveStream) -> None:
        async for chunk in stream:
            errors.extend(chunk[-4096:])
            del errors[:-4096]

    async with trio.open_nursery() as nursery:
        try:
            proc: trio.Process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    command,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    check=False,
                )
            )
        except FileNotFoundError:
            raise ToolError(
                f"restore failed - {command[0]} not found: install qemu-utils"
            ) from None
        assert proc.stdout is not None
        assert proc.stderr is not None
        nursery.start_soon(drain_stderr, proc.stderr)
        last = time.monotonic()
        async for chunk in proc.stdout:
            found = _PERCENT.findall(chunk)
            if found and time.monotonic() - last >= interval:
                last = time.monotonic()
                progress(float(found[-1]))
    assert proc.returncode is not None
    lines = errors.decode(errors="replace").strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


class _Files:
    """The files of one restore, created 0600 under temporary names."""

    def __init__(self, dirname: str) -> None:
        self.dirname = dirname
        self.pending: list[tuple[str, str]] = []  # (temporary, final)

    def create(self, name: str) -> tuple[str, int]:
        """Create ``tmp-NAME`` (0600, new); its path and descriptor."""
        tmp = os.path.join(self.dirname, f"tmp-{name}")
        self.pending.append((tmp, os.path.join(self.dirname, name)))
        return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def give_names(self) -> None:
        """Every temporary file to its final name (never replacing a file)."""
        for tmp, final in self.pending:
            os.link(tmp, final)
            os.unlink(tmp)
        self.pending = []

    def discard(self) -> None:
        """Remove the temporary files (after a failure)."""
        for tmp, _ in self.pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


class _VmstateFile:
    """``vmstate.bin``, written cluster by cluster as the index pass reads them (zero
    blocks left as holes), then cut to the size the header records."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.length = 0

    def write(self, cluster: int, mask: int, data: memoryview) -> None:
        base = cluster * VMA_CLUSTER_SIZE
        pos = 0
        for j in range(16):
            if mask >> j & 1:
                os.pwrite(self.fd, data[pos : pos + 4096], base + j * 4096)
                pos += 4096
        self.length = base + VMA_CLUSTER_SIZE

    def finish(self, size: int) -> None:
        length = self.length
        if length - VMA_CLUSTER_SIZE < size <= length:
            length = size
        os.ftruncate(self.fd, length)
        os.fsync(self.fd)
        os.close(self.fd)


async def _restore_qcow2(
    path: str,
    dirname: str,
    drives: Sequence[str] | None,
    say: Callable[[str], None],
    qemu_img: str,
    progress_interval: float,
    s3_endpoint: str | None,
) -> None:
    try:
        os.mkdir(dirname)
    except OSError as exc:
        raise ToolError(f"unable to create target directory {exc.strerror}") from exc
    files = _Files(dirname)
    private = tempfile.mkdtemp(prefix="nbdvma-restore-")  # 0700: the socket's directory
    archive: IndexedArchive | None = None
    try:
        async with trio.open_nursery() as nursery, stop_on_signals(nursery.cancel_scope) as stop:
            archive = await _index(nursery, path, files, drives, say, s3_endpoint)
            await _convert_all(archive, private, files, say, qemu_img, progress_interval)
            files.give_names()
        if stop.signum is not None:
            raise ToolError(f"interrupted by {stop.name}", status=128 + stop.signum)
    except BaseException:
        files.discard()
        raise
    finally:
        if archive is not None:
            archive.close()
        shutil.rmtree(private, ignore_errors=True)


async def _index(
    nursery: trio.Nursery,
    path: str,
    files: _Files,
    drives: Sequence[str] | None,
    say: Callable[[str], None],
    s3_endpoint: str | None,
) -> IndexedArchive:
    """Check and index the archive; write its configs and VM state on the way."""
    disks = None if drives is None else [d for d in drives if d != VMA_VMSTATE_NAME]
    want_vmstate = drives is None or VMA_VMSTATE_NAME in drives
    vmstate: _VmstateFile | None = None
    try:
        if want_vmstate:
            _, fd = files.create("vmstate.bin")
            vmstate = _VmstateFile(fd)
        archive = await prepare(
            nursery,
            path,
            disks,
            None,
            say,
            vmstate=vmstate.write if vmstate is not None else None,
            s3_endpoint=s3_endpoint,
        )
    except VmaFormatError as exc:
        raise ToolError(f"restore failed - {exc}") from exc
    except NbdvmaError as exc:
        raise ToolError(str(exc)) from exc
    except OSError as exc:
        raise ToolError(f"restore failed - {exc.filename or path}: {exc.strerror}") from exc
    header = archive.index.header
    if vmstate is not None:
        dev = header.vmstate
        if dev is None:
            os.close(vmstate.fd)
            tmp, _ = files.pending.pop()
            os.unlink(tmp)
        else:
            vmstate.finish(dev.size)
    for name, data in header.configs:
        if name != DIGEST_CONFIG:
            _, fd = files.create(name)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    return archive


async def _convert_all(
    archive: IndexedArchive,
    private: str,
    files: _Files,
    say: Callable[[str], None],
    qemu_img: str,
    progress_interval: float = PROGRESS_INTERVAL,
) -> None:
    """Serve the archive on a private socket; ``qemu-img convert`` each disk from it."""
    socket_path = os.path.join(private, "nbd.sock")
    listener, _ = await open_listener(UnixAddress(socket_path), unix_mode=0o600)
    server = NbdServer(ArchiveBackend(archive))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, [listener])
        for name in archive.index.disks:
            tmp, fd = files.create(f"disk-{name}.qcow2")
            os.close(fd)  # qemu-img truncates and writes it: it keeps its mode 0600
            say(f"{name}: converting to {tmp} (qcow2)")
            uri = f"nbd+unix:///{name}?socket={socket_path}"
            started = time.monotonic()

            def progress(percent: float, name: str = name) -> None:
                say(f"{name}: {percent:.0f}% converted")

            returncode, why = await _run_convert(
                [qemu_img, "convert", "-p", "-f", "raw", "-O", "qcow2", uri, tmp],
                progress,
                progress_interval,
            )
            if returncode:
                raise ToolError(
                    f"restore failed - qemu-img convert of {name}: "
                    f"{why or f'exit status {returncode}'}"
                )
            say(f"{name}: converted in {time.monotonic() - started:.1f}s")
            os.chmod(tmp, RESTORED_FILE_MODE)
        nursery.cancel_scope.cancel()
