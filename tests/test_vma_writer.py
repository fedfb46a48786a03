"""The writer's invariants (shared/docs/writer-invariants.md), checked on the bytes it writes.

The archives are parsed here with the format layer only (not with nbdvma's reader), so
that a reader bug cannot hide a writer bug.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import random
import struct
import tracemalloc
from pathlib import Path

import attrs
import blake3
import pverules
import pytest
import zstandard

from nbdvma.errors import ClusterConflictError, PartialBufferFullError, VmaWriterError
from nbdvma.vma.clusters import mask_and_blocks
from nbdvma.vma.digest import (
    DIGEST_CONFIG,
    DIGEST_RECORD_SIZE,
    DataDigest,
    parse_digest_untrusted,
)
from nbdvma.vma.format import (
    VMA_BLOCK_SIZE,
    VMA_CLUSTER_SIZE,
    VMA_EXTENT_HEADER_SIZE,
    VMA_HEADER_SIZE,
    ExtentHeader,
    VmaHeader,
    header_size_untrusted,
)
from nbdvma.vma.journal import encode_journal, parse_journal
from nbdvma.vma.sink import FileSink, Sink, StreamSink, open_sink
from nbdvma.vma.writer import VmaWriter

C = VMA_CLUSTER_SIZE


@attrs.define
class Parsed:
    header: VmaHeader
    #: (dev_id, cluster) -> (mask, the cluster's 64 KiB)
    clusters: dict[tuple[int, int], tuple[int, bytes]]
    #: per extent: number of slots
    extent_slots: list[int]
    #: order of vmstate clusters as they appear
    stream_order: list[int]

    def disk(self, dev_id: int) -> bytes:
        dev = next(d for d in self.header.devices if d.dev_id == dev_id)
        out = bytearray()
        for c in range(dev.cluster_count):
            out += self.clusters[(dev_id, c)][1]
        return bytes(out[: dev.size])


def parse(data: bytes) -> Parsed:
    """Walk an archive, asserting exactly-once clusters and the C writer's conventions."""
    header_size = header_size_untrusted(data[:VMA_HEADER_SIZE])
    header = VmaHeader.from_bytes_untrusted(data[:header_size])
    assert header_size % 512 == 0
    pos = header_size
    clusters: dict[tuple[int, int], tuple[int, bytes]] = {}
    extent_slots: list[int] = []
    stream_order: list[int] = []
    vmstate = header.vmstate
    while pos < len(data):
        ext = ExtentHeader.from_bytes_untrusted(
            data[pos : pos + VMA_EXTENT_HEADER_SIZE], header.uuid
        )
        assert 1 <= len(ext.slots) <= 58 or (len(ext.slots) == 0 and not header.devices)
        extent_slots.append(len(ext.slots))
        pos += VMA_EXTENT_HEADER_SIZE
        used = 0
        for slot in ext.slots:
            is_vmstate = vmstate is not None and slot.dev_id == vmstate.dev_id
            # VM-state clusters are stored whole (vma-format.md §6).
            assert slot.mask == 0xFFFF or not is_vmstate, f"vmstate mask {slot.mask:#06x}"
            out = bytearray(C)
            for j in range(16):
                if slot.mask >> j & 1:
                    out[j * VMA_BLOCK_SIZE : (j + 1) * VMA_BLOCK_SIZE] = data[
                        pos : pos + VMA_BLOCK_SIZE
                    ]
                    # A disk's stored block is never all zero: zero blocks are mask bits.
                    assert is_vmstate or data[pos : pos + VMA_BLOCK_SIZE] != bytes(VMA_BLOCK_SIZE)
                    pos += VMA_BLOCK_SIZE
                    used += 1
            key = (slot.dev_id, slot.cluster)
            assert key not in clusters, f"duplicate cluster {key}"
            clusters[key] = (slot.mask, bytes(out))
            if is_vmstate:
                stream_order.append(slot.cluster)
        assert used == ext.block_count
    assert pos == len(data)
    for dev in header.devices:
        if dev.is_vmstate:
            continue
        for c in range(dev.cluster_count):
            assert (dev.dev_id, c) in clusters, f"missing cluster {c} of {dev.name}"
        # Blocks at or past the end are zero-marked, bytes past the end zero.
        last = dev.cluster_count - 1
        mask, content = clusters[(dev.dev_id, last)]
        valid = dev.size - last * C
        assert content[valid:] == bytes(C - valid)
        for j in range(16):
            if j * VMA_BLOCK_SIZE >= valid:
                assert not mask >> j & 1
    assert stream_order == list(range(len(stream_order)))
    # A finished archive on a file records the BLAKE3 digest of all after its header
    # (docs/integrity.md), computed here by hand.
    record = header.config(DIGEST_CONFIG)
    if record is not None:
        extents = data[header_size:]
        assert record == b"blake3 %s %020d\n" % (
            blake3.blake3(extents).hexdigest().encode(),
            len(extents),
        )
    return Parsed(header, clusters, extent_slots, stream_order)


def new_writer(tmp_path: Path, **kwargs: object) -> tuple[VmaWriter, Path]:
    path = tmp_path / "out.vma"
    return VmaWriter(open_sink(str(path)), **kwargs), path  # type: ignore[arg-type]


@pytest.mark.parametrize("target", ["stream", "file"])
def test_header_follows_the_c_writer(tmp_path: Path, target: str) -> None:
    path = tmp_path / "out.vma"
    # A stream gets no data digest: its header is the C writer's to the byte.  A file
    # gets one more config, the digest, after the others, as the C writer would lay
    # out a second vma_writer_add_config().
    with contextlib.ExitStack() as stack:
        if target == "stream":
            sink: Sink = StreamSink(stack.enter_context(path.open("wb")))
        else:
            sink = open_sink(str(path))
        w = VmaWriter(sink, uuid=bytes(range(16)), ctime=1_700_000_000)
        w.add_config("/etc/pve/qemu-server.conf", b"x" * 637)
        w.add_device("drive-efidisk0", 540672)
        w.add_device("drive-scsi0", 4 * C)
        w.finish()
    data = path.read_bytes()
    # The example of the format doc, section 13: a 637-byte config and these two devices.
    blob_size, header_size = struct.unpack_from(">II", data, 52)
    digest_blobs = 2 + len(DIGEST_CONFIG) + 1 + 2 + DIGEST_RECORD_SIZE if target == "file" else 0
    assert (blob_size, header_size) == (
        1 + 2 + 17 + 2 + 637 + digest_blobs + 2 + 15 + 2 + 12,
        13824,
    )
    assert struct.unpack_from(">I", data, 48)[0] == VMA_HEADER_SIZE
    zeroed = bytearray(data[:header_size])
    zeroed[32:48] = bytes(16)
    assert hashlib.md5(zeroed).digest() == data[32:48]
    assert data[header_size - 1] == 0  # zero padding after the blobs
    p = parse(data)
    assert p.header.configs[0] == ("qemu-server.conf", b"x" * 637)
    if target == "file":
        name, record = p.header.configs[1]
        assert name == DIGEST_CONFIG
        assert parse_digest_untrusted(record) == DataDigest(
            blake3.blake3(data[header_size:]).hexdigest(), len(data) - header_size
        )
    assert len(p.header.configs) == (2 if target == "file" else 1)
    assert p.header.ctime == 1_700_000_000
    assert p.header.uuid == bytes(range(16))
    assert [(d.dev_id, d.name, d.size) for d in p.header.devices] == [
        (1, "drive-efidisk0", 540672),
        (2, "drive-scsi0", 4 * C),
    ]
    # Never-written disks: every cluster present, as zero clusters without data.
    assert all(mask == 0 for mask, _ in p.clusters.values())
    assert len(data) == header_size + 512 * len(p.extent_slots)


def test_config_is_stored_as_data_not_its_name(tmp_path: Path) -> None:
    # The 2013 RFC stored the name blob as the data: the bug this guards against.
    w, path = new_writer(tmp_path)
    w.add_config("qemu-server.conf", b"memory: 512\n")
    w.add_config("qemu-server.fw", b"")
    w.finish()
    p = parse(path.read_bytes())
    assert p.header.configs[:2] == (
        ("qemu-server.conf", b"memory: 512\n"),
        ("qemu-server.fw", b""),
    )
    assert [name for name, _ in p.header.configs[2:]] == [DIGEST_CONFIG]


def test_no_devices_gives_header_and_one_empty_extent(tmp_path: Path) -> None:
    w, path = new_writer(tmp_path)
    w.add_config("a.conf", b"a")
    w.finish()
    data = path.read_bytes()
    assert len(data) == 12800 + 512
    assert parse(data).extent_slots == [0]


def test_out_of_order_clusters_pieces_and_straddles(tmp_path: Path) -> None:
    w, path = new_writer(tmp_path)
    size = 40 * C + 12800  # not a multiple of 64 KiB, nor of 4 KiB
    dev = w.add_device("drive-scsi0", size)
    rng = random.Random(7)
    image = bytearray(rng.randbytes(size))
    for k in range(0, size, 4096 * 3):
        image[k : k + 4096] = bytes(4096)  # zero blocks amid data
    # Clusters 0..9 whole, in random order.
    order = list(range(10))
    rng.shuffle(order)
    for c in order:
        w.write(dev, c * C, image[c * C : (c + 1) * C])
    # Cluster 10 from 16 pieces of 4 KiB in random order.
    pieces = list(range(16))
    rng.shuffle(pieces)
    for j in pieces:
        off = 10 * C + j * 4096
        w.write(dev, off, image[off : off + 4096])
    # A piece straddling clusters 11 and 12, then the rest of both.
    w.write(dev, 12 * C - 1000, image[12 * C - 1000 : 12 * C + 1000])
    w.write(dev, 11 * C, image[11 * C : 12 * C - 1000])
    w.write(dev, 12 * C + 1000, image[12 * C + 1000 : 13 * C])
    # A zero range over half a cluster, then data for the other half.
    image[13 * C : 13 * C + C // 2] = bytes(C // 2)
    w.write_zeroes(dev, 13 * C, C // 2)
    w.write(dev, 13 * C + C // 2, image[13 * C + C // 2 : 14 * C])
    # The rest in one go, ending exactly at the device size (a partial last cluster).
    w.write(dev, 14 * C, image[14 * C :])
    assert w.progress(dev).complete
    assert w.progress(dev).written == size
    w.finish()
    p = parse(path.read_bytes())
    assert p.disk(dev) == bytes(image)
    masks = [p.clusters[(dev, c)][0] for c in range(41)]
    assert masks[0] != 0xFFFF  # the zero blocks are mask bits
    assert masks[40] >> 4 == 0  # 12800 bytes: blocks 4.. past the end are zero-marked


def test_untouched_and_partial_clusters_are_completed_with_zeros(tmp_path: Path) -> None:
    w, path = new_writer(tmp_path)
    a = w.add_device("a", 5 * C)
    b = w.add_device("b", 3 * C + 512)
    w.write(a, 2 * C + 100, b"\xaa" * 10)
    assert not w.progress(a).complete
    assert w.incomplete_devices == ["a", "b"]
    w.finish()
    p = parse(path.read_bytes())
    expect = bytearray(5 * C)
    expect[2 * C + 100 : 2 * C + 110] = b"\xaa" * 10
    assert p.disk(a) == bytes(expect)
    assert p.disk(b) == bytes(3 * C + 512)
    assert not path.with_name("out.vma.part").exists()


def test_zero_range_of_100_gib_costs_kilobytes(tmp_path: Path) -> None:
    w, _ = new_writer(tmp_path)
    size = 100 << 30
    dev = w.add_device("big", size)
    w.write(dev, 5 * C, b"\x01" * C)
    tracemalloc.start()
    try:
        # Zeroing over a cluster stored with data cannot be honoured: the request fails
        # there, after the clusters before it were zeroed.
        with pytest.raises(ClusterConflictError):
            w.write_zeroes(dev, 0, size)
        w.write_zeroes(dev, 6 * C, size - 6 * C)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024
    assert w.progress(dev).complete
    w.abort()


def test_zero_range_over_the_whole_disk(tmp_path: Path) -> None:
    w, path = new_writer(tmp_path)
    size = 100 << 30
    dev = w.add_device("big", size)
    w.write_zeroes(dev, 0, size)
    progress = w.progress(dev)
    assert progress.complete
    assert progress.zero_bytes == size
    assert progress.stored_bytes == 0
    w.finish()
    header = VmaHeader.from_bytes_untrusted(path.read_bytes()[:12800])
    clusters = size // C
    extents = -(-clusters // 58)
    assert path.stat().st_size == header.header_size + 512 * extents


def test_zeroed_cluster_can_still_be_written(tmp_path: Path) -> None:
    # A client that zeroes the disk first and writes data afterwards.
    w, path = new_writer(tmp_path)
    dev = w.add_device("d", 4 * C)
    w.write_zeroes(dev, 0, 4 * C)
    w.write(dev, C + 4096, b"\x07" * 100)
    w.finish()
    expect = bytearray(4 * C)
    expect[C + 4096 : C + 4196] = b"\x07" * 100
    assert parse(path.read_bytes()).disk(dev) == bytes(expect)


def test_rewrites_identical_ok_differing_refused(tmp_path: Path) -> None:
    w, path = new_writer(tmp_path)
    dev = w.add_device("d", 200 * C)
    data = random.Random(1).randbytes(200 * C)
    w.write(dev, 0, data[: 100 * C])  # clusters 0..57 stored, 58..99 pending
    # Replays: stored, pending, and a sub-range of a stored cluster.
    w.write(dev, 0, data[:C])
    w.write(dev, 99 * C, data[99 * C : 100 * C])
    w.write(dev, 3 * C + 17, data[3 * C + 17 : 3 * C + 99])
    with pytest.raises(ClusterConflictError) as info:
        w.write(dev, 2 * C, b"\x00" * 10 + data[2 * C + 10 : 3 * C])
    assert info.value.errno == errno.EIO
    with pytest.raises(ClusterConflictError):
        w.write(dev, 99 * C, b"\xff" * C)
    with pytest.raises(ClusterConflictError):
        w.write_zeroes(dev, 0, C)
    w.write(dev, 100 * C, data[100 * C :])
    w.finish()
    assert parse(path.read_bytes()).disk(dev) == data


def test_reads_of_partial_pending_and_stored_clusters(tmp_path: Path) -> None:
    w, _ = new_writer(tmp_path)
    dev = w.add_device("d", 100 * C)
    data = random.Random(2).randbytes(100 * C)
    w.write(dev, 0, data[: 60 * C])  # 58 stored, 2 pending
    w.write(dev, 70 * C, data[70 * C : 70 * C + 5000])  # partial
    assert w.read(dev, 0, 60 * C) == data[: 60 * C]
    assert w.read(dev, 57 * C + 10, 2 * C) == data[57 * C + 10 : 59 * C + 10]
    assert w.read(dev, 70 * C, C) == data[70 * C : 70 * C + 5000] + bytes(C - 5000)
    assert w.read(dev, 80 * C, 3) == bytes(3)
    assert w.block_status(dev, 0, 100 * C) == [(60 * C, False), (10 * C, True),
                                               (C, False), (29 * C, True)]  # fmt: skip
    w.abort()


def test_journal_bytes_as_documented_and_read_back(tmp_path: Path) -> None:
    # A flush journals a disk cluster written in two pieces and the stream's tail in
    # the layout that nbdvma.vma.journal documents, and parse_journal reads it back.
    w, path = new_writer(tmp_path)
    dev = w.add_device("d", 4 * C)
    vm = w.add_stream()
    w.write(dev, 2 * C + 10, b"a" * 3)
    w.write(dev, 2 * C + 100, b"b" * 2)
    w.append(vm, b"v" * (C + 5))
    w.flush()
    raw = Path(str(path) + ".part.journal").read_bytes()
    assert raw == (
        b"NBDVMAJ1" + w.uuid
        + struct.pack(">HBQ", 2, dev, 2)
        + struct.pack(">II", 10, 13) + b"aaa" + struct.pack(">II", 100, 102) + b"bb"
        + struct.pack(">HBQ", 1, vm, C) + struct.pack(">II", 0, 5) + b"vvvvv"
    )  # fmt: skip
    records = parse_journal(raw).records
    assert encode_journal(w.uuid, records) == raw
    assert [r.pieces for r in records] == [((10, b"aaa"), (100, b"bb")), ((0, b"vvvvv"),)]
    w.abort()


def test_flush_journals_partial_clusters_and_syncs_the_rest(tmp_path: Path) -> None:
    w, path = new_writer(tmp_path)
    dev = w.add_device("d", 10 * C)
    w.write(dev, 0, b"\x01" * C)
    w.write(dev, 3 * C + 5, b"\x02" * 7)
    w.flush()
    part = tmp_path / "out.vma.part"
    journal = tmp_path / "out.vma.part.journal"
    # The complete cluster is in the .part file as a (short) extent ...
    data = part.read_bytes()
    head = header_size_untrusted(data[:VMA_HEADER_SIZE])
    ext = ExtentHeader.from_bytes_untrusted(data[head : head + 512], w.uuid)
    assert [(s.cluster, s.mask) for s in ext.slots] == [(0, 0xFFFF)]
    # ... and the partial one in the journal.
    assert b"\x02" * 7 in journal.read_bytes()
    w.write(dev, 3 * C, b"\x00" * 5)  # still partial
    w.write(dev, 3 * C + 12, bytes(C - 12))  # now complete: the journal goes at next flush
    w.flush()
    assert not journal.exists()
    w.finish()
    assert not part.exists()
    expect = bytearray(10 * C)
    expect[:C] = b"\x01" * C
    expect[3 * C + 5 : 3 * C + 12] = b"\x02" * 7
    assert parse(path.read_bytes()).disk(dev) == bytes(expect)


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """The n-th unit written (n in the returned set) writes half, then fails ENOSPC."""
    import nbdvma.vma.sink as sink_module

    real = sink_module._write_all
    fail_at: set[int] = set()
    calls = [0]

    def flaky(fd: int, parts: list[bytes]) -> int:
        calls[0] += 1
        if calls[0] in fail_at:
            data = b"".join(bytes(p) for p in parts)
            real(fd, [data[: len(data) // 2]])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, parts)

    monkeypatch.setattr(sink_module, "_write_all", flaky)
    return fail_at


def test_disk_full_mid_extent_then_retry(tmp_path: Path, disk_full: set[int]) -> None:
    disk_full.add(3)  # header, extent 1, then extent 2 fails half-way
    w, path = new_writer(tmp_path)
    dev = w.add_device("d", 200 * C)
    data = random.Random(3).randbytes(200 * C)
    w.write(dev, 0, data[: 116 * C])  # extent 1 written, 58 clusters pending
    with pytest.raises(OSError, match="No space"):
        w.write(dev, 116 * C, data[116 * C : 118 * C])
    # A retry of everything succeeds and nothing is duplicated or cut in half.
    errors: list[int | None] = []
    for off in range(0, 200 * C, 16 * C):
        try:
            w.write(dev, off, data[off : off + 16 * C])
        except OSError as exc:
            errors.append(exc.errno)
            w.write(dev, off, data[off : off + 16 * C])
    assert errors == []  # the fault was injected once, before
    w.finish()
    assert parse(path.read_bytes()).disk(dev) == data


def test_enospc_reported_then_finish_retried(tmp_path: Path, disk_full: set[int]) -> None:
    disk_full.update({1, 5})  # the header; then header, 2 extents, and the last at finish
    w, path = new_writer(tmp_path)
    dev = w.add_device("d", 120 * C)
    data = random.Random(4).randbytes(120 * C)
    with pytest.raises(OSError, match="No space"):
        w.write(dev, 0, data)
    w.write(dev, 0, data)
    with pytest.raises(OSError, match="No space"):
        w.finish()
    w.finish()
    assert parse(path.read_bytes()).disk(dev) == data


def test_partial_buffer_is_bounded(tmp_path: Path) -> None:
    w, _ = new_writer(tmp_path, max_partial_bytes=4 * C)
    dev = w.add_device("d", 100 * C)
    for c in range(4):
        w.write(dev, c * C, b"x")
    with pytest.raises(PartialBufferFullError) as info:
        w.write(dev, 10 * C, b"x")
    assert info.value.errno == errno.ENOMEM
    w.write(dev, 10 * C, b"x" * C)  # whole clusters need no buffer
    w.write(dev, 1, b"y" * (C - 1))  # completing one frees a slot
    w.write(dev, 20 * C, b"z")
    w.abort()


def test_vmstate_stream_unaligned_appends(tmp_path: Path) -> None:
    w, path = new_writer(tmp_path)
    disk = w.add_device("drive-scsi0", C)
    vm = w.add_stream(size_hint=10)
    rng = random.Random(5)
    stream = bytearray(b"QEVM\x00\x00\x00\x03")
    stream += rng.randbytes(100_000) + bytes(3 * C) + rng.randbytes(77_777)
    w.append(vm, stream[:8])
    pos = 8
    while pos < len(stream):
        n = rng.choice([1, 13, 4096, 70000, 200000])
        w.append(vm, stream[pos : pos + n])
        pos += n
    w.write(disk, 0, b"\x01" * C)
    w.finish()
    p = parse(path.read_bytes())
    vmstate = p.header.vmstate
    assert vmstate is not None
    assert vmstate.size == len(stream)
    clusters = [p.clusters[(vm, c)][1] for c in range(len(p.stream_order))]
    joined = b"".join(clusters)
    assert joined[: len(stream)] == stream
    assert joined[len(stream) :] == bytes(len(joined) - len(stream))
    # Proxmox's reader appends only the stored blocks of each VM-state cluster: with
    # every cluster stored whole it gets the stream exactly, zero runs included.
    assert pverules.vmstate_as_proxmox_extracts(path.read_bytes()) == joined


def test_zstd_file_sink_reads_back_and_decompresses(tmp_path: Path) -> None:
    path = tmp_path / "out.vma.zst"
    w = VmaWriter(open_sink(str(path)))
    dev = w.add_device("d", 130 * C)
    vm = w.add_stream()
    data = random.Random(6).randbytes(65 * C) + bytes(65 * C)
    w.write(dev, 0, data)
    w.append(vm, b"QEVM" + b"s" * 1000)
    assert w.read(dev, C, C) == data[C : 2 * C]  # a cluster in a compressed extent
    w.write(dev, 0, data[:C])  # identical replay against the compressed archive
    with pytest.raises(ClusterConflictError):
        w.write(dev, 0, bytes(C))
    w.finish()
    raw = (
        zstandard.ZstdDecompressor()
        .stream_reader(io.BytesIO(path.read_bytes()), read_across_frames=True)
        .read()
    )
    p = parse(raw)
    assert p.disk(dev) == data
    assert p.header.vmstate is not None
    assert p.header.vmstate.size == 1004


def test_stream_sink_pipe(tmp_path: Path) -> None:
    r, wfd = os.pipe()
    out = open(wfd, "wb", buffering=0)  # noqa: SIM115
    chunks: list[bytes] = []
    import threading

    def drain() -> None:
        while chunk := os.read(r, 1 << 20):
            chunks.append(chunk)

    t = threading.Thread(target=drain)
    t.start()
    w = VmaWriter(StreamSink(out))
    dev = w.add_device("d", 70 * C)
    data = random.Random(8).randbytes(70 * C)
    w.write(dev, 0, data)
    w.write(dev, 0, data[:C])  # identical replay, checked by CRC on a stream
    with pytest.raises(ClusterConflictError):
        w.write(dev, 0, bytes(C))
    with pytest.raises(VmaWriterError, match="read back"):
        w.read(dev, 0, 10)
    w.finish()
    out.close()
    t.join()
    assert parse(b"".join(chunks)).disk(dev) == data


def test_limits_and_misuse(tmp_path: Path) -> None:
    w, path = new_writer(tmp_path)
    with pytest.raises(VmaWriterError, match="too long"):
        w.add_device("x" * 300, C)
    with pytest.raises(VmaWriterError, match="65535"):
        w.add_config("big.conf", bytes(65536))
    with pytest.raises(VmaWriterError, match="positive"):
        w.add_device("zero", 0)
    with pytest.raises(VmaWriterError, match="multiple of 512"):
        w.add_device("odd", 4196)
    for i in range(254):
        w.add_device(f"d{i}", 512)
    with pytest.raises(VmaWriterError, match="too many devices"):
        w.add_device("one-more", 512)
    with pytest.raises(VmaWriterError, match="outside"):
        w.write(1, 500, b"0123456789abcdef")
    w.write(1, 0, b"a" * 512)
    with pytest.raises(VmaWriterError, match="before the first write"):
        w.add_device("late", C)
    w.finish()
    assert len(parse(path.read_bytes()).header.devices) == 254
    with pytest.raises(VmaWriterError, match="finished"):
        w.write(1, 0, b"a")


def test_nothing_under_the_final_name_until_finish(tmp_path: Path) -> None:
    w, path = new_writer(tmp_path)
    dev = w.add_device("d", 100 * C)
    w.write(dev, 0, b"\x01" * 100 * C)
    w.flush()
    assert not path.exists()
    assert path.with_name("out.vma.part").exists()
    w.abort()
    assert not path.exists()
    assert path.with_name("out.vma.part").exists()
    path.write_bytes(b"")
    with pytest.raises(VmaWriterError, match="exists already"):
        open_sink(str(path))


def test_a_live_writers_part_is_refused(tmp_path: Path) -> None:
    w, path = new_writer(tmp_path)
    w.write(w.add_device("d", C), 0, b"\x01" * C)
    w.flush()
    part = path.with_name("out.vma.part")
    before = part.read_bytes()
    with pytest.raises(VmaWriterError, match=r"out.vma.part: another process is writing"):
        open_sink(str(path))
    assert part.read_bytes() == before  # untouched
    w.finish()
    with pytest.raises(VmaWriterError, match="exists already"):
        open_sink(str(path))


def test_a_dead_writers_part_and_journal_are_replaced(tmp_path: Path) -> None:
    w, path = new_writer(tmp_path)
    w.write(w.add_device("d", 2 * C), 0, b"\x01" * (C + 512))  # a partial cluster
    w.flush()  # ... is journalled
    part, journal = path.with_name("out.vma.part"), path.with_name("out.vma.part.journal")
    assert journal.exists()
    size = part.stat().st_size
    w.abort()  # as a killed writer: its lock is gone, its files stay
    sink = open_sink(str(path))
    assert isinstance(sink, FileSink)
    assert sink.replaced == f"{part} ({size:,} bytes) and {journal}"
    assert part.stat().st_size == 0
    assert not journal.exists()
    w = VmaWriter(sink)
    w.write(w.add_device("e", C), 0, b"\x02" * C)
    w.finish()
    assert [d.name for d in parse(path.read_bytes()).header.devices if d.name] == ["e"]


def test_an_abort_before_any_output_leaves_no_part(tmp_path: Path) -> None:
    w, path = new_writer(tmp_path)
    w.add_device("d", C)
    w.abort()
    assert not path.with_name("out.vma.part").exists()
    w, path = new_writer(tmp_path)
    w.write(w.add_device("d", C), 0, b"\x01" * C)
    w.abort(discard=True)
    assert list(tmp_path.iterdir()) == []


def test_whole_cluster_over_a_zeroed_one_needs_no_partial_buffer(tmp_path: Path) -> None:
    w, path = new_writer(tmp_path, max_partial_bytes=C)
    dev = w.add_device("d", 4 * C)
    w.write(dev, 0, bytes(C))  # a ZERO cluster
    w.write(dev, 2 * C, b"x" * 512)  # the one partial slot is taken
    w.write(dev, 0, b"y" * C)  # replaces the zeroed cluster without the buffer
    assert w.progress(dev).written == C + 512
    w.finish()
    disk = parse(path.read_bytes()).disk(dev)
    assert disk[:C] == b"y" * C
    assert disk[2 * C : 2 * C + 512] == b"x" * 512


def test_finish_retried_after_the_directory_fsync_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbdvma.vma.sink as sink_module

    real = sink_module._fsync_dir
    failures = [OSError(errno.EIO, "Input/output error")]

    def flaky(path: str) -> None:
        if failures:
            raise failures.pop()
        real(path)

    monkeypatch.setattr(sink_module, "_fsync_dir", flaky)
    w, path = new_writer(tmp_path)
    dev = w.add_device("d", 2 * C)
    w.write(dev, 0, b"\x05" * 2 * C)
    with pytest.raises(OSError, match="Input/output"):
        w.finish()
    assert not w.finished
    w.finish()  # the file was closed and renamed already: only what is left is done
    assert w.finished
    assert parse(path.read_bytes()).disk(dev) == b"\x05" * 2 * C


def test_large_payloads_are_not_pinned_by_pending_clusters(tmp_path: Path) -> None:
    import sys

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    w, path = new_writer(tmp_path / "a")
    w2, path2 = new_writer(tmp_path / "b")
    dev = w.add_device("d", 4 * C)
    dev2 = w2.add_device("d", 80 * C)
    small = random.Random(9).randbytes(2 * C)
    huge = random.Random(11).randbytes(80 * C)  # 5 MiB: over the retention limit
    before_small, before_huge = sys.getrefcount(small), sys.getrefcount(huge)
    w.write(dev, 0, small)  # its clusters wait in the extent as views of ``small``
    w2.write(dev2, 0, huge)  # 58 clusters written, 22 pending as copies
    assert sys.getrefcount(small) > before_small
    assert sys.getrefcount(huge) == before_huge
    w.finish()
    w2.finish()
    assert parse(path.read_bytes()).disk(dev) == small + bytes(2 * C)
    assert parse(path2.read_bytes()).disk(dev2) == huge


def test_release_writes_the_extent_that_still_holds_a_reused_buffer(tmp_path: Path) -> None:
    w, path = new_writer(tmp_path)
    dev = w.add_device("d", 8 * C)
    buf = bytearray(random.Random(3).randbytes(2 * C))
    first = bytes(buf)
    other = bytearray(random.Random(4).randbytes(C))
    w.write(dev, 0, memoryview(buf), owned=True)  # two clusters wait as views of buf
    w.release(other)  # not held: nothing is written
    assert path.with_name("out.vma.part").stat().st_size == 0
    w.release(buf)  # held: the short extent goes out now
    buf[:] = random.Random(5).randbytes(2 * C)  # the caller reuses its buffer
    w.write(dev, 4 * C, memoryview(buf), owned=True)
    w.finish()
    parsed = parse(path.read_bytes())
    assert parsed.extent_slots[0] == 2
    assert parsed.disk(dev) == first + bytes(2 * C) + bytes(buf) + bytes(2 * C)


@pytest.mark.parametrize("compress", [None, "zstd"])
def test_background_sink_gives_the_same_archive(tmp_path: Path, compress: str | None) -> None:
    # The same writes through a BackgroundSink (extents written by a worker thread):
    # replays (read back), FLUSH and finish all wait for the extents in flight.
    from nbdvma.vma.background import BackgroundSink

    def run(sink: object, path: Path) -> bytes:
        w = VmaWriter(sink, uuid=b"u" * 16, ctime=1)  # type: ignore[arg-type]
        dev = w.add_device("d", 300 * C + 4096)
        data = random.Random(7).randbytes(300 * C + 4096)
        w.write(dev, 0, data[: 150 * C])
        w.write(dev, 3 * C, data[3 * C : 5 * C])  # a replay of stored clusters
        w.write_zeroes(dev, 150 * C, 20 * C)
        w.flush()
        w.write(dev, 170 * C, data[170 * C :])
        w.finish()
        raw = path.read_bytes()
        if not compress:
            return raw
        frames = io.BytesIO(raw)
        return zstandard.ZstdDecompressor().stream_reader(frames, read_across_frames=True).read()

    suffix = ".vma.zst" if compress else ".vma"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = tmp_path / "a" / f"x{suffix}"
    background = tmp_path / "b" / f"x{suffix}"
    one = run(open_sink(str(plain)), plain)
    two = run(BackgroundSink(open_sink(str(background)), max_bytes=1 << 20), background)
    assert one == two
    assert parse(two).header.devices[0].size == 300 * C + 4096


@pytest.mark.parametrize(
    "layout",
    [
        "data",  # every block starts with a non-zero word: the probe's shortcut
        "zero-first-words",  # a block starts with zeros but is not zero: stored
        "zero-last-byte-only",  # a block whose only non-zero byte is its last: stored
        "one-zero-block",
        "alternate",
    ],
)
def test_mask_and_blocks_marks_exactly_the_zero_blocks(layout: str) -> None:
    rng = random.Random(layout)
    blocks = [bytearray(rng.randbytes(4096)) for _ in range(16)]
    for block in blocks:
        block[:8] = block[:8].replace(b"\0", b"\1")
    if layout == "zero-first-words":
        blocks[5][:4000] = bytes(4000)
    elif layout == "zero-last-byte-only":
        blocks[15][:] = bytes(4095) + b"\x07"
    elif layout == "one-zero-block":
        blocks[9][:] = bytes(4096)
    elif layout == "alternate":
        for j in range(0, 16, 2):
            blocks[j][:] = bytes(4096)
    want = sum(1 << j for j, block in enumerate(blocks) if any(block))
    data = b"".join(blocks)
    mask, stored, nbytes = mask_and_blocks(memoryview(data), len(data))
    assert mask == want
    assert nbytes == 4096 * want.bit_count()
    assert b"".join(stored) == b"".join(b for b in blocks if any(b))
