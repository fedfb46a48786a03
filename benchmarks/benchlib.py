"""Helpers shared by the benchmarks: a tmpfs they mount themselves, CPU time and peak
RSS of a child, waiting for a server to come up, the work and socket directories,
rounds of contestants in rotating order.

Not a benchmark itself.  The scripts of ``benchmarks/`` import it as a sibling module
(a script's own directory is the first entry of ``sys.path``).

Importing it writes the bytecode of the nbdvma package the benchmarks run
(:func:`write_bytecode`).
"""

from __future__ import annotations

import compileall
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TypeVar

import attrs

R = TypeVar("R")

MiB = 1 << 20
GiB = 1 << 30
_CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent


def write_bytecode(tree: Path) -> None:
    """Write the bytecode of ``tree``'s nbdvma package, as installing it does.

    Without it, a machine that sets ``PYTHONDONTWRITEBYTECODE`` (this one does)
    compiles every module changed since its bytecode was last written at each start:
    48 modules, 0.05-0.06 s of the 0.2 s an ``nbdvma export`` took to import, and so
    of every start-up and CPU figure measured.
    """
    compileall.compile_dir(tree / "nbdvma", quiet=1)


# The package ``python -P -m nbdvma`` imports: the first on PYTHONPATH, else this one.
for _entry in [*os.environ.get("PYTHONPATH", "").split(os.pathsep), str(REPO)]:
    if _entry and (Path(_entry) / "nbdvma").is_dir():
        write_bytecode(Path(_entry))
        break


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 10 ms until it holds; ``RuntimeError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


@attrs.frozen
class Usage:
    """What ``wait4`` says of an ended child: CPU seconds (user + system, all its
    threads), peak RSS in bytes, and the system part of ``cpu`` (the kernel's work for
    it: copies, page allocation, system calls)."""

    cpu: float
    maxrss: int
    system: float = 0.0


def reap(proc: subprocess.Popen[bytes], timeout: float = 600, poll: float = 0.002) -> Usage:
    """Wait for ``proc`` to end by itself (SIGKILL after ``timeout``) and return its
    :class:`Usage`.  Polls every ``poll`` seconds, so the caller's clock read right
    after is at most that late."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return Usage(usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, usage.ru_stime)
        if time.monotonic() > deadline:
            proc.kill()
            deadline = time.monotonic() + 10
        time.sleep(poll)


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10) -> Usage:
    """SIGTERM ``proc`` (unless it has ended) and return its :class:`Usage`.

    ``os.kill``, not ``Popen.terminate``: that may reap an ended child before ``wait4``.
    """
    if proc.returncode is not None:
        raise RuntimeError(f"pid {proc.pid} was reaped already: no rusage left")
    os.kill(proc.pid, signal.SIGTERM)  # an unreaped child exists, even if it has ended
    return reap(proc, timeout)


def kill(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL and reap ``proc`` if it is still running (for ``finally`` blocks)."""
    if proc is not None and proc.returncode is None:
        proc.kill()
        proc.wait()


def cpu_so_far(pid: int) -> float:
    """CPU seconds (user + system) a running process has used, from ``/proc/PID/stat``.

    Used to read a server's start-up cost, and QEMU's CPU during one job.
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@contextmanager
def tmpfs(size: int, prefix: str = "nbdvma-bench-tmpfs-") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` bytes on a new directory under /tmp; unmount and remove
    the directory on exit (also on failure and Ctrl-C).  Needs root.

    Its pages are memory: writes into it cost the writer's CPU and no disk, which is
    what the benchmarks' tmpfs modes measure.  The directory is only ever ``rmdir``-ed,
    so nothing is deleted through a mount that failed to go away.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
            check=True,
        )
    except BaseException:
        path.rmdir()
        raise
    try:
        yield path
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(path)], check=False).returncode == 0:
                break
            time.sleep(0.1)  # a child still closing its files
        else:
            subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


def work_dirs(stack: ExitStack, workdir: Path | None, name: str) -> tuple[Path, Path]:
    """The benchmark's work directory (``workdir``, kept; or a new one under /var/tmp,
    removed at the end) and a short directory for unix sockets under /tmp (removed)."""
    if workdir is None:
        work = Path(tempfile.mkdtemp(prefix=f"nbdvma-{name}-", dir="/var/tmp"))
        stack.callback(shutil.rmtree, work, True)
    else:
        work = workdir
        work.mkdir(parents=True, exist_ok=True)
    sockdir = Path(tempfile.mkdtemp(prefix=f"nbdvma-{name}-s-", dir="/tmp"))
    stack.callback(shutil.rmtree, sockdir, True)
    return work, sockdir


def fmt_runs(values: list[float], digits: int = 2) -> str:
    """``1.23 / 1.31 / 1.20``: the per-run figures, in run order."""
    return " / ".join(f"{v:.{digits}f}" for v in values)


def verdict(ok: bool) -> str:
    """``met`` or ``MISSED``, for the target lines."""
    return "met" if ok else "MISSED"


def rotated_rounds(
    keys: Sequence[str],
    runs: int,
    warmup: int,
    run: Callable[[str, int], R],
    show: Callable[[R], str],
    what: str = "",
) -> dict[str, list[R]]:
    """``warmup`` + ``runs`` rounds of ``run(key, round)`` for every key, the order
    rotated every round (each key starts a round as often as the others); ``os.sync``
    before each, outside the timing, so that none pays for another's write-back.  One
    line per round (``show`` of each result); the warm-up rounds are not kept."""
    results: dict[str, list[R]] = {key: [] for key in keys}
    for r in range(warmup + runs):
        counted = r >= warmup
        shift = r % len(keys)
        line = []
        for key in [*keys[shift:], *keys[:shift]]:
            os.sync()
            result = run(key, r)
            if counted:
                results[key].append(result)
            line.append(f"{key} {show(result)}")
        tag = f"run {r - warmup + 1}" if counted else "warm-up"
        print(f"{what + ' ' if what else ''}{tag}: {', '.join(line)}", flush=True)
    return results
