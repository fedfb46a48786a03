"""Byte-level tests of the streaming reader: one test per rejection rule (format doc §7)."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmagen import (
    UUID,
    Slot,
    block,
    extent,
    header,
    header_size_of,
    image_archive,
    refresh_extent_md5,
    refresh_header_md5,
)

from nbdvma.errors import VmaFormatError
from nbdvma.vma.format import VMA_BLOCK_SIZE, VMA_CLUSTER_SIZE, VMA_MAX_EXTENT_SIZE
from nbdvma.vma.reader import Cluster, VmaReader
from nbdvma.vma.sources import open_source

C = VMA_CLUSTER_SIZE


class Trickle(io.RawIOBase):
    """A source that returns at most ``step`` bytes per read (a slow pipe)."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self.step, len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def restore(data: bytes, *, step: int | None = None, missing: bool = True) -> dict[str, bytes]:
    """Read an archive and rebuild every device the way extract does (exact size)."""
    source = io.BytesIO(data) if step is None else Trickle(data, step)
    reader = VmaReader(source)  # type: ignore[arg-type]
    images = {d.name: bytearray(d.size) for d in reader.header.devices if not d.is_vmstate}
    for cl in reader.clusters():
        if cl.dev.is_vmstate:
            continue
        pos = 0
        for j in range(16):
            if cl.mask >> j & 1:
                off = cl.cluster * C + j * VMA_BLOCK_SIZE
                chunk = bytes(cl.data[pos : pos + VMA_BLOCK_SIZE])
                img = images[cl.dev.name]
                img[off : off + VMA_BLOCK_SIZE] = chunk[: max(0, len(img) - off)]
                pos += VMA_BLOCK_SIZE
    if missing:
        reader.check_missing()
    return {k: bytes(v) for k, v in images.items()}


def consume(data: bytes, *, missing: bool = False) -> None:
    """Read a whole archive, discarding the data (what verify does)."""
    reader = VmaReader(io.BytesIO(data))  # type: ignore[arg-type]
    for _ in reader.clusters():
        pass
    if missing:
        reader.check_missing()


def reject(data: bytes, message: str, *, missing: bool = False) -> None:
    with pytest.raises(VmaFormatError) as info:
        consume(data, missing=missing)
    assert str(info.value) == message


def pattern(size: int, seed: int = 1) -> bytes:
    """Non-zero data with some zero blocks and, if long enough, a zero cluster."""
    unit = bytes((i * seed + 7) % 251 + 1 for i in range(256))
    out = bytearray((unit * (size // 256 + 1))[:size])
    for start in range(0, size, 3 * VMA_BLOCK_SIZE):  # every third block zero
        end = min(start + VMA_BLOCK_SIZE, size)
        out[start:end] = bytes(end - start)
    if size > 3 * C:
        out[2 * C : 3 * C] = bytes(C)
    return bytes(out)


ONE = [Slot(1, c, 0) for c in range(4)]  # a 4-cluster disk, all zero


def arch(*extents: bytes, devices: list[tuple[str, int]] | None = None) -> bytes:
    devs = devices if devices is not None else [("disk0", 4 * C)]
    return header(devs) + b"".join(extents)


# ----------------------------------------------------------------------- happy paths


def test_round_trip_with_zero_blocks_and_partial_last_cluster() -> None:
    a = pattern(5 * C + 12288, seed=3)
    b = pattern(70 * C, seed=5)  # more than one extent
    data = image_archive([("drive-scsi0", a), ("drive-efidisk0", b)], order="interleaved")
    assert restore(data) == {"drive-scsi0": a, "drive-efidisk0": b}
    assert restore(data, step=777) == {"drive-scsi0": a, "drive-efidisk0": b}


def test_header_fields() -> None:
    data = image_archive([("disk0", pattern(C))], [("a.conf", b"x"), ("qemu-server.conf", b"")])
    reader = VmaReader(io.BytesIO(data))  # type: ignore[arg-type]
    head = reader.header
    assert head.uuid == UUID
    assert head.configs == (("a.conf", b"x"), ("qemu-server.conf", b""))
    assert [(d.dev_id, d.name, d.size) for d in head.devices] == [(1, "disk0", C)]


def test_data_is_a_view_of_the_stored_blocks_and_stats() -> None:
    data = arch(extent([Slot(1, 0, 0b101, block(1) + block(2)), *ONE[1:]]))
    reader = VmaReader(io.BytesIO(data))  # type: ignore[arg-type]
    clusters = list(reader.clusters())
    first = clusters[0]
    assert isinstance(first.data, memoryview)
    assert (first.cluster, first.mask, bytes(first.data)) == (0, 0b101, block(1) + block(2))
    assert reader.stats.clusters_read == 4
    assert reader.stats.zero_cluster_bytes == 3 * C
    assert reader.stats.partial_zero_bytes == 14 * VMA_BLOCK_SIZE
    reader.check_missing()


def test_configs_only_archive_has_one_empty_extent() -> None:
    data = header([], [("qemu-server.conf", b"cores: 1\n")]) + extent([])
    reader = VmaReader(io.BytesIO(data))  # type: ignore[arg-type]
    assert list(reader.clusters()) == []
    assert reader.stats.extents == 1


def test_memory_stays_one_extent_for_many_extents() -> None:
    data = image_archive([("disk0", pattern(200 * C))])
    reader = VmaReader(io.BytesIO(data))  # type: ignore[arg-type]
    sizes = [len(e) for e in reader.extents()]
    assert sizes == [58, 58, 58, 26]
    assert [len(b) for b in reader._bufs] == [VMA_MAX_EXTENT_SIZE]


def test_extents_in_turns_of_buffers_keep_views_valid() -> None:
    # With buffers=3, an extent's views stay valid while the next two are read, and
    # reuse(buffer) is called before a buffer is filled again.
    expect = pattern(200 * C)
    reader = VmaReader(io.BytesIO(image_archive([("disk0", expect)])))  # type: ignore[arg-type]
    reused: list[int] = []
    kept: list[list[Cluster]] = []
    for ext_clusters in reader.extents(buffers=3, reuse=lambda b: reused.append(id(b))):
        kept.append(ext_clusters)
        if len(kept) > 3:
            kept.pop(0)
        for ext in kept:  # the last three extents still hold their data
            for cl in ext:
                base = cl.cluster * C
                stored = [
                    expect[base + j * VMA_BLOCK_SIZE : base + (j + 1) * VMA_BLOCK_SIZE]
                    for j in range(16)
                    if cl.mask >> j & 1
                ]
                assert bytes(cl.data) == b"".join(stored)
    ids = [id(b) for b in reader._bufs]
    assert len(set(ids)) == 3
    assert reused == [ids[k % 3] for k in range(len(reused))]
    assert len(reused) == 5  # four extents and the read that finds the end


# ----------------------------------------------------------------------- header H1-H9


def test_h1_short_header() -> None:
    data = arch(extent(ONE))
    reject(data[:100], "can't read vma header - got 100 bytes")
    reject(b"", "can't read vma header - got 0 bytes")


def test_h2_wrong_magic() -> None:
    data = bytearray(arch(extent(ONE)))
    data[1] ^= 1
    reject(bytes(data), "not a vma file - wrong magic number")


def test_h2_short_non_vma_input_says_not_a_vma_file() -> None:
    reject(b"hello world\n", "not a vma file - wrong magic number")


def test_h3_wrong_header_size() -> None:
    for size, shown in ((12288, 12288), (100, 100), (0x80003000, 0x80003000 - 2**32)):
        data = bytearray(arch(extent(ONE)))
        struct.pack_into(">I", data, 56, size)
        reject(bytes(data), f"wrong vma header size {shown}")


def test_h4_truncated_header_data() -> None:
    data = arch(extent(ONE))
    reject(data[:12300], "can't read vma header data - got 12300 bytes")


def test_h4_huge_claimed_header_is_not_preallocated() -> None:
    data = bytearray(arch(extent(ONE)))
    struct.pack_into(">I", data, 56, 0x7FFFFFFF)
    reject(bytes(data), f"can't read vma header data - got {len(data)} bytes")


def test_h5_flipped_header_byte() -> None:
    base = arch(extent(ONE))
    for pos in (4, 20, 100, 2044, 4096 + 40, 12289, header_size_of(base) - 1):
        data = bytearray(base)
        data[pos] ^= 0x10
        reject(bytes(data), "wrong vma header chechsum")


def _edit_header(offset: int, fmt: str, value: int) -> bytes:
    data = bytearray(arch(extent(ONE)))
    hs = header_size_of(bytes(data))
    head = bytearray(data[:hs])
    struct.pack_into(fmt, head, offset, value)
    return bytes(refresh_header_md5(head)) + bytes(data[hs:])


def test_h6_wrong_version() -> None:
    reject(_edit_header(4, ">I", 2), "wrong vma version 2")


def test_h7_wrong_blob_buffer_offset() -> None:
    reject(_edit_header(48, ">I", 100), "wrong vma blob buffer offset 100")
    # The C reader prints these u32 fields with %d.
    reject(_edit_header(48, ">I", 0xFFFFFFFF), "wrong vma blob buffer offset -1")


def test_h8_wrong_blob_buffer_size() -> None:
    reject(_edit_header(52, ">I", 5000), "wrong vma blob buffer size 12288/5000")


def test_h9_bad_config_pointers() -> None:
    # A pointer into the middle of a blob, past the table, and a name without NUL.
    reject(_edit_header(2044, ">I", 2), "vma contains invalid data pointers")
    reject(_edit_header(3068, ">I", 4000), "vma contains invalid data pointers")
    name_len = len("qemu-server.conf") + 1
    data_ptr = 1 + 2 + name_len
    reject(_edit_header(2044, ">I", data_ptr), "vma contains invalid data pointers")


def test_one_sided_config_slot_and_bad_device_are_ignored() -> None:
    data = _edit_header(3068, ">I", 0)  # config slot 0 without data: skipped
    assert VmaReader(io.BytesIO(data)).header.configs == ()  # type: ignore[arg-type]


# ----------------------------------------------------------------------- extents S2-S6


def test_s2_trailing_garbage_under_512_bytes() -> None:
    reject(arch(extent(ONE)) + b"x" * 100, "read short extent (100 bytes)")
    reject(arch(extent(ONE)) + b"x", "read short extent (1 bytes)")


def test_s3_trailing_garbage_of_512_or_more() -> None:
    reject(arch(extent(ONE)) + b"\0" * 512, "wrong vma extent header chechsum")
    reject(arch(extent(ONE)) + os.urandom(5000), "wrong vma extent header chechsum")


def test_s3_flipped_extent_header_byte() -> None:
    for pos in (0, 5, 7, 9, 30, 40, 100, 511):
        ext = bytearray(extent(ONE))
        ext[pos] ^= 0x01
        reject(arch(bytes(ext)), "wrong vma extent header chechsum")


def test_s4_wrong_uuid() -> None:
    reject(arch(extent(ONE, uuid=bytes(16))), "wrong vma extent uuid")


def test_s5_wrong_magic_or_reserved() -> None:
    ext = bytearray(extent(ONE))
    ext[3] = ord("X")
    reject(arch(bytes(refresh_extent_md5(ext))), "wrong vma extent header magic")
    ext = bytearray(extent(ONE))
    ext[5] = 1
    reject(arch(bytes(refresh_extent_md5(ext))), "wrong vma extent header magic")


def test_the_reserved_byte_of_a_blockinfo_slot_is_ignored() -> None:
    """As the C reader: a slot is mask (16 bits), reserved (8), dev_id (8), cluster
    (32); whatever the reserved byte holds, the clusters read are the same."""
    slots = [Slot(1, 0, 0b11, block(1) + block(2)), *ONE[1:]]
    plain = arch(extent(slots))
    ext = bytearray(extent(slots))
    for i in range(len(slots)):
        ext[40 + 8 * i + 2] = 0xA5  # after the 40-byte fixed part, big-endian slots
    edited = arch(bytes(refresh_extent_md5(ext)))
    assert edited != plain
    assert restore(edited) == restore(plain)


def test_s6_truncated_extent() -> None:
    data = arch(extent([Slot(1, 0, 0b11, block(1) + block(2)), *ONE[1:]]))
    cut = data[:-100]
    body = len(cut) - header_size_of(data)
    reject(cut, f"short vma extent ({body} < {512 + 2 * 4096})")


def test_s6_block_count_larger_than_the_buffer() -> None:
    data = arch(extent(ONE, block_count=945) + bytes(945 * 4096))
    reject(data, f"short vma extent ({VMA_MAX_EXTENT_SIZE} < {512 + 945 * 4096})")


# ----------------------------------------------------------------------- slots S7-S13


def test_s7_wrong_dev_id() -> None:
    reject(arch(extent([*ONE, Slot(3, 0, 0)])), "got wrong dev id 3")


def test_s7_dev_255_is_not_a_disk() -> None:
    reject(arch(extent([Slot(255, 0, 0)])), "got wrong dev id 255")


def test_s8_cluster_outside_the_bitmap() -> None:
    # 4 clusters -> one 64-bit bitmap word: clusters 0..63 are "in range".
    reject(arch(extent([Slot(1, 64, 0)])), "cluster 64 out of range for stream disk0")
    reject(
        arch(extent([Slot(1, 0, 0)]), devices=[("tiny", 100)]),
        "cluster 0 out of range for stream tiny",
    )


def test_s9_duplicated_cluster_in_and_across_extents() -> None:
    reject(arch(extent([*ONE, Slot(1, 2, 0)])), "found duplicated cluster 2 for stream disk0")
    reject(
        arch(extent(ONE), extent([Slot(1, 3, 0)])), "found duplicated cluster 3 for stream disk0"
    )


def test_s9_before_s12() -> None:
    slots = [Slot(1, 10, 0), Slot(1, 10, 1, block(1))]
    reject(arch(extent(slots)), "found duplicated cluster 10 for stream disk0")


def test_s10_out_of_order_vmstate() -> None:
    devs = [("disk0", 4 * C), ("vmstate", 3 * C)]
    ok = arch(extent([*ONE, Slot(2, 0, 1, block(9)), Slot(2, 1, 0)]), devices=devs)
    reader = VmaReader(io.BytesIO(ok))  # type: ignore[arg-type]
    assert sum(1 for _ in reader.clusters()) == 6
    bad = arch(extent([*ONE, Slot(2, 1, 0)]), devices=devs)
    reject(bad, "found out of order vmstate data")


def test_s11_too_many_blocks() -> None:
    slots = [Slot(1, 0, 0b111, block(1) + block(2) + block(3)), *ONE[1:]]
    reject(arch(extent(slots, block_count=2)[:-4096]), "short vma extent - too many blocks")
    full = [Slot(1, 0, 0xFFFF, block(1) * 16), *ONE[1:]]
    reject(arch(extent(full, block_count=15)[:-4096]), "short vma extent - too many blocks")


def test_s12_write_beyond_end() -> None:
    devs = [("disk0", 2 * C + 8192)]  # 3 clusters, the last one 2 blocks long
    base = [Slot(1, 0, 0), Slot(1, 1, 0)]
    reject(arch(extent([*base, Slot(1, 2, 0b100, block(1))]), devices=devs),
           "got wrong block address - write beyond end")  # fmt: skip
    reject(arch(extent([*base, Slot(1, 3, 0xFFFF, block(1) * 16)]), devices=devs),
           "got wrong block address - write beyond end")  # fmt: skip


def test_s11_before_s12_in_block_order() -> None:
    devs = [("disk0", 4096)]
    # Block 0 is fine, block 1 is past the end, but there is no data for it: S11 first.
    reject(arch(extent([Slot(1, 0, 0b11, block(1))], block_count=1), devices=devs),
           "short vma extent - too many blocks")  # fmt: skip


def test_s13_missing_blocks() -> None:
    slots = [Slot(1, 0, 0b1, block(1)), *ONE[1:]]
    reject(arch(extent(slots, block_count=2) + block(0)), "vma extent error - missing blocks")


def test_past_end_data_is_accepted_and_reported() -> None:
    devs = [("disk0", C + 8192)]
    # 0xffff on the partial last cluster (accepted: clamped) and a mask-0 cluster
    # past the end but inside the bitmap.
    data = arch(extent([Slot(1, 0, 0), Slot(1, 1, 0xFFFF, block(5) * 16), Slot(1, 9, 0)]),
                devices=devs)  # fmt: skip
    reader = VmaReader(io.BytesIO(data))  # type: ignore[arg-type]
    assert len(list(reader.clusters())) == 3
    reader.check_missing()
    assert reader.stats.past_end == {1: 2}


def test_zero_cluster_just_past_a_whole_cluster_disk_is_past_end() -> None:
    # A disk of exactly two clusters: cluster 2 starts at its end (inside the bitmap).
    data = arch(extent([Slot(1, 0, 0), Slot(1, 1, 0), Slot(1, 2, 0)]),
                devices=[("disk0", 2 * C)])  # fmt: skip
    reader = VmaReader(io.BytesIO(data))  # type: ignore[arg-type]
    assert len(list(reader.clusters())) == 3
    reader.check_missing()
    assert reader.stats.past_end == {1: 1}


def test_cluster_overhanging_the_end_by_one_sector_is_checked_for_data_there() -> None:
    # The disk ends 512 bytes before the end of its second cluster, which is stored
    # whole: past the end only if those 512 bytes are not zero.
    devs = [("disk0", 2 * C - 512)]
    for tail, past in ((b"\0" * 512, {}), (b"\1" * 512, {1: 1})):
        stored = block(5) * 15 + block(5)[:-512] + tail
        data = arch(extent([Slot(1, 0, 0), Slot(1, 1, 0xFFFF, stored)]), devices=devs)
        reader = VmaReader(io.BytesIO(data))  # type: ignore[arg-type]
        assert len(list(reader.clusters())) == 2
        assert reader.stats.past_end == past


def test_writer_style_partial_cluster_is_not_past_end() -> None:
    a = pattern(C + 5000)
    data = image_archive([("disk0", a)])
    reader = VmaReader(io.BytesIO(data))  # type: ignore[arg-type]
    list(reader.clusters())
    assert reader.stats.past_end == {}


def test_s15_missing_cluster() -> None:
    reject(arch(extent([ONE[0], ONE[1], ONE[3]])), "detected missing cluster 2 for stream disk0",
           missing=True)  # fmt: skip
    reject(arch(extent(ONE[:3])), "detected missing cluster 3 for stream disk0", missing=True)


def test_s15_large_sparse_device() -> None:
    size = 2**40  # 16 Mi clusters: the bitmap is allocated lazily
    devs = [("big", size)]
    reject(arch(extent([Slot(1, 0, 0)]), devices=devs),
           "detected missing cluster 1 for stream big", missing=True)  # fmt: skip


def test_skipped_devices_are_not_tracked() -> None:
    data = arch(extent([*ONE, Slot(1, 2, 0)]))
    reader = VmaReader(io.BytesIO(data))  # type: ignore[arg-type]
    reader.skip_devices([1])
    assert len(list(reader.clusters())) == 5
    reader.check_missing()


def test_vmstate_at_dev_255_is_the_vmstate_stream() -> None:
    data = bytearray(arch(extent([Slot(2, 0, 0)]), devices=[("disk0", 4 * C), ("vmstate", C)]))
    hs = header_size_of(bytes(data))
    head = bytearray(data[:hs])
    head[4096 + 32 * 255 : 4096 + 32 * 256] = head[4096 + 64 : 4096 + 96]
    head[4096 + 64 : 4096 + 96] = bytes(32)
    data = refresh_header_md5(head) + extent([Slot(255, 0, 0), *ONE])
    reader = VmaReader(io.BytesIO(bytes(data)))  # type: ignore[arg-type]
    assert reader.vmstate_id == 255
    assert len(list(reader.clusters())) == 5


# ----------------------------------------------------------------------- I/O


class Broken(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        raise OSError(5, "Input/output error")


def test_s1_read_error() -> None:
    with pytest.raises(VmaFormatError, match=r"read failed - .*Input/output error"):
        VmaReader(Broken())  # type: ignore[arg-type]


def test_open_source_plain_and_zstd(tmp_path: Path) -> None:
    data = image_archive([("disk0", pattern(3 * C))])
    plain = tmp_path / "a.vma"
    plain.write_bytes(data)
    packed = zstandard.ZstdCompressor().compress(
        data[:20000]
    ) + zstandard.ZstdCompressor().compress(
        data[20000:]
    )  # two frames, like the writer's per-unit frames
    by_magic = tmp_path / "b.vma"
    by_magic.write_bytes(packed)
    by_suffix = tmp_path / "c.vma.zst"
    by_suffix.write_bytes(packed)
    for path in (plain, by_magic, by_suffix):
        with open_source(str(path)) as src:
            reader = VmaReader(src)
            assert len(list(reader.clusters())) == 3


def test_bad_zstd_is_a_read_error(tmp_path: Path) -> None:
    path = tmp_path / "x.vma.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 10)
    with open_source(str(path)) as src, pytest.raises(VmaFormatError, match="read failed"):
        VmaReader(src)


def test_the_reader_owns_its_source(tmp_path: Path) -> None:
    # The reader closes what it reads from: at the end of a with block, on close(),
    # and when the header is refused (no caller is left holding the source).
    good = io.BytesIO(image_archive([("disk0", b"x" * 4096)]))
    with VmaReader(good) as reader:  # type: ignore[arg-type]
        assert [d.name for d in reader.header.devices] == ["disk0"]
        assert not good.closed
    assert good.closed
    reader.close()  # idempotent
    bad = io.BytesIO(b"not a vma" * 2000)
    with pytest.raises(VmaFormatError, match="wrong magic"):
        VmaReader(bad)  # type: ignore[arg-type]
    assert bad.closed
    path = tmp_path / "a.vma"
    path.write_bytes(image_archive([("disk0", b"y" * 4096)]))
    with VmaReader.open(str(path)) as reader:
        assert sum(1 for _ in reader.clusters()) == 1
    assert reader._source.closed


def test_tools_do_not_import_trio() -> None:
    code = (
        "import sys, nbdvma.tools.inspect, nbdvma.tools.extract, nbdvma.tools.create;"
        "assert 'trio' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------- fuzz


_FUZZ_BASE = arch(
    extent([Slot(1, 0, 0b1011, block(1) + block(2) + block(3)), Slot(1, 1, 0xFFFF, block(4) * 16)]),
    extent([Slot(1, 2, 0), Slot(1, 3, 0b1, block(7))]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(st.tuples(st.integers(0, len(_FUZZ_BASE) - 1), st.integers(1, 255)), max_size=4),
    cut=st.integers(0, len(_FUZZ_BASE)),
    step=st.sampled_from([None, 1, 511, 4097]),
)
def test_fuzz_only_format_errors(edits: list[tuple[int, int]], cut: int, step: int | None) -> None:
    data = bytearray(_FUZZ_BASE[:cut])
    for pos, xor in edits:
        if pos < len(data):
            data[pos] ^= xor
    with contextlib.suppress(VmaFormatError):
        restore(bytes(data), step=step if step and len(data) < 40000 else None)


@settings(max_examples=100, deadline=None)
@given(
    slots=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 70), st.integers(0, 0xFFFF)), max_size=6
    ),
    delta=st.integers(-2, 2),
)
def test_fuzz_blockinfo(slots: list[tuple[int, int, int]], delta: int) -> None:
    made = [Slot(d, c, m, block(1) * m.bit_count()) for d, c, m in slots]
    need = sum(m.bit_count() for d, _, m in slots if d)
    ext = extent(made, block_count=max(0, need + delta))
    devs = [("disk0", 4 * C + 4096), ("vmstate", 2 * C)]
    with contextlib.suppress(VmaFormatError):
        restore(arch(ext, devices=devs), missing=False)


# ------------------------------------------- extents of zero clusters, checked at once

_CHUNK = 1 << 19  # clusters per chunk of the reader's seen-clusters bitmap
# disk0: a partial last cluster, or crossing a bitmap chunk (32 GiB + 512 KiB); disk1.
_ZERO_RUN_DISKS = st.sampled_from([4 * C + 8192, 6 * C, (_CHUNK + 8) * C])


def _bitmap_limit(size: int) -> int:
    """Clusters the C reader's bitmap holds: whole 64-bit words of 128-sector clusters."""
    return -(-(size // 512) // (128 * 64)) * 64


@st.composite
def _zero_extents(draw: st.DrawFn, size0: int) -> list[list[tuple[int, int]]]:
    """Extents of mask-0 slots, in runs of consecutive clusters near the edges: the
    disk's end, the bitmap's end, a chunk's end; dev 3 is not a device."""
    count0 = -(-size0 // C)
    starts = {
        1: [0, 2, count0 - 3, count0 - 1, count0, _bitmap_limit(size0) - 2, _CHUNK - 3],
        2: [0, 3, 5, 62],
        3: [0],
    }
    extents = []
    for _ in range(draw(st.integers(1, 5))):
        slots: list[tuple[int, int]] = []
        for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):
            dev = draw(st.sampled_from([1, 1, 1, 2, 2, 3]))
            first = max(0, draw(st.sampled_from(starts[dev])) + draw(st.integers(-1, 1)))
            slots += [(dev, c) for c in range(first, first + draw(st.integers(1, 8)))]
        if len(slots) >= 3 and draw(st.booleans()):
            # A slot inside a run that breaks it: another disk's, or a repeated cluster.
            i = draw(st.integers(1, len(slots) - 2))
            dev, cluster = slots[i]
            slots[i] = draw(st.sampled_from([(3 - dev if dev < 3 else 1, cluster), slots[i - 1]]))
        extents.append(slots[:59])
    return extents


def _message_of(call: Callable[[], object]) -> str | None:
    """What ``call`` raised (a VmaFormatError's message), or ``None``."""
    try:
        call()
    except VmaFormatError as exc:
        return str(exc)
    return None


@settings(max_examples=300, deadline=None)
@given(size0=_ZERO_RUN_DISKS, skip1=st.booleans(), data=st.data())
def test_zero_cluster_extents_are_checked_as_slot_by_slot(
    size0: int, skip1: bool, data: st.DataObject
) -> None:
    """Extents that store nothing (a sparse disk's empty stretches, checked in one step
    when their clusters are consecutive and new) against a model of S7-S9, the
    past-end count and S15, slot by slot."""
    extents = data.draw(_zero_extents(size0))
    sizes = {1: size0, 2: 8 * C}
    names = {1: "disk0", 2: "disk1"}
    seen: dict[int, set[int]] = {1: set(), 2: set()}
    past_end: dict[int, int] = {}
    error = None
    for dev, cluster in (slot for ext in extents for slot in ext):
        if dev not in sizes:
            error = f"got wrong dev id {dev}"
            break
        if dev == 2 and skip1:
            pass  # not tracked: no bitmap checks
        elif cluster >= _bitmap_limit(sizes[dev]):
            error = f"cluster {cluster} out of range for stream {names[dev]}"
            break
        elif cluster in seen[dev]:
            error = f"found duplicated cluster {cluster} for stream {names[dev]}"
            break
        seen[dev].add(cluster)
        if cluster * C >= sizes[dev]:  # (a zero cluster the end cuts is not past it)
            past_end[dev] = past_end.get(dev, 0) + 1
    archive = arch(
        *(extent([Slot(dev, c, 0) for dev, c in ext]) for ext in extents),
        devices=[("disk0", size0), ("disk1", 8 * C)],
    )
    reader = VmaReader(io.BytesIO(archive))  # type: ignore[arg-type]
    if skip1:
        reader.skip_devices([2])
    got: list[tuple[int, int]] = []

    def read_all() -> None:
        for ext in reader.extents():  # a ZeroRun (made on demand) or a list: one sequence
            clusters = list(ext)
            assert len(ext) == len(clusters)
            assert [ext[i] for i in range(-len(ext), len(ext))] == clusters + clusters
            assert ext[1:-1] == clusters[1:-1]
            got.extend((c.dev.dev_id, c.cluster) for c in clusters)

    raised = _message_of(read_all)
    assert raised == error
    if error:
        return
    assert got == [slot for ext in extents for slot in ext]
    assert reader.stats.past_end == past_end
    assert reader.stats.clusters_read == len(got)
    assert reader.stats.zero_cluster_bytes == len(got) * C
    assert reader.stats.stored_bytes == 0
    missing = None
    for dev in (1, 2):
        if dev == 2 and skip1:
            continue
        gap = next((c for c in range(-(-sizes[dev] // C)) if c not in seen[dev]), None)
        if gap is not None:
            missing = f"detected missing cluster {gap} for stream {names[dev]}"
            break
    assert _message_of(reader.check_missing) == missing
