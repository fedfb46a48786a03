"""Numbers of the NBD protocol, named as in the spec (``doc/proto.md``) and in
nbdkit's ``nbd-protocol.h``, so that a grep for ``NBD_OPT_GO`` works across projects.

Only what the server side needs is here; extended headers are listed for
reference (we answer ``NBD_OPT_EXTENDED_HEADERS`` with ``NBD_REP_ERR_UNSUP``).
"""

from __future__ import annotations

import enum

from nbdvma.errors import nbd_errno_name

__all__ = [
    "BASE_ALLOCATION",
    "BASE_ALLOCATION_CONTEXT_ID",
    "DEFAULT_MAX_PAYLOAD",
    "EXPORT_NAME_PADDING",
    "IHAVEOPT",
    "MAX_EXTENTS",
    "MAX_STRING_LENGTH",
    "NBDMAGIC",
    "NBD_EXTENDED_REPLY_MAGIC",
    "NBD_EXTENDED_REQUEST_MAGIC",
    "NBD_OPT_REPLY_MAGIC",
    "NBD_REQUEST_MAGIC",
    "NBD_SIMPLE_REPLY_MAGIC",
    "NBD_STRUCTURED_REPLY_MAGIC",
    "NbdClientFlag",
    "NbdCmdFlag",
    "NbdCommand",
    "NbdError",
    "NbdHandshakeFlag",
    "NbdInfo",
    "NbdOption",
    "NbdRep",
    "NbdReplyFlag",
    "NbdReplyType",
    "NbdStateFlag",
    "NbdTransmissionFlag",
    "nbd_error_from_errno",
]

#: "NBDMAGIC", the first 8 bytes of the greeting (a.k.a. INIT_PASSWD).
NBDMAGIC = 0x4E42444D41474943
#: "IHAVEOPT": second 8 bytes of the greeting, and the magic of every option request.
IHAVEOPT = 0x49484156454F5054
#: Magic of every option reply.
NBD_OPT_REPLY_MAGIC = 0x0003E889045565A9
#: Magic of a (compact, 28-byte) transmission request.
NBD_REQUEST_MAGIC = 0x25609513
#: Magic of a simple (16-byte) reply.
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
#: Magic of a structured reply chunk (20-byte header).
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF
#: Extended-header magics (not implemented; for reference and for error messages).
NBD_EXTENDED_REQUEST_MAGIC = 0x21E41C71
NBD_EXTENDED_REPLY_MAGIC = 0x6E8A278C

#: Zero bytes after the NBD_OPT_EXPORT_NAME reply unless both sides set NO_ZEROES.
EXPORT_NAME_PADDING = 124
#: Strings (names, queries, messages) MUST be at most this many bytes [SPEC "Conventions"].
MAX_STRING_LENGTH = 4096
#: At most this many extents in one BLOCK_STATUS chunk [SPEC].
MAX_EXTENTS = 1 << 20
#: Maximum payload a server SHOULD accept when it advertised none (32 MiB).
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024

#: The one metadata context we offer, and the id we give it on SET_META_CONTEXT.
BASE_ALLOCATION = b"base:allocation"
BASE_ALLOCATION_CONTEXT_ID = 1


class NbdHandshakeFlag(enum.IntFlag):
    """Handshake flags the server sends in the greeting (u16)."""

    NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
    NBD_FLAG_NO_ZEROES = 1 << 1


class NbdClientFlag(enum.IntFlag):
    """Client flags (u32) sent in reply to the greeting."""

    NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
    NBD_FLAG_C_NO_ZEROES = 1 << 1


class NbdOption(enum.IntEnum):
    """Option numbers (``NBD_OPT_*``)."""

    NBD_OPT_EXPORT_NAME = 1
    NBD_OPT_ABORT = 2
    NBD_OPT_LIST = 3
    NBD_OPT_PEEK_EXPORT = 4  # withdrawn
    NBD_OPT_STARTTLS = 5
    NBD_OPT_INFO = 6
    NBD_OPT_GO = 7
    NBD_OPT_STRUCTURED_REPLY = 8
    NBD_OPT_LIST_META_CONTEXT = 9
    NBD_OPT_SET_META_CONTEXT = 10
    NBD_OPT_EXTENDED_HEADERS = 11


_ERR = 1 << 31


class NbdRep(enum.IntEnum):
    """Option reply types (``NBD_REP_*``); errors have bit 31 set."""

    NBD_REP_ACK = 1
    NBD_REP_SERVER = 2
    NBD_REP_INFO = 3
    NBD_REP_META_CONTEXT = 4
    NBD_REP_ERR_UNSUP = _ERR + 1
    NBD_REP_ERR_POLICY = _ERR + 2
    NBD_REP_ERR_INVALID = _ERR + 3
    NBD_REP_ERR_PLATFORM = _ERR + 4
    NBD_REP_ERR_TLS_REQD = _ERR + 5
    NBD_REP_ERR_UNKNOWN = _ERR + 6
    NBD_REP_ERR_SHUTDOWN = _ERR + 7
    NBD_REP_ERR_BLOCK_SIZE_REQD = _ERR + 8
    NBD_REP_ERR_TOO_BIG = _ERR + 9
    NBD_REP_ERR_EXT_HEADER_REQD = _ERR + 10


class NbdInfo(enum.IntEnum):
    """Information types inside ``NBD_REP_INFO`` (``NBD_INFO_*``)."""

    NBD_INFO_EXPORT = 0
    NBD_INFO_NAME = 1
    NBD_INFO_DESCRIPTION = 2
    NBD_INFO_BLOCK_SIZE = 3


class NbdTransmissionFlag(enum.IntFlag):
    """Transmission flags (u16) of an export."""

    NBD_FLAG_HAS_FLAGS = 1 << 0
    NBD_FLAG_READ_ONLY = 1 << 1
    NBD_FLAG_SEND_FLUSH = 1 << 2
    NBD_FLAG_SEND_FUA = 1 << 3
    NBD_FLAG_ROTATIONAL = 1 << 4
    NBD_FLAG_SEND_TRIM = 1 << 5
    NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
    NBD_FLAG_SEND_DF = 1 << 7
    NBD_FLAG_CAN_MULTI_CONN = 1 << 8
    NBD_FLAG_SEND_RESIZE = 1 << 9
    NBD_FLAG_SEND_CACHE = 1 << 10
    NBD_FLAG_SEND_FAST_ZERO = 1 << 11
    NBD_FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12


class NbdCommand(enum.IntEnum):
    """Request types (``NBD_CMD_*``) this server understands."""

    NBD_CMD_READ = 0
    NBD_CMD_WRITE = 1
    NBD_CMD_DISC = 2
    NBD_CMD_FLUSH = 3
    NBD_CMD_TRIM = 4
    NBD_CMD_CACHE = 5
    NBD_CMD_WRITE_ZEROES = 6
    NBD_CMD_BLOCK_STATUS = 7


class NbdCmdFlag(enum.IntFlag):
    """Command flags (u16) of a request (``NBD_CMD_FLAG_*``)."""

    NBD_CMD_FLAG_FUA = 1 << 0
    NBD_CMD_FLAG_NO_HOLE = 1 << 1
    NBD_CMD_FLAG_DF = 1 << 2
    NBD_CMD_FLAG_REQ_ONE = 1 << 3
    NBD_CMD_FLAG_FAST_ZERO = 1 << 4
    NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5  # extended headers only: never valid here


class NbdReplyFlag(enum.IntFlag):
    """Flags (u16) of a structured reply chunk."""

    NBD_REPLY_FLAG_DONE = 1 << 0


class NbdReplyType(enum.IntEnum):
    """Structured reply chunk types (``NBD_REPLY_TYPE_*``)."""

    NBD_REPLY_TYPE_NONE = 0
    NBD_REPLY_TYPE_OFFSET_DATA = 1
    NBD_REPLY_TYPE_OFFSET_HOLE = 2
    NBD_REPLY_TYPE_BLOCK_STATUS = 5
    NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6
    NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
    NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2


class NbdError(enum.IntEnum):
    """The only error values allowed on the wire (they equal Linux's errno values)."""

    NBD_EPERM = 1
    NBD_EIO = 5
    NBD_ENOMEM = 12
    NBD_EINVAL = 22
    NBD_ENOSPC = 28
    NBD_EOVERFLOW = 75
    NBD_ENOTSUP = 95
    NBD_ESHUTDOWN = 108


class NbdStateFlag(enum.IntFlag):
    """Extent flags of the ``base:allocation`` metadata context."""

    NBD_STATE_HOLE = 1 << 0
    NBD_STATE_ZERO = 1 << 1


def nbd_error_from_errno(err: int) -> NbdError:
    """Map a host ``errno`` value to the NBD error value that goes on the wire.

    The mapping is the one errno table, :data:`nbdvma.errors.NBD_ERRNO_NAMES`.

    Args:
        err: an ``errno`` value (nonzero), e.g. from
            :func:`nbdvma.errors.errno_for_exception`.

    Returns:
        The NBD error; ``EDQUOT``/``EFBIG`` become ``NBD_ENOSPC``, ``EACCES``/``EROFS``
        ``NBD_EPERM``, and anything the protocol cannot express ``NBD_EIO``.
    """
    return NbdError[f"NBD_{nbd_errno_name(err)}"]
