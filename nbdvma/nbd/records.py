"""What a server offers and how a connection is limited: records the I/O layer builds.

:class:`ExportInfo` is one export as the protocol core sees it (its name, size,
:class:`Capabilities` and block sizes); :class:`Limits` are a connection's denial-of-service
limits and :class:`TlsMode` the spec's TLS modes.  All are frozen values; parsing
and state live elsewhere (:mod:`.handshake`, :mod:`.transmission`).
"""

from __future__ import annotations

import enum

import attrs

from .constants import DEFAULT_MAX_PAYLOAD, MAX_STRING_LENGTH, NbdTransmissionFlag

__all__ = ["Capabilities", "ExportInfo", "Limits", "TlsMode"]

_KiB = 1024
_MiB = 1024 * 1024


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class TlsMode(enum.Enum):
    """How the server treats ``NBD_OPT_STARTTLS`` (the spec's TLS modes)."""

    #: NOTLS: STARTTLS is answered NBD_REP_ERR_UNSUP.
    OFF = "off"
    #: SELECTIVETLS: TLS is offered, plain text is allowed too.
    ON = "on"
    #: FORCEDTLS: nothing but STARTTLS and ABORT works before TLS.
    REQUIRE = "require"


@attrs.frozen
class Capabilities:
    """What an export can do, one flag per NBD feature (as nbdkit's ``can_*``).

    The transmission flags are derived from it (:meth:`ExportInfo.transmission_flags`).
    The defaults are the baseline every export has: it can be written and flushed,
    nothing more; :meth:`full` is everything the core implements.
    """

    can_write: bool = True
    can_flush: bool = True
    can_fua: bool = False
    can_trim: bool = False
    can_zero: bool = False
    can_fast_zero: bool = False
    can_cache: bool = False
    #: FLUSH on one connection covers writes acknowledged on every other.
    can_multi_conn: bool = False

    @classmethod
    def full(cls) -> Capabilities:
        """Every capability (what a writable backend such as ``VmaBackend`` declares)."""
        return cls(
            can_fua=True,
            can_trim=True,
            can_zero=True,
            can_fast_zero=True,
            can_cache=True,
            can_multi_conn=True,
        )


@attrs.frozen
class ExportInfo:
    """One export as the core offers it: its name, size, capabilities and block sizes.

    Block sizes are advertised only to clients that ask for NBD_INFO_BLOCK_SIZE, and
    alignment is enforced only for those.

    Raises:
        ValueError: (from the constructor) sizes that the spec or QEMU would reject.
    """

    name: str
    size: int
    description: str = ""
    capabilities: Capabilities = attrs.field(factory=Capabilities)
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = DEFAULT_MAX_PAYLOAD

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.size < 1 << 63:
            raise ValueError(f"export size {self.size} out of range")
        for what, s in (("name", self.name), ("description", self.description)):
            b = s.encode()
            if len(b) > MAX_STRING_LENGTH or b"\0" in b:
                raise ValueError(f"export {what} longer than 4096 bytes or containing NUL")
        if not (_is_pow2(self.min_block) and self.min_block <= 64 * _KiB):
            raise ValueError("min_block must be a power of 2 <= 64 KiB")
        if not (
            _is_pow2(self.preferred_block) and self.preferred_block >= max(self.min_block, 512)
        ):
            raise ValueError("preferred_block must be a power of 2 >= max(min_block, 512)")
        if not self.preferred_block <= self.max_block <= DEFAULT_MAX_PAYLOAD:
            raise ValueError("max_block must be in preferred_block..32 MiB")
        if self.max_block % self.min_block:
            raise ValueError("max_block must be a multiple of min_block")

    @property
    def read_only(self) -> bool:
        """True if the export cannot be written (``NBD_FLAG_READ_ONLY``)."""
        return not self.capabilities.can_write

    def transmission_flags(self, *, structured_replies: bool) -> NbdTransmissionFlag:
        """The transmission flags to advertise.

        Args:
            structured_replies: whether structured replies were negotiated (only
                then is ``NBD_FLAG_SEND_DF`` set).

        Returns:
            ``HAS_FLAGS`` plus a flag per capability; write-side flags (FUA, TRIM,
            WRITE_ZEROES, FAST_ZERO) only on writable exports; FAST_ZERO only with
            WRITE_ZEROES.
        """
        caps = self.capabilities
        f = NbdTransmissionFlag.NBD_FLAG_HAS_FLAGS
        if self.read_only:
            f |= NbdTransmissionFlag.NBD_FLAG_READ_ONLY
        else:
            if caps.can_fua:
                f |= NbdTransmissionFlag.NBD_FLAG_SEND_FUA
            if caps.can_trim:
                f |= NbdTransmissionFlag.NBD_FLAG_SEND_TRIM
            if caps.can_zero:
                f |= NbdTransmissionFlag.NBD_FLAG_SEND_WRITE_ZEROES
                if caps.can_fast_zero:
                    f |= NbdTransmissionFlag.NBD_FLAG_SEND_FAST_ZERO
        if caps.can_flush:
            f |= NbdTransmissionFlag.NBD_FLAG_SEND_FLUSH
        if structured_replies:
            f |= NbdTransmissionFlag.NBD_FLAG_SEND_DF
        if caps.can_multi_conn:
            f |= NbdTransmissionFlag.NBD_FLAG_CAN_MULTI_CONN
        if caps.can_cache:
            f |= NbdTransmissionFlag.NBD_FLAG_SEND_CACHE
        return f


@attrs.frozen
class Limits:
    """Denial-of-service limits of one connection (see the NBD notes §1.3, §2.4).

    Attributes:
        max_option_payload: payload of a known option we buffer; longer ones are
            drained and answered NBD_REP_ERR_TOO_BIG.
        max_option_length: an option longer than this is a hard disconnect.
        max_options: options per handshake (plus one per export) before a hard
            disconnect.
        max_write_drain: an invalid or oversize WRITE whose payload is at most this
            is drained and answered; a longer one is a hard disconnect.
    """

    max_option_payload: int = 64 * _KiB
    max_option_length: int = 32 * _MiB
    max_options: int = 32
    max_write_drain: int = 64 * _MiB
