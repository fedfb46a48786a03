"""Archives straight into S3 (SeaweedFS on this machine): the defaults, and the issue's target.

1. ``--sweep``: ``nbdcopy --connections=1 --requests=64 --request-size=1M`` of a random
   image through ``nbdvma serve`` into ``s3://bench/x.vma``, for each part size and
   concurrency given (``PART:CONCURRENCY``, e.g. ``8M:4``): seconds, MiB/s, peak RSS of
   serve (``wait4``) and of ``weed`` (``VmHWM``; a fresh SeaweedFS per run, so that
   each peak is its own).  Chooses ``DEFAULT_PART_SIZE`` / ``DEFAULT_CONCURRENCY`` of
   ``nbdvma.s3.sink`` (set in the serve process for the run).
2. ``--compare``: ``nbdvma backup`` of the mixed disk of ``bench_backup.py`` from a
   paused QEMU into ``s3://bench/`` vs into a local file vs boto3's ``upload_file``
   (s3transfer, its default config) of that finished file, side by side.  Targets:
   S3 time <= local + upload_file, and <= 1.2x upload_file.

    .venv/bin/python benchmarks/bench_s3.py --sweep 8M:2,8M:4,16M:4 --size 1G
    .venv/bin/python benchmarks/bench_s3.py --compare --size 2G
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_backup import make_disk
from benchlib import cpu_so_far, kill, reap

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from s3server import SeaweedServer  # noqa: E402

from nbdvma.units import format_bytes, parse_size  # noqa: E402

MiB = 1 << 20
#: Runs nbdvma with the sink's defaults set from the environment, for the sweep.
_SERVE = """
import os, sys
import nbdvma.s3.sink as sink
sink.DEFAULT_PART_SIZE = int(os.environ["BENCH_PART"])
sink.DEFAULT_CONCURRENCY = int(os.environ["BENCH_CONCURRENCY"])
from nbdvma.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _hwm(pid: int) -> int:
    """Peak RSS of a running process (``VmHWM``), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _wait_listening(err: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while "listening on" not in err.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"serve did not start: {err.read_text()}")
        time.sleep(0.02)


def sweep(work: Path, size: int, configs: list[tuple[int, int]]) -> None:
    """Part 1: serve into S3 per (part size, concurrency)."""
    image = work / "random.raw"
    with image.open("wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
    print("| part | in flight | s | MiB/s | serve peak RSS | weed peak RSS |")
    print("|---|---|---|---|---|---|")
    for part, concurrency in configs:
        server = SeaweedServer(work / f"weed-{part}-{concurrency}")
        endpoint = server.start()
        try:
            endpoint.client().create_bucket(Bucket="bench")
            sock = work / "serve.sock"
            err = work / "serve.err"
            env = endpoint.env(BENCH_PART=str(part), BENCH_CONCURRENCY=str(concurrency))
            with err.open("wb") as e:
                proc = subprocess.Popen(
                    [
                        *(sys.executable, "-c", _SERVE, "serve", "s3://bench/x.vma"),
                        *("--disk", f"d0={size}", "--listen", f"unix:{sock}"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=e,
                    env=env,
                )
            try:
                _wait_listening(err, proc)
                start = time.monotonic()
                subprocess.run(
                    [
                        *("nbdcopy", "--connections=1", "--requests=64", f"--request-size={MiB}"),
                        *(str(image), f"nbd+unix:///d0?socket={sock}"),
                    ],
                    check=True,
                )
                usage = reap(proc)
            finally:
                kill(proc)
            seconds = time.monotonic() - start
            weed = _hwm(server.pid)
            if proc.returncode:
                raise RuntimeError(f"serve failed: {err.read_text()}")
            print(
                f"| {part // MiB} MiB | {concurrency} | {seconds:.2f} | {size / MiB / seconds:.0f} "
                f"| {usage.maxrss / MiB:.0f} MiB | {weed / MiB:.0f} MiB |",
                flush=True,
            )
        finally:
            server.stop()
            shutil.rmtree(work / f"weed-{part}-{concurrency}", ignore_errors=True)


def compare(work: Path, size: int) -> None:
    """Part 2: backup into S3 vs into a file vs upload_file of that file."""
    disk = work / "disk.raw"
    make_disk(disk, size)
    server = SeaweedServer(work / "weed")
    endpoint = server.start()
    qemu = None
    try:
        client = endpoint.client()
        client.create_bucket(Bucket="bench")
        qmp = work / "qmp.sock"
        qemu = subprocess.Popen(
            [
                *("qemu-system-x86_64", "-S", "-nodefaults", "-display", "none"),
                *("-machine", "q35", "-accel", "tcg", "-m", "128", "-smp", "1"),
                *("-qmp", f"unix:{qmp},server=on,wait=off"),
                *("-blockdev", f"driver=file,filename={disk},node-name=file0"),
                *("-blockdev", "driver=raw,file=file0,node-name=disk0"),
                *("-device", "virtio-blk-pci,drive=disk0,id=scsi0"),
            ],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not qmp.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU did not start")
            time.sleep(0.05)
        time.sleep(0.2)
        rows = []
        for target in ("s3://bench/vm.vma", str(work / "vm.vma")):
            weed0, qemu0 = cpu_so_far(server.pid), cpu_so_far(qemu.pid)
            start = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "nbdvma", "backup", "--qmp", f"unix:{qmp}", target],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=endpoint.env(),
            )
            usage = reap(proc)
            seconds = time.monotonic() - start
            if proc.returncode:
                assert proc.stderr is not None
                raise RuntimeError(f"backup failed: {proc.stderr.read().decode()}")
            # CPU seconds of everyone involved: nbdvma, QEMU, the S3 server.
            cpu = (usage.cpu, cpu_so_far(qemu.pid) - qemu0, cpu_so_far(server.pid) - weed0)
            rows.append((f"nbdvma backup -> {target.split(':')[0]}", seconds, usage.maxrss, cpu))
        weed_backup = _hwm(server.pid)
        weed0, me0 = cpu_so_far(server.pid), resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        client.upload_file(str(work / "vm.vma"), "bench", "uploaded.vma")
        upload = time.monotonic() - start
        me1 = resource.getrusage(resource.RUSAGE_SELF)
        me = me1.ru_utime - me0.ru_utime + me1.ru_stime - me0.ru_stime
        upload_cpu = (me, 0.0, cpu_so_far(server.pid) - weed0)
        weed = _hwm(server.pid)
    finally:
        if qemu is not None:
            qemu.kill()
            qemu.wait()
        server.stop()
    archive = (work / "vm.vma").stat().st_size
    print(f"\nmixed disk {format_bytes(size)}, archive {format_bytes(archive)}")
    # On this machine the S3 server shares the two cores: the sum of everyone's CPU
    # seconds over two is a floor under the time of any schedule of the same work.
    print("| | s | peak RSS | CPU s: nbdvma (or boto3) / QEMU / weed | sum | sum / 2 cores |")
    print("|---|---:|---:|---|---:|---:|")

    def cpu_cols(cpu: tuple[float, float, float]) -> str:
        return f"{cpu[0]:.1f} / {cpu[1]:.1f} / {cpu[2]:.1f} | {sum(cpu):.1f} | {sum(cpu) / 2:.1f}"

    for name, seconds, rss, cpu in rows:
        print(f"| {name} | {seconds:.2f} | {rss / MiB:.0f} MiB | {cpu_cols(cpu)} |")
    print(f"| boto3 upload_file of the local archive | {upload:.2f} | | {cpu_cols(upload_cpu)} |")
    print(
        f"| weed peak RSS (after the backups / after upload_file) | | "
        f"{weed_backup / MiB:.0f} / {weed / MiB:.0f} MiB | | | |"
    )
    s3, local = rows[0][1], rows[1][1]
    print(
        f"\nS3 {s3:.2f}s vs local + upload_file {local + upload:.2f}s "
        f"({s3 / (local + upload):.2f}x, target <= 1.0x)"
    )
    print(f"S3 {s3:.2f}s vs upload_file {upload:.2f}s ({s3 / upload:.2f}x, target <= 1.2x)")


def _config(text: str) -> tuple[int, int]:
    part, _, concurrency = text.partition(":")
    return parse_size(part), int(concurrency or 4)


def main() -> int:
    """Run the parts asked for."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="image size (1G)")
    parser.add_argument("--sweep", help="PART:CONCURRENCY,... (e.g. 8M:2,8M:4,16M:4)")
    parser.add_argument("--compare", action="store_true", help="backup: S3, file, upload_file")
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-s3-", dir=args.dir))
    try:
        if args.sweep:
            sweep(work, args.size, [_config(c) for c in args.sweep.split(",")])
        if args.compare:
            compare(work, args.size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
