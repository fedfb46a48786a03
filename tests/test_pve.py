"""``nbdvma.pve`` and ``nbdvma.vzdump``: Proxmox's config, map lines, names and log wording.

Every config produced here is also judged by ``pverules.restore_problems``, the
restore rules of qemu-server written out independently of the code under test.
"""

from __future__ import annotations

import datetime

import pverules
import pytest

from nbdvma.pve import (
    BlockDevice,
    Nic,
    VmInfo,
    archive_configs,
    archive_log_name,
    assign_keys,
    device_name,
    format_size,
    generate_config,
    key_of_device,
    parse_config_disks,
    parse_disk_value,
    split_config_argument,
    stored_config_name,
    vzdump_name,
    vzdump_vmid,
    with_map_lines,
)
from nbdvma.vzdump import archive_size, render_bytes, render_duration, render_hms

MiB = 1 << 20


def _block(qdev_id: str | None, kind: str | None, **kw: object) -> BlockDevice:
    fields: dict[str, object] = {"node": f"n-{qdev_id}", "size": MiB, "filename": "/img"}
    fields.update(kw)
    return BlockDevice(
        backend=str(fields.pop("backend", "")), qdev_id=qdev_id, device_type=kind, **fields
    )  # type: ignore[arg-type]


# -- small rules --------------------------------------------------------------------------------


def test_format_size_as_proxmox() -> None:
    assert format_size(32 << 30) == "32G"
    assert format_size(540672) == "528K"
    assert format_size(5 * MiB + 25 * 512) == "5255680"
    assert format_size(3 * MiB) == "3M"
    assert format_size(2 << 40) == "2T"
    assert format_size(4 << 50) == "4096T"


def test_device_names_and_keys() -> None:
    assert device_name("scsi0") == "drive-scsi0"
    assert device_name("tpmstate0") == "drive-tpmstate0-backup"
    assert key_of_device("drive-virtio15") == "virtio15"
    assert key_of_device("drive-tpmstate0-backup") == "tpmstate0"
    for name in ("drive-virtio16", "drive-ide4", "drive-scsi01", "scsi0", "drive-disk0"):
        assert key_of_device(name) is None, name


def test_disk_value_storage_and_format() -> None:
    d = parse_disk_value("scsi0", "local-lvm:vm-100-disk-0,iothread=1,size=32G")
    assert (d.storage, d.format, d.volume) == ("local-lvm", "", "local-lvm:vm-100-disk-0")
    assert parse_disk_value("virtio1", "local:100/vm-100-disk-1.qcow2,size=8G").format == "qcow2"
    assert parse_disk_value("sata0", "nfs:100/x.raw,format=vmdk").format == "vmdk"
    path = parse_disk_value("scsi2", "/dev/sdb,size=1G")
    assert (path.storage, path.format) == ("", "")
    assert parse_disk_value("ide2", "none,media=cdrom").is_cdrom
    assert parse_disk_value("scsi3", "local:vm-1-disk-3,backup=0").excluded
    assert parse_disk_value("scsi3", "file=local:vm-1-disk-3,size=1G").storage == "local"


def test_vzdump_names() -> None:
    when = datetime.datetime(2026, 12, 3, 9, 5, 7)
    name = vzdump_name(100, when, "zstd")
    assert name == "vzdump-qemu-100-2026_12_03-09_05_07.vma.zst"
    assert pverules.VZDUMP_ARCHIVE.match(name)
    assert vzdump_vmid(name) == 100
    assert vzdump_vmid(vzdump_name(999999999, when, None)) == 999999999
    for bad in ("vm.vma", "vzdump-qemu-99-2026_12_03-09_05_07.vma", "vzdump-qemu-100.vma"):
        assert vzdump_vmid(bad) is None
    with pytest.raises(ValueError, match="outside"):
        vzdump_name(99, when, None)
    assert archive_log_name("/b/" + name) == "/b/vzdump-qemu-100-2026_12_03-09_05_07.log"


def test_vzdump_wording() -> None:
    assert render_bytes(1.6 * (1 << 30), 1) == "1.6 GiB"
    assert render_bytes(32 << 30) == "32.00 GiB"
    assert render_bytes(0, 1) == "0.0 B"
    assert render_duration(3) == "3s"
    assert render_duration(62) == "1m 2s"
    assert render_duration(3605) == "1h 5s"
    assert render_duration(0) == "0s"
    assert archive_size(1_320_000_000) == "1.23GB"
    assert archive_size(37 * MiB + 5) == "37MB"
    assert archive_size(1000) == "0KB"
    assert render_hms(62) == "00:01:02"
    assert render_hms(3 * 3600 + 7) == "03:00:07"


# -- a user's config -----------------------------------------------------------------------------

USER = (
    b"boot: order=scsi0\r\n"
    b"lock: backup\r\n"
    b"memory: 2048\r\n"
    b"ide2: none,media=cdrom\r\n"
    b"scsi0: local-lvm:vm-100-disk-0,size=32G\r\n"
    b"scsi10: nfs:100/vm-100-disk-2.qcow2,size=1G\r\n"
    b"scsi2: local-lvm:vm-100-disk-3,size=1G\r\n"
    b"unused0: local-lvm:vm-100-disk-9\r\n"
    b"vmstate: local-lvm:vm-100-state-x\r\n"
    b"#qmdump#map:scsi0:drive-scsi0:old::\r\n"
    b"\r\n"
    b"[snap1]\r\n"
    b"scsi0: local-lvm:vm-100-disk-0,size=32G\r\n"
)


def test_map_lines_replace_old_ones_sorted_as_perl_sorts() -> None:
    keys = ["scsi2", "scsi0", "scsi10", "virtio1"]
    config, infos, warnings = with_map_lines(USER, keys, source="100.conf")
    text = config.decode()
    assert "\r" not in text
    assert text.endswith(
        "#qmdump#map:scsi0:drive-scsi0:local-lvm::\n"
        "#qmdump#map:scsi10:drive-scsi10:nfs:qcow2:\n"
        "#qmdump#map:scsi2:drive-scsi2:local-lvm::\n"
        "#qmdump#map:virtio1:drive-virtio1:::\n"
    )
    assert "old" not in text
    assert "[snap1]" not in text
    for dropped in ("lock:", "unused0:", "vmstate:"):
        assert dropped not in text
    assert "ide2: none,media=cdrom" in text  # copied, as vzdump does
    assert any("snapshot" in line for line in infos)
    assert any("unused drive 'local-lvm:vm-100-disk-9'" in line for line in infos)
    assert warnings == [
        "the VM's disk virtio1 has no line in 100.conf: Proxmox would restore it as an "
        "unused volume"
    ]
    devices = [device_name(k) for k in keys]
    problems = pverules.restore_problems(config, devices)
    assert problems == ["no config line for virtio1: its volume would be unused"]


def test_warning_for_a_config_disk_the_vm_lacks() -> None:
    config, _, warnings = with_map_lines(USER, ["scsi0", "scsi2"], source="100.conf")
    assert warnings == ["100.conf has disk scsi10, which the VM does not have"]
    assert pverules.restore_problems(config, ["drive-scsi0", "drive-scsi2"]) == []
    # The map lines are what makes it restorable: without them, restore refuses.
    assert pverules.restore_problems(USER, ["drive-scsi0"]) != []


def test_archive_configs_names() -> None:
    items: list[tuple[str | None, str, bytes]] = [
        (None, "/etc/pve/qemu-server/100.conf", b"scsi0: local:1,size=1M\n"),
        (None, "/etc/pve/firewall/100.fw", b"[OPTIONS]\n"),
        ("notes.txt", "/tmp/n", b"x"),
    ]
    configs, _, warnings = archive_configs(items, ["drive-scsi0", "odd"])
    assert [name for name, _ in configs] == ["qemu-server.conf", "qemu-server.fw", "notes.txt"]
    assert configs[0][1].endswith(b"#qmdump#map:scsi0:drive-scsi0:local::\n")
    assert configs[1][1] == b"[OPTIONS]\n"
    assert any("odd is not named drive-KEY" in w for w in warnings)
    # No device with a Proxmox name: stored as given, under its basename (vma create).
    plain, _, _ = archive_configs(items[:1], ["disk0"])
    assert plain == [("100.conf", items[0][2])]
    with pytest.raises(ValueError, match="two configs"):
        archive_configs([items[0], items[0]], ["drive-scsi0"])


# -- what QEMU says -------------------------------------------------------------------------


def test_assign_keys_keeps_ids_and_derives_the_rest_from_the_bus() -> None:
    blocks = [
        _block("scsi0", "scsi-hd", controller="virtio-scsi-pci", controller_path="/c0"),
        _block(None, "scsi-hd", backend="d1", controller="virtio-scsi-pci", controller_path="/c1"),
        _block("disk1", "virtio-blk-pci"),
        _block("virtio0", "virtio-blk-pci", read_only=True),
        _block("hd", "ide-hd", controller="ich9-ahci"),
        _block("old", "ide-hd", controller="piix3-ide"),
        _block(None, "ide-hd", backend="drive-ide3", controller="piix3-ide"),
        _block("nv", "nvme"),
        _block(None, "pflash0", read_only=True),
        _block(None, "pflash1"),
        _block("ide2", "ide-cd", node=None),
        _block("ide1", "ide-hd", node=None, controller="piix3-ide"),
    ]
    disks, skipped = assign_keys(blocks)
    got = {d.key: (d.block.qdev_id or d.block.backend or d.block.node) for d in disks}
    assert got == {
        "scsi0": "scsi0",
        "scsi1": "d1",
        "virtio1": "disk1",
        "virtio0": "virtio0",  # read-only: included
        "sata0": "hd",
        "ide0": "old",
        "ide3": "drive-ide3",
        "scsi2": "nv",
        "efidisk0": "n-None",
    }
    assert [d.key for d in disks] == sorted(got)
    assert next(d for d in disks if d.key == "scsi2").bus_note
    assert len(skipped) == 3
    assert any("CD-ROM" in s for s in skipped)
    assert any("empty drive" in s for s in skipped)
    assert any("firmware" in s for s in skipped)


def test_assign_keys_fails_when_a_bus_is_full() -> None:
    blocks = [_block(f"virtio{i}", "virtio-blk-pci") for i in range(16)]
    blocks.append(_block("more", "virtio-blk-pci"))
    with pytest.raises(ValueError, match="no free Proxmox key virtioN left for disk more"):
        assign_keys(blocks)


def test_generated_config_describes_the_vm_and_restores() -> None:
    blocks = [
        _block("scsi0", "scsi-hd", controller="virtio-scsi-pci", controller_path="/a", bootindex=1),
        _block("scsi1", "scsi-hd", controller="virtio-scsi-pci", controller_path="/b"),
        _block("virtio1", "virtio-blk-pci", filename="/v,1", size=5 * MiB + 512),
        _block(None, "pflash1", size=540672),
    ]
    vm = VmInfo(
        name="web server_1",
        memory=2048 * MiB,
        sockets=2,
        cores=2,
        threads=2,
        machine="pc-q35-7.2",
        uuid="11111111-2222-3333-4444-555555555555",
        vmgenid="aaaaaaaa-2222-3333-4444-555555555555",
        blocks=tuple(blocks),
        nics=(
            Nic("net0", "virtio-net-pci", "bc:24:11:00:00:01", 2),
            Nic(None, "e1000", "bc:24:11:00:00:02"),
            Nic("x", "usb-net", "bc:24:11:00:00:03"),
        ),
    )
    disks, _ = assign_keys(vm.blocks)
    config = generate_config(vm, disks)
    lines = config.decode().splitlines()
    assert lines == [
        "bios: ovmf",
        "boot: order=scsi0;net0",
        "cores: 4",
        "efidisk0: /img,efitype=4m,size=528K",
        "machine: q35",
        "memory: 2048",
        "name: web-server-1",
        "net0: virtio=BC:24:11:00:00:01,bridge=vmbr0",
        "net1: e1000=BC:24:11:00:00:02,bridge=vmbr0",
        "scsi0: /img,size=1M",
        "scsi1: /img,size=1M",
        "scsihw: virtio-scsi-single",
        "smbios1: uuid=11111111-2222-3333-4444-555555555555",
        "sockets: 2",
        "virtio1: nbdvma:virtio1,size=5243392",
        "vmgenid: aaaaaaaa-2222-3333-4444-555555555555",
        "#qmdump#map:efidisk0:drive-efidisk0:::",
        "#qmdump#map:scsi0:drive-scsi0:::",
        "#qmdump#map:scsi1:drive-scsi1:::",
        "#qmdump#map:virtio1:drive-virtio1:::",
    ]
    assert pverules.restore_problems(config, [d.name for d in disks]) == []


def test_generated_config_of_an_i440fx_vm_without_boot_indexes() -> None:
    vm = VmInfo(memory=512 * MiB, machine="pc-i440fx-7.2")
    disks, _ = assign_keys([_block("a", "virtio-blk-pci"), _block("b", "ide-hd")])
    text = generate_config(vm, disks).decode()
    assert "machine:" not in text
    assert "bios:" not in text
    assert "boot: order=ide0;virtio0\n" in text
    assert parse_config_disks(text.encode()).keys() == {"ide0", "virtio0"}


def test_config_arguments_and_stored_names() -> None:
    assert split_config_argument("100.conf") == (None, "100.conf")
    assert split_config_argument("my.conf=/etc/100.conf") == ("my.conf", "/etc/100.conf")
    assert split_config_argument("/tmp/a=b/100.conf") == (None, "/tmp/a=b/100.conf")
    assert stored_config_name(None, "/etc/pve/qemu-server/100.conf", keyed=True) == (
        "qemu-server.conf"
    )
    assert stored_config_name(None, "/etc/pve/firewall/100.fw", keyed=True) == "qemu-server.fw"
    assert stored_config_name(None, "/etc/pve/qemu-server/100.conf", keyed=False) == "100.conf"
    assert stored_config_name("x.conf", "/a/100.conf", keyed=True) == "x.conf"
