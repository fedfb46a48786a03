"""``nbdvma backup`` and ``nbdvma serve`` against a real, paused QEMU (TCG, no guest OS).

Every end-to-end test restores the archive with ``nbdvma extract`` and compares the
disks byte for byte with the VM's images.  Failure tests check what the user relies on
afterwards: the VM is in its previous run state, the nodes we added are gone, no job is
left, and nothing exists under the archive's final name.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pverules
import pytest
import trio
from conftest import QemuVm

from nbdvma.backup import select_disks
from nbdvma.errors import NbdvmaError
from nbdvma.pve import BlockDevice, GuestDisk, assign_keys, parse_config_disks
from nbdvma.qmp import QmpClient

pytestmark = pytest.mark.interop

PY = sys.executable
BACKUP = [PY, "-m", "nbdvma", "backup"]
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
    """``nbdvma extract``; an archive with a ``qemu-server.conf`` must also pass
    Proxmox's restore rules (every backup stores one unless told not to)."""
    header, _ = pverules.archive_devices(archive.read_bytes())
    if header.config("qemu-server.conf") is not None:
        assert_restorable(archive)
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


# -- choosing the disks (no QEMU) ---------------------------------------------------------------


def _guest() -> list[GuestDisk]:
    blocks = [
        BlockDevice("", "scsi0", "scsi-hd", node="d0", size=1024, filename="/a"),
        BlockDevice("", "scsi1", "scsi-hd", node="d1", size=2048, filename="/b", read_only=True),
        BlockDevice("drive-virtio0", None, "virtio-blk-pci", node="d2", size=4096, filename="/c"),
        BlockDevice("", "ide2", "ide-cd", node="cd", size=4096),
    ]
    disks, skipped = assign_keys(blocks)
    assert skipped == ["'ide2': CD-ROM drive"]
    return disks


def test_select_every_disk_read_only_included() -> None:
    disks, excluded = select_disks(_guest())
    assert [(d.name, d.node, d.size, d.key, d.volume) for d in disks] == [
        ("drive-scsi0", "d0", 1024, "scsi0", "/a"),
        ("drive-scsi1", "d1", 2048, "scsi1", "/b"),
        ("drive-virtio0", "d2", 4096, "virtio0", "/c"),
    ]
    assert excluded == []


def test_select_drive_exclude_and_backup_0() -> None:
    disks, excluded = select_disks(_guest(), drives=["drive-scsi1", "d2"])
    assert [d.key for d in disks] == ["scsi1", "virtio0"]
    assert excluded == ["exclude disk 'scsi0' '/a' (not named by --drive)"]
    disks, excluded = select_disks(_guest(), excludes=["scsi1"])
    assert [d.key for d in disks] == ["scsi0", "virtio0"]
    assert excluded == ["exclude disk 'scsi1' '/b' (--exclude)"]
    config = parse_config_disks(b"scsi0: local-lvm:vm-1-disk-0,backup=0\n")
    disks, excluded = select_disks(_guest(), config_disks=config)
    assert [d.key for d in disks] == ["scsi1", "virtio0"]
    assert excluded == ["exclude disk 'scsi0' 'local-lvm:vm-1-disk-0' (backup=no)"]
    with pytest.raises(NbdvmaError, match="--exclude ide2, nope: the VM has no such disk"):
        select_disks(_guest(), excludes=["nope", "ide2"])
    with pytest.raises(NbdvmaError, match="--drive nope: the VM has no such disk"):
        select_disks(_guest(), drives=["scsi0", "nope"])
    with pytest.raises(NbdvmaError, match="no disk left"):
        select_disks(_guest(), excludes=["scsi0", "scsi1", "virtio0"])


# -- nbdvma backup -------------------------------------------------------------------------------


def test_backup_prelaunch_vm_with_vmstate_and_config(
    qemu_vm: Callable[..., QemuVm], disks: list[Path], workdir: Path
) -> None:
    vm = qemu_vm(disks)
    config = workdir / "some.conf"
    config.write_text(
        "name: demo\nmemory: 128\nscsi0: local:100/vm-100-disk-0.qcow2,size=6M\n"
        "scsi1: local-lvm:vm-100-disk-1,size=3149312\n"
    )
    archive = workdir / "vm.vma"
    result = backup("--qmp", vm.qmp_address, archive, "--vmstate", "--config", config)
    assert result.returncode == 0, result.stderr
    # The file's name does not matter: Proxmox reads qemu-server.conf.
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARN")]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith("WARN: vm.vma is not a vzdump name")
    assert "INFO: 100% (9.0 MiB of 9.0 MiB)" in result.stderr
    assert "drive-scsi1: size 3.0 MiB" in result.stderr
    assert not Path(f"{archive}.part").exists()
    assert_qemu_clean(vm, "prelaunch")

    verify = nbdvma("verify", archive)
    assert verify.returncode == 0, verify.stderr
    shown = nbdvma("config", archive, "-c", "qemu-server.conf")
    assert shown.stdout == config.read_text() + (
        "#qmdump#map:scsi0:drive-scsi0:local:qcow2:\n#qmdump#map:scsi1:drive-scsi1:local-lvm::\n"
    )
    target = extract(archive, workdir / "restore")
    assert_disks_equal(target, vm)
    vmstate = (target / "vmstate.bin").read_bytes()
    assert vmstate[:8] == b"QEVM\x00\x00\x00\x03"
    # The same stream as QEMU's own migrate of an identical VM: same length, and equal
    # but for a few bytes of timer state.
    reference = reference_vmstate(qemu_vm, disks, workdir)
    if len(vmstate) == len(reference):
        differing = sum(1 for x, y in zip(vmstate, reference, strict=True) if x != y)
        assert differing < 64, differing
    else:
        # On a loaded machine the two VMs may differ by a RAM page or two that one has
        # touched (a zero-page record is 9 bytes: seen 18 bytes apart once in many runs).
        assert abs(len(vmstate) - len(reference)) <= 64, (len(vmstate), len(reference))

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


def pve_topology(
    scsi: Path, virtio: Path, readonly: Path, iso: Path, efi: tuple[Path, Path] | None = None
) -> list[str]:
    """QEMU arguments of a VM set up as Proxmox would: a scsi-hd on virtio-scsi
    (``scsi0``), a virtio-blk disk with an id that is no Proxmox key (``data``, so
    ``virtio0``), a read-only virtio-blk disk (``virtio1``), a CD-ROM and an empty
    CD-ROM drive, a drive without medium nor device, and a NIC; with ``efi``, OVMF's
    code (read-only) and variables flash (``efidisk0``)."""
    flash = []
    if efi is not None:
        flash = [
            *("-blockdev", f"driver=file,filename={efi[0]},node-name=code,read-only=on"),
            *("-blockdev", f"driver=file,filename={efi[1]},node-name=vars"),
            *("-machine", "pflash0=code,pflash1=vars"),
        ]
    return [
        *flash,
        *("-device", "virtio-scsi-pci,id=virtioscsi0"),
        *("-blockdev", f"driver=file,filename={scsi},node-name=f0"),
        *("-blockdev", "driver=raw,file=f0,node-name=d0"),
        *("-device", "scsi-hd,drive=d0,id=scsi0,bus=virtioscsi0.0,bootindex=100"),
        *("-blockdev", f"driver=file,filename={virtio},node-name=f1"),
        *("-blockdev", "driver=raw,file=f1,node-name=d1"),
        *("-device", "virtio-blk-pci,drive=d1,id=data"),
        *("-blockdev", f"driver=file,filename={readonly},node-name=f2,read-only=on"),
        *("-blockdev", "driver=raw,file=f2,node-name=d2,read-only=on"),
        *("-device", "virtio-blk-pci,drive=d2,id=virtio1"),
        *("-blockdev", f"driver=file,filename={iso},node-name=cdf,read-only=on"),
        *("-blockdev", "driver=raw,file=cdf,node-name=cd0,read-only=on"),
        *("-device", "ide-cd,drive=cd0,id=ide2,bus=ide.0"),
        *("-device", "ide-cd,id=ide3,bus=ide.1"),
        *("-drive", "if=none,id=spare"),
        *(
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0,id=net0,mac=bc:24:11:00:00:01",
        ),
    ]


@pytest.fixture
def pve_images(raw_image: Callable[..., Path]) -> dict[str, Path]:
    """The images of :func:`pve_topology`, by the key each one gets."""
    return {
        "scsi0": raw_image("scsi.raw", 4 * MiB, {0: os.urandom(65536), 2 * MiB: b"S" * 5000}),
        "virtio0": raw_image("virtio.raw", ODD_SIZE, {4096: os.urandom(70000)}),
        "virtio1": raw_image("ro.raw", 2 * MiB, {0: b"read-only disk", MiB: os.urandom(4096)}),
        "iso": raw_image("cd.iso", MiB, {0: b"CD001"}),
        "code": raw_image("OVMF_CODE.fd", MiB, {0: b"not really OVMF"}),
        "efidisk0": raw_image("OVMF_VARS.fd", 540672, {4096: b"variables"}),
    }


def pve_vm(qemu_vm: Callable[..., QemuVm], images: Mapping[str, Path], *extra: str) -> QemuVm:
    return qemu_vm(
        [],
        extra_args=[
            *pve_topology(
                images["scsi0"],
                images["virtio0"],
                images["virtio1"],
                images["iso"],
                (images["code"], images["efidisk0"]) if "code" in images else None,
            ),
            *extra,
        ],
    )


def assert_restorable(archive: Path) -> bytes:
    """Proxmox's restore rules hold for the archive; returns its qemu-server.conf."""
    config, problems = pverules.archive_problems(archive.read_bytes())
    assert problems == []
    assert config is not None
    return config


def assert_images_restored(target: Path, images: Mapping[str, Path], keys: list[str]) -> None:
    for key in keys:
        restored = target / f"disk-drive-{key}.raw"
        assert restored.read_bytes() == images[key].read_bytes(), key
    assert sorted(p.name for p in target.glob("disk-*.raw")) == [
        f"disk-drive-{k}.raw" for k in sorted(keys)
    ]


def load_vmstate(
    qemu_vm: Callable[..., QemuVm], images: Mapping[str, Path], workdir: Path, state: bytes
) -> str:
    """Start a VM like :func:`pve_vm` with ``-incoming defer`` and feed it ``state``;
    return the final ``query-migrate`` status (``completed`` when QEMU accepted it)."""
    path = workdir / "incoming.state"
    path.write_bytes(state)
    copies = {}
    for key, image in images.items():  # the first VM holds the images' locks
        copies[key] = workdir / f"incoming-{image.name}"
        copies[key].write_bytes(image.read_bytes())
    vm = pve_vm(qemu_vm, copies, "-incoming", "defer")
    qmp(vm, "migrate-incoming", {"uri": f"exec:cat {path}"})
    deadline = time.monotonic() + 60
    status = "timeout"
    while time.monotonic() < deadline:
        try:
            status = str(qmp(vm, "query-migrate").get("status"))
        except OSError:  # QEMU exits when an incoming migration fails
            vm.process.wait(10)
            status = "failed"
        if status in ("completed", "failed"):
            break
        time.sleep(0.05)
    vm.kill()
    return status if status == "completed" else f"{status}: {vm.output()}"


def test_backup_generated_config_vzdump_names_and_a_vm_state_proxmox_restores(
    qemu_vm: Callable[..., QemuVm], pve_images: dict[str, Path], workdir: Path
) -> None:
    vm = pve_vm(qemu_vm, pve_images, "-name", "pve test")
    dumpdir = workdir / "dump"
    dumpdir.mkdir()
    result = backup(
        "--qmp",
        vm.qmp_address,
        dumpdir,
        "--vmid",
        "100",
        "--vmstate",
        "--compress",
        "zstd",
        "--notes",
        "before the upgrade\nsecond line",
    )
    assert result.returncode == 0, result.stderr
    assert_qemu_clean(vm, "prelaunch")
    (archive,) = dumpdir.glob("*.vma.zst")
    assert pverules.VZDUMP_ARCHIVE.match(archive.name), archive.name
    assert sorted(p.name for p in dumpdir.iterdir()) == sorted(
        [archive.name, f"{archive.name}.notes", archive.name.replace(".vma.zst", ".log")]
    )
    assert Path(f"{archive}.notes").read_text() == "before the upgrade\nsecond line"

    # vzdump's wording, on stderr and with timestamps in the .log.
    err = result.stderr
    for line in [
        "INFO: Starting Backup of VM 100 (qemu)",
        "INFO: status = prelaunch",
        "INFO: VM Name: pve test",
        "INFO: skipping 'ide2': CD-ROM drive",
        "INFO: skipping 'ide3': CD-ROM drive",
        "INFO: skipping 'spare': empty drive",
        "INFO: skipping 'code': the firmware code flash (not a disk of the VM)",
        f"INFO: include disk 'efidisk0' '{pve_images['efidisk0']}' 528K",
        f"INFO: include disk 'scsi0' '{pve_images['scsi0']}' 4M",
        f"INFO: include disk 'virtio0' '{pve_images['virtio0']}' {ODD_SIZE}",
        f"INFO: include disk 'virtio1' '{pve_images['virtio1']}' 2M",
        f"INFO: creating vzdump archive '{archive}'",
        "INFO: QEMU logs that the NBD targets give no block size and that it uses 64 KiB: "
        "that is the archive's cluster size, the backup is sound",
        "INFO: Backup job finished successfully",
    ]:
        assert line in err.splitlines(), line
    # 4 MiB + 3 MiB 3.5 KiB + 2 MiB + 528 KiB
    assert re.search(r"^INFO: 100% \(9\.5 MiB of 9\.5 MiB\) in \d+s", err, re.M), err
    progress = re.findall(r"^INFO: +\d+% \(.*\) in (\d+)s(, read: .*/s, write: .*/s)?$", err, re.M)
    assert progress, err
    for seconds, rates in progress:  # rates only once they mean something
        assert bool(rates) == (int(seconds) >= 1), err
    assert re.search(r"^INFO: transferred 9\.52 MiB in (<1|\d+) seconds", err, re.M), err
    assert re.search(r"^INFO: Finished Backup of VM 100 \(00:00:\d\d\)$", err, re.M), err
    log = archive.with_name(archive.name.replace(".vma.zst", ".log")).read_text()
    stamped = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARN|ERROR): ")
    assert all(stamped.match(line) for line in log.splitlines()), log
    assert [stamped.sub(r"\1: ", line) for line in log.splitlines()] == err.splitlines()

    # The config: four disks, four map lines, the VM as QEMU knows it.
    config = assert_restorable(archive).decode()
    assert config.count("#qmdump#map:") == 4
    for line in [
        "bios: ovmf",
        f"efidisk0: {pve_images['efidisk0']},efitype=4m,size=528K",
        "memory: 128",
        "name: pve-test",
        "machine: q35",
        "scsihw: virtio-scsi-pci",
        "boot: order=scsi0",
        "net0: virtio=BC:24:11:00:00:01,bridge=vmbr0",
        f"scsi0: {pve_images['scsi0']},size=4M",
        f"virtio0: {pve_images['virtio0']},size={ODD_SIZE}",
        f"virtio1: {pve_images['virtio1']},size=2M",
        "#qmdump#map:virtio1:drive-virtio1:::",
    ]:
        assert line in config.splitlines(), line
    target = extract(archive, workdir / "restore")
    assert_images_restored(target, pve_images, ["efidisk0", "scsi0", "virtio0", "virtio1"])

    # The VM state as Proxmox's reader extracts it loads into a matching QEMU.
    state = pverules.vmstate_as_proxmox_extracts(archive.read_bytes())
    assert state.startswith(b"QEVM")
    # nbdvma's extract gives the same stream, without the last cluster's padding.
    ours = (target / "vmstate.bin").read_bytes()
    assert len(state) - 65536 < len(ours) <= len(state)
    assert state == ours + bytes(len(state) - len(ours))
    assert load_vmstate(qemu_vm, pve_images, workdir, state) == "completed"


def test_backup_user_config_named_100_conf_and_exclude(
    qemu_vm: Callable[..., QemuVm], pve_images: dict[str, Path], workdir: Path
) -> None:
    del pve_images["code"], pve_images["efidisk0"]  # a SeaBIOS VM
    vm = pve_vm(qemu_vm, pve_images)
    config = workdir / "100.conf"
    config.write_bytes(
        b"boot: order=scsi0\r\nlock: backup\r\nmemory: 128\r\n"
        b"scsi0: local-lvm:vm-100-disk-0,iothread=1,size=4M\r\n"
        b"virtio0: local:100/vm-100-disk-1.qcow2,size=3M\r\n"
        b"virtio1: local-lvm:vm-100-disk-2,size=2M\r\n"
        b"scsihw: virtio-scsi-single\r\n"
    )
    archive = workdir / "vzdump-qemu-100-2026_01_02-03_04_05.vma"
    result = backup("--qmp", vm.qmp_address, archive, "--config", config, "--exclude", "virtio1")
    assert result.returncode == 0, result.stderr
    assert "WARN" not in result.stderr
    assert "INFO: exclude disk 'virtio1' 'local-lvm:vm-100-disk-2' (--exclude)" in result.stderr
    assert "INFO: include disk 'scsi0' 'local-lvm:vm-100-disk-0' 4M" in result.stderr
    assert archive.with_suffix(".log").exists()  # a vzdump name given: its log too
    listing = nbdvma("list", archive).stdout
    assert "CFG: size: " in listing
    assert "name: qemu-server.conf" in listing
    assert "100.conf" not in listing
    stored = assert_restorable(archive).decode()
    assert stored == (
        "boot: order=scsi0\nmemory: 128\n"
        "scsi0: local-lvm:vm-100-disk-0,iothread=1,size=4M\n"
        "virtio0: local:100/vm-100-disk-1.qcow2,size=3M\n"
        "virtio1: local-lvm:vm-100-disk-2,size=2M\n"
        "scsihw: virtio-scsi-single\n"
        "#qmdump#map:scsi0:drive-scsi0:local-lvm::\n"
        "#qmdump#map:virtio0:drive-virtio0:local:qcow2:\n"
    )
    assert_images_restored(extract(archive, workdir / "r"), pve_images, ["scsi0", "virtio0"])

    # --config none: no config of the VM (the data digest only); --drive: only that disk.
    bare = workdir / "bare.vma"
    result = backup("--qmp", vm.qmp_address, bare, "--config", "none", "--drive", "virtio1")
    assert result.returncode == 0, result.stderr
    listed = nbdvma("list", bare).stdout.splitlines()
    assert [line for line in listed if line.startswith("CFG:")] == [
        "CFG: size: 93 name: nbdvma-digest"
    ]
    assert_images_restored(extract(bare, workdir / "b"), pve_images, ["virtio1"])

    # Bad choices fail with one line, leave nothing and QEMU as it was.
    for args, why in [
        (["--exclude", "nope"], "--exclude nope: the VM has no such disk"),
        (["--drive", "ide2"], "--drive ide2: the VM has no such disk"),
        ([], "is a directory: --vmid N is needed"),
        (["--vmid", "99"], "VMID 99 is outside 100..999999999"),
    ]:
        target = workdir if not args or args[0] == "--vmid" else workdir / "bad.vma"
        result = backup("--qmp", vm.qmp_address, target, *args)
        assert result.returncode == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
        assert len(errors) == 1, result.stderr
        assert why in errors[0]
        assert not (workdir / "bad.vma").exists()
        assert not list(workdir.glob("vzdump-qemu-99-*"))
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
        [PY, "-m", "nbdvma", "serve", str(archive), "--listen", listen]
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
