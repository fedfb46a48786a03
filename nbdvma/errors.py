"""The exception hierarchy of nbdvma, and the one place that maps failures to errno values.

Two families, after h11: errors in bytes that came from outside (a peer's NBD
request, an archive on disk) and errors in how the local code used an API or hit a
limit.  The NBD server turns any exception raised while serving a request into an
NBD error value with :func:`errno_for_exception`, so that ``ENOSPC`` from the disk
reaches the client as ``NBD_ENOSPC`` and anything unexpected as ``NBD_EIO``.
"""

from __future__ import annotations

import errno

__all__ = [
    "ClusterConflictError",
    "LocalProtocolError",
    "NbdvmaError",
    "PartialBufferFullError",
    "RemoteProtocolError",
    "ToolError",
    "VmaFormatError",
    "VmaWriterError",
    "errno_for_exception",
]


class NbdvmaError(Exception):
    """Base class of every error nbdvma raises on purpose."""

    #: The errno an NBD reply should carry for this error.
    errno: int = errno.EIO


class VmaFormatError(NbdvmaError):
    """An archive violates the VMA format (the reader's rejections, format doc §7).

    The message is the one Proxmox's ``vma`` prints where there is one
    (``wrong vma extent header chechsum`` [sic], ...), so that errors can be compared.
    """


class VmaWriterError(NbdvmaError):
    """The writer was asked for something it must refuse (a limit, a bad argument,
    a call in the wrong state)."""

    errno = errno.EINVAL


class ClusterConflictError(VmaWriterError):
    """A write would change a cluster that is already in the archive.

    Every cluster is stored exactly once, so such a write cannot be honoured.  A
    rewrite with identical bytes (a client replaying after a reconnect) is not an
    error; only a differing one is.
    """

    errno = errno.EIO


class PartialBufferFullError(VmaWriterError):
    """Accepting a write would buffer more partial-cluster bytes than the bound."""

    errno = errno.ENOMEM


class RemoteProtocolError(NbdvmaError):
    """The NBD peer broke the protocol in a way that ends the connection."""


class LocalProtocolError(NbdvmaError):
    """Our own code used the NBD protocol core in a way the protocol does not allow."""


class ToolError(NbdvmaError):
    """An archive command failed: ``message`` is the line for stderr, ``status`` the
    exit code (1, or 255 where ``vma`` uses it)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def errno_for_exception(exc: BaseException) -> int:
    """Return the errno that an NBD reply should carry for ``exc``.

    ``OSError`` keeps its errno when it is one the NBD protocol can express
    (``EDQUOT`` and ``EFBIG`` become ``ENOSPC``, as the spec asks); our own errors
    carry theirs; anything else is ``EIO``.

    Args:
        exc: the exception raised while a request was served.

    Returns:
        One of ``EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN``.
    """
    if isinstance(exc, NbdvmaError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return errno.ENOSPC
        if exc.errno in (
            errno.EPERM,
            errno.EIO,
            errno.ENOMEM,
            errno.EINVAL,
            errno.EOVERFLOW,
            errno.ENOTSUP,
            errno.ESHUTDOWN,
        ):
            return exc.errno
        if exc.errno == errno.EACCES or exc.errno == errno.EROFS:
            return errno.EPERM
    if isinstance(exc, MemoryError):
        return errno.ENOMEM
    return errno.EIO
