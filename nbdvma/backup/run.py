"""One backup from start to end: disks, configs, session, jobs, the summary or one error line."""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import TextIO

import attrs
import trio

from nbdvma.addresses import UnixAddress
from nbdvma.backup.job import CLEANUP_TIMEOUT, BackupJob
from nbdvma.backup.options import BackupOptions, archive_path, select_disks
from nbdvma.errors import BackupError, NbdvmaError
from nbdvma.pve import (
    CONFIG_NAME,
    GuestDisk,
    VmInfo,
    archive_configs,
    archive_log_name,
    assign_keys,
    format_size,
    generate_config,
    parse_config_disks,
    stored_config_name,
    vzdump_vmid,
)
from nbdvma.qmp import (
    QmpClient,
    QmpConnectionClosed,
    QmpError,
)
from nbdvma.s3.location import is_s3_url, parse_s3_url
from nbdvma.session import ArchiveSession, SessionOptions
from nbdvma.signals import stop_on_signals
from nbdvma.vminfo import describe_vm
from nbdvma.vzdump import BackupLog, archive_size, render_bytes, render_hms

__all__ = ["run_backup"]


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_one_line(e) for e in exc.exceptions)
    if isinstance(exc, QmpConnectionClosed):
        return "lost the QMP connection to QEMU (it exited or closed the socket)"
    if isinstance(exc, QmpError):
        return f"QEMU refused {exc.command}: {exc.desc}" if exc.command else exc.desc
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return str(exc) or type(exc).__name__


def _failure_line(
    failure: str, archive: str, problems: Sequence[str], session: ArchiveSession | None
) -> str:
    """``ERROR: backup failed: <why>; archive left incomplete as X.part; <cleanup problems>``
    (``the upload to s3://... was aborted; nothing is stored`` for object storage)."""
    where = ""
    if session is not None and session.upload is not None:
        where = f"; {session.left_behind()}"
    elif os.path.exists(f"{archive}.part"):
        where = f"; archive left incomplete as {archive}.part"
    extra = "".join(f"; {p}" for p in problems)
    return f"ERROR: backup failed: {failure}{where}{extra}"


class _SessionWarnings(logging.Handler):
    """The session's warnings (``nbdvma.*`` loggers: a failed TLS handshake, a failed
    WRITE...), kept for the ERROR line or ``WARN:`` lines instead of bare stderr lines."""

    LIMIT = 5

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages and len(self.messages) < self.LIMIT:
            self.messages.append(message)


def _configs(
    options: BackupOptions, vm: VmInfo, guest: Sequence[GuestDisk], log: BackupLog
) -> tuple[list[GuestDisk], list[tuple[str, bytes]]]:
    """Choose the disks and the config blobs (the user's with map lines, or one made
    from what QEMU says)."""
    user = {}
    for name, path, data in options.configs:
        if stored_config_name(name, path, keyed=True) == CONFIG_NAME:
            user = parse_config_disks(data)
            break
    disks, excluded = select_disks(
        guest, drives=options.drives, excludes=options.excludes, config_disks=user
    )
    for line in excluded:
        log.info(line)
    names = [d.name for d in disks]
    try:
        left_out = {g.key for g in guest} - {d.key for d in disks}
        configs, infos, warnings = archive_configs(list(options.configs), names, left_out)
    except ValueError as exc:
        raise BackupError(str(exc)) from None
    for line in infos:
        log.info(line)
    for line in warnings:
        log.warn(line)
    if options.generate_config and not any(name == CONFIG_NAME for name, _ in configs):
        chosen = {d.key for d in disks}
        configs.append((CONFIG_NAME, generate_config(vm, [g for g in guest if g.key in chosen])))
        log.info(f"{CONFIG_NAME}: made from what QEMU tells (no --config given)")
    for g in guest:
        if g.bus_note and g.key in {d.key for d in disks}:
            log.warn(f"disk {g.key}: {g.bus_note}")
    return disks, configs


async def run_backup(options: BackupOptions, out: TextIO) -> int:
    """Run one backup; write progress, the summary or one line of error to ``out``
    (and to vzdump's ``.log`` beside a vzdump-named archive).

    Returns:
        0 on success; 1 on failure; 128 + the signal number when interrupted.
    """
    started = time.monotonic()
    try:
        archive, vmid = archive_path(options, datetime.datetime.now())
    except BackupError as exc:
        print(f"ERROR: {exc}", file=out, flush=True)
        return 1
    basename = os.path.basename(archive)
    log_path = archive_log_name(archive) if vzdump_vmid(basename) is not None else None
    # An archive in object storage gets its log uploaded beside it at the end: written
    # to a private directory meanwhile.
    log_dir = tempfile.mkdtemp(prefix="nbdvma-log-") if is_s3_url(archive) else None
    local_log = log_path
    if log_dir is not None and log_path is not None:
        local_log = os.path.join(log_dir, os.path.basename(log_path))
    try:
        log = BackupLog(out, local_log)
    except OSError as exc:
        print(f"ERROR: log file {log_path}: {exc.strerror}", file=out, flush=True)
        return 1
    vm_label = f"VM {vmid}" if vmid is not None else "VM"
    log.info(f"Starting Backup of {vm_label} (qemu)")
    if log_path is None:
        log.warn(
            f"{basename} is not a vzdump name (vzdump-qemu-VMID-YYYY_MM_DD-HH_MM_SS.vma): "
            "Proxmox restores it from a file only under such a name"
        )
    run = _Run(attrs.evolve(options, archive=archive), log, vm_label, started)
    try:
        await run.execute()
        status = run.report()
    finally:
        log.close()
    try:
        if status == 0 and log_dir is not None and log_path is not None and local_log:
            try:
                await trio.to_thread.run_sync(_put_file, options, log_path, local_log)
            except NbdvmaError as exc:
                print(f"ERROR: backup written, but not its log: {exc}", file=out, flush=True)
                status = 1
    finally:
        if log_dir is not None:
            shutil.rmtree(log_dir, ignore_errors=True)
    return status


def _put_file(options: BackupOptions, url: str, path: str) -> None:
    """Upload the file ``path`` as the object ``url`` (:func:`_put_beside`)."""
    with open(path, "rb") as f:
        _put_beside(options, url, f.read())


def _put_beside(options: BackupOptions, url: str, data: bytes) -> None:
    """Store ``data`` as the object ``url`` (the ``.log`` or ``.notes`` beside an
    archive in object storage).

    Raises:
        S3Error: the endpoint refused or failed.
    """
    from nbdvma.s3.client import call, make_client

    location = parse_s3_url(url)
    assert location is not None
    client = make_client(options.s3_endpoint)
    call(client, "put_object", location, Bucket=location.bucket, Key=location.key, Body=data)


@attrs.define(eq=False)
class _Run:
    """One run's state: what :meth:`report` says and what the clean-up undoes."""

    options: BackupOptions
    log: BackupLog
    vm_label: str
    started: float
    tmpdir: str = attrs.field(factory=lambda: tempfile.mkdtemp(prefix="nbdvma-backup-"))
    session: ArchiveSession | None = None
    job: BackupJob | None = None
    disks: list[GuestDisk] = attrs.Factory(list)
    failure: str | None = None
    problems: list[str] = attrs.Factory(list)
    warnings: _SessionWarnings = attrs.Factory(lambda: _SessionWarnings())
    signum: int | None = None

    async def execute(self) -> None:
        """Connect to QEMU and back up; on any failure (or a signal) clean up in QEMU.

        Sets :attr:`failure` instead of raising.
        """
        logging.getLogger("nbdvma").addHandler(self.warnings)
        work = trio.CancelScope()
        try:
            async with stop_on_signals(work) as stop, QmpClient.connect(self.options.qmp) as qmp:
                try:
                    # The session's tasks (NBD server, vmstate socket) run in a nursery
                    # inside ``work``: if one of them fails, the failure surfaces here
                    # while QMP is still connected, so the clean-up below still runs.
                    with work:
                        async with trio.open_nursery() as session_tasks:
                            await self.prepare(qmp, session_tasks)
                            assert self.job is not None
                            await self.job.run()
                            session_tasks.cancel_scope.cancel()
                except Exception as exc:  # reported as one line
                    self.failure = _one_line(exc)
                if work.cancelled_caught and self.failure is None:
                    self.signum = stop.signum
                    self.failure = f"interrupted by {stop.name}"
                if self.failure is not None and self.job is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                        self.problems = await self.job.cleanup()
        except Exception as exc:  # connecting to QMP; the session tasks
            self.failure = self.failure or _one_line(exc)
        finally:
            logging.getLogger("nbdvma").removeHandler(self.warnings)
            if self.session is not None:
                if self.failure is not None:
                    self.session.abort()
                self.session.remove_sockets()
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    async def prepare(self, qmp: QmpClient, nursery: trio.Nursery) -> None:
        """Find the disks and configs, log them as vzdump does, start the session."""
        log = self.log
        status = (await qmp.execute("query-status"))["status"]
        log.info(f"status = {status}")
        vm = await describe_vm(qmp)
        if vm.name:
            log.info(f"VM Name: {vm.name}")
        try:
            guest, skipped = assign_keys(vm.blocks)
        except ValueError as exc:
            raise BackupError(str(exc)) from None
        for line in skipped:
            log.info(f"skipping {line}")
        self.disks, configs = _configs(self.options, vm, guest, log)
        for disk in self.disks:
            log.info(f"include disk '{disk.key}' '{disk.volume}' {format_size(disk.size)}")
        log.info("backup mode: snapshot")
        log.info(f"creating vzdump archive '{self.options.archive}'")
        session_options = self.session_options(configs)
        if self.options.vmstate and vm.memory:
            # The VM state is about the size of the RAM: an upload's part size needs it.
            session_options = attrs.evolve(session_options, expected_vmstate=vm.memory)
        self.session = ArchiveSession(session_options)
        if self.session.replaced:
            log.info(f"replaced {self.session.replaced}, left by an earlier run no longer running")
        await self.session.start(nursery)
        self.job = BackupJob(qmp, self.session, self.options, self.disks, log)

    def session_options(self, configs: Sequence[tuple[str, bytes]]) -> SessionOptions:
        """The in-process session: private unix sockets unless ``--listen`` says else."""
        options = self.options
        vmstate = os.path.join(self.tmpdir, "vmstate.sock") if options.vmstate else None
        return SessionOptions(
            archive=options.archive,
            disks=tuple((d.name, d.size) for d in self.disks),
            configs=tuple(configs),
            vmstate=UnixAddress(vmstate) if vmstate is not None else None,
            listen=(options.listen or UnixAddress(os.path.join(self.tmpdir, "nbd.sock")),),
            compress=options.compress,
            unix_mode=0o600,
            tls=options.tls_config(),
            force=options.force,
            s3_endpoint=options.s3_endpoint,
        )

    def report(self) -> int:
        """The summary, or the one ERROR line; the exit status."""
        log, archive = self.log, self.options.archive
        if self.failure is not None:
            failure = self.failure
            if self.warnings.messages:  # e.g. why the TLS handshake QEMU reports failed
                failure += f" (nbdvma: {'; '.join(self.warnings.messages)})"
            line = _failure_line(failure, archive, self.problems, self.session)
            log.error(line.removeprefix("ERROR: "))
            return 128 + self.signum if self.signum is not None else 1
        assert self.session is not None
        for message in self.warnings.messages:
            log.warn(message)
        _summary(self.session, self.disks, archive, self.vm_label, self.started, log)
        if self.options.notes is not None:
            try:
                if is_s3_url(archive):
                    _put_beside(self.options, f"{archive}.notes", self.options.notes.encode())
                else:
                    _write_notes(f"{archive}.notes", self.options.notes)
            except OSError as exc:
                log.error(f"backup written, but not its notes: {archive}.notes: {exc.strerror}")
                return 1
            except NbdvmaError as exc:
                log.error(f"backup written, but not its notes: {exc}")
                return 1
        return 0


def _write_notes(path: str, text: str) -> None:
    """Proxmox's notes file: the text as given, UTF-8 (as pve-storage writes it)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _summary(
    session: ArchiveSession,
    disks: Sequence[GuestDisk],
    archive: str,
    vm_label: str,
    started: float,
    log: BackupLog,
) -> None:
    """vzdump's closing lines, after nbdvma's per-disk figures."""
    for line in session.disk_summary_lines():
        log.info(line)
    total = sum(d.size for d in disks)
    zero = sum(session.vma.progress(d.name).zero_bytes for d in disks)
    elapsed = time.monotonic() - started
    if zero:
        log.info(
            f"backup is sparse: {render_bytes(zero)} ({int(zero * 100 / total)}%) total zero data"
        )
    seconds = int(elapsed)
    if seconds:
        rate = render_bytes(total / seconds, 1)
        log.info(f"transferred {render_bytes(total)} in {seconds} seconds ({rate}/s)")
    else:
        log.info(f"transferred {render_bytes(total)} in <1 seconds")
    size = session.archive_size()
    log.info(f"archive file size: {archive_size(size or 0)}")
    log.info(f"Finished Backup of {vm_label} ({render_hms(elapsed)})")
    log.info("Backup job finished successfully")
