"""``nbdvma backup`` vs ``blockdev-backup`` into ``qemu-nbd`` writing a raw file.

One paused QEMU with one mixed disk (data, holes, stored zeros, scattered 4 KiB
blocks) is backed up alternately by both, ``--runs`` times each; both timings include
the final flush (nbdvma: archive finished and fsynced; qemu-nbd: ``blockdev-del``, which
flushes the target, answered).  Prints a table, the time ratio (target <= 1.0x) and the
archive's size against the source's non-zero 4 KiB blocks (target <= +0.1%).

    .venv/bin/python benchmarks/bench_backup.py --size 2G
    .venv/bin/python benchmarks/bench_backup.py --size 64M --runs 1     # a quick try
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from nbdvma.qmp import QmpClient
from nbdvma.units import format_bytes, parse_size

MiB = 1 << 20
BLOCK = 4096


def make_disk(path: Path, size: int) -> int:
    """Write the mixed disk; return its number of non-zero 4 KiB blocks.

    Per 8 MiB: 4 MiB of random data, 1 MiB of stored zeros, 2 MiB hole with one 4 KiB
    data block every 256 KiB, 1 MiB hole.
    """
    rnd = os.urandom(4 * MiB + BLOCK)
    nonzero = 0
    with path.open("wb") as f:
        f.truncate(size)
        for base in range(0, size, 8 * MiB):
            n = min(4 * MiB, size - base)
            shift = (base // (8 * MiB)) % BLOCK
            f.seek(base)
            f.write(rnd[shift : shift + n])
            nonzero += -(-n // BLOCK)
            if base + 5 * MiB <= size:
                f.seek(base + 4 * MiB)
                f.write(bytes(MiB))
            for off in range(base + 5 * MiB, min(base + 7 * MiB, size - BLOCK + 1), 256 * 1024):
                f.seek(off)
                f.write(rnd[off % MiB : off % MiB + BLOCK])
                nonzero += 1
        f.flush()
        os.fsync(f.fileno())
    return nonzero


async def qmp_backup_to_qemu_nbd(qmp_address: str, sock: Path) -> None:
    """``blockdev-add`` + ``blockdev-backup`` into qemu-nbd, until ``blockdev-del``."""
    async with QmpClient.connect(qmp_address) as qmp:
        await qmp.execute(
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "benchtgt",
                "file": {
                    "driver": "nbd",
                    "server": {"type": "unix", "path": str(sock)},
                    "export": "drive-scsi0",
                },
            },
        )
        events = qmp.events()
        await qmp.execute(
            "blockdev-backup",
            {"job-id": "benchjob", "device": "disk0", "target": "benchtgt", "sync": "full"},
        )
        event = await events.wait("BLOCK_JOB_COMPLETED", timeout=3600)
        if "error" in event.data:
            raise RuntimeError(f"blockdev-backup failed: {event.data['error']}")
        await qmp.execute("blockdev-del", {"node-name": "benchtgt"}, timeout=600)


def run_qemu_nbd(work: Path, qmp_address: str, size: int) -> float:
    target = work / "target.raw"
    target.unlink(missing_ok=True)
    with target.open("wb") as f:
        f.truncate(size)
    sock = work / "qemu-nbd.sock"
    pidfile = work / "qemu-nbd.pid"
    subprocess.run(
        [
            *("qemu-nbd", "-f", "raw", "-t", "--shared=0", "-x", "drive-scsi0", "-k", str(sock)),
            *("--fork", f"--pid-file={pidfile}", str(target)),
        ],
        check=True,
    )
    try:
        start = time.monotonic()
        trio.run(qmp_backup_to_qemu_nbd, qmp_address, sock)
        return time.monotonic() - start
    finally:
        os.kill(int(pidfile.read_text()), 15)
        target.unlink(missing_ok=True)


def run_nbdvma(work: Path, qmp_address: str) -> tuple[float, int]:
    archive = work / "bench.vma"
    archive.unlink(missing_ok=True)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-P", "-m", "nbdvma", "backup", "--qmp", qmp_address, str(archive)],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        raise RuntimeError(f"nbdvma backup failed: {result.stderr}")
    size = archive.stat().st_size
    archive.unlink()
    return elapsed, size


def main() -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=parse_size, default=2 << 30, help="disk size (2G)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (3)")
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-backup-", dir=args.dir))
    qemu = None
    try:
        disk = work / "disk.raw"
        t0 = time.monotonic()
        nonzero = make_disk(disk, args.size)
        print(
            f"disk {format_bytes(args.size)}: {nonzero} non-zero 4 KiB blocks "
            f"({format_bytes(nonzero * BLOCK)}), made in {time.monotonic() - t0:.1f}s",
            flush=True,
        )
        qmp_address = f"unix:{work / 'qmp.sock'}"
        qemu = subprocess.Popen(
            [
                *("qemu-system-x86_64", "-S", "-nodefaults", "-display", "none"),
                *("-machine", "q35", "-accel", "tcg", "-m", "128", "-smp", "1"),
                *("-qmp", f"{qmp_address},server=on,wait=off"),
                *("-blockdev", f"driver=file,filename={disk},node-name=file0"),
                *("-blockdev", "driver=raw,file=file0,node-name=disk0"),
                *("-device", "virtio-blk-pci,drive=disk0,id=scsi0"),
            ],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not (work / "qmp.sock").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU did not start")
            time.sleep(0.05)
        time.sleep(0.2)
        ours: list[float] = []
        theirs: list[float] = []
        archive_size = 0
        for run in range(args.runs):
            t, archive_size = run_nbdvma(work, qmp_address)
            ours.append(t)
            theirs.append(run_qemu_nbd(work, qmp_address, args.size))
            print(f"run {run + 1}: nbdvma {ours[-1]:.2f}s, qemu-nbd {theirs[-1]:.2f}s", flush=True)
        mib = args.size / MiB
        ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
        print()
        print(f"| {format_bytes(args.size)} mixed disk, median of {args.runs} | s | MiB/s |")
        print("|---|---|---|")
        print(f"| nbdvma backup (VMA archive) | {ours_s:.2f} | {mib / ours_s:.0f} |")
        print(f"| blockdev-backup -> qemu-nbd (raw) | {theirs_s:.2f} | {mib / theirs_s:.0f} |")
        print(f"\nratio nbdvma / qemu-nbd: {ours_s / theirs_s:.2f}x (target <= 1.0x)")
        payload = nonzero * BLOCK
        over = archive_size - payload
        print(
            f"archive {archive_size} bytes vs non-zero 4 KiB blocks {payload} bytes: "
            f"{over:+d} ({100 * over / payload:+.3f}%, target <= +0.1%)"
        )
    finally:
        if qemu is not None:
            qemu.kill()
            qemu.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
