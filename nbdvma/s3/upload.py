"""One multipart upload: parts sent by a few threads, completed or aborted, never left.

S3 makes an object visible only at CompleteMultipartUpload, so an archive being
written is an *incomplete upload*: nothing under its key until the end, and an abort
(AbortMultipartUpload) frees every part.  :class:`MultipartUpload` wraps one:

* parts are sent by ``concurrency`` daemon threads; :meth:`~MultipartUpload.submit`
  waits while that many are in flight (the memory bound), so the writer is slowed to
  the endpoint's pace instead of buffering without end;
* the first part that fails (after botocore's retries) fails the upload: its error
  is raised by every later call, and the caller aborts;
* :meth:`~MultipartUpload.interrupt` (any thread) makes a waiting caller raise at once
  (Ctrl-C, SIGTERM: the daemon threads never hold the process up);
* :meth:`~MultipartUpload.abort` waits (bounded) for the parts in flight, then aborts,
  retrying for :data:`ABORT_TIMEOUT` s while the endpoint does not answer, and says so.

nbdvma's uploads carry a *marker part*: part number :data:`MARKER_PART` (10000, the
last S3 allows), :data:`MARKER` bytes long, uploaded right after the upload is created
and never listed at completion (S3 drops parts a completion does not name).  S3 lists
no metadata of an incomplete upload, but ListParts shows a part's size and ETag (the
MD5 of its bytes): that is how :func:`list_uploads` tells nbdvma's leftovers from
other programs' without guessing.  The object metadata ``nbdvma-version`` marks the
finished archive.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import attrs

from nbdvma import __version__
from nbdvma.errors import S3Error
from nbdvma.s3.client import S3Client, call, error_code
from nbdvma.s3.location import S3Location
from nbdvma.vma.background import ThreadGuard

__all__ = [
    "ABORT_TIMEOUT",
    "MARKER",
    "MARKER_PART",
    "MAX_DATA_PARTS",
    "MultipartUpload",
    "Upload",
    "abort_upload",
    "list_uploads",
]

log = logging.getLogger(__name__)

#: The marker part's number: S3's last, so data parts are 1..9999.
MARKER_PART = 10000
MAX_DATA_PARTS = MARKER_PART - 1
#: The marker part's bytes (its ETag is their MD5).
MARKER = b"nbdvma multipart upload marker: never part of a completed object\n"
_MARKER_ETAG = f'"{hashlib.md5(MARKER).hexdigest()}"'
#: Seconds an abort is retried while the endpoint does not answer.
ABORT_TIMEOUT = 30.0
#: Seconds an abort waits for the parts on the wire before it is sent.
PART_GRACE = 5.0
#: Object metadata of every archive nbdvma writes (``x-amz-meta-nbdvma-version``).
METADATA_KEY = "nbdvma-version"


class MultipartUpload:
    """An incomplete upload to ``location``: parts in, one object out (or nothing)."""

    def __init__(
        self,
        client: S3Client,
        location: S3Location,
        upload_id: str,
        *,
        concurrency: int,
        control: S3Client | None = None,
        thread_guard: ThreadGuard = contextlib.nullcontext,
    ) -> None:
        """Wrap the upload ``upload_id`` (see :meth:`create`); start the threads.

        ``control``: the client for the abort, with a short read timeout and one
        attempt per request (:meth:`abort` retries itself, within its deadline);
        default ``client``.
        """
        self.client = client
        self.control = control or client
        self.location = location
        self.upload_id = upload_id
        self.concurrency = max(1, concurrency)
        #: Parts in flight at once (at most :attr:`concurrency`; lower for large parts).
        self.limit = self.concurrency
        self._cond = threading.Condition()
        self._jobs: deque[tuple[int, bytes | bytearray]] = deque()
        self._running = 0
        self._etags: dict[int, str] = {}
        self._error: S3Error | None = None
        self._closed = False
        self.state = "open"  # open -> completed | aborted | abandoned
        with thread_guard():
            self._threads = [
                threading.Thread(target=self._work, name=f"nbdvma-s3-{i}", daemon=True)
                for i in range(self.concurrency)
            ]
            for thread in self._threads:
                thread.start()

    @classmethod
    def create(
        cls,
        client: S3Client,
        location: S3Location,
        *,
        concurrency: int,
        control: S3Client | None = None,
        thread_guard: ThreadGuard = contextlib.nullcontext,
    ) -> MultipartUpload:
        """Start an upload to ``location`` (marked as nbdvma's).

        Raises:
            S3Error: the endpoint refused (the upload, if it was created, is aborted).
        """
        answer = call(
            client,
            "create_multipart_upload",
            location,
            Bucket=location.bucket,
            Key=location.key,
            ContentType="application/octet-stream",
            Metadata={METADATA_KEY: __version__},
        )
        upload = cls(
            client,
            location,
            answer["UploadId"],
            concurrency=concurrency,
            control=control,
            thread_guard=thread_guard,
        )
        try:
            upload._send(MARKER_PART, MARKER)
        except BaseException:
            upload.abort()
            raise
        return upload

    # -- parts ----------------------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        return {
            "Bucket": self.location.bucket,
            "Key": self.location.key,
            "UploadId": self.upload_id,
        }

    def _send(self, number: int, data: bytes | bytearray) -> str:
        params = self._params()
        answer = call(
            self.client, "upload_part", self.location, PartNumber=number, Body=data, **params
        )
        return str(answer["ETag"])

    def _work(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._jobs and not self._closed:
                    cond.wait()
                if self._closed:
                    return
                number, data = self._jobs.popleft()
                self._running += 1
            error: S3Error | None = None
            try:
                etag = self._send(number, data)
            except S3Error as exc:
                url = self.location.url
                error = S3Error(str(exc).replace(f"{url}: ", f"{url}: part {number}: ", 1))
            except Exception as exc:  # a bug or an unexpected botocore failure
                error = S3Error(f"{self.location.url}: part {number}: {exc!r}")
            del data  # the memory goes now, not when the next job comes
            with cond:
                self._running -= 1
                if error is not None:
                    self._error = self._error or error
                else:
                    self._etags[number] = etag
                cond.notify_all()

    def _check(self) -> None:
        if self._error is not None:
            raise S3Error(str(self._error))
        if self.state != "open":
            raise S3Error(f"{self.location.url}: the upload is {self.state}")

    def submit(self, number: int, data: bytes | bytearray) -> None:
        """Queue part ``number`` (1..9999); wait while :attr:`limit` parts are in
        flight.  ``data`` is the upload's from now on.

        Raises:
            S3Error: an earlier part failed, or the upload was interrupted.
        """
        if not 1 <= number <= MAX_DATA_PARTS:
            raise S3Error(
                f"{self.location.url}: the archive needs more than {MAX_DATA_PARTS} parts "
                "(S3's limit): it outgrew the part size chosen for it"
            )
        with self._cond:
            while True:
                self._check()
                if len(self._jobs) + self._running < self.limit:
                    break
                self._cond.wait()
            self._jobs.append((number, data))
            self._cond.notify_all()

    def wait(self) -> None:
        """Return once every part submitted is uploaded.

        Raises:
            S3Error: a part failed, or the upload was interrupted.
        """
        with self._cond:
            while True:
                self._check()
                if not self._jobs and not self._running:
                    return
                self._cond.wait()

    def interrupt(self) -> None:
        """Make every waiting and later call raise (from any thread); the parts in
        flight end on their own.  For Ctrl-C and SIGTERM: :meth:`abort` follows."""
        with self._cond:
            if self.state == "open" and self._error is None:
                self._error = S3Error(f"{self.location.url}: the upload was interrupted")
            self._cond.notify_all()

    @property
    def failure(self) -> S3Error | None:
        """The error that failed the upload (a part, or :meth:`interrupt`), if any."""
        return self._error

    # -- the end --------------------------------------------------------------------------

    def complete(self, first: bytes | bytearray) -> None:
        """Upload ``first`` as part 1 (the header's part, kept until now), wait for the
        others, and complete: the object appears under the key, whole.

        Raises:
            S3Error: a part or the completion failed (the caller aborts).
        """
        self.submit(1, first)
        self.wait()
        parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in sorted(self._etags)]
        call(
            self.client,
            "complete_multipart_upload",
            self.location,
            MultipartUpload={"Parts": parts},
            **self._params(),
        )
        self.state = "completed"
        self._stop()

    def _stop(self) -> None:
        with self._cond:
            self._closed = True
            self._jobs.clear()
            self._cond.notify_all()

    def abort(self, timeout: float = ABORT_TIMEOUT) -> bool:
        """Abort the upload (idempotent; nothing after :meth:`complete`).

        Parts still on the wire are given :data:`PART_GRACE` s to end (a part that
        lands after the abort could keep storage on some stores); the abort is then
        sent, and retried while the endpoint does not answer, with a warning that says
        so, for ``timeout`` s in all; once the last part in flight has ended it is sent
        again.  Every request has a short deadline (the ``control`` client).

        Returns:
            Whether the upload is gone (``False``: a warning says how to remove it).
        """
        if self.state in ("completed", "aborted"):
            return True
        self._stop()
        deadline = time.monotonic() + timeout
        self._wait_idle(min(deadline, time.monotonic() + PART_GRACE))
        if not self._abort_until(deadline, timeout):
            return False
        if self._running:
            self._wait_idle(deadline)
            self._abort_until(deadline, timeout)
        return True

    def _wait_idle(self, until: float) -> None:
        with self._cond:
            while self._running and time.monotonic() < until:
                self._cond.wait(until - time.monotonic())

    def _abort_until(self, deadline: float, timeout: float) -> bool:
        warned = False
        delay = 0.5
        location = self.location
        while True:
            try:
                abort_upload(self.control, location.bucket, location.key, self.upload_id)
            except S3Error as exc:
                if time.monotonic() + delay > deadline:
                    self.state = "abandoned"
                    log.warning(
                        f"{exc}; the incomplete upload {self.upload_id} is left: remove it "
                        f"with `nbdvma s3-uploads --abort {location.url}` (or let the "
                        "bucket's AbortIncompleteMultipartUpload rule do it)"
                    )
                    return False
                if not warned:
                    log.warning(f"{exc}; retrying the abort of the upload for up to {timeout:g}s")
                    warned = True
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if warned:
                log.warning(f"{location.url}: the incomplete upload is aborted")
            self.state = "aborted"
            return True


def abort_upload(client: S3Client, bucket: str, key: str, upload_id: str) -> None:
    """AbortMultipartUpload; an upload already gone (NoSuchUpload) counts as aborted.

    Raises:
        S3Error: the endpoint refused or did not answer.
    """
    location = S3Location(bucket, key)
    try:
        call(client, "abort_multipart_upload", location, Bucket=bucket, Key=key, UploadId=upload_id)
    except S3Error as exc:
        if error_code(exc) not in ("NoSuchUpload", "404"):
            raise


@attrs.frozen
class Upload:
    """An incomplete multipart upload, as :func:`list_uploads` finds it."""

    key: str
    upload_id: str
    initiated: str
    #: Whether it carries nbdvma's marker part.
    ours: bool


def list_uploads(client: S3Client, prefix: S3Location) -> Iterator[Upload]:
    """The incomplete multipart uploads under ``prefix`` (its key as a key prefix), in
    S3's order, each checked for nbdvma's marker part.

    Raises:
        S3Error: the endpoint refused or did not answer.
    """
    params: dict[str, Any] = {"Bucket": prefix.bucket, "Prefix": prefix.key}
    while True:
        answer = call(client, "list_multipart_uploads", prefix, **params)
        for item in answer.get("Uploads", []):
            key, upload_id = item["Key"], item["UploadId"]
            initiated = item.get("Initiated")
            when = initiated.isoformat(timespec="seconds") if initiated is not None else "?"
            ours = _marked(client, S3Location(prefix.bucket, key), upload_id)
            yield Upload(key, upload_id, when, ours)
        if not answer.get("IsTruncated"):
            return
        params["KeyMarker"] = answer.get("NextKeyMarker", "")
        params["UploadIdMarker"] = answer.get("NextUploadIdMarker", "")


def _marked(client: S3Client, location: S3Location, upload_id: str) -> bool:
    """Whether the upload holds nbdvma's marker part."""
    try:
        answer = call(
            client,
            "list_parts",
            location,
            Bucket=location.bucket,
            Key=location.key,
            UploadId=upload_id,
            PartNumberMarker=MARKER_PART - 1,
        )
    except S3Error as exc:
        if error_code(exc) in ("NoSuchUpload", "404"):
            return False  # gone meanwhile
        raise
    return any(
        p["PartNumber"] == MARKER_PART and p["Size"] == len(MARKER) and p["ETag"] == _MARKER_ETAG
        for p in answer.get("Parts", [])
    )
