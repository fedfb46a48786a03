"""The ``nbdvma`` tools: list/config/verify/extract output and failures, create round trips."""

from __future__ import annotations

import io
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pverules
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmagen import CTIME, Slot, block, extent, header, header_size_of, image_archive

from nbdvma.cli import main
from nbdvma.tools.common import Progress
from nbdvma.vma.format import VMA_BLOCK_SIZE, VMA_CLUSTER_SIZE, DeviceInfo
from nbdvma.vma.sink import open_sink
from nbdvma.vma.writer import VmaWriter

C = VMA_CLUSTER_SIZE
NBDVMA = str(Path(sys.executable).with_name("nbdvma"))
CONF = b"memory: 512\nname: test\n"
#: What verify says about an archive without nbdvma's data digest (vmagen's have none).
NO_DIGEST = (
    "no data digest: the extents' structure was checked, their data could not be "
    "(not written by nbdvma to a file)"
)


@pytest.fixture(autouse=True)
def _utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


def data_of(size: int, seed: int = 1) -> bytes:
    """Deterministic data with zero blocks and a zero cluster in it."""
    rnd = random.Random(seed)
    out = bytearray(rnd.randbytes(size))
    for start in range(0, size, 5 * VMA_BLOCK_SIZE):
        out[start : start + VMA_BLOCK_SIZE] = bytes(len(out[start : start + VMA_BLOCK_SIZE]))
    if size > 2 * C:
        out[C : 2 * C] = bytes(C)
    return bytes(out)


def run(*argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [NBDVMA, *argv], input=stdin, capture_output=True, env={**os.environ, "TZ": "UTC"}
    )


def assert_clean_failure(proc: subprocess.CompletedProcess[bytes], message: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert message in err, err


@pytest.fixture
def two_disks(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    a = data_of(3 * C + 8192, 1)
    b = data_of(70 * C, 2)
    path = tmp_path / "a.vma"
    path.write_bytes(
        image_archive(
            [("drive-scsi0", a), ("drive-efidisk0", b)],
            [("qemu-server.conf", CONF), ("qemu-server.fw", b"[OPTIONS]\n")],
            order="interleaved",
        )
    )
    return path, a, b


# ----------------------------------------------------------------------- list / config


def test_list_exact_output(
    two_disks: tuple[Path, bytes, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    path, a, b = two_disks
    assert main(["list", str(path)]) == 0
    assert capsys.readouterr().out == (
        f"CFG: size: {len(CONF)} name: qemu-server.conf\n"
        "CFG: size: 10 name: qemu-server.fw\n"
        f"DEV: dev_id=1 size: {len(a)} devname: drive-scsi0\n"
        f"DEV: dev_id=2 size: {len(b)} devname: drive-efidisk0\n"
        f"CTIME: {time.ctime(CTIME)}\n"
    )


def test_list_vmstate_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.vma"
    path.write_bytes(header([("disk0", C), ("vmstate", 5000)]) + extent([Slot(1, 0, 0)]))
    assert main(["list", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:3] == [
        "DEV: dev_id=1 size: 65536 devname: disk0",
        "VMSTATE: dev_id=2 memory: 5000",
    ]


def test_config(
    two_disks: tuple[Path, bytes, bytes], capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    path = str(two_disks[0])
    assert main(["config", path]) == 0
    assert capfdbinary.readouterr().out == CONF
    assert main(["config", path, "-c", "qemu-server.fw"]) == 0
    assert capfdbinary.readouterr().out == b"[OPTIONS]\n"
    assert main(["config", path, "-c", "nope"]) == 255
    captured = capfdbinary.readouterr()
    assert captured.out == b""
    assert captured.err == b"unable to find configuration data 'nope'\n"


# ----------------------------------------------------------------------- verify


def test_verify_silent_and_verbose(
    two_disks: tuple[Path, bytes, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(two_disks[0])
    assert main(["verify", path]) == 0
    # vma prints nothing; we say what could not be checked.
    assert capsys.readouterr().out == NO_DIGEST + "\n"
    assert main(["verify", "-v", path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CFG: ")
    assert lines[4].startswith("CTIME: ")
    assert lines[5].startswith("progress 1% (read 65536 bytes, duration ")
    # 74 clusters read, 73 whole ones counted: like vma, the last line is over 100%.
    assert lines[-4].startswith("progress 101% (read 4849664 bytes")
    assert lines[-3].startswith("total bytes read 4849664, sparse bytes ")
    assert lines[-2].startswith("space reduction due to 4K zero blocks ")
    assert lines[-1] == NO_DIGEST


def test_verify_no_image_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.vma"
    path.write_bytes(header([], [("qemu-server.conf", CONF)]) + extent([]))
    assert main(["verify", "-v", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "vma archive contains no image data",
        NO_DIGEST,
    ]


def test_verify_failure_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "d.vma"
    path.write_bytes(header() + extent([Slot(1, 0, 0), Slot(1, 0, 0)]))
    assert main(["verify", str(path)]) == 1
    assert (
        capsys.readouterr().err == "verify failed - found duplicated cluster 0 for stream disk0\n"
    )
    # Header errors are printed as they are (vma_reader_create fails before verify).
    path.write_bytes(b"VMA\0" + bytes(20000))
    assert main(["verify", str(path)]) == 1
    assert capsys.readouterr().err == "wrong vma header size 0\n"


def test_verify_reports_missing_clusters_as_incomplete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # vma verify would pass this; extract would fail it (S15).  So does our verify:
    # it is what an interrupted backup leaves behind.
    path = tmp_path / "m.vma"
    path.write_bytes(header() + extent([Slot(1, 0, 0)]))
    assert main(["verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        "verify failed - detected missing cluster 1 for stream disk0 - the archive is incomplete\n"
    )


def test_verify_strict_rejects_stored_zero_blocks_and_past_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "z.vma"
    path.write_bytes(header([("d", C)]) + extent([Slot(1, 0, 1, block(0))]))
    assert main(["verify", str(path)]) == 0
    assert main(["verify", "--strict", str(path)]) == 1
    assert "stored zero block in cluster 0 of stream d" in capsys.readouterr().err
    path.write_bytes(header([("d", 8192)]) + extent([Slot(1, 0, 0xFFFF, block(3) * 16)]))
    assert main(["verify", str(path)]) == 0
    assert main(["verify", "--strict", str(path)]) == 1
    assert "store data past its end" in capsys.readouterr().err


# ----------------------------------------------------------------------- extract


def test_extract(
    two_disks: tuple[Path, bytes, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, a, b = two_disks
    out = tmp_path / "out"
    assert main(["extract", str(path), str(out)]) == 0
    assert capsys.readouterr().out == (
        f"DEVINFO {out}/tmp-disk-drive-scsi0.raw {len(a)}\n"
        f"DEVINFO {out}/tmp-disk-drive-efidisk0.raw {len(b)}\n"
    )
    assert sorted(os.listdir(out)) == [
        "disk-drive-efidisk0.raw",
        "disk-drive-scsi0.raw",
        "qemu-server.conf",
        "qemu-server.fw",
    ]
    assert (out / "disk-drive-scsi0.raw").read_bytes() == a
    assert (out / "disk-drive-efidisk0.raw").read_bytes() == b
    assert (out / "qemu-server.conf").read_bytes() == CONF


def test_extract_is_sparse_and_exact_size(tmp_path: Path) -> None:
    size = 256 * C + 512
    path = tmp_path / "s.vma"
    slots = [Slot(1, c, 0) for c in range(257)]
    slots[100] = Slot(1, 100, 1 << 7, block(9))
    path.write_bytes(
        header([("big", size)]) + b"".join(extent(slots[i : i + 58]) for i in range(0, 257, 58))
    )
    assert main(["extract", str(path), str(tmp_path / "o")]) == 0
    disk = tmp_path / "o" / "disk-big.raw"
    assert disk.stat().st_size == size
    assert disk.stat().st_blocks * 512 < 1 << 20
    with open(disk, "rb") as f:
        f.seek(100 * C + 7 * VMA_BLOCK_SIZE)
        assert f.read(VMA_BLOCK_SIZE) == block(9)


def test_extract_vmstate_is_faithful_and_truncated(tmp_path: Path) -> None:
    path = tmp_path / "v.vma"
    state = [Slot(2, 0, 0b1001, block(1) + block(2)), Slot(2, 1, 0), Slot(2, 2, 1, block(3))]
    path.write_bytes(
        header([("disk0", C), ("vmstate", 2 * C + 100)]) + extent([Slot(1, 0, 0), *state])
    )
    assert main(["extract", str(path), str(tmp_path / "o")]) == 0
    expect = block(1) + bytes(2 * 4096) + block(2) + bytes(12 * 4096) + bytes(C) + block(3)[:100]
    assert (tmp_path / "o" / "vmstate.bin").read_bytes() == expect
    # A size outside the last stored cluster: keep every stored byte.
    path.write_bytes(header([("disk0", C), ("vmstate", 9 * C)]) + extent([Slot(1, 0, 0), *state]))
    assert main(["extract", str(path), str(tmp_path / "p")]) == 0
    assert len((tmp_path / "p" / "vmstate.bin").read_bytes()) == 3 * C


def test_extract_selected_drives(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "d.vma"
    # disk1 lacks cluster 1 and repeats cluster 0: skipped, so no checks for it.
    path.write_bytes(
        header([("disk0", C), ("disk1", 2 * C)])
        + extent([Slot(1, 0, 1, block(4)), Slot(2, 0, 0), Slot(2, 0, 0)])
    )
    assert main(["extract", "-d", "disk0", str(path), str(tmp_path / "o")]) == 0
    assert sorted(os.listdir(tmp_path / "o")) == ["disk-disk0.raw", "qemu-server.conf"]
    assert main(["extract", "-d", "nope", str(path), str(tmp_path / "p")]) == 1
    assert "no device named 'nope'" in capsys.readouterr().err


def test_extract_failure_leaves_no_partial_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.vma"
    path.write_bytes(header() + extent([Slot(1, 0, 1, block(1)), Slot(1, 1, 0), Slot(1, 3, 0)]))
    out = tmp_path / "o"
    assert main(["extract", str(path), str(out)]) == 1
    assert (
        capsys.readouterr().err == "restore failed - detected missing cluster 2 for stream disk0\n"
    )
    assert os.listdir(out) == ["qemu-server.conf"]
    path.write_bytes(header() + extent([Slot(1, c, 0) for c in range(4)]) + b"junk")
    assert main(["extract", str(path), str(tmp_path / "p")]) == 1
    assert capsys.readouterr().err == "restore failed - read short extent (4 bytes)\n"
    assert os.listdir(tmp_path / "p") == ["qemu-server.conf"]


def test_extract_write_failure_in_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # extract writes from a worker thread while it reads on: a failed write still
    # ends it with the reason, and no disk image is left.
    import errno

    import nbdvma.tools.extract as tools

    img = tmp_path / "a.raw"
    mixed_image(img, 8)
    arch = tmp_path / "a.vma"
    assert main(["create", str(arch), str(img)]) == 0
    assert "not whole 512-byte sectors" in capsys.readouterr().err  # padded, and said
    real = tools.pwrite_all
    calls = [0]

    def fail_fifth(fd: int, views: list[bytes], offset: int) -> None:
        calls[0] += 1
        if calls[0] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, views, offset)

    monkeypatch.setattr(tools, "pwrite_all", fail_fifth)
    out = tmp_path / "o"
    assert main(["extract", str(arch), str(out)]) == 1
    err = capsys.readouterr().err
    assert err == "restore failed - write failed: No space left on device\n"
    assert os.listdir(out) == []
    assert calls[0] == 5


def test_extract_without_preallocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # extract allocates each range before writing it, and stops trying where the file
    # system cannot: the result is the same, holes included.
    import nbdvma.vma.fileio as fileio

    img = tmp_path / "a.raw"
    mixed_image(img, 9)
    arch = tmp_path / "a.vma"
    assert main(["create", str(arch), str(img)]) == 0
    for name, fallocate in (("with", fileio._fallocate), ("without", None)):
        monkeypatch.setattr(fileio, "_fallocate", fallocate)
        out = tmp_path / name
        assert main(["extract", str(arch), str(out)]) == 0
        data = img.read_bytes()
        restored = out / "disk-disk0.raw"
        assert restored.read_bytes() == data.ljust(-(-len(data) // 512) * 512, b"\0")
        # Sparse: no more blocks than the image's own data need.
        assert restored.stat().st_blocks <= img.stat().st_blocks


def test_extract_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.vma"
    path.write_bytes(
        header(configs=[("disk-disk0.raw", b"config")]) + extent([Slot(1, c, 0) for c in range(4)])
    )
    assert main(["extract", str(path), str(tmp_path / "o")]) == 1
    assert "File exists" in capsys.readouterr().err
    assert (tmp_path / "o" / "disk-disk0.raw").read_bytes() == b"config"
    assert os.listdir(tmp_path / "o") == ["disk-disk0.raw"]


def test_extract_rejects_bad_names_and_existing_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "x.vma"
    path.write_bytes(
        header(configs=[("../evil", b"x")]) + extent([Slot(1, c, 0) for c in range(4)])
    )
    assert main(["extract", str(path), str(tmp_path / "o")]) == 1
    assert "invalid config name '../evil'" in capsys.readouterr().err
    assert not (tmp_path / "evil").exists()
    assert main(["extract", str(path), str(tmp_path)]) == 1
    assert capsys.readouterr().err == "unable to create target directory File exists\n"


# ----------------------------------------------------------------------- subprocess


def test_stdin_and_zstd(two_disks: tuple[Path, bytes, bytes], tmp_path: Path) -> None:
    path, a, _ = two_disks
    raw = path.read_bytes()
    listed = run("list", "-", stdin=raw)
    assert listed.returncode == 0
    assert listed.stdout.decode().startswith("CFG: size: ")
    packed = zstandard.ZstdCompressor().compress(raw)
    assert run("verify", "-", stdin=packed).returncode == 0
    zst = tmp_path / "a.vma.zst"
    zst.write_bytes(packed)
    proc = run("extract", str(zst), str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "disk-drive-scsi0.raw").read_bytes() == a


def test_extract_v_into_a_closed_pipe_blames_no_disk(tmp_path: Path) -> None:
    """``extract -v … | head -1``: stdout broke, not the disk: no "write failed" line,
    a failure status, and no restored file that looks complete."""
    path = tmp_path / "big.vma"
    slots = [Slot(1, c, 0xFFFF, block(c % 250 + 1) * 16) for c in range(400)]
    path.write_bytes(
        header([("drive-scsi0", 400 * C)])
        + b"".join(extent(slots[i : i + 58]) for i in range(0, 400, 58))
    )
    proc = subprocess.run(
        f"{NBDVMA} extract -v {path} {tmp_path / 'o'} | head -1",
        shell=True,
        capture_output=True,
        check=False,
        executable="/bin/bash",
    )
    assert proc.stdout.startswith(b"DEVINFO ")
    assert proc.stderr == b""
    assert not (tmp_path / "o" / "disk-drive-scsi0.raw").exists()


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_bytes(b"hello\n" * 5000)
    assert_clean_failure(run("list", str(text)), "not a vma file - wrong magic number")
    assert_clean_failure(run("verify", str(tmp_path / "missing.vma")), "No such file or directory")
    good = image_archive([("disk0", data_of(3 * C))])
    cut = tmp_path / "cut.vma"
    cut.write_bytes(good[:-1000])
    assert_clean_failure(run("verify", str(cut)), "verify failed - short vma extent")
    assert_clean_failure(
        run("extract", str(cut), str(tmp_path / "o")), "restore failed - short vma"
    )
    assert_clean_failure(run("list", str(tmp_path)), "")
    proc = run("frobnicate")
    assert proc.returncode == 1
    assert b"Traceback" not in proc.stderr


# ----------------------------------------------------------------------- create


def test_create_stores_a_proxmox_config_with_map_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Images named drive-KEY: the config is stored as qemu-server.conf whatever its
    file is called, with one map line per disk (what ``qmrestore`` needs)."""
    (tmp_path / "a.raw").write_bytes(data_of(C, 1))
    (tmp_path / "b.raw").write_bytes(data_of(2 * C, 2))
    conf = tmp_path / "100.conf"
    conf.write_bytes(b"memory: 512\r\nscsi0: local-lvm:vm-100-disk-0,size=64K\r\n")
    fw = tmp_path / "100.fw"
    fw.write_bytes(b"[OPTIONS]\nenable: 1\n")
    arch = tmp_path / "vzdump-qemu-100-2026_01_01-00_00_00.vma"
    argv = ["create", str(arch), "-c", str(conf), "-c", str(fw)]
    argv += [f"drive-scsi0={tmp_path}/a.raw", f"drive-virtio1={tmp_path}/b.raw"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err == (
        f"warning: the VM's disk virtio1 has no line in {conf}: Proxmox would restore it as "
        "an unused volume\n"
    )
    assert main(["config", str(arch), "-c", "qemu-server.conf"]) == 0
    stored = capsys.readouterr().out.encode()
    assert stored == (
        b"memory: 512\nscsi0: local-lvm:vm-100-disk-0,size=64K\n"
        b"#qmdump#map:scsi0:drive-scsi0:local-lvm::\n#qmdump#map:virtio1:drive-virtio1:::\n"
    )
    assert main(["config", str(arch), "-c", "qemu-server.fw"]) == 0
    assert capsys.readouterr().out == fw.read_text()
    _, devices = pverules.archive_devices(arch.read_bytes())
    assert pverules.restore_problems(stored, devices) == [
        "no config line for virtio1: its volume would be unused"
    ]
    # NAME=FILE still names it; two configs of one name are refused.
    named = tmp_path / "named.vma"
    assert (
        main(["create", str(named), "-c", f"my.conf={conf}", f"drive-scsi0={tmp_path}/a.raw"]) == 0
    )
    capsys.readouterr()
    assert main(["config", str(named), "-c", "my.conf"]) == 0
    assert capsys.readouterr().out.encode() == conf.read_bytes()
    twice = ["create", str(tmp_path / "t.vma"), "-c", str(conf), "-c", str(conf)]
    assert main([*twice, f"drive-scsi0={tmp_path}/a.raw"]) != 0
    assert "two configs would be stored as 'qemu-server.conf'" in capsys.readouterr().err
    assert not (tmp_path / "t.vma").exists()


def test_create_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = data_of(3 * C + 4608, 3)  # not a multiple of 64 KiB
    b = data_of(2 * C, 4)
    (tmp_path / "a.raw").write_bytes(a)
    (tmp_path / "b.raw").write_bytes(b)
    conf = tmp_path / "qemu-server.conf"
    conf.write_bytes(CONF)
    arch = tmp_path / "new.vma"
    argv = ["create", str(arch), str(tmp_path / "a.raw"), "-c", str(conf), f"efi={tmp_path}/b.raw"]
    assert main(argv) == 0
    assert not (tmp_path / "new.vma.part").exists()
    capsys.readouterr()
    assert main(["list", str(arch)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Every config is listed, as vma lists them: the data digest too, last.
    assert lines[:4] == [
        f"CFG: size: {len(CONF)} name: qemu-server.conf",
        "CFG: size: 93 name: nbdvma-digest",
        f"DEV: dev_id=1 size: {len(a)} devname: disk0",
        f"DEV: dev_id=2 size: {len(b)} devname: efi",
    ]
    assert main(["verify", "--strict", str(arch)]) == 0
    extents = arch.stat().st_size - header_size_of(arch.read_bytes())
    assert capsys.readouterr().out == f"data digest (blake3) verified over {extents} bytes\n"
    assert main(["extract", str(arch), str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "disk-disk0.raw").read_bytes() == a
    assert (tmp_path / "o" / "disk-efi.raw").read_bytes() == b
    assert (tmp_path / "o" / "qemu-server.conf").read_bytes() == CONF
    # The digest is checked, not restored: no file for it.
    assert sorted(os.listdir(tmp_path / "o")) == [
        "disk-disk0.raw",
        "disk-efi.raw",
        "qemu-server.conf",
    ]


@pytest.mark.parametrize("size", [1000, 4196, 65537, 70000])
def test_create_pads_a_partial_last_sector(tmp_path: Path, size: int) -> None:
    # Proxmox's reader rejects a block starting in a partial last sector, so create
    # rounds the device up to whole sectors (as QEMU reports a raw image's size).
    img = tmp_path / "odd.raw"
    img.write_bytes(data_of(size, 7))
    arch = tmp_path / "odd.vma"
    assert main(["create", str(arch), str(img)]) == 0
    assert main(["verify", "--strict", str(arch)]) == 0
    assert main(["extract", str(arch), str(tmp_path / "o")]) == 0
    padded = -(-size // 512) * 512
    assert (tmp_path / "o" / "disk-disk0.raw").read_bytes() == img.read_bytes().ljust(padded, b"\0")


def test_create_sparse_image_zstd_and_stdout(tmp_path: Path) -> None:
    img = tmp_path / "sparse.raw"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
        f.seek(5 << 20)
        f.write(b"data" * 3000)
        f.seek((64 << 20) - 10)
        f.write(b"end")
    arch = tmp_path / "s.vma.zst"
    assert main(["create", str(arch), str(img)]) == 0
    with open(arch, "rb") as f:
        assert f.read(4) == b"\x28\xb5\x2f\xfd"
    assert main(["extract", str(arch), str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "disk-disk0.raw").read_bytes() == img.read_bytes()
    proc = subprocess.run([NBDVMA, "create", "-", str(img)], capture_output=True, check=True)
    assert run("verify", "--strict", "-", stdin=proc.stdout).returncode == 0


def mixed_image(path: Path, seed: int) -> None:
    """Runs of data (some with zero 4 KiB blocks), holes and written zeros; odd tail."""
    rnd = random.Random(seed)
    with path.open("wb") as f:
        for _ in range(40):
            n = rnd.randrange(1, 40) * 4096
            kind = rnd.randrange(3)
            if kind == 0:
                data = bytearray(rnd.randbytes(n))
                k = rnd.randrange(n // 4096) * 4096
                data[k : k + 4096] = bytes(4096)
                f.write(data)
            elif kind == 1:
                f.seek(n, os.SEEK_CUR)
            else:
                f.write(bytes(n))
        f.write(rnd.randbytes(1234))


@pytest.mark.parametrize(
    ("window", "keep", "mapped"),
    [(64 * 1024, 1, True), (128 * 1024, 2, True), (1 << 20, 3, True), (192 * 1024, 2, False)],
)
@pytest.mark.parametrize("suffix", [".vma", ".vma.zst"])
def test_create_reads_images_through_windows(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    window: int,
    keep: int,
    mapped: bool,
    suffix: str,
) -> None:
    # create maps an image a window at a time and gives a window back only when the
    # writer and the sink's worker no longer read from it; small windows make every
    # image cross many of them.  Without mmap, windows are read into buffers.
    import nbdvma.tools.create as tools

    monkeypatch.setattr(tools, "_WINDOW", window)
    monkeypatch.setattr(tools, "_KEEP_WINDOWS", keep)
    if not mapped:

        def no_mmap(*args: object, **kwargs: object) -> None:
            raise OSError(19, "No such device")

        monkeypatch.setattr(tools.mmap, "mmap", no_mmap)
    imgs = [tmp_path / "a.raw", tmp_path / "b.raw"]
    mixed_image(imgs[0], 5)
    # Data, then written zeros longer than all kept windows, then data: the first
    # window's clusters still wait in the extent when it is due to be given back.
    imgs[1].write_bytes(data_of(3 * C + 4096, 11) + bytes(4 << 20) + data_of(5 * C, 12))
    # (.vma.zst: the extents are compressed behind, in a pool, and a window is given
    # back only once they are too.)
    arch = tmp_path / f"w{suffix}"
    assert main(["create", str(arch), *map(str, imgs)]) == 0
    assert main(["verify", "--strict", str(arch)]) == 0
    assert main(["extract", str(arch), str(tmp_path / "o")]) == 0
    for n, img in enumerate(imgs):
        data = img.read_bytes()
        padded = data.ljust(-(-len(data) // 512) * 512, b"\0")
        assert (tmp_path / "o" / f"disk-disk{n}.raw").read_bytes() == padded


def test_create_reports_an_image_that_shrinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A mapped file that shrinks would end the process with SIGBUS: each window
    # checks the size first.  The image is cut while its first window is read.
    import nbdvma.tools.create as tools

    monkeypatch.setattr(tools, "_WINDOW", 64 * 1024)
    img = tmp_path / "s.raw"
    img.write_bytes(data_of(8 * C, 3))
    real_write = VmaWriter.write

    def write_then_truncate(self: VmaWriter, *args: object, **kwargs: object) -> None:
        real_write(self, *args, **kwargs)  # type: ignore[arg-type]
        os.truncate(img, 2 * C)

    monkeypatch.setattr(VmaWriter, "write", write_then_truncate)
    arch = tmp_path / "s.vma"
    assert main(["create", str(arch), str(img)]) == 1
    assert capsys.readouterr().err == f"image {img}: it shrank while being read\n"
    assert not arch.exists()
    assert not (tmp_path / "s.vma.part").exists()


def test_create_write_failure_in_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Extents are written by a worker thread: its error ends create all the same.
    import errno

    import nbdvma.vma.sink as sink_module

    real = sink_module._write_all
    calls = [0]

    def fail_third(fd: int, parts: list[bytes]) -> int:
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, parts)

    monkeypatch.setattr(sink_module, "_write_all", fail_third)
    img = tmp_path / "f.raw"
    img.write_bytes(data_of(300 * C, 4))
    arch = tmp_path / "f.vma"
    assert main(["create", str(arch), str(img)]) == 1
    assert capsys.readouterr().err == "create failed - No space left on device\n"
    assert not arch.exists()
    assert not (tmp_path / "f.vma.part").exists()


def test_create_configs_only(tmp_path: Path) -> None:
    conf = tmp_path / "qemu-server.conf"
    conf.write_bytes(CONF)
    arch = tmp_path / "c.vma"
    assert main(["create", str(arch), "-c", str(conf)]) == 0
    assert main(["verify", str(arch)]) == 0


def test_create_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "a.raw"
    img.write_bytes(b"x" * 4096)
    arch = tmp_path / "a.vma"

    def fails(*argv: str, message: str) -> None:
        assert main(["create", str(arch), *argv]) == 1
        err = capsys.readouterr().err
        assert message in err, err
        assert err.count("\n") == 1, err
        assert not arch.exists()
        assert not (tmp_path / "a.vma.part").exists()

    fails(str(tmp_path / "missing.raw"), message="No such file or directory")
    fails(f"{'n' * 300}={img}", message="too long")
    fails(*[f"d{i}={img}" for i in range(255)], message="too many devices")
    big = tmp_path / "big.conf"
    big.write_bytes(b"#" * 70000)
    fails("-c", str(big), str(img), message="65535")
    fails("-c", str(tmp_path / "nope.conf"), str(img), message="nope.conf")
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    fails(str(empty), message="empty")
    fails(message="nothing to archive")
    fails(str(tmp_path), message="is not a regular file or block device")
    qcow2 = tmp_path / "q.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "1M"], check=True)
    fails(f"drive-scsi0={qcow2}", message="is qcow2, not raw: convert it first")
    vmdk = tmp_path / "v.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "1M"], check=True)
    fails(str(vmdk), message="is vmdk, not raw")
    arch.write_bytes(b"existing")
    assert main(["create", str(arch), str(img)]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert arch.read_bytes() == b"existing"


def test_create_says_it_pads_and_extract_refuses_an_empty_device_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = tmp_path / "a.raw"
    img.write_bytes(b"x" * 1000)
    arch = tmp_path / "a.vma"
    assert main(["create", str(arch), str(img)]) == 0
    assert capsys.readouterr().err == (
        f"warning: image {img} is 1000 bytes, not whole 512-byte sectors: stored as 1024, "
        "zeros at the end\n"
    )
    assert main(["extract", str(arch), str(tmp_path / "out"), "-d", ""]) == 1
    assert capsys.readouterr().err == "-d names no device: give drive-scsi0,drive-virtio1...\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("compressor", ["gzip", "lzop"])
def test_vzdump_gz_and_lzo_archives_are_read(
    tmp_path: Path, compressor: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """vzdump also writes .vma.gz and .vma.lzo: list, verify and extract read them."""
    disk = data_of(3 * C + 4096, 7)
    (tmp_path / "a.raw").write_bytes(disk)
    arch = tmp_path / "a.vma"
    assert main(["create", str(arch), f"drive-scsi0={tmp_path}/a.raw"]) == 0
    suffix = ".gz" if compressor == "gzip" else ".lzo"
    packed = tmp_path / f"a.vma{suffix}"
    subprocess.run([compressor, "-q", "-k", str(arch)], check=True)
    capsys.readouterr()
    assert main(["list", str(packed)]) == 0
    assert "devname: drive-scsi0" in capsys.readouterr().out
    assert main(["verify", str(packed)]) == 0
    assert main(["extract", str(packed), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "disk-drive-scsi0.raw").read_bytes() == disk
    # A cut archive fails with one line, whoever decompresses it.
    cut = tmp_path / f"cut.vma{suffix}"
    cut.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    capsys.readouterr()
    assert main(["verify", str(cut)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err


def test_a_changed_byte_in_a_zstd_archive_is_detected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Extent frames carry zstd's XXH64 content checksum (as the zstd CLI writes them):
    one flipped byte of data fails verify and extract, where plain VMA checks nothing."""
    (tmp_path / "a.raw").write_bytes(os.urandom(2 * 1024 * 1024))
    arch = tmp_path / "a.vma.zst"
    assert main(["create", str(arch), f"drive-scsi0={tmp_path}/a.raw"]) == 0
    listing = subprocess.run(["zstd", "-lv", str(arch)], capture_output=True, text=True)
    assert "Check: XXH64" in listing.stdout + listing.stderr
    data = bytearray(arch.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad = tmp_path / "bad.vma.zst"
    bad.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "read failed" in err
    assert main(["extract", str(bad), str(tmp_path / "out")]) == 1
    assert not list((tmp_path / "out").glob("disk-*.raw"))


def test_restored_files_are_owner_only(tmp_path: Path) -> None:
    """Like the archive (0600), what extract restores: disks, vmstate.bin, configs."""
    (tmp_path / "a.raw").write_bytes(data_of(C, 1))
    conf = tmp_path / "qemu-server.conf"
    conf.write_bytes(CONF)
    arch = tmp_path / "a.vma"
    w = VmaWriter(open_sink(str(arch)))
    w.add_config("qemu-server.conf", CONF)
    disk = w.add_device("drive-scsi0", C)
    state = w.add_stream()
    w.write(disk, 0, data_of(C, 1))
    w.append(state, b"QEVM" + bytes(100))
    w.finish()
    assert main(["extract", str(arch), str(tmp_path / "out")]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["disk-drive-scsi0.raw", "qemu-server.conf", "vmstate.bin"]
    for name in names:
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o600, name


# ----------------------------------------------------------------------- properties


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[int], list[tuple[int, int, int, bool]], bool]:
    """Devices (sizes), and a shuffled partition of each into data/zero/unwritten ranges."""
    sizes = draw(
        st.lists(
            st.one_of(
                st.integers(1, 6 * C // 512).map(lambda n: n * 512),
                st.sampled_from([C, 2 * C, 3 * C + 512, 8 * C + 4096]),
            ),
            min_size=1,
            max_size=3,
        )
    )
    ops: list[tuple[int, int, int, bool]] = []
    for dev, size in enumerate(sizes):
        cuts = sorted(set(draw(st.lists(st.integers(1, size - 1), max_size=6)) if size > 1 else []))
        bounds = [0, *cuts, size]
        for start, end in itertools.pairwise(bounds):
            kind = draw(st.sampled_from(["data", "zero", "skip"]))
            if kind != "skip":
                ops.append((dev, start, end, kind == "data"))
    order = draw(st.permutations(ops))
    return sizes, list(order), draw(st.booleans())


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_writer_then_extract_property(
    scenario: tuple[list[int], list[tuple[int, int, int, bool]], bool],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    sizes, ops, compress = scenario
    tmp = tmp_path_factory.mktemp("prop")
    arch = tmp / ("p.vma.zst" if compress else "p.vma")
    writer = VmaWriter(open_sink(str(arch)))
    ids = [writer.add_device(f"disk{i}", size) for i, size in enumerate(sizes)]
    model = [bytearray(size) for size in sizes]
    rnd = random.Random(len(ops))
    for dev, start, end, is_data in ops:
        if is_data:
            chunk = rnd.randbytes(end - start)
            model[dev][start:end] = chunk
            writer.write(ids[dev], start, chunk)
        else:
            writer.write_zeroes(ids[dev], start, end - start)
    writer.finish()
    assert main(["verify", "--strict", str(arch)]) == 0
    assert main(["extract", str(arch), str(tmp / "o")]) == 0
    for i, want in enumerate(model):
        assert (tmp / "o" / f"disk-disk{i}.raw").read_bytes() == bytes(want)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("command", ["create", "extract"])
def test_signal_mid_run_leaves_no_temporary_file(
    tmp_path: Path, sig: signal.Signals, command: str
) -> None:
    # Ctrl-C or a SIGTERM (an admin's kill, systemd stopping a unit) while create or
    # extract runs: the temporary files are removed, the exit status says why.
    img = tmp_path / "big.raw"
    img.write_bytes(data_of(64 << 20, 13))  # long enough to be caught mid-run
    arch = tmp_path / "big.vma"
    out = tmp_path / "out"
    if command == "extract":
        assert main(["create", str(arch), str(img)]) == 0
        argv = ["extract", str(arch), str(out)]
    else:
        argv = ["create", str(arch), str(img)]
    # The child is stopped as soon as its temporary file appears (64 MiB of work
    # still ahead), signalled, and continued: the signal lands mid-run.
    proc = subprocess.Popen([NBDVMA, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    temporary = (tmp_path / "big.vma.part") if command == "create" else (out / "tmp-disk-disk0.raw")
    deadline = time.monotonic() + 20
    while not temporary.exists() and time.monotonic() < deadline:
        time.sleep(0.0002)
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    err = proc.communicate(timeout=30)[1].decode()
    assert (proc.returncode, err) == (
        (130, "interrupted\n") if sig == signal.SIGINT else (143, "terminated\n")
    )
    assert not (tmp_path / "big.vma.part").exists()
    if command == "extract":
        assert os.listdir(out) == []
    else:
        assert not arch.exists()


@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=3),
    batches=st.lists(st.integers(0, 70), min_size=1, max_size=40),
)
def test_progress_lines_do_not_depend_on_batching(sizes: list[int], batches: list[int]) -> None:
    """Counting an extent's clusters at once prints the lines of one-by-one counting."""
    disks = [DeviceInfo(i, f"d{i}", n * VMA_CLUSTER_SIZE) for i, n in enumerate(sizes, 1)]

    def lines(steps: list[int]) -> list[str]:
        out = io.StringIO()
        progress = Progress(None, disks, out)  # type: ignore[arg-type]  # totals() unused
        for n in steps:
            progress.update(n)
        # The duration is the one part that depends on the clock.
        return [line.split(", duration")[0] for line in out.getvalue().splitlines()]

    one_by_one = lines([1] * sum(batches))
    assert lines(batches) == one_by_one
    if sum(sizes) and sum(batches) >= sum(sizes):
        assert f"progress 100% (read {sum(sizes) * VMA_CLUSTER_SIZE} bytes" in one_by_one


def test_tool_errors_join_the_one_hierarchy() -> None:
    # ToolError lives in nbdvma.errors with every other error, and nbdvma.tools still
    # exports it for the command line; its message and status are what main prints.
    from nbdvma import errors, tools

    assert tools.ToolError is errors.ToolError
    exc = errors.ToolError("unable to find configuration data 'x'", 255)
    assert isinstance(exc, errors.NbdvmaError)
    assert (str(exc), exc.message, exc.status) == (exc.message, exc.args[0], 255)
    assert errors.ToolError("m").status == 1


def test_create_and_extract_start_every_thread_with_signals_deferred(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The VMA core knows no signals: the tools hand it interrupts.deferred, inside
    # which each worker and write-back thread is started (a Ctrl-C in between would
    # leave a thread, or a file, that nobody cleans up).
    import contextlib
    import threading
    from collections.abc import Iterator

    import nbdvma.tools.create as create
    import nbdvma.tools.extract as extract

    depth = [0]
    started: list[tuple[str, bool]] = []
    real_start = threading.Thread.start

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    def start(self: threading.Thread) -> None:
        started.append((self.name.split("-")[0], depth[0] > 0))
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(create, "deferred", guard)
    monkeypatch.setattr(extract, "deferred", guard)
    img = tmp_path / "a.raw"
    img.write_bytes(data_of(320 * C, 5))  # past a write-back step of 8 MiB
    arch = tmp_path / "a.vma"
    assert main(["create", str(arch), str(img)]) == 0
    assert main(["extract", str(arch), str(tmp_path / "o")]) == 0
    assert sorted(set(started)) == [("nbdvma", True), ("vma", True), ("writeback", True)]
