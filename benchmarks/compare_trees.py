"""The server's own CPU cost, two source trees side by side (a change against its base).

``qemu-img convert`` of a random image into ``serve --backend null`` of each tree, the
trees alternating round after round so that drifts of the machine hit both; the figure
is the server process's CPU seconds (``wait4`` rusage: user + system), which a disk
or a slow client does not inflate.  With ``--backend vma`` the image is the mixed disk
of ``bench_backup.py`` and serve writes a VMA archive, into ``--dir`` (default
``/dev/shm``: a tmpfs, so that only the software's own cost counts).  With ``--backend
export`` the same disk is archived once (``nbdvma create`` of the new tree) and each
tree's ``nbdvma export`` serves it to ``qemu-img convert -O qcow2`` (the restore path;
the server's CPU includes its index pass, the same in both).  ``--client backup``: the
client of ``--backend vma`` is QEMU's ``blockdev-backup`` of the disk (QEMU 7.2, as in
``bench_qemu_backup.py``: 1 MiB writes and WRITE_ZEROES, 16 in flight), not
``qemu-img convert``.  Usage::

    git worktree add /tmp/base ae36cb5
    .venv/bin/python benchmarks/compare_trees.py /tmp/base . [--size 1G] [--rounds 8]
    .venv/bin/python benchmarks/compare_trees.py /tmp/base . --backend vma
    .venv/bin/python benchmarks/compare_trees.py /tmp/base . --backend vma --client backup
    .venv/bin/python benchmarks/compare_trees.py /tmp/base . --backend export

Prints a table (median and range of each tree, and the user-space part of the CPU
seconds) and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_qemu_backup import Image, Qemu, backup_job
from benchlib import write_bytecode

from nbdvma.units import parse_size


def serve_command(tree: Path) -> list[str]:
    """``nbdvma serve`` of ``tree``: ``-m nbdvma.serve`` before the command line moved."""
    if (tree / "nbdvma" / "serve.py").exists():
        return ["-m", "nbdvma.serve"]
    return ["-m", "nbdvma", "serve"]


def start_server(tree: Path, args: list[str], work: Path, sock: Path) -> subprocess.Popen[bytes]:
    """``python ARGS`` with ``tree``'s nbdvma, once it listens on ``sock``."""
    server = subprocess.Popen(
        [sys.executable, *args],
        env={**os.environ, "PYTHONPATH": str(tree)},
        cwd=work,  # not the repository: "-m" would import from the current directory
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not sock.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{' '.join(args)} of {tree} did not start")
        time.sleep(0.01)
    return server


Round = tuple[float, float, float]  # wall s, server CPU s, of which user s


def one_round(
    tree: Path, image: Path, size: int, work: Path, backend: str, qemu: Qemu | None = None
) -> Round:
    """Wall seconds of the copy (or of QEMU's backup job) and the server's CPU seconds."""
    sock = work / "serve.sock"
    sock.unlink(missing_ok=True)
    archive = work / "x.vma"
    archive.unlink(missing_ok=True)
    server = start_server(
        tree,
        [
            *(*serve_command(tree), str(archive)),
            *("--disk", f"d0={size}", "--backend", backend, "--listen", f"unix:{sock}"),
        ],
        work,
        sock,
    )
    start = time.monotonic()
    if qemu is not None:
        backup_job(qemu, Image("source", image, size, 0), sock, "d0")
    else:
        subprocess.run(
            [
                *("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw"),
                *(str(image), f"nbd+unix:///d0?socket={sock}"),
            ],
            check=True,
        )
    if backend == "vma":  # it finishes the archive and exits by itself
        _, status, usage = os.wait4(server.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"serve of {tree} failed")
        return time.monotonic() - start, usage.ru_utime + usage.ru_stime, usage.ru_utime
    wall = time.monotonic() - start
    # Older trees serve null until a signal; newer ones end once the disk is written.
    # (os.kill, not Popen.terminate: that would reap an exited child before wait4.)
    time.sleep(0.5)
    os.kill(server.pid, signal.SIGTERM)
    _, _, usage = os.wait4(server.pid, 0)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_utime


def export_round(tree: Path, archive: Path, work: Path) -> Round:
    """Wall seconds of ``qemu-img convert`` out of ``tree``'s export of ``archive``
    (from the server's start), and the server's CPU seconds."""
    sock = work / "export.sock"
    sock.unlink(missing_ok=True)
    out = work / "out.qcow2"
    out.unlink(missing_ok=True)
    start = time.monotonic()
    server = start_server(
        tree, ["-m", "nbdvma", "export", str(archive), "--listen", f"unix:{sock}"], work, sock
    )
    subprocess.run(
        ["qemu-img", "convert", "-O", "qcow2", f"nbd+unix:///d0?socket={sock}", str(out)],
        check=True,
    )
    wall = time.monotonic() - start
    os.kill(server.pid, signal.SIGTERM)
    _, _, usage = os.wait4(server.pid, 0)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_utime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="the base tree")
    parser.add_argument("new", type=Path, help="the changed tree")
    parser.add_argument("--size", type=parse_size, default=1 << 30)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--backend", choices=["null", "vma", "export"], default="null")
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"), help="image, archive")
    parser.add_argument("--client", choices=["qemu-img", "backup"], default="qemu-img")
    args = parser.parse_args()
    if args.client == "backup" and args.backend != "vma":
        parser.error("--client backup goes with --backend vma")
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    for tree in trees.values():
        write_bytecode(tree)
    with tempfile.TemporaryDirectory(prefix="nbdvma-cmp-", dir=args.dir) as tmp:
        work = Path(tmp)
        image = work / "source.raw"
        if args.backend in ("vma", "export"):
            from bench_backup import make_disk

            make_disk(image, args.size)
        else:
            with image.open("wb") as f:
                for _ in range(args.size >> 20):
                    f.write(os.urandom(1 << 20))
        results: dict[str, list[Round]] = {name: [] for name in trees}
        archive = work / "source.vma"
        if args.backend == "export":
            subprocess.run(
                [sys.executable, "-m", "nbdvma", "create", str(archive), f"d0={image}"],
                env={**os.environ, "PYTHONPATH": str(trees["new"])},
                cwd=work,
                check=True,
            )
        with contextlib.ExitStack() as stack:
            qemu = None
            if args.client == "backup":
                source = Image("source", image, args.size, 0)
                qemu = stack.enter_context(Qemu.start([source], work))
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    if args.backend == "export":
                        results[name].append(export_round(tree, archive, work))
                    else:
                        results[name].append(
                            one_round(tree, image, args.size, work, args.backend, qemu)
                        )
    print(
        f"| tree | server CPU s, median | range | of it user s | wall s, median |  "
        f"({args.rounds} rounds, --backend {args.backend}, --client {args.client}, {args.dir})"
    )
    print("|---|---|---|---|---|")
    medians = {}
    for name, runs in results.items():
        cpu = [c for _, c, _ in runs]
        medians[name] = statistics.median(cpu)
        wall = statistics.median(w for w, _, _ in runs)
        user = statistics.median(u for _, _, u in runs)
        print(
            f"| {name} {trees[name]} | {medians[name]:.2f} | {min(cpu):.2f}-{max(cpu):.2f} "
            f"| {user:.2f} | {wall:.2f} |"
        )
    print(f"server CPU, new / old: {medians['new'] / medians['old']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
