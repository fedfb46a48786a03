"""``list``, ``config`` and ``verify``: the commands that read an archive and write nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TextIO

from nbdvma.errors import ToolError, VmaFormatError
from nbdvma.interrupts import deferred
from nbdvma.tools.common import Progress, digest_line, open_reader
from nbdvma.vma.digest import DataDigest
from nbdvma.vma.format import VMA_BLOCK_SIZE, VMA_MAX_DEVICES
from nbdvma.vma.reader import Cluster, VmaReader

__all__ = ["DEFAULT_CONFIG", "list_archive", "print_config", "verify_archive"]

#: The config ``vma config`` prints when no ``-c`` is given.
DEFAULT_CONFIG = "qemu-server.conf"
_ZERO_BLOCK = bytes(VMA_BLOCK_SIZE)


def _signed64(value: int) -> int:
    """How C's ``%zd`` prints a u64."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _content_lines(reader: VmaReader) -> Iterator[str]:
    """``vma list`` output (print_content in vma.c)."""
    head = reader.header
    for name, data in head.configs:
        yield f"CFG: size: {len(data)} name: {name}\n"
    for dev in head.devices:
        if dev.dev_id > VMA_MAX_DEVICES:
            continue
        if dev.is_vmstate:
            yield f"VMSTATE: dev_id={dev.dev_id} memory: {_signed64(dev.size)}\n"
        else:
            yield f"DEV: dev_id={dev.dev_id} size: {_signed64(dev.size)} devname: {dev.name}\n"
    try:
        ctime = time.ctime(head.ctime) + "\n"
    except (OverflowError, OSError, ValueError):
        ctime = "(null)\n"  # glibc's ctime() returns NULL, printf prints "(null)"
    yield f"CTIME: {ctime}"


def list_archive(path: str, out: TextIO, *, s3_endpoint: str | None = None) -> None:
    """``vma list``: print the configs, devices and ctime of the archive header.

    ``path`` may be ``s3://BUCKET/KEY`` (then only the header is fetched; read with
    ``s3_endpoint``, or the environment's endpoint).

    Raises:
        ToolError: the file cannot be opened or its header is invalid.
        S3Error: the object cannot be read.
    """
    with open_reader(path, s3_endpoint=s3_endpoint, header_only=True) as reader:
        out.writelines(_content_lines(reader))


def print_config(path: str, name: str, out: TextIO, *, s3_endpoint: str | None = None) -> None:
    """``vma config``: write the raw data of the first config called ``name``.

    ``path`` may be ``s3://BUCKET/KEY``, as for :func:`list_archive`.

    Raises:
        ToolError: status 255 if there is no such config (as ``vma``).
        S3Error: the object cannot be read.
    """
    with open_reader(path, s3_endpoint=s3_endpoint, header_only=True) as reader:
        pass  # the header is all it needs
    data = reader.header.config(name)
    if data is None:
        raise ToolError(f"unable to find configuration data '{name}'", 255)
    out.flush()
    out.buffer.write(data)
    out.buffer.flush()


def _strict_check(cluster: Cluster) -> None:
    """``verify --strict``: what the C writer never produces.

    VM-state clusters are exempt: they must be stored whole, zero blocks included,
    or Proxmox's reader would drop those blocks from the stream (vma-format.md §6).
    """
    if cluster.dev.is_vmstate:
        return
    data = cluster.data
    for i in range(0, len(data), VMA_BLOCK_SIZE):
        if data[i : i + VMA_BLOCK_SIZE] == _ZERO_BLOCK:
            raise VmaFormatError(
                f"stored zero block in cluster {cluster.cluster} of stream {cluster.dev.name}"
            )


def verify_archive(
    path: str,
    out: TextIO,
    *,
    verbose: bool = False,
    strict: bool = False,
    s3_endpoint: str | None = None,
) -> None:
    """``vma verify``: read the whole archive and apply every check.

    Unlike ``vma verify``, missing clusters (S15, which only ``vma extract`` checks)
    fail verification too: such an archive cannot be restored, and it is what an
    interrupted backup leaves as ``ARCHIVE.part``.  And it checks the data: where the
    header carries nbdvma's data digest, the extents must match it; it prints one
    line that says whether they did or that the archive has no digest.

    Args:
        path: the archive, ``-`` for stdin, ``s3://BUCKET/KEY`` for an object (streamed
            with one GET from ``s3_endpoint``, or the environment's endpoint).
        out: where ``-v`` output goes.
        verbose: print the list output, progress and totals.
        strict: also reject what the C writer never writes but the reader accepts:
            stored all-zero blocks and data past a disk's end.

    Raises:
        ToolError: ``verify failed - <reason>``.
        S3Error: the object cannot be read (one line that names it).
    """
    with open_reader(path, thread_guard=deferred, s3_endpoint=s3_endpoint) as reader:
        try:
            digest = _verify(reader, out if verbose else None, strict=strict)
        except VmaFormatError as exc:
            raise ToolError(f"verify failed - {exc}") from exc
    out.write(digest_line(digest))


def _verify(reader: VmaReader, out: TextIO | None, *, strict: bool) -> DataDigest | None:
    """Read every extent, then check what only the whole archive shows."""
    if out is not None:
        out.writelines(_content_lines(reader))
        out.flush()
    disks = [d for d in reader.header.devices if d.dev_id <= VMA_MAX_DEVICES]
    progress = Progress(reader, [d for d in disks if not d.is_vmstate], out)
    for extent in reader.extents():
        if strict:
            for cluster in extent:
                _strict_check(cluster)
        progress.update(len(extent))
    # First: a cut archive is named as such, not by the first cluster it lacks.
    digest = reader.check_digest()
    try:
        reader.check_missing()
    except VmaFormatError as exc:
        raise VmaFormatError(f"{exc} - the archive is incomplete") from None
    if strict:
        for dev_id, count in sorted(reader.stats.past_end.items()):
            dev = reader.device(dev_id)
            name = dev.name if dev is not None else str(dev_id)
            raise VmaFormatError(f"{count} cluster(s) of stream {name} store data past its end")
    progress.totals()
    return digest
