"""Reading an archive object: a sequential stream for the readers, ranged reads for export.

:class:`S3Object` is one object as it was when it was opened (its size and ETag from
a HEAD): every later GET asks for that ETag (``If-Match``), so that an object replaced
meanwhile is an error (``PreconditionFailed``), never a mix of two archives.  It
counts the bytes and requests it fetched (:attr:`S3Object.fetched`), which the tests
and the benchmarks read.

:class:`S3Stream` is the object as a read-only binary stream (an ``io.RawIOBase``;
:func:`open_stream` wraps it in a buffer, as a file is), read front to back:

* ``header_only``: ranged GETs that start at :data:`FIRST_RANGE` (1 MiB: the header of
  a plain or an nbdvma ``.vma.zst`` archive and a compressed one's first blocks) and
  double up to :data:`MAX_RANGE`.  ``list`` and ``config`` read the header and close
  the stream, so they fetch 1 MiB of an archive of any size.
* otherwise, one streaming GET of the whole object (``verify``, ``extract``, the index
  pass of ``export``), read :data:`STREAM_CHUNK` at a time.  Memory: the reader's own
  buffers plus one chunk; nothing is fetched ahead.  Should the connection break off
  mid-object, the GET is resumed at the position reached (``Range: bytes=N-``, same
  ETag), up to :data:`RESUMES` times in a row (:data:`RESUMED_PROGRESS`); then the
  error is one line.

Why one GET and not parallel ranged GETs: measured (``benchmarks/bench_s3_read.py``,
SeaweedFS 4.48 ``weed mini`` on the same 2-core machine, a 1.0 GiB archive, median of
7 runs), the object read to nowhere takes 1.81 s with one GET (570 MiB/s) against
2.00 s with 8 MiB ranges, 2 in flight in threads, and 1.95 s with 4; under
``verify``'s own loop 1.99 s (518 MiB/s) against 2.51 s and 2.19 s.  The endpoint and
the consumer share the cores, and threads that fetch ahead add copies and contention
for the GIL, not bandwidth.  One GET also bounds memory at one chunk (1 MiB) where
prefetched ranges hold ``(workers + 1) * 8 MiB``.  Against a store whose limit is the
throughput of one connection (AWS S3: tens of MB/s each), ranges in parallel could
win: measure there before changing this.

Failures are :class:`~nbdvma.errors.S3Error` with one line that names
``s3://BUCKET/KEY`` (:func:`~nbdvma.s3.client.describe_s3_error`).  Blocking, like
the client: the export calls it from worker threads.
"""

from __future__ import annotations

import io
import threading
from typing import Any, BinaryIO, cast

import botocore.exceptions as bexc
import urllib3.exceptions

from nbdvma.errors import S3Error
from nbdvma.s3.client import (
    S3Client,
    call,
    describe_s3_error,
    endpoint_of,
    head_object,
    make_client,
)
from nbdvma.s3.location import S3Location

__all__ = [
    "FIRST_RANGE",
    "MAX_RANGE",
    "RESUMED_PROGRESS",
    "RESUMES",
    "STREAM_CHUNK",
    "S3Object",
    "S3Stream",
    "open_stream",
]

#: The first ranged GET of a header-only read: a plain header is at most 512 KiB
#: (Proxmox's writer), an nbdvma ``.vma.zst``'s header frame is smaller.
FIRST_RANGE = 1 << 20
#: The largest ranged GET of a header-only read (each one doubles the last).
MAX_RANGE = 8 << 20
#: Bytes asked of the streaming GET at a time (and the buffer of :func:`open_stream`).
STREAM_CHUNK = 1 << 20
#: Times in a row a GET that broke off is resumed where it stopped...
RESUMES = 2
#: ...a streaming GET's count starting again once a resumed one has given this many
#: bytes (a connection that breaks now and then never ends a long transfer; one that
#: breaks at once does, after RESUMES tries).
RESUMED_PROGRESS = 1 << 20

#: What a body raises when the connection breaks off mid-object.
_STREAM_ERRORS = (bexc.BotoCoreError, urllib3.exceptions.HTTPError, OSError)


class S3Object:
    """One object, pinned to the ETag it had when opened (see the module)."""

    def __init__(self, client: S3Client, location: S3Location, size: int, etag: str) -> None:
        """Read ``location`` with ``client``; ``size`` and ``etag`` from its HEAD."""
        self.client = client
        self.location = location
        self.size = size
        self.etag = etag
        self._lock = threading.Lock()
        #: Bytes of the object received so far (all GETs, all threads).
        self.fetched = 0
        #: GET requests sent so far.
        self.requests = 0

    @classmethod
    def open(
        cls, location: S3Location, endpoint: str | None = None, *, connections: int = 10
    ) -> S3Object:
        """HEAD the object at ``location`` (see :func:`~nbdvma.s3.client.make_client`
        for ``endpoint``; ``connections``: the GETs that may run at once).

        Raises:
            S3Error: no such key or bucket, wrong credentials, no endpoint there...
        """
        location = location.require_object()
        client = make_client(endpoint, max_pool_connections=connections)
        head = head_object(client, location)
        if head is None:
            raise S3Error(
                f"{location.url}: no such key (NoSuchKey, HeadObject at {endpoint_of(client)})"
            )
        return cls(client, location, int(head["ContentLength"]), str(head.get("ETag") or ""))

    @property
    def url(self) -> str:
        """``s3://BUCKET/KEY``."""
        return self.location.url

    def count(self, nbytes: int, requests: int = 0) -> None:
        """Add to :attr:`fetched` and :attr:`requests` (from any thread)."""
        with self._lock:
            self.fetched += nbytes
            self.requests += requests

    def _get(self, byte_range: str) -> Any:
        params: dict[str, Any] = {"Bucket": self.location.bucket, "Key": self.location.key}
        if self.etag:
            params["IfMatch"] = self.etag
        self.count(0, 1)
        return call(self.client, "get_object", self.location, Range=byte_range, **params)["Body"]

    def get(self, start: int, length: int) -> bytearray:
        """``length`` bytes at ``start`` (fewer only at the object's end), one GET (or
        more if the transfer breaks off: resumed up to :data:`RESUMES` times).

        Read into the result a chunk at a time: memory is the result plus one chunk.

        Raises:
            S3Error: the request failed, or the object changed since it was opened.
        """
        length = min(length, self.size - start)
        out = bytearray(max(length, 0))
        view = memoryview(out)
        got = failures = 0
        while got < length:
            body = self._get(f"bytes={start + got}-{start + length - 1}")
            try:
                while got < length:
                    n = int(body.readinto(view[got : got + STREAM_CHUNK]))
                    if not n:
                        raise EOFError("the connection closed early")
                    got += n
                    self.count(n)
            except (*_STREAM_ERRORS, EOFError) as exc:
                failures += 1
                if failures > RESUMES:
                    raise S3Error(self.broke_off(start + got, exc)) from exc
            finally:
                body.close()
        return out

    def body(self, start: int) -> Any:
        """A streaming body of the object from ``start`` to its end (one GET).

        Raises:
            S3Error: the request failed, or the object changed since it was opened.
        """
        return self._get(f"bytes={start}-")

    def broke_off(self, position: int, exc: BaseException) -> str:
        """The line for a transfer of this object that broke off at ``position``."""
        why = describe_s3_error(exc, endpoint=endpoint_of(self.client))
        return f"{self.url}: the transfer broke off at byte {position} of {self.size} ({why})"


class S3Stream(io.RawIOBase):
    """An :class:`S3Object` read front to back (see the module for the two ways)."""

    def __init__(self, obj: S3Object, *, header_only: bool = False) -> None:
        """Read ``obj`` from its start; ``header_only``: by growing ranged GETs."""
        super().__init__()
        self.object = obj
        self.header_only = header_only
        self._pos = 0
        self._body: Any = None
        self._chunk = memoryview(b"")
        self._next_range = FIRST_RANGE
        self._failures = 0  # break-offs since a connection last got on
        self._since_open = 0  # bytes the current connection gave

    @property
    def position(self) -> int:
        """Bytes of the object read so far."""
        return self._pos

    def readable(self) -> bool:
        """Always."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` with the next bytes; 0 at the object's end.

        Raises:
            S3Error: a GET failed, or the stream broke off and could not be resumed.
        """
        view = memoryview(buffer).cast("B")
        if not len(view) or self._pos >= self.object.size:
            return 0
        n = self._from_ranges(view) if self.header_only else self._from_body(view)
        self._pos += n
        return n

    def _from_ranges(self, view: memoryview) -> int:
        if not self._chunk:
            data = self.object.get(self._pos, self._next_range)
            if not data:
                raise S3Error(
                    f"{self.object.url}: the object ended at byte {self._pos}, "
                    f"not at {self.object.size} as its HEAD said"
                )
            self._chunk = memoryview(data)
            self._next_range = min(2 * self._next_range, MAX_RANGE)
        n = min(len(view), len(self._chunk))
        view[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]
        return n

    def _from_body(self, view: memoryview) -> int:
        view = view[:STREAM_CHUNK]
        while True:
            if self._body is None:
                try:
                    self._body = self.object.body(self._pos)
                except S3Error as exc:
                    if not self._failures:
                        raise
                    # The break-off is what went wrong; the resume, why it stays so.
                    cause = describe_s3_error(
                        exc.__cause__ or exc, endpoint=endpoint_of(self.object.client)
                    )
                    raise S3Error(
                        f"{self.object.url}: the transfer broke off at byte {self._pos} of "
                        f"{self.object.size} and could not be resumed: {cause}"
                    ) from exc
                self._since_open = 0
            try:
                n = int(self._body.readinto(view))
            except _STREAM_ERRORS as exc:
                error: BaseException = exc
            else:
                if n:
                    self.object.count(n)
                    self._since_open += n
                    if self._since_open >= RESUMED_PROGRESS:
                        self._failures = 0  # this connection got on: a new budget
                    return n
                error = EOFError("the connection closed early")
            self._close_body()
            self._failures += 1
            if self._failures > RESUMES:
                raise S3Error(self.object.broke_off(self._pos, error)) from error

    def _close_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            # Closes the connection: an unfinished body is not drained to its end.
            body.close()

    def close(self) -> None:
        """Drop the GET in progress (idempotent)."""
        if not self.closed:
            self._close_body()
        super().close()


def open_stream(
    location: S3Location, endpoint: str | None = None, *, header_only: bool = False
) -> BinaryIO:
    """The object at ``location`` as a buffered binary stream (``peek`` included), as
    :func:`~nbdvma.vma.sources.open_source` opens a file.

    Raises:
        S3Error: no such key or bucket, wrong credentials, no endpoint there...
    """
    stream = S3Stream(S3Object.open(location, endpoint), header_only=header_only)
    return cast(BinaryIO, io.BufferedReader(stream, STREAM_CHUNK))
