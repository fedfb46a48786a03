"""``nbdvma export`` of a big sparse archive: index time, index size, peak RSS.

A sparse image (default 64 GiB, 2 MiB of random data every 2 GiB) is archived as a
plain ``.vma`` (``nbdvma create``) and as an nbdvma ``.vma.zst`` (through the library:
one frame per extent); each is exported, and the script reports the time until
``export ready``, the index size it prints, the server's peak RSS (``VmHWM``) once
ready, then after ``nbdcopy --connections=4`` copied the disk out (the copy is
compared with the image) and its time.

Target: the index costs 8 bytes per 64 KiB cluster (128 MiB per TiB), and the RSS once
ready stays within the interpreter's own plus the index.

    .venv/bin/python benchmarks/bench_export.py [--size 64G] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbdvma.units import format_bytes, parse_size
from nbdvma.vma.sink import open_sink
from nbdvma.vma.writer import VmaWriter

_STEP = 2 << 30
_DATA = 2 << 20


def _hwm(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    assert match is not None
    return int(match.group(1)) * 1024


def _image(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for at in range(0, size, _STEP):
            f.seek(at)
            f.write(os.urandom(min(_DATA, size - at)))


def _zst(image: Path, size: int, out: Path) -> None:
    w = VmaWriter(open_sink(str(out), "zstd"))
    dev = w.add_device("drive-scsi0", size)
    with image.open("rb") as f:
        for at in range(0, size, _STEP):
            f.seek(at)
            w.write(dev, at, f.read(min(_DATA, size - at)))
    w.finish()


def _measure(archive: Path, image: Path, work: Path) -> str:
    sock = work / "b.sock"
    err = work / "export.err"
    started = time.monotonic()
    with err.open("wb") as e:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-P",
                "-m",
                "nbdvma",
                "export",
                str(archive),
                "--listen",
                f"unix:{sock}",
            ],
            stderr=e,
        )
    try:
        while "export ready" not in err.read_text():
            if proc.poll() is not None:
                raise SystemExit(err.read_text())
            time.sleep(0.05)
        ready = time.monotonic() - started
        index = re.search(r"index ([\d.]+ \w+)", err.read_text())
        hwm_ready = _hwm(proc.pid)
        copy = work / "copy.raw"
        t0 = time.monotonic()
        subprocess.run(
            ["nbdcopy", "--connections=4", f"nbd+unix:///drive-scsi0?socket={sock}", str(copy)],
            check=True,
        )
        copied = time.monotonic() - t0
        same = filecmp.cmp(copy, image, shallow=False)
        copy.unlink()
        return (
            f"{archive.name:12} {format_bytes(archive.stat().st_size):>10}  ready {ready:5.1f}s  "
            f"index {index.group(1) if index else '?':>9}  RSS ready "
            f"{format_bytes(hwm_ready):>9}  nbdcopy {copied:4.1f}s RSS "
            f"{format_bytes(_hwm(proc.pid)):>9}  {'identical' if same else 'DIFFERENT'}"
        )
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    """Run the benchmark; print one line per archive form."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="64G", help="image size (default 64G)")
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = parser.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        image = work / "big.raw"
        _image(image, size)
        plain = work / "big.vma"
        subprocess.run(
            [sys.executable, "-P", "-m", "nbdvma", "create", str(plain), f"drive-scsi0={image}"],
            check=True,
        )
        zst = work / "big.vma.zst"
        _zst(image, size, zst)
        print(f"image {format_bytes(size)}, {format_bytes(_DATA)} of data every 2 GiB")
        for archive in (plain, zst):
            print(_measure(archive, image, work))


if __name__ == "__main__":
    main()
