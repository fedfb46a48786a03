"""Reading archives from S3: ``list``, ``config``, ``verify``, ``extract`` of ``s3://``.

Archives are made locally (``nbdvma create``, plain and ``.vma.zst``; the ``zstd`` CLI,
``gzip`` and ``lzop`` for vzdump's single-stream forms), uploaded with boto3's
``upload_file`` into a fresh bucket of a real SeaweedFS (the ``s3`` fixture), and read
back by ``python -m nbdvma``; the results must equal those of the local file byte for
byte.  What the client fetched is counted by a TCP proxy in front of the endpoint
(``s3proxy.py``), independently of nbdvma and of SeaweedFS.  ``export`` and ``restore``
of ``s3://`` are in ``test_s3_read_export.py``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import S3Bucket
from s3archives import (
    HTTP_SLACK,
    NBDVMA,
    KiB,
    Made,
    MiB,
    aws_env_fixture,  # noqa: F401 - the fixture aws_env
    files_of,
    host_port,
    make_archives,
    nbdvma,
    one_line_failure,
    upload,
)
from s3proxy import S3Proxy
from s3server import SeaweedServer

from nbdvma.s3.source import FIRST_RANGE

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    """The archives of :data:`~s3archives.FORMS`, made once per module."""
    return make_archives(tmp_path_factory.mktemp("s3read"))


def timeless(out: bytes) -> bytes:
    """``verify -v`` output without the seconds its progress lines give."""
    return re.sub(rb"duration \d+ sec", b"duration N sec", out)


@pytest.fixture
def proxy(s3: S3Bucket) -> Iterator[S3Proxy]:
    """A counting proxy in front of the ``s3`` fixture's endpoint."""
    p = S3Proxy(host_port(s3.endpoint.url))
    yield p
    p.stop()


# -- list and config: the header only -----------------------------------------------------


@pytest.mark.parametrize("form", ["plain", "zst", "stream", "gzip", "lzo"])
def test_list_and_config_fetch_the_header_only(
    form: str, made: Made, s3: S3Bucket, proxy: S3Proxy
) -> None:
    archive = made.archives[form]
    url = upload(s3, archive)
    size = archive.stat().st_size
    assert size > 8 * FIRST_RANGE  # else fetching it all could pass for the header
    # The endpoint comes from --s3-endpoint, which wins over the environment's (a
    # port where nothing listens: a request that went there would fail).
    env = s3.env(AWS_ENDPOINT_URL="http://127.0.0.1:9")
    for args in (["list", url], ["config", url]):
        proxy.reset()
        got = nbdvma(*args, "--s3-endpoint", proxy.url, env=env)
        local = nbdvma(args[0], str(archive))
        assert got.stdout == local.stdout
        # One HEAD and one ranged GET of FIRST_RANGE bytes, whatever the archive's size.
        assert FIRST_RANGE // 2 < proxy.received <= FIRST_RANGE + HTTP_SLACK, (args, form)
        assert proxy.requests == {"HEAD": 1, "GET": 1}
    assert got.stdout.startswith(made.config)  # then the map lines create added


def test_list_reads_by_growing_ranges_what_it_must(made: Made, aws_env: S3Bucket) -> None:
    # In this process: the stream's own counters agree with the proxy's view, and a
    # header-only stream read to the end grows its ranges (1, 2, 4, 8, 8... MiB).
    from nbdvma.s3.location import parse_s3_url
    from nbdvma.s3.source import MAX_RANGE, S3Object, S3Stream

    archive = made.archives["plain"]
    location = parse_s3_url(upload(aws_env, archive))
    assert location is not None
    obj = S3Object.open(location)
    try:
        with S3Stream(obj, header_only=True) as stream:
            assert stream.read(100) == archive.read_bytes()[:100]
            assert (obj.requests, obj.fetched) == (1, FIRST_RANGE)
            rest = stream.read()
        assert rest == archive.read_bytes()[100:]
        sizes = []
        step = FIRST_RANGE
        while sum(sizes) < obj.size:
            sizes.append(min(step, obj.size - sum(sizes)))
            step = min(2 * step, MAX_RANGE)
        assert (obj.requests, obj.fetched) == (len(sizes), obj.size)
        with S3Stream(obj) as stream:
            assert stream.read() == archive.read_bytes()
        assert obj.requests == len(sizes) + 1  # one streaming GET
    finally:
        obj.client.close()


# -- verify and extract: the whole object, once -------------------------------------------


@pytest.mark.parametrize("form", ["plain", "zst", "stream", "gzip", "lzo"])
def test_verify_and_extract_equal_the_local_results(
    form: str, made: Made, s3: S3Bucket, proxy: S3Proxy, tmp_path: Path
) -> None:
    archive = made.archives[form]
    url = upload(s3, archive, f"dir/{archive.name}")
    env = s3.env(AWS_ENDPOINT_URL=proxy.url)
    got = nbdvma("verify", "-v", url, env=env)
    assert timeless(got.stdout) == timeless(nbdvma("verify", "-v", str(archive)).stdout)
    assert b"data digest (blake3) verified" in got.stdout
    # Streamed once, by one GET: the object, plus the requests' headers.
    size = archive.stat().st_size
    assert size <= proxy.received <= size + HTTP_SLACK
    assert proxy.requests == {"HEAD": 1, "GET": 1}
    proxy.reset()
    local, remote = tmp_path / "local", tmp_path / "remote"
    nbdvma("extract", str(archive), str(local))
    out = nbdvma("extract", url, str(remote), env=env).stdout
    assert out == nbdvma("extract", str(archive), str(tmp_path / "again")).stdout.replace(
        b"again", b"remote"
    )
    assert files_of(remote) == files_of(local)
    assert files_of(remote)["disk-drive-scsi0.raw"] == made.images["drive-scsi0"].read_bytes()
    assert size <= proxy.received <= size + HTTP_SLACK
    assert proxy.requests == {"HEAD": 1, "GET": 1}


@pytest.mark.parametrize("cuts", [1, 4])
def test_a_broken_off_transfer_is_resumed_where_it_stopped(
    cuts: int, made: Made, s3: S3Bucket, tmp_path: Path
) -> None:
    # The connection is cut after 3 MiB of the object, once or again and again: the
    # GET goes on from the byte reached each time (each resumed one got on: more
    # cuts than RESUMES end nothing), and the result is the same.
    archive = made.archives["plain"]
    url = upload(s3, archive)
    cutter = S3Proxy(host_port(s3.endpoint.url), cut_after=[3 * MiB] * cuts)
    try:
        nbdvma("extract", url, str(tmp_path / "out"), env=s3.env(AWS_ENDPOINT_URL=cutter.url))
        assert cutter.cuts == cuts
        nbdvma("extract", str(archive), str(tmp_path / "local"))
        assert files_of(tmp_path / "out") == files_of(tmp_path / "local")
        # Not fetched again from the start: the object once, and what was cut short.
        assert cutter.received < archive.stat().st_size + cuts * (64 * KiB + HTTP_SLACK)
    finally:
        cutter.stop()


@pytest.mark.parametrize("form", ["zst", "lzo"])
def test_a_transfer_that_keeps_breaking_off_is_one_line(
    form: str, made: Made, s3: S3Bucket, tmp_path: Path
) -> None:
    # Cut after 2 MiB, then every resumed GET after 64 KiB (its headers and a few
    # bytes): RESUMES resumes, then extract gives up with one line, no disk image.
    # (lzo: the S3 error, not lzop's complaint about its input ending early.)
    from nbdvma.s3.source import RESUMES

    archive = made.archives[form]
    url = upload(s3, archive)
    cutter = S3Proxy(host_port(s3.endpoint.url), cut_after=[2 * MiB] + [64 * KiB] * 10)
    out = tmp_path / "out"
    env = s3.env(AWS_ENDPOINT_URL=cutter.url)
    try:
        result = nbdvma("extract", url, str(out), env=env, check=False)
        # (The proxy may count a cut or two more: connections that the client left.)
        assert RESUMES < cutter.cuts < len(cutter.cut_after)
    finally:
        cutter.stop()
    line = one_line_failure(result)
    assert re.fullmatch(
        rf"{re.escape(url)}: the transfer broke off at byte \d+ of {archive.stat().st_size} "
        r"\(.*\)",
        line,
    ), line
    assert sorted(os.listdir(out)) == ["qemu-server.conf"]


# -- errors: one line each ------------------------------------------------------------------


@pytest.fixture
def plain_url(made: Made, s3: S3Bucket) -> str:
    return upload(s3, made.archives["plain"], "pve/a.vma")


@pytest.mark.parametrize("command", ["list", "config", "verify", "extract"])
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing key", r"^s3://{bucket}/pve/nope\.vma: no such key \(NoSuchKey, HeadObject at "),
        ("missing bucket", r"^s3://nbdvma-no-such-bucket/pve/a\.vma: no such bucket "),
        (
            "wrong secret",
            r"^s3://{bucket}/pve/a\.vma: the secret access key does not match the access key ID "
            r"\(SignatureDoesNotMatch, ",
        ),
        ("wrong key id", r"^s3://{bucket}/pve/a\.vma: the endpoint knows no such access key ID"),
        ("unknown endpoint", r"^s3://{bucket}/pve/a\.vma: cannot connect to http://127\.0\.0\.1:9"),
        ("a prefix", r"^s3://{bucket}/pve/: names a bucket or prefix, not an object"),
        (
            "no credentials",
            r"^s3://{bucket}/pve/a\.vma: no S3 credentials: set AWS_ACCESS_KEY_ID and "
            r"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
        ),
    ],
)
def test_errors_are_one_line_naming_the_object(
    command: str, case: str, expected: str, plain_url: str, s3: S3Bucket, tmp_path: Path
) -> None:
    url, env = plain_url, s3.env()
    if case == "missing key":
        url = plain_url.replace("a.vma", "nope.vma")
    elif case == "missing bucket":
        url = plain_url.replace(s3.bucket, "nbdvma-no-such-bucket")
    elif case == "wrong secret":
        env = s3.env(AWS_SECRET_ACCESS_KEY="not-the-secret-at-all")
    elif case == "wrong key id":
        env = s3.env(AWS_ACCESS_KEY_ID="NOSUCHKEYID")
    elif case == "unknown endpoint":
        env = s3.env(AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_MAX_ATTEMPTS="1")
    elif case == "no credentials":
        keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        env = {k: v for k, v in s3.env().items() if k not in keys}
    else:
        url = plain_url.removesuffix("a.vma")
    args = [command, url] + ([str(tmp_path / "out")] if command == "extract" else [])
    line = one_line_failure(nbdvma(*args, env=env, check=False))
    assert re.search(expected.format(bucket=re.escape(s3.bucket)), line), line
    assert "not-the-secret-at-all" not in line
    assert s3.endpoint.secret_key not in line
    if command == "extract":
        assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_a_bad_s3_endpoint_option_is_refused_by_the_parser(plain_url: str) -> None:
    for value, why in [
        ("ftp://127.0.0.1", "expected http://HOST[:PORT] or https://HOST[:PORT]"),
        ("http://127.0.0.1:port", "the port is not a number"),
        ("http://user:hunter2@", "expected http://HOST[:PORT]"),
    ]:
        result = nbdvma("list", plain_url, "--s3-endpoint", value, check=False)
        assert result.returncode == 1
        assert f"argument --s3-endpoint: {why}" in result.stderr.decode()
        assert "hunter2" not in result.stderr.decode()


def test_the_endpoint_killed_mid_extract_leaves_no_final_file(
    made: Made, private_s3: Callable[[], SeaweedServer], tmp_path: Path
) -> None:
    # The endpoint dies while extract streams the archive (slowed by the proxy so
    # that it is mid-read): one line, non-zero, no disk image under any name.
    server = private_s3()
    assert server.endpoint is not None
    client = server.endpoint.client()
    client.create_bucket(Bucket="killed")
    archive = made.archives["zst"]
    client.upload_file(str(archive), "killed", "a.vma.zst")
    client.close()
    slow = S3Proxy(host_port(server.endpoint.url), rate=4 * MiB)
    out = tmp_path / "out"
    env = server.endpoint.env(AWS_ENDPOINT_URL=slow.url)
    proc = subprocess.Popen(
        [*NBDVMA, "extract", "s3://killed/a.vma.zst", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while slow.received < 6 * MiB and proc.poll() is None:
            assert time.monotonic() < deadline, "extract did not start"
            time.sleep(0.01)
        assert proc.poll() is None, "extract ended before the endpoint was killed"
        assert (out / "tmp-disk-drive-scsi0.raw").exists()
        server.kill(signal.SIGKILL)
        slow.stop()  # the endpoint's address refuses connections from now on
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        slow.stop()
    line = one_line_failure(subprocess.CompletedProcess(proc.args, proc.returncode, b"", err))
    assert line.startswith("s3://killed/a.vma.zst: the transfer broke off at byte "), line
    assert "could not be resumed: cannot connect to http://127.0.0.1:" in line, line
    # The configs are written first, as for a file; no disk image, whole or partial.
    assert sorted(os.listdir(out)) == ["qemu-server.conf"]


# -- what only an s3:// archive loads ------------------------------------------------------


def test_file_archives_never_load_boto3(made: Made) -> None:
    code = (
        "import sys, io, contextlib\n"
        "from nbdvma.cli import main, build_parser\n"
        "build_parser()\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['list', {str(made.archives['zst'])!r}]) == 0\n"
        f"    assert main(['verify', {str(made.archives['lzo'])!r}]) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
