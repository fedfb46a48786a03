"""Benchmarks of ``nbdvma serve`` against the reference servers, side by side in one run.

1. Protocol ceiling: ``qemu-img convert`` of a random image into ``serve --backend null``
   vs into ``nbdkit null`` (target: serve reaches >= 1.0x nbdkit's throughput).
2. Writing: ``qemu-img convert`` into ``serve`` writing a VMA archive (until the archive
   is finished: fsync and rename) vs into ``qemu-nbd`` writing a raw file (until the
   client's final FLUSH returns) (target: time ratio <= 1.0; with the targets on a
   tmpfs also server CPU s/GiB <= 1.2x qemu-nbd's).
3. Memory: peak RSS of ``serve`` (the child's ``ru_maxrss`` from ``wait4``) while
   ``nbdcopy --connections=1 --requests=64 --request-size=1M`` keeps 64 requests of
   1 MiB in flight (target: < 200 MiB).

Usage::

    .venv/bin/python benchmarks/bench_serve.py [--size 2G] [--repeat 3] [--workdir DIR]
        [--tmpfs | --target-dir DIR]

Where the archives and raw targets go: the work directory (its disk) by default;
``--tmpfs``, a tmpfs the benchmark mounts (root) and unmounts; ``--target-dir``, a
directory of your own.  On a disk both writers mostly wait for it, and a shared VM's
disk swings 2x between runs; on a tmpfs writes cost memory copies only, which leaves
the servers' own cost.

Each figure is the median of ``--repeat`` runs; the runs of the compared servers
alternate, so drifts of the machine hit both.  The random source image is made once
and kept in the work directory (it is read from the page cache in every run).
"server CPU s" is user + system of the server process (all threads, ``wait4``) over
its whole life, start-up included (~0.2 s of Python imports for serve); "CPU s/GiB"
divides it by the image's size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from benchlib import tmpfs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nbdvma.units import parse_size  # noqa: E402

MiB = 1 << 20
START_TIMEOUT = 30.0


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def make_image(path: Path, size: int) -> Path:
    """A random (incompressible, no zero blocks) raw image, reused if present."""
    if path.exists() and path.stat().st_size == size:
        return path
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n
    tmp.rename(path)
    return path


def reap(proc: subprocess.Popen[bytes], timeout: float = 600) -> float:
    """Wait for ``proc`` (SIGTERM first if still running); return its CPU seconds."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.01)


def run(args: list[str], timeout: float = 3600) -> float:
    """Run a client; return its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(args, check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


@contextmanager
def serve(archive: Path, size: int, sock: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """``nbdvma serve`` with one disk ``d0`` on a unix socket; killed on exit."""
    log = archive.with_suffix(".err")
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nbdvma",
                "serve",
                str(archive),
                "--disk",
                f"d0={size}",
                "--listen",
                f"unix:{sock}",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=REPO,
        )
    try:
        _wait_for(lambda: b"listening on" in log.read_bytes(), START_TIMEOUT, "serve")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def background(args: list[str], sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A reference server in the foreground of a child; killed on exit."""
    sock.unlink(missing_ok=True)  # one left by the last server: not this one's
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(sock.exists, START_TIMEOUT, args[0])
        yield proc
    finally:
        proc.kill()
        proc.wait()


def uri(sock: Path, export: str = "d0") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def convert(src: Path, target: str) -> list[str]:
    return ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), target]


def bench_null(
    src: Path, size: int, work: Path, serve_first: bool = True
) -> tuple[float, float, float, float]:
    """One run each: serve null and nbdkit null, (wall, server CPU) seconds of each, in
    the order given (the caller alternates it: whoever follows a heavy step pays)."""
    sock = work / "null.sock"

    def serve_null() -> tuple[float, float]:
        with serve(work / "null.vma", size, sock, "--backend", "null") as proc:
            wall = run(convert(src, uri(sock)))
            return wall, reap(proc)  # it ends by itself: the disk was written completely

    def nbdkit_null() -> tuple[float, float]:
        with background(["nbdkit", "-f", "-U", str(sock), "null", str(size)], sock) as proc:
            wall = run(convert(src, uri(sock)))
            proc.send_signal(signal.SIGTERM)
            return wall, reap(proc)

    return _pair(serve_null, nbdkit_null, serve_first)


def bench_disk(
    src: Path, size: int, work: Path, targets: Path, serve_first: bool = True
) -> tuple[float, float, float, float]:
    """One run each: serve VMA seconds from its start to a finished archive and its CPU
    seconds, qemu-nbd raw seconds from its start to the FLUSH and its CPU seconds
    (SIGTERMed after).  Both times include the server's start-up.

    In the order given: the caller alternates it.  On a tmpfs in this VM, the second
    run writes into the pages the first one's output just freed, while the first
    one's pages may have gone back to the host meanwhile (free page reporting) and
    fault in again.  Serve always ran first before; alternating, 8 runs: serve / qemu-nbd
    1.03-1.39 with serve first, 0.53-1.28 with qemu-nbd first.
    """
    sock = work / "disk.sock"

    def serve_vma() -> tuple[float, float]:
        archive = targets / "out.vma"
        archive.unlink(missing_ok=True)
        _drop_dirty()
        start = time.perf_counter()
        with serve(archive, size, sock) as proc:
            run(convert(src, uri(sock)))
            cpu = reap(proc)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0 or not archive.exists():
            raise RuntimeError(f"serve failed: {archive.with_suffix('.err').read_text()}")
        archive.unlink()
        return elapsed, cpu

    def qemu_nbd() -> tuple[float, float]:
        raw = targets / "target.raw"
        raw.unlink(missing_ok=True)
        with raw.open("wb") as f:
            f.truncate(size)
        _drop_dirty()
        args = ["qemu-nbd", "-f", "raw", "-t", "--shared=0", "-x", "d0", "-k", str(sock), str(raw)]
        start = time.perf_counter()  # as for serve: its start-up counts (a few ms)
        with background(args, sock) as proc:
            run(convert(src, uri(sock)))  # ends with FLUSH: qemu-nbd fdatasyncs the file
            elapsed = time.perf_counter() - start
            proc.send_signal(signal.SIGTERM)
            cpu = reap(proc)
        raw.unlink()
        return elapsed, cpu

    return _pair(serve_vma, qemu_nbd, serve_first)


def _pair(
    serve_run: Callable[[], tuple[float, float]],
    reference_run: Callable[[], tuple[float, float]],
    serve_first: bool,
) -> tuple[float, float, float, float]:
    """Both runs, in the order given: (wall, CPU) of serve's, then of the reference's."""
    if serve_first:
        serve, reference = serve_run(), reference_run()
    else:
        reference = reference_run()
        serve = serve_run()
    return (*serve, *reference)


def bench_rss(src: Path, size: int, work: Path, targets: Path) -> tuple[float, float, float]:
    """Peak RSS (MiB) of serve (VMA backend), its wall time and CPU seconds under
    nbdcopy, 64 x 1 MiB."""
    sock = work / "rss.sock"
    archive = targets / "rss.vma"
    archive.unlink(missing_ok=True)
    start = time.perf_counter()
    with serve(archive, size, sock) as proc:
        run(
            [
                "nbdcopy",
                "--connections=1",
                "--requests=64",
                "--request-size=1048576",
                "--flush",
                str(src),
                uri(sock),
            ]
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"serve failed: {archive.with_suffix('.err').read_text()}")
    archive.unlink()
    return usage.ru_maxrss / 1024, elapsed, usage.ru_utime + usage.ru_stime


def _drop_dirty() -> None:
    """Write back dirty pages of earlier runs, so no run pays for another's."""
    os.sync()


def main(argv: list[str] | None = None) -> int:
    """Run the three benchmarks ``--repeat`` times, alternating; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("2G"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir in /tmp")
    parser.add_argument("--keep-image", action="store_true", help="keep the source image")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--tmpfs", action="store_true", help="targets on a tmpfs mounted here")
    where.add_argument("--target-dir", type=Path, help="targets in this directory")
    args = parser.parse_args(argv)
    for tool in ("qemu-img", "qemu-nbd", "nbdkit", "nbdcopy"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="nbdvma-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    size: int = args.size
    mib = size / MiB
    gib = size / (1 << 30)
    null_s, null_k, disk_s, disk_q, rss, rss_t = [], [], [], [], [], []
    cpu_s, cpu_k, cpu_d, cpu_q, cpu_r = [], [], [], [], []
    print("load average before:", " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    try:
        src = make_image(work / f"random-{size}.raw", size)
        with ExitStack() as stack:
            if args.tmpfs:
                targets = stack.enter_context(tmpfs(size + 512 * MiB))
                where_t = f"on a tmpfs ({targets})"
            else:
                targets = args.target_dir or work
                targets.mkdir(parents=True, exist_ok=True)
                where_t = f"in {targets}"
            for i in range(args.repeat):
                s, cs, k, ck = bench_null(src, size, work, serve_first=i % 2 == 0)
                null_s.append(s)
                null_k.append(k)
                cpu_s.append(cs)
                cpu_k.append(ck)
                s, cd, q, cq = bench_disk(src, size, work, targets, serve_first=i % 2 == 1)
                disk_s.append(s)
                disk_q.append(q)
                cpu_d.append(cd)
                cpu_q.append(cq)
                r, t, cr = bench_rss(src, size, work, targets)
                rss.append(r)
                rss_t.append(t)
                cpu_r.append(cr)
                print(
                    f"run {i + 1}: null {mib / null_s[-1]:.0f} vs nbdkit {mib / k:.0f} MiB/s; "
                    f"vma {disk_s[-1]:.2f}s/{cd:.2f} CPU s vs qemu-nbd {q:.2f}s/{cq:.2f} CPU s "
                    f"({'vma' if i % 2 == 1 else 'qemu-nbd'} first); "
                    f"rss {r:.0f} MiB",
                    file=sys.stderr,
                )
    finally:
        if not args.keep_image and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    ns, nk, ds, dq = med(null_s), med(null_k), med(disk_s), med(disk_q)
    rows = [
        ("qemu-img convert -> serve --backend null", ns, med(cpu_s)),
        ("qemu-img convert -> nbdkit null", nk, med(cpu_k)),
        ("qemu-img convert -> serve (VMA, to finished archive)", ds, med(cpu_d)),
        ("qemu-img convert -> qemu-nbd (raw file, to FLUSH)", dq, med(cpu_q)),
        ("nbdcopy 64 x 1 MiB -> serve (VMA)", med(rss_t), med(cpu_r)),
    ]
    print(
        f"\nnbdvma serve, random {size / MiB:.0f} MiB image, targets {where_t}, "
        f"median of {args.repeat}\n"
    )
    print(
        f"| {'client -> server':<55} | {'seconds':>8} | {'MiB/s':>6} | {'server CPU s':>12} "
        f"| {'CPU s/GiB':>9} |"
    )
    print(f"|{'-' * 57}|{'-' * 10}|{'-' * 8}|{'-' * 14}|{'-' * 11}|")
    for name, secs, cpu in rows:
        print(
            f"| {name:<55} | {secs:>8.2f} | {mib / secs:>6.0f} | {cpu:>12.2f} | {cpu / gib:>9.2f} |"
        )
    ratio_null = nk / ns
    ratio_disk = ds / dq
    ratio_cpu = med(cpu_d) / med(cpu_q)
    peak = max(rss)
    print()
    print(f"null throughput, serve / nbdkit: {ratio_null:.2f}  (target >= 1.00)")
    print(f"time, serve VMA / qemu-nbd raw: {ratio_disk:.2f}  (target <= 1.00)")
    print(
        f"server CPU s/GiB, serve VMA / qemu-nbd raw: {ratio_cpu:.2f}"
        + ("  (target <= 1.20 with targets on a tmpfs)" if args.tmpfs else "")
    )
    print(f"peak RSS of serve, 64 x 1 MiB in flight: {peak:.0f} MiB  (target < 200)")
    ok = ratio_null >= 1.0 and ratio_disk <= 1.0 and peak < 200
    if args.tmpfs:
        ok = ok and ratio_cpu <= 1.2
    print("load average after:", " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    print("all targets met" if ok else "TARGET MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
