"""An indexed archive in object storage: ``export`` and ``restore`` of ``s3://BUCKET/KEY``.

The index pass streams the object once, with one GET (:class:`~nbdvma.s3.source.S3Stream`),
through :func:`~nbdvma.vma.index.build_index`: the same checks as for a file, the same
index.  Reads are then ranged GETs of the same object (the ETag it had when it was
indexed: a replaced object is an error, never a mix), through the cache of
:class:`~nbdvma.vma.index.IndexedArchive`:

* an nbdvma ``.vma.zst`` (one zstd frame per extent): a read fetches the whole frames
  it needs (the frame table of the index says where each lies) and decompresses them;
* a plain ``.vma``: a read fetches the aligned :data:`PIECE` bytes around it.

At most :data:`LOADERS` GETs run at once and :data:`CACHE` pieces stay cached, so the
memory of the reads is bounded by ``(CACHE + LOADERS) * 4 MiB`` (48 MiB), whatever the
archive's size and however many reads the clients send.  Other archives (vzdump's
single-stream ``.vma.zst``, ``.vma.gz``, ``.vma.lzo``) cannot be read at an offset:
:func:`~nbdvma.archive_backend.open_archive` decompresses them into a local file.

No read can be answered without a request to the endpoint, so
:meth:`~S3IndexedArchive.read_now` is always ``None``: every read goes to a worker
thread.
"""

from __future__ import annotations

import errno
import io
from collections.abc import Callable, Collection

from nbdvma.errors import UnindexableArchiveError
from nbdvma.s3.source import STREAM_CHUNK, S3Object, S3Stream
from nbdvma.tools.common import LZOP_MAGIC
from nbdvma.vma.index import ArchiveIndex, IndexedArchive, Piece, VmstateWriter, build_index
from nbdvma.vma.sources import GZIP_MAGIC

__all__ = ["CACHE", "LOADERS", "PIECE", "S3IndexedArchive", "index_object"]

#: Bytes of a plain archive one GET fetches (aligned): a few round trips per extent
#: for a client that reads a disk in order, little waste for one that reads 4 KiB.
PIECE = 4 << 20
#: Pieces (plain) or decompressed frames (``.vma.zst``) kept.
CACHE = 8
#: GETs at once.
LOADERS = 4


class S3IndexedArchive(IndexedArchive):
    """Reads of an archive object's disks by ranged GETs, safe from many threads."""

    cache_size = CACHE
    loaders = LOADERS

    def __init__(self, obj: S3Object, index: ArchiveIndex) -> None:
        """Read ``obj`` (the object ``index`` was built from)."""
        self.object = obj
        self._fd = -1
        self._nowait = None  # no read is ever answered without a request
        self._start(index)

    def close(self) -> None:
        """Close the client's connections (idempotent)."""
        self.object.client.close()

    def _fetch(self, offset: int, length: int) -> Piece:
        data = self.object.get(offset, length)  # a bytearray: zstd takes any buffer
        if len(data) != length:
            raise OSError(errno.EIO, f"{self.object.url} is shorter than when it was indexed")
        return data

    def _pread_into(self, view: memoryview, offset: int) -> None:
        """A plain archive's bytes at ``offset``, from the cached pieces."""
        while len(view):
            piece = offset // PIECE
            start = piece * PIECE

            def load(start: int = start) -> Piece:
                return self.object.get(start, PIECE)  # a bytearray, kept as it is

            content = memoryview(self._cached(piece, load))
            data = content[offset - start : offset - start + len(view)]
            if not data:
                raise OSError(errno.EIO, f"{self.object.url} is shorter than when it was indexed")
            view[: len(data)] = data
            view, offset = view[len(data) :], offset + len(data)


def index_object(
    obj: S3Object,
    *,
    devices: Collection[str] | None = None,
    progress: Callable[[int], None] = lambda done: None,
    vmstate: VmstateWriter | None = None,
) -> S3IndexedArchive:
    """Stream ``obj`` once, check and index it (see
    :func:`~nbdvma.vma.index.build_index` for the arguments and the checks).

    Raises:
        S3Error: a GET failed.
        VmaFormatError: the archive is damaged or incomplete.
        UnindexableArchiveError: not a plain or an nbdvma ``.vma.zst`` archive (gzip,
            lzo, one zstd stream): it must be decompressed first.
    """
    stream = io.BufferedReader(S3Stream(obj), STREAM_CHUNK)
    try:
        head = stream.peek(len(LZOP_MAGIC))[: len(LZOP_MAGIC)]
    except BaseException:
        stream.close()
        raise
    for kind, magic in (("gzip", GZIP_MAGIC), ("lzo", LZOP_MAGIC)):
        if head.startswith(magic):
            stream.close()
            raise UnindexableArchiveError(f"the archive is {kind}-compressed")
    index = build_index(stream, devices=devices, progress=progress, vmstate=vmstate)
    return S3IndexedArchive(obj, index)
