"""Faults and load (the Hardening issue): what ``nbdvma serve`` survives, and what is lost.

* a full disk: WRITE and FLUSH answer ENOSPC, a retry after space is freed succeeds,
  ``finish`` waits for space; QEMU's ``on-target-error: stop`` job pauses and resumes;
  ``nbdvma backup`` fails cleanly;
* clients killed mid-backup, and a QEMU whose NBD connection is cut (``reconnect-delay``);
* ``serve`` killed (SIGKILL) or stopped (SIGTERM): only ``ARCHIVE.part`` (+ journal) stays,
  and ``nbdvma verify`` calls it incomplete;
* FLUSH then a crash: flushed extents are in ``.part``, flushed partial clusters in the
  journal;
* load: 8 disks at once beside 50 idle, half-negotiated and garbage connections.

The real-client tests are ``interop``; the archive is put on a tmpfs mounted by the
test (root is required; ``mount -t tmpfs``) where a full disk is needed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio
from conftest import QemuVm
from nbd_client_sansio import REQUEST_MAGIC, SocketClient, client_flags, request
from servehelpers import ServeProcess, extract_disks, nbdvma, poll_until, start_serve

from nbdvma.errors import VmaFormatError
from nbdvma.qmp import QmpClient
from nbdvma.vma.digest import DataDigest
from nbdvma.vma.format import VMA_CLUSTER_SIZE
from nbdvma.vma.journal import parse_journal, read_journal
from nbdvma.vma.reader import VmaReader
from nbdvma.vma.sink import FileSink, Sink
from nbdvma.vma.writer import VmaWriter

KiB = 1024
MiB = 1024 * KiB
C = VMA_CLUSTER_SIZE
PY = sys.executable
#: Deadline for anything a test waits for (a job, a server exit, a line).
DEADLINE = 60.0

interop = pytest.mark.interop


# -- helpers ------------------------------------------------------------------------------


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``tmpfs(size) -> Path``: a fresh tmpfs of ``size`` bytes, unmounted at teardown."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
            check=True,
            capture_output=True,
        )
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize(path: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def fill(directory: Path, name: str = "ballast", limit: int | None = None) -> Path:
    """Write a ballast file until the file system is full (or ``limit`` bytes)."""
    path = directory / name
    chunk = bytes(MiB)
    n = len(chunk)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while n >= 512 and (limit is None or written < limit):
            try:
                written += os.write(fd, chunk[: n if limit is None else min(n, limit - written)])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                n //= 2
    finally:
        os.close(fd)
    return path


def nbd_errno(exc: Any) -> int:
    """libnbd's ``Error.errno`` is the errno's *name* (``"ENOSPC"``); as a number."""
    value = exc.errno
    return int(getattr(errno, value)) if isinstance(value, str) else int(value)


def connect(libnbd: ModuleType, uri: str) -> Any:
    h = libnbd.NBD()
    h.connect_uri(uri)
    return h


def check_archive(archive: Path, into: Path, expected: dict[str, bytes]) -> None:
    """``nbdvma verify`` passes and ``nbdvma extract`` gives back ``expected``."""
    assert archive.exists()
    assert not Path(f"{archive}.part").exists()
    assert not Path(f"{archive}.part.journal").exists()
    nbdvma("verify", str(archive))
    got = extract_disks(archive, into)
    assert set(got) == set(expected)
    for name, data in expected.items():
        assert len(got[name]) == len(data), name
        assert got[name] == data, f"{name}: restored bytes differ"


def wait_for_text(server: ServeProcess, needle: str, timeout: float = DEADLINE) -> None:
    poll_until(lambda: needle in server.stderr() or not server.alive(), timeout, repr(needle))
    assert needle in server.stderr(), server.stderr()


def qmp_run(vm: QemuVm, script: Callable[[QmpClient], Any]) -> None:
    """Run ``await script(client)`` on a QMP connection to ``vm``."""

    async def main() -> None:
        async with QmpClient.connect(vm.qmp_address) as client:
            await script(client)

    trio.run(main)


def nbd_target(node: str, server: dict[str, str], export: str, **extra: Any) -> dict[str, Any]:
    return {
        "driver": "raw",
        "node-name": node,
        "file": {"driver": "nbd", "server": server, "export": export, **extra},
    }


async def job_status(client: QmpClient, job: str) -> dict[str, Any]:
    jobs = await client.execute("query-block-jobs")
    (info,) = [j for j in jobs if j["device"] == job]
    return dict(info)


async def wait_job(
    client: QmpClient, job: str, ok: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    with trio.fail_after(DEADLINE):
        while True:
            info = await job_status(client, job)
            if ok(info):
                return info
            await trio.sleep(0.02)
    raise AssertionError(what)  # pragma: no cover


def files_of(directory: Path, stem: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(stem))


# -- 0. the writer alone: a finish retried after ENOSPC ------------------------------------


Buffer = bytes | bytearray | memoryview


class FullDisk:
    """A sink (the public :class:`~nbdvma.vma.sink.Sink` protocol) around a real one
    whose appends fail with ENOSPC, as a full disk's do, while :attr:`full` is set."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.full = False
        self.readable = inner.readable
        self.seekable = inner.seekable

    def append(self, parts: Sequence[Buffer]) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.inner.append(parts)

    def reserve(self, nbytes: int) -> None:
        self.inner.reserve(nbytes)

    def write_header(self, header: bytes) -> None:
        self.inner.write_header(header)

    def read_unit(self, index: int, offset: int, length: int) -> bytes:
        return self.inner.read_unit(index, offset, length)

    def release(self, buffer: object) -> None:
        self.inner.release(buffer)

    def patch_header(self, header: bytes) -> None:
        self.inner.patch_header(header)

    def data_digest(self) -> DataDigest | None:
        return self.inner.data_digest()

    def sync(self) -> None:
        self.inner.sync()

    def write_journal(self, data: bytes | None) -> None:
        self.inner.write_journal(data)

    def commit(self) -> None:
        self.inner.commit()

    def abort(self) -> None:
        self.inner.abort()


def test_finish_retried_after_enospc_counts_once(tmp_path: Path) -> None:
    """A finish that fails and is retried emits every cluster once, and the zero
    bytes of never-written clusters are counted once (the summary line's figure)."""
    sink = FullDisk(FileSink(str(tmp_path / "a.vma")))
    writer = VmaWriter(sink)
    dev = writer.add_device("d0", 200 * C)
    data = random_bytes(60 * C, 9)
    writer.write(dev, 0, data)  # one extent out, 2 clusters pending, 140 untouched
    sink.full = True
    for _ in range(3):
        with pytest.raises(OSError, match="No space"):
            writer.finish()
    sink.full = False
    writer.finish()
    progress = writer.progress(dev)
    assert progress.zero_bytes == 140 * C
    assert progress.stored_bytes == 60 * C
    with (tmp_path / "a.vma").open("rb") as f:
        reader = VmaReader(f)
        seen = [cl.cluster for cl in reader.clusters()]
        reader.check_missing()
    assert sorted(seen) == list(range(200))


def test_journal_format_disk_and_stream_records_and_rejections(tmp_path: Path) -> None:
    """The journal as documented in nbdvma.vma.journal: disk records by cluster, the
    stream's tail by byte offset; damaged journals are rejected, never misread."""
    sink = FileSink(str(tmp_path / "j.vma"))
    writer = VmaWriter(sink)
    disk = writer.add_device("d0", 4 * C)
    stream = writer.add_stream()
    writer.write(disk, 2 * C + 10, b"\x01" * 20)
    writer.append(stream, b"\x02" * (C + 300))  # one whole cluster, a 300-byte tail
    writer.flush()
    journal = read_journal(sink.journal_path)
    assert journal.uuid == writer.uuid
    assert [(r.dev_id, r.index, r.pieces) for r in journal.records] == [
        (disk, 2, ((10, b"\x01" * 20),)),
        (stream, C, ((0, b"\x02" * 300),)),
    ]
    raw = Path(sink.journal_path).read_bytes()
    for bad in (
        b"NBDVMAJ0" + raw[8:],  # magic
        raw[:-1],  # truncated data
        raw[:30],  # truncated record header
        raw[:24] + struct.pack(">HBQII", 1, 1, 0, 10, 10),  # empty range
        raw[:24] + struct.pack(">HBQII", 1, 1, 0, 0, C + 1),  # past 64 KiB
        raw[:24]
        + struct.pack(">HBQ", 2, 1, 0)
        + struct.pack(">II", 5, 6)
        + b"x"
        # overlapping / unsorted second range
        + struct.pack(">II", 0, 1)
        + b"y",
    ):
        with pytest.raises(VmaFormatError):
            parse_journal(bad)
    writer.abort()


# -- 1. disk full ---------------------------------------------------------------------------


@interop
def test_disk_full_enospc_retry_and_finish_waits_for_space(
    libnbd: ModuleType, tmpfs: Callable[[int], Path], sockdir: Path, workdir: Path
) -> None:
    """WRITE and FLUSH answer ENOSPC (not EIO); once space is freed the failed request
    succeeds when retried; a finish that hits ENOSPC says so once and retries."""
    size = 16 * MiB
    data = random_bytes(size, 1)
    fs = tmpfs(6 * MiB)
    archive = fs / "vm.vma"
    server = start_serve(archive, {"d0": size}, sockdir=sockdir, logdir=workdir, tcp=False)
    try:
        h = connect(libnbd, server.uri("d0"))
        failed_at = None
        failure: Any = None
        for off in range(0, size, MiB):
            try:
                h.pwrite(data[off : off + MiB], off)
            except libnbd.Error as exc:
                failure, failed_at = exc, off
                break
        assert failed_at is not None, "the 6 MiB tmpfs never filled"
        assert nbd_errno(failure) == errno.ENOSPC, failure
        with pytest.raises(libnbd.Error) as info:
            h.flush()
        assert nbd_errno(info.value) == errno.ENOSPC
        assert server.alive()
        # Said once (not per request), with the file and the free space.
        (full,) = [ln for ln in server.stderr().splitlines() if "ENOSPC" in ln]
        assert re.fullmatch(
            rf"nbdvma serve: warning: d0: NBD_CMD_WRITE answered ENOSPC: no space left for "
            rf"{re.escape(str(archive))}\.part \([0-9.]+ (bytes|KiB|MiB) free on its file "
            r"system\); clients get ENOSPC until space is freed",
            full,
        ), full

        resize(fs, 64 * MiB)
        h.pwrite(data[failed_at : failed_at + MiB], failed_at)  # the failed request again
        h.flush()
        for off in range(failed_at + MiB, size, MiB):
            h.pwrite(data[off : off + MiB], off)
        # Everything is acknowledged; the last extent is still in memory.  Fill the
        # disk, so that finish (on disconnect) hits ENOSPC.
        ballast = fill(fs)
        assert os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize < C
        h.shutdown()
        retrying = "no space left to finish the archive; retrying"
        wait_for_text(server, retrying)
        # It keeps waiting (and says so only once) while the disk is full.
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            assert server.alive(), server.stderr()
            time.sleep(0.05)
        assert not archive.exists()
        assert Path(f"{archive}.part").exists()
        ballast.unlink()
        assert server.wait(DEADLINE) == 0, server.stderr()
    finally:
        server.kill()
    err = server.stderr()
    assert err.count(retrying) == 1, err
    assert "nbdvma serve: warning: d0: NBD_CMD_WRITE succeeded: space available again" in err
    assert "space available again; archive finished" in err
    assert "Traceback" not in err
    check_archive(archive, workdir / "restore", {"d0": data})


@interop
def test_qemu_job_pauses_on_enospc_and_resumes(
    qemu_vm: Callable[..., QemuVm],
    raw_image: Callable[..., Path],
    tmpfs: Callable[[int], Path],
    sockdir: Path,
    workdir: Path,
) -> None:
    """``blockdev-backup`` with ``on-target-error: stop``: ENOSPC pauses the job; space
    freed and ``block-job-resume``: the job completes and the archive is whole."""
    size = 24 * MiB
    data = random_bytes(size, 2)
    vm = qemu_vm([raw_image("src.raw", size, {0: data})])
    fs = tmpfs(40 * MiB)
    ballast = fill(fs, limit=24 * MiB)  # 16 MiB left for a 24 MiB archive
    archive = fs / "vm.vma"
    server = start_serve(archive, {"drive-scsi0": size}, sockdir=sockdir, logdir=workdir, tcp=False)
    assert server.unix is not None
    target = {"type": "unix", "path": server.unix}

    async def script(client: QmpClient) -> None:
        events = client.events()
        await client.execute("blockdev-add", nbd_target("tgt0", target, "drive-scsi0"))
        await client.execute(
            "blockdev-backup",
            {
                "job-id": "bk0",
                "device": "disk0",
                "target": "tgt0",
                "sync": "full",
                "on-target-error": "stop",
            },
        )
        event = await events.wait("BLOCK_JOB_ERROR", timeout=DEADLINE)
        assert event.data["action"] == "stop", event.data
        assert event.data["operation"] == "write", event.data
        info = await wait_job(
            client, "bk0", lambda j: j["status"] == "paused" and not j["busy"], "paused"
        )
        assert info["io-status"] == "nospace", info
        assert info["offset"] < size
        assert server.alive()
        assert not archive.exists()
        ballast.unlink()
        await client.execute("block-job-resume", {"device": "bk0"})
        event = await events.wait("BLOCK_JOB_COMPLETED", timeout=DEADLINE)
        assert "error" not in event.data, event.data
        assert event.data["offset"] == size
        await client.execute("blockdev-del", {"node-name": "tgt0"})

    try:
        qmp_run(vm, script)
        assert server.wait(DEADLINE) == 0, server.stderr()
    finally:
        server.kill()
    check_archive(archive, workdir / "restore", {"drive-scsi0": data})


@interop
def test_backup_on_a_full_disk_fails_cleanly(
    qemu_vm: Callable[..., QemuVm],
    raw_image: Callable[..., Path],
    tmpfs: Callable[[int], Path],
) -> None:
    """``nbdvma backup`` into a file system too small: exit 1, one ERROR line naming the
    cause, the VM as it was (running, no node or job left), no final archive."""
    size = 16 * MiB
    vm = qemu_vm([raw_image("src.raw", size, {0: random_bytes(size, 3)})])
    fs = tmpfs(4 * MiB)
    archive = fs / "vm.vma"

    async def cont(client: QmpClient) -> None:
        await client.execute("cont")

    qmp_run(vm, cont)
    result = subprocess.run(
        [PY, "-m", "nbdvma", "backup", "--qmp", vm.qmp_address, str(archive)],
        capture_output=True,
        text=True,
        timeout=DEADLINE * 2,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 1, result.stderr
    assert "drive-scsi0" in errors[0]
    assert "No space left on device" in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    assert not archive.exists()

    async def check(client: QmpClient) -> None:
        assert (await client.execute("query-status"))["status"] == "running"
        assert await client.execute("query-block-jobs") == []
        nodes = [n["node-name"] for n in await client.execute("query-named-block-nodes")]
        assert not [n for n in nodes if n.startswith("nbdvma-")], nodes

    qmp_run(vm, check)


# -- 2. a client killed mid-backup; a cut connection --------------------------------------


@interop
def test_qemu_img_killed_then_qemu_backup_finishes_the_disk(
    qemu_img: str,
    nbdkit: str,
    qemu_vm: Callable[..., QemuVm],
    raw_image: Callable[..., Path],
    sockdir: Path,
    workdir: Path,
) -> None:
    """qemu-img (2 requests in flight, 4 KiB zero detection) is SIGKILLed part-way;
    QEMU's blockdev-backup then writes the whole disk again, replaying identical
    clusters over stored, pending and partial ones: a correct archive."""
    size = 16 * MiB
    data = bytearray(random_bytes(size, 4))
    data[C : 3 * C] = bytes(2 * C)  # zero clusters
    data[5 * C + 4096 : 5 * C + 8192] = bytes(4096)  # a zero block inside data
    src = raw_image("src.raw", size, {0: bytes(data)})
    archive = workdir / "vm.vma"
    server = start_serve(archive, {"drive-scsi0": size}, sockdir=sockdir, logdir=workdir)
    slow_sock = sockdir / "slow.sock"
    slow = subprocess.Popen(
        # 64 Mbit/s = 8 MiB/s: 2 s for the disk
        [nbdkit, "-f", "-r", "-U", str(slow_sock), "--filter=rate", "file", str(src), "rate=64M"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        poll_until(slow_sock.exists, 10, "nbdkit's socket")
        proc = subprocess.Popen(
            [
                *(qemu_img, "convert", "-W", "-m", "2", "-n", "-f", "raw", "-O", "raw"),
                *(f"nbd+unix://?socket={slow_sock}", server.uri("drive-scsi0")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # The first extent (58 clusters, 23% of the disk) is in the file: kill it.
            part = Path(f"{archive}.part")
            poll_until(lambda: part.stat().st_size > MiB or proc.poll() is not None, 30, "data")
        finally:
            proc.kill()  # SIGKILL
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, "qemu-img ended before it was killed"
    finally:
        slow.kill()
        slow.wait()
    assert server.alive(), server.stderr()
    assert not archive.exists()

    vm = qemu_vm([src])
    assert server.unix is not None
    target = {"type": "unix", "path": server.unix}

    async def script(client: QmpClient) -> None:
        events = client.events()
        await client.execute("blockdev-add", nbd_target("tgt0", target, "drive-scsi0"))
        await client.execute(
            "blockdev-backup",
            {"job-id": "bk0", "device": "disk0", "target": "tgt0", "sync": "full"},
        )
        event = await events.wait("BLOCK_JOB_COMPLETED", timeout=DEADLINE)
        assert "error" not in event.data, event.data
        await client.execute("blockdev-del", {"node-name": "tgt0"})

    try:
        qmp_run(vm, script)
        assert server.wait(DEADLINE) == 0, server.stderr()
    finally:
        server.kill()
    check_archive(archive, workdir / "restore", {"drive-scsi0": bytes(data)})


@interop
def test_qemu_reconnects_after_its_connection_is_cut(
    qemu_vm: Callable[..., QemuVm],
    raw_image: Callable[..., Path],
    sockdir: Path,
    workdir: Path,
) -> None:
    """QEMU's NBD node with ``reconnect-delay``: its TCP connection to serve is killed
    (``ss -K``) mid-backup; QEMU reconnects and re-sends what had no reply; the job
    completes and the archive is whole."""
    size = 16 * MiB
    data = random_bytes(size, 5)
    vm = qemu_vm([raw_image("src.raw", size, {0: data})])
    archive = workdir / "vm.vma"
    server = start_serve(
        archive,
        {"drive-scsi0": size},
        sockdir=sockdir,
        logdir=workdir,
        unix=False,
        extra=["--verbose"],
    )
    port = server.tcp_port
    assert port is not None
    killed: list[str] = []

    async def script(client: QmpClient) -> None:
        events = client.events()
        target = {"type": "inet", "host": "127.0.0.1", "port": str(port)}
        node = nbd_target("tgt0", target, "drive-scsi0", **{"reconnect-delay": 10})
        await client.execute("blockdev-add", node)
        await client.execute(
            "blockdev-backup",
            {
                "job-id": "bk0",
                "device": "disk0",
                "target": "tgt0",
                "sync": "full",
                "speed": 6 * MiB,  # about 3 s: time to cut the connection mid-way
            },
        )
        await wait_job(client, "bk0", lambda j: j["offset"] >= 3 * MiB, "progress")
        result = await trio.run_process(
            ["ss", "-K", "-t", "dst", "127.0.0.1", "dport", "=", str(port)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        killed.extend(ln for ln in result.stdout.decode().splitlines() if "ESTAB" in ln)
        info = await job_status(client, "bk0")
        assert info["offset"] < size, "the job ended before the cut"
        event = await events.wait("BLOCK_JOB_COMPLETED", timeout=DEADLINE)
        assert "error" not in event.data, event.data
        await client.execute("blockdev-del", {"node-name": "tgt0"})

    try:
        qmp_run(vm, script)
        assert killed, "ss -K found no connection to kill"
        assert server.wait(DEADLINE) == 0, server.stderr()
    finally:
        server.kill()
    err = server.stderr()
    assert err.count("transmission on export 'drive-scsi0'") >= 2, err  # a reconnect
    check_archive(archive, workdir / "restore", {"drive-scsi0": data})


# -- 3. serve killed or stopped -------------------------------------------------------------


@interop
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_serve_killed_leaves_only_an_incomplete_part(
    libnbd: ModuleType, sockdir: Path, workdir: Path, signum: int
) -> None:
    """SIGKILL or SIGTERM before the end: no final name, only ``ARCHIVE.part`` (and the
    journal of the last FLUSH); ``nbdvma verify`` fails it as incomplete.  SIGTERM
    exits 128+15 with one line naming the incomplete disks."""
    disks = {"written": 2 * MiB, "half": 4 * MiB, "untouched": MiB}
    archive = workdir / "vm.vma"
    server = start_serve(archive, disks, sockdir=sockdir, logdir=workdir, tcp=False)
    try:
        h = connect(libnbd, server.uri("written"))
        h.pwrite(random_bytes(2 * MiB, 6), 0)
        h.shutdown()
        h2 = connect(libnbd, server.uri("half"))
        h2.pwrite(random_bytes(2 * MiB, 7), 0)
        h2.pwrite(b"\x5a" * 1000, 3 * MiB + 100)  # a partial cluster: to the journal
        h2.flush()
        server.signal(signum)
        status = server.wait(DEADLINE)
    finally:
        server.kill()
    assert files_of(workdir, "vm.vma") == ["vm.vma.part", "vm.vma.part.journal"]
    err = server.stderr()
    if signum == signal.SIGKILL:
        assert status == -signal.SIGKILL
    else:
        assert status == 128 + signal.SIGTERM, err
        assert "Traceback" not in err
        (line,) = [ln for ln in err.splitlines() if "incomplete:" in ln]
        assert "SIGTERM" in line
        assert "vm.vma.part" in line
        incomplete = line.rsplit("incomplete:", 1)[1].replace(",", " ").split()
        assert sorted(incomplete) == ["half", "untouched"], line
    result = nbdvma("verify", str(workdir / "vm.vma.part"), check=False)
    assert result.returncode != 0, result.stdout
    assert "incomplete" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# -- 4. a FLUSH acknowledged before a crash -----------------------------------------------


def read_part(path: Path) -> tuple[bytes, dict[tuple[int, int], bytes]]:
    """The uuid and ``{(dev_id, cluster): 64 KiB}`` of every extent readable in a
    ``.part``; a torn last extent (written after the last flush) may fail."""
    out: dict[tuple[int, int], bytes] = {}
    with path.open("rb") as f:
        reader = VmaReader(f)
        try:
            for cl in reader.clusters():
                full = bytearray(C)
                pos = 0
                for j in range(16):
                    if cl.mask >> j & 1:
                        full[j * 4096 : (j + 1) * 4096] = cl.data[pos : pos + 4096]
                        pos += 4096
                out[(cl.dev.dev_id, cl.cluster)] = bytes(full)
        except VmaFormatError as exc:
            if "short" not in str(exc):  # only the tail may be cut
                raise
        return reader.header.uuid, out


@interop
def test_flush_then_crash_keeps_flushed_clusters_and_journal(
    libnbd: ModuleType, sockdir: Path, workdir: Path
) -> None:
    """Whole clusters and partial clusters written, FLUSH acknowledged, more writes,
    SIGKILL: the flushed whole clusters read back from ``.part`` and the flushed
    partial clusters' bytes are in the journal."""
    size = 16 * MiB
    data = random_bytes(size, 8)
    archive = workdir / "vm.vma"
    server = start_serve(archive, {"d0": size}, sockdir=sockdir, logdir=workdir, tcp=False)
    try:
        h = connect(libnbd, server.uri("d0"))
        whole = 70  # one 58-cluster extent on its way, 12 pending at the flush
        h.pwrite(data[: whole * C], 0)
        pieces = [  # cluster 100: two pieces; cluster 101: one; cluster 200: the start
            (100 * C + 1000, 4000),
            (100 * C + 30000, 100),
            (101 * C + 65000, 536),
            (200 * C, 12345),
        ]
        for off, n in pieces:
            h.pwrite(data[off : off + n], off)
        h.flush()
        # Not flushed: allowed to be lost (some may reach the file, a tail may be torn).
        h.pwrite(data[whole * C : 150 * C], whole * C)
        h.pwrite(data[100 * C + 9000 : 100 * C + 9100], 100 * C + 9000)
        server.process.kill()
        server.process.wait()
    finally:
        server.kill()
    uuid, stored = read_part(Path(f"{archive}.part"))
    for cluster in range(whole):
        got = stored.get((1, cluster))
        assert got is not None, f"flushed cluster {cluster} is missing from the .part"
        assert got == data[cluster * C : (cluster + 1) * C], f"cluster {cluster} differs"
    for (dev, cluster), got in stored.items():  # whatever else got there is right too
        assert dev == 1
        assert got == data[cluster * C : (cluster + 1) * C] or cluster >= whole
    journal = read_journal(f"{archive}.part.journal")
    assert journal.uuid == uuid
    records = {(r.dev_id, r.index): r for r in journal.records}
    assert sorted(records) == [(1, 100), (1, 101), (1, 200)]
    assert records[(1, 100)].pieces == (
        (1000, data[100 * C + 1000 : 100 * C + 5000]),
        (30000, data[100 * C + 30000 : 100 * C + 30100]),
    )
    assert records[(1, 101)].pieces == ((65000, data[101 * C + 65000 : 102 * C]),)
    assert records[(1, 200)].pieces == ((0, data[200 * C : 200 * C + 12345]),)
    expect = bytearray(C)
    expect[1000:5000] = data[100 * C + 1000 : 100 * C + 5000]
    expect[30000:30100] = data[100 * C + 30000 : 100 * C + 30100]
    assert records[(1, 100)].cluster_bytes() == bytes(expect)


# -- 5. load ------------------------------------------------------------------------------------

#: Peak resident memory ``serve`` may reach under the load test.
RSS_LIMIT = 250 * MiB


def open_tcp(port: int) -> SocketClient:
    return SocketClient.tcp(port)


def greeted(port: int) -> SocketClient:
    c = open_tcp(port)
    assert c.greeting() == 3
    return c


def negotiated(port: int, export: str) -> SocketClient:
    """A connection in transmission on ``export`` (fixed newstyle, NBD_OPT_GO)."""
    c = open_tcp(port)
    c.handshake(export, structured=False)
    return c


def garbage(port: int, kind: int, export: str) -> SocketClient:
    """A connection that breaks the protocol in one of four ways; each is a hard
    disconnect by the spec (or qemu-nbd/nbdkit practice)."""
    rng = random.Random(kind)
    if kind % 4 == 0:  # not NBD at all, not even reading the greeting
        c = open_tcp(port)
        payload = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + rng.randbytes(200)
    elif kind % 4 == 1:  # unknown client flags
        c = greeted(port)
        payload = client_flags(0xFFFF0003) + rng.randbytes(100)
    elif kind % 4 == 2:  # an option with a bad magic
        c = greeted(port)
        payload = client_flags(3) + b"IHAVEOPX" + rng.randbytes(100)
    else:  # in transmission: a request with a bad magic
        c = negotiated(port, export)
        payload = request(1, cookie=7, length=512, magic=REQUEST_MAGIC ^ 1) + rng.randbytes(512)
    with contextlib.suppress(OSError):  # the server may close while we still send
        c.send(payload)
    return c


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    raise AssertionError("no VmHWM")


@interop
def test_eight_disks_under_fifty_idle_or_hostile_connections(
    qemu_img: str, raw_image: Callable[..., Path], sockdir: Path, workdir: Path
) -> None:
    """8 qemu-img converts at once (unix and TCP) while 20 connections sit idle in
    transmission, 15 stop mid-handshake and 15 send garbage: the backup is intact,
    garbage is disconnected, half-negotiated clients are dropped at the handshake
    deadline, idle ones are kept, and the peak RSS of serve stays bounded."""
    size = 4 * MiB
    names = [f"drive-scsi{i}" for i in range(8)]
    data = {name: random_bytes(size, 100 + i) for i, name in enumerate(names)}
    for i, name in enumerate(names):
        data[name] = data[name][: i * C] + bytes(2 * C) + data[name][(i + 2) * C :]
    srcs = {name: raw_image(f"{name}.raw", size, {0: data[name]}) for name in names}
    archive = workdir / "vm.vma"
    server = start_serve(
        archive,
        dict.fromkeys(names, size),
        sockdir=sockdir,
        logdir=workdir,
        extra=["--handshake-timeout", "3"],
    )
    port = server.tcp_port
    assert port is not None
    idle: list[SocketClient] = []
    half: list[SocketClient] = []
    hostile: list[SocketClient] = []
    converts: list[subprocess.Popen[bytes]] = []
    try:
        idle = [negotiated(port, names[i % 8]) for i in range(20)]
        half = [open_tcp(port) if i % 2 else greeted(port) for i in range(15)]
        for i, name in enumerate(names):
            uri = server.uri(name, "unix" if i % 2 else "tcp")
            converts.append(
                subprocess.Popen(
                    [qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(srcs[name]), uri],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
        hostile = [garbage(port, k, names[k % 8]) for k in range(15)]
        for proc in converts:
            _, err = proc.communicate(timeout=DEADLINE)
            assert proc.returncode == 0, err
        # Closed for the garbage, well before the 3 s handshake deadline could do it.
        poll_until(lambda: all(s.closed_now() for s in hostile), 2.5, "garbage closed")
        poll_until(lambda: all(s.closed_now() for s in half), 15, "handshakes dropped")
        assert not any(s.closed_now() for s in idle), "an idle client was dropped"
        # Every disk is written, but idle clients are still connected to them.
        assert server.alive(), server.stderr()
        assert not archive.exists()
        rss = peak_rss(server.process.pid)
        print(f"serve peak RSS {rss / MiB:.1f} MiB")
        assert rss < RSS_LIMIT, f"serve peaked at {rss / MiB:.0f} MiB"
        for s in idle:
            s.close()
        assert server.wait(DEADLINE) == 0, server.stderr()
    finally:
        for proc in converts:
            proc.kill()
            proc.wait()
        for s in idle + half + hostile:
            s.close()
        server.kill()
    assert "Traceback" not in server.stderr()
    check_archive(archive, workdir / "restore", data)
