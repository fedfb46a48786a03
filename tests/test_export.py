"""``nbdvma export`` and ``nbdvma restore`` against the real clients.

Archives are made by ``nbdvma create`` (plain and ``.vma.zst``) from sparse raw images
with random data, zero runs, lone 4 KiB blocks and a partial last cluster, or by the
``zstd`` CLI from a plain one (one stream, as vzdump writes it).  Each export runs as
``python -m nbdvma export`` on a unix socket; qemu-img, qemu-io, nbdinfo, nbdcopy and
libnbd read it, and what they get is compared with the source images.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pytest
import trio
from servehelpers import nbdvma, poll_until, run_tool

from nbdvma.archive_backend import PrepareState, PrepareWatcher, open_archive, prepare
from nbdvma.restore import restore_archive
from nbdvma.vma.fileio import FileRuns
from nbdvma.vma.index import READ_NOW_MAX, build_index
from nbdvma.vma.sink import open_sink
from nbdvma.vma.writer import VmaWriter

pytestmark = pytest.mark.interop

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB
#: A multiple of 512, not of 64 KiB: the last cluster is partial.
ODD_SIZE = 2 * MiB + 5 * 4096 + 1536
_LISTEN = re.compile(r"^nbdvma export: listening on unix:(.+)$", re.MULTILINE)


@attrs.define
class Export:
    """A running ``nbdvma export``."""

    process: subprocess.Popen[bytes]
    stderr_path: Path
    socket: str = ""

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.socket}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        return self.process.wait(30)


def _export_command(archive: Path, sock: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "nbdvma", "export", str(archive), "--listen", f"unix:{sock}"]


@pytest.fixture
def export(sockdir: Path, workdir: Path) -> Iterator[Callable[..., Export]]:
    """``export(archive, *extra) -> Export``, once it says ``export ready``; killed after."""
    started: list[Export] = []

    def start(archive: Path, *extra: str) -> Export:
        err = workdir / f"export-{len(started)}.err"
        sock = sockdir / f"e{len(started)}.sock"
        with err.open("wb") as f:
            process = subprocess.Popen(
                [*_export_command(archive, sock, []), *extra],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=f,
            )
        exp = Export(process, err)
        started.append(exp)
        deadline = time.monotonic() + 30
        while "export ready" not in exp.stderr():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"export did not start:\n{exp.stderr()}")
            time.sleep(0.02)
        match = _LISTEN.search(exp.stderr())
        assert match is not None, exp.stderr()
        exp.socket = match.group(1)
        return exp

    yield start
    for exp in started:
        if exp.process.poll() is None:
            exp.process.kill()
        exp.process.wait()


def _image(path: Path, size: int, seed: int) -> bytes:
    """A sparse image: random data, zero runs, lone 4 KiB blocks, a data tail."""
    rng = random.Random(seed)
    data = bytearray(size)
    data[0 : 3 * CLUSTER + 5000] = rng.randbytes(3 * CLUSTER + 5000)  # data into a partial
    for block in (10, 17, 40, 41, 63):  # lone blocks in otherwise zero clusters
        data[block * 4096 : block * 4096 + 4096] = rng.randbytes(4096)
    data[size - 3000 : size] = rng.randbytes(3000)  # the partial last cluster
    with path.open("wb") as f:
        f.truncate(size)
        for start in range(0, size, 4096):
            chunk = data[start : start + 4096]
            if any(chunk):
                f.seek(start)
                f.write(chunk)
    return bytes(data)


@attrs.frozen
class Sources:
    images: dict[str, Path]
    contents: dict[str, bytes]


@pytest.fixture
def sources(workdir: Path) -> Sources:
    images = {"drive-scsi0": workdir / "scsi0.raw", "drive-virtio1": workdir / "virtio1.raw"}
    contents = {
        "drive-scsi0": _image(images["drive-scsi0"], ODD_SIZE, 1),
        "drive-virtio1": _image(images["drive-virtio1"], 1 * MiB, 2),
    }
    return Sources(images, contents)


def _create(workdir: Path, sources: Sources, name: str) -> Path:
    archive = workdir / name
    cfg = workdir / "qemu-server.conf"
    cfg.write_text("memory: 512\nscsi0: local:vm-100-disk-0,size=2M\n")
    args = [f"{n}={p}" for n, p in sources.images.items()]
    nbdvma("create", str(archive), "-c", str(cfg), *args)
    return archive


def _archive(workdir: Path, sources: Sources, form: str) -> Path:
    if form == "plain":
        return _create(workdir, sources, "a.vma")
    if form == "zst":
        return _create(workdir, sources, "a.vma.zst")
    plain = _create(workdir, sources, "plain.vma")
    if form == "gzip":
        run_tool(["gzip", str(plain)])  # plain.vma.gz, as vzdump --compress gzip
        return workdir / "plain.vma.gz"
    if form == "lzo":
        run_tool(["lzop", "-q", "-U", str(plain)])  # plain.vma.lzo (lzop removes the input)
        return workdir / "plain.vma.lzo"
    out = workdir / "stream.vma.zst"
    run_tool(["zstd", "-q", str(plain), "-o", str(out)])
    plain.unlink()
    return out


@pytest.mark.parametrize("form", ["plain", "zst", "stream", "gzip", "lzo"])
def test_qemu_img_convert_equals_the_source(
    form: str, workdir: Path, sources: Sources, export: Callable[..., Export], qemu_img: str
) -> None:
    archive = _archive(workdir, sources, form)
    before = archive.read_bytes()
    cache = workdir / "cache"
    cache.mkdir()
    exp = export(archive, *(["--cache", str(cache)] if form == "stream" else []))
    if form in ("stream", "gzip", "lzo"):
        assert "must be decompressed once" in exp.stderr()
        where = cache if form == "stream" else workdir
        assert f"into {where}/.nbdvma-export-" in exp.stderr()
        assert list(where.glob(".nbdvma-export-*")) == []  # unlinked, served from its fd
    for name, image in sources.images.items():
        out = workdir / f"{name}.qcow2"
        run_tool([qemu_img, "convert", "-f", "raw", "-O", "qcow2", exp.uri(name), str(out)])
        run_tool([qemu_img, "compare", "-f", "qcow2", "-F", "raw", str(out), str(image)])
    assert exp.stop() == 0
    assert exp.stderr().rstrip().endswith("nbdvma export: stopped by SIGTERM")
    assert archive.read_bytes() == before


def _expected_map(data: bytes) -> list[tuple[int, int, bool]]:
    runs: list[tuple[int, int, bool]] = []
    for start in range(0, len(data), 4096):
        chunk = data[start : start + 4096]
        zero = not any(chunk)
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], runs[-1][1] + len(chunk), zero)
        else:
            runs.append((start, len(chunk), zero))
    return runs


def test_nbdinfo_map_reports_zero_blocks_as_holes(
    workdir: Path, sources: Sources, export: Callable[..., Export], nbdinfo: str
) -> None:
    exp = export(_archive(workdir, sources, "zst"))
    for name, data in sources.contents.items():
        out = run_tool([nbdinfo, "--map", exp.uri(name)]).stdout
        got = []
        for line in out.splitlines():
            offset, length, kind, *_ = line.split()
            got.append((int(offset), int(length), int(kind) == 3))
        assert got == _expected_map(data), out


def test_writes_are_refused_with_eperm(
    workdir: Path,
    sources: Sources,
    export: Callable[..., Export],
    libnbd: ModuleType,
    qemu_io: str,
) -> None:
    archive = _archive(workdir, sources, "plain")
    before = archive.read_bytes()
    exp = export(archive)
    h = libnbd.NBD()
    h.set_strict_mode(0)  # send the write: the server must refuse it, not libnbd
    h.connect_uri(exp.uri("drive-scsi0"))
    assert h.is_read_only() == 1
    assert h.get_size() == ODD_SIZE
    for attempt in (lambda: h.pwrite(b"x" * 4096, 0), lambda: h.zero(4096, 0)):
        with pytest.raises(libnbd.Error) as caught:
            attempt()
        assert caught.value.errno == "EPERM"  # answered by the server
        assert "command failed" in str(caught.value)
    assert h.pread(4096, 0) == sources.contents["drive-scsi0"][:4096]  # still serving
    h.shutdown()
    result = run_tool(
        [qemu_io, "-f", "raw", "-c", "write 0 512", exp.uri("drive-scsi0")], check=False
    )
    # QEMU sees NBD_FLAG_READ_ONLY and will not open the export for writing.
    assert result.returncode != 0
    assert "Permission denied" in result.stderr
    assert archive.read_bytes() == before


@pytest.mark.parametrize("form", ["plain", "zst"])
@pytest.mark.parametrize("extents", ["", "--no-extents"])
def test_nbdcopy_with_several_connections(
    form: str,
    extents: str,
    workdir: Path,
    sources: Sources,
    export: Callable[..., Export],
    nbdcopy: str,
) -> None:
    """Every byte, zero blocks too with ``--no-extents`` (reads that span stored and
    zero blocks: on a plain archive in the page cache, sent with ``sendfile`` and zeros
    between the runs)."""
    exp = export(_archive(workdir, sources, form))
    for name, data in sources.contents.items():
        out = workdir / f"{name}.copy"
        args = [nbdcopy, "--connections=4", "--requests=16", *filter(None, [extents])]
        run_tool([*args, exp.uri(name), str(out)])
        assert out.read_bytes() == data


def test_device_subset_and_unknown_device(
    workdir: Path, sources: Sources, export: Callable[..., Export], nbdinfo: str
) -> None:
    archive = _archive(workdir, sources, "plain")
    exp = export(archive, "--device", "drive-virtio1")
    listed = run_tool([nbdinfo, "--list", "--json", exp.uri("")]).stdout
    assert "drive-virtio1" in listed
    assert "drive-scsi0" not in listed
    result = nbdvma("export", str(archive), "--device", "nope", check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"nbdvma export: {archive}: no disk named 'nope' in the archive "
        "(it has: drive-scsi0, drive-virtio1); not exported"
    ]


def _flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def _first_extent_only(archive: Path) -> None:
    """Cut an archive after its first extent (a clean cut: only clusters are missing)."""
    data = archive.read_bytes()
    index = build_index(str(archive))
    start = index.header.header_size
    block_count = int.from_bytes(data[start + 6 : start + 8], "big")
    os.truncate(archive, start + 512 + block_count * 4096)


@pytest.mark.parametrize("damage", ["flipped", "truncated", "missing"])
def test_a_damaged_archive_is_refused_before_listening(
    damage: str, workdir: Path, sources: Sources, sockdir: Path
) -> None:
    archive = _archive(workdir, sources, "plain")
    size = archive.stat().st_size
    if damage == "flipped":
        _flip(archive, size - 2000)  # a data byte of the last extent
    elif damage == "truncated":
        os.truncate(archive, size - 5000)
    else:  # an archive without digest (written to a pipe), cut between extents
        archive = workdir / "piped.vma"
        with archive.open("wb") as out:
            args = [f"{n}={p}" for n, p in sources.images.items()]
            subprocess.run(
                [sys.executable, "-m", "nbdvma", "create", "-", *args], stdout=out, check=True
            )
        _first_extent_only(archive)
    sock = sockdir / "x.sock"
    result = run_tool(_export_command(archive, sock, []), check=False, timeout=20)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"nbdvma export: {archive}: "), lines
    why = {
        "flipped": "digest mismatch",
        "truncated": "short vma extent",
        "missing": "detected missing cluster",
    }
    assert why[damage] in lines[0]
    assert not sock.exists()


def test_stdin_and_pipes_are_refused(workdir: Path) -> None:
    result = nbdvma("export", "-", check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "nbdvma export: an archive on stdin cannot be exported: it is read in place, so "
        "save it to a file first"
    ]
    fifo = workdir / "fifo.vma"
    os.mkfifo(fifo)
    result = nbdvma("export", str(fifo), check=False, timeout=20)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"nbdvma export: {fifo} is not a regular file: an archive is exported from a file"
    ]


def _vm_archive(workdir: Path, sources: Sources) -> Path:
    """An archive with two disks, a config and a VM state (through the library)."""
    path = workdir / "vm.vma.zst"
    w = VmaWriter(open_sink(str(path), "zstd"))
    w.add_config("qemu-server.conf", b"memory: 512\n")
    devs = {n: w.add_device(n, len(d)) for n, d in sources.contents.items()}
    vm = w.add_stream()
    for name, data in sources.contents.items():
        w.write(devs[name], 0, data)
    rng = random.Random(3)
    # Whole clusters of data and of zeros, then one with zero blocks before its data.
    state = rng.randbytes(3 * CLUSTER - 4) + bytes(CLUSTER) + bytes(8192) + rng.randbytes(4096)
    w.append(vm, b"QEVM" + state + b"end")
    w.finish()
    return path


@pytest.mark.parametrize("image_format", ["qcow2", "raw"])
def test_restore(image_format: str, workdir: Path, sources: Sources, qemu_img: str) -> None:
    archive = _vm_archive(workdir, sources)
    nbdvma("extract", str(archive), str(workdir / "extracted"))
    target = workdir / "restored"
    nbdvma("restore", "--format", image_format, str(archive), str(target))
    names = sorted(p.name for p in target.iterdir())
    disks = [f"disk-{n}.{image_format}" for n in sorted(sources.images)]
    assert names == sorted([*disks, "qemu-server.conf", "vmstate.bin"])
    for name, image in sources.images.items():
        out = target / f"disk-{name}.{image_format}"
        run_tool([qemu_img, "compare", "-f", image_format, "-F", "raw", str(out), str(image)])
    for path in target.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for name in ("qemu-server.conf", "vmstate.bin"):
        assert (target / name).read_bytes() == (workdir / "extracted" / name).read_bytes()
    # DIR must not exist.
    result = nbdvma("restore", "--format", image_format, str(archive), str(target), check=False)
    assert result.returncode == 1


def test_restore_of_a_damaged_archive_leaves_no_image(workdir: Path, sources: Sources) -> None:
    archive = _create(workdir, sources, "a.vma")
    _flip(archive, archive.stat().st_size - 2000)
    target = workdir / "restored"
    result = nbdvma("restore", "--format", "qcow2", str(archive), str(target), check=False)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("restore failed - data digest mismatch"), lines
    assert [p.name for p in target.iterdir()] == []
    result = nbdvma(
        "restore", "--format", "qcow2", "-d", "nope", str(archive), str(workdir / "x"), check=False
    )
    assert result.stderr.splitlines() == [
        "restore failed - no disk named 'nope' in the archive (it has: drive-scsi0, drive-virtio1)"
    ]


def test_index_costs_8_bytes_per_cluster(workdir: Path, sources: Sources) -> None:
    index = build_index(str(_archive(workdir, sources, "plain")))
    clusters = sum(-(-len(d) // CLUSTER) for d in sources.contents.values())
    assert index.frames is None
    assert index.nbytes == 8 * clusters


def test_progress_while_an_archive_is_decompressed_and_read(
    workdir: Path, sources: Sources
) -> None:
    archive = _archive(workdir, sources, "stream")
    seen: list[tuple[str, int, int]] = []

    class Recording(PrepareState):
        def update(self, done: int) -> None:
            super().update(done)
            seen.append((self.phase, self.done, self.total))

    opened = open_archive(str(archive), Recording())
    opened.close()
    phases = [phase for phase, _, _ in seen]
    assert "decompressing" in phases
    assert phases[-1] == "indexing"
    _, done, total = seen[-1]
    assert done == total > 0  # the whole decompressed file was read

    # What the command prints of that state: the notice at once, then progress lines.
    lines: list[str] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            opened = await prepare(nursery, str(archive), None, None, lines.append)
            opened.close()

    trio.run(main)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{archive}: the archive is one zstd stream"), lines
    assert "must be decompressed once" in lines[0]
    watcher = PrepareWatcher(PrepareState(phase="indexing", done=512, total=2048), lines.append, 1)
    watcher.progress()
    watcher.progress()  # unchanged: not repeated
    watcher.state.phase = "decompressing"
    watcher.progress()
    assert lines[1:] == [
        "reading the archive: 25% (512 B of 2.0 KiB)",
        "decompressing: 512 B so far",
    ]


def test_pid_file(workdir: Path, sources: Sources, export: Callable[..., Export]) -> None:
    pid_path = workdir / "export.pid"
    exp = export(_archive(workdir, sources, "plain"), "--pid-file", str(pid_path))
    assert pid_path.read_text().strip() == str(exp.process.pid)
    assert exp.stop(signal.SIGINT) == 0
    assert not pid_path.exists()
    assert exp.stderr().rstrip().endswith("stopped by SIGINT")


def test_a_unix_client_gets_a_send_buffer_that_holds_a_whole_2_mib_reply(
    workdir: Path, sources: Sources, export: Callable[..., Export]
) -> None:
    """``ss`` shows the export's end of a client's connection with a 2 MiB send buffer
    (``tb``), not the default 208 KiB: qemu-img's 2 MiB reads go out in one piece."""
    exp = export(_archive(workdir, sources, "plain"))
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(exp.socket)
        assert client.recv(8) == b"NBDMAGIC"  # accepted, and tuned before the greeting
        out = subprocess.run(
            ["ss", "-xmpnH", "src", exp.socket], capture_output=True, text=True, check=True
        ).stdout
    ours = [line for line in out.splitlines() if f"pid={exp.process.pid}," in line]
    buffers = [int(m) for line in ours for m in re.findall(r"\btb(\d+)", line)]
    assert buffers, out
    assert min(buffers) >= 2 << 20, out


class _Qmp:
    """A minimal synchronous QMP client (``command(name, **arguments)``), keeping the
    events it reads in :attr:`events`."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.stream = self.sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        json.loads(self.stream.readline())  # the greeting
        self.command("qmp_capabilities")

    def command(self, name: str, **arguments: object) -> Any:
        self.stream.write(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        self.stream.flush()
        while True:
            message = json.loads(self.stream.readline())
            if "event" in message:
                self.events.append(message)
                continue
            assert "error" not in message, message
            return message["return"]

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def _hexdump_bytes(text: str) -> bytes:
    """The bytes of qemu-io's ``read -v`` dump (``00000000:  01 02 ... ascii``)."""
    out = bytearray()
    for line in text.splitlines():
        match = re.match(r"^[0-9a-f]{8}:\s+((?:[0-9a-f]{2} ){1,16})", line)
        if match:
            out += bytes.fromhex(match.group(1))
    return bytes(out)


def test_instant_restore_recipe(
    workdir: Path,
    sources: Sources,
    export: Callable[..., Export],
    qemu_img: str,
    qemu_vm: Callable[..., Any],
) -> None:
    """docs/restore.md: a qcow2 overlay over the export, a VM on it, block-stream."""
    exp = export(_archive(workdir, sources, "zst"))
    overlay = workdir / "vm-100-disk-0.qcow2"
    backing = exp.uri("drive-scsi0")
    run_tool([qemu_img, "create", "-f", "qcow2", "-F", "raw", "-b", backing, str(overlay)])
    vm = qemu_vm(
        [],
        extra_args=[
            "-blockdev",
            f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={overlay}",
            "-device",
            "virtio-blk-pci,drive=disk0,id=scsi0",
        ],
    )
    qmp = _Qmp(vm.qmp_address.removeprefix("unix:"))
    try:
        # The VM reads its disk at once, through the overlay from the export: qemu-io
        # inside QEMU, through the monitor (QEMU 7.2 prints its dump on stdout: the log).
        source = sources.contents["drive-scsi0"]
        backend = "/machine/peripheral/scsi0/virtio-backend"
        for offset in (0, 3 * CLUSTER, 17 * 4096, ODD_SIZE - 512):
            seen = vm.log.stat().st_size
            qmp.command(
                "human-monitor-command",
                **{"command-line": f'qemu-io -d {backend} "read -v {offset} 512"'},
            )
            done = f"read 512/512 bytes at offset {offset}"
            poll_until(
                lambda done=done, seen=seen: done in vm.log.read_text()[seen:],
                10,
                "qemu-io's read",
            )
            shown = vm.log.read_text()[seen:]
            assert _hexdump_bytes(shown) == source[offset : offset + 512], shown
        qmp.command("block-stream", **{"job-id": "restore0", "device": "disk0"})
        deadline = time.monotonic() + 60
        while qmp.command("query-block-jobs"):
            assert time.monotonic() < deadline, "block-stream did not finish"
            time.sleep(0.05)
        completed = [e for e in qmp.events if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert completed, qmp.events
        assert "error" not in completed[0]["data"], completed
        qmp.command("quit")
    finally:
        qmp.close()
    vm.process.wait(30)
    assert exp.stop() == 0
    # The overlay no longer needs the export: no backing file, the source's bytes.
    info = run_tool([qemu_img, "info", str(overlay)]).stdout
    assert "backing file" not in info, info
    run_tool(
        [
            qemu_img,
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            str(overlay),
            str(sources.images["drive-scsi0"]),
        ]
    )


def test_vmstate_clusters_with_zero_blocks_are_written_in_place(tmp_path: Path) -> None:
    # nbdvma's writer stores the VM state's clusters whole; Proxmox's may leave zero
    # blocks out (mask bits unset), which restore must put back as zeros in place.
    from nbdvma.restore import _VmstateFile

    path = tmp_path / "vmstate.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    out = _VmstateFile(fd)
    a, b = b"a" * 4096, b"b" * 4096
    out.write(0, 0xFFFF, memoryview(bytes(CLUSTER)))
    out.write(1, 0b101, memoryview(a + b))
    out.finish(CLUSTER + 2 * 4096 + 100)
    assert path.read_bytes() == bytes(CLUSTER) + a + bytes(4096) + b[:100]


def test_a_cut_gzip_archive_is_refused_and_leaves_no_temporary_file(
    workdir: Path, sources: Sources
) -> None:
    archive = _archive(workdir, sources, "gzip")
    os.truncate(archive, archive.stat().st_size // 2)
    result = nbdvma("export", str(archive), "--listen", f"unix:{workdir}/x.sock", check=False)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"nbdvma export: {archive} is gzip-compressed: it must be"), lines
    assert len(lines) == 2, lines
    assert lines[1].startswith(f"nbdvma export: {archive}: read failed"), lines
    assert list(workdir.glob(".nbdvma-export-*")) == []


def test_a_cancelled_preparation_stops_at_its_next_report(workdir: Path, sources: Sources) -> None:
    state = PrepareState(cancelled=True)
    with pytest.raises(InterruptedError):
        open_archive(str(_archive(workdir, sources, "gzip")), state)
    assert list(workdir.glob(".nbdvma-export-*")) == []


def test_restore_live_streams_the_overlays_of_a_running_vm(
    workdir: Path,
    sockdir: Path,
    sources: Sources,
    qemu_img: str,
    qemu_vm: Callable[..., Any],
) -> None:
    """``nbdvma restore --live``: it exports, waits for the VM (started afterwards on
    qcow2 overlays over the export), streams both overlays, and exits 0 once the VM
    needs the export no more; the overlays then equal the sources on their own."""
    archive = _archive(workdir, sources, "zst")
    sock = sockdir / "live.sock"
    qmp = sockdir / "qmp0.sock"  # the first VM of the qemu_vm fixture listens here
    err = workdir / "live.err"
    with err.open("wb") as f:
        live = subprocess.Popen(
            [
                *(sys.executable, "-m", "nbdvma", "restore", "--live", str(archive)),
                *("--qmp", f"unix:{qmp}", "--listen", f"unix:{sock}"),
            ],
            stdin=subprocess.DEVNULL,
            stderr=f,
        )
    try:
        deadline = time.monotonic() + 30
        while "export ready" not in err.read_text():
            assert live.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.02)
        overlays = {}
        for name in sources.images:
            overlays[name] = workdir / f"{name}.qcow2"
            backing = f"nbd+unix:///{name}?socket={sock}"
            run_tool(
                [qemu_img, "create", "-f", "qcow2", "-F", "raw", "-b", backing, str(overlays[name])]
            )
        blockdevs = []
        for i, overlay in enumerate(overlays.values()):
            blockdevs += [
                "-blockdev",
                f"driver=qcow2,node-name=disk{i},file.driver=file,file.filename={overlay}",
                "-device",
                f"virtio-blk-pci,drive=disk{i},id=d{i}",
            ]
        vm = qemu_vm([], extra_args=blockdevs)
        assert vm.qmp_address == f"unix:{qmp}"
        assert live.wait(60) == 0, err.read_text()
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
    text = err.read_text()
    assert "nbdvma restore: disk0: streaming from nbd+unix:///drive-scsi0" in text
    assert "nbdvma restore: 2 disk(s) streamed into their overlays" in text
    assert not sock.exists()  # the export stopped and removed its socket
    q = _Qmp(str(qmp))
    try:
        q.command("quit")
    finally:
        q.close()
    vm.process.wait(30)
    for name, overlay in overlays.items():
        info = run_tool([qemu_img, "info", str(overlay)]).stdout
        assert "backing file" not in info, info
        run_tool(
            [
                *(qemu_img, "compare", "-f", "qcow2", "-F", "raw"),
                *(str(overlay), str(sources.images[name])),
            ]
        )


def test_restore_live_refuses_a_vm_without_overlays_on_the_export(
    workdir: Path, sockdir: Path, sources: Sources, qemu_vm: Callable[..., Any]
) -> None:
    archive = _archive(workdir, sources, "zst")
    vm = qemu_vm([])
    result = nbdvma(
        "restore",
        "--live",
        str(archive),
        "--qmp",
        vm.qmp_address,
        "--listen",
        f"unix:{sockdir / 'live.sock'}",
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        "nbdvma restore: no block node of the VM has its backing file on this export"
    ), result.stderr
    assert nbdvma("restore", str(archive), check=False).stderr == (
        "restore needs a target DIR (or --live)\n"
    )


def test_block_status_gives_whole_runs_and_at_most_max_runs(
    workdir: Path, sources: Sources
) -> None:
    """qemu-img asks block status with REQ_ONE from each extent's end on: each answer
    stops after ``max_runs`` whole runs instead of walking a whole window."""
    opened = open_archive(str(_archive(workdir, sources, "plain")), PrepareState())
    try:
        name, data = "drive-scsi0", sources.contents["drive-scsi0"]
        full = opened.block_status(name, 0, ODD_SIZE, max_runs=10_000)
        # The model: 4 KiB blocks, zero or not (the source's own zero blocks).
        model: list[tuple[int, bool]] = []
        for off in range(0, ODD_SIZE, 4096):
            block = data[off : off + 4096]
            zero = block == bytes(len(block))
            if model and model[-1][1] == zero:
                model[-1] = (model[-1][0] + len(block), zero)
            else:
                model.append((len(block), zero))
        assert full == model
        for cap in (1, 2, 5):
            assert opened.block_status(name, 0, ODD_SIZE, max_runs=cap) == model[:cap]
        # From inside a run: the first answer is that run's rest, whole.
        start = model[0][0] - 4096
        assert opened.block_status(name, start, ODD_SIZE, max_runs=1) == [(4096, model[0][1])]
    finally:
        opened.close()


def _from_runs(runs: FileRuns) -> bytes:
    out = bytearray(runs.length)
    for at, source, n in runs.runs:
        out[at : at + n] = os.pread(runs.fd, n, source)
    return bytes(out)


def test_reads_at_once_only_what_needs_no_disk(workdir: Path, sources: Sources) -> None:
    """``read_now`` (a READ answered in the event loop) gives the bytes ``read`` gives
    for an archive in the page cache, and ``None`` (nothing done) where a disk read
    would be needed or a zstd frame decompressed: those go to a worker thread."""
    path = _archive(workdir, sources, "plain")
    name, data = "drive-scsi0", sources.contents["drive-scsi0"]
    opened = open_archive(str(path), PrepareState())
    try:
        assert bytes(opened.read(name, 0, ODD_SIZE)) == data  # now in the page cache
        for offset, length in ((0, ODD_SIZE), (4096 * 3 + 17, 200_000), (ODD_SIZE - 1000, 1000)):
            now = opened.read_now(name, offset, length)
            assert now is not None
            assert bytes(now) == data[offset : offset + length]
        # Larger than a copy the event loop should wait for: a thread's.
        assert opened.read_now(name, 0, READ_NOW_MAX + 4096) is None
        # runs_now: where sendfile finds the bytes (zeros between the runs).
        for offset, length in ((0, ODD_SIZE), (4096 * 9 + 17, 200_000), (ODD_SIZE - 1000, 1000)):
            runs = opened.runs_now(name, offset, length)
            assert runs is not None
            assert runs.length == length
            assert _from_runs(runs) == data[offset : offset + length]
        # Out of the page cache: read_now declines, read still reads.
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        assert opened.read_now(name, 0, ODD_SIZE) is None
        assert opened.runs_now(name, 0, ODD_SIZE) is None
        assert bytes(opened.read(name, 0, ODD_SIZE)) == data
    finally:
        opened.close()
    zst = open_archive(str(_archive(workdir, sources, "zst")), PrepareState())
    try:
        assert zst.read_now(name, 0, 4096) is None
        assert zst.runs_now(name, 0, 4096) is None
        assert bytes(zst.read(name, 0, 4096)) == data[:4096]
    finally:
        zst.close()


def test_restore_qcow2_says_how_each_conversion_goes(workdir: Path, sources: Sources) -> None:
    lines: list[str] = []
    target = workdir / "restored"
    restore_archive(
        str(_vm_archive(workdir, sources)),
        str(target),
        image_format="qcow2",
        say=lines.append,
        progress_interval=0,
    )
    for name in sources.images:
        mine = [line for line in lines if line.startswith(f"{name}: ")]
        assert mine[0] == f"{name}: converting to {target}/tmp-disk-{name}.qcow2 (qcow2)"
        percents = [float(m[1]) for m in map(re.compile(r": (\d+)% converted$").search, mine) if m]
        assert percents, mine  # qemu-img -p's own figures, passed on
        assert percents[-1] == 100
        assert re.fullmatch(rf"{name}: converted in \d+\.\d+s", mine[-1]), mine


def test_sigterm_during_a_qcow2_conversion_kills_qemu_img_and_leaves_nothing(
    workdir: Path, sources: Sources
) -> None:
    """qemu-img stops itself (SIGSTOP, from a wrapper first on PATH) as restore starts
    it, so that the signal surely comes while it converts, however fast the conversion:
    restore kills it, says why in one line, and leaves no file."""
    archive = _vm_archive(workdir, sources)
    target = workdir / "restored"
    err = workdir / "restore.err"
    bindir = workdir / "bin"
    bindir.mkdir()
    wrapper = bindir / "qemu-img"
    real = subprocess.run(["which", "qemu-img"], capture_output=True, text=True, check=True)
    wrapper.write_text(f'#!/bin/sh\nkill -STOP $$\nexec {real.stdout.strip()} "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nbdvma",
                "restore",
                "--format",
                "qcow2",
                str(archive),
                str(target),
            ],
            stderr=stderr,
            env=env,
        )
    try:
        children: list[int] = []

        def qemu_img_stopped() -> bool:
            found = subprocess.run(
                ["pgrep", "-P", str(proc.pid), "-x", "qemu-img"], capture_output=True, text=True
            ).stdout.split()
            children[:] = [int(pid) for pid in found]
            stat = Path(f"/proc/{children[0]}/stat") if children else None
            return stat is not None and stat.read_text().rsplit(")", 1)[1].split()[0] == "T"

        poll_until(qemu_img_stopped, 30, "restore to start qemu-img")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert err.read_text().splitlines()[-1] == "interrupted by SIGTERM"
    with pytest.raises(ProcessLookupError):
        os.kill(children[0], 0)  # killed and reaped, not left stopped
    assert list(target.iterdir()) == []


def test_sigterm_while_the_archive_is_read_stops_before_listening(
    workdir: Path, sockdir: Path
) -> None:
    """A 64 GiB sparse disk takes the index pass a while (0.4 s); the export is stopped
    (SIGSTOP) once it has the archive open and before it is ready, then SIGTERMed."""
    image = workdir / "sparse.raw"
    with image.open("wb") as f:
        f.truncate(64 << 30)
        for offset in range(0, 64 << 30, 4 << 30):
            f.seek(offset)
            f.write(random.Random(offset).randbytes(MiB))
    archive = workdir / "sparse.vma"
    nbdvma("create", str(archive), f"drive-scsi0={image}")
    sock = sockdir / "term.sock"
    err = workdir / "term.err"
    with err.open("wb") as f:
        proc = subprocess.Popen(_export_command(archive, sock, []), stderr=f)
    try:

        def reading() -> bool:
            for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
                with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                    if os.path.realpath(fd) == str(archive):
                        return True
            return False

        poll_until(reading, 30, "export to open the archive", interval=0.001)
        os.kill(proc.pid, signal.SIGSTOP)
        assert "export ready" not in err.read_text()  # caught in the index pass
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert err.read_text().splitlines() == [
        "nbdvma export: interrupted by SIGTERM before the export was ready"
    ]
    assert not sock.exists()


def test_an_exposed_plain_listener_is_warned_of_as_readable(
    workdir: Path, sources: Sources, export: Callable[..., Export]
) -> None:
    exp = export(_archive(workdir, sources, "plain"), "--listen", "tcp:0.0.0.0:0")
    poll_until(lambda: exp.stderr().count("listening on") == 2, 10, "both listeners")
    warning = [line for line in exp.stderr().splitlines() if "without --tls require" in line]
    assert len(warning) == 1, exp.stderr()
    assert warning[0].endswith(
        "whoever connects can read the backed-up disks (see docs/security.md)"
    )
