"""Restore of a 2 GiB mixed archive into qcow2: through ``nbdvma export``, through
``qemu-nbd -r`` on the raw source (the same transport: the peer), ``nbdvma extract``,
``nbdvma restore --format qcow2``, and ``qemu-img convert`` of the source (the floor);
then the time to first byte of ``export`` on a 64 GiB sparse archive.

Each round runs every contestant once, the order rotating between rounds; ``--warmup``
rounds (1) are not counted, and the outputs of the first are checked with ``qemu-img
compare`` against the source (outside the timing).  Medians; per-run figures printed.
Target: through the export at most 1.0x the time through qemu-nbd.

    W=/var/tmp/nbdvma-rbench
    .venv/bin/python benchmarks/bench_restore.py --tmpfs --runs 3 --workdir $W
    .venv/bin/python benchmarks/bench_restore.py --size 256M --big-size 4G --runs 1
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import attrs
from bench_export import _image as sparse_image
from bench_qemu_backup import Image, cached_image, copy_sparse, load, mixed_image, read_through
from benchlib import (
    GiB,
    MiB,
    Usage,
    fmt_runs,
    kill,
    reap,
    rotated_rounds,
    terminate,
    tmpfs,
    verdict,
    wait_for,
    work_dirs,
)

from nbdvma.units import format_bytes, parse_size

BLOCK = 4096
TIME_TARGET = 1.0
START_TIMEOUT = 600.0
DEVICE = "drive-scsi0"
NBDVMA = [sys.executable, "-P", "-m", "nbdvma"]
QCOW2 = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"]

# A real client's first READ, with libnbd (Debian's python3-nbd, so /usr/bin/python3):
# connect every 2 ms until the server answers, then read 4 KiB at 0.
FIRST_READ = """
import sys, time, nbd
uri = sys.argv[1]
deadline = time.monotonic() + float(sys.argv[2])
while True:
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
    except nbd.Error:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.002)
        continue
    h.pread(4096, 0)
    h.shutdown()
    break
"""


@attrs.frozen
class Run:
    """One contestant's run: wall seconds; the server's (or the tool's) CPU seconds and
    peak RSS; the client's CPU seconds; export's index time; the output's allocation;
    for a server, the seconds from its readiness (pid file) to the client's end."""

    wall: float
    cpu: float
    rss: int
    client_cpu: float | None = None
    index: float | None = None
    out: int = 0
    serving: float | None = None


@attrs.frozen
class Ctx:
    sockdir: Path
    targets: Path
    source: Image
    verify: bool = False


def vm_hwm(pid: int) -> int:
    """Peak RSS of a running process (``VmHWM``: since its exec, unlike ``ru_maxrss``)."""
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert match is not None
    return int(match[1]) * 1024


def allocated(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in ([path] if path.is_file() else path.iterdir()))


def compare(source: Path, out: Path, fmt: str) -> None:
    """``qemu-img compare`` (outside the timing): the restored disk equals the source."""
    result = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "raw", "-F", fmt, str(source), str(out)],
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{out} differs from {source} (qemu-img compare: {result.returncode})")
    print(f"  checked: {out.name} equals the source", flush=True)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _convert_from(ctx: Ctx, server: list[str], pidfile: Path, sock: Path, err: Path) -> Run:
    """Start ``server``, wait for its pid file, ``qemu-img convert`` the export into a
    qcow2, stop the server: wall time from the server's start to qemu-img's end."""
    out = ctx.targets / "out.qcow2"
    remove(out)
    pidfile.unlink(missing_ok=True)
    sock.unlink(missing_ok=True)
    proc = client = None
    try:
        with err.open("wb") as e:
            start = time.perf_counter()
            proc = subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=e)
        wait_for(lambda: pidfile.exists() or proc.poll() is not None, START_TIMEOUT, server[0])
        if proc.returncode is not None:
            raise RuntimeError(f"{' '.join(server)} failed: {err.read_text()}")
        ready = time.perf_counter()
        client = subprocess.Popen(
            [*QCOW2, f"nbd+unix:///{DEVICE}?socket={sock}", str(out)],
            stdout=subprocess.DEVNULL,
        )
        cusage = reap(client)
        end = time.perf_counter()
        wall, serving = end - start, end - ready
        if client.returncode != 0:
            raise RuntimeError(f"qemu-img convert from {server[0]} failed")
        hwm = vm_hwm(proc.pid)
        usage = terminate(proc)
    finally:
        kill(client)
        kill(proc)
    match = re.search(r"archive read in ([\d.]+)s", err.read_text())
    if ctx.verify:
        compare(ctx.source.path, out, "qcow2")
    size = allocated(out)
    remove(out)
    index = float(match[1]) if match else None
    return Run(wall, usage.cpu, hwm, cusage.cpu, index, size, serving)


def export_convert(archive: Path) -> Callable[[Ctx], Run]:
    def run(ctx: Ctx) -> Run:
        sock, pidfile = ctx.sockdir / "export.sock", ctx.sockdir / "export.pid"
        return _convert_from(
            ctx,
            [
                *NBDVMA,
                "export",
                str(archive),
                "--listen",
                f"unix:{sock}",
                "--pid-file",
                str(pidfile),
            ],
            pidfile,
            sock,
            ctx.sockdir / "export.err",
        )

    return run


def _qemu_nbd(image: Path, sock: Path) -> list[str]:
    """``qemu-nbd`` serving ``image`` read-only as ``DEVICE`` on ``sock``, persistent."""
    return ["qemu-nbd", "-r", "-t", "-f", "raw", "-x", DEVICE, "-k", str(sock), str(image)]


def qemu_nbd_convert(ctx: Ctx) -> Run:
    sock, pidfile = ctx.sockdir / "qemu-nbd.sock", ctx.sockdir / "qemu-nbd.pid"
    return _convert_from(
        ctx,
        [*_qemu_nbd(ctx.source.path, sock), "--pid-file", str(pidfile)],
        pidfile,
        sock,
        ctx.sockdir / "qemu-nbd.err",
    )


def _tool(ctx: Ctx, args: list[str], out: Path, result: Path, fmt: str) -> Run:
    """A command writing ``out`` (a file or a new directory): wall time, CPU seconds
    (``wait4``: with its waited-for children's, e.g. restore's qemu-img) and peak RSS
    (GNU time's ``%M``: the largest of the command and its children; through time, a
    small process, because a child's ``ru_maxrss`` starts at its parent's, this
    script's ~40 MiB)."""
    remove(out)
    rss_file = ctx.sockdir / "rss"
    err = ctx.sockdir / "tool.err"
    start = time.perf_counter()
    with err.open("wb") as e:
        proc = subprocess.Popen(
            ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *args],
            stdout=subprocess.DEVNULL,
            stderr=e,
        )
    try:
        usage: Usage = reap(proc)
    finally:
        kill(proc)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {err.read_text()}")
    rss = int(rss_file.read_text().split()[-1]) * 1024
    if ctx.verify:
        compare(ctx.source.path, result, fmt)
    size = allocated(out)
    remove(out)
    return Run(wall, usage.cpu, rss, out=size)


def extract(archive: Path) -> Callable[[Ctx], Run]:
    def run(ctx: Ctx) -> Run:
        out = ctx.targets / "extracted"
        args = [*NBDVMA, "extract", str(archive), str(out)]
        return _tool(ctx, args, out, out / f"disk-{DEVICE}.raw", "raw")

    return run


def restore_qcow2(archive: Path) -> Callable[[Ctx], Run]:
    def run(ctx: Ctx) -> Run:
        out = ctx.targets / "restored"
        args = [*NBDVMA, "restore", str(archive), str(out), "--format", "qcow2"]
        return _tool(ctx, args, out, out / f"disk-{DEVICE}.qcow2", "qcow2")

    return run


def floor(ctx: Ctx) -> Run:
    out = ctx.targets / "floor.qcow2"
    return _tool(ctx, [*QCOW2, str(ctx.source.path), str(out)], out, out, "qcow2")


@attrs.frozen
class Contestant:
    key: str
    label: str
    run: Callable[[Ctx], Run]


def rounds(
    ctx: Ctx, contestants: Sequence[Contestant], runs: int, warmup: int
) -> dict[str, list[Run]]:
    """:func:`~benchlib.rotated_rounds` of the contestants; the first round's outputs
    are compared with the source."""
    by_key = {c.key: c for c in contestants}
    return rotated_rounds(
        list(by_key),
        runs,
        warmup,
        lambda key, r: by_key[key].run(attrs.evolve(ctx, verify=r == 0)),
        lambda result: f"{result.wall:.2f}s",
    )


def med(runs: list[Run], field: str) -> float | None:
    values = [getattr(r, field) for r in runs if getattr(r, field) is not None]
    return statistics.median(values) if values else None


def print_table(
    image: Image, contestants: Sequence[Contestant], res: dict[str, list[Run]], where: str
) -> bool:
    n = len(next(iter(res.values())))
    print(
        f"\n{format_bytes(image.size)} mixed disk ({format_bytes(image.nonzero * BLOCK)} "
        f"non-zero), outputs {where}; median of {n}:\n"
    )
    print(
        "| restore | s | MiB/s | index s | CPU s (server/tool) | peak RSS (server/tool) "
        "| qemu-img client CPU s | output allocated | runs s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")

    def f(v: float | None, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    for c in contestants:
        runs = res[c.key]
        wall = med(runs, "wall")
        assert wall is not None
        rss = med(runs, "rss")
        print(
            f"| {c.label} | {wall:.2f} | {image.size / MiB / wall:.0f} | "
            f"{f(med(runs, 'index'), '.2f')} | {f(med(runs, 'cpu'), '.2f')} | "
            f"{format_bytes(int(rss or 0))} | {f(med(runs, 'client_cpu'), '.2f')} | "
            f"{format_bytes(int(med(runs, 'out') or 0))} | {fmt_runs([r.wall for r in runs])} |"
        )
    ex = res["export"]
    qn = res["qemu-nbd"]
    ratio = statistics.median(r.wall for r in ex) / statistics.median(r.wall for r in qn)
    per_run = " ".join(f"{a.wall / b.wall:.2f}" for a, b in zip(ex, qn, strict=True))
    print(
        f"\nexport -> qemu-img / qemu-nbd -r -> qemu-img: **{ratio:.2f}x** "
        f"(per run {per_run}; target <= {TIME_TARGET:.1f}x): {verdict(ratio <= TIME_TARGET)}"
    )
    serving = [(a.serving, b.serving) for a, b in zip(ex, qn, strict=True)]
    if all(a is not None and b is not None for a, b in serving):
        # The same runs, from each server's readiness on: the cost of serving alone,
        # without export's start-up and index pass (which qemu-nbd does not have).
        s_ratio = statistics.median(a or 0 for a, _ in serving) / statistics.median(
            b or 0 for _, b in serving
        )
        print(
            f"serving alone (server ready -> qemu-img done): export "
            f"{statistics.median(a or 0 for a, _ in serving):.2f} s, qemu-nbd "
            f"{statistics.median(b or 0 for _, b in serving):.2f} s: **{s_ratio:.2f}x** "
            f"(per run {' '.join(f'{(a or 0) / (b or 1):.2f}' for a, b in serving)})"
        )
    return ratio <= TIME_TARGET


# -- time to first byte -----------------------------------------------------------------------


def first_read(ctx: Ctx, server: list[str], sock: Path, err: Path) -> tuple[float, float | None]:
    """Seconds from starting ``server`` until a libnbd client's first READ is answered
    (the client polls from the start); export's own "archive read in" figure."""
    sock.unlink(missing_ok=True)
    proc = client = None
    try:
        with err.open("wb") as e:
            start = time.perf_counter()
            proc = subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=e)
        client = subprocess.Popen(
            [
                "/usr/bin/python3",
                "-c",
                FIRST_READ,
                f"nbd+unix:///{DEVICE}?socket={sock}",
                str(START_TIMEOUT),
            ],
        )
        reap(client, START_TIMEOUT + 10, poll=0.001)
        wall = time.perf_counter() - start
        if client.returncode != 0:
            raise RuntimeError(f"first read from {server[0]} failed: {err.read_text()}")
        terminate(proc)
    finally:
        kill(client)
        kill(proc)
    match = re.search(r"archive read in ([\d.]+)s", err.read_text())
    return wall, float(match[1]) if match else None


def ttfb(ctx: Ctx, work: Path, size: int, runs: int) -> None:
    image = cached_image(work / f"sparse-{size}.raw", size, lambda tmp: sparse_image(tmp, size))
    archive = work / f"sparse-{size}.vma"
    if not archive.exists():
        tmp = archive.with_name(archive.name + ".tmp.vma")
        subprocess.run([*NBDVMA, "create", str(tmp), f"{DEVICE}={image.path}"], check=True)
        tmp.rename(archive)
    read_through(archive)
    sock = ctx.sockdir / "ttfb.sock"
    servers = {
        "export": [*NBDVMA, "export", str(archive), "--listen", f"unix:{sock}"],
        "qemu-nbd": _qemu_nbd(image.path, sock),
    }
    times: dict[str, list[float]] = {k: [] for k in servers}
    index: list[float] = []
    for r in range(runs + 1):
        for key in list(servers) if r % 2 == 0 else list(reversed(servers)):
            wall, idx = first_read(ctx, servers[key], sock, ctx.sockdir / f"ttfb-{key}.err")
            if r:
                times[key].append(wall)
                if idx is not None:
                    index.append(idx)
    print(
        f"\ntime to first byte, {format_bytes(size)} sparse image "
        f"({format_bytes(image.nonzero * BLOCK)} non-zero; archive "
        f"{format_bytes(archive.stat().st_size)}, page cache warm), median of {runs}:\n"
    )
    print("| server started -> first READ answered | s | runs s |")
    print("|---|---:|---|")
    print(
        f"| nbdvma export (.vma) | {statistics.median(times['export']):.2f} | "
        f"{fmt_runs(times['export'])} |"
    )
    print(
        f"| qemu-nbd -r (raw image) | {statistics.median(times['qemu-nbd']):.2f} | "
        f"{fmt_runs(times['qemu-nbd'])} |"
    )
    if index:
        print(f"\nexport's own 'archive read in': {fmt_runs(index, 1)} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=2 * GiB, help="mixed disk (2G)")
    parser.add_argument(
        "--big-size",
        type=lambda v: 0 if v == "0" else parse_size(v),
        default=64 * GiB,
        help="sparse disk for the time to first byte (64G; 0: skip)",
    )
    parser.add_argument("--runs", type=int, default=3, help="counted runs (3)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted rounds first (1)")
    parser.add_argument("--zst", action="store_true", help="also a .vma.zst archive")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--tmpfs", action="store_true", help="outputs on a tmpfs mounted here")
    where.add_argument("--target-dir", type=Path, help="outputs in this directory")
    parser.add_argument(
        "--source-tmpfs",
        action="store_true",
        help="copy the source image and archives into the tmpfs too",
    )
    parser.add_argument("--workdir", type=Path, help="keeps the images (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.source_tmpfs and not args.tmpfs:
        parser.error("--source-tmpfs needs --tmpfs")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (its outputs are the ones checked)")
    for tool in ("qemu-img", "qemu-nbd", "/usr/bin/time"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        check=False,
    ).stdout.strip()
    print(f"commit {commit}; load average before: {load()}", flush=True)
    with ExitStack() as stack:
        work, sockdir = work_dirs(stack, args.workdir, "rbench")

        t0 = time.monotonic()
        image = mixed_image(work, args.size)
        archives = {"vma": work / f"mixed-{args.size}.vma"}
        if args.zst:
            archives["zst"] = work / f"mixed-{args.size}.vma.zst"
        for archive in archives.values():
            if not archive.exists():
                tmp = archive.with_name("tmp-" + archive.name)
                subprocess.run([*NBDVMA, "create", str(tmp), f"{DEVICE}={image.path}"], check=True)
                tmp.rename(archive)
        print(
            f"{image.path} ({format_bytes(image.size)}, "
            f"{format_bytes(image.nonzero * BLOCK)} non-zero), "
            + ", ".join(f"{a.name} {format_bytes(a.stat().st_size)}" for a in archives.values())
            + f": ready in {time.monotonic() - t0:.1f}s",
            flush=True,
        )

        if args.tmpfs:
            # each output at most the disk (qcow2: a little more); only one at a time
            size = args.size + 512 * MiB
            if args.source_tmpfs:
                size += image.nonzero * BLOCK + sum(a.stat().st_size for a in archives.values())
            targets = stack.enter_context(tmpfs(size))
            where = f"on a tmpfs ({format_bytes(size)})"
        else:
            targets = args.target_dir or work
            targets.mkdir(parents=True, exist_ok=True)
            where = f"in {targets}"
        if args.source_tmpfs:
            src = targets / "src"
            src.mkdir()
            copy_sparse(image.path, src / image.path.name)
            image = attrs.evolve(image, path=src / image.path.name)
            for k, a in archives.items():
                copy_sparse(a, src / a.name)
                archives[k] = src / a.name
            where += ", sources on it too"
        else:
            read_through(image.path)
            for a in archives.values():
                read_through(a)
            where += ", sources on disk (page cache warm)"
        print(f"outputs {where}", flush=True)

        ctx = Ctx(sockdir, targets, image)
        contestants = [
            Contestant(
                "export",
                "nbdvma export (.vma) -> qemu-img convert -O qcow2",
                export_convert(archives["vma"]),
            ),
            Contestant(
                "qemu-nbd", "qemu-nbd -r (raw) -> qemu-img convert -O qcow2", qemu_nbd_convert
            ),
            Contestant("extract", "nbdvma extract (.vma; raw)", extract(archives["vma"])),
            Contestant(
                "restore", "nbdvma restore --format qcow2 (.vma)", restore_qcow2(archives["vma"])
            ),
            Contestant("floor", "qemu-img convert -O qcow2 of the raw source (floor)", floor),
        ]
        if args.zst:
            contestants += [
                Contestant(
                    "export-zst",
                    "nbdvma export (.vma.zst) -> qemu-img convert",
                    export_convert(archives["zst"]),
                ),
                Contestant(
                    "extract-zst", "nbdvma extract (.vma.zst; raw)", extract(archives["zst"])
                ),
                Contestant(
                    "restore-zst",
                    "nbdvma restore --format qcow2 (.vma.zst)",
                    restore_qcow2(archives["zst"]),
                ),
            ]
        res = rounds(ctx, contestants, args.runs, args.warmup)
        met = print_table(image, contestants, res, where)
        print(f"load average after the restores: {load()}", flush=True)
        if args.big_size:
            ttfb(ctx, work, args.big_size, args.runs)
    print(f"\nload average after: {load()}")
    print("all targets met" if met else "TARGET MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
