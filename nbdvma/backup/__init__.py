"""``nbdvma backup``: back up a running QEMU's disks (and VM state) into a VMA archive.

Theory of operation
-------------------
One process drives QEMU over QMP and receives what QEMU sends, in-process, through an
:class:`~nbdvma.session.ArchiveSession` listening on unix sockets in a private (0700)
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

from nbdvma.backup.options import BackupOptions, archive_path, select_disks
from nbdvma.backup.run import run_backup
from nbdvma.errors import BackupError

__all__ = ["BackupError", "BackupOptions", "archive_path", "run_backup", "select_disks"]
