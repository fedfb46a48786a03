"""An archive written straight into object storage: the writer's sink for ``s3://``.

:class:`S3Sink` implements :class:`~nbdvma.vma.sink.Sink` over one multipart upload
(:class:`~nbdvma.s3.upload.MultipartUpload`), with no local staging copy:

* **Part 1** is the header plus the first units, at least :data:`MIN_PART_SIZE`
  (S3's minimum for every part but the last), kept in memory to the end: the header
  is rewritten there (:meth:`S3Sink.patch_header`: the VM state's true length, the
  data digest), so the sink is ``seekable`` as a file is, and part 1 is uploaded last
  (S3 assembles parts by number, not by arrival).
* **Parts 2, 3, ...** are cut from the following units as they come, each at least
  the part size (see :func:`part_size_for`), and sent by a few threads while the
  writer goes on; at most ``concurrency`` are in flight (fewer for parts larger
  than 8 MiB: :data:`IN_FLIGHT_BYTES`), then :meth:`S3Sink.append` waits (the caller
  is a worker thread of the server), so memory stays bounded: part 1 + the part
  being filled + the parts in flight.
* ``.zst``: each unit is a zstd frame, compressed on every core exactly as for a file
  (:class:`~nbdvma.vma.zstdframes.FramePipeline`); the header a frame of raw blocks.
* Nothing exists under the key before :meth:`S3Sink.commit` (CompleteMultipartUpload);
  a key that exists is refused at the start (HEAD) unless ``force``, and checked again
  just before completion.  :meth:`S3Sink.abort` aborts the upload.

What it cannot do, and says so:

* **No read-back** (``readable`` is false): a part once sent is not fetched back.
  The writer then keeps a CRC of each stored cluster, as for a pipe: an identical
  replayed write is accepted, a differing one refused, and a READ of a stored
  cluster fails with an error.
* **No FLUSH** (:meth:`S3Sink.sync` raises): nothing is durable before the upload
  completes, so a FLUSH cannot be acknowledged honestly; the server does not offer
  it for an S3 archive (``NBD_FLAG_SEND_FLUSH``, ``NBD_FLAG_SEND_FUA`` unset).
  Partly written clusters stay in memory (no journal), as on a pipe.

A part that fails (after botocore's retries) fails the archive: the error is raised
by every later call (and by :attr:`S3Sink.failure` for a watcher), and the caller
aborts.  A failed unit cannot be retried as on a file: the upload may hold part of it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

from nbdvma.errors import S3Error, VmaWriterError
from nbdvma.s3.client import S3Client, head_object, make_client
from nbdvma.s3.location import S3Location
from nbdvma.s3.upload import MultipartUpload
from nbdvma.vma.background import ThreadGuard
from nbdvma.vma.digest import DataDigest, StreamHasher
from nbdvma.vma.zstdframes import FramePipeline, parse_compression, zstd_raw_frame

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_PART_SIZE",
    "IN_FLIGHT_BYTES",
    "MIN_PART_SIZE",
    "S3Sink",
    "part_size_for",
]

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview

_MiB = 1 << 20
#: S3's minimum size of every part but the last.
MIN_PART_SIZE = 5 * _MiB
#: The part size when the archive's size is not known to need more (measured against
#: SeaweedFS: see docs/s3.md).
DEFAULT_PART_SIZE = 8 * _MiB
#: Parts in flight at most (threads, and HTTP connections).
DEFAULT_CONCURRENCY = 4
#: ... and bytes in flight at most, but always one part: large parts (a large archive)
#: go one or two at a time, so that memory does not grow with them fourfold.
IN_FLIGHT_BYTES = 32 * _MiB
#: Seconds to wait for the answer to an abort (retried until its own deadline).
CONTROL_READ_TIMEOUT = 10.0
#: From this part number on, parts double in size every 1000 parts: an archive far
#: larger than announced still fits S3's 10,000 parts (36,000 times the base size).
_GROWTH_FROM = 6000


def part_size_for(size_hint: int, base: int = DEFAULT_PART_SIZE) -> int:
    """The part size for an archive of up to ``size_hint`` bytes: ``base``, or more
    so that the archive takes at most ~6000 parts (whole MiB)."""
    need = -(-max(0, size_hint) // _GROWTH_FROM)
    return max(base, MIN_PART_SIZE, -(-need // _MiB) * _MiB)


class S3Sink:
    """An archive streamed into one multipart upload to ``s3://BUCKET/KEY``."""

    readable = False
    seekable = True

    def __init__(
        self,
        location: S3Location,
        *,
        compress: str | None = None,
        force: bool = False,
        endpoint: str | None = None,
        client: S3Client | None = None,
        size_hint: int = 0,
        part_size: int | None = None,
        concurrency: int | None = None,
        thread_guard: ThreadGuard = contextlib.nullcontext,
    ) -> None:
        """Check the key and start the upload (nothing is visible under the key yet).

        Args:
            location: the archive's bucket and key.
            compress: ``"zstd"``, ``"zstd:LEVEL"`` or ``None`` (the caller infers it
                from a ``.zst`` key, as :func:`~nbdvma.vma.sink.open_sink` does).
            force: replace an object that exists under the key (at completion).
            endpoint: ``--s3-endpoint``; ``None``: the environment's.
            client: a client to use instead of making one (``endpoint`` is then unused).
            size_hint: about how large the archive may grow (the disks' sizes): parts
                are made larger where 10,000 of the default size would not hold it.
            part_size: the smallest size of parts 2, 3, ... (default
                :data:`DEFAULT_PART_SIZE`, read at the call: a benchmark may set it).
            concurrency: parts in flight at once (default :data:`DEFAULT_CONCURRENCY`).
            thread_guard: what the threads (upload, compression) are started inside.

        Raises:
            S3UrlError: the location names no object.
            S3Error: the key exists (without ``force``), no such bucket, wrong
                credentials, an endpoint that does not answer...
            VmaWriterError: an unknown compression.
        """
        self.location = location.require_object()
        level = parse_compression(compress)
        self.url = location.url
        self.force = force
        part_size = part_size or DEFAULT_PART_SIZE
        concurrency = concurrency or DEFAULT_CONCURRENCY
        self._client = client or make_client(endpoint, max_pool_connections=concurrency + 2)
        # The abort must not hang on an endpoint that accepts and never answers.
        control = client or make_client(
            endpoint, read_timeout=CONTROL_READ_TIMEOUT, attempts=1, max_pool_connections=2
        )
        if head_object(self._client, location) is not None and not force:
            raise S3Error(f"{self.url}: archive exists already (give --force to replace it)")
        self._base_part = part_size_for(size_hint, part_size)
        self._upload = MultipartUpload.create(
            self._client,
            location,
            concurrency=concurrency,
            control=control,
            thread_guard=thread_guard,
        )
        self._set_limit()
        try:
            self._zstd = (
                None
                if level is None
                else FramePipeline(self._write_frame, level=level, thread_guard=thread_guard)
            )
        except BaseException:
            self._upload.abort()
            raise
        self._hasher = StreamHasher()
        self._first = bytearray()  # part 1: the header and the first units
        self._current = bytearray()  # the part being filled
        self._next_part = 2
        self._header_len = 0
        self._count = 0
        #: Bytes of the archive so far (compressed, as stored).
        self.size = 0
        self._committed = False
        self._closed = False

    # -- the parts ----------------------------------------------------------------------

    def _set_limit(self) -> None:
        upload = self._upload
        upload.limit = max(1, min(upload.concurrency, IN_FLIGHT_BYTES // self._base_part))

    def _part_size(self, number: int) -> int:
        if number <= _GROWTH_FROM:
            return self._base_part
        return self._base_part << ((number - _GROWTH_FROM - 1) // 1000 + 1)

    def _store(self, data: Sequence[Buffer]) -> None:
        """Add one unit's stored bytes to part 1 (while it is short) or the current
        part; send the current part once it is large enough."""
        self._check()
        target = self._first if len(self._first) < MIN_PART_SIZE else self._current
        for piece in data:
            target += piece
            self.size += len(piece)
        if len(self._current) >= self._part_size(self._next_part):
            part, self._current = self._current, bytearray()
            self._upload.submit(self._next_part, part)
            self._next_part += 1

    def _check(self) -> None:
        if self._closed:
            raise VmaWriterError(f"{self.url}: the archive is closed")
        if self._upload.failure is not None:
            raise S3Error(str(self._upload.failure))

    def _write_frame(self, frame: bytes, parts: Sequence[Buffer]) -> None:
        self._store([frame])
        self._hasher.update(parts)

    # -- the Sink protocol ------------------------------------------------------------------

    def reserve(self, nbytes: int) -> None:
        """See :meth:`Sink.reserve <nbdvma.vma.sink.Sink.reserve>`: a larger part size
        if ``nbytes`` needs it and no part has been sent yet."""
        if self._next_part == 2 and not self._current:
            self._base_part = max(self._base_part, part_size_for(self.size + nbytes))
            self._set_limit()

    def write_header(self, header: bytes) -> None:
        """See :meth:`Sink.write_header`: the start of part 1."""
        data = zstd_raw_frame(header) if self._zstd is not None else header
        self._store([data])
        self._header_len = len(data)

    def append(self, parts: Sequence[Buffer]) -> int:
        """See :meth:`Sink.append`: copied into a part (and compressed first for
        ``.zst``); waits while the parts in flight are at their bound.

        Raises:
            S3Error: a part failed earlier, or the upload was interrupted.
        """
        self._check()
        if self._zstd is not None:
            self._zstd.submit(parts)
        else:
            self._store(parts)
            self._hasher.update(parts)
        self._count += 1
        return self._count - 1

    def read_unit(self, index: int, offset: int, length: int) -> bytes:
        """Not possible: what was uploaded is not fetched back (``readable`` is false)."""
        raise VmaWriterError(f"{self.url}: the archive is being uploaded; it cannot be read back")

    def release(self, buffer: object) -> None:
        """See :meth:`Sink.release`: units are copied, but ``.zst`` ones may still wait
        to be compressed."""
        if self._zstd is not None:
            self._zstd.release(buffer)

    def patch_header(self, header: bytes) -> None:
        """See :meth:`Sink.patch_header`: rewritten in part 1, still in memory."""
        data = zstd_raw_frame(header) if self._zstd is not None else header
        if len(data) != self._header_len:
            raise VmaWriterError("a patched header must keep its length")
        self._first[: len(data)] = data

    def data_digest(self) -> DataDigest:
        """See :meth:`Sink.data_digest` (every unit accepted is compressed first)."""
        if self._zstd is not None:
            self._zstd.drain()
        return self._hasher.result()

    def sync(self) -> None:
        """Refused: nothing is durable before the upload completes (see the module
        docstring), so a FLUSH must not be acknowledged.

        Raises:
            VmaWriterError: always.
        """
        raise VmaWriterError(
            f"{self.url}: an archive in object storage offers no FLUSH: it is stored "
            "only once complete"
        )

    def write_journal(self, data: bytes | None) -> None:
        """Nowhere to keep a journal before completion: partial clusters stay in memory."""

    def commit(self) -> None:
        """See :meth:`Sink.commit`: the last parts, part 1, CompleteMultipartUpload.

        Raises:
            S3Error: a part or the completion failed, or an object appeared under the
                key meanwhile (without ``force``); the caller aborts.
        """
        if self._committed:
            return
        self._check()
        if self._zstd is not None:
            self._zstd.drain()
        if self._current:
            part, self._current = self._current, bytearray()
            self._upload.submit(self._next_part, part)
            self._next_part += 1
        self._upload.wait()
        if not self.force and head_object(self._client, self.location) is not None:
            raise S3Error(
                f"{self.url}: an object appeared under this key while the archive "
                "was written (give --force to replace it)"
            )
        first, self._first = self._first, bytearray()
        self._upload.complete(first)
        self._committed = True
        self._close()

    def abort(self, *, discard: bool = False) -> None:
        """See :meth:`Sink.abort`: AbortMultipartUpload (retried for a while if the
        endpoint does not answer; a warning says what is left).  Nothing is ever
        visible under the key, so ``discard`` changes nothing."""
        self._close()
        if not self._committed:
            self._upload.abort()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._zstd is not None:
                self._zstd.close()
            self._first = bytearray()
            self._current = bytearray()

    # -- for the session ------------------------------------------------------------------

    @property
    def failure(self) -> S3Error | None:
        """What failed the upload (a part, an interruption), for a watcher that ends the
        session at once rather than at the next write."""
        return self._upload.failure

    def interrupt(self) -> None:
        """Make a call waiting for the parts in flight raise at once (any thread)."""
        self._upload.interrupt()

    @property
    def committed(self) -> bool:
        """Whether the archive is complete under its key."""
        return self._committed

    @property
    def upload_state(self) -> str:
        """``open``, ``completed``, ``aborted`` or ``abandoned`` (an abort that failed)."""
        return self._upload.state
