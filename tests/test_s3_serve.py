"""``nbdvma serve`` into ``s3://BUCKET/KEY``: real clients, a real SeaweedFS, no mocks.

Each archive is downloaded with boto3 and checked with the existing tools (``verify``,
``extract``) against the source images, byte for byte.  Every error case must end with
one line on stderr, a non-zero status, nothing under the key and no upload left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import S3Bucket
from s3server import SeaweedServer
from servehelpers import ServeProcess, extract_disks, nbdvma, poll_until, run_tool, start_serve

MiB = 1 << 20


def _image(path: Path, size: int, seed: int) -> Path:
    """A raw image: random data in a few places (incompressible), zeros elsewhere,
    a few 4 KiB pieces so that qemu-img sends small writes too."""
    rnd = __import__("random").Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        for offset in range(0, size, 3 * MiB):
            f.seek(offset)
            f.write(rnd.randbytes(min(2 * MiB + 4096 * rnd.randrange(16), size - offset)))
    return path


def _serve(
    s3: S3Bucket, key: str, disks: dict[str, int], sockdir: Path, workdir: Path, *extra: str
) -> ServeProcess:
    return start_serve(
        s3.url(key),
        disks,
        sockdir=sockdir,
        logdir=workdir,
        tcp=False,
        extra=list(extra),
        env=s3.env(),
    )


def _convert(qemu_img: str, src: Path, uri: str) -> None:
    run_tool([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri], timeout=120)


def _one_line(serve: ServeProcess) -> str:
    """The last stderr line of a failed serve, checked to be the only error line."""
    lines = [line for line in serve.stderr().splitlines() if line.strip()]
    errors = [line for line in lines if "Traceback" in line or line.startswith("  File ")]
    assert not errors, serve.stderr()
    return lines[-1]


@pytest.mark.interop
@pytest.mark.parametrize("key", ["pve/x.vma", "pve/x.vma.zst"])
def test_qemu_img_through_serve_into_s3(
    s3: S3Bucket, qemu_img: str, sockdir: Path, workdir: Path, key: str
) -> None:
    size_a, size_b = 24 * MiB, 5 * MiB + 512
    src_a = _image(workdir / "a.raw", size_a, 1)
    src_b = _image(workdir / "b.raw", size_b, 2)
    serve = _serve(s3, key, {"drive-scsi0": size_a, "drive-virtio1": size_b}, sockdir, workdir)
    try:
        _convert(qemu_img, src_a, serve.uri("drive-scsi0"))
        assert s3.keys() == []  # nothing visible before the end
        assert len(s3.uploads()) == 1
        _convert(qemu_img, src_b, serve.uri("drive-virtio1"))
        assert serve.wait() == 0, serve.stderr()
    finally:
        serve.kill()
    assert s3.keys() == [key]
    assert s3.uploads() == []
    head = s3.client.head_object(Bucket=s3.bucket, Key=key)
    assert head["Metadata"]["nbdvma-version"]
    assert f"archive s3://{s3.bucket}/{key}: " in serve.stderr()
    archive = s3.download(key, workdir / os.path.basename(key))
    magic = b"\x28\xb5\x2f\xfd" if key.endswith(".zst") else b"VMA\0"  # compressed as named
    assert archive.read_bytes()[:4] == magic
    nbdvma("verify", str(archive))
    disks = extract_disks(archive, workdir / "out")
    assert disks["drive-scsi0"] == src_a.read_bytes()
    assert disks["drive-virtio1"] == src_b.read_bytes()


@pytest.mark.interop
def test_flush_is_not_offered_for_s3(
    s3: S3Bucket, sockdir: Path, workdir: Path, nbdinfo: str
) -> None:
    serve = _serve(s3, "f.vma", {"d0": MiB}, sockdir, workdir)
    try:
        info = run_tool([nbdinfo, "--json", serve.uri("d0")]).stdout
    finally:
        serve.signal(signal.SIGTERM)
        serve.wait()
    assert '"can_flush": false' in info
    assert '"can_fua": false' in info
    assert '"can_multi_conn": true' in info
    assert s3.keys() == []
    assert s3.uploads() == []


# -- errors: one line each, a non-zero status, nothing under the key, no upload left ----------


def _start_fails(s3: S3Bucket, url: str, workdir: Path, *extra: str, **env: str) -> str:
    """Run serve with an S3 archive that cannot be started; return its one line."""
    result = nbdvma(
        "serve",
        url,
        "--disk",
        "d0=1M",
        "--listen",
        "tcp:127.0.0.1:0",
        *extra,
        check=False,
        env=s3.env(**env),
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert s3.endpoint.secret_key not in result.stderr
    assert s3.keys() == []
    assert s3.uploads() == []
    return lines[0]


def test_wrong_secret(s3: S3Bucket, workdir: Path) -> None:
    line = _start_fails(s3, s3.url("x.vma"), workdir, AWS_SECRET_ACCESS_KEY="wrong-secret")
    assert line.startswith(f"nbdvma serve: s3://{s3.bucket}/x.vma: ")
    assert "SignatureDoesNotMatch" in line
    assert "wrong-secret" not in line


def test_unknown_access_key(s3: S3Bucket, workdir: Path) -> None:
    line = _start_fails(s3, s3.url("x.vma"), workdir, AWS_ACCESS_KEY_ID="NOBODY")
    assert "InvalidAccessKeyId" in line


def test_missing_bucket(s3: S3Bucket, workdir: Path) -> None:
    line = _start_fails(s3, "s3://no-such-bucket-here/x.vma", workdir)
    assert "no such bucket 'no-such-bucket-here'" in line
    listed = [b["Name"] for b in s3.client.list_buckets()["Buckets"]]
    assert "no-such-bucket-here" not in listed  # SeaweedFS would have made it


def test_unknown_endpoint(s3: S3Bucket, workdir: Path, free_tcp_port: Callable[[], int]) -> None:
    port = free_tcp_port()
    start = time.monotonic()
    line = _start_fails(s3, s3.url("x.vma"), workdir, "--s3-endpoint", f"http://127.0.0.1:{port}")
    assert time.monotonic() - start < 20
    assert f"cannot connect to http://127.0.0.1:{port}" in line


def test_key_without_name(s3: S3Bucket, workdir: Path) -> None:
    line = _start_fails(s3, s3.url("pve/"), workdir)
    assert "names a bucket or prefix, not an object" in line


def test_existing_key_is_refused_unless_force(
    s3: S3Bucket, qemu_img: str, sockdir: Path, workdir: Path
) -> None:
    s3.client.put_object(Bucket=s3.bucket, Key="x.vma", Body=b"an older archive")
    line = _start_fails_keeping(s3, workdir)
    assert line == (
        f"nbdvma serve: s3://{s3.bucket}/x.vma: archive exists already (give --force to replace it)"
    )
    src = _image(workdir / "a.raw", 6 * MiB, 3)
    serve = _serve(s3, "x.vma", {"d0": 6 * MiB}, sockdir, workdir, "--force")
    try:
        old = s3.client.get_object(Bucket=s3.bucket, Key="x.vma")["Body"].read()
        assert old == b"an older archive"
        # Until the new archive is complete, the old one stays as it was.
        _convert(qemu_img, src, serve.uri("d0"))
        assert serve.wait() == 0, serve.stderr()
    finally:
        serve.kill()
    archive = s3.download("x.vma", workdir / "x.vma")
    assert extract_disks(archive, workdir / "out")["d0"] == src.read_bytes()


def _start_fails_keeping(s3: S3Bucket, workdir: Path) -> str:
    result = nbdvma(
        "serve",
        s3.url("x.vma"),
        "--disk",
        "d0=1M",
        "--listen",
        "tcp:127.0.0.1:0",
        check=False,
        env=s3.env(),
    )
    assert result.returncode == 1, result.stderr
    assert s3.keys() == ["x.vma"]
    assert s3.client.get_object(Bucket=s3.bucket, Key="x.vma")["Body"].read() == (
        b"an older archive"
    )
    assert s3.uploads() == []
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- interrupted mid-upload -------------------------------------------------------------------


def _half_written(
    s3: S3Bucket, qemu_io: str, sockdir: Path, workdir: Path, key: str = "big.vma"
) -> ServeProcess:
    """serve into ``key`` with 40 MiB of a 64 MiB disk written (parts 2... uploaded,
    the upload incomplete: serve waits for the rest)."""
    serve = _serve(s3, key, {"d0": 64 * MiB}, sockdir, workdir)
    # Random bytes: qemu-io's patterns would do as well for a .vma, never for a .zst.
    data = workdir / "data.raw"
    data.write_bytes(os.urandom(40 * MiB))
    run_tool([qemu_io, "-f", "raw", "-c", f"write -s {data} 0 40M", serve.uri("d0")], timeout=120)
    poll_until(lambda: _parts(s3, key) >= 3, 30, "parts uploaded")
    assert s3.keys() == []
    return serve


def _parts(s3: S3Bucket, key: str) -> int:
    """Data parts of the one upload of ``key`` (the marker part not counted)."""
    uploads = [u for u in s3.uploads() if u["Key"] == key]
    if len(uploads) != 1:
        return 0
    parts = s3.client.list_parts(Bucket=s3.bucket, Key=key, UploadId=uploads[0]["UploadId"])
    return len([p for p in parts.get("Parts", []) if p["PartNumber"] < 10000])


@pytest.mark.interop
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_upload_aborts_it(
    s3: S3Bucket, qemu_io: str, sockdir: Path, workdir: Path, signum: int
) -> None:
    serve = _half_written(s3, qemu_io, sockdir, workdir)
    try:
        serve.signal(signum)
        assert serve.wait() == 128 + signum
    finally:
        serve.kill()
    line = _one_line(serve)
    name = signal.Signals(signum).name
    assert line == (
        f"nbdvma serve: interrupted by {name}; the upload to s3://{s3.bucket}/big.vma was "
        "aborted; nothing is stored; incomplete: d0"
    )
    assert s3.keys() == []
    assert s3.uploads() == []


@pytest.mark.interop
def test_sigkill_leaves_an_upload_that_s3_uploads_aborts(
    s3: S3Bucket, qemu_io: str, sockdir: Path, workdir: Path
) -> None:
    serve = _half_written(s3, qemu_io, sockdir, workdir, key="pve/big.vma")
    serve.kill()
    assert s3.keys() == []
    [left] = s3.uploads()
    # Another program's upload under the same prefix is never touched without --all.
    other = s3.client.create_multipart_upload(Bucket=s3.bucket, Key="pve/other")["UploadId"]

    listed = nbdvma("s3-uploads", s3.url("pve/"), env=s3.env())
    assert listed.stdout.splitlines() == [
        f"s3://{s3.bucket}/pve/big.vma\t{left['UploadId']}\tbegun "
        f"{left['Initiated'].isoformat(timespec='seconds')}\tnbdvma"
    ]
    assert "1 incomplete upload(s) found" in listed.stderr
    assert "1 other program(s)' left alone (--all to include them)" in listed.stderr
    assert len(s3.uploads()) == 2

    aborted = nbdvma("s3-uploads", "--abort", s3.url("pve/"), env=s3.env())
    assert aborted.stdout.strip().endswith("\tnbdvma\taborted")
    assert [u["UploadId"] for u in s3.uploads()] == [other]
    assert s3.keys() == []

    everything = nbdvma("s3-uploads", "--all", s3.url(), env=s3.env())
    assert everything.stdout.strip().endswith("\tanother program")


def test_s3_uploads_errors(s3: S3Bucket) -> None:
    result = nbdvma("s3-uploads", "s3://no-such-bucket-here/", env=s3.env(), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "nbdvma s3-uploads: s3://no-such-bucket-here/: no such bucket 'no-such-bucket-here' "
        f"(NoSuchBucket, HeadBucket at {s3.endpoint.url})"
    ]
    result = nbdvma("s3-uploads", "/srv/dump", env=s3.env(), check=False)
    assert result.returncode == 1
    assert "expected s3://BUCKET[/PREFIX]" in result.stderr


@pytest.mark.interop
def test_endpoint_killed_mid_upload(
    private_s3: Callable[[], SeaweedServer], qemu_io: str, sockdir: Path, workdir: Path
) -> None:
    """The endpoint dies: serve ends with one line saying so, retries the abort until
    the endpoint is back, and leaves nothing."""
    server = private_s3()
    assert server.endpoint is not None
    s3 = S3Bucket(server.endpoint, "killed", server.endpoint.client())
    s3.client.create_bucket(Bucket=s3.bucket)
    serve = _serve(s3, "k.vma", {"d0": 64 * MiB}, sockdir, workdir)
    try:
        data = workdir / "data.raw"
        data.write_bytes(os.urandom(48 * MiB))
        write = [qemu_io, "-f", "raw", "-c", f"write -s {data} 0 16M", serve.uri("d0")]
        run_tool(write, timeout=120)
        server.kill()  # SIGKILL, mid-upload
        write[4] = f"write -s {data} 16M 32M"
        run_tool(write, timeout=120, check=False)  # parts fail: EIO, or accepted first
        poll_until(lambda: "retrying the abort" in serve.stderr(), 60, "the abort retried")
        server.restart()
        assert serve.wait(60) == 1
    finally:
        serve.kill()
    line = _one_line(serve)
    assert re.fullmatch(
        rf"nbdvma serve: s3://killed/k\.vma: part \d+: cannot connect to {s3.endpoint.url}: "
        r"the connection failed \(is the endpoint up and right\?\)",
        line,
    ), line
    assert "the incomplete upload is aborted" in serve.stderr()
    assert s3.keys() == []
    assert s3.uploads() == []


@pytest.mark.interop
def test_sigterm_while_the_endpoint_stalls(
    private_s3: Callable[[], SeaweedServer], qemu_io: str, sockdir: Path, workdir: Path
) -> None:
    """SIGTERM while the writer waits for an endpoint that accepts connections and never
    answers (SIGSTOPped): serve stops waiting at once, retries the abort (each request
    with a short deadline) and says so; the endpoint answers again: nothing is left."""
    server = private_s3()
    assert server.endpoint is not None
    s3 = S3Bucket(server.endpoint, "stalled", server.endpoint.client())
    s3.client.create_bucket(Bucket=s3.bucket)
    serve = _serve(s3, "st.vma", {"d0": 128 * MiB}, sockdir, workdir)
    data = workdir / "data.raw"
    data.write_bytes(os.urandom(96 * MiB))  # more than the parts in memory
    os.kill(server.pid, signal.SIGSTOP)
    writer = subprocess.Popen(
        [qemu_io, "-f", "raw", "-c", f"write -s {data} 0 96M", serve.uri("d0")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(3)  # parts in flight, hanging; the writer waits for a free slot
        assert writer.poll() is None
        serve.signal(signal.SIGTERM)
        poll_until(lambda: "retrying the abort" in serve.stderr(), 40, "the abort retried")
        os.kill(server.pid, signal.SIGCONT)
        assert serve.wait(60) == 128 + signal.SIGTERM
    finally:
        os.kill(server.pid, signal.SIGCONT)
        serve.kill()
        writer.kill()
        writer.wait()
    line = _one_line(serve)
    assert line.startswith(
        "nbdvma serve: interrupted by SIGTERM; the upload to s3://stalled/st.vma was aborted"
    ), serve.stderr()
    assert s3.keys() == []
    assert s3.uploads() == []


@pytest.mark.interop
def test_replays_are_checked_and_stored_data_is_not_read_back(
    s3: S3Bucket, qemu_io: str, sockdir: Path, workdir: Path
) -> None:
    """As on a pipe: an identical replay of a stored cluster is accepted, a differing
    rewrite fails with EIO and a READ of it with EINVAL; the archive keeps the first
    bytes."""
    serve = _serve(s3, "r.vma", {"d0": 32 * MiB}, sockdir, workdir)

    def io(command: str) -> str:
        result = run_tool(
            [qemu_io, "-f", "raw", "-c", command, serve.uri("d0")], check=False, timeout=60
        )
        return result.stdout + result.stderr

    try:
        assert "wrote" in io("write -P 0x11 0 16M")
        assert "wrote" in io("write -P 0x11 0 64k")  # a replay, identical
        assert "Input/output error" in io("write -P 0x22 0 64k")
        assert "read failed: Invalid argument" in io("read -P 0x11 0 64k")  # as on a pipe
        assert "wrote" in io("write -P 0x33 16M 16M")
        assert serve.wait() == 0, serve.stderr()
    finally:
        serve.kill()
    archive = s3.download("r.vma", workdir / "r.vma")
    disk = extract_disks(archive, workdir / "out")["d0"]
    assert disk == b"\x11" * (16 * MiB) + b"\x33" * (16 * MiB)


@pytest.mark.interop
def test_peak_rss_with_64_mib_of_client_writes_in_flight(
    s3: S3Bucket, nbdcopy: str, qemu_io: str, sockdir: Path, workdir: Path
) -> None:
    """nbdcopy keeps 64 requests of 1 MiB in flight; serve's parts are bounded (part 1,
    the part being filled, 4 in flight): its peak RSS stays under 200 MiB."""
    size = 256 * MiB
    src = workdir / "random.raw"
    with src.open("wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
    serve = _serve(s3, "m.vma", {"d0": size, "d1": MiB}, sockdir, workdir)
    try:
        copy = [nbdcopy, "--connections=1", "--requests=64", f"--request-size={MiB}"]
        run_tool([*copy, str(src), serve.uri("d0")], timeout=180)
        rss = peak_rss(serve.process.pid)  # d1 is not written: serve still runs
        print(f"serve peak RSS {rss / MiB:.1f} MiB")
        assert rss < 200 * MiB, f"serve peaked at {rss / MiB:.0f} MiB"
        run_tool([qemu_io, "-f", "raw", "-c", "write -z 0 1M", serve.uri("d1")])
        assert serve.wait() == 0, serve.stderr()
    finally:
        serve.kill()
    archive = s3.download("m.vma", workdir / "m.vma")
    assert extract_disks(archive, workdir / "out")["d0"] == src.read_bytes()


def peak_rss(pid: int) -> int:
    """A running process's peak RSS (``VmHWM``), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")
