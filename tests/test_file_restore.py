"""File-level restore, as docs/restore.md tells it: one file out of a guest's ext4
partition in an archive, without restoring the disk.

The chain is all userspace, so it runs where the kernel has no ``nbd`` module (this
machine): ``nbdvma export`` serves the disk read-only; ``nbdkit --filter=partition``
serves its first partition; ``nbdfuse`` shows that as a file (FUSE); ``debugfs`` reads
files out of the ext4 in it.  The guest disk is made the way a guest's looks: a GPT
with an ext4 partition (``nbdkit partitioning``), holding a text file and a directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from servehelpers import nbdvma, poll_until, run_tool

pytestmark = pytest.mark.interop


@pytest.fixture
def background() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``background(args, stderr_path)``: a child killed (and waited for) at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], stderr_path: Path) -> subprocess.Popen[bytes]:
        with stderr_path.open("wb") as err:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_one_file_out_of_a_guest_partition_through_the_export(
    sockdir: Path,
    workdir: Path,
    nbdkit: str,
    qemu_img: str,
    tool: Callable[[str], str],
    background: Callable[..., subprocess.Popen[bytes]],
) -> None:
    nbdfuse, debugfs, mke2fs = tool("nbdfuse"), tool("debugfs"), tool("mke2fs")
    # The guest's files, an ext4 of them, and a disk with that as its GPT partition 1.
    stage = workdir / "stage"
    (stage / "etc").mkdir(parents=True)
    (stage / "etc" / "hostname").write_text("guest-100\n")
    wanted = os.urandom(200_000)
    (stage / "etc" / "blob.bin").write_bytes(wanted)
    (stage / "greeting.txt").write_text("hello from the guest\n")
    fs = workdir / "fs.ext4"
    run_tool([mke2fs, "-q", "-t", "ext4", "-d", str(stage), str(fs), "16M"])
    disk = workdir / "disk.raw"
    run_tool(
        [
            *(nbdkit, "-U", "-", "partitioning", str(fs), "partition-type=gpt"),
            *("--run", f'{qemu_img} convert -q -f raw -O raw "$uri" {disk}'),
        ]
    )
    archive = workdir / "vzdump-qemu-100-2026_12_03-10_00_00.vma"
    nbdvma("create", str(archive), f"drive-scsi0={disk}")

    # 1. The archive's disk, read-only over NBD.
    export_sock = sockdir / "export.sock"
    background(
        [
            *(sys.executable, "-m", "nbdvma", "export", str(archive)),
            *("--listen", f"unix:{export_sock}", "--pid-file", str(workdir / "export.pid")),
        ],
        workdir / "export.err",
    )
    poll_until(lambda: (workdir / "export.pid").exists(), 30, "export's pid file")
    # 2. Its first partition, as an export of its own.
    part_sock = sockdir / "part.sock"
    background(
        [
            *(nbdkit, "-f", "-U", str(part_sock), "--filter=partition", "nbd"),
            *(f"socket={export_sock}", "export=drive-scsi0", "partition=1"),
        ],
        workdir / "nbdkit.err",
    )
    poll_until(part_sock.exists, 30, "nbdkit's socket")
    # 3. That partition as a file, through FUSE (no nbd kernel module needed).
    mnt = workdir / "mnt"
    mnt.mkdir()
    fuse = background(
        [nbdfuse, "-r", f"{mnt}/part1", f"nbd+unix:///?socket={part_sock}"],
        workdir / "nbdfuse.err",
    )
    try:
        poll_until((mnt / "part1").exists, 30, "nbdfuse's file")
        assert (mnt / "part1").stat().st_size == fs.stat().st_size
        # 4. Files out of the ext4, without mounting it.
        greeting = run_tool([debugfs, "-R", "cat /greeting.txt", str(mnt / "part1")])
        assert greeting.stdout == "hello from the guest\n"
        out = workdir / "restored"
        out.mkdir()
        run_tool([debugfs, "-R", f"rdump /etc {out}", str(mnt / "part1")])
        assert (out / "etc" / "hostname").read_text() == "guest-100\n"
        assert (out / "etc" / "blob.bin").read_bytes() == wanted
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        fuse.wait(10)
    # The archive was only read.
    nbdvma("verify", str(archive))
