"""S3Sink and MultipartUpload in-process, against a real SeaweedFS (no mocks).

What S3 demands of the parts (every part but the last at least 5 MiB: SeaweedFS
enforces it with EntityTooSmall at completion), what the sink promises (part 1 holds
the patched header and is sent last, nothing visible before commit, no upload left
after abort), and the bounds (parts in flight, part sizes).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import S3Bucket
from s3server import SeaweedServer

from nbdvma.errors import S3Error, VmaWriterError
from nbdvma.s3.client import make_client
from nbdvma.s3.location import S3Location
from nbdvma.s3.sink import (
    DEFAULT_PART_SIZE,
    MIN_PART_SIZE,
    S3Sink,
    part_size_for,
)
from nbdvma.s3.upload import MARKER, MARKER_PART

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def client(s3: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in s3.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    return make_client()


@pytest.fixture
def sinks() -> Iterator[list[S3Sink]]:
    """Sinks a test opened: aborted at teardown if the test did not finish them."""
    opened: list[S3Sink] = []
    yield opened
    for sink in opened:
        sink.abort()


def _sink(s3: S3Bucket, client: Any, opened: list[S3Sink], key: str, **kw: Any) -> S3Sink:
    sink = S3Sink(S3Location(s3.bucket, key), client=client, **kw)
    opened.append(sink)
    return sink


def _data_parts(s3: S3Bucket, key: str) -> list[tuple[int, int]]:
    """(number, size) of the data parts of the one upload of ``key``."""
    [upload] = [u for u in s3.uploads() if u["Key"] == key]
    parts = s3.client.list_parts(Bucket=s3.bucket, Key=key, UploadId=upload["UploadId"])
    return [(p["PartNumber"], p["Size"]) for p in parts.get("Parts", [])]


def test_parts_are_at_least_5_mib_but_the_last_and_part_1_is_sent_last(
    s3: S3Bucket, client: Any, sinks: list[S3Sink]
) -> None:
    sink = _sink(s3, client, sinks, "p.vma", part_size=MIN_PART_SIZE)
    header = b"H" * 12288
    sink.write_header(header)
    units = [os.urandom(n) for n in [3 * MiB, 3 * MiB, 4 * MiB, 1 * MiB, 6 * MiB, 2 * MiB, 5]]
    for unit in units:
        sink.append([unit[:100], unit[100:]])
    sink.release(units[0])
    time.sleep(0.5)  # the threads have sent what they will send before commit
    parts = _data_parts(s3, "p.vma")
    assert parts[-1] == (MARKER_PART, len(MARKER))
    sent = parts[:-1]
    assert [n for n, _ in sent] == list(range(2, 2 + len(sent)))  # no part 1 yet
    assert sent
    assert all(size >= MIN_PART_SIZE for _, size in sent)
    assert s3.keys() == []
    patched = b"P" * len(header)
    sink.patch_header(patched)
    with pytest.raises(VmaWriterError, match="keep its length"):
        sink.patch_header(b"short")
    sink.commit()
    assert sink.committed
    assert s3.uploads() == []
    body = s3.client.get_object(Bucket=s3.bucket, Key="p.vma")["Body"].read()
    assert body == patched + b"".join(units)
    assert sink.size == len(body)
    assert sink.data_digest().length == sum(len(u) for u in units)


def test_a_small_archive_is_part_1_alone(s3: S3Bucket, client: Any, sinks: list[S3Sink]) -> None:
    sink = _sink(s3, client, sinks, "s.vma")
    sink.write_header(b"H" * 4096)
    sink.append([b"x" * 100])
    sink.commit()
    body = s3.client.get_object(Bucket=s3.bucket, Key="s.vma")["Body"].read()
    assert body == b"H" * 4096 + b"x" * 100


def test_zst_units_are_frames_and_the_header_a_raw_frame(
    s3: S3Bucket, client: Any, sinks: list[S3Sink]
) -> None:
    import zstandard

    sink = _sink(s3, client, sinks, "z.vma.zst", compress="zstd")
    sink.write_header(b"H" * 4096)
    units = [os.urandom(MiB) + bytes(3 * MiB) for _ in range(4)]
    for unit in units:
        sink.append([unit])
    sink.patch_header(b"Q" * 4096)
    sink.commit()
    body = s3.client.get_object(Bucket=s3.bucket, Key="z.vma.zst")["Body"].read()
    # A concatenation of frames is one stream, as zstd -d reads it.
    reader = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True)
    out = reader.read()
    assert out == b"Q" * 4096 + b"".join(units)
    assert len(body) < sum(len(u) for u in units)


def test_no_flush_no_read_back(s3: S3Bucket, client: Any, sinks: list[S3Sink]) -> None:
    sink = _sink(s3, client, sinks, "f.vma")
    assert not sink.readable
    assert sink.seekable
    sink.write_header(b"H" * 512)
    with pytest.raises(VmaWriterError, match="offers no FLUSH"):
        sink.sync()
    with pytest.raises(VmaWriterError, match="cannot be read back"):
        sink.read_unit(0, 0, 10)
    sink.write_journal(b"journal")  # stays in memory: nothing to do


def test_abort_leaves_nothing(s3: S3Bucket, client: Any, sinks: list[S3Sink]) -> None:
    sink = _sink(s3, client, sinks, "a.vma", part_size=MIN_PART_SIZE)
    sink.write_header(b"H" * 512)
    for _ in range(4):
        sink.append([os.urandom(3 * MiB)])
    assert len(s3.uploads()) == 1
    sink.abort()
    assert sink.upload_state == "aborted"
    assert s3.uploads() == []
    assert s3.keys() == []
    with pytest.raises(VmaWriterError, match="closed"):
        sink.append([b"x"])
    sink.abort()  # idempotent


def test_existing_key(s3: S3Bucket, client: Any, sinks: list[S3Sink]) -> None:
    s3.client.put_object(Bucket=s3.bucket, Key="e.vma", Body=b"old")
    with pytest.raises(S3Error, match=r"e\.vma: archive exists already \(give --force"):
        _sink(s3, client, sinks, "e.vma")
    assert s3.uploads() == []
    sink = _sink(s3, client, sinks, "e.vma", force=True)
    sink.write_header(b"new")
    sink.commit()
    assert s3.client.get_object(Bucket=s3.bucket, Key="e.vma")["Body"].read() == b"new"


def test_a_key_that_appears_meanwhile_is_not_overwritten(
    s3: S3Bucket, client: Any, sinks: list[S3Sink]
) -> None:
    sink = _sink(s3, client, sinks, "m.vma")
    sink.write_header(b"mine")
    s3.client.put_object(Bucket=s3.bucket, Key="m.vma", Body=b"theirs")
    with pytest.raises(S3Error, match="appeared under this key while the archive was written"):
        sink.commit()
    sink.abort()
    assert s3.client.get_object(Bucket=s3.bucket, Key="m.vma")["Body"].read() == b"theirs"
    assert s3.uploads() == []


def test_part_sizes_grow_with_the_announced_size() -> None:
    assert part_size_for(0) == DEFAULT_PART_SIZE
    assert part_size_for(40 * GiB) == DEFAULT_PART_SIZE
    assert part_size_for(1 << 40) == 175 * MiB
    assert part_size_for(0, base=MiB) == MIN_PART_SIZE
    assert part_size_for(1 << 40) * 6000 >= 1 << 40


def test_large_parts_go_fewer_at_a_time_and_grow_past_6000(
    s3: S3Bucket, client: Any, sinks: list[S3Sink]
) -> None:
    small = _sink(s3, client, sinks, "l1.vma")
    assert small._upload.limit == 4
    large = _sink(s3, client, sinks, "l2.vma", size_hint=1 << 40)
    assert large._upload.limit == 1
    assert large._part_size(6000) == 175 * MiB
    assert large._part_size(6001) == 350 * MiB
    assert large._part_size(9999) == 175 * MiB << 4
    sized = _sink(s3, client, sinks, "l3.vma")
    sized.reserve(1 << 40)  # create announces the images' size before the first part
    assert sized._part_size(2) == 175 * MiB
    assert sized._upload.limit == 1


def test_interrupt_wakes_a_writer_waiting_for_a_stalled_endpoint(
    private_s3: Callable[[], SeaweedServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The endpoint stops answering (SIGSTOP): a writer waiting for a free slot is
    woken by interrupt() at once, and the abort that follows succeeds once the
    endpoint answers again."""
    server = private_s3()
    assert server.endpoint is not None
    s3 = S3Bucket(server.endpoint, "stalled", server.endpoint.client())
    s3.client.create_bucket(Bucket=s3.bucket)
    for name, value in s3.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    sink = S3Sink(S3Location(s3.bucket, "st.vma"), part_size=MIN_PART_SIZE, concurrency=1)
    sink.write_header(b"H" * 512)
    sink.append([os.urandom(6 * MiB)])  # part 1
    os.kill(server.pid, signal.SIGSTOP)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for _ in range(4):  # part 2 in flight (hangs), then a wait for a slot
                sink.append([os.urandom(6 * MiB)])
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(1.0)
        assert writer.is_alive()  # waiting for the endpoint
        start = time.monotonic()
        sink.interrupt()
        writer.join(5)
        assert not writer.is_alive()
        assert time.monotonic() - start < 2
        assert len(errors) == 1
        assert "the upload was interrupted" in str(errors[0])
        assert sink.failure is not None
    finally:
        os.kill(server.pid, signal.SIGCONT)
    sink.abort()
    assert sink.upload_state == "aborted"
    assert s3.uploads() == []
