"""An archive written through NBD: the library's way to serve disks into a VMA archive.

An :class:`ArchiveSession` owns the writer, the NBD server, the optional VM-state
listener and the rule that ends the backup:

* a disk is complete when every byte of it has been written (data or zeroes) and no
  client is connected to it any more (QEMU flushes and disconnects when its target
  node is removed); a client that only looks completes nothing;
* the VM state is complete at EOF of the one connection its listener accepts;
* when all are complete :attr:`ArchiveSession.done` is set, and :meth:`finish`
  finishes the archive (fsync, rename).

It prints nothing: warnings go to the ``nbdvma.session`` logger, progress and summary
are returned as lines for the caller to show.  ``nbdvma serve`` and ``nbdvma backup``
(in-process, on a private unix socket) both run one.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import ssl
import time

import attrs
import trio

from nbdvma.addresses import Address, TcpAddress
from nbdvma.backends import NullBackend, VmaBackend
from nbdvma.errors import S3Error
from nbdvma.limits import ServerLimits
from nbdvma.listeners import adopt_listener, open_listener, remove_socket
from nbdvma.output import UploadSink, open_output
from nbdvma.server import ConnectionObserver, NbdServer
from nbdvma.tls import TlsConfig, TlsMode
from nbdvma.units import format_bytes
from nbdvma.vma.sink import FileSink
from nbdvma.vma.writer import DeviceProgress, VmaWriter

__all__ = [
    "ArchiveSession",
    "DiscardSession",
    "ExportSession",
    "SessionOptions",
    "open_nbd_listeners",
]

log = logging.getLogger(__name__)

#: Seconds between looks at an upload's state (a failed part ends the session).
UPLOAD_WATCH_INTERVAL = 0.5


@attrs.frozen
class SessionOptions:
    """Everything a session needs: the archive, its disks (name, size) and configs,
    where to listen, and the server's limits and TLS."""

    archive: str
    disks: tuple[tuple[str, int], ...]
    configs: tuple[tuple[str, bytes], ...] = ()
    vmstate: Address | None = None
    listen: tuple[Address, ...] = (TcpAddress("127.0.0.1", 10809),)
    #: Sockets already listening (systemd socket activation), accepted on as they are,
    #: before the addresses of :attr:`listen`.
    listen_fds: tuple[int, ...] = ()
    compress: str | None = None
    unix_mode: int = 0o600
    limits: ServerLimits = attrs.Factory(ServerLimits)
    #: Header estimate of the VM-state size, until finish knows the real one.
    vmstate_size_hint: int = 65536
    #: About how large the VM state will be (the VM's RAM), for the part size of an
    #: upload; unlike :attr:`vmstate_size_hint`, never written into the header.
    expected_vmstate: int = 0
    #: TLS for the NBD listeners (``--tls``...); off by default.
    tls: TlsConfig = attrs.Factory(TlsConfig)
    #: Replace an archive that exists (at the end: ``--force``).
    force: bool = False
    #: The endpoint of an ``s3://`` archive (``--s3-endpoint``; default: the environment's).
    s3_endpoint: str | None = None


class _Observer(ConnectionObserver):
    def __init__(self, session: ExportSession) -> None:
        self.session = session
        self.full = False  # an ENOSPC was reported and no write has succeeded since

    def transmission_started(self, export_name: str) -> None:
        self.session.active[export_name] += 1

    def connection_ended(self, export_name: str) -> None:
        session = self.session
        session.active[export_name] -= 1
        progress = session.progress(export_name)
        if not session.active[export_name] and progress.written and not progress.complete:
            # Nothing else will move this disk on: say so, or the session waits silently.
            log.warning(
                f"{export_name}: its last client disconnected with "
                f"{format_bytes(progress.size - progress.written)} of "
                f"{format_bytes(progress.size)} not written; waiting for a client to write "
                "the rest"
            )
        session.check_complete()

    def request_failed(self, export_name: str, command: str, error: int) -> None:
        if error in (errno.ENOSPC, errno.EDQUOT) and not self.full:
            # Once per episode, not per request: a client retries (QEMU's backup job
            # fails, or retries with on-target-error=retry... ) and each would log.
            self.full = True
            log.warning(
                f"{export_name}: {command} answered {errno.errorcode[error]}: "
                f"{self.session.space_report()}; clients get {errno.errorcode[error]} "
                "until space is freed"
            )

    def requests_recovered(self, export_name: str, command: str) -> None:
        if self.full:
            self.full = False
            log.warning(f"{export_name}: {command} succeeded: space available again")


class ExportSession:
    """Exports served until every one was written completely: the rule that ends a
    session, whatever keeps the data (:class:`ArchiveSession`, :class:`DiscardSession`).
    """

    def __init__(
        self,
        options: SessionOptions,
        backend: VmaBackend | NullBackend,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        """Serve ``options.disks`` from ``backend`` (not listening yet: :meth:`start`)."""
        self.options = options
        self.backend = backend
        self.active: dict[str, int] = {name: 0 for name, _ in options.disks}
        self.done = trio.Event()
        self.vmstate_done = True
        self.listening: list[Address] = []
        self.vmstate_address: Address | None = None
        #: What a dead earlier writer of this archive had left, replaced now (see
        #: :attr:`FileSink.replaced <nbdvma.vma.sink.FileSink.replaced>`); to tell the user.
        self.replaced: str | None = None
        self._started = time.monotonic()
        self.server = NbdServer(
            backend,
            limits=options.limits,
            observer=_Observer(self),
            tls_mode=options.tls.mode,
            ssl_context=ssl_context,
        )

    def progress(self, name: str) -> DeviceProgress:
        """How far the disk ``name`` has got."""
        return self.backend.progress(name)

    def check_complete(self) -> None:
        """Set :attr:`done` once every disk and the VM state are complete."""
        if not self.vmstate_done:
            return
        for name in self.active:
            if self.active[name] or not self.progress(name).complete:
                return
        self.done.set()

    def incomplete(self) -> list[str]:
        """Names of what is not complete yet (disks, then ``vmstate``)."""
        out = []
        for name in self.active:
            if not self.progress(name).complete or self.active[name]:
                out.append(name)
        if not self.vmstate_done:
            out.append("vmstate")
        return out

    async def start(self, nursery: trio.Nursery) -> None:
        """Open the listeners and serve in ``nursery``; returns once listening."""
        listeners, self.listening = await open_nbd_listeners(self.options)
        await nursery.start(self.server.serve, listeners)

    async def finish(self) -> None:
        """Once :attr:`done`: make what was written final."""

    def abort(self) -> None:
        """Stop without finishing."""

    @property
    def finished(self) -> bool:
        """Whether :meth:`finish` completed."""
        return self.done.is_set()

    @property
    def has_output(self) -> bool:
        """Whether anything was kept (a ``.part`` left by :meth:`abort`)."""
        return False

    def remove_sockets(self) -> None:
        """Remove the unix socket files this session created (and only those)."""
        for address in [*self.listening, self.vmstate_address]:
            remove_socket(address)

    def space_report(self) -> str:
        """``no space left for /srv/x.vma.part (12.0 KiB free on its file system)``."""
        if self.options.archive == "-":
            return "no space left for the output stream"
        part = os.path.abspath(self.options.archive + ".part")
        try:
            fs = os.statvfs(os.path.dirname(part))
        except OSError as exc:
            return f"no space left for {part} (free space unknown: {exc.strerror})"
        return (
            f"no space left for {part} "
            f"({format_bytes(fs.f_bavail * fs.f_frsize)} free on its file system)"
        )

    def progress_lines(self) -> list[str]:
        """One line per disk: ``drive-scsi0: 42% (860.0 MiB of 2.0 GiB)``."""
        lines: list[str] = []
        for name in self.active:
            p = self.progress(name)
            pct = int(100 * p.written / p.size)
            lines.append(f"{name}: {pct}% ({format_bytes(p.written)} of {format_bytes(p.size)})")
        return lines

    def disk_summary_lines(self) -> list[str]:
        """Per disk: ``drive-scsi0: size 2.0 GiB, zero 1.5 GiB, stored 512.0 MiB``."""
        lines = []
        for name in self.active:
            p = self.progress(name)
            lines.append(
                f"{name}: size {format_bytes(p.size)}, zero {format_bytes(p.zero_bytes)}, "
                f"stored {format_bytes(p.stored_bytes)}"
            )
        return lines

    def summary_lines(self) -> list[str]:
        """:meth:`disk_summary_lines`, then the duration."""
        return [*self.disk_summary_lines(), f"duration {time.monotonic() - self._started:.1f}s"]


class DiscardSession(ExportSession):
    """The same exports and the same end, every write discarded (``--backend null``):
    the protocol's own cost, for benchmarks."""

    def __init__(self, options: SessionOptions) -> None:
        """Serve ``options.disks`` into a :class:`~nbdvma.backends.NullBackend`."""
        super().__init__(options, NullBackend(options.disks), options.tls.server_context())

    def summary_lines(self) -> list[str]:
        """Each disk's size (all of it was written, and discarded), then the duration."""
        return [
            *(f"{name}: size {format_bytes(size)}, discarded" for name, size in self.options.disks),
            f"duration {time.monotonic() - self._started:.1f}s",
        ]


class ArchiveSession(ExportSession):
    """One archive being written through NBD (and a VM-state socket)."""

    def __init__(self, options: SessionOptions) -> None:
        """Open the archive (as ``ARCHIVE.part``) and register every device.

        Raises:
            NbdvmaError: bad options or an existing archive.
            OSError: the archive cannot be created.
        """
        # Certificates first: a bad one must not leave an archive behind.
        ssl_context = options.tls.server_context()
        sink = open_output(
            options.archive,
            options.compress,
            force=options.force,
            s3_endpoint=options.s3_endpoint,
            size_hint=sum(size for _, size in options.disks)
            + max(options.vmstate_size_hint, options.expected_vmstate),
        )
        #: The archive's upload, when it goes to object storage (else ``None``).
        self.upload = sink if isinstance(sink, UploadSink) else None
        # Write-behind where a cluster stored meanwhile is read back with a plain
        # pread (a rewrite's check on the event loop while an extent is written).
        plain = isinstance(sink, FileSink) and not sink.compressed
        writer = VmaWriter(sink, write_behind=plain)
        try:
            for name, data in options.configs:
                writer.add_config(name, data)
            devices = {name: writer.add_device(name, size) for name, size in options.disks}
            vmstate_id = 0
            if options.vmstate is not None:
                vmstate_id = writer.add_stream(size_hint=options.vmstate_size_hint)
        except BaseException:
            writer.abort(discard=True)
            raise
        self.writer = writer
        # An upload is durable only once complete: no FLUSH to acknowledge before.
        self.vma = VmaBackend(writer, devices, flush=self.upload is None)
        super().__init__(options, self.vma, ssl_context)
        self.replaced = sink.replaced if isinstance(sink, FileSink) else None
        self.vmstate_done = options.vmstate is None
        self._vmstate_id = vmstate_id

    async def start(self, nursery: trio.Nursery) -> None:
        """Open the listeners (and the VM state's) and serve in ``nursery``; returns
        once listening."""
        await super().start(nursery)
        if self.upload is not None:
            nursery.start_soon(self._watch_upload, self.upload)
        if self.options.vmstate is not None:
            listener, real = await open_listener(
                self.options.vmstate, unix_mode=self.options.unix_mode
            )
            self.vmstate_address = real
            if _exposed(listener):
                log.warning(f"--vmstate {real} is reachable from other hosts and never encrypted")
            nursery.start_soon(self._receive_vmstate, listener)

    async def _watch_upload(self, upload: UploadSink) -> None:
        """End the session as soon as the upload fails (not at the next write, which
        may never come), and, once the session is cancelled (a signal, an error
        elsewhere), make whatever waits for the endpoint in a worker thread raise at
        once, so that the upload can be aborted without waiting for it."""
        try:
            # Polled: the failure is set by a plain thread of the upload, which knows
            # no trio; twice a second costs nothing.
            while upload.failure is None:  # noqa: ASYNC110
                await trio.sleep(UPLOAD_WATCH_INTERVAL)
            raise S3Error(str(upload.failure))
        finally:
            upload.interrupt()

    async def _receive_vmstate(self, listener: trio.SocketListener) -> None:
        async with listener:
            stream = await listener.accept()
        head = b""
        async with stream:
            while data := await stream.receive_some(1 << 20):
                if len(head) < len(QEMU_VM_FILE_HEAD):
                    head += data[: len(QEMU_VM_FILE_HEAD) - len(head)]
                    if len(head) == len(QEMU_VM_FILE_HEAD):
                        _check_vmstate_head(head)
                await self.vma.apply(
                    functools.partial(self.writer.append, self._vmstate_id, data),
                    functools.partial(self.writer.may_write_extent, len(data), now=True),
                )
        if len(head) < len(QEMU_VM_FILE_HEAD):
            log.warning(
                f"vmstate: the stream ended after {len(head)} bytes, before a QEMU "
                "migration stream's header: the archive has no usable VM state"
            )
        self.vmstate_done = True
        log.info("vmstate: complete")
        self.check_complete()

    async def finish(self) -> None:
        """Finish the archive: the last extents, fsync, rename to the final name."""
        async with self.vma.lock, self.vma.sink_lock:
            await trio.to_thread.run_sync(self.writer.finish)

    def abort(self) -> None:
        """Leave the archive incomplete under ``ARCHIVE.part``, or abort its upload.

        A ``.part`` that never received anything (a failure at start-up) is removed
        (by the sink, which does it while it still holds the file's lock).  An upload
        is aborted, retried for a while if the endpoint does not answer (blocking).
        """
        self.writer.abort()

    def left_behind(self) -> str:
        """What an aborted session left, for the user: ``the archive is incomplete and
        left as X.part``, ``the upload to s3://... was aborted; nothing is stored``."""
        archive = self.options.archive
        if self.upload is not None:
            if self.upload.upload_state == "abandoned":
                return f"the incomplete upload to {self.upload.url} could not be aborted"
            return f"the upload to {self.upload.url} was aborted; nothing is stored"
        if archive == "-":
            return "the output stream is incomplete"
        if self.has_output:
            return f"the archive is incomplete and left as {archive}.part"
        return "no archive left"

    def archive_size(self) -> int | None:
        """The finished archive's size in bytes (``None``: a stream, or not finished)."""
        if self.upload is not None:
            return self.upload.size if self.finished else None
        archive = self.options.archive
        if archive != "-" and os.path.exists(archive):
            return os.path.getsize(archive)
        return None

    @property
    def finished(self) -> bool:
        """Whether the archive is finished: it has its final name."""
        return self.writer.finished

    @property
    def has_output(self) -> bool:
        """Whether anything reached the archive (then :meth:`abort` leaves a ``.part``)."""
        return self.writer.has_output

    def vmstate_bytes(self) -> int:
        """Bytes of VM state received so far (0 without a VM-state stream)."""
        if not self._vmstate_id:
            return 0
        return self.writer.progress(self._vmstate_id).written

    def progress_lines(self) -> list[str]:
        """One line per disk: ``drive-scsi0: 42% (860.0 MiB of 2.0 GiB)``, then the
        VM state's."""
        lines = super().progress_lines()
        if self.options.vmstate is not None:
            p = self.writer.progress(self._vmstate_id)
            state = "complete" if self.vmstate_done else "receiving"
            lines.append(f"vmstate: {format_bytes(p.written)} ({state})")
        return lines

    def summary_lines(self) -> list[str]:
        """:meth:`disk_summary_lines`, then the archive's size and the duration."""
        lines = self.disk_summary_lines()
        size = self.archive_size()
        if size is not None:
            lines.append(f"archive {self.options.archive}: {format_bytes(size)}")
        lines.append(f"duration {time.monotonic() - self._started:.1f}s")
        return lines


#: How a QEMU migration stream begins: ``QEMU_VM_FILE_MAGIC`` ("QEVM"), then
#: ``QEMU_VM_FILE_VERSION`` 3 (big-endian), as QEMU's migration/savevm.c writes them.
QEMU_VM_FILE_HEAD = b"QEVM" + (3).to_bytes(4, "big")


def _check_vmstate_head(head: bytes) -> None:
    """Warn when the VM state is no QEMU migration stream (stored anyway: nothing a
    client sends is dropped, but nobody could resume from it)."""
    if head[:4] != QEMU_VM_FILE_HEAD[:4]:
        log.warning(
            f"vmstate: the stream begins with {head[:4]!r}, not QEMU's migration magic "
            "b'QEVM': stored as sent, but QEMU cannot load it (was it a QEMU migrate?)"
        )
    elif head != QEMU_VM_FILE_HEAD:
        version = int.from_bytes(head[4:], "big")
        log.warning(
            f"vmstate: QEMU migration stream version {version}, not 3: stored as sent, "
            "but QEMU cannot load it"
        )


async def open_nbd_listeners(
    options: SessionOptions, *, read_only: bool = False
) -> tuple[list[trio.SocketListener], list[Address]]:
    """Listen on every socket of ``options.listen_fds`` and every address of
    ``options.listen``; warn about a TCP listener that other hosts reach without TLS
    required (``read_only``: the exports can be read, not written).

    Returns:
        The listeners and the addresses they really have (ports resolved).

    Raises:
        ListenError: a socket cannot be bound or adopted.
    """
    listeners, addresses = [], []
    opened = [adopt_listener(fd) for fd in options.listen_fds]
    for address in options.listen:
        opened.append(await open_listener(address, unix_mode=options.unix_mode))
    for listener, real in opened:
        listeners.append(listener)
        addresses.append(real)
        if _exposed(listener) and options.tls.mode is not TlsMode.REQUIRE:
            can = "read the backed-up disks" if read_only else "read and write the backup"
            log.warning(
                f"{real} is reachable from other hosts without --tls require: "
                f"whoever connects can {can} (see docs/security.md)"
            )
    return listeners, addresses


def _exposed(listener: trio.SocketListener) -> bool:
    """Whether a listener is a TCP socket bound to a non-loopback address."""
    name = listener.socket.getsockname()
    if not isinstance(name, tuple):
        return False  # a unix socket: guarded by its file mode
    return not ipaddress.ip_address(name[0]).is_loopback
