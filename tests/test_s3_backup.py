"""``nbdvma backup`` and ``nbdvma create`` into ``s3://``: a real QEMU, a real SeaweedFS.

The archives are downloaded with boto3 and checked with ``verify`` and ``extract``
against the VM's images, byte for byte, the VM state included.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import QemuVm, S3Bucket
from s3server import SeaweedServer
from servehelpers import nbdvma, poll_until
from test_backup import assert_disks_equal, assert_qemu_clean, extract

pytestmark = pytest.mark.interop

MiB = 1 << 20
VZDUMP_KEY = re.compile(r"pve/vzdump-qemu-100-\d{4}_\d\d_\d\d-\d\d_\d\d_\d\d\.vma\.zst")


@pytest.fixture
def vm_disks(raw_image: Callable[..., Path]) -> list[Path]:
    """Two disks, one large enough for several parts of random (incompressible) data."""
    big = raw_image("big.raw", 24 * MiB, {0: os.urandom(14 * MiB), 20 * MiB: os.urandom(MiB)})
    small = raw_image("small.raw", 3 * MiB + 7 * 512, {512: os.urandom(1000)})
    return [big, small]


def _backup(s3: S3Bucket, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdvma", "backup", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=s3.env(**env),
    )


def test_backup_with_vmstate_into_an_s3_prefix(
    s3: S3Bucket, qemu_vm: Callable[..., QemuVm], vm_disks: list[Path], workdir: Path
) -> None:
    vm = qemu_vm(vm_disks)
    result = _backup(
        s3,
        *("--qmp", vm.qmp_address, s3.url("pve/"), "--vmid", "100", "--vmstate"),
        *("--compress", "zstd", "--notes", "before the upgrade"),
    )
    assert result.returncode == 0, result.stderr
    assert_qemu_clean(vm, "prelaunch")
    assert s3.uploads() == []
    keys = s3.keys()
    (key,) = [k for k in keys if k.endswith(".vma.zst")]
    assert VZDUMP_KEY.fullmatch(key), key
    log_key = key.removesuffix(".vma.zst") + ".log"
    assert sorted(keys) == sorted([key, f"{key}.notes", log_key])
    assert f"INFO: creating vzdump archive 's3://{s3.bucket}/{key}'" in result.stderr
    assert "INFO: Backup job finished successfully" in result.stderr
    size = s3.client.head_object(Bucket=s3.bucket, Key=key)["ContentLength"]
    assert re.search(r"^INFO: archive file size: ", result.stderr, re.M)
    notes = s3.client.get_object(Bucket=s3.bucket, Key=f"{key}.notes")["Body"].read()
    assert notes == b"before the upgrade"
    log = s3.client.get_object(Bucket=s3.bucket, Key=log_key)["Body"].read().decode()
    assert "INFO: Backup job finished successfully" in log

    archive = s3.download(key, workdir / os.path.basename(key))
    assert archive.stat().st_size == size
    assert nbdvma("verify", str(archive)).returncode == 0
    target = extract(archive, workdir / "restore")
    assert_disks_equal(target, vm)
    vmstate = (target / "vmstate.bin").read_bytes()
    assert vmstate[:8] == b"QEVM\x00\x00\x00\x03"
    # Part 1, uploaded last, holds the header as patched at the end: the VM state's
    # true length and the data digest (which verify checked), as a file's would.
    listing = nbdvma("list", str(archive)).stdout.splitlines()
    assert f"VMSTATE: dev_id=3 memory: {len(vmstate)}" in listing
    assert "CFG: size: 93 name: nbdvma-digest" in listing


def test_backup_refuses_wrong_credentials_and_leaves_the_vm_as_it_was(
    s3: S3Bucket, qemu_vm: Callable[..., QemuVm], vm_disks: list[Path]
) -> None:
    vm = qemu_vm(vm_disks)
    result = _backup(
        s3,
        *("--qmp", vm.qmp_address, s3.url("pve/x.vma"), "--vmstate"),
        AWS_SECRET_ACCESS_KEY="wrong",
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"ERROR: backup failed: s3://{s3.bucket}/pve/x.vma: ")
    assert "SignatureDoesNotMatch" in errors[0]
    assert "Traceback" not in result.stderr
    assert_qemu_clean(vm, "prelaunch")
    assert s3.keys() == []
    assert s3.uploads() == []


def test_backup_to_a_prefix_needs_a_vmid(s3: S3Bucket) -> None:
    result = _backup(s3, "--qmp", "unix:/nonexistent", s3.url("pve/"))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"ERROR: s3://{s3.bucket}/pve/ is an S3 prefix: --vmid N is needed to name the "
        "archive as vzdump does (vzdump-qemu-N-DATE-TIME.vma)"
    )


def test_create_into_s3(s3: S3Bucket, raw_image: Callable[..., Path], workdir: Path) -> None:
    image = raw_image("d.raw", 20 * MiB, {0: os.urandom(12 * MiB), 15 * MiB: os.urandom(4096)})
    result = nbdvma("create", s3.url("c.vma.zst"), f"drive-scsi0={image}", env=s3.env())
    assert result.returncode == 0, result.stderr
    assert s3.keys() == ["c.vma.zst"]
    assert s3.uploads() == []
    archive = s3.download("c.vma.zst", workdir / "c.vma.zst")
    assert nbdvma("verify", str(archive)).returncode == 0
    nbdvma("extract", str(archive), str(workdir / "out"))
    assert (workdir / "out" / "disk-drive-scsi0.raw").read_bytes() == image.read_bytes()
    again = nbdvma("create", s3.url("c.vma.zst"), f"drive-scsi0={image}", env=s3.env(), check=False)
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"s3://{s3.bucket}/c.vma.zst: archive exists already (give --force to replace it)"
    )
    assert s3.uploads() == []


def test_sigterm_mid_upload_aborts_it_and_leaves_the_vm_as_it_was(
    private_s3: Callable[[], SeaweedServer],
    qemu_vm: Callable[..., QemuVm],
    raw_image: Callable[..., Path],
) -> None:
    """The endpoint is stopped (SIGSTOP) once the backup job runs, so that parts hang in
    flight and the job waits for them; SIGTERM then: the job is cancelled, the upload
    aborted once the endpoint answers again, one line says so, nothing is stored."""
    server = private_s3()
    assert server.endpoint is not None
    s3 = S3Bucket(server.endpoint, "stalled", server.endpoint.client())
    s3.client.create_bucket(Bucket=s3.bucket)
    vm = qemu_vm([raw_image("big.raw", 96 * MiB, {0: os.urandom(96 * MiB)})])
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbdvma", "backup", "--qmp", vm.qmp_address, s3.url("x.vma")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=s3.env(),
    )
    try:
        # The upload exists once the session is open; the job starts right after.
        poll_until(lambda: s3.uploads() != [], 60, "the upload to begin")
        os.kill(server.pid, signal.SIGSTOP)
        time.sleep(2)  # parts in flight hang; the job waits for a free slot
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        os.kill(server.pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        os.kill(server.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("ERROR:")]
    assert errors == [
        f"ERROR: backup failed: interrupted by SIGTERM; the upload to s3://{s3.bucket}/x.vma "
        "was aborted; nothing is stored"
    ], stderr
    assert_qemu_clean(vm, "prelaunch")
    assert s3.keys() == []
    assert s3.uploads() == []
