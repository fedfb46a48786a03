"""What the archive commands share: opening an archive, ``-v`` progress, messages."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import subprocess
import threading
import time
from collections.abc import Iterable
from typing import Any, BinaryIO, TextIO, cast

from nbdvma.errors import ToolError, VmaFormatError
from nbdvma.s3.location import parse_s3_url
from nbdvma.vma.background import ThreadGuard
from nbdvma.vma.digest import DIGEST_ALGORITHM, DataDigest
from nbdvma.vma.format import VMA_CLUSTER_SIZE, DeviceInfo
from nbdvma.vma.reader import VmaReader
from nbdvma.vma.sources import decompressing, open_source

__all__ = [
    "Progress",
    "check_name",
    "digest_line",
    "is_lzop",
    "open_decompressed",
    "open_reader",
    "strerror",
]


def strerror(exc: OSError) -> str:
    """The reason an ``OSError`` gives, as C's ``strerror`` would print it."""
    return exc.strerror or str(exc)


#: lzop's file magic: vzdump's ``--compress lzo`` archives (``.vma.lzo``).
LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"
#: Bytes copied into lzop's stdin at a time (an object in S3).
_FEED_CHUNK = 1 << 20
#: Seconds :meth:`_Decompressed.close` waits for the thread that feeds lzop.
_FEED_JOIN_TIMEOUT = 5.0


class _Decompressed(io.RawIOBase):
    """What ``lzop -d -c`` prints, as a stream; closing it ends the process.

    lzop's own container format has no maintained Python reader: the tool is what
    Proxmox's restore runs too (``lzop -d -c``).  It reads the file ``path``, or with
    ``source`` (an object in S3) its stdin, which a thread feeds from ``source``.
    """

    def __init__(
        self,
        path: str,
        source: BinaryIO | None = None,
        thread_guard: ThreadGuard = contextlib.nullcontext,
    ) -> None:
        try:
            self._process = subprocess.Popen(
                ["lzop", "-d", "-c", "--", path] if source is None else ["lzop", "-d", "-c"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL if source is None else subprocess.PIPE,
            )
        except FileNotFoundError:
            if source is not None:
                source.close()
            raise ToolError(f"{path} is lzo-compressed: install lzop to read it") from None
        assert self._process.stdout is not None
        self._out = self._process.stdout
        self._feeder: threading.Thread | None = None
        self._feed_error: BaseException | None = None
        if source is not None:
            with thread_guard():
                self._feeder = threading.Thread(
                    target=self._feed, args=(source,), name="lzop-feed", daemon=True
                )
                self._feeder.start()

    def _feed(self, source: BinaryIO) -> None:
        """Copy ``source`` into lzop's stdin (the feeder thread)."""
        stdin = self._process.stdin
        assert stdin is not None
        try:
            while data := source.read(_FEED_CHUNK):
                stdin.write(data)
        except BrokenPipeError:
            pass  # lzop stopped reading: its exit status says why
        except BaseException as exc:  # raised again in the reading thread
            self._feed_error = exc
        finally:
            source.close()
            with contextlib.suppress(OSError):
                stdin.close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = os.readv(self._out.fileno(), [buffer])
        if n == 0:
            if self._feeder is not None:
                self._feeder.join()
            if self._feed_error is not None:
                # The input broke off: lzop's complaint about a cut file would hide why.
                raise self._feed_error
            if self._process.wait() != 0:
                assert self._process.stderr is not None
                why = self._process.stderr.read().decode(errors="replace").strip()
                raise OSError(errno.EIO, why or "lzop failed")
        return n

    def close(self) -> None:
        if not self.closed:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            if self._feeder is not None:
                # It stops at its next write into the dead process's pipe.
                self._feeder.join(_FEED_JOIN_TIMEOUT)
            self._out.close()
            assert self._process.stderr is not None
            self._process.stderr.close()
        super().close()


def is_lzop(path: str) -> bool:
    """Whether ``path`` is an lzop file (vzdump's ``.vma.lzo``)."""
    if path == "-":
        return False
    try:
        with open(path, "rb") as f:
            return f.read(len(LZOP_MAGIC)) == LZOP_MAGIC
    except OSError:
        return False  # VmaReader.open says why


def open_decompressed(
    path: str,
    *,
    s3_endpoint: str | None = None,
    header_only: bool = False,
    thread_guard: ThreadGuard = contextlib.nullcontext,
) -> BinaryIO:
    """The archive at ``path`` as a plain stream: zstd and gzip decompressed by the
    core (:func:`~nbdvma.vma.sources.open_source`), lzo through ``lzop``.

    ``path`` may be ``s3://BUCKET/KEY`` (read with the endpoint ``s3_endpoint``, or
    the environment's; see :mod:`nbdvma.s3.source`), recognised by its first bytes
    as a file is.  ``header_only``: the caller reads the header and no more, so an
    object is fetched by small ranged GETs instead of one GET of all of it.

    Raises:
        OSError: the file cannot be opened.
        S3Error: the object cannot be read.
        ToolError: an lzo archive and no ``lzop``.
    """
    location = parse_s3_url(path)
    if location is not None:
        from nbdvma.s3.source import open_stream  # boto3: only for an object in S3

        raw = open_stream(location, s3_endpoint, header_only=header_only)
        try:
            head = raw.peek(len(LZOP_MAGIC))[: len(LZOP_MAGIC)]  # type: ignore[attr-defined]
        except BaseException:
            raw.close()
            raise
        if head == LZOP_MAGIC:
            lzop = _Decompressed(path, raw, thread_guard)
            return cast(BinaryIO, io.BufferedReader(lzop, 1 << 20))
        return decompressing(raw, path)
    if is_lzop(path):
        return cast(BinaryIO, io.BufferedReader(_Decompressed(path), 1 << 20))
    return open_source(path)


def open_reader(
    path: str,
    *,
    skip: Iterable[int] = (),
    thread_guard: ThreadGuard = contextlib.nullcontext,
    s3_endpoint: str | None = None,
    header_only: bool = False,
) -> VmaReader:
    """Open ``path`` and read its header; errors as the real tool prints them.

    Plain, zstd and gzip archives are read by the core; lzo ones through ``lzop``;
    ``s3://BUCKET/KEY`` from object storage (see :func:`open_decompressed` for
    ``s3_endpoint`` and ``header_only``).  ``thread_guard`` is what the reader's
    threads are started inside.

    Raises:
        ToolError: the file cannot be opened, or its header is invalid.
        S3Error: the object cannot be read (one line that names it).
    """
    try:
        source = open_decompressed(
            path, s3_endpoint=s3_endpoint, header_only=header_only, thread_guard=thread_guard
        )
        return VmaReader(source, skip=frozenset(skip), thread_guard=thread_guard)
    except OSError as exc:
        raise ToolError(f"can't open file {path} - {strerror(exc)}") from exc
    except VmaFormatError as exc:
        raise ToolError(str(exc)) from exc


def digest_line(digest: DataDigest | None) -> str:
    """What ``verify`` (and ``extract -v``) say about the data: checked, or not."""
    if digest is None:
        return (
            "no data digest: the extents' structure was checked, their data could not be "
            "(not written by nbdvma to a file)\n"
        )
    return f"data digest ({DIGEST_ALGORITHM}) verified over {digest.length} bytes\n"


def check_name(name: str, what: str) -> None:
    """Refuse a config or device name that is not a plain file name.

    Raises:
        ToolError: ``unable to write file: invalid WHAT name NAME``.
    """
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ToolError(f"unable to write file: invalid {what} name {name!r}")


class Progress:
    """The ``progress N% (read B bytes, duration S sec)`` lines of ``-v``."""

    def __init__(self, reader: VmaReader, disks: Iterable[DeviceInfo], out: TextIO | None) -> None:
        self.reader = reader
        self.out = out
        self.total = sum(d.size // VMA_CLUSTER_SIZE for d in disks)
        self.start = int(time.time())
        self.percent = 0
        self.read = 0

    def update(self, clusters: int = 1) -> None:
        """Count clusters; print a line for each percentage reached on the way.

        The lines are those that ``vma`` prints counting one cluster at a time.  As in
        ``vma``, the total counts whole clusters only (``size // 65536``), so a disk
        with a partial last cluster ends above 100%.
        """
        read = self.read
        self.read = read + clusters
        # The real tool divides by zero when every device is < 64 KiB; we stay quiet.
        if self.out is None or not self.total:
            return
        for count in range(read + 1, read + clusters + 1):
            percent = count * 100 // self.total
            if percent != self.percent:
                duration = int(time.time()) - self.start
                self.out.write(
                    f"progress {percent}% (read {count * VMA_CLUSTER_SIZE} bytes, "
                    f"duration {duration} sec)\n"
                )
                self.out.flush()
                self.percent = percent

    def totals(self) -> None:
        """The closing lines of ``-v``: bytes read, sparse bytes, zero-block savings."""
        if self.out is None:
            return
        stats = self.reader.stats
        read = stats.clusters_read * VMA_CLUSTER_SIZE
        if not read:
            self.out.write("vma archive contains no image data\n")
            return
        sparse = stats.zero_cluster_bytes
        self.out.write(
            f"total bytes read {read}, sparse bytes {sparse} ({100.0 * sparse / read:.3g}%)\n"
        )
        datasize = read - sparse
        if datasize:
            self.out.write(
                "space reduction due to 4K zero blocks "
                f"{100.0 * stats.partial_zero_bytes / datasize:.3g}%\n"
            )
