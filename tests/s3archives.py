"""The archives the S3 read tests upload, and what those tests share.

:func:`make_archives` makes one archive of each form a bucket may hold (``nbdvma
create`` plain and ``.vma.zst``; the ``zstd`` CLI, ``gzip`` and ``lzop`` for vzdump's
single-stream forms) from two raw images of mostly random data; :func:`upload` puts
one into a bucket with boto3's ``upload_file``.  The fixture ``aws_env`` (import
:func:`aws_env_fixture` into a test module) sets this process's environment for in-process reads.
"""

from __future__ import annotations

import random
import subprocess
import sys
import urllib.parse
from pathlib import Path

import attrs
import pytest
from conftest import S3Bucket
from servehelpers import run_tool

KiB = 1024
MiB = 1024 * KiB
NBDVMA = [sys.executable, "-m", "nbdvma"]
#: The forms of archive an object may hold, and the file names they are made under.
FORMS = {
    "plain": "a.vma",
    "zst": "a.vma.zst",
    "stream": "s.vma.zst",
    "gzip": "a.vma.gz",
    "lzo": "a.vma.lzo",
}
#: What a request and its answer's headers may add to the bytes of a ranged GET.
HTTP_SLACK = 16 * KiB


def image(path: Path, size: int, seed: int) -> bytes:
    """A raw image: random data (most of it), zero clusters, zero 4 KiB blocks."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    for start in range(0, size, 1 * MiB):
        data[start + 512 * KiB : start + 768 * KiB] = bytes(256 * KiB)  # zero clusters
        for block in (200, 203):  # zero 4 KiB blocks in data clusters: partial masks
            at = start + block * 4 * KiB
            data[at : at + 4 * KiB] = bytes(4 * KiB)
    path.write_bytes(data)
    return bytes(data)


@attrs.frozen
class Made:
    """The local archives (one per form) and what they were made from."""

    dir: Path
    archives: dict[str, Path]
    images: dict[str, Path]
    config: bytes


def make_archives(d: Path) -> Made:
    """The archives of :data:`FORMS` in ``d``: 20 MiB of mostly random data, a config."""
    images = {"drive-scsi0": d / "scsi0.raw", "drive-virtio1": d / "virtio1.raw"}
    image(images["drive-scsi0"], 20 * MiB + 5 * 4096 + 1536, 1)  # a partial last cluster
    image(images["drive-virtio1"], 1 * MiB, 2)
    config = b"memory: 512\nscsi0: local:vm-100-disk-0,size=20M\n"
    (d / "qemu-server.conf").write_bytes(config)
    disks = [f"{n}={p}" for n, p in images.items()]
    for form in ("plain", "zst"):
        run_tool(
            [*NBDVMA, "create", str(d / FORMS[form]), "-c", str(d / "qemu-server.conf"), *disks]
        )
    plain = d / FORMS["plain"]
    run_tool(["zstd", "-q", str(plain), "-o", str(d / FORMS["stream"])])
    (d / FORMS["gzip"]).write_bytes(run_tool_bytes(["gzip", "-c", str(plain)]))
    run_tool(["lzop", "-q", str(plain), "-o", str(d / FORMS["lzo"])])
    return Made(d, {f: d / n for f, n in FORMS.items()}, images, config)


def run_tool_bytes(args: list[str]) -> bytes:
    return subprocess.run(args, capture_output=True, check=True, timeout=60).stdout


def upload(s3: S3Bucket, path: Path, key: str | None = None) -> str:
    """Upload ``path`` as ``key`` (default: its name) with ``upload_file``; the URL."""
    key = key or path.name
    s3.client.upload_file(str(path), s3.bucket, key)
    return s3.url(key)


def nbdvma(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """``python -m nbdvma ARGS`` (bytes out: configs and listings compared exactly)."""
    result = subprocess.run(
        [*NBDVMA, *args], capture_output=True, env=env, timeout=120, check=False
    )
    if check and result.returncode:
        raise AssertionError(f"nbdvma {' '.join(args)}: {result.returncode}\n{result.stderr!r}")
    return result


def one_line_failure(result: subprocess.CompletedProcess[bytes]) -> str:
    """The single line a failed command printed (and nothing on stdout)."""
    err = result.stderr.decode()
    assert result.returncode != 0, err
    assert err.count("\n") == 1, err
    assert err.endswith("\n"), err
    assert "Traceback" not in err
    return err.strip()


def host_port(url: str) -> tuple[str, int]:
    """``http://HOST:PORT`` -> ``(HOST, PORT)``."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(name="aws_env")
def aws_env_fixture(monkeypatch: pytest.MonkeyPatch, s3: S3Bucket) -> S3Bucket:
    """This process's environment set as an nbdvma subprocess would get it."""
    for name, value in s3.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    return s3
