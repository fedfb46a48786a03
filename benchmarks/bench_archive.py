"""``nbdvma create`` / ``nbdvma extract`` vs ``cp --sparse=always`` + ``sync``: time and peak RSS.

The image is a mix of random data, real holes and written zero blocks (about half
data).  Every round runs the commands back to back, in an order that alternates
between rounds (the page cache cannot be dropped here, so the runs are interleaved),
each right after deleting its own output of the round before (see :func:`one_round`)
and a ``sync``, so that none pays for the write-back of another; a first round is
not counted.  Both the
median and the best round of each command are compared, and the target holds only
if it holds for both: the disturbances of a shared virtual machine only ever add
time, which favours the best rounds, but ``cp``'s best round is also its luckiest
(its copy waits for no disk, so its time follows the state of the page cache, while
nbdvma's follows the disk's steady pace), which favours the medians.  Peak RSS is each child's own
(``/usr/bin/time -f %M``).

nbdvma is timed as a user runs it: a wheel of this checkout installed by pip into a
new venv under the work directory (``--dev`` times this venv's editable install, whose
start-up is 15 ms slower).  nbdvma's outputs are durable when it exits (it fsyncs
them); ``cp`` leaves its copy to the kernel's write-back, so the fair comparison is
``cp`` followed by a ``sync`` of its copy (issue 13: durable against durable).  Two
reference rows show where the time goes: plain ``cp``, and create / extract run
through ``no_flush.py``, without their fsync.
A second, sparse image (default 8 GiB, 1 MiB of data every 256 MiB) shows that the
memory does not grow with the image size.

Targets: create and extract each at most 1.1x the time of ``cp`` + ``sync`` of the copy
(best round against best round, and median against median); peak RSS under 100 MiB.

    .venv/bin/python benchmarks/bench_archive.py --size 256M --rounds 3   # quick
    .venv/bin/python benchmarks/bench_archive.py                          # 2 GiB
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

MiB = 1 << 20
GiB = 1 << 30
TIME_TARGET = 1.1
CP_SYNC = "cp + sync FILE"
RSS_TARGET = 100 * MiB
ROOT = Path(__file__).resolve().parent.parent
#: The command timed; :func:`install` sets it (``--dev``: this venv's own script).
NBDVMA: list[str] = []
#: The same, without durability (reference rows only).
NO_FLUSH: list[str] = []


def install(work: Path) -> list[str]:
    """Install this checkout as a user would, into a new venv; its ``nbdvma`` command.

    The start-up is part of every timed command, and a development checkout pays more
    for it than an installed package: its editable-install import hook loads pathlib
    and friends, and with ``PYTHONDONTWRITEBYTECODE`` set, as on the machines here,
    every module of the package is compiled again at each start.  A wheel installed
    by pip has neither (pip byte-compiles on install): ``nbdvma --version`` takes
    49 ms instead of 64 ms.
    """
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(ROOT),
        ],
        check=True,
    )
    return [str(venv / "bin" / "nbdvma")]


def start_up(command: Sequence[str], times: int = 10) -> float:
    """The best wall time of ``nbdvma --version``: the start-up inside every run."""
    best = float("inf")
    for _ in range(times):
        t0 = time.perf_counter()
        subprocess.run([*command, "--version"], stdout=subprocess.DEVNULL, check=True)
        best = min(best, time.perf_counter() - t0)
    return best


@attrs.frozen
class Run:
    """One child process: wall time and peak RSS."""

    seconds: float
    max_rss: int  # bytes


def run(argv: Sequence[str]) -> Run:
    """Run a command to completion; its wall time and its own peak RSS.

    The RSS comes from ``/usr/bin/time``: a child forked straight from this process
    would inherit this process's high-water mark in ``ru_maxrss`` (Linux keeps it
    across exec), which made even ``cp`` look 30 MiB large.
    """
    # Each command starts with no dirty pages left by the one before (cp leaves its
    # whole copy to the kernel's write-back, which would otherwise run during the
    # next command and be charged to it).
    os.sync()
    with tempfile.NamedTemporaryFile("r") as rss_file:
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
        seconds = time.perf_counter() - t0
        if proc.returncode:
            err = proc.stderr.decode().strip()
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {err}")
        max_rss_kib = int(rss_file.read().split()[-1])
    return Run(seconds, max_rss_kib * 1024)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    if text[-1:].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def make_mixed_image(path: Path, size: int, seed: int = 1) -> tuple[int, int, int]:
    """Runs of random data (~50%), holes (~25%) and written zeros (~25%), 64 KiB..4 MiB.

    Returns the bytes of data, holes and written zeros.
    """
    rnd = random.Random(seed)
    counts = [0, 0, 0]
    zeros = bytes(4 * MiB)
    with path.open("wb") as f:
        pos = 0
        while pos < size:
            n = min(rnd.randrange(1, 65) * 64 * 1024, size - pos)
            kind = rnd.choices([0, 1, 2], weights=[2, 1, 1])[0]
            if kind == 0:
                data = bytearray(rnd.randbytes(n))
                for _ in range(n // (256 * 1024)):  # some zero 4 KiB blocks inside data
                    k = rnd.randrange(n // 4096) * 4096
                    data[k : k + 4096] = bytes(4096)
                f.write(data)
            elif kind == 1:
                f.seek(n, os.SEEK_CUR)
            else:
                f.write(zeros[:n])
            counts[kind] += n
            pos += n
        f.truncate(size)
        os.fsync(f.fileno())  # not written back later, during the timed commands
    return counts[0], counts[1], counts[2]


def make_sparse_image(path: Path, size: int, seed: int = 2) -> None:
    """Mostly a hole: 1 MiB of random data every 256 MiB."""
    rnd = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        for off in range(0, size, 256 * MiB):
            f.seek(off)
            f.write(rnd.randbytes(min(MiB, size - off)))


def remove(path: Path) -> None:
    """Delete a file or a directory tree, if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def one_round(work: Path, image: Path, order: int) -> dict[str, Run]:
    """Each command once, cp's two and nbdvma's four in an order alternating by round.

    Every command first deletes its own output of the round before (then ``run``
    syncs), so that each starts right after a deletion of the size it will write.
    On the virtual machines here that decides how fast the page cache takes its
    writes: memory freed moments before is fast to reuse, other free memory 2-3x
    slower (the flushless create took 1.3-1.8 s after another command, 0.5-0.9 s
    after a deletion).  Deleting everything at the start of a round instead let the
    order of the commands pick which of them paid: extract, which followed create,
    always did.
    """
    archive = work / "a.vma"
    results: dict[str, Run] = {}

    def timed(name: str, output: Path, argv: Sequence[str]) -> None:
        remove(output)
        results[name] = run(argv)

    def cp() -> None:
        copy = work / "copy.raw"
        timed("cp --sparse=always", copy, ["cp", "--sparse=always", str(image), str(copy)])
        # The yardstick: nbdvma fsyncs what it writes (create commits the archive,
        # extract the images); cp alone does not (the row above: reference only).
        synced = work / "copy-synced.raw"
        timed(
            CP_SYNC,
            synced,
            [
                "sh",
                "-c",
                'cp --sparse=always "$1" "$2" && sync "$2"',
                "sh",
                str(image),
                str(synced),
            ],
        )

    def create_extract() -> None:
        out = work / "out"
        timed("nbdvma create", archive, [*NBDVMA, "create", str(archive), f"disk={image}"])
        timed("nbdvma extract", out, [*NBDVMA, "extract", str(archive), str(out)])
        restored = out / "disk-disk.raw"
        if os.path.getsize(restored) != os.path.getsize(image):
            raise SystemExit("extract restored a different size")
        # For reference only: the same commands without the fsync that makes what
        # they write durable (see no_flush.py): what is left is what cp also does.
        flushless = work / "no-flush.vma"
        out2 = work / "out-no-flush"
        timed(
            "(create, no flush)", flushless, [*NO_FLUSH, "create", str(flushless), f"disk={image}"]
        )
        timed("(extract, no flush)", out2, [*NO_FLUSH, "extract", str(archive), str(out2)])

    steps = [cp, create_extract] if order % 2 == 0 else [create_extract, cp]
    for step in steps:
        step()
    return results


def same_content(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)], check=False).returncode == 0


def mark(good: bool) -> str:
    return "ok" if good else "MISSED"


def fmt_rss(n: int) -> str:
    return f"{n / MiB:6.1f} MiB"


@attrs.frozen
class Summary:
    """One command over all rounds."""

    median: float
    best: float
    max_rss: int


def table(title: str, rounds: list[dict[str, Run]]) -> dict[str, Summary]:
    """Print median and best time and max peak RSS per command; return them."""
    names = list(rounds[0])
    summary: dict[str, Summary] = {}
    width = max(12, 5 * len(rounds) - 1)  # "0.33 " per round
    print(f"\n{title}")
    print(
        f"| {'command':<20} | {'median s':>8} | {'best s':>6} "
        f"| {'all rounds s':<{width}} | {'peak RSS':>10} |"
    )
    print(f"|{'-' * 22}|{'-' * 10}|{'-' * 8}|{'-' * (width + 2)}|{'-' * 12}|")
    for name in names:
        times = [r[name].seconds for r in rounds]
        s = Summary(statistics.median(times), min(times), max(r[name].max_rss for r in rounds))
        summary[name] = s
        all_s = " ".join(f"{t:.2f}" for t in times)
        rss = fmt_rss(s.max_rss)
        print(f"| {name:<20} | {s.median:8.2f} | {s.best:6.2f} | {all_s:<{width}} | {rss:>10} |")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="2G", help="mixed image size (default 2G)")
    ap.add_argument("--sparse-size", default="8G", help="sparse image size (default 8G; 0: skip)")
    ap.add_argument("--rounds", type=int, default=8, help="rounds (default 8)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    ap.add_argument(
        "--dev",
        action="store_true",
        help="time this venv's own nbdvma (an editable install) instead of a wheel",
    )
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    sparse_size = parse_size(args.sparse_size)
    base = Path(tempfile.mkdtemp(prefix="nbdvma-bench-", dir=args.dir))
    ok = True
    try:
        if args.dev:
            script = Path(sys.executable).with_name("nbdvma")
            NBDVMA[:] = [str(script)] if script.exists() else [sys.executable, "-P", "-m", "nbdvma"]
        else:
            NBDVMA[:] = install(base)
        python = sys.executable if args.dev else str(Path(NBDVMA[0]).with_name("python"))
        NO_FLUSH[:] = [python, str(ROOT / "benchmarks" / "no_flush.py")]
        print(f"timing {NBDVMA[0]} (start-up {start_up(NBDVMA) * 1000:.0f} ms, best of 10)")
        image = base / "mixed.raw"
        t0 = time.perf_counter()
        data, holes, zeros = make_mixed_image(image, size)
        print(
            f"mixed image {size / GiB:.2f} GiB: data {data / size:.0%}, holes {holes / size:.0%},"
            f" written zeros {zeros / size:.0%} (made in {time.perf_counter() - t0:.0f} s)"
        )
        # Correctness once: the round trip restores the image exactly.
        run([*NBDVMA, "create", str(base / "check.vma"), f"disk={image}"])
        run([*NBDVMA, "extract", str(base / "check.vma"), str(base / "check")])
        if not same_content(image, base / "check" / "disk-disk.raw"):
            raise SystemExit("round trip changed the image")
        arch_size = os.path.getsize(base / "check.vma")
        shutil.rmtree(base / "check")
        (base / "check.vma").unlink()
        one_round(base, image, 1)  # not counted: gives every command an output to replace
        rounds = [one_round(base, image, i) for i in range(args.rounds)]
        s = table(f"{args.rounds} rounds, interleaved (archive {arch_size / MiB:.0f} MiB)", rounds)
        cp = s[CP_SYNC]
        plain = s["cp --sparse=always"]
        print()
        for name in ("nbdvma create", "nbdvma extract"):
            # Met only if both the best rounds and the medians are within the target.
            best = s[name].best / cp.best
            median = s[name].median / cp.median
            rss = s[name].max_rss
            ok &= best <= TIME_TARGET and median <= TIME_TARGET and rss < RSS_TARGET

            print(
                f"{name:<15} {best:5.2f}x cp+sync best to best: {mark(best <= TIME_TARGET)},"
                f" {median:5.2f}x median to median: {mark(median <= TIME_TARGET)}"
                f" (target <= {TIME_TARGET}x); peak RSS {fmt_rss(rss)}: {mark(rss < RSS_TARGET)}"
            )
            ref = s[f"({name.split()[1]}, no flush)"]
            mine = s[name]
            print(
                f"{'':<15} {mine.best / plain.best:5.2f}x / {mine.median / plain.median:5.2f}x"
                f" plain cp (its copy not yet durable); without its own fsync"
                f" {ref.best / plain.best:5.2f}x / {ref.median / plain.median:5.2f}x plain cp"
                " (reference only)"
            )
        if sparse_size:
            sparse = base / "sparse.raw"
            make_sparse_image(sparse, sparse_size)
            res = [one_round(base, sparse, 0)]
            ss = table(f"sparse image {sparse_size / GiB:.0f} GiB (1 MiB data / 256 MiB)", res)
            for name in ("nbdvma create", "nbdvma extract"):
                ok &= ss[name].max_rss < RSS_TARGET
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("\nall targets met" if ok else "\nsome targets MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
