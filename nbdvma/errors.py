"""The exception hierarchy of nbdvma, and the one place that maps failures to errno values.

Two families, after h11: errors in bytes that came from outside (a peer's NBD
request, an archive on disk) and errors in how the local code used an API or hit a
limit.  The NBD server turns any exception raised while serving a request into an
NBD error value with :func:`errno_for_exception`, so that ``ENOSPC`` from the disk
reaches the client as ``NBD_ENOSPC`` and anything unexpected as ``NBD_EIO``.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import Final

__all__ = [
    "NBD_ERRNO_NAMES",
    "ActivationError",
    "AddressError",
    "BackupError",
    "ClusterConflictError",
    "DataDigestError",
    "ListenError",
    "LocalProtocolError",
    "NbdvmaError",
    "PartialBufferFullError",
    "PidFileError",
    "QmpConnectError",
    "QmpConnectionClosed",
    "QmpError",
    "QmpEventOverflow",
    "QmpTimeout",
    "RemoteProtocolError",
    "S3Error",
    "S3UrlError",
    "TlsError",
    "ToolError",
    "UnindexableArchiveError",
    "VmaFormatError",
    "VmaWriterError",
    "errno_for_exception",
    "nbd_errno_name",
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


class DataDigestError(VmaFormatError):
    """An archive's extents do not match the data digest its header records, or the
    digest is still the placeholder of an archive that was never finished
    (:mod:`nbdvma.vma.digest`)."""


class UnindexableArchiveError(NbdvmaError):
    """An archive's extents cannot be read in place: a compressed archive that is not
    one zstd frame per unit (vzdump's or the ``zstd`` CLI's single stream).  It can
    still be served once decompressed into a plain file."""


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


# -- the shell around the cores: addresses, listeners, TLS, QMP, backup ----------------


class AddressError(NbdvmaError, ValueError):
    """A string is not a valid ``unix:PATH`` or ``tcp:HOST:PORT`` address.

    It is a :class:`ValueError` too, so that ``argparse`` reports it as a bad option
    value when :func:`nbdvma.addresses.parse_address` is used as an option's ``type``.
    """


class ListenError(NbdvmaError):
    """A listener cannot be opened (address in use, a non-socket file in the way...)."""


class ActivationError(ListenError):
    """The sockets systemd passes (``LISTEN_PID``/``LISTEN_FDS``) cannot be used: a
    malformed variable, or an fd that is not a listening stream socket."""


class PidFileError(NbdvmaError):
    """The ``--pid-file`` cannot be written."""


class TlsError(NbdvmaError):
    """The TLS options are inconsistent, or a certificate, key or CA cannot be loaded."""


class QmpError(NbdvmaError):
    """QEMU answered a command with an error.

    Attributes:
        error_class: QEMU's error class, e.g. ``"GenericError"``, ``"CommandNotFound"``,
            ``"DeviceNotFound"``.
        desc: QEMU's human-readable description.
        command: the command that failed, when known.
    """

    def __init__(self, error_class: str, desc: str, command: str | None = None) -> None:
        self.error_class = error_class
        self.desc = desc
        self.command = command
        where = f"{command}: " if command else ""
        super().__init__(f"{where}{error_class}: {desc}")


class QmpConnectionClosed(NbdvmaError):
    """The QMP connection is gone: QEMU exited, closed the socket or spoke something other
    than QMP.  The message says which."""


class QmpConnectError(NbdvmaError):
    """QEMU's QMP socket could not be connected (no such socket, refused, no
    permission); the message names the address and the reason."""


class QmpTimeout(NbdvmaError):
    """A command's answer or an awaited event did not come before the deadline."""


class QmpEventOverflow(NbdvmaError):
    """Events were dropped from the buffer before a lagging cursor looked at them."""


class BackupError(NbdvmaError):
    """The backup cannot go on; the message is the one line the user sees."""


class S3Error(NbdvmaError):
    """Object storage refused or failed a request (wrong credentials, no such bucket,
    an endpoint that does not answer...), or an ``s3://`` archive cannot be written as
    asked.  The message is the one line the user sees: it names the bucket, key or
    endpoint and the cause, never a secret (:mod:`nbdvma.s3.client`)."""


class S3UrlError(S3Error, ValueError):
    """A string is not a valid ``s3://BUCKET/KEY`` URL (no bucket, a bucket name S3
    refuses, a key that is too long...).

    It is a :class:`ValueError` too, like :class:`AddressError`, so that ``argparse``
    can report it as a bad argument.
    """


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


#: The one errno table: a host ``errno`` -> the name of the error an NBD reply carries
#: for it.  The spec allows only these eight values (their numbers are Linux's, so the
#: table goes by name); a write to a read-only export is EPERM, a full disk ENOSPC,
#: anything the protocol cannot express EIO (see :func:`nbd_errno_name`).
NBD_ERRNO_NAMES: Final[Mapping[int, str]] = {
    errno.EPERM: "EPERM",
    errno.EACCES: "EPERM",
    errno.EROFS: "EPERM",
    errno.EIO: "EIO",
    errno.ENOMEM: "ENOMEM",
    errno.EINVAL: "EINVAL",
    errno.ENOSPC: "ENOSPC",
    errno.EDQUOT: "ENOSPC",
    errno.EFBIG: "ENOSPC",
    errno.EOVERFLOW: "EOVERFLOW",
    errno.ENOTSUP: "ENOTSUP",
    errno.EOPNOTSUPP: "ENOTSUP",
    errno.ESHUTDOWN: "ESHUTDOWN",
}


def nbd_errno_name(err: int) -> str:
    """Name the NBD error that a reply carries for the host ``errno`` value ``err``.

    Args:
        err: a host ``errno`` value.

    Returns:
        One of ``EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN``
        (``EIO`` for anything not in :data:`NBD_ERRNO_NAMES`).
    """
    return NBD_ERRNO_NAMES.get(err, "EIO")


def errno_for_exception(exc: BaseException) -> int:
    """Return the errno that an NBD reply should carry for ``exc``.

    ``OSError`` and our own errors keep their errno, mapped through
    :data:`NBD_ERRNO_NAMES` to one the NBD protocol can express (``EDQUOT`` and
    ``EFBIG`` become ``ENOSPC``, ``EACCES`` and ``EROFS`` ``EPERM``); ``MemoryError``
    is ``ENOMEM``; anything else is ``EIO``.

    Args:
        exc: the exception raised while a request was served.

    Returns:
        One of ``EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN``.
    """
    if isinstance(exc, NbdvmaError):
        err: int | None = exc.errno
    elif isinstance(exc, OSError):
        err = exc.errno
    elif isinstance(exc, MemoryError):
        err = errno.ENOMEM
    else:
        err = None
    if err is None:
        return errno.EIO
    return int(getattr(errno, nbd_errno_name(err)))
