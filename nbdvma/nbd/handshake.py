"""The option phase (fixed newstyle handshake) of an NBD server connection.  No I/O.

After wsproto, the handshake is apart from the connection: :class:`Handshake` reads
the client flags and the options from the connection's receive buffer, answers each
option itself (the replies go to the connection's output queue) and ends in an
:class:`Agreement` when the client chooses an export with GO or EXPORT_NAME.  Its
states are the option half of :mod:`.state`; every move goes through that table.

TLS (``NBD_OPT_STARTTLS``)
--------------------------

The spec's three modes (:class:`~.records.TlsMode`), chosen per server:

* ``OFF`` (NOTLS): STARTTLS is answered ``NBD_REP_ERR_UNSUP``; ``NBD_REP_ERR_TLS_REQD``
  is never sent.
* ``ON`` (SELECTIVETLS with no TLS-only export): STARTTLS is accepted, and every
  option also works in plain text.
* ``REQUIRE`` (FORCEDTLS): until TLS is up, every option but STARTTLS and ABORT is
  drained unread and answered ``NBD_REP_ERR_TLS_REQD`` (LIST, INFO and GO too, so no
  export name is visible), and EXPORT_NAME, which cannot be answered with an error,
  ends the session.  A client without ``NBD_FLAG_C_FIXED_NEWSTYLE`` cannot negotiate
  TLS at all and is disconnected at once.

On an acceptable STARTTLS (no payload, TLS not yet started) the ACK is queued and
the result is :class:`~.events.StartTLS` (state ``TLS_HANDSHAKE``).  Everything
negotiated before (structured replies, the meta context selection) lives in one
``_Negotiation`` object, which :meth:`Handshake.tls_established` replaces, as the
spec requires.  Any byte the client sent after its STARTTLS and before the TLS
handshake is a protocol violation (plain-text injection: a man in the middle could
otherwise prepend options to the encrypted session), so that raises
:class:`~nbdvma.errors.RemoteProtocolError` instead.  A second STARTTLS is answered
``NBD_REP_ERR_INVALID``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs

from nbdvma.errors import RemoteProtocolError

from . import wire
from .constants import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_CONTEXT_ID,
    DEFAULT_MAX_PAYLOAD,
    MAX_STRING_LENGTH,
    NbdClientFlag,
    NbdHandshakeFlag,
    NbdInfo,
    NbdOption,
    NbdRep,
    NbdTransmissionFlag,
)
from .events import (
    NEED_DATA,
    Event,
    ExportRefused,
    HandshakeAborted,
    NeedData,
    Outgoing,
    StartTLS,
    TransmissionStarted,
)
from .records import ExportInfo, Limits, TlsMode
from .state import ReceiveState, RxState

__all__ = ["Agreement", "Handshake"]

_OutQueue = list[Outgoing]


@attrs.frozen
class Agreement:
    """What the handshake settled for transmission.

    Attributes:
        started: the event reported to the I/O layer.
        export: the export chosen.
        min_block: alignment to enforce (1 unless block sizes were advertised).
        max_payload: the largest READ/WRITE payload accepted.
    """

    started: TransmissionStarted
    export: ExportInfo
    min_block: int = 1
    max_payload: int = DEFAULT_MAX_PAYLOAD


@attrs.define
class _Negotiation:
    """Option state that a STARTTLS ACK must forget (kept together for that reason)."""

    structured_replies: bool = False
    #: canonical export name for which base:allocation was selected, if any
    meta_context_export: str | None = None


class Handshake:
    """The option phase of one connection.

    Args:
        exports: the exports offered, by name.
        limits: denial-of-service limits.
        tls: the TLS mode.
        buf: the connection's receive buffer.
        out: the connection's output queue (the greeting is queued at once).
        state: the connection's receive state.
    """

    def __init__(
        self,
        exports: Mapping[str, ExportInfo],
        limits: Limits,
        tls: TlsMode,
        *,
        buf: wire.ReceiveBuffer,
        out: _OutQueue,
        state: ReceiveState,
    ) -> None:
        self._exports = dict(exports)
        self._limits = limits
        self.tls_mode = tls
        self.tls_active = False
        self._buf = buf
        self._out = out
        self._state = state
        self._no_zeroes = False
        self._option_count = 0
        self._max_options = limits.max_options + len(self._exports)
        self._neg = _Negotiation()
        self._option: wire.OptionHeader | None = None
        self._drain_left = 0
        self._drain_reply: tuple[NbdRep, str] | None = None  # None: ABORT
        #: set when the handshake ends in transmission
        self.agreement: Agreement | None = None
        self._option_handlers: dict[int, Callable[[int, bytes], Event | None]] = {
            NbdOption.NBD_OPT_EXPORT_NAME: self._opt_export_name,
            NbdOption.NBD_OPT_LIST: self._opt_list,
            NbdOption.NBD_OPT_STARTTLS: self._opt_starttls,
            NbdOption.NBD_OPT_INFO: self._opt_info_or_go,
            NbdOption.NBD_OPT_GO: self._opt_info_or_go,
            NbdOption.NBD_OPT_STRUCTURED_REPLY: self._opt_structured_reply,
            NbdOption.NBD_OPT_LIST_META_CONTEXT: self._opt_meta_context,
            NbdOption.NBD_OPT_SET_META_CONTEXT: self._opt_meta_context,
            NbdOption.NBD_OPT_EXTENDED_HEADERS: self._opt_extended_headers,
        }
        self._out.append(
            wire.encode_greeting(
                NbdHandshakeFlag.NBD_FLAG_FIXED_NEWSTYLE | NbdHandshakeFlag.NBD_FLAG_NO_ZEROES
            )
        )

    def tls_established(self) -> None:
        """TLS is up: forget the negotiation so far and read the next option."""
        self.tls_active = True
        self._neg = _Negotiation()
        self._state.goto(RxState.OPTION_HEADER)

    # --- one handler per receive state ----------------------------------------

    def receive_client_flags(self) -> NeedData | None:
        """``CLIENT_FLAGS``: the client's 4 flag bytes."""
        data = self._buf.consume_exactly(wire.CLIENT_FLAGS.size)
        if data is None:
            return NEED_DATA
        flags = wire.parse_client_flags_untrusted(data)
        # We always offer NO_ZEROES, so the client may set it.  A client without
        # C_FIXED_NEWSTYLE is served as fixed newstyle anyway (the spec allows it),
        # but in NOTLS mode, as the spec requires: it cannot do TLS.
        self._no_zeroes = bool(flags & NbdClientFlag.NBD_FLAG_C_NO_ZEROES)
        if not flags & NbdClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE:
            if self.tls_mode is TlsMode.REQUIRE:
                raise RemoteProtocolError("TLS is required, but the client is not fixed newstyle")
            self.tls_mode = TlsMode.OFF
        self._state.goto(RxState.OPTION_HEADER)
        return None

    def receive_option_header(self) -> NeedData | None:
        """``OPTION_HEADER``: decide whether to read the option's payload or drain it."""
        data = self._buf.consume_exactly(wire.OPTION_HEADER.size)
        if data is None:
            return NEED_DATA
        hdr = wire.parse_option_header_untrusted(data)
        self._option_count += 1
        if self._option_count > self._max_options:
            raise RemoteProtocolError(f"more than {self._max_options} options in the handshake")
        if hdr.length > self._limits.max_option_length:
            raise RemoteProtocolError(f"option {hdr.option} of {hdr.length} bytes is too long")
        self._option = hdr
        if hdr.option == NbdOption.NBD_OPT_ABORT:
            self._start_option_drain(hdr.length, None)  # data SHOULD be ignored
        elif self._tls_required() and hdr.option != NbdOption.NBD_OPT_STARTTLS:
            # FORCEDTLS: nothing is parsed (or revealed) before TLS.
            if hdr.option == NbdOption.NBD_OPT_EXPORT_NAME:
                raise RemoteProtocolError("NBD_OPT_EXPORT_NAME without TLS, which is required")
            self._start_option_drain(hdr.length, (NbdRep.NBD_REP_ERR_TLS_REQD, "TLS required"))
        elif hdr.option not in self._option_handlers:
            self._start_option_drain(
                hdr.length, (NbdRep.NBD_REP_ERR_UNSUP, f"option {hdr.option} not supported")
            )
        elif hdr.length > self._limits.max_option_payload:
            if hdr.option == NbdOption.NBD_OPT_EXPORT_NAME:
                raise RemoteProtocolError("NBD_OPT_EXPORT_NAME payload too long")
            self._start_option_drain(hdr.length, (NbdRep.NBD_REP_ERR_TOO_BIG, "option too long"))
        else:
            self._state.goto(RxState.OPTION_PAYLOAD)
        return None

    def _start_option_drain(self, length: int, reply: tuple[NbdRep, str] | None) -> None:
        self._drain_left = length
        self._drain_reply = reply
        self._state.goto(RxState.OPTION_DRAIN)

    def receive_option_drain(self) -> Event | NeedData | None:
        """``OPTION_DRAIN``: discard an option's payload, then answer (or ABORT)."""
        self._drain_left -= self._buf.discard(self._drain_left)
        if self._drain_left:
            return NEED_DATA
        assert self._option is not None
        option = self._option.option
        if self._drain_reply is None:  # NBD_OPT_ABORT
            self._reply(option, NbdRep.NBD_REP_ACK)
            self._state.goto(RxState.CLOSED)
            return HandshakeAborted()
        self._state.goto(RxState.OPTION_HEADER)
        self._reply_error(option, *self._drain_reply)
        return None

    def receive_option_payload(self) -> Event | NeedData | None:
        """``OPTION_PAYLOAD``: answer a known option; its outcome picks the next state."""
        assert self._option is not None
        payload = self._buf.consume_exactly(self._option.length)
        if payload is None:
            return NEED_DATA
        event = self._option_handlers[self._option.option](self._option.option, payload)
        if isinstance(event, StartTLS):
            self._state.goto(RxState.TLS_HANDSHAKE)
        elif isinstance(event, TransmissionStarted):
            self._state.goto(RxState.REQUEST_HEADER)
        else:
            self._state.goto(RxState.OPTION_HEADER)
        return event

    # --- helpers ----------------------------------------------------------------

    def _tls_required(self) -> bool:
        return self.tls_mode is TlsMode.REQUIRE and not self.tls_active

    def _reply(self, option: int, reply: NbdRep, data: bytes = b"") -> None:
        self._out.append(wire.encode_option_reply(option, reply, data))

    def _reply_error(self, option: int, reply: NbdRep, message: str) -> None:
        self._reply(option, reply, wire.error_message(message))

    def _lookup(self, raw_name: bytes) -> tuple[str, ExportInfo] | None:
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            return None
        export = self._exports.get(name)
        if export is None and name == "" and len(self._exports) == 1:
            ((name, export),) = self._exports.items()
        return None if export is None else (name, export)

    def _requested(self, option: int, raw_name: bytes) -> tuple[str, ExportInfo] | None:
        """The export an option names; ``None`` once NBD_REP_ERR_UNKNOWN is queued."""
        found = self._lookup(raw_name)
        if found is None:
            self._reply_error(option, NbdRep.NBD_REP_ERR_UNKNOWN, "unknown export")
        return found

    def _agree(
        self,
        name: str,
        export: ExportInfo,
        flags: NbdTransmissionFlag,
        *,
        block_sizes_advertised: bool,
    ) -> TransmissionStarted:
        structured = self._neg.structured_replies
        # A selection counts only if it was made for the export finally chosen.
        meta = structured and self._neg.meta_context_export == name
        started = TransmissionStarted(name, structured, meta, flags)
        if block_sizes_advertised:
            self.agreement = Agreement(started, export, export.min_block, export.max_block)
        else:
            self.agreement = Agreement(started, export)
        return started

    # --- one handler per option ---------------------------------------------------

    def _opt_export_name(self, option: int, payload: bytes) -> Event | None:
        # No error reply is possible: an unknown export ends the session.
        found = self._lookup(payload) if len(payload) <= MAX_STRING_LENGTH else None
        if found is None:
            raise RemoteProtocolError(f"NBD_OPT_EXPORT_NAME: unknown export {payload[:64]!r}")
        name, export = found
        flags = export.transmission_flags(structured_replies=self._neg.structured_replies)
        self._out.append(
            wire.encode_export_name_reply(export.size, flags, no_zeroes=self._no_zeroes)
        )
        return self._agree(name, export, flags, block_sizes_advertised=False)

    def _opt_list(self, option: int, payload: bytes) -> None:
        if payload:
            self._reply_error(option, NbdRep.NBD_REP_ERR_INVALID, "LIST takes no data")
            return None
        for name, export in self._exports.items():
            self._reply(
                option,
                NbdRep.NBD_REP_SERVER,
                wire.encode_server_reply(name.encode(), export.description.encode()),
            )
        self._reply(option, NbdRep.NBD_REP_ACK)

    def _opt_starttls(self, option: int, payload: bytes) -> Event | None:
        if self.tls_mode is TlsMode.OFF:
            # NOTLS mode: the spec requires ERR_UNSUP or ERR_POLICY, never TLS_REQD.
            self._reply_error(option, NbdRep.NBD_REP_ERR_UNSUP, "TLS not supported")
            return None
        if self.tls_active:
            self._reply_error(option, NbdRep.NBD_REP_ERR_INVALID, "TLS already negotiated")
            return None
        if payload:
            self._reply_error(option, NbdRep.NBD_REP_ERR_INVALID, "STARTTLS takes no data")
            return None
        if len(self._buf):
            # The client must wait for our ACK: bytes already here would be taken
            # as sent inside TLS, which is how plain text gets injected.
            raise RemoteProtocolError("data sent after NBD_OPT_STARTTLS before the TLS handshake")
        self._reply(option, NbdRep.NBD_REP_ACK)
        return StartTLS()

    def _opt_extended_headers(self, option: int, payload: bytes) -> None:
        self._reply_error(option, NbdRep.NBD_REP_ERR_UNSUP, "extended headers not supported")

    def _opt_structured_reply(self, option: int, payload: bytes) -> None:
        if payload:
            self._reply_error(option, NbdRep.NBD_REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            return None
        self._neg.structured_replies = True  # a repeat is harmless: ACK again
        self._reply(option, NbdRep.NBD_REP_ACK)

    def _opt_info_or_go(self, option: int, payload: bytes) -> Event | None:
        try:
            req = wire.parse_info_request_untrusted(payload, max_string=MAX_STRING_LENGTH)
        except RemoteProtocolError as exc:
            self._reply_error(option, NbdRep.NBD_REP_ERR_INVALID, str(exc))
            return None
        found = self._requested(option, req.name)
        if found is None:
            # Said to the I/O layer, so that an operator sees which name was refused.
            return ExportRefused(option, req.name.decode("utf-8", "replace"))
        name, export = found
        flags = export.transmission_flags(structured_replies=self._neg.structured_replies)
        self._reply(option, NbdRep.NBD_REP_INFO, wire.encode_info_export(export.size, flags))
        block_sizes = False
        for info in dict.fromkeys(req.info_types):  # each once, in the client's order
            if info == NbdInfo.NBD_INFO_NAME:
                data = wire.encode_info_string(NbdInfo.NBD_INFO_NAME, name.encode())
            elif info == NbdInfo.NBD_INFO_DESCRIPTION:
                data = wire.encode_info_string(
                    NbdInfo.NBD_INFO_DESCRIPTION, export.description.encode()
                )
            elif info == NbdInfo.NBD_INFO_BLOCK_SIZE:
                block_sizes = True
                data = wire.encode_info_block_size(
                    export.min_block, export.preferred_block, export.max_block
                )
            else:  # NBD_INFO_EXPORT was sent already; unknown types MUST be ignored
                continue
            self._reply(option, NbdRep.NBD_REP_INFO, data)
        self._reply(option, NbdRep.NBD_REP_ACK)
        if option != NbdOption.NBD_OPT_GO:
            return None
        return self._agree(name, export, flags, block_sizes_advertised=block_sizes)

    def _opt_meta_context(self, option: int, payload: bytes) -> None:
        is_set = option == NbdOption.NBD_OPT_SET_META_CONTEXT
        if is_set:
            self._neg.meta_context_export = None  # every SET replaces the selection
            if not self._neg.structured_replies:
                self._reply_error(
                    option, NbdRep.NBD_REP_ERR_INVALID, "structured replies not negotiated"
                )
                return None
        try:
            req = wire.parse_meta_context_request_untrusted(payload, max_string=MAX_STRING_LENGTH)
        except RemoteProtocolError as exc:
            self._reply_error(option, NbdRep.NBD_REP_ERR_INVALID, str(exc))
            return None
        found = self._requested(option, req.export_name)
        if found is None:
            return None
        if is_set:
            if BASE_ALLOCATION in req.queries:
                self._neg.meta_context_export = found[0]
                self._reply(
                    option,
                    NbdRep.NBD_REP_META_CONTEXT,
                    wire.encode_meta_context_reply(BASE_ALLOCATION_CONTEXT_ID, BASE_ALLOCATION),
                )
        elif not req.queries or any(q in (b"base:", BASE_ALLOCATION) for q in req.queries):
            # LIST: no queries means "everything"; "base:" is a mandatory wildcard.
            self._reply(
                option,
                NbdRep.NBD_REP_META_CONTEXT,
                wire.encode_meta_context_reply(0, BASE_ALLOCATION),
            )
        self._reply(option, NbdRep.NBD_REP_ACK)
