"""The QMP side of one backup: VM state, target nodes, one transaction of jobs, cleanup.

:class:`BackupJob` holds what a run did in QEMU, so that the cleanup undoes exactly
that (the steps are in :mod:`nbdvma.backup`'s docstring).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from nbdvma.addresses import UnixAddress
from nbdvma.errors import BackupError, NbdvmaError
from nbdvma.qmp import (
    QmpClient,
    QmpConnectionClosed,
    QmpError,
    QmpEvent,
    QmpEvents,
    QmpTimeout,
)
from nbdvma.session import ArchiveSession
from nbdvma.tls import qemu_nbd_tls_fields, qemu_tls_object
from nbdvma.units import format_bytes
from nbdvma.vzdump import BackupLog, render_bytes, render_duration

if TYPE_CHECKING:
    from nbdvma.backup.options import BackupOptions
    from nbdvma.pve import GuestDisk

__all__ = ["BackupJob"]

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


# -- the run -------------------------------------------------------------------------------


def _rate(n: float, seconds: float) -> str:
    """vzdump's ``read: …/s``: ``0 B/s`` when nothing moved."""
    return f"{render_bytes(n / seconds, 1)}/s" if n > 0 else "0 B/s"


class _Progress:
    """vzdump's progress lines: ``INFO: 42% (860.0 MiB of 2.0 GiB) in 3s, read: ...``."""

    def __init__(self, session: ArchiveSession, disks: Sequence[GuestDisk], log: BackupLog) -> None:
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
        return sum(self.session.vma.progress(name).stored_bytes for name in self.names)

    def report(self, read: int, *, force: bool = False) -> None:
        """Print a line when the percentage moved (or ``force``)."""
        now = time.monotonic()
        percent = int(100 * read / self.total) if self.total else 100
        if percent == self.last_percent and not force:
            return
        written = self.stored()
        elapsed = render_duration(now - self.start)
        line = (
            f"{percent:3d}% ({render_bytes(read, 1)} of {render_bytes(self.total, 1)}) in {elapsed}"
        )
        # Rates only once the line says a second has passed: "read: 93.8 GiB/s" after
        # "in 0s" says nothing (vzdump prints it all the same).
        if elapsed != "0s":
            dt = max(now - self.last_time, 1.0)  # as vzdump: rates over at least a second
            line += (
                f", read: {_rate(read - self.last_read, dt)}, "
                f"write: {_rate(written - self.last_written, dt)}"
            )
        self.log.info(line)
        self.last_time, self.last_read, self.last_written = now, read, written
        self.last_percent = percent


@attrs.define(eq=False)
class BackupJob:
    """The state of one backup run: what the cleanup has to undo."""

    qmp: QmpClient
    session: ArchiveSession
    options: BackupOptions
    disks: list[GuestDisk]
    log: BackupLog
    token: str = attrs.field(factory=lambda: secrets.token_hex(3))
    #: Target node names we added (and have not removed yet).
    nodes: list[str] = attrs.Factory(list)
    #: job id -> disk, for the jobs we started and that have not ended yet.
    jobs: dict[str, GuestDisk] = attrs.Factory(dict)
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
        # QEMU's backup job asks every target for its cluster size, which an NBD node
        # cannot tell, and prints a warning in its own log: explain it here, once.
        self.info(
            "QEMU logs that the NBD targets give no block size and that it uses 64 KiB: "
            "that is the archive's cluster size, the backup is sound"
        )

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
