"""The per-request floor of a trio server: what one request-reply round trip costs.

``qemu-img convert`` asks block status one request at a time (thousands per disk), so
for an export its time is the round trip times the requests.  This measures, side by
side in one run, each server in its own process and the client in another:

* an echo server on trio (``receive_some`` then ``send_all``: the least a trio server
  does per request), and the same echo with blocking sockets in one thread (what a C
  server such as qemu-nbd does per request), both answered to a plain Python client;
* ``nbdvma export`` and ``qemu-nbd -r`` answering ``NBD_CMD_BLOCK_STATUS`` with
  ``REQ_ONE`` (as qemu-img asks it), and 4 KiB READs, to libnbd's Python binding.

The ratio trio / blocking is the floor under any trio server's ratio to a C server on a
request-bound workload; nbdvma's own work is what it adds above the trio echo.

    .venv/bin/python benchmarks/bench_floor.py            # 20000 requests, best of 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import kill, wait_for

TRIO_ECHO = """
import os, socket, sys, trio
async def handler(stream):
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
async def main():
    sock = trio.socket.socket(socket.AF_UNIX)
    await sock.bind(sys.argv[1])
    sock.listen()
    await trio.serve_listeners(handler, [trio.SocketListener(sock)])
trio.run(main)
"""

BLOCKING_ECHO = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen()
while True:
    c, _ = s.accept()
    while data := c.recv(65536):
        c.sendall(data)
    c.close()
"""

ECHO_CLIENT = """
import socket, sys, time
n = int(sys.argv[2])
c = socket.socket(socket.AF_UNIX)
c.connect(sys.argv[1])
msg = bytes(28)  # an NBD request header's size
t = time.perf_counter()
for _ in range(n):
    c.sendall(msg)
    c.recv(100)
print((time.perf_counter() - t) / n)
"""

# libnbd is Debian's python3-libnbd: /usr/bin/python3's.
NBD_CLIENT = """
import sys, time, nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
n, size = int(sys.argv[2]), h.get_size()
def cb(*args):
    return 0
t = time.perf_counter()
for i in range(n):
    h.block_status(65536, i * 65536 * 7 % (size - 65536), cb, nbd.CMD_FLAG_REQ_ONE)
status = (time.perf_counter() - t) / n
t = time.perf_counter()
for i in range(n):
    h.pread(4096, i * 65536 * 7 % (size - 65536))
print(status, (time.perf_counter() - t) / n)
h.shutdown()
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5, help="alternating runs (best of)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="nbdvma-floor-", dir="/dev/shm"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # A small archive of random data and zero runs, and its raw image for qemu-nbd.
        image = work / "disk.raw"
        with image.open("wb") as f:
            for i in range(64):
                f.write(os.urandom(1 << 20) if i % 2 else bytes(1 << 20))
        archive = work / "disk.vma"
        subprocess.run(
            [sys.executable, "-P", "-m", "nbdvma", "create", str(archive), f"drive-scsi0={image}"],
            check=True,
        )
        socks = {k: work / f"{k}.sock" for k in ("trio", "blocking", "export", "qemu-nbd")}
        starts = {
            "trio": [sys.executable, "-c", TRIO_ECHO, str(socks["trio"])],
            "blocking": [sys.executable, "-c", BLOCKING_ECHO, str(socks["blocking"])],
            "export": [
                *(sys.executable, "-P", "-m", "nbdvma", "export", str(archive)),
                *("--listen", f"unix:{socks['export']}"),
            ],
            "qemu-nbd": [
                *("qemu-nbd", "-r", "-t", "-f", "raw", "-x", "drive-scsi0"),
                *("-k", str(socks["qemu-nbd"]), str(image)),
            ],
        }
        for key, command in starts.items():
            procs.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
            wait_for(socks[key].exists, 60, key)
        echo: dict[str, list[float]] = {"trio": [], "blocking": []}
        status: dict[str, list[float]] = {"export": [], "qemu-nbd": []}
        reads: dict[str, list[float]] = {"export": [], "qemu-nbd": []}
        n = str(args.requests)
        for _ in range(args.runs):
            for key in echo:
                out = subprocess.run(
                    [sys.executable, "-c", ECHO_CLIENT, str(socks[key]), n],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                echo[key].append(float(out))
            for key in status:
                uri = f"nbd+unix:///drive-scsi0?socket={socks[key]}"
                out = subprocess.run(
                    ["/usr/bin/python3", "-c", NBD_CLIENT, uri, n],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                s, r = map(float, out.split())
                status[key].append(s)
                reads[key].append(r)
        us = 1e6
        print(
            f"\nround trip per request, unix socket, {args.requests} requests, "
            f"best of {args.runs} alternating runs (client time included):\n"
        )
        print("| server | request | us | runs us |")
        print("|---|---|---:|---|")

        def row(label: str, what: str, values: list[float]) -> None:
            runs = " / ".join(f"{v * us:.1f}" for v in values)
            print(f"| {label} | {what} | {min(values) * us:.1f} | {runs} |")

        row("echo on trio", "28 bytes", echo["trio"])
        row("echo, blocking socket, one thread", "28 bytes", echo["blocking"])
        row("nbdvma export", "BLOCK_STATUS, REQ_ONE", status["export"])
        row("qemu-nbd -r", "BLOCK_STATUS, REQ_ONE", status["qemu-nbd"])
        row("nbdvma export", "READ 4 KiB", reads["export"])
        row("qemu-nbd -r", "READ 4 KiB", reads["qemu-nbd"])
        print(
            f"\ntrio echo / blocking echo: **{min(echo['trio']) / min(echo['blocking']):.2f}x**"
            f" (the floor); export / qemu-nbd block status: "
            f"**{min(status['export']) / min(status['qemu-nbd']):.2f}x**, READ: "
            f"**{min(reads['export']) / min(reads['qemu-nbd']):.2f}x**"
        )
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        for proc in procs:
            kill(proc)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
