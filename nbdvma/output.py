"""Where an archive being written goes: a file, a pipe, or ``s3://BUCKET/KEY``.

:func:`open_output` is the one place that tells them apart, beside the core's
:func:`~nbdvma.vma.sink.open_sink` (files and pipes), which must not know about object
storage (the core imports nothing outside itself).  boto3 is imported only when the
archive is an ``s3://`` URL.

:class:`UploadSink` is what a caller may ask of an archive that is being uploaded
(:class:`~nbdvma.s3.sink.S3Sink`) beyond the :class:`~nbdvma.vma.sink.Sink` protocol:
a failure to watch for, an interruption for Ctrl-C and SIGTERM, what is left after an
abort, and no FLUSH to offer.
"""

from __future__ import annotations

import contextlib
from typing import Protocol, runtime_checkable

from nbdvma.errors import S3Error
from nbdvma.s3.location import parse_s3_url
from nbdvma.vma.background import ThreadGuard
from nbdvma.vma.sink import Sink, open_sink
from nbdvma.vma.zstdframes import parse_compression

__all__ = ["UploadSink", "open_output"]


@runtime_checkable
class UploadSink(Sink, Protocol):
    """A sink that uploads (see the module docstring)."""

    #: ``s3://BUCKET/KEY``.
    url: str
    #: Bytes stored so far.
    size: int

    @property
    def failure(self) -> S3Error | None:
        """What failed the upload, if anything did."""

    def interrupt(self) -> None:
        """Make a call waiting for the endpoint raise at once (from any thread)."""

    @property
    def upload_state(self) -> str:
        """``open``, ``completed``, ``aborted`` or ``abandoned``."""


def open_output(
    archive: str,
    compress: str | None = None,
    *,
    force: bool = False,
    s3_endpoint: str | None = None,
    size_hint: int = 0,
    thread_guard: ThreadGuard = contextlib.nullcontext,
) -> Sink:
    """Open the output for an archive: ``s3://BUCKET/KEY`` or what
    :func:`~nbdvma.vma.sink.open_sink` takes (a path, ``-``, a FIFO).

    Args:
        archive: where the archive goes; a name ending in ``.zst`` compresses.
        compress: ``"zstd"``, ``"zstd:LEVEL"`` or ``None`` (inferred from ``.zst``).
        force: replace an archive that exists (at the end, never before).
        s3_endpoint: ``--s3-endpoint URL`` for an ``s3://`` archive.
        size_hint: about how large the archive may grow (an upload's part size).
        thread_guard: what helper threads are started inside.

    Raises:
        S3Error: an ``s3://`` archive that cannot be started (see
            :class:`~nbdvma.s3.sink.S3Sink`); an ``--s3-endpoint`` for a file.
        VmaWriterError: an unknown compression, or an archive that exists.
        OSError: the file cannot be created.
    """
    location = parse_s3_url(archive)
    if location is None:
        if s3_endpoint is not None:
            raise S3Error(f"--s3-endpoint is for s3:// archives, and {archive} is none")
        return open_sink(archive, compress, force=force, thread_guard=thread_guard)
    location.require_object()
    if compress is None and location.key.endswith(".zst"):
        compress = "zstd"
    parse_compression(compress)  # an unknown one is refused before anything is sent
    from nbdvma.s3.sink import S3Sink

    return S3Sink(
        location,
        compress=compress,
        force=force,
        endpoint=s3_endpoint,
        size_hint=size_hint,
        thread_guard=thread_guard,
    )
