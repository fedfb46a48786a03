"""``nbdvma backup``: back up a running QEMU's disks (and VM state) into a VMA archive.

Theory of operation
-------------------
One process drives QEMU over QMP and receives what QEMU sends, in-process, through an
:class:`~nbdvma.serve.ArchiveSession` listening on unix sockets in a private (0700)
temporary directory (the NBD one can be ``--listen tcp:HOST:PORT``):

1. **Discover** the disks: ``query-block`` lists every BlockBackend; a disk is one with
   a medium, writable, not removable (cdroms and floppies are), or one picked with
   ``--drive``.  Its archive name is Proxmox's ``drive-<qdev id>`` and its size the
   node's exact ``virtual-size`` (QEMU refuses a backup target of any other size).
2. **Serve**: the session registers one export per disk (and the ``vmstate`` stream)
   and listens before QEMU is told anything.
3. **VM state** (``--vmstate``): ``migrate`` to the session's vmstate socket.  When it
   completes the VM is stopped (``postmigrate``) and its images are *inactive* (QEMU
   released them for a destination that does not exist); the disks are then frozen at
   the instant the state was taken.
4. **Targets and jobs**: ``blockdev-add`` a raw-over-NBD node per disk, then one
   ``transaction`` of ``blockdev-backup sync=full`` actions: one point in time for all
   disks (copy-before-write keeps it while the guest runs on).  With ``--tls-creds``
   the session requires TLS and a ``tls-creds-x509`` object (client endpoint) is
   ``object-add``-ed first and named in every node; it goes after the nodes.
5. **Run state**: right after the transaction the VM is put back in the state it had.
   QEMU offers no way to reactivate images but ``cont``, and a VM left in
   ``postmigrate`` keeps its image locks released and refuses the next migration
   ("Can't migrate the vm that was paused due to previous migration"), so:
   ``running`` → ``cont``; ``paused`` → ``cont`` + ``stop`` (the vCPUs run for one QMP
   round trip); ``prelaunch`` (``-S``) → ``cont`` + ``stop`` + ``system_reset``, which
   returns a never-started machine to ``prelaunch``.
6. **Wait** for ``BLOCK_JOB_COMPLETED`` of every job (``BLOCK_JOB_ERROR``,
   ``BLOCK_JOB_CANCELLED`` or an ``error`` member fail the backup), printing vzdump-like
   progress from ``query-block-jobs`` and the writer's counters.
7. **Finish**: ``blockdev-del`` each target (QEMU flushes and disconnects only then),
   ``object-del`` the TLS credentials, wait for the session to see every disk complete
   and the VM-state stream at EOF, then finish the archive (fsync, rename from
   ``ARCHIVE.part``).

Any failure (a job error, QEMU gone, a full disk, SIGINT/SIGTERM, a deadline) runs the
same cleanup with its own deadline: cancel the migration, force-cancel our jobs,
``blockdev-del`` our nodes, ``object-del`` our TLS credentials, restore the run state
and the migration parameters, and leave the archive as ``ARCHIVE.part``; the exit
status is non-zero and the reason is one line on stderr.

Every wait has a deadline: QMP commands their own, the job and migration waits a
*stall* deadline (``--stall-timeout`` without any progress), the end of the session a
fixed one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import attrs
import trio

from nbdvma.addresses import Address, UnixAddress, parse_address
from nbdvma.errors import BackupError, NbdvmaError
from nbdvma.pve import (
    CONFIG_NAME,
    VMID_MAX,
    VMID_MIN,
    ConfigDisk,
    GuestDisk,
    VmInfo,
    archive_configs,
    archive_log_name,
    assign_keys,
    format_size,
    generate_config,
    parse_config_disks,
    vzdump_name,
    vzdump_vmid,
)
from nbdvma.qmp import (
    QmpClient,
    QmpConnectionClosed,
    QmpError,
    QmpEvent,
    QmpEvents,
    QmpTimeout,
)
from nbdvma.serve import (
    ArchiveSession,
    SessionOptions,
    config_argument,
    format_bytes,
    parse_size,
    read_configs,
)
from nbdvma.tls import TlsConfig, TlsMode, qemu_nbd_tls_fields, qemu_tls_object
from nbdvma.vminfo import describe_vm
from nbdvma.vzdump import BackupLog, archive_size, render_bytes, render_duration, render_hms

__all__ = [
    "BackupError",
    "BackupOptions",
    "Disk",
    "add_arguments",
    "main",
    "run",
    "run_backup",
    "select_disks",
]

#: Run states ``--vmstate`` knows how to return a VM to.
RESTORABLE_STATES = ("running", "paused", "prelaunch")
#: Migration bandwidth while saving the VM state to the local socket (bytes/s).
VMSTATE_BANDWIDTH = 1 << 40
#: Deadline for QMP commands of the cleanup, and for the cleanup as a whole.
CLEANUP_COMMAND_TIMEOUT = 15.0
CLEANUP_TIMEOUT = 60.0
#: Deadline for ``blockdev-del`` (QEMU flushes the target before answering).
DEL_TIMEOUT = 300.0
#: Deadline for the session to see every disk complete once the targets are gone.
SESSION_END_TIMEOUT = 60.0
#: Deadline for finishing the archive (the last extents and fsync).
FINISH_TIMEOUT = 600.0
#: What QEMU checks the server certificate against on the private unix socket when
#: ``--tls-hostname`` is not given (QEMU has no host name of its own there).
DEFAULT_UNIX_TLS_HOSTNAME = "localhost"
#: Seconds to wait for QEMU's reason after a job error (its BLOCK_JOB_COMPLETED).
JOB_ERROR_REASON_TIMEOUT = 5.0


@attrs.frozen
class Disk:
    """One guest disk to back up.

    Attributes:
        name: the archive device name, ``drive-KEY`` as vzdump names it.
        node: the block node the backup job reads (``query-block``'s ``node-name``).
        size: its exact size in bytes.
        key: its Proxmox config key (``scsi0``).
        volume: what it is called in the log: the volume of its config line, else
            QEMU's image name.
    """

    name: str
    node: str
    size: int
    key: str
    volume: str = ""


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


@attrs.frozen
class BackupOptions:
    """What ``nbdvma backup``'s command line says."""

    qmp: Address
    #: The archive file, or an existing directory for a vzdump-named one (``vmid``).
    archive: str
    #: ``--config [NAME=]FILE``: ``(NAME or None, FILE, its bytes)``.
    configs: tuple[tuple[str | None, str, bytes], ...] = ()
    #: Store a ``qemu-server.conf`` made from what QEMU says when none is given.
    generate_config: bool = True
    vmstate: bool = False
    drives: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    #: The Proxmox VM id, for vzdump's names and lines (needed with a directory).
    vmid: int | None = None
    #: ``--notes``: written to ``ARCHIVE.notes``.
    notes: str | None = None
    compress: str | None = None
    #: Backup job ``speed`` in bytes/s (``None``: unlimited).
    bandwidth_limit: int | None = None
    #: Seconds between progress polls.
    progress_interval: float = 1.0
    #: Fail when a job or the migration makes no progress for this many seconds.
    stall_timeout: float = 300.0
    #: Where QEMU's NBD clients connect (``None``: a unix socket in a private directory).
    listen: Address | None = None
    #: A credentials directory in QEMU's ``tls-creds-x509`` layout (``None``: no TLS);
    #: made absolute, since QEMU resolves it from its own working directory.
    tls_creds: str | None = attrs.field(default=None, converter=_absolute)
    #: The name QEMU checks the server certificate against (``--tls-hostname``).
    tls_hostname: str | None = None
    #: Require QEMU's client certificate (``client-cert.pem``) signed by ``ca-cert.pem``.
    tls_verify_client: bool = False

    def __attrs_post_init__(self) -> None:
        if self.tls_creds is None and (self.tls_hostname is not None or self.tls_verify_client):
            raise BackupError("--tls-hostname and --tls-verify-client need --tls-creds")

    def tls_config(self) -> TlsConfig:
        """The session's TLS: required, with ``server-cert.pem``/``server-key.pem``
        (and ``ca-cert.pem`` for client certificates) of :attr:`tls_creds`."""
        if self.tls_creds is None:
            return TlsConfig()
        return TlsConfig(
            mode=TlsMode.REQUIRE,
            cert=os.path.join(self.tls_creds, "server-cert.pem"),
            key=os.path.join(self.tls_creds, "server-key.pem"),
            ca=os.path.join(self.tls_creds, "ca-cert.pem") if self.tls_verify_client else None,
            verify_client=self.tls_verify_client,
        )


# -- discovery ---------------------------------------------------------------------------


def select_disks(
    guest: Sequence[GuestDisk],
    *,
    drives: Sequence[str] = (),
    excludes: Sequence[str] = (),
    config_disks: Mapping[str, ConfigDisk] | None = None,
) -> tuple[list[Disk], list[str]]:
    """Choose the disks to back up among the VM's (:func:`nbdvma.pve.assign_keys`).

    Every disk is backed up, read-only ones included, but those left out on purpose:
    not named by ``--drive`` when it is given, named by ``--exclude``, or ``backup=0``
    in the user's config (as vzdump).  A disk is named by its key (``scsi0``), archive
    name (``drive-scsi0``), qdev id, BlockBackend or node name.

    Returns:
        The disks in key order, and vzdump's ``exclude disk ...`` line for each one
        left out.

    Raises:
        BackupError: a ``--drive`` or ``--exclude`` names no disk, or no disk is left.
    """
    config_disks = config_disks or {}
    picked: set[str] = set()
    disks: list[Disk] = []
    lines: list[str] = []
    for g in guest:
        aliases = {g.key, g.name, g.block.qdev_id, g.block.backend, g.block.node} - {None, ""}
        entry = config_disks.get(g.key)
        volume = entry.volume if entry is not None else g.block.filename
        reason = None
        if drives and not aliases & set(drives):
            reason = "not named by --drive"
        if aliases & set(excludes):
            reason = "--exclude"
        if entry is not None and entry.excluded:
            reason = "backup=no"
        picked |= {str(a) for a in aliases}
        if reason is not None:
            lines.append(f"exclude disk '{g.key}' '{volume}' ({reason})")
            continue
        if g.block.node is None or g.block.size <= 0:
            raise BackupError(f"disk {g.key}: QEMU reports no node or size for it")
        disks.append(Disk(g.name, g.block.node, g.block.size, g.key, volume))
    for option, names in (("--drive", drives), ("--exclude", excludes)):
        unknown = sorted(set(names) - picked)
        if unknown:
            raise BackupError(f"{option} {', '.join(unknown)}: the VM has no such disk")
    if not disks:
        raise BackupError("no disk left to back up")
    return disks, lines


# -- the run -------------------------------------------------------------------------------


def _rate(n: float, seconds: float) -> str:
    """vzdump's ``read: …/s``: ``0 B/s`` when nothing moved."""
    return f"{render_bytes(n / seconds, 1)}/s" if n > 0 else "0 B/s"


class _Progress:
    """vzdump's progress lines: ``INFO: 42% (860.0 MiB of 2.0 GiB) in 3s, read: ...``."""

    def __init__(self, session: ArchiveSession, disks: Sequence[Disk], log: BackupLog) -> None:
        self.session = session
        self.log = log
        self.total = sum(d.size for d in disks)
        self.names = [d.name for d in disks]
        self.start = time.monotonic()
        self.last_time = self.start
        self.last_read = 0
        self.last_written = 0
        self.last_percent = -1

    def stored(self) -> int:
        vma = self.session.vma
        if vma is None:
            return 0
        return sum(vma.progress(name).stored_bytes for name in self.names)

    def report(self, read: int, *, force: bool = False) -> None:
        """Print a line when the percentage moved (or ``force``)."""
        now = time.monotonic()
        percent = int(100 * read / self.total) if self.total else 100
        if percent == self.last_percent and not force:
            return
        written = self.stored()
        dt = max(now - self.last_time, 1.0)  # as vzdump: rates over at least a second
        self.log.info(
            f"{percent:3d}% ({render_bytes(read, 1)} of {render_bytes(self.total, 1)}) "
            f"in {render_duration(now - self.start)}, read: {_rate(read - self.last_read, dt)}, "
            f"write: {_rate(written - self.last_written, dt)}"
        )
        self.last_time, self.last_read, self.last_written = now, read, written
        self.last_percent = percent


@attrs.define(eq=False)
class _Backup:
    """The state of one backup run: what the cleanup has to undo."""

    qmp: QmpClient
    session: ArchiveSession
    options: BackupOptions
    disks: list[Disk]
    log: BackupLog
    token: str = attrs.field(factory=lambda: secrets.token_hex(3))
    #: Target node names we added (and have not removed yet).
    nodes: list[str] = attrs.Factory(list)
    #: job id -> disk, for the jobs we started and that have not ended yet.
    jobs: dict[str, Disk] = attrs.Factory(dict)
    #: The run state before, when we touched it (``--vmstate``).
    run_state: str | None = None
    run_state_restored: bool = True
    #: The migration parameters to put back, when we changed them.
    saved_migrate_params: dict[str, Any] | None = None
    migrating: bool = False
    #: The id of the ``tls-creds-x509`` object we added (and have not removed yet).
    tls_object: str | None = None

    def node_name(self, i: int) -> str:
        return f"nbdvma-{self.token}-t{i}"

    def job_id(self, i: int) -> str:
        return f"nbdvma-{self.token}-j{i}"

    def info(self, text: str) -> None:
        self.log.info(text)

    # -- the successful path ------------------------------------------------------------

    async def run(self) -> None:
        """Steps 3-7 of the module docstring."""
        if self.options.vmstate:
            await self.save_vmstate()
        await self.add_targets()
        events = self.qmp.events()
        await self.start_jobs()
        if self.run_state is not None:
            await self.restore_run_state()
            await self.restore_migrate_params()
        await self.wait_jobs(events)
        await self.remove_targets(timeout=DEL_TIMEOUT)
        await self.remove_tls_object()
        try:
            with trio.fail_after(SESSION_END_TIMEOUT):
                await self.session.done.wait()
        except trio.TooSlowError:
            raise BackupError(
                f"QEMU finished but the archive is incomplete after {SESSION_END_TIMEOUT:.0f}s: "
                f"{', '.join(self.session.incomplete())}"
            ) from None
        try:
            with trio.fail_after(FINISH_TIMEOUT):
                await self.session.finish()
        except trio.TooSlowError:
            raise BackupError(f"finishing the archive took over {FINISH_TIMEOUT:.0f}s") from None

    async def save_vmstate(self) -> None:
        """Stream the VM state to the session; return with the VM stopped."""
        address = self.session.vmstate_address
        assert isinstance(address, UnixAddress)
        status = await self.qmp.execute("query-status")
        state = str(status.get("status"))
        if state not in RESTORABLE_STATES:
            raise BackupError(
                f"the VM is in state {state}; --vmstate needs it running, paused or prelaunch"
            )
        current = await self.qmp.execute("query-migrate")
        if current.get("status") in ("setup", "active", "pre-switchover", "device", "cancelling"):
            raise BackupError(f"a migration is already running ({current.get('status')})")
        params = await self.qmp.execute("query-migrate-parameters")
        if "max-bandwidth" in params:
            self.saved_migrate_params = {"max-bandwidth": params["max-bandwidth"]}
        await self.qmp.execute("migrate-set-parameters", {"max-bandwidth": VMSTATE_BANDWIDTH})
        self.run_state = state
        self.run_state_restored = False
        self.info(f"saving the VM state (the VM is {state})")
        self.migrating = True
        await self.qmp.execute("migrate", {"uri": f"unix:{address.path}"})
        started = time.monotonic()
        last_change = started
        last_bytes = -1
        delay = 0.005
        while True:
            info = await self.qmp.execute("query-migrate")
            status_text = info.get("status")
            if status_text == "completed":
                break
            if status_text in ("failed", "cancelled", None):
                reason = info.get("error-desc", status_text)
                raise BackupError(f"saving the VM state failed: {reason}")
            transferred = int(info.get("ram", {}).get("transferred", 0))
            now = time.monotonic()
            if transferred != last_bytes:
                last_bytes, last_change = transferred, now
            elif now - last_change > self.options.stall_timeout:
                raise BackupError(
                    f"saving the VM state made no progress for {self.options.stall_timeout:.0f}s"
                )
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)
        self.migrating = False
        # The MIGRATION completed status is set before the run state leaves
        # finish-migrate: wait for postmigrate before touching it.
        await self.wait_run_state(lambda s: s != "finish-migrate", "postmigrate")
        size = 0
        if self.session.writer is not None:
            size = self.session.vmstate_bytes()
        self.info(f"VM state saved: {format_bytes(size)} in {time.monotonic() - started:.1f}s")

    async def wait_run_state(self, ok: Any, what: str, timeout: float = 10.0) -> str:  # noqa: ASYNC109
        """Poll ``query-status`` until ``ok(status)``; return the status."""
        with trio.move_on_after(timeout):
            while True:
                state = str((await self.qmp.execute("query-status"))["status"])
                if ok(state):
                    return state
                await trio.sleep(0.01)
        raise BackupError(f"the VM did not reach {what} within {timeout:.0f}s")

    async def add_targets(self) -> None:
        """``blockdev-add`` one raw-over-NBD node per disk (after the TLS credentials)."""
        address = self.session.listening[0]
        tls: dict[str, str] = {}
        creds = self.options.tls_creds
        if creds is not None:
            creds_id = f"nbdvma-{self.token}-tls"
            await self.qmp.execute("object-add", qemu_tls_object(creds_id, creds))
            self.tls_object = creds_id
            hostname = self.options.tls_hostname
            if hostname is None and isinstance(address, UnixAddress):
                hostname = DEFAULT_UNIX_TLS_HOSTNAME
            tls = qemu_nbd_tls_fields(creds_id, hostname)
        for i, disk in enumerate(self.disks):
            name = self.node_name(i)
            await self.qmp.execute(
                "blockdev-add",
                {
                    "driver": "raw",
                    "node-name": name,
                    "file": {
                        "driver": "nbd",
                        "server": address.qemu_socket_address(),
                        "export": disk.name,
                        **tls,
                    },
                },
            )
            self.nodes.append(name)

    async def start_jobs(self) -> None:
        """One ``transaction`` of ``blockdev-backup`` actions: one point in time."""
        actions = []
        for i, disk in enumerate(self.disks):
            data: dict[str, Any] = {
                "job-id": self.job_id(i),
                "device": disk.node,
                "target": self.node_name(i),
                "sync": "full",
            }
            if self.options.bandwidth_limit:
                data["speed"] = self.options.bandwidth_limit
            actions.append({"type": "blockdev-backup", "data": data})
        await self.qmp.execute("transaction", {"actions": actions})
        for i, disk in enumerate(self.disks):
            self.jobs[self.job_id(i)] = disk
        self.info(f"started backup jobs for {', '.join(d.name for d in self.disks)}")

    async def wait_jobs(self, events: QmpEvents) -> None:
        """Wait for every job to complete, printing progress; raise on any failure."""
        progress = _Progress(self.session, self.disks, self.log)
        done: dict[str, int] = {}
        offsets: dict[str, int] = {job: 0 for job in self.jobs}
        last_change = time.monotonic()
        names = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR")
        while self.jobs:
            try:
                event = await events.wait(
                    names,
                    match=lambda e: e.data.get("device") in self.jobs,
                    timeout=self.options.progress_interval,
                )
            except QmpTimeout:
                pass
            else:
                job = str(event.data["device"])
                disk = self.jobs[job]
                if event.name == "BLOCK_JOB_ERROR":
                    why = await _job_error_reason(events, job, event)
                    raise BackupError(
                        f"{disk.name}: {event.data.get('operation', 'I/O')} error in the "
                        f"backup job{why}"
                    )
                if event.name == "BLOCK_JOB_CANCELLED":
                    del self.jobs[job]
                    raise BackupError(f"{disk.name}: the backup job was cancelled")
                del self.jobs[job]
                if "error" in event.data:
                    raise BackupError(f"{disk.name}: backup job failed: {event.data['error']}")
                offset, length = int(event.data["offset"]), int(event.data["len"])
                if offset != length:
                    raise BackupError(f"{disk.name}: backup job ended at {offset} of {length}")
                # The job's len is rounded up to its 64 KiB cluster.
                done[job] = min(length, disk.size)
                offsets.pop(job, None)
                continue
            # No event within the interval: poll the jobs for progress.
            running = {
                str(j["device"]): int(j.get("offset", 0))
                for j in await self.qmp.execute("query-block-jobs")
            }
            now = time.monotonic()
            for job in list(offsets):
                new = min(running.get(job, offsets[job]), self.jobs[job].size)
                if new != offsets[job]:
                    offsets[job] = new
                    last_change = now
            if now - last_change > self.options.stall_timeout:
                raise BackupError(
                    f"the backup jobs made no progress for {self.options.stall_timeout:.0f}s"
                )
            progress.report(sum(done.values()) + sum(offsets.values()))
        progress.report(sum(done.values()), force=True)

    async def remove_targets(self, *, timeout: float) -> None:  # noqa: ASYNC109
        """``blockdev-del`` our nodes: QEMU flushes and disconnects from the session."""
        while self.nodes:
            name = self.nodes[-1]
            try:
                await self.qmp.execute("blockdev-del", {"node-name": name}, timeout=timeout)
            except QmpError as exc:
                if exc.error_class != "DeviceNotFound" and "not found" not in exc.desc.lower():
                    raise
            self.nodes.pop()

    async def remove_tls_object(self, *, timeout: float = CLEANUP_COMMAND_TIMEOUT) -> None:  # noqa: ASYNC109
        """``object-del`` our TLS credentials (once the nodes using them are gone)."""
        if self.tls_object is None:
            return
        if self.nodes:
            raise BackupError(f"target nodes still use it: {', '.join(self.nodes)}")
        try:
            await self.qmp.execute("object-del", {"id": self.tls_object}, timeout=timeout)
        except QmpError as exc:
            if "not found" not in exc.desc.lower():
                raise
        self.tls_object = None

    async def restore_run_state(self) -> None:
        """Put the VM back in :attr:`run_state` (see the module docstring, step 5)."""
        before = self.run_state
        if before is None or self.run_state_restored:
            return
        now = await self.wait_run_state(lambda s: s != "finish-migrate", "a settled state")
        if before == "running":
            if now != "running":
                await self.qmp.execute("cont")
        elif now != before:
            if now != "running":
                # The only way QEMU reactivates images after a migration.
                await self.qmp.execute("cont")
            await self.qmp.execute("stop")
            if before == "prelaunch":
                await self.qmp.execute("system_reset")
                await self.wait_run_state(lambda s: s == "prelaunch", "prelaunch")
        self.run_state_restored = True

    async def restore_migrate_params(self) -> None:
        """Put back the migration parameters we changed."""
        if self.saved_migrate_params is not None:
            await self.qmp.execute("migrate-set-parameters", self.saved_migrate_params)
            self.saved_migrate_params = None

    # -- the cleanup ----------------------------------------------------------------------

    async def cleanup(self) -> list[str]:
        """Undo what we did in QEMU; return what could not be undone (one line each)."""
        problems: list[str] = []
        if self.qmp.closed:
            return problems
        steps = [
            ("cancel the migration", self._cancel_migration),
            ("cancel the backup jobs", self._cancel_jobs),
            ("remove the target nodes", self._remove_targets_quickly),
            ("remove the TLS credentials", self.remove_tls_object),
            ("restore the run state", self.restore_run_state),
            ("restore the migration parameters", self.restore_migrate_params),
        ]
        for what, step in steps:
            try:
                await step()
            except (QmpConnectionClosed, NbdvmaError, trio.TooSlowError) as exc:
                problems.append(f"could not {what}: {exc}")
                if self.qmp.closed:
                    break
        return problems

    async def _remove_targets_quickly(self) -> None:
        await self.remove_targets(timeout=CLEANUP_COMMAND_TIMEOUT)

    async def _cancel_migration(self) -> None:
        if not self.migrating:
            return
        await self.qmp.execute("migrate_cancel", timeout=CLEANUP_COMMAND_TIMEOUT)
        with trio.fail_after(CLEANUP_COMMAND_TIMEOUT):
            while True:
                info = await self.qmp.execute("query-migrate")
                if info.get("status") in ("completed", "failed", "cancelled", None):
                    break
                await trio.sleep(0.02)
        self.migrating = False

    async def _cancel_jobs(self) -> None:
        if not self.jobs:
            return
        events = self.qmp.events()
        present = {str(j["device"]) for j in await self.qmp.execute("query-block-jobs")}
        for job in list(self.jobs):
            if job not in present:
                del self.jobs[job]
                continue
            with contextlib.suppress(QmpError):
                await self.qmp.execute(
                    "block-job-cancel",
                    {"device": job, "force": True},
                    timeout=CLEANUP_COMMAND_TIMEOUT,
                )
        with trio.fail_after(CLEANUP_COMMAND_TIMEOUT):
            while self.jobs:
                try:
                    event = await events.wait(
                        ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"),
                        match=lambda e: e.data.get("device") in self.jobs,
                        timeout=0.5,
                    )
                    self.jobs.pop(str(event.data["device"]), None)
                except QmpTimeout:
                    present = {str(j["device"]) for j in await self.qmp.execute("query-block-jobs")}
                    for job in list(self.jobs):
                        if job not in present:
                            del self.jobs[job]


async def _job_error_reason(events: QmpEvents, job: str, error: QmpEvent) -> str:
    """``": No space left on device"``: the text of the job's failure, or ``""``.

    BLOCK_JOB_ERROR does not say why; with the default ``on-target-error: report`` the
    job ends at once, and its BLOCK_JOB_COMPLETED carries QEMU's error message.
    """
    if error.data.get("action") != "report":
        return ""
    try:
        done = await events.wait(
            "BLOCK_JOB_COMPLETED", match={"device": job}, timeout=JOB_ERROR_REASON_TIMEOUT
        )
    except (QmpTimeout, QmpConnectionClosed):
        return ""
    reason = done.data.get("error")
    return f": {reason}" if reason else ""


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


def _failure_line(failure: str, archive: str, problems: Sequence[str]) -> str:
    """``ERROR: backup failed: <why>; archive left incomplete as X.part; <cleanup problems>``."""
    where = ""
    if os.path.exists(f"{archive}.part"):
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


def archive_path(options: BackupOptions, now: datetime.datetime) -> tuple[str, int | None]:
    """Where the archive goes (an absolute path), and the VMID for vzdump's lines.

    An existing directory gets vzdump's name (``--vmid`` required); a file name is used
    as given, its VMID read from it when it is vzdump's.

    Raises:
        BackupError: a directory without ``--vmid``, or a VMID out of range.
    """
    if os.path.isdir(options.archive):
        if options.vmid is None:
            raise BackupError(
                f"{options.archive} is a directory: --vmid N is needed to name the archive "
                "as vzdump does (vzdump-qemu-N-DATE-TIME.vma)"
            )
        try:
            name = vzdump_name(options.vmid, now, options.compress)
        except ValueError as exc:
            raise BackupError(str(exc)) from None
        return os.path.abspath(os.path.join(options.archive, name)), options.vmid
    vmid = options.vmid
    if vmid is not None and not VMID_MIN <= vmid <= VMID_MAX:
        raise BackupError(f"VMID {vmid} is outside {VMID_MIN}..{VMID_MAX}")
    return os.path.abspath(options.archive), vmid or vzdump_vmid(os.path.basename(options.archive))


def _configs(
    options: BackupOptions, vm: VmInfo, guest: Sequence[GuestDisk], log: BackupLog
) -> tuple[list[Disk], list[tuple[str, bytes]]]:
    """Choose the disks and the config blobs (the user's with map lines, or one made
    from what QEMU says)."""
    user = {}
    for name, path, data in options.configs:
        if name in (None, CONFIG_NAME) and not path.endswith(".fw"):
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


async def run_backup(options: BackupOptions, out: TextIO = sys.stderr) -> int:
    """Run one backup; print progress, the summary or one line of error to ``out``
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
    try:
        log = BackupLog(out, log_path)
    except OSError as exc:
        print(f"ERROR: log file {log_path}: {exc.strerror}", file=out, flush=True)
        return 1
    options = attrs.evolve(options, archive=archive)
    vm_label = f"VM {vmid}" if vmid is not None else "VM"
    log.info(f"Starting Backup of {vm_label} (qemu)")
    if log_path is None:
        log.warn(
            f"{basename} is not a vzdump name (vzdump-qemu-VMID-YYYY_MM_DD-HH_MM_SS.vma): "
            "Proxmox restores it from a file only under such a name"
        )
    tmpdir = tempfile.mkdtemp(prefix="nbdvma-backup-")  # mode 0700
    interrupted: int | None = None
    failure: str | None = None
    session: ArchiveSession | None = None
    problems: list[str] = []
    warnings = _SessionWarnings()
    logging.getLogger("nbdvma").addHandler(warnings)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with QmpClient.connect(options.qmp) as qmp, trio.open_nursery() as nursery:
                work = trio.CancelScope()

                async def on_signal() -> None:
                    nonlocal interrupted
                    async for signum in signals:
                        interrupted = signum
                        work.cancel()
                        return

                nursery.start_soon(on_signal)
                backup: _Backup | None = None
                try:
                    # The session's tasks (NBD server, vmstate socket) run in a nursery
                    # inside ``work``: if one of them fails, the failure surfaces here
                    # while QMP is still connected, so the clean-up below still runs.
                    with work:
                        async with trio.open_nursery() as session_tasks:
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
                            disks, configs = _configs(options, vm, guest, log)
                            for disk in disks:
                                log.info(
                                    f"include disk '{disk.key}' '{disk.volume}' "
                                    f"{format_size(disk.size)}"
                                )
                            log.info("backup mode: snapshot")
                            log.info(f"creating vzdump archive '{archive}'")
                            session = ArchiveSession(
                                SessionOptions(
                                    archive=archive,
                                    disks=tuple((d.name, d.size) for d in disks),
                                    configs=tuple(configs),
                                    vmstate=(
                                        UnixAddress(os.path.join(tmpdir, "vmstate.sock"))
                                        if options.vmstate
                                        else None
                                    ),
                                    listen=(
                                        options.listen
                                        or UnixAddress(os.path.join(tmpdir, "nbd.sock")),
                                    ),
                                    compress=options.compress,
                                    unix_mode=0o600,
                                    tls=options.tls_config(),
                                )
                            )
                            await session.start(session_tasks)
                            backup = _Backup(qmp, session, options, disks, log)
                            await backup.run()
                            session_tasks.cancel_scope.cancel()
                except Exception as exc:  # reported as one line
                    failure = _one_line(exc)
                if work.cancelled_caught and failure is None:
                    failure = f"interrupted by {signal.Signals(interrupted or 2).name}"
                if failure is not None and backup is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                        problems = await backup.cleanup()
                nursery.cancel_scope.cancel()
    except Exception as exc:  # connecting to QMP; the session tasks
        failure = failure or _one_line(exc)
    finally:
        logging.getLogger("nbdvma").removeHandler(warnings)
        if session is not None:
            if failure is not None:
                session.abort()
            session.remove_sockets()
        shutil.rmtree(tmpdir, ignore_errors=True)
    try:
        if failure is not None:
            if warnings.messages:  # e.g. why the TLS handshake QEMU reports failed
                failure += f" (nbdvma: {'; '.join(warnings.messages)})"
            log.error(_failure_line(failure, archive, problems).removeprefix("ERROR: "))
            return 128 + interrupted if interrupted is not None else 1
        assert session is not None
        for message in warnings.messages:
            log.warn(message)
        _summary(session, disks, archive, vm_label, started, log)
        if options.notes is not None:
            try:
                _write_notes(f"{archive}.notes", options.notes)
            except OSError as exc:
                log.error(f"backup written, but not its notes: {archive}.notes: {exc.strerror}")
                return 1
        return 0
    finally:
        log.close()


def _write_notes(path: str, text: str) -> None:
    """Proxmox's notes file: the text as given, UTF-8 (as pve-storage writes it)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _summary(
    session: ArchiveSession,
    disks: Sequence[Disk],
    archive: str,
    vm_label: str,
    started: float,
    log: BackupLog,
) -> None:
    """vzdump's closing lines, after nbdvma's per-disk figures."""
    for line in session.summary_lines()[:-2]:
        log.info(line)
    vma = session.vma
    total = sum(d.size for d in disks)
    zero = sum(vma.progress(d.name).zero_bytes for d in disks) if vma is not None else 0
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
    log.info(f"archive file size: {archive_size(os.path.getsize(archive))}")
    log.info(f"Finished Backup of {vm_label} ({render_hms(elapsed)})")
    log.info("Backup job finished successfully")


# -- command line --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``nbdvma backup``."""
    parser.add_argument(
        "archive",
        metavar="ARCHIVE",
        help="the VMA archive to write, or an existing directory: the archive is then "
        "DIR/vzdump-qemu-VMID-YYYY_MM_DD-HH_MM_SS.vma[.zst] (needs --vmid), with its .log",
    )
    parser.add_argument(
        "--qmp",
        required=True,
        type=parse_address,
        metavar="unix:PATH|tcp:HOST:PORT",
        help="QEMU's QMP socket",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        type=config_argument,
        metavar="[NAME=]FILE",
        help="store FILE in the archive as config NAME (default: qemu-server.conf, or "
        "qemu-server.fw for *.fw), with #qmdump#map lines for the disks; 'none' stores "
        "no config (default: a qemu-server.conf made from what QEMU tells); repeatable",
    )
    parser.add_argument(
        "--vmstate",
        action="store_true",
        help="also save the VM state (RAM and devices), consistent with the disks",
    )
    parser.add_argument(
        "--drive",
        action="append",
        default=[],
        metavar="ID",
        help="back up only this drive (scsi0, drive-scsi0, a node name); repeatable",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="KEY",
        help="leave this disk out (scsi0, drive-scsi0, a node name); repeatable",
    )
    parser.add_argument(
        "--vmid",
        type=int,
        metavar="N",
        help=f"the Proxmox VM id ({VMID_MIN}..{VMID_MAX}) for vzdump's archive name and log",
    )
    parser.add_argument(
        "--notes", metavar="TEXT", help="write TEXT to ARCHIVE.notes (Proxmox's backup notes)"
    )
    parser.add_argument("--compress", choices=["zstd"], help="compress the archive with zstd")
    parser.add_argument(
        "--bandwidth-limit",
        type=parse_size,
        metavar="RATE",
        help="limit each backup job to RATE bytes/s (K/M/G suffixes)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="fail when nothing progresses for this long (default 300)",
    )
    parser.add_argument(
        "--listen",
        type=parse_address,
        metavar="unix:PATH|tcp:HOST:PORT",
        help="where QEMU connects to send the disks (default: a unix socket in a private "
        "directory); a TCP address is reachable by every local user: use --tls-creds",
    )
    tls = parser.add_argument_group("TLS (X.509; see docs/security.md)")
    tls.add_argument(
        "--tls-creds",
        metavar="DIR",
        help="require TLS: a directory in QEMU's tls-creds-x509 layout readable by nbdvma "
        "and QEMU; nbdvma serves server-cert.pem/server-key.pem, QEMU checks them with "
        "ca-cert.pem and presents client-cert.pem/client-key.pem if present",
    )
    tls.add_argument(
        "--tls-hostname",
        metavar="NAME",
        help="the name QEMU checks in the server certificate (default: the --listen TCP "
        f"host, or {DEFAULT_UNIX_TLS_HOSTNAME} on a unix socket)",
    )
    tls.add_argument(
        "--tls-verify-client",
        action="store_true",
        help="require QEMU's client certificate, signed by ca-cert.pem",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``nbdvma backup`` from parsed arguments; return the exit status."""
    generate = True
    config_args = list(args.config)
    if (None, "none") in config_args:
        config_args.remove((None, "none"))
        generate = False
    try:
        configs = read_configs(config_args)
    except NbdvmaError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    if args.archive == "-":
        print("ERROR: backup writes a file; '-' is not supported", file=sys.stderr)
        return 1
    try:
        options = BackupOptions(
            qmp=args.qmp,
            archive=args.archive,
            configs=tuple(configs),
            generate_config=generate,
            vmstate=args.vmstate,
            drives=tuple(args.drive),
            excludes=tuple(args.exclude),
            vmid=args.vmid,
            notes=args.notes,
            compress=args.compress,
            bandwidth_limit=args.bandwidth_limit,
            stall_timeout=args.stall_timeout if args.stall_timeout > 0 else math.inf,
            listen=args.listen,
            tls_creds=args.tls_creds,
            tls_hostname=args.tls_hostname,
            tls_verify_client=args.tls_verify_client,
        )
    except BackupError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    return trio.run(run_backup, options)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nbdvma.backup``: the same as ``nbdvma backup``."""
    parser = argparse.ArgumentParser(prog="nbdvma backup")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
