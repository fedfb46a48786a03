"""``nbdvma serve`` against the real clients: qemu-img, qemu-io, nbdcopy, nbdinfo, libnbd.

Each test starts ``python -m nbdvma serve`` (tests/servehelpers.py), has real clients
write into it over a unix socket and/or TCP on 127.0.0.1, waits for the server to
finish the archive by itself (every disk fully written, every client gone), and checks
the archive with ``nbdvma extract`` (byte for byte against what was written) and
``nbdvma verify``.  Images are a few MiB, so the whole module takes seconds.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import blake3
import pverules
import pytest
from servehelpers import (
    ServeProcess,
    extract_disks,
    nbdvma,
    poll_until,
    run_tool,
    start_serve,
)

pytestmark = pytest.mark.interop

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB
#: Not a multiple of 64 KiB (the last cluster is partial), but of 512 (QEMU rounds up).
ODD_SIZE = 540672
SIZE = 3 * MiB + 3 * 4096


# -- fixtures and helpers -------------------------------------------------------------


StartServe = Callable[..., ServeProcess]


@pytest.fixture
def serve(sockdir: Path, workdir: Path) -> Iterator[StartServe]:
    """``serve(disks, archive=None, **kw) -> ServeProcess``; every server is killed after."""
    started: list[ServeProcess] = []

    def start(disks: dict[str, int], archive: str | Path | None = None, **kw: Any) -> ServeProcess:
        where = archive if archive is not None else workdir / "out.vma"
        s = start_serve(where, disks, sockdir=sockdir, logdir=workdir, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def source_bytes(size: int, seed: int) -> bytes:
    """Random data with zero stretches: a whole zero cluster, a zero 4 KiB block in a
    data cluster, a zero run across a cluster boundary, and a zero tail."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    for start, length in (
        (CLUSTER, CLUSTER),  # cluster 1 all zero
        (2 * CLUSTER + 8192, 4096),  # one zero block inside data
        (5 * CLUSTER - 12288, 20480),  # across a cluster boundary
        (size - 3 * 4096, 3 * 4096),  # zero tail
    ):
        data[start : start + length] = bytes(length)
    return bytes(data)


def write_sparse(path: Path, data: bytes) -> Path:
    """Write ``data`` leaving 4 KiB zero blocks as holes (so clients see zero extents)."""
    with path.open("wb") as f:
        f.truncate(len(data))
        zero = bytes(4096)
        for off in range(0, len(data), 4096):
            block = data[off : off + 4096]
            if block != zero[: len(block)]:
                f.seek(off)
                f.write(block)
    return path


def finished_archive(server: ServeProcess) -> Path:
    """Wait for ``server`` to finish by itself and return the archive path."""
    status = server.wait()
    assert status == 0, server.stderr()
    archive = Path(server.archive)
    assert archive.exists(), server.stderr()
    assert not Path(f"{archive}.part").exists()
    return archive


def check_archive(
    archive: Path, workdir: Path, expected: dict[str, bytes], *, digest: bool = True
) -> None:
    """``nbdvma verify`` passes and ``nbdvma extract`` gives back ``expected``.

    With ``digest``, the archive records the BLAKE3 digest of its extents, which is
    recomputed here by hand (docs/integrity.md) and which verify says it checked.
    """
    said = nbdvma("verify", str(archive)).stdout
    nbdvma("verify", "--strict", str(archive))
    if digest:
        plain = archive.read_bytes()
        if archive.suffix == ".zst":
            zstd = ["zstd", "-dc", str(archive)]
            plain = subprocess.run(zstd, capture_output=True, check=True, timeout=60).stdout
        header_size = int.from_bytes(plain[56:60], "big")
        extents = plain[header_size:]
        record = b"blake3 %s %020d\n" % (blake3.blake3(extents).hexdigest().encode(), len(extents))
        assert (
            b"nbdvma-digest\0" + len(record).to_bytes(2, "little") + record in plain[:header_size]
        )
        assert said == f"data digest (blake3) verified over {len(extents)} bytes\n"
    else:
        assert said.startswith("no data digest: ")
    got = extract_disks(archive, workdir / f"extract-{archive.stem}")
    assert set(got) == set(expected)
    for name, data in expected.items():
        assert len(got[name]) == len(data), name
        assert got[name] == data, f"{name}: restored bytes differ"


def qemu_img_convert(qemu_img: str, src: Path, uri: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def wait_ok(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"{proc.args} timed out: {out}") from None
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}: {out}"
    return out or ""


def run_qemu_io(qemu_io_path: str, uri: str, *commands: str) -> str:
    args = [qemu_io_path, "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    out = run_tool([*args, uri]).stdout
    assert "failed" not in out.lower(), out
    assert "error" not in out.lower(), out
    return out


# -- qemu-img -------------------------------------------------------------------------


def test_qemu_img_two_disks_unix_and_tcp_concurrently(
    serve: StartServe, qemu_img: str, workdir: Path
) -> None:
    """Two disks of different sizes (one not a multiple of 64 KiB), one over the unix
    socket and one over TCP, written at the same time into one archive."""
    a = source_bytes(ODD_SIZE, 1)
    b = source_bytes(SIZE, 2)
    src_a = write_sparse(workdir / "a.raw", a)
    src_b = write_sparse(workdir / "b.raw", b)
    server = serve({"drive-scsi0": ODD_SIZE, "drive-scsi1": SIZE})
    p1 = qemu_img_convert(qemu_img, src_a, server.uri("drive-scsi0", "unix"))
    p2 = qemu_img_convert(qemu_img, src_b, server.uri("drive-scsi1", "tcp"))
    wait_ok(p1)
    wait_ok(p2)
    archive = finished_archive(server)
    check_archive(archive, workdir, {"drive-scsi0": a, "drive-scsi1": b})
    assert "drive-scsi0: size" in server.stderr()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_qemu_img_each_transport(
    serve: StartServe, qemu_img: str, workdir: Path, transport: str
) -> None:
    data = source_bytes(SIZE, 3)
    src = write_sparse(workdir / "src.raw", data)
    server = serve({"d0": SIZE}, unix=transport == "unix", tcp=transport == "tcp")
    wait_ok(qemu_img_convert(qemu_img, src, server.uri("d0", transport)))
    check_archive(finished_archive(server), workdir, {"d0": data})


@pytest.mark.parametrize(("compress", "size"), [("zstd", ODD_SIZE), ("zstd:9", 4 * SIZE)])
def test_qemu_img_compressed_archive(
    serve: StartServe, qemu_img: str, workdir: Path, compress: str, size: int
) -> None:
    """Extents compressed on every core and written in order (several extents with
    the larger disk); any level gives the same archive content."""
    data = source_bytes(size, 4)
    src = write_sparse(workdir / "src.raw", data)
    server = serve({"d0": size}, archive=workdir / "out.vma.zst", extra=["--compress", compress])
    wait_ok(qemu_img_convert(qemu_img, src, server.uri("d0")))
    archive = finished_archive(server)
    assert archive.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
    check_archive(archive, workdir, {"d0": data})


def test_serve_stores_the_config_with_map_lines(
    serve: StartServe, qemu_img: str, workdir: Path
) -> None:
    """``serve --config 100.conf`` with drive-KEY exports: stored as qemu-server.conf
    with one map line per disk; a config disk the exports lack is a warning."""
    conf = workdir / "100.conf"
    conf.write_bytes(b"memory: 1024\nscsi0: local-lvm:vm-100-disk-0,size=1M\nscsi1: x:y\n")
    data = source_bytes(SIZE, 5)
    src = write_sparse(workdir / "src.raw", data)
    server = serve({"drive-scsi0": SIZE}, extra=["--config", str(conf)])
    wait_ok(qemu_img_convert(qemu_img, src, server.uri("drive-scsi0")))
    archive = finished_archive(server)
    check_archive(archive, workdir, {"drive-scsi0": data})
    assert f"warning: {conf} has disk scsi1, which the VM does not have" in server.stderr()
    config = (workdir / f"extract-{archive.stem}" / "qemu-server.conf").read_bytes()
    assert config.endswith(b"scsi1: x:y\n#qmdump#map:scsi0:drive-scsi0:local-lvm::\n")
    assert pverules.restore_problems(config, ["drive-scsi0"]) == []


# -- qemu-io ----------------------------------------------------------------------------


def test_qemu_io_patterns_partial_pending_stored(
    serve: StartServe, qemu_io: str, workdir: Path
) -> None:
    """Writes, zeroes and read-backs of clusters in every writer state, over one
    connection each, then the archive holds exactly the last values written."""
    size = 8 * MiB
    server = serve({"d0": size})
    uri = server.uri("d0")
    # Partial cluster: 4 KiB of cluster 1 (the rest is unwritten and reads as zero).
    # Pending cluster: cluster 0, whole.  Stored: clusters 2..65 (64 clusters, so the
    # first 58 fill an extent that goes to disk).
    run_qemu_io(
        qemu_io,
        uri,
        "write -P 0xab 0 64k",
        "write -P 0xcd 68k 4k",
        "write -P 0x11 128k 4M",
        "read -P 0xab 0 64k",  # pending (complete, in the extent buffer)
        "read -P 0xcd 68k 4k",  # partial
        "read -P 0 64k 4k",  # partial: the unwritten part
        "read -P 0 72k 56k",
        "read -P 0x11 128k 64k",  # stored (first extent on disk)
        "read -P 0x11 4160k 64k",  # pending (the last clusters of the run)
        "write -z 5M 1M",  # WRITE_ZEROES
        "read -P 0 5M 1M",
        "read -P 0 7M 64k",  # never written
    )
    # A replay of identical bytes over a stored cluster is accepted; different bytes
    # cannot be honoured (the cluster is in the archive) and fail with EIO.
    run_qemu_io(qemu_io, uri, "write -P 0x11 128k 64k", "read -P 0x11 128k 64k")
    out = run_tool([qemu_io, "-f", "raw", "-c", "write -P 0x22 128k 64k", uri], check=False)
    assert "Input/output error" in out.stdout + out.stderr
    assert server.alive()
    # Complete the disk: the rest of cluster 1, and everything never written.
    run_qemu_io(
        qemu_io,
        uri,
        "write -z 64k 4k",
        "write -P 0xee 72k 56k",
        "read -P 0xcd 68k 4k",
        "write -z 4224k 896k",  # 4M+128k .. 5M
        "write -z 6M 2M",
    )
    expected = bytearray(size)
    expected[0 : 64 * KiB] = b"\xab" * (64 * KiB)
    expected[68 * KiB : 72 * KiB] = b"\xcd" * (4 * KiB)
    expected[72 * KiB : 128 * KiB] = b"\xee" * (56 * KiB)
    expected[128 * KiB : 128 * KiB + 4 * MiB] = b"\x11" * (4 * MiB)
    check_archive(finished_archive(server), workdir, {"d0": bytes(expected)})


# -- nbdcopy and nbdinfo ------------------------------------------------------------------


def test_nbdcopy_multi_conn_flush(
    serve: StartServe, nbdcopy: str, nbdinfo: str, workdir: Path
) -> None:
    data = source_bytes(SIZE, 5)
    src = write_sparse(workdir / "src.raw", data)
    server = serve({"d0": SIZE}, extra=["--verbose"])
    uri = server.uri("d0")
    info = json.loads(run_tool([nbdinfo, "--json", uri]).stdout)
    (export,) = info["exports"]
    assert export["can_multi_conn"] is True
    assert export["can_flush"] is True
    assert export["export-size"] == SIZE
    before = server.stderr().count("transmission on export 'd0'")
    run_tool([nbdcopy, "--connections=4", "--threads=4", "--requests=16", "--flush", str(src), uri])
    check_archive(finished_archive(server), workdir, {"d0": data})
    opened = server.stderr().count("transmission on export 'd0'") - before
    assert opened == 4, server.stderr()


def test_nbdinfo_list(serve: StartServe, nbdinfo: str) -> None:
    server = serve({"drive-scsi0": ODD_SIZE, "drive-virtio1": SIZE}, tcp=False)
    out = run_tool([nbdinfo, "--list", "--json", f"nbd+unix://?socket={server.unix}"]).stdout
    exports = {e["export-name"]: e for e in json.loads(out)["exports"]}
    assert set(exports) == {"drive-scsi0", "drive-virtio1"}
    assert exports["drive-scsi0"]["export-size"] == ODD_SIZE
    assert exports["drive-virtio1"]["export-size"] == SIZE
    assert server.alive()


def test_nbdinfo_probe_alone_completes_nothing(
    serve: StartServe, nbdinfo: str, qemu_img: str, workdir: Path
) -> None:
    """Probes (nbdinfo, a map) finish no disk; a disk still connected is not done."""
    data = source_bytes(ODD_SIZE, 6)
    src = write_sparse(workdir / "src.raw", data)
    server = serve({"d0": ODD_SIZE})
    for _ in range(3):
        run_tool([nbdinfo, server.uri("d0")])
        run_tool([nbdinfo, "--map", server.uri("d0")])
    with pytest.raises(subprocess.TimeoutExpired):
        server.process.wait(0.5)
    assert Path(f"{server.archive}.part").exists()
    assert not Path(server.archive).exists()
    wait_ok(qemu_img_convert(qemu_img, src, server.uri("d0")))
    check_archive(finished_archive(server), workdir, {"d0": data})


# -- libnbd: every option, command and flag -------------------------------------------------


def _connect(libnbd: ModuleType, uri: str, *, structured: bool = True) -> Any:
    h = libnbd.NBD()
    h.set_request_structured_replies(structured)
    if structured:
        h.add_meta_context(libnbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def _errno(exc: Any) -> int:
    """libnbd's ``Error.errno`` is the errno's *name* (``"ENOSPC"``); as a number."""
    value = exc.errno
    return int(getattr(errno, value)) if isinstance(value, str) else int(value)


def _extents(h: Any, offset: int, length: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []

    def cb(metacontext: str, off: int, entries: list[int], err: Any) -> int:
        assert metacontext == "base:allocation"
        out.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0

    h.block_status(length, offset, cb)
    return out


def test_libnbd_opt_mode(serve: StartServe, libnbd: ModuleType) -> None:
    server = serve({"drive-scsi0": ODD_SIZE, "other": SIZE})
    h = libnbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(server.uri("drive-scsi0"))
    assert h.get_opt_mode()
    names: list[str] = []
    assert h.opt_list(lambda name, desc: names.append(name)) == 2
    assert sorted(names) == ["drive-scsi0", "other"]
    # INFO on each export, without entering transmission.
    h.set_export_name("other")
    h.opt_info()
    assert h.get_size() == SIZE
    h.set_export_name("drive-scsi0")
    h.opt_info()
    assert h.get_size() == ODD_SIZE
    assert h.get_block_size(libnbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(libnbd.SIZE_PREFERRED) == 64 * KiB
    assert h.get_block_size(libnbd.SIZE_MAXIMUM) == 32 * MiB
    # LIST_META_CONTEXT: everything, then the "base:" wildcard, then an unknown namespace.
    contexts: list[str] = []
    assert h.opt_list_meta_context(lambda name: contexts.append(name)) == 1
    assert contexts == ["base:allocation"]
    h.add_meta_context("base:")
    assert h.opt_list_meta_context(lambda name: contexts.append(name)) == 1
    h.clear_meta_contexts()
    h.add_meta_context("qemu:dirty-bitmap:x")
    assert h.opt_list_meta_context(lambda name: None) == 0
    h.clear_meta_contexts()
    # INFO for an unknown export fails, the handshake goes on.
    h.set_export_name("nope")
    with pytest.raises(libnbd.Error):
        h.opt_info()
    # GO with base:allocation (libnbd sends SET_META_CONTEXT first).
    h.set_export_name("drive-scsi0")
    h.add_meta_context(libnbd.CONTEXT_BASE_ALLOCATION)
    h.opt_go()
    assert h.can_meta_context(libnbd.CONTEXT_BASE_ALLOCATION)
    assert h.pread(512, 0) == bytes(512)
    h.shutdown()
    # ABORT ends a handshake cleanly.
    h2 = libnbd.NBD()
    h2.set_opt_mode(True)
    h2.connect_uri(server.uri("other", "tcp"))
    h2.opt_abort()
    assert server.alive()


class _Model:
    """What the export should hold, and which bytes a client has written."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.covered = bytearray(size)

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data
        self.covered[offset : offset + len(data)] = b"\x01" * len(data)

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def gaps(self) -> list[tuple[int, int]]:
        return [(m.start(), m.end() - m.start()) for m in re.finditer(b"\x00+", self.covered)]


def test_libnbd_flags_and_commands(serve: StartServe, libnbd: ModuleType, workdir: Path) -> None:
    size = 2 * MiB
    model = _Model(size)
    server = serve({"d0": size})
    h = _connect(libnbd, server.uri("d0"))
    assert h.get_structured_replies_negotiated()
    assert not h.is_read_only()
    for can in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache"):
        assert getattr(h, can)(), can
    assert h.can_multi_conn()
    assert h.can_df()
    assert h.can_meta_context(libnbd.CONTEXT_BASE_ALLOCATION)
    assert h.get_size() == size

    data = random.Random(7).randbytes(256 * KiB)
    h.pwrite(data, 0)
    model.write(0, data)
    h.pwrite(b"\x5a" * 4096, 300 * KiB, libnbd.CMD_FLAG_FUA)
    model.write(300 * KiB, b"\x5a" * 4096)
    assert h.pread(len(data), 0) == data
    chunks: list[tuple[int, int]] = []
    h.pread_structured(
        64 * KiB,
        256 * KiB,
        lambda buf, off, status, err: chunks.append((off, status)) or 0,
        libnbd.CMD_FLAG_DF,
    )
    assert chunks == [(256 * KiB, libnbd.READ_DATA)]  # DF: one chunk
    h.zero(128 * KiB, 512 * KiB, libnbd.CMD_FLAG_NO_HOLE)
    h.zero(128 * KiB, 640 * KiB, libnbd.CMD_FLAG_FAST_ZERO)
    h.zero(64 * KiB, 768 * KiB, libnbd.CMD_FLAG_FUA | libnbd.CMD_FLAG_NO_HOLE)
    model.zero(512 * KiB, 320 * KiB)
    assert h.pread(320 * KiB, 512 * KiB) == bytes(320 * KiB)
    h.trim(64 * KiB, 896 * KiB)  # a hint: changes nothing, completes nothing
    h.trim(64 * KiB, 896 * KiB, libnbd.CMD_FLAG_FUA)
    h.cache(64 * KiB, 0)
    h.flush()
    # base:allocation: written data is data; zeroed and never-written clusters are holes.
    runs: list[tuple[int, int, int]] = []
    pos = 0
    for n, flags in _extents(h, 0, size):
        runs.append((pos, n, flags))
        pos += n
    assert pos == size

    def flags_at(offset: int) -> int:
        return next(f for off, n, f in runs if off <= offset < off + n)

    assert flags_at(0) == 0
    assert flags_at(300 * KiB) == 0
    assert flags_at(512 * KiB) & libnbd.STATE_ZERO
    assert flags_at(size - 1) == libnbd.STATE_HOLE | libnbd.STATE_ZERO
    one: list[int] = []
    h.block_status(
        size, 0, lambda ctx, off, entries, err: one.extend(entries) or 0, libnbd.CMD_FLAG_REQ_ONE
    )
    assert len(one) == 2
    # The server's own checks (libnbd's are switched off to let the requests through).
    h.set_strict_mode(0)
    for call, want in (
        (lambda: h.pwrite(b"x" * 512, size), errno.ENOSPC),
        (lambda: h.zero(512, size - 256), errno.ENOSPC),
        (lambda: h.pread(512, size), errno.EINVAL),
        (lambda: h.trim(4096, size), errno.EINVAL),
        (lambda: h.pwrite(b"x" * 512, 0, 1 << 9), errno.EINVAL),  # unknown flag
        (lambda: h.pread(512, 0, libnbd.CMD_FLAG_NO_HOLE), errno.EINVAL),  # wrong command
    ):
        with pytest.raises(libnbd.Error) as exc_info:
            call()
        assert _errno(exc_info.value) == want
    assert h.pread(4096, 300 * KiB) == b"\x5a" * 4096  # the connection is still fine
    h.shutdown()

    # Simple replies: set_request_structured_replies(False), over TCP.
    h = _connect(libnbd, server.uri("d0", "tcp"), structured=False)
    assert not h.get_structured_replies_negotiated()
    assert not h.can_df()
    assert not h.can_meta_context(libnbd.CONTEXT_BASE_ALLOCATION)
    assert h.pread(4096, 300 * KiB) == b"\x5a" * 4096
    h.pwrite(b"\x33" * 1000, 1 * MiB - 1000)  # unaligned: the minimum block is 1
    model.write(1 * MiB - 1000, b"\x33" * 1000)
    h.pwrite(b"\x44" * 100, 1 * MiB + 7, libnbd.CMD_FLAG_FUA)
    model.write(1 * MiB + 7, b"\x44" * 100)
    h.set_strict_mode(0)
    with pytest.raises(libnbd.Error) as exc_info:
        h.pread(512, size)
    assert _errno(exc_info.value) == errno.EINVAL
    with pytest.raises(libnbd.Error) as exc_info:
        h.pwrite(b"x" * 512, size - 256)
    assert _errno(exc_info.value) == errno.ENOSPC
    for offset, length in model.gaps():
        h.zero(length, offset)
        model.zero(offset, length)
    h.flush()
    assert h.pread(size, 0) == bytes(model.data)
    assert server.alive()
    h.shutdown()
    check_archive(finished_archive(server), workdir, {"d0": bytes(model.data)})


def test_libnbd_export_name_errors(serve: StartServe, libnbd: ModuleType) -> None:
    server = serve({"d0": ODD_SIZE, "d1": ODD_SIZE})
    h = libnbd.NBD()
    with pytest.raises(libnbd.Error, match=r"(?i)export|unknown|not available"):
        h.connect_uri(server.uri("no-such-disk"))
    # With two exports, the default (empty) name is not one of them.
    h = libnbd.NBD()
    with pytest.raises(libnbd.Error):
        h.connect_uri(f"nbd+unix://?socket={server.unix}")
    # A long unknown name is refused by INFO, and the handshake goes on to a GO.
    h = libnbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(server.uri("d0"))
    h.set_export_name("x" * 4000)
    with pytest.raises(libnbd.Error, match="ENOENT"):  # NBD_REP_ERR_UNKNOWN
        h.opt_info()
    h.set_export_name("d1")
    h.opt_go()
    assert h.get_size() == ODD_SIZE
    h.shutdown()
    assert server.alive()


def test_libnbd_single_export_default_name(
    serve: StartServe, libnbd: ModuleType, qemu_img: str, workdir: Path
) -> None:
    server = serve({"only": ODD_SIZE})
    h = libnbd.NBD()
    h.connect_uri(f"nbd+unix://?socket={server.unix}")
    assert h.get_size() == ODD_SIZE
    h.shutdown()


# -- reconnects and replays ----------------------------------------------------------------


def test_libnbd_dropped_without_disc_then_replay(
    serve: StartServe, libnbd: ModuleType, workdir: Path
) -> None:
    """A client that vanishes mid-way (no DISC, requests in flight) and replays all
    its writes on a new connection leaves a correct archive."""
    size = 4 * MiB + 4096
    data = source_bytes(size, 8)
    server = serve({"d0": size})
    h = _connect(libnbd, server.uri("d0"))
    pieces = [(off, data[off : off + 96 * KiB]) for off in range(0, size, 96 * KiB)]
    first = pieces[: len(pieces) // 2]
    for off, piece in first[:-8]:
        h.pwrite(piece, off)
    for off, piece in first[-8:]:  # left in flight when the socket closes
        h.aio_pwrite(piece, off)
    del h  # libnbd's nbd_close: the socket is closed without NBD_CMD_DISC
    gc.collect()
    assert server.alive()
    h = _connect(libnbd, server.uri("d0", "tcp"))
    for off, piece in pieces:  # replays the first half, identical bytes
        h.pwrite(piece, off)
    h.flush()
    h.shutdown()
    check_archive(finished_archive(server), workdir, {"d0": data})


def _wait_for_progress(proc: subprocess.Popen[bytes], percent: float, timeout: float) -> None:
    """Read ``qemu-img -p`` output until it reports at least ``percent``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            seen += chunk
            values = [float(v) for v in re.findall(rb"\((\d+\.\d+)/100%\)", seen)]
            if values and percent <= values[-1] < 100:
                return
    raise AssertionError(f"qemu-img did not reach {percent}% in time: {seen[-200:]!r}")


def test_qemu_img_killed_then_rerun(
    serve: StartServe, qemu_img: str, nbdkit: str, sockdir: Path, workdir: Path
) -> None:
    """qemu-img killed mid-copy, then run again from the start: correct archive."""
    size = 4 * MiB
    data = source_bytes(size, 9)
    src = write_sparse(workdir / "src.raw", data)
    server = serve({"d0": size}, extra=["--verbose"])
    # A slow source (nbdkit delay filter, 64 KiB reads) so the kill lands mid-way.
    slow_sock = sockdir / "slow.sock"
    slow = subprocess.Popen(
        [
            nbdkit,
            "-f",
            "-r",
            "-U",
            str(slow_sock),
            "--filter=blocksize",  # outermost: 64 KiB pieces, each one delayed
            "--filter=delay",
            "file",
            str(src),
            "rdelay=10ms",
            "maxlen=64k",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        poll_until(slow_sock.exists, 10, "nbdkit's socket")
        proc = subprocess.Popen(
            [
                *(qemu_img, "convert", "-p", "-m", "1", "-n", "-f", "raw", "-O", "raw"),
                f"nbd+unix://?socket={slow_sock}",
                server.uri("d0"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for_progress(proc, 25.0, timeout=30)
        finally:
            proc.kill()
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
    finally:
        slow.kill()
        slow.wait()
    assert server.alive(), server.stderr()
    assert not Path(server.archive).exists()
    wait_ok(qemu_img_convert(qemu_img, src, server.uri("d0", "tcp")))
    check_archive(finished_archive(server), workdir, {"d0": data})


# -- signals and stdout -----------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_before_completion(
    serve: StartServe, qemu_img: str, qemu_io: str, workdir: Path, signum: int
) -> None:
    data = source_bytes(ODD_SIZE, 10)
    src = write_sparse(workdir / "src.raw", data)
    server = serve({"done-disk": ODD_SIZE, "half-disk": 2 * MiB, "untouched": MiB})
    wait_ok(qemu_img_convert(qemu_img, src, server.uri("done-disk")))
    run_qemu_io(qemu_io, server.uri("half-disk"), "write -P 0x42 0 1M")
    assert server.alive()
    server.signal(signum)
    status = server.wait()
    err = server.stderr()
    assert status != 0, err
    archive = Path(server.archive)
    assert not archive.exists()
    assert Path(f"{archive}.part").exists()
    assert [p.name for p in workdir.glob("out.vma*")] == ["out.vma.part"]
    (line,) = [ln for ln in err.splitlines() if "incomplete:" in ln]
    incomplete = line.rsplit("incomplete:", 1)[1]
    assert "half-disk" in incomplete
    assert "untouched" in incomplete
    assert "done-disk" not in incomplete
    assert signal.Signals(signum).name in line
    assert "Traceback" not in err
    assert server.unix is not None
    assert not Path(server.unix).exists()  # the socket file is removed


def test_signal_right_after_listening(serve: StartServe) -> None:
    """A signal sent the moment the listening lines appear still gives the clean exit."""
    server = serve({"d0": MiB})
    server.signal(signal.SIGTERM)
    assert server.wait() == 128 + signal.SIGTERM
    err = server.stderr()
    assert "Traceback" not in err
    assert "interrupted by SIGTERM before anything was written; no archive left" in err


def test_a_live_servers_part_is_refused_and_a_killed_ones_replaced(
    serve: StartServe, qemu_img: str, qemu_io: str, workdir: Path
) -> None:
    """The lock on ``ARCHIVE.part``: a second serve of the same archive is refused
    while the first lives (its file untouched); once the first is killed (SIGKILL:
    no clean-up), the next run replaces its ``.part`` and journal with an INFO line."""
    first = serve({"d0": MiB}, extra=["--verbose"])
    run_qemu_io(qemu_io, first.uri("d0"), "write -P 0x42 0 100k", "flush")
    part = Path(f"{first.archive}.part")
    journal = Path(f"{part}.journal")
    assert part.stat().st_size > 0
    assert journal.exists()
    before = part.read_bytes()
    second = run_tool(
        [*nbdvma_cmd(), "serve", first.archive, "--disk", "d0=1M", "--listen", "tcp:127.0.0.1:0"],
        check=False,
    )
    assert second.returncode == 1, second.stderr
    assert second.stderr == (
        f"nbdvma serve: {part}: another process is writing this archive "
        "(it holds the file's lock); wait for it or choose another name\n"
    )
    assert part.read_bytes() == before
    assert journal.exists()
    assert first.alive()
    first.process.kill()
    first.process.wait()
    data = source_bytes(MiB, 13)
    src = write_sparse(workdir / "src.raw", data)
    third = serve({"d0": MiB})
    assert (
        f"nbdvma serve: replaced {part} ({len(before):,} bytes) and {journal}, "
        "left by an earlier run no longer running" in third.stderr()
    ), third.stderr()
    wait_ok(qemu_img_convert(qemu_img, src, third.uri("d0")))
    check_archive(finished_archive(third), workdir, {"d0": data})
    assert not journal.exists()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_null_backend_ends_as_the_vma_one_does(
    serve: StartServe, qemu_img: str, qemu_io: str, workdir: Path, transport: str
) -> None:
    """``--backend null``: the disk written completely (qemu-img, whose zeroes count)
    and its client gone, serve ends by itself with exit 0 and a summary; a disk not
    written stays awaited; no archive is ever made."""
    data = source_bytes(SIZE, 14)
    src = write_sparse(workdir / "src.raw", data)
    server = serve({"d0": SIZE, "d1": MiB}, extra=["--backend", "null"])
    wait_ok(qemu_img_convert(qemu_img, src, server.uri("d0", transport)))
    run_qemu_io(qemu_io, server.uri("d1", transport), "write -P 1 0 512k")
    assert server.alive(), server.stderr()  # d1 is half written
    run_qemu_io(qemu_io, server.uri("d1", transport), "write -z 512k 512k")
    assert server.wait() == 0, server.stderr()
    err = server.stderr()
    assert "nbdvma serve: d0: size 3.0 MiB, discarded\n" in err
    assert "nbdvma serve: d1: size 1.0 MiB, discarded\n" in err
    assert list(workdir.glob("out.vma*")) == []


def test_null_backend_interrupted_exits_as_the_vma_one(serve: StartServe, qemu_io: str) -> None:
    server = serve({"d0": MiB, "d1": MiB}, extra=["--backend", "null", "-v"])
    run_qemu_io(qemu_io, server.uri("d0"), "write -P 1 0 1M")
    poll_until(lambda: "disconnected from export 'd0'" in server.stderr(), 10, "d0's end")
    server.signal(signal.SIGINT)
    assert server.wait() == 128 + signal.SIGINT
    assert "nbdvma serve: interrupted by SIGINT; incomplete: d1\n" in server.stderr()


@pytest.mark.parametrize(
    ("stream", "warning"),
    [
        (b"QEVM\x00\x00\x00\x03" + bytes(100_000), None),
        (
            b"hello, world" * 1000,
            "nbdvma serve: warning: vmstate: the stream begins with b'hell', not QEMU's "
            "migration magic b'QEVM': stored as sent, but QEMU cannot load it (was it a "
            "QEMU migrate?)",
        ),
        (
            b"QEVM\x00\x00\x00\x02" + bytes(1000),
            "nbdvma serve: warning: vmstate: QEMU migration stream version 2, not 3: stored "
            "as sent, but QEMU cannot load it",
        ),
        (
            b"QEV",
            "nbdvma serve: warning: vmstate: the stream ended after 3 bytes, before a QEMU "
            "migration stream's header: the archive has no usable VM state",
        ),
    ],
)
def test_vmstate_that_is_no_qemu_migration_stream_is_stored_with_a_warning(
    serve: StartServe, qemu_io: str, sockdir: Path, workdir: Path, stream: bytes, warning: str
) -> None:
    server = serve({"d0": MiB}, extra=["--vmstate", f"unix:{sockdir / 'vm.sock'}"])
    run_qemu_io(qemu_io, server.uri("d0"), "write -z 0 1M")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sockdir / "vm.sock"))
        for i in range(0, len(stream), 5):  # the magic split across receives
            s.sendall(stream[i : i + 5])
            if i < 20:
                time.sleep(0.01)
    archive = finished_archive(server)
    warnings = [ln for ln in server.stderr().splitlines() if "warning: vmstate" in ln]
    assert warnings == ([warning] if warning else []), server.stderr()
    nbdvma("extract", str(archive), str(workdir / "x"))
    assert (workdir / "x" / "vmstate.bin").read_bytes()[: len(stream)] == stream


def test_archive_to_stdout_piped_into_verify(
    serve: StartServe, qemu_img: str, workdir: Path
) -> None:
    a = source_bytes(ODD_SIZE, 11)
    b = source_bytes(SIZE, 12)
    src_a = write_sparse(workdir / "a.raw", a)
    src_b = write_sparse(workdir / "b.raw", b)
    server = serve({"a": ODD_SIZE, "b": SIZE}, archive="-", stdout=subprocess.PIPE)
    verify = subprocess.Popen(
        [*nbdvma_cmd(), "verify", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    copy = workdir / "copy.vma"
    assert server.process.stdout is not None
    assert verify.stdin is not None

    def tee() -> None:
        assert server.process.stdout is not None
        assert verify.stdin is not None
        with copy.open("wb") as f:
            while chunk := server.process.stdout.read(1 << 16):
                f.write(chunk)
                verify.stdin.write(chunk)
        verify.stdin.close()

    t = threading.Thread(target=tee)
    t.start()
    wait_ok(qemu_img_convert(qemu_img, src_a, server.uri("a")))
    wait_ok(qemu_img_convert(qemu_img, src_b, server.uri("b", "tcp")))
    assert server.wait() == 0, server.stderr()
    t.join(30)
    assert not t.is_alive()
    assert verify.stdout is not None
    out = verify.stdout.read()
    verify.stdout.close()
    assert verify.wait(30) == 0, out
    assert not list(workdir.glob("-*"))
    check_archive(copy, workdir, {"a": a, "b": b}, digest=False)  # a stream: no digest


def nbdvma_cmd() -> list[str]:
    import sys

    return [sys.executable, "-m", "nbdvma"]


def test_extract_of_untouched_disk_is_zero(serve: StartServe, libnbd: ModuleType) -> None:
    """Sanity of the check itself: a disk zeroed by one WRITE_ZEROES restores as zeros."""
    server = serve({"d0": ODD_SIZE})
    h = _connect(libnbd, server.uri("d0"))
    h.zero(ODD_SIZE, 0)
    h.shutdown()
    archive = finished_archive(server)
    got = extract_disks(archive, Path(server.archive).parent / "x")
    assert got == {"d0": bytes(ODD_SIZE)}
    listing = nbdvma("list", str(archive)).stdout
    assert "d0" in listing
    assert os.path.getsize(archive) < 64 * KiB  # zero clusters cost no data
