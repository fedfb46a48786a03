"""Hostile-input fuzzing of the VMA reader, the archive tools and the writer.

* Reader: archives made by :class:`~nbdvma.vma.writer.VmaWriter`, then mutated byte
  by byte (flip, set, insert, delete, truncate; in the header, the extent headers or
  the data, optionally with the md5 recomputed so that the mutation reaches the
  deeper checks) or extent by extent (duplicate, remove, swap).  The reader must end
  in a :class:`~nbdvma.errors.VmaFormatError` or yield clusters that keep every
  invariant, in bounded time and memory (``tracemalloc``).
* Tools: ``nbdvma verify`` / ``verify --strict`` / ``extract`` on such files exit 0 or
  non-zero with exactly one line on stderr, never a traceback, and agree with the
  reader.
* Writer: random sequences of write / write_zeroes / append / flush / read, with
  overlaps and conflicting rewrites, against a byte model: only the documented errors,
  exactly when the model predicts them, and the archive extracts to the model.

The module also exposes :data:`TARGETS` for ``benchmarks/fuzz.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdvma.cli import main
from nbdvma.errors import (
    ClusterConflictError,
    PartialBufferFullError,
    VmaFormatError,
    VmaWriterError,
)
from nbdvma.vma.format import (
    VMA_BLOCK_SIZE,
    VMA_CLUSTER_SIZE,
    VMA_EXTENT_HEADER_SIZE,
    VMA_HEADER_SIZE,
    VMA_MAX_EXTENT_SIZE,
    header_size_untrusted,
)
from nbdvma.vma.reader import VmaReader
from nbdvma.vma.sink import open_sink
from nbdvma.vma.writer import VmaWriter

C = VMA_CLUSTER_SIZE
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------ base archives


def _pattern(size: int, seed: int) -> bytes:
    """Data with zero blocks, a zero cluster and a partial zero block."""
    unit = bytes((i * seed + 7) % 251 + 1 for i in range(4096))
    out = bytearray((unit * (size // 4096 + 1))[:size])
    for start in range(0, size, 3 * VMA_BLOCK_SIZE):
        out[start : start + VMA_BLOCK_SIZE] = bytes(min(VMA_BLOCK_SIZE, size - start))
    if size > 2 * C:
        out[C : 2 * C] = bytes(C)
    out[100:600] = bytes(500)
    return bytes(out)


@attrs.frozen
class Base:
    """A valid archive and what it holds."""

    data: bytes
    disks: dict[str, bytes]
    vmstate: bytes | None


def _make_base(disks: dict[str, bytes], vmstate: bytes | None, flush_every: int) -> Base:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "a.vma")
        w = VmaWriter(open_sink(path), uuid=bytes(range(16)), ctime=1_700_000_000)
        w.add_config("qemu-server.conf", b"memory: 512\nname: fuzz\n")
        w.add_config("other.fw", b"[OPTIONS]\n")
        ids = {name: w.add_device(name, len(img)) for name, img in disks.items()}
        sid = w.add_stream() if vmstate is not None else 0
        n = 0
        for name, img in disks.items():
            for off in range(0, len(img), C):
                w.write(ids[name], off, img[off : off + C])
                n += 1
                if n % flush_every == 0:
                    w.flush()
        if vmstate is not None:
            w.append(sid, vmstate)
        w.finish()
        return Base(Path(path).read_bytes(), disks, vmstate)


BASES = [
    _make_base(
        {"drive-scsi0": _pattern(5 * C + 512, 3), "drive-scsi1": _pattern(3 * C, 5)},
        _pattern(C + 1000, 7),
        flush_every=3,
    ),
    _make_base({"disk0": _pattern(2 * C, 11)}, None, flush_every=100),
    _make_base({}, None, flush_every=1),
]


def split_extents(data: bytes) -> tuple[bytes, list[bytes]]:
    """A *valid* archive cut into its header region and its extents."""
    hsize = header_size_untrusted(data[:VMA_HEADER_SIZE])
    out = []
    pos = hsize
    while pos < len(data):
        (count,) = struct.unpack_from(">H", data, pos + 6)
        end = pos + VMA_EXTENT_HEADER_SIZE + count * VMA_BLOCK_SIZE
        out.append(data[pos:end])
        pos = end
    return data[:hsize], out


_SPLIT = [split_extents(b.data) for b in BASES]


def _refresh_md5(data: bytearray, base: int) -> None:
    """Recompute the md5 of the header region (base 0) or of an extent header."""
    if base == 0:
        if len(data) < VMA_HEADER_SIZE:
            return
        hsize = min(len(data), struct.unpack_from(">I", data, 56)[0])
        data[32:48] = bytes(16)
        data[32:48] = hashlib.md5(data[:hsize]).digest()
    elif base + VMA_EXTENT_HEADER_SIZE <= len(data):
        data[base + 24 : base + 40] = bytes(16)
        data[base + 24 : base + 40] = hashlib.md5(
            data[base : base + VMA_EXTENT_HEADER_SIZE]
        ).digest()


@st.composite
def mutated_archive(draw: st.DrawFn) -> tuple[int, bytes]:
    """(base index, mutated archive bytes)."""
    which = draw(st.integers(0, len(BASES) - 1))
    head, extents = _SPLIT[which]
    extents = list(extents)
    for _ in range(draw(st.integers(0, 2))):
        if not extents:
            break
        i = draw(st.integers(0, len(extents) - 1))
        op = draw(st.sampled_from(["dup", "remove", "swap", "move-last"]))
        if op == "dup":
            extents.insert(draw(st.integers(0, len(extents))), extents[i])
        elif op == "remove":
            del extents[i]
        elif op == "swap":
            j = draw(st.integers(0, len(extents) - 1))
            extents[i], extents[j] = extents[j], extents[i]
        else:
            extents.append(extents.pop(i))
    starts = [0]
    for e in extents:
        starts.append(starts[-1] + len(e))
    data = bytearray(head + b"".join(extents))
    ext_starts = [len(head) + s for s in starts[:-1]]
    for _ in range(draw(st.integers(0, 4))):
        region = draw(st.sampled_from(["header", "fixed", "extent", "anywhere"]))
        if region == "fixed":  # the fields at the start of the header
            base, pos = 0, draw(st.integers(0, 96))
        elif region == "header":
            base, pos = 0, draw(st.integers(0, len(head) - 1))
        elif region == "extent" and ext_starts:
            base = draw(st.sampled_from(ext_starts))
            pos = base + draw(st.integers(0, VMA_EXTENT_HEADER_SIZE - 1))
        else:
            base, pos = -1, draw(st.integers(0, max(0, len(data) - 1)))
        if pos >= len(data):
            continue
        op = draw(st.sampled_from(["flip", "set", "set", "insert", "delete"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFE, 0xFF]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos : pos + draw(st.integers(1, 4096))]
        if base >= 0 and draw(st.integers(0, 2)):
            _refresh_md5(data, base)
    if draw(st.integers(0, 4)) == 0:  # cut the file (usually near its end)
        del data[len(data) - draw(st.integers(0, len(data))) :]
    return which, bytes(data)


# ------------------------------------------------------------------------- reader


class Trickle(io.RawIOBase):
    """A source returning at most ``step`` bytes per read (a slow pipe)."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.step, len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


_MAX_IMAGE = 64 << 20


def read_checked(data: bytes, step: int | None = None) -> dict[str, bytes] | None:
    """Read an archive; return the restored disks, or None after a VmaFormatError.

    Asserts the invariants of every cluster the reader yields.
    """
    source: Any = io.BytesIO(data) if step is None else Trickle(data, step)
    try:
        reader = VmaReader(source)
        devs = {d.dev_id: d for d in reader.header.devices}
        # A mutated header may claim a huge disk: restore only what fits in memory
        # (the base archives' disks are small); larger ones get an empty placeholder.
        images = {
            d.name: bytearray(d.size if d.size <= _MAX_IMAGE else 0)
            for d in devs.values()
            if not d.is_vmstate
        }
        seen: set[tuple[int, int]] = set()
        vm_next = 0
        clusters = stored = 0
        for cl in reader.clusters():
            clusters += 1
            assert devs[cl.dev.dev_id] is cl.dev
            assert 0 <= cl.mask <= 0xFFFF
            assert len(cl.data) == cl.mask.bit_count() * VMA_BLOCK_SIZE
            stored += len(cl.data)
            if cl.dev.dev_id == reader.vmstate_id:
                assert cl.cluster == vm_next
                vm_next += 1
                continue
            assert not cl.dev.is_vmstate
            assert (cl.dev.dev_id, cl.cluster) not in seen
            seen.add((cl.dev.dev_id, cl.cluster))
            # Inside the C reader's bitmap: at most 63 clusters past the last one.
            assert cl.cluster < cl.dev.cluster_count + 64
            img = images[cl.dev.name]
            pos = 0
            for j in range(16):
                if cl.mask >> j & 1:
                    off = cl.cluster * C + j * VMA_BLOCK_SIZE
                    # S12: a stored block starts before the last whole sector.
                    assert off < cl.dev.size // 512 * 512 or cl.mask == 0xFFFF
                    if off < len(img):
                        chunk = cl.data[pos : pos + VMA_BLOCK_SIZE]
                        img[off : off + VMA_BLOCK_SIZE] = chunk[: len(img) - off]
                    pos += VMA_BLOCK_SIZE
        assert reader.stats.clusters_read == clusters
        assert reader.stats.stored_bytes == stored
        reader.check_missing()
    except VmaFormatError as exc:
        message = str(exc)
    else:
        return {k: bytes(v) for k, v in images.items()}
    assert message
    assert "\n" not in message
    return None


def check_reader(case: tuple[int, bytes], step: int | None = None) -> None:
    """The reader fuzz target: format error or invariant-keeping success, fast, small."""
    which, data = case
    t0 = time.monotonic()
    tracemalloc.start()
    try:
        got = read_checked(data, step)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < 20
    # Two extent buffers (one read while the other is hashed, where the header has a
    # data digest), the header region, one 64 KiB bitmap chunk per disk, slack.
    assert peak < 2 * VMA_MAX_EXTENT_SIZE + 2 * len(data) + (1 << 20), peak
    if data == BASES[which].data:
        assert got == BASES[which].disks


@FUZZ
@given(case=mutated_archive(), step=st.sampled_from([None, None, 1, 511, 4097]))
def test_fuzz_reader_mutated_archives(case: tuple[int, bytes], step: int | None) -> None:
    if step == 1 and len(case[1]) > 60000:
        step = 4097
    check_reader(case, step)


def test_bases_are_valid() -> None:
    for b in BASES:
        assert read_checked(b.data) == b.disks


# -------------------------------------------------------------------------- tools


def run_cli(*argv: str) -> tuple[int, str]:
    """``nbdvma ARGV`` in-process; any exception escaping main fails the test."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        status = main(list(argv))
    return status, err.getvalue()


def assert_clean(status: int, err: str) -> None:
    assert "Traceback" not in err
    if status:
        assert err.count("\n") == 1, err
        assert err.strip(), "a failure must say why"


def check_tools(case: tuple[int, bytes]) -> None:
    """verify, verify --strict and extract on one file: one-line errors, agreement."""
    which, data = case
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.vma")
        Path(path).write_bytes(data)
        readable = read_checked(data) is not None
        status, err = run_cli("verify", path)
        assert_clean(status, err)
        strict, err = run_cli("verify", "--strict", path)
        assert_clean(strict, err)
        out = os.path.join(tmp, "out")
        extracted, err = run_cli("extract", path, out)
        assert_clean(extracted, err)
        if status:
            assert strict
            assert extracted
        if extracted == 0:
            assert readable
        if data == BASES[which].data:
            assert status == strict == extracted == 0
            for name, img in BASES[which].disks.items():
                assert Path(out, f"disk-{name}.raw").read_bytes() == img
        elif extracted:
            # A failed extract leaves no half-written image under its final name.
            leftovers = os.listdir(out) if os.path.isdir(out) else []
            assert not [f for f in leftovers if f.endswith(".raw")], leftovers


@settings(FUZZ, max_examples=60)
@given(case=mutated_archive())
def test_fuzz_cli_on_mutated_archives(case: tuple[int, bytes]) -> None:
    check_tools(case)


@settings(FUZZ, max_examples=4)
@given(case=mutated_archive())
def test_fuzz_cli_subprocess_never_tracebacks(case: tuple[int, bytes]) -> None:
    """The same through a real process (what a user sees, Python's own handlers too)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.vma")
        Path(path).write_bytes(case[1])
        for argv in (["verify", path], ["extract", path, os.path.join(tmp, "o")]):
            proc = subprocess.run(
                [sys.executable, "-m", "nbdvma", *argv], capture_output=True, check=False
            )
            assert_clean(proc.returncode, proc.stderr.decode())


# ------------------------------------------------------------------------- writer


@attrs.define
class _ModelDisk:
    """What a disk must hold: its bytes and which bytes were written."""

    size: int
    content: bytearray
    written: bytearray  # 1 per byte written

    def limit(self, cluster: int) -> int:
        return min(C, self.size - cluster * C)

    def state(self, cluster: int) -> str:
        lo, hi = cluster * C, cluster * C + self.limit(cluster)
        covered = self.written.count(1, lo, hi)
        if covered == 0:
            return "untouched"
        if covered < hi - lo:
            return "partial"
        return "zero" if not any(self.content[lo:hi]) else "stored"


@attrs.define
class WriterModel:
    """The documented behaviour of VmaWriter, byte by byte."""

    disks: list[_ModelDisk]
    max_partial: int
    stream: bytearray = attrs.Factory(bytearray)

    def partials(self) -> int:
        return sum(d.state(c) == "partial" for d in self.disks for c in range(-(-d.size // C)))

    def write(self, disk: int, offset: int, data: bytes, *, zeroes: bool = False) -> Expected:
        """Apply a write (or write_zeroes) cluster by cluster as the writer does; return
        the error expected.  The clusters before a failing one stay written."""
        d = self.disks[disk]
        if offset < 0 or offset + len(data) > d.size:
            return VmaWriterError
        pos, end = offset, offset + len(data)
        count = -(-d.size // C)
        while pos < end:
            cluster, inner = divmod(pos, C)
            n = min(C - inner, end - pos)
            if zeroes and inner == 0 and n >= d.limit(cluster) and d.state(cluster) == "untouched":
                # write_zeroes' fast path: a run of whole clusters; untouched ones become
                # zero without a buffer, zeroed ones are skipped, others written as usual.
                run = max(min((end - pos) // C, count - cluster), 1)
                for cl in range(cluster, cluster + run):
                    state = d.state(cl)
                    if state == "untouched":
                        d.written[cl * C : cl * C + d.limit(cl)] = b"\1" * d.limit(cl)
                    elif state != "zero":
                        err = self._piece(d, cl * C, bytes(d.limit(cl)))
                        if err is not None:
                            return err
                pos += min(run * C, end - pos)
                continue
            err = self._piece(d, pos, data[pos - offset : pos - offset + n])
            if err is not None:
                return err
            pos += n
        return None

    def _piece(self, d: _ModelDisk, pos: int, piece: bytes) -> Expected:
        """``_write_cluster``: ``piece`` lies within one cluster."""
        cluster, inner = divmod(pos, C)
        n = len(piece)
        state = d.state(cluster)
        if state == "stored":  # PENDING or STORED: immutable
            return None if d.content[pos : pos + n] == piece else ClusterConflictError
        whole = state in ("untouched", "zero") and inner == 0 and n >= d.limit(cluster)
        # Every other case assembles the cluster in a partial buffer first.
        needs_slot = not whole and state != "partial"
        if needs_slot and (self.partials() + 1) * C > self.max_partial:
            return PartialBufferFullError
        d.content[pos : pos + n] = piece
        d.written[pos : pos + n] = b"\1" * n
        return None


Expected = type[VmaWriterError] | None


@st.composite
def writer_ops(draw: st.DrawFn) -> tuple[list[int], int, bool, list[tuple[Any, ...]]]:
    sizes = draw(
        st.lists(
            st.one_of(
                st.integers(1, 5 * C // 512).map(lambda n: n * 512),
                st.sampled_from([C, 3 * C + 512]),
            ),
            min_size=1,
            max_size=3,
        )
    )
    max_partial = draw(st.sampled_from([C, 2 * C, 4 * C, 64 << 20]))
    with_stream = draw(st.booleans())
    ops: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["write", "write", "write", "zero", "read", "flush", "append"]))
        disk = draw(st.integers(0, len(sizes) - 1))
        size = sizes[disk]
        offset = draw(
            st.one_of(
                st.integers(0, size // C).map(lambda k: k * C),
                st.integers(0, size // 4096).map(lambda k: k * 4096),
                st.integers(0, size),
                st.integers(-2, size + C),
            )
        )
        length = draw(
            st.one_of(
                st.sampled_from([C, 2 * C, 4096, 512]),
                st.integers(0, 3 * C),
            )
        )
        fill = draw(st.sampled_from([0, 0, 1, 2, 0xAB]))
        ops.append((kind, disk, offset, length, fill, draw(st.booleans())))
    return sizes, max_partial, with_stream, ops


def _data(length: int, fill: int, salt: int) -> bytes:
    if fill == 0:
        return bytes(length)
    unit = bytes([fill]) * 4095 + bytes([salt & 0xFF])
    out = bytearray((unit * (length // 4096 + 1))[:length])
    out[0 : min(length, 4096) : 8] = bytes(len(range(0, min(length, 4096), 8)))  # zero runs
    return bytes(out)


def check_writer(case: tuple[list[int], int, bool, list[tuple[Any, ...]]]) -> None:
    """The writer fuzz target: model-exact errors and an archive that extracts to it."""
    sizes, max_partial, with_stream, ops = case
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.vma")
        w = VmaWriter(open_sink(path), max_partial_bytes=max_partial)
        ids = [w.add_device(f"disk{i}", size) for i, size in enumerate(sizes)]
        sid = w.add_stream() if with_stream else 0
        model = WriterModel(
            [_ModelDisk(s, bytearray(s), bytearray(s)) for s in sizes], max(C, max_partial)
        )
        for step, (kind, disk, offset, length, fill, as_write) in enumerate(ops):
            dev = ids[disk]
            if kind == "read":
                d = model.disks[disk]
                if offset >= 0 and offset + length <= d.size:
                    assert w.read(dev, offset, length) == bytes(d.content[offset : offset + length])
                else:
                    try:
                        w.read(dev, offset, length)
                    except VmaWriterError:
                        pass
                    else:
                        raise AssertionError("read out of range accepted")
                continue
            if kind == "flush":
                w.flush()
                continue
            if kind == "append":
                if not with_stream:
                    continue
                data = _data(length, fill, step)
                if as_write:
                    w.write(sid, len(model.stream), data)
                else:
                    w.append(sid, data)
                model.stream += data
                continue
            data = _data(length, fill if kind == "write" else 0, step)
            expected = model.write(disk, offset, data, zeroes=kind == "zero")
            got: Expected = None
            try:
                if kind == "zero":
                    w.write_zeroes(dev, offset, length)
                else:
                    w.write(dev, offset, data)
            except VmaWriterError as exc:
                got = type(exc)
            assert got is expected, (kind, offset, length, got, expected, step)
        w.finish()
        data = Path(path).read_bytes()
        source = io.BytesIO(data)
        reader = VmaReader(source)
        got = read_checked(data)
        assert got is not None
        for i, d in enumerate(model.disks):
            assert got[f"disk{i}"] == bytes(d.content), i
        if with_stream:
            vm = bytearray()
            for cl in reader.clusters():
                if cl.dev.is_vmstate:
                    vm += _expand(cl.mask, bytes(cl.data))
            assert reader.header.vmstate is not None
            if model.stream:
                assert reader.header.vmstate.size == len(model.stream)
            assert bytes(vm[: len(model.stream)]) == bytes(model.stream)
            assert not any(vm[len(model.stream) :])


def _expand(mask: int, stored: bytes) -> bytes:
    out = bytearray(C)
    pos = 0
    for j in range(16):
        if mask >> j & 1:
            out[j * VMA_BLOCK_SIZE : (j + 1) * VMA_BLOCK_SIZE] = stored[pos : pos + 4096]
            pos += VMA_BLOCK_SIZE
    return bytes(out)


@settings(FUZZ, max_examples=120)
@given(case=writer_ops())
def test_fuzz_writer_against_model(
    case: tuple[list[int], int, bool, list[tuple[Any, ...]]],
) -> None:
    check_writer(case)


#: Fuzz targets for ``benchmarks/fuzz.py``: name -> (strategy of one input, check).
TARGETS: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], object]]] = {
    "vma-reader": (mutated_archive(), check_reader),
    "vma-cli": (mutated_archive(), check_tools),
    "vma-writer": (writer_ops(), check_writer),
}
