"""``nbdvma backup`` and ``nbdvma serve`` against a real, paused QEMU (TCG, no guest OS).

Every end-to-end test restores the archive with ``nbdvma extract`` and compares the
disks byte for byte with the VM's images.  Failure tests check what the user relies on
afterwards: the VM is in its previous run state, the nodes we added are gone, no job is
left, and nothing exists under the archive's final name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import QemuVm

from nbdvma.backup import Disk, discover_disks, proxmox_name
from nbdvma.errors import NbdvmaError
from nbdvma.qmp import QmpClient

pytestmark = pytest.mark.interop

PY = sys.executable
BACKUP = [PY, "-m", "nbdvma.backup"]
MiB = 1 << 20
#: Not a multiple of 64 KiB, a multiple of 512: the partial last cluster.
ODD_SIZE = 3 * MiB + 7 * 512


# -- helpers ----------------------------------------------------------------------------------


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 131 + seed * 17 + (i >> 12)) & 0xFF for i in range(n))


@pytest.fixture
def disks(raw_image: Callable[..., Path]) -> list[Path]:
    """Two disks of different sizes with data, holes and stored zeros."""
    a = raw_image(
        "a.raw",
        6 * MiB,
        {
            0: _pattern(65536, 1),
            300_000: os.urandom(200_000),  # unaligned data across clusters
            2 * MiB: bytes(MiB),  # zeros stored in the file (arrive as data)
            4 * MiB + 4096: _pattern(4096, 2),  # one 4 KiB block in a hole
        },
    )
    b = raw_image("b.raw", ODD_SIZE, {512: os.urandom(1000), 3 * MiB: os.urandom(7 * 512)})
    return [a, b]


def qmp(vm: QemuVm, command: str, args: Mapping[str, Any] | None = None) -> Any:
    """One QMP command on its own connection."""

    async def call() -> Any:
        async with QmpClient.connect(vm.qmp_address) as client:
            return await client.execute(command, args)

    return trio.run(call)


def run_state(vm: QemuVm) -> str:
    return str(qmp(vm, "query-status")["status"])


def set_run_state(vm: QemuVm, state: str) -> None:
    if state == "running":
        qmp(vm, "cont")
    elif state == "paused":
        qmp(vm, "cont")
        qmp(vm, "stop")
    assert run_state(vm) == state


def assert_qemu_clean(vm: QemuVm, state: str) -> None:
    """No node or job of ours is left and the VM is in ``state``."""
    nodes = [n["node-name"] for n in qmp(vm, "query-named-block-nodes")]
    assert not [n for n in nodes if n.startswith("nbdvma-")], nodes
    assert qmp(vm, "query-block-jobs") == []
    assert run_state(vm) == state


def backup(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BACKUP, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def nbdvma(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "nbdvma", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def extract(archive: Path, target: Path) -> Path:
    result = nbdvma("extract", archive, target)
    assert result.returncode == 0, result.stderr
    return target


def assert_disks_equal(target: Path, vm: QemuVm, only: list[int] | None = None) -> None:
    for i, disk in enumerate(vm.disks):
        if only is not None and i not in only:
            assert not (target / f"disk-drive-{disk.device_id}.raw").exists()
            continue
        restored = (target / f"disk-drive-{disk.device_id}.raw").read_bytes()
        assert len(restored) == disk.size
        assert restored == disk.path.read_bytes(), f"drive-{disk.device_id} differs"


def reference_vmstate(qemu_vm: Callable[..., QemuVm], disks: list[Path], workdir: Path) -> bytes:
    """What ``migrate exec:cat > FILE`` gives for an identical paused VM."""
    copies = []
    for disk in disks:  # the first VM holds the images' locks
        copy = workdir / f"copy-{disk.name}"
        copy.write_bytes(disk.read_bytes())
        copies.append(copy)
    other = qemu_vm(copies)
    path = workdir / "reference.state"
    qmp(other, "migrate", {"uri": f"exec:cat > {path}"})
    deadline = time.monotonic() + 30
    while qmp(other, "query-migrate").get("status") != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    other.kill()
    return path.read_bytes()


def wait_for_line(process: subprocess.Popen[str], needle: str, timeout: float = 30) -> str:
    """Read the process's stderr until a line containing ``needle``."""
    assert process.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    pytest.fail(f"no {needle!r} in: {''.join(seen)}")


# -- discovery (no QEMU) -------------------------------------------------------------------------


def _block(qdev: str, device: str = "", **inserted: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device, "qdev": qdev, "removable": False}
    if inserted:
        info["inserted"] = {"ro": False, "image": {"virtual-size": 1024}, **inserted}
    return info


def test_proxmox_names() -> None:
    assert proxmox_name(_block("/machine/peripheral/scsi0/virtio-backend")) == (
        "drive-scsi0",
        "scsi0",
    )
    assert proxmox_name(_block("ide2")) == ("drive-ide2", "ide2")
    # Proxmox's own command line: -drive id=drive-scsi0 ... -device ...,id=scsi0
    assert proxmox_name(_block("scsi0", "drive-scsi0")) == ("drive-scsi0", "scsi0")
    assert proxmox_name(_block("/machine/peripheral-anon/device[0]", "drive-virtio1")) == (
        "drive-virtio1",
        "drive-virtio1",
    )
    assert proxmox_name(_block("", "", **{"node-name": "n0"})) == ("drive-n0", "n0")


def test_discover_skips_and_picks() -> None:
    blocks = [
        _block("/machine/peripheral/scsi0/virtio-backend", **{"node-name": "d0"}),
        _block("/machine/peripheral/scsi1/virtio-backend", **{"node-name": "d1", "ro": True}),
        {**_block("ide2", **{"node-name": "cd"}), "removable": True},
        {"device": "", "qdev": "ide3", "removable": True},
    ]
    found, skipped = discover_disks(blocks)
    assert found == [Disk("drive-scsi0", "d0", 1024, "scsi0")]
    assert len(skipped) == 3
    assert discover_disks(blocks, ["ide2"])[0] == [Disk("drive-ide2", "cd", 1024, "ide2")]
    assert discover_disks(blocks, ["drive-scsi0"])[0][0].node == "d0"
    with pytest.raises(NbdvmaError, match="read-only"):
        discover_disks(blocks, ["scsi1"])
    with pytest.raises(NbdvmaError, match="no medium"):
        discover_disks(blocks, ["ide3"])
    with pytest.raises(NbdvmaError, match="no such drive: nope"):
        discover_disks(blocks, ["scsi0", "nope"])
    with pytest.raises(NbdvmaError, match="no writable disk"):
        discover_disks(blocks[1:])


# -- nbdvma backup -------------------------------------------------------------------------------


def test_backup_prelaunch_vm_with_vmstate_and_config(
    qemu_vm: Callable[..., QemuVm], disks: list[Path], workdir: Path
) -> None:
    vm = qemu_vm(disks)
    config = workdir / "qemu-server.conf"
    config.write_text("name: demo\nmemory: 128\n")
    archive = workdir / "vm.vma"
    result = backup("--qmp", vm.qmp_address, archive, "--vmstate", "--config", config)
    assert result.returncode == 0, result.stderr
    assert "INFO: 100% (9.0 MiB of 9.0 MiB)" in result.stderr
    assert "drive-scsi1: size 3.0 MiB" in result.stderr
    assert not Path(f"{archive}.part").exists()
    assert_qemu_clean(vm, "prelaunch")

    verify = nbdvma("verify", archive)
    assert verify.returncode == 0, verify.stderr
    shown = nbdvma("config", archive, "-c", "qemu-server.conf")
    assert shown.stdout == config.read_text()
    target = extract(archive, workdir / "restore")
    assert_disks_equal(target, vm)
    vmstate = (target / "vmstate.bin").read_bytes()
    assert vmstate[:8] == b"QEVM\x00\x00\x00\x03"
    # The same stream as QEMU's own migrate of an identical VM: same length, and equal
    # but for a few bytes of timer state.
    reference = reference_vmstate(qemu_vm, disks, workdir)
    assert len(vmstate) == len(reference)
    differing = sum(1 for x, y in zip(vmstate, reference, strict=True) if x != y)
    assert differing < 64, differing

    # The VM was returned to a state from which it can be saved again.
    again = backup("--qmp", vm.qmp_address, workdir / "again.vma", "--vmstate")
    assert again.returncode == 0, again.stderr
    assert_qemu_clean(vm, "prelaunch")


@pytest.mark.parametrize("state", ["running", "paused"])
def test_backup_keeps_run_state_over_tcp_qmp(
    qemu_vm: Callable[..., QemuVm], disks: list[Path], workdir: Path, state: str
) -> None:
    vm = qemu_vm(disks, qmp="tcp")
    set_run_state(vm, state)
    archive = workdir / "vm.vma.zst"
    result = backup("--qmp", vm.qmp_address, archive, "--vmstate", "--compress", "zstd")
    assert result.returncode == 0, result.stderr
    assert_qemu_clean(vm, state)
    target = extract(archive, workdir / "restore")
    assert (target / "vmstate.bin").read_bytes()[:4] == b"QEVM"
    assert_disks_equal(target, vm)  # no guest OS: the disks do not change while running
    assert nbdvma("verify", archive).returncode == 0


def test_backup_without_vmstate_never_touches_the_run_state(
    qemu_vm: Callable[..., QemuVm], disks: list[Path], workdir: Path
) -> None:
    vm = qemu_vm(disks)
    set_run_state(vm, "running")
    archive = workdir / "vm.vma"
    result = backup("--qmp", vm.qmp_address, archive)
    assert result.returncode == 0, result.stderr
    assert "saving the VM state" not in result.stderr
    assert_qemu_clean(vm, "running")
    target = extract(archive, workdir / "restore")
    assert not (target / "vmstate.bin").exists()
    assert_disks_equal(target, vm)


def test_backup_picks_drives_and_skips_cdroms_and_read_only_disks(
    qemu_vm: Callable[..., QemuVm], disks: list[Path], workdir: Path, raw_image: Callable[..., Path]
) -> None:
    iso = raw_image("cd.iso", MiB, {0: b"CD001"})
    ro = raw_image("ro.raw", MiB, {0: b"RO"})
    vm = qemu_vm(
        disks,
        extra_args=[
            *("-blockdev", f"driver=file,filename={iso},node-name=cdf,read-only=on"),
            *("-blockdev", "driver=raw,file=cdf,node-name=cd0,read-only=on"),
            *("-device", "ide-cd,drive=cd0,id=ide2,bus=ide.0"),
            *("-device", "ide-cd,id=ide3,bus=ide.1"),
            *("-blockdev", f"driver=file,filename={ro},node-name=rof,read-only=on"),
            *("-blockdev", "driver=raw,file=rof,node-name=ro0,read-only=on"),
            *("-device", "virtio-blk-pci,drive=ro0,id=virtio5"),
        ],
    )
    result = backup("--qmp", vm.qmp_address, workdir / "all.vma")
    assert result.returncode == 0, result.stderr
    for skipped in ("drive-ide2: read-only", "drive-ide3: no medium", "drive-virtio5: read-only"):
        assert f"INFO: skipping {skipped}" in result.stderr
    listing = nbdvma("list", workdir / "all.vma").stdout
    assert "drive-scsi0" in listing
    assert "drive-scsi1" in listing
    assert "ide" not in listing
    assert "virtio5" not in listing

    result = backup("--qmp", vm.qmp_address, workdir / "one.vma", "--drive", "scsi1")
    assert result.returncode == 0, result.stderr
    assert_disks_equal(extract(workdir / "one.vma", workdir / "one"), vm, only=[1])

    for drive, why in [("virtio5", "read-only"), ("ide3", "no medium"), ("nope", "no such")]:
        result = backup("--qmp", vm.qmp_address, workdir / f"{drive}.vma", "--drive", drive)
        assert result.returncode == 1
        assert why in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert not (workdir / f"{drive}.vma").exists()
        assert not (workdir / f"{drive}.vma.part").exists()
    assert_qemu_clean(vm, "prelaunch")


# -- failures -----------------------------------------------------------------------------------


def _assert_failed(result_code: int, stderr: str, archive: Path) -> None:
    assert result_code != 0
    errors = [line for line in stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    assert not archive.exists()  # at most ARCHIVE.part, incomplete


def test_job_error_fails_the_backup_and_restores_everything(
    qemu_vm: Callable[..., QemuVm], disks: list[Path], workdir: Path, raw_image: Callable[..., Path]
) -> None:
    bad = raw_image("bad.raw", 2 * MiB, {0: os.urandom(2 * MiB)})
    node = {
        "driver": "raw",
        "node-name": "bad0",
        "file": {
            "driver": "blkdebug",
            "image": {"driver": "file", "filename": str(bad)},
            "inject-error": [{"event": "read_aio", "errno": 5}],
        },
    }
    vm = qemu_vm(
        disks,
        extra_args=[
            *("-blockdev", json.dumps(node)),
            *("-device", "virtio-blk-pci,drive=bad0,id=scsi2"),
        ],
    )
    set_run_state(vm, "running")
    archive = workdir / "vm.vma"
    result = backup("--qmp", vm.qmp_address, archive, "--vmstate")
    _assert_failed(result.returncode, result.stderr, archive)
    assert "drive-scsi2" in result.stderr
    assert "error" in result.stderr
    assert_qemu_clean(vm, "running")


def test_qemu_killed_mid_backup(
    qemu_vm: Callable[..., QemuVm], disks: list[Path], workdir: Path
) -> None:
    vm = qemu_vm(disks)
    archive = workdir / "vm.vma"
    process = subprocess.Popen(
        [*BACKUP, "--qmp", vm.qmp_address, str(archive), "--bandwidth-limit=1M"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_line(process, "% (")
        vm.kill()
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    _assert_failed(process.returncode, stderr, archive)
    assert "QEMU" in stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_cancels_and_restores(
    qemu_vm: Callable[..., QemuVm], disks: list[Path], workdir: Path, signum: int
) -> None:
    vm = qemu_vm(disks)
    set_run_state(vm, "paused")
    archive = workdir / "vm.vma"
    process = subprocess.Popen(
        [*BACKUP, f"--qmp={vm.qmp_address}", str(archive), "--vmstate", "--bandwidth-limit=1M"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_line(process, "% (")
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    _assert_failed(process.returncode, stderr, archive)
    assert process.returncode == 128 + signum
    assert signal.Signals(signum).name in stderr
    assert_qemu_clean(vm, "paused")
    # And QEMU can be backed up again afterwards.
    again = backup("--qmp", vm.qmp_address, workdir / "again.vma", "--vmstate")
    assert again.returncode == 0, again.stderr
    assert_qemu_clean(vm, "paused")


# -- QEMU into nbdvma serve: blockdev-backup and legacy drive-backup, unix and TCP ---------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("method", ["blockdev-backup", "drive-backup"])
def test_qemu_backup_into_serve(
    qemu_vm: Callable[..., QemuVm],
    disks: list[Path],
    workdir: Path,
    sockdir: Path,
    free_tcp_port: Callable[[], int],
    transport: str,
    method: str,
) -> None:
    vm = qemu_vm(disks)
    if transport == "unix":
        sock = sockdir / "nbd.sock"
        listen = f"unix:{sock}"
        server: dict[str, Any] = {"type": "unix", "path": str(sock)}
    else:
        port = free_tcp_port()
        listen = f"tcp:127.0.0.1:{port}"
        server = {"type": "inet", "host": "127.0.0.1", "port": str(port)}
    archive = workdir / "vm.vma"
    names = [f"drive-{d.device_id}" for d in vm.disks]
    serve = subprocess.Popen(
        [PY, "-m", "nbdvma.serve", str(archive), "--listen", listen]
        + [f"--disk={n}={d.size}" for n, d in zip(names, vm.disks, strict=True)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_line(serve, "listening on")

        async def drive() -> None:
            async with QmpClient.connect(vm.qmp_address) as client:
                events = client.events()
                actions = []
                for i, (name, disk) in enumerate(zip(names, vm.disks, strict=True)):
                    if method == "blockdev-backup":
                        await client.execute(
                            "blockdev-add",
                            {
                                "driver": "raw",
                                "node-name": f"tgt{i}",
                                "file": {"driver": "nbd", "server": server, "export": name},
                            },
                        )
                        data = {"device": disk.node_name, "target": f"tgt{i}"}
                    else:
                        if transport == "unix":
                            uri = f"nbd+unix:///{name}?socket={server['path']}"
                        else:
                            uri = f"nbd://127.0.0.1:{server['port']}/{name}"
                        data = {"device": disk.node_name, "target": uri}
                        data |= {"format": "raw", "mode": "existing"}
                    data |= {"job-id": f"job{i}", "sync": "full"}
                    actions.append({"type": method, "data": data})
                await client.execute("transaction", {"actions": actions})
                for _ in actions:
                    event = await events.wait("BLOCK_JOB_COMPLETED", timeout=60)
                    assert "error" not in event.data, event.data
                if method == "blockdev-backup":
                    for i in range(len(actions)):
                        await client.execute("blockdev-del", {"node-name": f"tgt{i}"})

        trio.run(drive)
        _, stderr = serve.communicate(timeout=60)
    finally:
        serve.kill()
    assert serve.returncode == 0, stderr
    assert nbdvma("verify", archive).returncode == 0
    assert_disks_equal(extract(archive, workdir / "restore"), vm)
