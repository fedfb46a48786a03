"""What the data digest costs (docs/integrity.md): hash speeds, and CPU with and without it.

1. Single-core speed of SHA-256 (hashlib) and BLAKE3 (the ``blake3`` package, one
   thread) over 1 GiB in 64 KiB updates and in extent-sized (3.8 MB) updates.
2. ``nbdvma create``, ``nbdvma verify`` and ``nbdvma serve`` (written by
   ``qemu-img convert``) of one random image, with the digest and without it (the same
   code with the hashing switched off, see ``_NO_DIGEST``): wall time and the CPU time
   (user + system) of the nbdvma process, runs alternating.

Usage::

    .venv/bin/python benchmarks/bench_digest.py [--size 1G] [--runs 3] [--workdir /dev/shm/x]

The work directory defaults to a new one on /dev/shm, so that the disk is not measured.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nbdvma.units import parse_size  # noqa: E402

#: nbdvma's command line with the digest switched off: nothing hashed, nothing checked.
_NO_DIGEST = (
    "import sys, nbdvma.vma.digest as d, nbdvma.vma.reader as r, nbdvma.cli as c;"
    "d.StreamHasher.update = lambda self, parts: None;"
    "r.VmaReader.check_digest = lambda self: None;"
    "sys.exit(c.main())"
)


def hash_speeds() -> None:
    import blake3

    data = memoryview(os.urandom(1 << 30))
    for name, make in (("sha256", hashlib.sha256), ("blake3", blake3.blake3)):
        for step in (64 << 10, 3_801_600):
            best = float("inf")
            for _ in range(3):
                h = make()
                start = time.perf_counter()
                for i in range(0, len(data), step):
                    h.update(data[i : i + step])
                best = min(best, time.perf_counter() - start)
            print(f"{name:7} {step:>9,}-byte updates: {len(data) / best / 1e9:.2f} GB/s")


def nbdvma(digest: bool) -> list[str]:
    if digest:
        return [sys.executable, "-P", "-m", "nbdvma"]
    return [sys.executable, "-c", _NO_DIGEST]


def timed(cmd: list[str], **kw: object) -> tuple[float, float]:
    """Run ``cmd``; its wall time and CPU time (user + system, its threads included)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, **kw)  # type: ignore[call-overload]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd} exited with {proc.returncode}")
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def serve_run(digest: bool, image: Path, archive: Path, size: int) -> tuple[float, float]:
    sock = archive.with_suffix(".sock")
    log = archive.with_suffix(".err")
    with log.open("wb") as err:
        cmd = [*nbdvma(digest), "serve", str(archive), "--disk", f"d0={size}"]
        proc = subprocess.Popen(
            [*cmd, "--listen", f"unix:{sock}"], cwd=REPO, stderr=err, stdout=subprocess.DEVNULL
        )
    while b"listening on" not in log.read_bytes():
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.01)
    start = time.perf_counter()
    uri = f"nbd+unix:///d0?socket={sock}"
    subprocess.run(
        ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), uri], check=True
    )
    _, status, usage = os.wait4(proc.pid, 0)  # serve exits once the archive is finished
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(log.read_text())
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    size = parse_size(args.size)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-digest-", dir="/dev/shm"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        hash_speeds()
        image = work / "image.raw"
        with image.open("wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
        results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
        for run in range(args.runs):
            for digest in (run % 2 == 0, run % 2 != 0):  # alternate which goes first
                archive = work / f"a-{digest}.vma"
                for path in (archive, work / f"s-{digest}.vma"):
                    path.unlink(missing_ok=True)
                create = [*nbdvma(digest), "create", str(archive), str(image)]
                results.setdefault(("create", digest), []).append(timed(create))
                verify = [*nbdvma(digest), "verify", str(archive)]
                quiet = {"stdout": subprocess.DEVNULL}
                results.setdefault(("verify", digest), []).append(timed(verify, **quiet))
                served = serve_run(digest, image, work / f"s-{digest}.vma", size)
                results.setdefault(("serve", digest), []).append(served)
        print(f"\n{args.size} random image on {work}, median of {args.runs} runs")
        print("| command | wall s (digest / none) | CPU s (digest / none) | CPU added |")
        print("|---|---|---|---|")
        for command in ("create", "verify", "serve"):
            on = results[(command, True)]
            off = results[(command, False)]
            wall = [statistics.median(r[0] for r in x) for x in (on, off)]
            cpu = [statistics.median(r[1] for r in x) for x in (on, off)]
            print(
                f"| {command} | {wall[0]:.2f} / {wall[1]:.2f} | {cpu[0]:.2f} / {cpu[1]:.2f} "
                f"| {cpu[0] - cpu[1]:+.2f} s |"
            )
        for (command, digest), runs in results.items():
            each = ", ".join(f"{w:.2f}/{c:.2f}" for w, c in runs)
            print(f"  {command} {'digest' if digest else 'none'} (wall/CPU s): {each}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
