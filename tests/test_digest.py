"""The data digest (docs/integrity.md): one changed byte of an archive nbdvma wrote is
found by ``verify`` and ``extract``; an archive without the digest is said to be
unchecked; an unfinished one is never taken for a verified one."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from pathlib import Path

import blake3
import pytest
import zstandard
from vmagen import header_size_of, image_archive, refresh_header_md5

from nbdvma.cli import main
from nbdvma.errors import DataDigestError, VmaWriterError
from nbdvma.vma.digest import (
    DIGEST_CONFIG,
    DIGEST_RECORD_SIZE,
    PLACEHOLDER,
    DataDigest,
    parse_digest_untrusted,
)
from nbdvma.vma.format import VMA_CLUSTER_SIZE, VMA_EXTENT_HEADER_SIZE, encode_extent_header
from nbdvma.vma.reader import VmaReader
from nbdvma.vma.sink import StreamSink, open_sink
from nbdvma.vma.writer import VmaWriter

C = VMA_CLUSTER_SIZE
NBDVMA = str(Path(sys.executable).with_name("nbdvma"))
CONF = b"memory: 512\n"
NO_DIGEST = (
    "no data digest: the extents' structure was checked, their data could not be "
    "(not written by nbdvma to a file)\n"
)


def image(path: Path, size: int, seed: int) -> bytes:
    """Random data with zero blocks and a zero cluster (so masks are mixed)."""
    data = bytearray(random.Random(seed).randbytes(size))
    data[C : 2 * C] = bytes(C)
    for start in range(0, size, 7 * 4096):
        data[start : start + 4096] = bytes(4096)
    path.write_bytes(data)
    return bytes(data)


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, bytes]:
    """An archive ``nbdvma create`` wrote to a file (three extents), and its disk."""
    data = image(tmp_path / "a.raw", 130 * C, 1)
    (tmp_path / "qemu-server.conf").write_bytes(CONF)
    path = tmp_path / "a.vma"
    argv = ["create", str(path), "-c", str(tmp_path / "qemu-server.conf"), str(tmp_path / "a.raw")]
    assert main(argv) == 0
    return path, data


def recorded(data: bytes) -> bytes:
    """The digest blob of an archive's header, found by its fixed layout."""
    with VmaReader(io.BytesIO(data)) as reader:
        blob = reader.header.config(DIGEST_CONFIG)
    assert blob is not None
    return blob


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def replace_record(data: bytes, record: bytes) -> bytes:
    """The archive with another digest blob of the same size (and a valid header md5)."""
    hsize = header_size_of(data)
    head = bytearray(data[:hsize])
    old = recorded(data)
    at = head.index(old)
    head[at : at + len(record)] = record
    return bytes(refresh_header_md5(head)) + data[hsize:]


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


# -- the record -----------------------------------------------------------------------


def test_record_format_and_placeholder() -> None:
    digest = DataDigest("ab" * 32, 12345)
    record = digest.encode()
    assert record == b"blake3 " + b"ab" * 32 + b" 00000000000000012345\n"
    assert len(record) == len(PLACEHOLDER) == DIGEST_RECORD_SIZE == 93
    assert parse_digest_untrusted(record) == digest
    assert parse_digest_untrusted(PLACEHOLDER) is None
    assert PLACEHOLDER.startswith(b"incomplete")
    for bad in (b"", record[:-1], record.upper(), b"sha256" + record[6:], b"x" * 93):
        with pytest.raises(DataDigestError, match="not a data digest nbdvma can read"):
            parse_digest_untrusted(bad)


# -- written, and checked by hand -----------------------------------------------------


def test_digest_is_blake3_of_everything_after_the_header(archive: tuple[Path, bytes]) -> None:
    path, _ = archive
    data = path.read_bytes()
    hsize = header_size_of(data)
    extents = data[hsize:]
    assert recorded(data) == b"blake3 %s %020d\n" % (
        blake3.blake3(extents).hexdigest().encode(),
        len(extents),
    )
    with VmaReader.open(str(path)) as reader:
        for _ in reader.extents():
            pass
        assert reader.check_digest() == DataDigest(blake3.blake3(extents).hexdigest(), len(extents))


def test_zstd_archive_digest_is_of_the_decompressed_extents(tmp_path: Path) -> None:
    data = image(tmp_path / "a.raw", 70 * C, 2)
    path = tmp_path / "a.vma.zst"
    assert main(["create", str(path), str(tmp_path / "a.raw")]) == 0
    # The by-hand check of docs/integrity.md: zstd -dc, then everything after the header.
    plain = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    hsize = header_size_of(plain)
    digest = blake3.blake3(plain[hsize:]).hexdigest()
    assert recorded(plain) == b"blake3 %s %020d\n" % (digest.encode(), len(plain) - hsize)
    proc = subprocess.run([NBDVMA, "verify", str(path)], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0,
        f"data digest (blake3) verified over {len(plain) - hsize} bytes\n",
        "",
    )
    out = tmp_path / "o"
    assert main(["extract", str(path), str(out)]) == 0
    assert (out / "disk-disk0.raw").read_bytes() == data


def test_a_stream_archive_has_no_digest_and_verify_says_so(tmp_path: Path) -> None:
    image(tmp_path / "a.raw", 10 * C, 3)
    path = tmp_path / "s.vma"
    with path.open("wb") as f:
        subprocess.run([NBDVMA, "create", "-", str(tmp_path / "a.raw")], stdout=f, check=True)
    listing = subprocess.run([NBDVMA, "list", str(path)], capture_output=True, text=True)
    assert DIGEST_CONFIG not in listing.stdout
    proc = subprocess.run([NBDVMA, "verify", str(path)], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, NO_DIGEST, "")


def test_an_archive_of_other_writers_is_said_to_be_unchecked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "pve.vma"
    path.write_bytes(image_archive([("drive-scsi0", random.Random(5).randbytes(3 * C))]))
    assert main(["verify", str(path)]) == 0
    assert capsys.readouterr().out == NO_DIGEST


# -- changed, cut, extended, unfinished -------------------------------------------------


def test_a_flipped_data_byte_fails_verify_and_extract(
    archive: tuple[Path, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = archive
    data = path.read_bytes()
    hsize = header_size_of(data)
    # A byte of the first stored 4 KiB block of the first extent: no MD5 covers it.
    bad = tmp_path / "bad.vma"
    bad.write_bytes(flip(data, hsize + VMA_EXTENT_HEADER_SIZE + 1000))
    # Every check of Proxmox's reader passes: only the digest sees the change.
    with VmaReader.open(str(bad)) as reader:
        for _ in reader.extents():
            pass
        reader.check_missing()
        with pytest.raises(DataDigestError):
            reader.check_digest()
    capsys.readouterr()
    assert main(["verify", str(bad)]) == 1
    err = one_line(capsys)
    assert err.startswith("verify failed - data digest mismatch: the extents hash to ")
    assert err.endswith("(the archive was changed after it was written)\n")
    assert blake3.blake3(bad.read_bytes()[hsize:]).hexdigest() in err
    out = tmp_path / "out"
    assert main(["extract", str(bad), str(out)]) == 1
    assert one_line(capsys).startswith("restore failed - data digest mismatch: ")
    # As after any read error: the configs, and no disk (nor a temporary one).
    assert os.listdir(out) == ["qemu-server.conf"]


def test_a_flipped_extent_header_byte_is_the_extent_md5s(
    archive: tuple[Path, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = archive
    data = path.read_bytes()
    bad = tmp_path / "bad.vma"
    bad.write_bytes(flip(data, header_size_of(data) + 100))  # a blockinfo byte
    assert main(["verify", str(bad)]) == 1
    assert one_line(capsys) == "verify failed - wrong vma extent header chechsum\n"


def test_a_cut_or_extended_archive_is_named_as_such(
    archive: tuple[Path, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = archive
    data = path.read_bytes()
    hsize = header_size_of(data)
    with VmaReader.open(str(path)) as reader:
        uuid = reader.header.uuid
    # An empty extent is valid VMA: appended, it passes every structural check.
    extended = tmp_path / "x.vma"
    extended.write_bytes(data + encode_extent_header(uuid, 0, []))
    # The last extent cut off at its start: the cut is at an extent boundary.
    last = data.rindex(b"VMAE")
    cut = tmp_path / "c.vma"
    cut.write_bytes(data[:last])
    for bad, length in ((extended, len(data) - hsize + 512), (cut, last - hsize)):
        capsys.readouterr()
        assert main(["verify", str(bad)]) == 1
        assert one_line(capsys) == (
            f"verify failed - data length mismatch: the extents are {length} bytes, the "
            f"header records {len(data) - hsize} (the archive was cut or extended after "
            "it was written)\n"
        )


def test_a_changed_byte_under_valid_zstd_checksums_is_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """zstd's XXH64 catches a flipped compressed byte (test_tools_cli); a change made
    before compression (decompress, edit, recompress) passes zstd and meets the digest."""
    image(tmp_path / "a.raw", 70 * C, 4)
    path = tmp_path / "a.vma.zst"
    assert main(["create", str(path), str(tmp_path / "a.raw")]) == 0
    plain = zstandard.ZstdDecompressor().stream_reader(path.read_bytes(), read_across_frames=True)
    data = plain.read()
    edited = flip(data, header_size_of(data) + VMA_EXTENT_HEADER_SIZE + 5)
    bad = tmp_path / "bad.vma.zst"
    bad.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(edited))
    subprocess.run(["zstd", "-tq", str(bad)], check=True)  # every frame checksum passes
    capsys.readouterr()
    assert main(["verify", str(bad)]) == 1
    assert "verify failed - data digest mismatch" in one_line(capsys)


def test_the_placeholder_is_an_unfinished_archive(
    archive: tuple[Path, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = archive
    bad = tmp_path / "p.vma"
    bad.write_bytes(replace_record(path.read_bytes(), PLACEHOLDER))
    message = (
        "the archive is incomplete: nbdvma did not finish it (its data digest is still "
        "the placeholder written at the start)\n"
    )
    capsys.readouterr()
    assert main(["verify", str(bad)]) == 1
    assert one_line(capsys) == "verify failed - " + message
    assert main(["extract", str(bad), str(tmp_path / "o")]) == 1
    assert one_line(capsys) == "restore failed - " + message
    assert os.listdir(tmp_path / "o") == ["qemu-server.conf"]
    # A record nbdvma never writes: refused, not ignored.
    bad.write_bytes(replace_record(path.read_bytes(), b"x" * DIGEST_RECORD_SIZE))
    assert main(["verify", str(bad)]) == 1
    assert "config nbdvma-digest is not a data digest nbdvma can read" in one_line(capsys)


def test_a_flushed_but_unfinished_archive_is_not_taken_for_a_finished_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every cluster written and flushed (FLUSH), never finished: structurally whole,
    and only the placeholder says what it is."""
    path = tmp_path / "u.vma"
    writer = VmaWriter(open_sink(str(path)))
    dev = writer.add_device("d0", 3 * C)
    writer.write(dev, 0, random.Random(6).randbytes(3 * C))
    writer.flush()
    try:
        assert main(["verify", str(path) + ".part"]) == 1
        assert "the archive is incomplete: nbdvma did not finish it" in one_line(capsys)
    finally:
        writer.abort()


# -- the writer's side ------------------------------------------------------------------


def test_the_digest_name_is_reserved_and_takes_a_config_slot(tmp_path: Path) -> None:
    writer = VmaWriter(open_sink(str(tmp_path / "a.vma")))
    with pytest.raises(VmaWriterError, match="'nbdvma-digest' is reserved"):
        writer.add_config("/tmp/nbdvma-digest", b"")
    for i in range(255):
        writer.add_config(f"c{i}", b"")
    with pytest.raises(VmaWriterError, match=r"too many configs \(at most 255\)"):
        writer.add_config("one-more", b"")
    writer.abort()
    with (tmp_path / "s.vma").open("wb") as f:
        stream = VmaWriter(StreamSink(f))
        for i in range(256):  # no digest on a stream: every slot is the caller's
            stream.add_config(f"c{i}", b"")
        stream.abort()


def test_extract_verbose_ends_with_the_digest_line(
    archive: tuple[Path, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, data = archive
    out = tmp_path / "o"
    assert main(["extract", "-v", str(path), str(out)]) == 0
    extents = path.stat().st_size - header_size_of(path.read_bytes())
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"data digest (blake3) verified over {extents} bytes"
    assert (out / "disk-disk0.raw").read_bytes() == data
    assert sorted(os.listdir(out)) == ["disk-disk0.raw", "qemu-server.conf"]
