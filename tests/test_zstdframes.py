"""The zstd frame pipeline: every core compresses, frames are written in order, a failed
write loses nothing and duplicates nothing (nbdvma.vma.zstdframes)."""

from __future__ import annotations

import errno
import random
import re
import threading
from collections.abc import Sequence

import pytest
import zstandard

from nbdvma.errors import VmaWriterError
from nbdvma.vma.zstdframes import (
    ZSTD_DEFAULT_LEVEL,
    FramePipeline,
    decompress_frame,
    parse_compression,
    zstd_raw_frame,
)

Buffer = bytes | bytearray | memoryview


class Recorder:
    """The write side: frames in the order written; fails while ``full`` is set."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.full = False

    def __call__(self, frame: bytes, parts: Sequence[Buffer]) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        assert decompress_frame(frame) == b"".join(parts)
        self.frames.append(frame)

    def contents(self) -> list[bytes]:
        return [decompress_frame(f) for f in self.frames]


def units(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    # Big and small mixed: later small units finish compressing before earlier big ones.
    return [rng.randbytes(rng.choice([4 << 20, 1000, 64 << 10])) for _ in range(n)]


def test_frames_are_written_in_submission_order_with_checksums() -> None:
    out = Recorder()
    pipe = FramePipeline(out, workers=4)
    data = units(20)
    for unit in data:
        pipe.submit([unit[:10], memoryview(unit)[10:]])
        assert pipe.queued <= pipe.workers + 1  # memory stays bounded
    pipe.drain()
    assert out.contents() == data
    for frame in out.frames:  # zstd's content checksum, as the zstd CLI writes
        params = zstandard.get_frame_parameters(frame)
        assert params.has_checksum
    pipe.close()


def test_compression_runs_on_several_threads_at_once() -> None:
    """Two units are compressed at the same time (a barrier both must reach), so a
    second core is used; one compression at a time would time out here."""
    barrier = threading.Barrier(2, timeout=10)

    class Rendezvous(FramePipeline):
        def _compress(self, parts: Sequence[Buffer]) -> bytes:
            barrier.wait()
            return super()._compress(parts)

    out = Recorder()
    pipe = Rendezvous(out, workers=2)
    pipe.submit([b"a" * 1000])
    pipe.submit([b"b" * 1000])
    pipe.drain()
    assert out.contents() == [b"a" * 1000, b"b" * 1000]
    pipe.close()


def test_a_failed_write_is_retried_first_and_the_new_unit_not_accepted() -> None:
    out = Recorder()
    pipe = FramePipeline(out, workers=1)
    first, second, third = units(3, seed=2)
    pipe.submit([first])
    pipe.submit([second])
    out.full = True
    with pytest.raises(OSError, match="No space"):
        pipe.drain()  # FLUSH meets the full disk: first and second stay queued
    assert pipe.queued == 2
    with pytest.raises(OSError, match="No space"):
        pipe.submit([third])  # first is tried again, fails: third is refused
    assert pipe.queued == 2
    out.full = False
    pipe.submit([third])  # written after the two accepted before it
    pipe.drain()
    assert out.contents() == [first, second, third]
    pipe.close()


def test_pending_units_read_back_and_release_waits_for_its_buffer() -> None:
    """Units not written yet read back from their parts; ``release`` returns only once
    the unit that views the buffer is written (its compression held back until then)."""
    gate = threading.Event()

    class Held(FramePipeline):
        def _compress(self, parts: Sequence[Buffer]) -> bytes:
            gate.wait(10)
            return super()._compress(parts)

    out = Recorder()
    pipe = Held(out, workers=2)
    original = random.Random(3).randbytes(3 << 20)
    buffer = bytearray(original)
    pipe.submit([memoryview(buffer)[: 1 << 20]])
    pipe.submit([b"x" * 100])
    assert pipe.queued == 2  # neither can be compressed, so neither is written
    assert pipe.pending(0) == original[: 1 << 20]
    assert pipe.pending(1) == b"x" * 100
    released = threading.Event()
    waiter = threading.Thread(target=lambda: (pipe.release(buffer), released.set()))
    waiter.start()
    assert not released.wait(0.2)  # the unit viewing the buffer is not written yet
    gate.set()
    waiter.join(10)
    assert released.is_set()
    assert out.contents()[0] == original[: 1 << 20]
    buffer[:] = bytes(len(buffer))  # the caller reuses it: what was written stays
    pipe.drain()
    assert out.contents() == [original[: 1 << 20], b"x" * 100]
    pipe.close()


def test_raw_frame_keeps_its_length_and_decompresses() -> None:
    a, b = zstd_raw_frame(b"h" * 300_000), zstd_raw_frame(b"i" * 300_000)
    assert len(a) == len(b)
    assert decompress_frame(a) == b"h" * 300_000


@pytest.mark.parametrize(
    ("text", "level"), [(None, None), ("zstd", ZSTD_DEFAULT_LEVEL), ("zstd:1", 1), ("zstd:19", 19)]
)
def test_parse_compression(text: str | None, level: int | None) -> None:
    assert parse_compression(text) == level


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gzip", "unknown compression 'gzip' (only zstd[:LEVEL] is supported)"),
        ("zstd:0", "zstd level '0': expected a whole number from 1 to 19"),
        ("zstd:x", "zstd level 'x'"),
        ("zstd:20", "zstd level '20'"),
    ],
)
def test_parse_compression_refuses(text: str, message: str) -> None:
    with pytest.raises(VmaWriterError, match=re.escape(message)):
        parse_compression(text)
