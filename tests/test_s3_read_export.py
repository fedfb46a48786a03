"""``export`` and ``restore`` of ``s3://``: indexed by one streaming GET, read by ranged GETs.

The archives of ``s3archives.py`` are uploaded into a fresh
bucket of a real SeaweedFS; ``nbdvma export`` serves them on a unix socket and
``qemu-img convert -O qcow2`` + ``qemu-img compare`` check what it serves against the
source images; ``nbdvma restore --format qcow2`` likewise.  In this process,
:class:`~nbdvma.s3.archive.S3IndexedArchive` is read directly, its object's counters
saying what each read fetched.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import S3Bucket
from s3archives import (
    Made,
    aws_env_fixture,  # noqa: F401 - the fixture aws_env
    make_archives,
    nbdvma,
    one_line_failure,
    upload,
)
from servehelpers import run_tool

from nbdvma.errors import S3Error
from nbdvma.s3.location import parse_s3_url

pytestmark = pytest.mark.interop

KiB = 1024
MiB = 1024 * KiB
_LISTEN = re.compile(r"^nbdvma export: listening on unix:(.+)$", re.MULTILINE)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    """The archives of :data:`~s3archives.FORMS`, made once per module."""
    return make_archives(tmp_path_factory.mktemp("s3export"))


class Export:
    """A running ``nbdvma export`` of an ``s3://`` archive."""

    def __init__(self, args: list[str], env: dict[str, str], err: Path) -> None:
        self.err = err
        with err.open("wb") as f:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nbdvma", "export", *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=f,
            )
        deadline = time.monotonic() + 60
        while "export ready" not in self.stderr():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"export did not start:\n{self.stderr()}")
            time.sleep(0.02)
        match = _LISTEN.search(self.stderr())
        assert match is not None, self.stderr()
        self.socket = match.group(1)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.socket}"

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@pytest.fixture
def exports() -> Iterator[list[Export]]:
    """The exports a test started (killed at the end if still running)."""
    started: list[Export] = []
    yield started
    for exp in started:
        if exp.process.poll() is None:
            exp.process.kill()
        exp.process.wait()


@pytest.mark.parametrize("form", ["plain", "zst", "stream"])
def test_export_from_s3_converts_to_the_source(
    form: str,
    made: Made,
    s3: S3Bucket,
    tmp_path: Path,
    sockdir: Path,
    exports: list[Export],
    qemu_img: str,
) -> None:
    url = upload(s3, made.archives[form], f"pve/{made.archives[form].name}")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    # The endpoint from --s3-endpoint; TMPDIR: where a single stream goes.
    env = s3.env(AWS_ENDPOINT_URL="http://127.0.0.1:9", TMPDIR=str(temporary))
    args = [url, "--listen", f"unix:{sockdir / 'e.sock'}", "--s3-endpoint", s3.endpoint.url]
    exp = Export(args, env, tmp_path / "export.err")
    exports.append(exp)
    if form == "stream":
        # vzdump's single stream cannot be read at an offset: decompressed once into
        # the system's temporary directory (the object's "directory" is no place).
        assert re.search(
            rf"^nbdvma export: {re.escape(url)}: the archive is one zstd stream, not a "
            rf"frame per extent: it must be decompressed once, into "
            rf"{re.escape(str(temporary))}/\.nbdvma-export-\w+\.vma \(removed at exit\)$",
            exp.stderr(),
            re.MULTILINE,
        ), exp.stderr()
    else:
        assert "decompress" not in exp.stderr()
    assert list(temporary.iterdir()) == []  # unlinked as soon as open, or never made
    for name, source in made.images.items():
        out = tmp_path / f"{name}.qcow2"
        run_tool([qemu_img, "convert", "-f", "raw", "-O", "qcow2", exp.uri(name), str(out)])
        run_tool([qemu_img, "compare", "-f", "raw", "-F", "qcow2", str(source), str(out)])
    assert exp.stop() == 0


def test_export_cache_dir_for_a_single_stream(
    made: Made, s3: S3Bucket, tmp_path: Path, sockdir: Path, exports: list[Export]
) -> None:
    url = upload(s3, made.archives["gzip"])
    cache = tmp_path / "cache"
    cache.mkdir()
    args = [url, "--listen", f"unix:{sockdir / 'e.sock'}", "--cache", str(cache)]
    exp = Export(args, s3.env(), tmp_path / "export.err")
    exports.append(exp)
    assert (
        f"{url}: the archive is gzip-compressed: it must be decompressed once, into {cache}/"
        in (exp.stderr())
    )
    assert exp.stop() == 0


@pytest.mark.parametrize("image_format", ["raw", "qcow2"])
@pytest.mark.parametrize("form", ["plain", "zst", "stream"])
def test_restore_from_s3(
    image_format: str, form: str, made: Made, s3: S3Bucket, tmp_path: Path, qemu_img: str
) -> None:
    url = upload(s3, made.archives[form])
    out = tmp_path / "restored"
    nbdvma("restore", url, str(out), "--format", image_format, env=s3.env())
    names = sorted(p.name for p in out.iterdir())
    disks = [f"disk-{n}.{image_format}" for n in sorted(made.images)]
    assert names == sorted([*disks, "qemu-server.conf"])
    config = nbdvma("config", str(made.archives[form])).stdout  # with create's map lines
    assert (out / "qemu-server.conf").read_bytes() == config
    for name, source in made.images.items():
        run_tool(
            [qemu_img, "compare", "-f", "raw", "-F", image_format, str(source),
             str(out / f"disk-{name}.{image_format}")]
        )  # fmt: skip


@pytest.mark.parametrize("command", ["export", "restore"])
def test_export_and_restore_errors_are_one_line(
    command: str, made: Made, s3: S3Bucket, tmp_path: Path, sockdir: Path
) -> None:
    url = s3.url("pve/nope.vma")
    if command == "export":
        args = ["export", url, "--listen", f"unix:{sockdir / 'e.sock'}"]
    else:
        args = ["restore", url, str(tmp_path / "out"), "--format", "qcow2"]
    line = one_line_failure(nbdvma(*args, env=s3.env(), check=False))
    prefix = f"nbdvma {command}: " if command == "export" else ""
    assert line.startswith(f"{prefix}{url}: no such key (NoSuchKey, HeadObject at "), line
    assert not (sockdir / "e.sock").exists()
    # No restored image (the directory is made first, as for a file).
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


# -- in this process: what each read fetches -------------------------------------------------


@pytest.mark.parametrize("form", ["plain", "zst"])
def test_reads_are_ranged_gets_through_a_bounded_cache(
    form: str, made: Made, aws_env: S3Bucket
) -> None:
    from nbdvma.s3.archive import CACHE, PIECE, index_object
    from nbdvma.s3.source import S3Object

    location = parse_s3_url(upload(aws_env, made.archives[form]))
    assert location is not None
    obj = S3Object.open(location)
    archive = index_object(obj)
    try:
        # The index pass: the object once, in one streaming GET.
        assert (obj.requests, obj.fetched) == (1, obj.size)
        source = made.images["drive-scsi0"].read_bytes()
        frames = archive.index.frames
        biggest = PIECE if frames is None else max(frames.lengths)
        # A 4 KiB read: one ranged GET of a piece (plain) or of one frame (zst).
        offset = 7 * MiB + 12 * KiB
        assert archive.read("drive-scsi0", offset, 4 * KiB) == source[offset : offset + 4 * KiB]
        assert obj.requests == 2
        assert obj.fetched - obj.size <= biggest
        # Nothing can be read without a request: every read goes to a thread.
        assert archive.read_now("drive-scsi0", offset, 4 * KiB) is None
        # Again, or next to it: from the cache.
        before = obj.fetched
        assert (
            archive.read("drive-scsi0", offset + 4 * KiB, 4 * KiB)
            == (source[offset + 4 * KiB : offset + 8 * KiB])
        )
        assert obj.fetched == before
        # The whole disk, in NBD-sized reads: right, with a bounded cache (2 here: the
        # disk has fewer pieces than CACHE).
        assert archive.cache_size == CACHE
        archive.cache_size = 2
        got = bytearray()
        cached = set()
        for at in range(0, len(source), 1 * MiB):
            got += archive.read("drive-scsi0", at, min(1 * MiB, len(source) - at))
            cached.add(len(archive._cache))
        assert got == source
        assert max(cached) == 2
    finally:
        archive.close()


def test_a_replaced_object_is_an_error_not_a_mix(made: Made, aws_env: S3Bucket) -> None:
    from nbdvma.s3.archive import index_object
    from nbdvma.s3.source import S3Object

    s3 = aws_env
    location = parse_s3_url(upload(s3, made.archives["plain"], "a.vma"))
    assert location is not None
    obj = S3Object.open(location)
    archive = index_object(obj)
    try:
        # Another archive of the same shape under the same key.
        s3.client.upload_file(str(made.archives["zst"]), s3.bucket, "a.vma")
        with pytest.raises(S3Error, match=r"the object changed meanwhile \(PreconditionFailed"):
            archive.read("drive-scsi0", 0, 4 * KiB)
    finally:
        archive.close()
