"""Fixtures shared by every test module.

Summary (each fixture's docstring has the details):

* ``workdir``: a fresh directory for a test's files (under ``tmp_path``).
* ``sockdir``: a short directory for unix sockets (``sun_path`` holds 107 bytes).
* ``tool``: ``tool("qemu-img") -> "/usr/bin/qemu-img"``; **fails** the test when missing.
* ``qemu_img``, ``qemu_io``, ``qemu_nbd``, ``qemu_system``, ``nbdkit``, ``nbdcopy``,
  ``nbdinfo``: the paths of those clients, via ``tool``.
* ``libnbd``: the ``nbd`` module of Debian's python3-libnbd; fails when missing.
* ``free_tcp_port``: ``free_tcp_port() -> int``, a port on 127.0.0.1 free right now.
* ``raw_image``: ``raw_image("a.raw", size, {offset: bytes}) -> Path``, a sparse raw file.
* ``qemu_vm``: ``qemu_vm([disk, ...], qmp="unix"|"tcp") -> QemuVm``, a paused QEMU with
  those raw files as virtio-blk disks ``scsi0``, ``scsi1``...; killed at teardown.
  Annotate with ``from conftest import QemuVm`` (pytest puts ``tests/`` on sys.path).
* ``s3_server``: one SeaweedFS (``weed mini``, see ``s3server.py``) per xdist worker,
  started at first use, stopped by pid at the end of the session.
* ``s3``: an :class:`S3Bucket` on it: a fresh, empty bucket for the test, with the
  endpoint, the keys, an ``env()`` for ``nbdvma`` subprocesses and a boto3 client.
* ``private_s3``: ``private_s3() -> SeaweedServer``, a SeaweedFS of the test's own
  (one it may kill), stopped at teardown.

No test sees the developer's ``~/.aws``: every ``AWS_*`` variable is removed from this
process's environment and the shared files are pointed at nothing (``s3server.py``).

Real clients are part of the product's contract, so a missing one is a broken test
machine (run ``scripts/setup.sh``), never a reason to skip.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import attrs
import pytest
from s3server import S3Endpoint, SeaweedServer, isolated_aws_env
from servehelpers import ServeProcess, StartServe, start_serve

#: Seconds to wait for a started QEMU to accept QMP connections.
QEMU_START_TIMEOUT = 30.0

SETUP_HINT = "install the test dependencies with `bash scripts/setup.sh`"


# -- files and sockets ------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh, empty directory for the test's files (images, archives, logs).

    It lives under pytest's ``tmp_path``, so pytest keeps the last few runs for
    inspection.  Its path may be too long for a unix socket: use ``sockdir`` for those.
    """
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A fresh directory with a short path (``/tmp/nbdvma-XXXX``) for unix sockets.

    Linux limits a unix socket path to 107 bytes, which ``tmp_path`` can exceed.
    The directory and its contents are removed at teardown.
    """
    path = Path(tempfile.mkdtemp(prefix="nbdvma-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def free_tcp_port() -> Callable[[], int]:
    """A function returning a TCP port on 127.0.0.1 that is free at the time of the call.

    It binds port 0 and closes the socket, so another process could take the port before
    the test does; for servers of our own prefer binding port 0 and reading it back.
    Use it for programs that need a port number up front (``qemu -qmp tcp:...``).
    """

    def free_port() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            return port

    return free_port


@pytest.fixture
def raw_image(workdir: Path) -> Callable[..., Path]:
    """A function making a sparse raw image in ``workdir``.

    ``raw_image(name, size, data=None) -> Path``: ``size`` bytes, all holes except the
    ``{offset: bytes}`` items of ``data``, written in place.  For example
    ``raw_image("a.raw", 1 << 20, {0: b"\\xab" * 65536, 655360: os.urandom(4096)})``.
    """

    def make(name: str, size: int, data: Mapping[int, bytes] | None = None) -> Path:
        path = workdir / name
        with path.open("wb") as f:
            f.truncate(size)
            for offset, chunk in sorted((data or {}).items()):
                if offset + len(chunk) > size:
                    raise ValueError(f"data at {offset} runs past the size {size}")
                f.seek(offset)
                f.write(chunk)
        return path

    return make


# -- real clients -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tool() -> Callable[[str], str]:
    """A function that returns the path of a program on ``PATH`` (``tool("nbdcopy")``).

    A missing program fails the test with a message naming it and the setup script.
    """

    def find(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            pytest.fail(f"{name} is not installed: {SETUP_HINT}", pytrace=False)
        return path

    return find


@pytest.fixture(scope="session")
def qemu_system(tool: Callable[[str], str]) -> str:
    """Path of ``qemu-system-x86_64`` (Debian qemu-system-x86)."""
    return tool("qemu-system-x86_64")


@pytest.fixture(scope="session")
def qemu_img(tool: Callable[[str], str]) -> str:
    """Path of ``qemu-img`` (Debian qemu-utils)."""
    return tool("qemu-img")


@pytest.fixture(scope="session")
def qemu_io(tool: Callable[[str], str]) -> str:
    """Path of ``qemu-io`` (Debian qemu-utils)."""
    return tool("qemu-io")


@pytest.fixture(scope="session")
def qemu_nbd(tool: Callable[[str], str]) -> str:
    """Path of ``qemu-nbd`` (Debian qemu-utils)."""
    return tool("qemu-nbd")


@pytest.fixture(scope="session")
def nbdkit(tool: Callable[[str], str]) -> str:
    """Path of ``nbdkit`` (Debian nbdkit)."""
    return tool("nbdkit")


@pytest.fixture(scope="session")
def nbdcopy(tool: Callable[[str], str]) -> str:
    """Path of ``nbdcopy`` (Debian libnbd-bin)."""
    return tool("nbdcopy")


@pytest.fixture(scope="session")
def nbdinfo(tool: Callable[[str], str]) -> str:
    """Path of ``nbdinfo`` (Debian libnbd-bin)."""
    return tool("nbdinfo")


@pytest.fixture(scope="session")
def libnbd() -> ModuleType:
    """The ``nbd`` module of Debian's python3-libnbd (``libnbd.NBD()``...).

    It is importable only from a venv made from ``/usr/bin/python3`` with
    ``--system-site-packages``, as ``scripts/setup.sh`` makes it; otherwise the test fails.
    """
    try:
        import nbd
    except ImportError as exc:
        pytest.fail(
            f"python3-libnbd is not importable ({exc}): {SETUP_HINT} and run the tests with"
            " .venv/bin/python (made from /usr/bin/python3 --system-site-packages)",
            pytrace=False,
        )
    module: ModuleType = nbd
    return module


# -- a paused QEMU --------------------------------------------------------------------------


@attrs.frozen
class QemuDisk:
    """One disk of a :class:`QemuVm`.

    Attributes:
        path: the raw file.
        size: its size in bytes at start-up.
        device_id: the virtio-blk device id, ``scsi<N>`` (Proxmox's ``drive-scsi<N>``).
        node_name: the raw-format block node to back up (``disk<N>``).
        file_node: the file-protocol node under it (``file<N>``).
    """

    path: Path
    size: int
    device_id: str
    node_name: str
    file_node: str


@attrs.define(eq=False)
class QemuVm:
    """A running, paused (``-S``) QEMU started by the ``qemu_vm`` fixture.

    Attributes:
        process: the QEMU process.
        qmp_address: where its QMP listens, ``unix:PATH`` or ``tcp:127.0.0.1:PORT``
            (give it to ``QmpClient.connect`` or ``nbdvma.addresses.parse_address``).
        disks: the disks, in order.
        log: QEMU's stdout and stderr.
    """

    process: subprocess.Popen[bytes]
    qmp_address: str
    disks: list[QemuDisk]
    log: Path

    def kill(self) -> None:
        """Kill QEMU (SIGKILL) and reap it; harmless if it already exited."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def output(self) -> str:
        """What QEMU printed so far (for assertion messages)."""
        return self.log.read_text(errors="replace")


def _qmp_accepts(address: str) -> bool:
    family, target = address.split(":", 1)
    sock_family = socket.AF_UNIX if family == "unix" else socket.AF_INET
    dest: str | tuple[str, int]
    if family == "unix":
        dest = target
    else:
        host, port = target.rsplit(":", 1)
        dest = (host, int(port))
    with socket.socket(sock_family, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(dest)
        except OSError:
            return False
    return True


@pytest.fixture
def qemu_vm(
    qemu_system: str, workdir: Path, sockdir: Path, free_tcp_port: Callable[[], int]
) -> Iterator[Callable[..., QemuVm]]:
    """A function starting a paused QEMU VM with raw files as its disks.

    ``qemu_vm(disks, *, qmp="unix", extra_args=()) -> QemuVm`` runs::

        qemu-system-x86_64 -S -nodefaults -display none -machine q35 -accel tcg -m 128
          -smp 1 -qmp unix:SOCK,server=on,wait=off     (or tcp:127.0.0.1:PORT)
          -blockdev driver=file,filename=DISK<N>,node-name=file<N>
          -blockdev driver=raw,file=file<N>,node-name=disk<N>
          -device virtio-blk-pci,drive=disk<N>,id=scsi<N>      (for each disk N)

    and returns once QMP accepts connections (the fixture probes it with one connection
    that it closes at once; QEMU then accepts the next).  There is no guest OS: the
    backup job reads the disks of a paused VM all the same.  Every VM started is killed
    at teardown.  QEMU's output is in ``vm.log``; an early exit fails the test with it.
    """
    started: list[QemuVm] = []

    def start(
        disks: Sequence[Path],
        *,
        qmp: Literal["unix", "tcp"] = "unix",
        extra_args: Sequence[str] = (),
    ) -> QemuVm:
        n = len(started)
        if qmp == "unix":
            qmp_address = f"unix:{sockdir / f'qmp{n}.sock'}"
        else:
            qmp_address = f"tcp:127.0.0.1:{free_tcp_port()}"
        args = [
            qemu_system,
            *("-S", "-nodefaults", "-display", "none", "-machine", "q35", "-accel", "tcg"),
            *("-m", "128", "-smp", "1", "-qmp", f"{qmp_address},server=on,wait=off"),
        ]
        vm_disks = []
        for i, disk in enumerate(disks):
            path = Path(disk).resolve()
            args += [
                "-blockdev",
                f"driver=file,filename={path},node-name=file{i}",
                "-blockdev",
                f"driver=raw,file=file{i},node-name=disk{i}",
                "-device",
                f"virtio-blk-pci,drive=disk{i},id=scsi{i}",
            ]
            vm_disks.append(QemuDisk(path, path.stat().st_size, f"scsi{i}", f"disk{i}", f"file{i}"))
        args += list(extra_args)
        log = workdir / f"qemu{n}.log"
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
            )
        vm = QemuVm(process, qmp_address, vm_disks, log)
        started.append(vm)
        deadline = time.monotonic() + QEMU_START_TIMEOUT
        while not _qmp_accepts(qmp_address):
            if process.poll() is not None:
                pytest.fail(
                    f"QEMU exited with {process.returncode} at start-up:\n"
                    f"{' '.join(args)}\n{vm.output()}",
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                pytest.fail(f"QEMU's QMP at {qmp_address} not up in {QEMU_START_TIMEOUT} s")
            time.sleep(0.02)
        return vm

    try:
        yield start
    finally:
        for vm in started:
            vm.kill()


@pytest.fixture
def serve(sockdir: Path, workdir: Path) -> Iterator[StartServe]:
    """``serve(disks, extra, **kw) -> ServeProcess``: ``nbdvma serve`` writing
    ``workdir/out.vma`` (see ``servehelpers.start_serve`` for ``kw``); every server
    started is killed at teardown."""
    started: list[ServeProcess] = []

    def start(disks: dict[str, int], extra: list[str], **kw: Any) -> ServeProcess:
        server = start_serve(
            workdir / "out.vma", disks, sockdir=sockdir, logdir=workdir, extra=extra, **kw
        )
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.kill()


# -- S3: SeaweedFS ------------------------------------------------------------------------

# Before any test runs: the developer's credentials, profile and endpoint must never
# reach a test or an nbdvma it starts (and botocore must not probe the EC2 metadata
# service for credentials when a test removes them).
_isolated = isolated_aws_env(dict(os.environ))  # taken before the clear: PATH stays
os.environ.clear()
os.environ.update(_isolated)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS S3 endpoint for this worker's whole session (about 1 s to start,
    110-180 MiB), shared by the tests, which each take a bucket of their own (``s3``)."""
    server = SeaweedServer(tmp_path_factory.mktemp("s3"))
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(f"SeaweedFS did not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@attrs.frozen
class S3Bucket:
    """A fresh bucket on a running endpoint (see the ``s3`` fixture).

    Attributes:
        endpoint: the endpoint's URL and keys.
        bucket: the bucket's name, created empty for this test.
        client: a boto3 client for the test's own checks.
    """

    endpoint: S3Endpoint
    bucket: str
    client: Any

    def url(self, key: str = "") -> str:
        """``s3://BUCKET/KEY``."""
        return f"s3://{self.bucket}/{key}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of an ``nbdvma`` subprocess writing to this endpoint."""
        return self.endpoint.env(**extra)

    def keys(self, prefix: str = "") -> list[str]:
        """The keys of the objects in the bucket under ``prefix``."""
        answer = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for o in answer.get("Contents", [])]

    def uploads(self, prefix: str = "") -> list[dict[str, Any]]:
        """The incomplete multipart uploads in the bucket under ``prefix``."""
        answer = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix)
        uploads: list[dict[str, Any]] = answer.get("Uploads", [])
        return uploads

    def download(self, key: str, path: Path) -> Path:
        """Download the object ``key`` into ``path``."""
        self.client.download_file(self.bucket, key, str(path))
        return path


_buckets = itertools.count()


@pytest.fixture
def s3(s3_server: SeaweedServer) -> S3Bucket:
    """A fresh, empty bucket on this worker's SeaweedFS (see :class:`S3Bucket`)."""
    assert s3_server.endpoint is not None
    client = s3_server.endpoint.client()
    name = f"nbdvma-{os.getpid()}-{next(_buckets)}"
    client.create_bucket(Bucket=name)
    return S3Bucket(s3_server.endpoint, name, client)


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[Callable[[], SeaweedServer]]:
    """``private_s3() -> SeaweedServer``: a SeaweedFS of the test's own, started, to
    kill or restart at will; stopped at teardown."""
    started: list[SeaweedServer] = []

    def start() -> SeaweedServer:
        server = SeaweedServer(tmp_path / f"s3-{len(started)}")
        started.append(server)
        try:
            server.start()
        except RuntimeError as exc:
            pytest.fail(f"SeaweedFS did not start: {exc}", pytrace=False)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
