"""Reading an archive from S3 (SeaweedFS ``weed mini``): one streaming GET vs parallel
ranged GETs, ``verify``/``extract`` from S3 vs from a file, ``export`` from S3.

The archive is ``nbdvma create`` of the 2 GiB mixed disk of ``bench_backup.py`` (about
1 GiB: per 8 MiB, 4 MiB random data, 1 MiB stored zeros, 2 MiB hole with a 4 KiB block
every 256 KiB, 1 MiB hole), plain and ``.vma.zst``, uploaded with boto3's
``upload_file`` to a SeaweedFS this script starts (``tests/s3server.py``) and stops.

Sections (``--sections``), each run ``--runs`` times with the order rotating:

* ``raw``: the object read to nowhere: :class:`~nbdvma.s3.source.S3Stream` (one
  streaming GET) vs ``PrefetchStream`` below (ranged GETs of ``--part`` bytes,
  ``--workers`` of them in flight in threads, consumed in order);
* ``verify``: the same two streams under ``verify``'s own loop (every check, the data
  digest hashed in its helper thread), in this process, and the local file;
* ``cli``: ``nbdvma verify`` and ``nbdvma extract`` of ``s3://`` and of the file, as
  processes: time and peak RSS;
* ``export``: ``nbdvma export s3://...`` (and of the file) + ``qemu-img convert -O
  qcow2`` of its disk: time of the index pass, of the convert, and export's peak RSS.

    .venv/bin/python benchmarks/bench_s3_read.py --runs 3 --workdir /var/tmp/nbdvma-s3bench
    .venv/bin/python benchmarks/bench_s3_read.py --size 256M --runs 1     # a quick try
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench_qemu_backup import mixed_image
from bench_restore import vm_hwm
from benchlib import MiB, fmt_runs, kill, reap, terminate, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from s3server import SeaweedServer, isolated_aws_env

from nbdvma.s3.location import S3Location
from nbdvma.s3.source import STREAM_CHUNK, S3Object, S3Stream
from nbdvma.units import format_bytes, parse_size
from nbdvma.vma.reader import VmaReader, decompressing

NBDVMA = [sys.executable, "-P", "-m", "nbdvma"]
BUCKET = "bench"
DEVICE = "drive-scsi0"


class PrefetchStream(io.RawIOBase):
    """The contender: ranged GETs of ``part`` bytes, ``workers`` in flight, in order.
    Memory: ``(workers + 1) * part``."""

    def __init__(self, obj: S3Object, part: int, workers: int) -> None:
        super().__init__()
        self.obj = obj
        self.part = part
        self.pool = ThreadPoolExecutor(workers)
        self.ahead: collections.deque[Future[bytes]] = collections.deque()
        self.next = 0
        self.current = memoryview(b"")
        for _ in range(workers):
            self._submit()

    def _submit(self) -> None:
        if self.next < self.obj.size:
            self.ahead.append(self.pool.submit(self.obj.get, self.next, self.part))
            self.next += self.part

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not self.current:
            if not self.ahead:
                return 0
            self.current = memoryview(self.ahead.popleft().result())
            self._submit()
        n = min(len(view), len(self.current))
        view[:n] = self.current[:n]
        self.current = self.current[n:]
        return n

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        super().close()


def drain(stream: io.RawIOBase) -> int:
    buf = bytearray(STREAM_CHUNK)
    total = 0
    while n := stream.readinto(buf):
        total += n
    stream.close()
    return total


def verify_loop(raw: Any) -> None:
    """``verify``'s work: every extent read and checked, the digest, the missing check."""
    with VmaReader(decompressing(raw, "x")) as reader:
        for _ in reader.extents():
            pass
        if reader.check_digest() is None:
            raise RuntimeError("no digest checked")
        reader.check_missing()


def timed(fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def run_cli(args: list[str], env: dict[str, str], scratch: Path) -> tuple[float, int]:
    """(seconds, peak RSS): through GNU time's ``%M``, a small parent (a child's
    ``ru_maxrss`` starts at its parent's, this script's)."""
    rss_file = scratch / "rss"
    start = time.monotonic()
    proc = subprocess.Popen(
        ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *NBDVMA, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    reap(proc)
    seconds = time.monotonic() - start
    if proc.returncode:
        assert proc.stderr is not None
        raise RuntimeError(f"{args}: {proc.stderr.read().decode()}")
    return seconds, int(rss_file.read_text().split()[-1]) * 1024


def run_export(archive: str, sockdir: Path, out: Path, env: dict[str, str]) -> tuple[float, ...]:
    """(index pass s, convert s, export peak RSS)."""
    sock = sockdir / "e.sock"
    pid = sockdir / "e.pid"
    for p in (sock, pid, out):
        p.unlink(missing_ok=True)
    start = time.monotonic()
    proc = subprocess.Popen(
        [*NBDVMA, "export", archive, "--listen", f"unix:{sock}", "--pid-file", str(pid)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(pid.exists, 600, "export ready")
        ready = time.monotonic() - start
        convert = timed(
            lambda: subprocess.run(
                [
                    "qemu-img",
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    f"nbd+unix:///{DEVICE}?socket={sock}",
                    str(out),
                ],
                check=True,
            )
        )
        rss = vm_hwm(proc.pid)
        terminate(proc)
    finally:
        kill(proc)
    return ready, convert, rss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=2 << 30, help="disk size (2G)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="keeps the image between runs")
    parser.add_argument("--part", type=parse_size, default=8 * MiB)
    parser.add_argument("--workers", default="2,4", help="ranged GETs in flight (list)")
    parser.add_argument("--sections", default="raw,verify,cli,export")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    workers = [int(w) for w in args.workers.split(",")]
    with ExitStack() as stack:
        work = args.workdir or Path(tempfile.mkdtemp(prefix="nbdvma-s3bench-"))
        work.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="run-", dir=work))
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        image = mixed_image(work, args.size)
        plain, zst = scratch / "a.vma", scratch / "a.vma.zst"
        for path in (plain, zst):
            subprocess.run([*NBDVMA, "create", str(path), f"{DEVICE}={image.path}"], check=True)
        server = SeaweedServer(scratch / "weed", memory_limit="1GiB")
        endpoint = server.start()
        stack.callback(server.stop)
        env = endpoint.env()
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        client = endpoint.client()
        client.create_bucket(Bucket=BUCKET)
        for path in (plain, zst):
            client.upload_file(str(path), BUCKET, path.name)
        url = f"s3://{BUCKET}/{plain.name}"
        location = S3Location(BUCKET, plain.name)
        size = plain.stat().st_size
        print(f"archive {format_bytes(size)} ({size} bytes); image {format_bytes(args.size)}")
        print(f"SeaweedFS 4.48 at {endpoint.url}; load {os.getloadavg()[0]:.2f}\n")

        def obj() -> S3Object:
            return S3Object.open(location, connections=max(workers) + 1)

        contestants: dict[str, Callable[[], float]] = {}
        if "raw" in sections:
            contestants["raw: one GET"] = lambda: timed(lambda: drain(S3Stream(obj())))
            for w in workers:
                contestants[f"raw: {format_bytes(args.part)} x{w} ranged"] = lambda w=w: timed(
                    lambda: drain(PrefetchStream(obj(), args.part, w))
                )
        if "verify" in sections:
            contestants["verify loop: one GET"] = lambda: timed(
                lambda: verify_loop(io.BufferedReader(S3Stream(obj()), STREAM_CHUNK))
            )
            for w in workers:
                contestants[f"verify loop: {format_bytes(args.part)} x{w} ranged"] = lambda w=w: (
                    timed(
                        lambda: verify_loop(
                            io.BufferedReader(PrefetchStream(obj(), args.part, w), STREAM_CHUNK)
                        )
                    )
                )
            contestants["verify loop: local file"] = lambda: timed(
                lambda: verify_loop(open(plain, "rb"))  # noqa: SIM115 - the reader closes it
            )
        results: dict[str, list[float]] = {name: [] for name in contestants}
        names = list(contestants)
        for r in range(args.runs if names else 0):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                results[name].append(contestants[name]())
        if results:
            print(f"| {'':40} | s (runs) | MiB/s |\n|---|---|---|")
            for name, runs in results.items():
                med = statistics.median(runs)
                print(f"| {name:40} | {med:.2f} ({fmt_runs(runs)}) | {size / med / MiB:.0f} |")
            print()

        if "cli" in sections:
            rows: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
            for r in range(args.runs):
                for where, archive in (("s3", url), ("file", str(plain))):
                    rows[f"verify {where}"].append(run_cli(["verify", archive], env, scratch))
                    target = scratch / f"x-{r}-{where}"
                    rows[f"extract {where}"].append(
                        run_cli(["extract", archive, str(target)], env, scratch)
                    )
                    shutil.rmtree(target)
            print("| command | s (runs) | MiB/s | peak RSS |\n|---|---|---|---|")
            for name, got in rows.items():
                times = [t for t, _ in got]
                med = statistics.median(times)
                rss = max(m for _, m in got)
                print(
                    f"| {name} | {med:.2f} ({fmt_runs(times)}) | {size / med / MiB:.0f} | "
                    f"{rss / MiB:.0f} MiB |"
                )
            print()

        if "export" in sections:
            sockdir = Path(tempfile.mkdtemp(prefix="s3b-", dir="/tmp"))
            stack.callback(shutil.rmtree, sockdir, ignore_errors=True)
            out = scratch / "out.qcow2"
            cases = {
                "s3 .vma": f"s3://{BUCKET}/{plain.name}",
                "s3 .vma.zst": f"s3://{BUCKET}/{zst.name}",
                "file .vma": str(plain),
                "file .vma.zst": str(zst),
            }
            exp: dict[str, list[tuple[float, ...]]] = collections.defaultdict(list)
            for _ in range(args.runs):
                for name, archive in cases.items():
                    exp[name].append(run_export(archive, sockdir, out, env))
            print("| export + qemu-img convert | index pass s | convert s | peak RSS |")
            print("|---|---|---|---|")
            for name, got in exp.items():
                ready = [g[0] for g in got]
                conv = [g[1] for g in got]
                rss = max(g[2] for g in got)
                print(
                    f"| {name} | {statistics.median(ready):.2f} ({fmt_runs(ready)}) | "
                    f"{statistics.median(conv):.2f} ({fmt_runs(conv)}) | {rss / MiB:.0f} MiB |"
                )
    return 0


if __name__ == "__main__":
    os.environ.clear()
    os.environ.update(isolated_aws_env(dict(os.environ)))
    sys.exit(main())
