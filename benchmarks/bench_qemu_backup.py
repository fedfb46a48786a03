"""QEMU ``blockdev-backup`` into ``nbdvma serve`` vs into ``qemu-nbd``; ``serve --compress
zstd`` vs ``qemu-img convert -c`` (zstd qcow2) and ``zstd -3``.  Side by side in one run.

Both NBD servers get the same job from the same paused QEMU (one ``blockdev-add`` of an
``nbd`` node, ``blockdev-backup`` sync=full, ``BLOCK_JOB_COMPLETED``, ``blockdev-del``,
which flushes the target and disconnects), so they differ only in what they do with
the writes: ``serve`` writes a VMA archive, ``qemu-nbd -f raw -t`` a sparse raw file.
Timed from the ``blockdev-add`` to the finished archive (serve has exited: fsync,
rename) or to the answer to ``blockdev-del`` (qemu-nbd has fdatasynced the file).

Why CPU seconds as well as time: on a disk, both servers mostly wait for it (and the
disk of a shared VM swings 2x from one run to the next); with the targets on a tmpfs
(``--tmpfs``: the benchmark mounts one and unmounts it; or ``--target-dir`` of your own)
writes cost memory copies only, so the time and CPU seconds are the servers' own.
"server CPU s" is user + system of the server process (all its threads), from
``wait4``, start-up included (the "start-up" column is the part used before the job
began, read from ``/proc``); "CPU s/GiB" divides it by the disk's size.  "QEMU CPU s"
is what QEMU used during the job (the same job for both servers: not a target).

Workloads (``--workloads``):

* ``mixed``: the disk of ``bench_backup.py`` (``make_disk``: per 8 MiB, 4 MiB random,
  1 MiB stored zeros, 2 MiB hole with a 4 KiB block every 256 KiB, 1 MiB hole);
* ``files``: a 3 GiB ext4 image of real files, ``mke2fs -q -t ext4 -d DIR IMAGE 3G``
  with DIR a tmpfs staging copy of ``/usr/lib/x86_64-linux-gnu`` and ``/usr/share``
  (compressible, like a real guest).  Built once and kept in ``--workdir``.

Sections (``--sections``):

* ``backup``: each workload into serve (VMA) and into qemu-nbd (raw).  Targets (tmpfs):
  time <= 1.0x qemu-nbd's; CPU s/GiB <= 1.2x qemu-nbd's.  On disk: time <= 1.0x.
* ``compress`` (the ``files`` workload): ``serve --compress zstd`` fed by the same
  ``blockdev-backup`` (how serve is used; the row the targets use), fed by ``qemu-img
  convert -n`` (the same client as the reference, for comparison), against ``qemu-img
  convert -c -O qcow2 -o compression_type=zstd -m 2 -W`` of the image, and ``zstd -3
  -T0`` / ``-T1`` of the raw image for the size.  Targets: serve's time <= 1.0x
  qemu-img's; its archive <= 1.05x the smaller ``zstd -3`` output.

Every figure is the median of ``--runs`` runs (``--warmup`` rounds before are not
counted); the order of the contestants rotates from run to run.  Source images are on
the disk of ``--workdir`` (read once before the runs, so QEMU reads them from the page
cache), or copied into the tmpfs with ``--source-tmpfs``.  Needs root for the mounts.

    B=benchmarks/bench_qemu_backup.py W=/var/tmp/nbdvma-bench
    .venv/bin/python $B --tmpfs --runs 3 --workdir $W      # targets on a tmpfs
    .venv/bin/python $B --runs 3 --workdir $W              # targets on the disk of $W
    .venv/bin/python $B --tmpfs --size 256M --files-size 512M --files-from /usr/share/doc \\
        --runs 1 --warmup 0                                # a quick try
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import attrs
import trio
from bench_backup import make_disk
from benchlib import (
    GiB,
    MiB,
    Usage,
    cpu_so_far,
    fmt_runs,
    kill,
    reap,
    rotated_rounds,
    terminate,
    tmpfs,
    work_dirs,
)
from benchlib import verdict as _verdict
from benchlib import wait_for as _wait_for

from nbdvma.qmp import QmpClient
from nbdvma.units import format_bytes, parse_size

BLOCK = 4096
START_TIMEOUT = 30.0
JOB_TIMEOUT = 3600.0
FILES_FROM = "/usr/lib/x86_64-linux-gnu,/usr/share"
QCOW2_ZSTD = ["-c", "-O", "qcow2", "-o", "compression_type=zstd", "-m", "2", "-W"]

TIME_TARGET = 1.0
CPU_TARGET = 1.2
ZSTD_TIME_TARGET = 1.0
ZSTD_SIZE_TARGET = 1.05


# -- source images ------------------------------------------------------------------------


@attrs.frozen
class Image:
    """A source image: its path, size, and non-zero 4 KiB blocks (its real data)."""

    name: str
    path: Path
    size: int
    nonzero: int

    @property
    def gib(self) -> float:
        return self.size / GiB


def count_nonzero(path: Path) -> int:
    """Non-zero 4 KiB blocks of ``path`` (holes skipped with SEEK_DATA/SEEK_HOLE)."""
    zero_chunk = bytes(4 * MiB)
    zero_block = bytes(BLOCK)
    count = 0
    with path.open("rb") as f:
        fd = f.fileno()
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            stop = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < stop:
                chunk = os.pread(fd, min(4 * MiB, stop - pos), pos)
                if chunk != zero_chunk[: len(chunk)]:
                    view = memoryview(chunk)
                    for i in range(0, len(chunk), BLOCK):
                        if view[i : i + BLOCK] != zero_block[: len(view[i : i + BLOCK])]:
                            count += 1
                pos += len(chunk)
    return count


def cached_image(path: Path, size: int, build: Callable[[Path], None]) -> Image:
    """``path`` if it was built before with this size (a ``.json`` beside it says so),
    else ``build(tmp)`` and rename; with its non-zero block count."""
    meta = path.with_name(path.name + ".json")
    if path.exists() and meta.exists():
        info = json.loads(meta.read_text())
        if info.get("size") == size and path.stat().st_size == size:
            return Image(path.stem, path, size, int(info["nonzero"]))
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        build(tmp)
        if tmp.stat().st_size != size:
            raise RuntimeError(f"{tmp}: {tmp.stat().st_size} bytes, wanted {size}")
        nonzero = count_nonzero(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.rename(path)
    meta.write_text(json.dumps({"size": size, "nonzero": nonzero}))
    return Image(path.stem, path, size, nonzero)


def build_files_image(tmp: Path, size: int, dirs: Sequence[Path]) -> None:
    """``mke2fs -q -t ext4 -d STAGING tmp SIZE``; STAGING is a tmpfs with a copy of each
    of ``dirs`` at its own path (``mke2fs -d`` takes one directory).  A copy, not bind
    mounts: removing a staging tree must never reach into /usr."""
    with tmpfs(size, prefix="nbdvma-bench-staging-") as staging:
        for d in dirs:
            dest = staging / d.relative_to("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", str(d), str(dest)], check=True)
        du = subprocess.run(
            ["du", "-sh", str(staging)], check=True, capture_output=True, text=True
        ).stdout.split()[0]
        print(f"staging copy of {', '.join(map(str, dirs))}: {du}", flush=True)
        subprocess.run(
            ["mke2fs", "-q", "-t", "ext4", "-d", str(staging), str(tmp), f"{size // 1024}k"],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )


def mixed_image(work: Path, size: int) -> Image:
    """The mixed disk of ``bench_backup.py``, kept in ``work``."""
    return cached_image(work / f"mixed-{size}.raw", size, lambda tmp: _make_disk(tmp, size))


def _make_disk(path: Path, size: int) -> None:
    make_disk(path, size)


def files_image(work: Path, size: int, dirs: Sequence[Path]) -> Image:
    """The real-files ext4 image, kept in ``work``."""
    return cached_image(
        work / f"files-{size}.ext4", size, lambda tmp: build_files_image(tmp, size, dirs)
    )


def read_through(path: Path) -> None:
    """Read ``path`` once, into the page cache."""
    buf = bytearray(8 * MiB)
    with path.open("rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def copy_sparse(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


# -- QEMU -------------------------------------------------------------------------------------


@attrs.frozen
class Qemu:
    """A paused QEMU with each image as virtio-blk disk ``scsiN`` (node ``diskN``)."""

    proc: subprocess.Popen[bytes]
    qmp_address: str
    devices: dict[str, str]  # image name -> node name

    @classmethod
    @contextmanager
    def start(cls, images: Sequence[Image], sockdir: Path) -> Iterator[Qemu]:
        sock = sockdir / "qmp.sock"
        args = [
            *("qemu-system-x86_64", "-S", "-nodefaults", "-display", "none"),
            *("-machine", "q35", "-accel", "tcg", "-m", "128", "-smp", "1"),
            *("-qmp", f"unix:{sock},server=on,wait=off"),
        ]
        devices = {}
        for i, image in enumerate(images):
            args += [
                # Read-only: the backup only reads, and qemu-img may then open it too.
                *("-blockdev", f"driver=file,filename={image.path},node-name=file{i},read-only=on"),
                *("-blockdev", f"driver=raw,file=file{i},node-name=disk{i},read-only=on"),
                *("-device", f"virtio-blk-pci,drive=disk{i},id=scsi{i}"),
            ]
            devices[image.name] = f"disk{i}"
        proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
        try:
            _wait_for(sock.exists, START_TIMEOUT, "QEMU's QMP socket")
            time.sleep(0.2)
            yield cls(proc, f"unix:{sock}", devices)
        finally:
            kill(proc)


async def _backup_job(
    qmp_address: str, device: str, sock: Path, export: str = "drive-scsi0"
) -> tuple[float, float]:
    """``blockdev-add`` of an nbd node on ``sock`` (export ``export``), a full
    ``blockdev-backup`` of ``device`` into it, ``blockdev-del``; the ``perf_counter``
    at the ``blockdev-add`` and at the answer to ``blockdev-del``."""
    async with QmpClient.connect(qmp_address) as qmp:
        events = qmp.events()
        start = time.perf_counter()
        await qmp.execute(
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "benchtgt",
                "file": {
                    "driver": "nbd",
                    "server": {"type": "unix", "path": str(sock)},
                    "export": export,
                },
            },
        )
        # On a failure or Ctrl-C before the job's end, the node stays: QEMU is killed
        # at the end of the benchmark anyway.
        await qmp.execute(
            "blockdev-backup",
            {"job-id": "benchjob", "device": device, "target": "benchtgt", "sync": "full"},
        )
        event = await events.wait(
            "BLOCK_JOB_COMPLETED", match={"device": "benchjob"}, timeout=JOB_TIMEOUT
        )
        await qmp.execute("blockdev-del", {"node-name": "benchtgt"}, timeout=600)
        if "error" in event.data:
            raise RuntimeError(f"blockdev-backup failed: {event.data['error']}")
        return start, time.perf_counter()


def backup_job(
    qemu: Qemu, image: Image, sock: Path, export: str = "drive-scsi0"
) -> tuple[float, float, float]:
    """Run the job; (start, end of ``blockdev-del``, QEMU's CPU seconds meanwhile)."""
    cpu0 = cpu_so_far(qemu.proc.pid)
    start, end = trio.run(_backup_job, qemu.qmp_address, qemu.devices[image.name], sock, export)
    return start, end, cpu_so_far(qemu.proc.pid) - cpu0


# -- one timed run of each contestant ------------------------------------------------------


@attrs.frozen
class Run:
    """One run of one contestant.

    ``cpu``: the server's (or the tool's) CPU seconds; ``startup``: of those, before the
    job began; ``client_cpu``: QEMU's during the job, or the ``qemu-img`` client's;
    ``out``: bytes of the archive / target file (allocated bytes for a sparse raw file);
    ``system``: the part of ``cpu`` spent in the kernel.
    """

    wall: float
    cpu: float
    startup: float = 0.0
    client_cpu: float = 0.0
    rss: int = 0
    out: int = 0
    system: float = 0.0


@attrs.frozen
class Ctx:
    """What a contestant needs: the work and target directories, QEMU."""

    qemu: Qemu
    sockdir: Path
    targets: Path


def _start_serve(
    ctx: Ctx, archive: Path, image: Image, *extra: str
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    sock = ctx.sockdir / "serve.sock"
    sock.unlink(missing_ok=True)
    log = ctx.sockdir / "serve.err"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-P", "-m", "nbdvma", "serve", str(archive)),
                *("--disk", f"drive-scsi0={image.size}", "--listen", f"unix:{sock}", *extra),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        _wait_for(
            lambda: b"listening on" in log.read_bytes() or proc.poll() is not None,
            START_TIMEOUT,
            "serve",
        )
        if proc.returncode is not None:
            raise RuntimeError(f"serve did not start: {log.read_text()}")
    except BaseException:
        kill(proc)
        raise
    return proc, sock, log


def _finish_serve(
    proc: subprocess.Popen[bytes], log: Path, archive: Path
) -> tuple[Usage, float, int]:
    """Wait for serve to exit by itself; its usage, the time it exited, the archive's
    size (the archive is then deleted)."""
    usage = reap(proc)
    end = time.perf_counter()
    if proc.returncode != 0 or not archive.exists():
        raise RuntimeError(f"serve failed ({proc.returncode}): {log.read_text()}")
    size = archive.stat().st_size
    archive.unlink()
    return usage, end, size


def _serve_args(compress: bool) -> tuple[str, list[str]]:
    return ("bench.vma.zst", ["--compress", "zstd"]) if compress else ("bench.vma", [])


def serve_backup(ctx: Ctx, image: Image, compress: bool = False) -> Run:
    """blockdev-backup into ``serve``, from ``blockdev-add`` to serve's exit."""
    name, extra = _serve_args(compress)
    archive = ctx.targets / name
    archive.unlink(missing_ok=True)
    proc, sock, log = _start_serve(ctx, archive, image, *extra)
    try:
        startup = cpu_so_far(proc.pid)
        start, _, qemu_cpu = backup_job(ctx.qemu, image, sock)
        usage, end, size = _finish_serve(proc, log, archive)
    finally:
        kill(proc)
    return Run(end - start, usage.cpu, startup, qemu_cpu, usage.maxrss, size, usage.system)


def serve_convert(ctx: Ctx, image: Image, compress: bool = False) -> Run:
    """``qemu-img convert -n`` of the image into ``serve``, from the start of qemu-img to
    serve's exit."""
    name, extra = _serve_args(compress)
    archive = ctx.targets / name
    archive.unlink(missing_ok=True)
    proc, sock, log = _start_serve(ctx, archive, image, *extra)
    try:
        startup = cpu_so_far(proc.pid)
        start = time.perf_counter()
        client = subprocess.Popen(
            [
                *("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image.path)),
                f"nbd+unix:///drive-scsi0?socket={sock}",
            ]
        )
        try:
            client_usage = reap(client, JOB_TIMEOUT)
        finally:
            kill(client)
        if client.returncode != 0:
            raise RuntimeError("qemu-img convert into serve failed")
        usage, end, size = _finish_serve(proc, log, archive)
    finally:
        kill(proc)
    return Run(end - start, usage.cpu, startup, client_usage.cpu, usage.maxrss, size, usage.system)


def qemu_nbd_backup(ctx: Ctx, image: Image) -> Run:
    """blockdev-backup into ``qemu-nbd -f raw -t`` writing a sparse raw file, from
    ``blockdev-add`` to the answer to ``blockdev-del`` (the target's flush included)."""
    target = ctx.targets / "target.raw"
    target.unlink(missing_ok=True)
    with target.open("wb") as f:
        f.truncate(image.size)
    sock = ctx.sockdir / "qemu-nbd.sock"
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            *("qemu-nbd", "-f", "raw", "-t", "--shared=0", "-x", "drive-scsi0"),
            *("-k", str(sock), str(target)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(sock.exists, START_TIMEOUT, "qemu-nbd")
        startup = cpu_so_far(proc.pid)
        start, end, qemu_cpu = backup_job(ctx.qemu, image, sock)
        usage = terminate(proc)
    finally:
        kill(proc)
    size = target.stat().st_blocks * 512
    target.unlink()
    return Run(end - start, usage.cpu, startup, qemu_cpu, usage.maxrss, size, usage.system)


def tool_run(ctx: Ctx, args: list[str], out: Path) -> Run:
    """A command writing ``out``: wall time, its CPU seconds and peak RSS, output size."""
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        usage = reap(proc, JOB_TIMEOUT)
    finally:
        kill(proc)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode})")
    size = out.stat().st_size
    out.unlink()
    return Run(wall, usage.cpu, rss=usage.maxrss, out=size, system=usage.system)


def qemu_img_qcow2_zstd(ctx: Ctx, image: Image) -> Run:
    out = ctx.targets / "bench.qcow2"
    return tool_run(
        ctx, ["qemu-img", "convert", "-f", "raw", *QCOW2_ZSTD, str(image.path), str(out)], out
    )


def zstd3(threads: int) -> Callable[[Ctx, Image], Run]:
    def run(ctx: Ctx, image: Image) -> Run:
        out = ctx.targets / "bench.raw.zst"
        return tool_run(
            ctx, ["zstd", "-q", "-3", f"-T{threads}", str(image.path), "-o", str(out)], out
        )

    return run


# -- the rounds and the tables ------------------------------------------------------------------


@attrs.frozen
class Contestant:
    key: str
    label: str
    run: Callable[[Ctx, Image], Run]


def rounds(
    ctx: Ctx, image: Image, contestants: Sequence[Contestant], runs: int, warmup: int, what: str
) -> dict[str, list[Run]]:
    """:func:`~benchlib.rotated_rounds` of the contestants on ``image``."""
    by_key = {c.key: c for c in contestants}
    return rotated_rounds(
        list(by_key),
        runs,
        warmup,
        lambda key, _: by_key[key].run(ctx, image),
        lambda result: f"{result.wall:.2f}s/{result.cpu:.2f} CPU s",
        what,
    )


def med(runs: list[Run], field: str) -> float:
    return statistics.median(float(getattr(r, field)) for r in runs)


def med_user(runs: list[Run]) -> float:
    """The median of the runs' user-space CPU seconds."""
    return statistics.median(r.cpu - r.system for r in runs)


def print_backup_table(image: Image, res: dict[str, list[Run]], where: str) -> list[bool]:
    """The table of one workload, per-run figures, ratios and target lines."""
    n = len(res["serve"])
    print(
        f"\n{image.name}: {format_bytes(image.size)} disk, "
        f"{format_bytes(image.nonzero * BLOCK)} non-zero; targets {where}; median of {n}\n"
    )
    print(
        "| blockdev-backup into | s | MiB/s | server CPU s | of it system s | CPU s/GiB "
        "| start-up CPU s | QEMU CPU s | peak RSS MiB | output |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    labels = {"serve": "nbdvma serve (VMA)", "qemu-nbd": "qemu-nbd (raw)"}
    for key, runs in res.items():
        wall, cpu = med(runs, "wall"), med(runs, "cpu")
        print(
            f"| {labels[key]} | {wall:.2f} | {image.size / MiB / wall:.0f} | {cpu:.2f} "
            f"| {med(runs, 'system'):.2f} | {cpu / image.gib:.2f} | {med(runs, 'startup'):.2f} "
            f"| {med(runs, 'client_cpu'):.2f} | {med(runs, 'rss') / MiB:.0f} "
            f"| {format_bytes(int(med(runs, 'out')))} |"
        )
    print(
        "\n(output: the archive's size; qemu-nbd's, the blocks its raw file allocated: on a\n"
        "tmpfs, which has no FALLOC_FL_ZERO_RANGE, the ranges QEMU zeroes are written as\n"
        "zeros; on ext4 they become unwritten extents)"
    )
    for key, runs in res.items():
        print(
            f"  {key} per run: s {fmt_runs([r.wall for r in runs])}; "
            f"CPU s {fmt_runs([r.cpu for r in runs])}; "
            f"system s {fmt_runs([r.system for r in runs])}"
        )
    s, q = res["serve"], res["qemu-nbd"]
    t_ratio = med(s, "wall") / med(q, "wall")
    c_ratio = med(s, "cpu") / med(q, "cpu")
    per_run = ", ".join(f"{a.wall / b.wall:.2f}" for a, b in zip(s, q, strict=True))
    per_run_cpu = ", ".join(f"{a.cpu / b.cpu:.2f}" for a, b in zip(s, q, strict=True))
    print(
        f"time serve / qemu-nbd: {t_ratio:.2f}x (target <= {TIME_TARGET:.1f}x): "
        f"{_verdict(t_ratio <= TIME_TARGET)}  [per run {per_run}]"
    )
    print(
        f"CPU s/GiB serve / qemu-nbd: {c_ratio:.2f}x (target <= {CPU_TARGET:.1f}x): "
        f"{_verdict(c_ratio <= CPU_TARGET)}  [per run {per_run_cpu}]"
    )
    # The kernel's share moves with the machine (on a VM whose host takes freed memory
    # back, the same tmpfs write cost 0.4-1.3 s/GiB from one minute to the next), and
    # qemu-nbd writes the zeros too: the user-space part alone, for the software's cost.
    user_ratio = med_user(s) / med_user(q)
    per_run_user = ", ".join(
        f"{(a.cpu - a.system) / (b.cpu - b.system):.2f}" for a, b in zip(s, q, strict=True)
    )
    print(f"user CPU serve / qemu-nbd (no target): {user_ratio:.2f}x  [per run {per_run_user}]")
    overhead = med(s, "out") - image.nonzero * BLOCK
    print(
        f"archive vs non-zero 4 KiB blocks: {overhead:+,.0f} bytes "
        f"({100 * overhead / max(1, image.nonzero * BLOCK):+.3f}%)"
    )
    return [t_ratio <= TIME_TARGET, c_ratio <= CPU_TARGET]


def print_compress_table(
    image: Image, res: dict[str, list[Run]], labels: dict[str, str], where: str
) -> list[bool]:
    n = len(res["serve-bb"])
    zmin = min(med(res["zstd-T0"], "out"), med(res["zstd-T1"], "out"))
    print(
        f"\n{image.name} compressed: {format_bytes(image.size)} disk, "
        f"{format_bytes(image.nonzero * BLOCK)} non-zero; outputs {where}; median of {n}\n"
    )
    print(
        "| contestant | s | MiB/s | CPU s | CPU s/GiB | client CPU s | peak RSS MiB "
        "| output bytes | / zstd -3 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, runs in res.items():
        wall, cpu, out = med(runs, "wall"), med(runs, "cpu"), med(runs, "out")
        client = f"{med(runs, 'client_cpu'):.2f}" if key.startswith("serve") else ""
        print(
            f"| {labels[key]} | {wall:.2f} | {image.size / MiB / wall:.0f} | {cpu:.2f} "
            f"| {cpu / image.gib:.2f} | {client} | {med(runs, 'rss') / MiB:.0f} "
            f"| {out:,.0f} | {out / zmin:.3f} |"
        )
    print("\n(client CPU s: QEMU's during the backup job, or qemu-img convert -n's)")
    for key, runs in res.items():
        print(
            f"  {key} per run: s {fmt_runs([r.wall for r in runs])}; "
            f"CPU s {fmt_runs([r.cpu for r in runs])}; "
            f"system s {fmt_runs([r.system for r in runs])}"
        )
    t_ratio = med(res["serve-bb"], "wall") / med(res["qcow2"], "wall")
    s_ratio = med(res["serve-bb"], "out") / zmin
    print(
        f"time serve --compress zstd (blockdev-backup) / qemu-img convert -c qcow2 zstd: "
        f"{t_ratio:.2f}x (target <= {ZSTD_TIME_TARGET:.1f}x): "
        f"{_verdict(t_ratio <= ZSTD_TIME_TARGET)}"
    )
    print(
        f"archive / zstd -3 (smaller of -T0, -T1): {s_ratio:.3f}x "
        f"(target <= {ZSTD_SIZE_TARGET:.2f}x): {_verdict(s_ratio <= ZSTD_SIZE_TARGET)}"
    )
    return [t_ratio <= ZSTD_TIME_TARGET, s_ratio <= ZSTD_SIZE_TARGET]


def load() -> str:
    """The load averages (1, 5, 15 minutes): the machine is shared."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    """Parse the options, build or reuse the images, run the sections, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=2 * GiB, help="mixed disk (2G)")
    parser.add_argument("--files-size", type=parse_size, default=3 * GiB, help="ext4 image (3G)")
    parser.add_argument(
        "--files-from", default=FILES_FROM, help=f"directories copied into it ({FILES_FROM})"
    )
    parser.add_argument("--workloads", default="mixed,files", help="mixed,files")
    parser.add_argument("--sections", default="backup,compress", help="backup,compress")
    parser.add_argument("--runs", type=int, default=3, help="counted runs (3)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted rounds first (1)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--tmpfs", action="store_true", help="targets on a tmpfs mounted here")
    where.add_argument("--target-dir", type=Path, help="targets in this directory")
    parser.add_argument(
        "--source-tmpfs", action="store_true", help="copy the sources into the tmpfs too"
    )
    parser.add_argument("--workdir", type=Path, help="keeps the images (default: a temp dir)")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    sections = [s for s in args.sections.split(",") if s]
    if set(workloads) - {"mixed", "files"} or set(sections) - {"backup", "compress"}:
        parser.error("unknown workload or section")
    if "compress" in sections and "files" not in workloads:
        parser.error("the compress section needs the files workload")
    if args.source_tmpfs and not args.tmpfs:
        parser.error("--source-tmpfs needs --tmpfs")
    for tool in ("qemu-system-x86_64", "qemu-img", "qemu-nbd", "zstd", "mke2fs"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    dirs = [Path(d) for d in args.files_from.split(",") if d]

    print(f"load average before: {load()}", flush=True)
    with ExitStack() as stack:
        work, sockdir = work_dirs(stack, args.workdir, "qbackup")

        images: dict[str, Image] = {}
        for w in workloads:
            t0 = time.monotonic()
            if w == "mixed":
                images[w] = mixed_image(work, args.size)
            else:
                images[w] = files_image(work, args.files_size, dirs)
            img = images[w]
            print(
                f"{w}: {img.path} ({format_bytes(img.size)}, "
                f"{format_bytes(img.nonzero * BLOCK)} non-zero) ready in "
                f"{time.monotonic() - t0:.1f}s",
                flush=True,
            )

        if args.tmpfs:
            biggest = max(i.size for i in images.values())
            sources = sum(i.nonzero * BLOCK + 64 * MiB for i in images.values())
            size = biggest + 512 * MiB + (sources if args.source_tmpfs else 0)
            targets = stack.enter_context(tmpfs(size))
            where_t = f"on a tmpfs ({format_bytes(size)}, {targets})"
        else:
            targets = args.target_dir or work
            targets.mkdir(parents=True, exist_ok=True)
            where_t = f"in {targets}"
        if args.source_tmpfs:
            for w, img in images.items():
                copy = targets / "src" / img.path.name
                copy.parent.mkdir(exist_ok=True)
                copy_sparse(img.path, copy)
                images[w] = attrs.evolve(img, path=copy)
            where_t += ", sources on it too"
        else:
            for img in images.values():
                read_through(img.path)
            where_t += ", sources on disk (page cache warm)"
        print(f"targets {where_t}", flush=True)

        qemu = stack.enter_context(Qemu.start(list(images.values()), sockdir))
        ctx = Ctx(qemu, sockdir, targets)
        verdicts: list[bool] = []
        if "backup" in sections:
            pair = [
                Contestant("serve", "serve", serve_backup),
                Contestant("qemu-nbd", "qemu-nbd", qemu_nbd_backup),
            ]
            for w, img in images.items():
                res = rounds(ctx, img, pair, args.runs, args.warmup, w)
                verdicts += print_backup_table(img, res, where_t)
                print(flush=True)
        if "compress" in sections:
            img = images["files"]
            contestants = [
                Contestant(
                    "serve-bb",
                    "blockdev-backup -> serve --compress zstd",
                    lambda c, i: serve_backup(c, i, compress=True),
                ),
                Contestant(
                    "serve-convert",
                    "qemu-img convert -n -> serve --compress zstd",
                    lambda c, i: serve_convert(c, i, compress=True),
                ),
                Contestant(
                    "qcow2",
                    "qemu-img convert " + " ".join(QCOW2_ZSTD),
                    qemu_img_qcow2_zstd,
                ),
                Contestant("zstd-T0", "zstd -3 -T0 (raw image)", zstd3(0)),
                Contestant("zstd-T1", "zstd -3 -T1 (raw image)", zstd3(1)),
            ]
            res = rounds(ctx, img, contestants, args.runs, args.warmup, "compress")
            labels = {c.key: c.label for c in contestants}
            verdicts += print_compress_table(img, res, labels, where_t)
    print(f"\nload average after: {load()}")
    print("all targets met" if all(verdicts) else "TARGET MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
