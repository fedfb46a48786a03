"""Hostile-input fuzzing of the sans-IO NBD server core (:mod:`nbdvma.nbd`).

Three generators feed :class:`~nbdvma.nbd.NbdServerConnection`, always split at
random boundaries and ended with EOF:

* structured handshakes: valid option sequences whose fields are mutated (option
  numbers, option lengths, inner name/query lengths, info and query counts, client
  flags), optionally followed by requests;
* request streams after a valid handshake, with mutated magic, flags, types, offsets,
  lengths and payload lengths;
* byte-level mutations (flip, insert, delete, truncate) of real client sessions
  recorded from nbdinfo, qemu-io, qemu-img and nbdcopy.

The invariants (:class:`Harness`): the only exception ``next_event`` raises is
``RemoteProtocolError``; every event has the documented semantics (a ``Request`` is
inside the export, valid for what was advertised, and a WRITE carries exactly its
data); every byte the core queues decodes as a well-formed greeting, option reply,
export-name reply, simple reply or structured chunk, and a rejected request is
answered exactly once with its cookie and error; the receive buffer never holds more
than what was fed, and declared lengths up to 4 GiB allocate nothing
(``tracemalloc``).

The module also exposes :data:`TARGETS` for ``benchmarks/fuzz.py``.
"""

from __future__ import annotations

import base64
import errno
import itertools
import struct
import tracemalloc
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_client_sansio import Reader, parse_error_chunk

from nbdvma.errors import RemoteProtocolError
from nbdvma.nbd import (
    NEED_DATA,
    Capabilities,
    ConnectionClosed,
    DataChunk,
    Disconnect,
    ExportInfo,
    ExportRefused,
    HandshakeAborted,
    HoleChunk,
    NbdPhase,
    NbdServerConnection,
    RejectedRequest,
    Request,
    TransmissionStarted,
)
from nbdvma.nbd.constants import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_CONTEXT_ID,
    DEFAULT_MAX_PAYLOAD,
    IHAVEOPT,
    NBD_OPT_REPLY_MAGIC,
    NBD_REQUEST_MAGIC,
    NbdCmdFlag,
    NbdCommand,
    NbdError,
    NbdInfo,
    NbdOption,
    NbdRep,
    NbdReplyFlag,
    NbdReplyType,
    NbdTransmissionFlag,
)

C = NbdCommand
O = NbdOption  # noqa: E741
T = NbdTransmissionFlag
SIZE = 1 << 20
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: Export sets the connection is built with (by index, so that examples shrink well).
EXPORT_SETS: list[dict[str, ExportInfo]] = [
    {
        "disk": ExportInfo(
            "disk",
            SIZE,
            "the disk",
            capabilities=Capabilities.full(),
            min_block=512,
            preferred_block=65536,
        )
    },
    {
        "disk": ExportInfo("disk", SIZE + 4096),
        "ro": ExportInfo(
            "ro", 3 * 4096 + 512, capabilities=Capabilities(can_write=False, can_flush=False)
        ),
    },
    {
        "": ExportInfo("", 65536, capabilities=Capabilities(can_zero=True)),
        "x": ExportInfo("x", 1, min_block=1),
    },
]
_KNOWN_ERRORS = frozenset(int(e) for e in NbdError)
_MAX_ERROR_MESSAGE = 200
_OPT_REPLY_MAGIC = struct.pack(">Q", NBD_OPT_REPLY_MAGIC)

# Real client sessions (client -> server bytes), recorded by running nbdinfo, qemu-io,
# qemu-img and nbdcopy against this core over a unix socket; zlib + base64.
_RECORDED: dict[str, str] = {
    "nbdcopy": (
        "eNrt1fn35XMBx/E785WxTImRSLIOImTLHoORfTeWpLFmq0SEZN+Lsox93yv7HlmylT0KRSuVylJZy0++p6fmzPwB"
        "fuk8Xue87/O+z+feX+459zwGg8HQOmuPmzB+o403HwwG0w2fwRT3UcNn9PCZZqfd9tljMGIwNHbipDHD9xGD9r8O"
        "f2Lyu1HlQ+Uj5eNl/rJIWbIsX1Yta5UNyubl82WHslvZq3yjHFyOKt8pp5SzyoXlinJNubncUe4rD5cny6/LH8qL"
        "5dXy5lQ/xHRlpjJbmassUBYtS5UVymrlc2XDskXZtuxYdi9fK/uXQ8rR5YRyajm7XFS+X64tt5Q7y/3lkfKL8mz5"
        "Y/lr+Ud5q4ws05cPl4+WT5Sx5VNl6bJiGVfWLhuVCeULZaeyR9m7HFAOLceUE8ukck65uPygXFduLXeVB8qj5Zfl"
        "ufJ8+Vv5Z3m7DJUZysxl9jJ3WbAsVpYpK5XVyzpl47Jl2a7sXPYs+5QDy2Hl2PLdclo5t1xSfliuLz8qd5eflsfK"
        "U+U35YXy9/Kv8u+p/vIzllnKHGWeslBZvCxbVi5rlHXLJmWr8sWyS/ly+Xr5Zjm8HFe+V04v55VLy5XlhnJb+Un5"
        "WXm8PF1+W/5UXiqvlf+UD5TRZUz5WJm3LFyWKJ8pq5Q1y3pl07J1mVi+VL5S9i0HlSPK8eWkckY5v1xWrio3ltvL"
        "PeXB8vPyTPld+XN5ubxe3inTlg+WWcucZb7yyfLpslz5bBlf1i+blW3K9mXX8tWyX/lWObJ8u5xcziwXlMvL1eWm"
        "8uNyb3moPFF+VX5f/lJeKW8Mphzc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wg9v7jZuZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZ"
        "mZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZ"
        "mZmZmZmZmZmZmdn/88ZOnDRmONO+dx3539dphs/oyc9GvvdsaMrvvQsX0om6"
    ),
    "nbdinfo_list": (
        "eNpjYGBg9vRwDHP1DwhhYGDgAGIGJD4zGp8NiAWAmCUlszgbKMvMwMjAhCTPCcQ8cHlUvUwgPgCEHg+D"
    ),
    "nbdinfo_map": (
        "eNpjYGBg9vRwDHP1DwhhYGDgAGIGJD4XEMsDMUtKZnE2kGYEYv6kxOJUq8ScnPzkxJLM/Dwk5exAzANXzsjArJow"
        "VRgqzgDVDgECDAxQOSaoCBMDEgAAEZkTSw=="
    ),
    "qemu_img_convert": (
        "eNrt1lfQHQUZgOET/igYgxGCiEoVgoiCioUYOhgElZ5EJYD5E0BjQgIkFFFRCAqIoqKxUVWqFDtWioJSVCwUK4JS"
        "LLSAUdQr/pk3cZIZb7lg5vlmvnnPzu6evdmZZweDwdDuu+00bfJee08ZDAarjexgheMxI7vByI4+ePaCOSMdNbLj"
        "Zg4vOGTS8Ny582cNL5w9f94Kl686smP/d/mowdCEGYvHd9vURdMnLj18sHyGnr3816rlWeU5Zd2ycdm8vKJMLDuU"
        "XcseZUqZXmaW2WXZw48px5cPlA+XT5TPlc+Xi8uXy5XlqnJ9+Un5Vfltubv8pTxc/llGldXKuLJ2Wa9sUl5Stiqv"
        "LTuW15c9y9RyQJlV3lmOKMeW95UPlo+UT5YzyxfKJeUr5Vvl6vKj8tNya/ld+VP5a3mk/KusUp5Rlr0Hzy3rlwnl"
        "peWVZVLZqexW9irTyoHl4DKnHFneVd5fTi6nl8XlrPLF8qXy1fLtck35cflZua38vvy5/K0sKY8ve+3LmLJGWads"
        "UDYtW5RXlW3KzmX3snd5czmoHFLmlgXluHJCOaV8tHyqnF3OL5eWr5XvlGvLDeWWcnv5Q7mn/L08Wv5dRpdnljXL"
        "88qG5UVly/Lqsm3Zpbyh7FPeUt5WDi2HlYXl3eXEcmr5WPl0OadcUC4rXy/fLT8oN5aflzvKneXe8kB5rPynPK2M"
        "LePL88tGZbPysvKasl15XXlj2be8tcwoby/zylHlPWVR+VD5ePlMObdcWC4v3yjfKz8sN5VflF+XP5b7yoPlH+W/"
        "5ell9bJWeUF5YXlxeXnZumxfJpc3lf3K/mW4vKPML0eX95aTymnljPLZcl65qFxRvlm+X64rN5dflt+Uu8r95aGy"
        "dLDiwA1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zgBje4wQ1ucIMb3OAGN7jBDW5wgxvc4AY3uMENbnCDG9zg"
        "Bje4Pdm4GfNUnQkzFo/vc2vqoukTl/ZFMDRC0Ngly88NrXRu5ftW+X//+QTQe56i"
    ),
    "qemu_img_map": (
        "eNpjYGBg9vRwDHP1DwhhYGDgAGIGJD4XEMsDMUtKZnE2kGYEYv6kxOJUq8ScnPzkxJLM/Dwk5exAzANXzsjArJow"
        "VRhoKFA89Elnx70CBhgQYGAAyzEwMDFgAQCvCBbo"
    ),
    "qemu_img_probe": (
        "eNpjYGBg9vRwDHP1DwhhYGDgAGIGJD47EPMAMUtKZnE2AyMDs2rCVGEgn4kBAhgZkAAAfv0Hwg=="
    ),
    "qemu_io": (
        "eNrt2jsKwkAUheE7JqhIwIgLMI1bsLCzELTSQlIbH0UwmCJuxVW4Fzdk42UcQh6Ftfh/cBjCnZNqyisi3nq1iJeb"
        "7U5E+hqpfA80E41/SouLnkYzPCTFeZ5kWX5Mbml+rVzvaYLyuhFvur+P9dRaPHsGr0hKkTwAAAAAAAAAAAAAAMDP"
        "s7sBVnM3IBQ786Rbm5lPXM+vzTqVnmiz9U/Xa+0ihLY8wl/7+m7cC2t6A+xSr24="
    ),
}

# --------------------------------------------------------------------- the harness


@attrs.define
class Harness:
    """Drives one connection like an I/O layer and checks every invariant on the way.

    Requests are answered (data, holes, block status or an errno, chosen by
    ``answer_seed``) so that the reply encoders are exercised too.
    """

    exports: Mapping[str, ExportInfo]
    answer_seed: int = 0
    conn: NbdServerConnection = attrs.field(init=False)
    fed: int = 0
    started: TransmissionStarted | None = None
    final_option_replies: int = 0
    option_replies: list[tuple[int, int]] = attrs.Factory(list)
    events: list[object] = attrs.Factory(list)
    failed: RemoteProtocolError | None = None
    finished: bool = False

    def __attrs_post_init__(self) -> None:
        self.conn = NbdServerConnection(self.exports)
        out = Reader(self.conn.data_to_send())
        assert out.greeting() == 3
        assert out.at_end()

    # -- input ------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """Feed one chunk (``b""`` is EOF) and process events until NEED_DATA."""
        if self.failed is not None or self.finished:
            # A finished connection ignores data; only EOF after EOF is a local error.
            if chunk:
                self.conn.receive_data(chunk)
            return
        self.conn.receive_data(chunk)
        self.fed += len(chunk)
        self.pump()

    def pump(self) -> None:
        while not self.finished and self.failed is None:
            before = self.conn.phase
            try:
                ev = self.conn.next_event()
            except RemoteProtocolError as exc:  # the only exception allowed
                self.failed = exc
                assert self.conn.phase is NbdPhase.ERROR
                self._check_output(None, before)
                try:
                    self.conn.next_event()
                except RemoteProtocolError:
                    pass
                else:
                    raise AssertionError("next_event after a protocol error must raise again")
                return
            # The buffer holds at most what was fed (nothing is sized by a claim).
            assert len(self.conn._buf) <= self.fed
            self._check_output(ev, before)
            if ev is NEED_DATA:
                return
            self.events.append(ev)
            self._check_event(ev)

    def run(self, chunks: list[bytes]) -> Harness:
        for chunk in chunks:
            if chunk:
                self.feed(chunk)
        self.feed(b"")
        if self.failed is None:
            assert self.finished, "EOF must end the connection"
            assert isinstance(self.conn.next_event(), ConnectionClosed)
        return self

    # -- events -----------------------------------------------------------------

    def _check_event(self, ev: object) -> None:
        if isinstance(ev, TransmissionStarted):
            assert self.started is None, "two TransmissionStarted events"
            export = self.exports[ev.export_name]
            assert ev.transmission_flags == export.transmission_flags(
                structured_replies=ev.structured_replies
            )
            assert not ev.meta_context_selected or ev.structured_replies
            assert self.conn.phase is NbdPhase.TRANSMISSION
            assert self.conn.export == export
            self.started = ev
        elif isinstance(ev, Request):
            self._check_request(ev)
            self._answer(ev)
        elif isinstance(ev, RejectedRequest):
            assert self.started is not None
            assert ev.error in _KNOWN_ERRORS
        elif isinstance(ev, ExportRefused):
            assert self.started is None
            assert ev.name not in self.exports
        elif isinstance(ev, Disconnect | HandshakeAborted | ConnectionClosed):
            if isinstance(ev, Disconnect):
                assert self.started is not None
            if isinstance(ev, HandshakeAborted):
                assert self.started is None
            self.finished = True
            assert self.conn.phase is NbdPhase.CLOSED
            assert isinstance(self.conn.next_event(), ConnectionClosed)
        else:
            raise AssertionError(f"unexpected event {ev!r}")

    def _check_request(self, ev: Request) -> None:
        started = self.started
        assert started is not None, "a Request before transmission"
        export = self.exports[started.export_name]
        flags = started.transmission_flags
        assert ev.command in C
        if ev.command == C.NBD_CMD_FLUSH:
            assert flags & T.NBD_FLAG_SEND_FLUSH
            assert (ev.offset, ev.length) == (0, 0)
        else:
            assert ev.length > 0, ev
            assert ev.offset + ev.length <= export.size, ev
        if ev.command == C.NBD_CMD_WRITE:
            assert ev.data is not None
            assert len(ev.data) == ev.length
        else:
            assert ev.data is None
        if ev.command in (C.NBD_CMD_WRITE, C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_TRIM):
            assert not export.read_only
        if ev.command in (C.NBD_CMD_READ, C.NBD_CMD_WRITE):
            assert ev.length <= DEFAULT_MAX_PAYLOAD
        if ev.command == C.NBD_CMD_BLOCK_STATUS:
            assert started.meta_context_selected
        needs = {
            C.NBD_CMD_TRIM: T.NBD_FLAG_SEND_TRIM,
            C.NBD_CMD_WRITE_ZEROES: T.NBD_FLAG_SEND_WRITE_ZEROES,
            C.NBD_CMD_CACHE: T.NBD_FLAG_SEND_CACHE,
        }
        if ev.command in needs:
            assert flags & needs[ev.command]
        if ev.flags & NbdCmdFlag.NBD_CMD_FLAG_FUA:
            assert flags & T.NBD_FLAG_SEND_FUA
        if ev.flags & NbdCmdFlag.NBD_CMD_FLAG_DF:
            assert ev.command == C.NBD_CMD_READ
            assert started.structured_replies
        if ev.flags & NbdCmdFlag.NBD_CMD_FLAG_FAST_ZERO:
            assert flags & T.NBD_FLAG_SEND_FAST_ZERO
        assert not ev.flags & NbdCmdFlag.NBD_CMD_FLAG_PAYLOAD_LEN
        assert not ev.flags & ~0x1F

    def _answer(self, ev: Request) -> None:
        """Answer like an I/O layer would, varying the reply shape, and check the bytes."""
        assert self.conn.data_to_send() == b"", "the core answered a Request itself"
        conn = self.conn
        choice = (self.answer_seed + ev.cookie) % 4
        if choice == 3 and ev.command != C.NBD_CMD_FLUSH:
            conn.send_error(ev.cookie, errno.ENOSPC if ev.cookie & 1 else errno.EIO, "x" * 300)
            self._check_error_reply(Reader(conn.data_to_send()), ev.cookie, None)
            return
        if ev.command == C.NBD_CMD_READ:
            if choice == 1 and not ev.flags & NbdCmdFlag.NBD_CMD_FLAG_DF and ev.length > 1:
                half = ev.length // 2
                chunks: list[DataChunk | HoleChunk] = [
                    HoleChunk(ev.offset, half),
                    DataChunk(ev.offset + half, b"\xab" * (ev.length - half)),
                ]
                conn.send_read_reply_chunks(ev.cookie, chunks)
            else:
                conn.send_read_reply(ev.cookie, ev.offset, b"\xcd" * ev.length)
            self._check_read_reply(Reader(b"".join(conn.buffers_to_send())), ev)
        elif ev.command == C.NBD_CMD_BLOCK_STATUS:
            extents = [(4096, 0), (1 << 33, 3)] if choice else [(ev.length, 1)]
            conn.send_block_status(ev, extents)
            self._check_block_status(Reader(conn.data_to_send()), ev)
        else:
            conn.send_reply(ev.cookie)
            out = Reader(conn.data_to_send())
            assert out.simple() == (0, ev.cookie)
            assert out.at_end()

    # -- output -----------------------------------------------------------------

    def _check_output(self, ev: object, phase_before: NbdPhase) -> None:
        out = Reader(self.conn.data_to_send())
        if phase_before is NbdPhase.HANDSHAKE:
            while not out.at_end():
                magic = out.unread()[:8]
                if isinstance(ev, TransmissionStarted) and magic != _OPT_REPLY_MAGIC:
                    self._check_export_name_reply(out, ev)
                else:
                    self._check_option_reply(out)
        elif isinstance(ev, RejectedRequest):
            self._check_error_reply(out, ev.cookie, ev.error)
        assert out.at_end(), f"unexpected bytes from the server after {ev!r}"

    def _check_export_name_reply(self, out: Reader, ev: TransmissionStarted) -> None:
        # 124 bytes of zeroes follow unless the client asked for NO_ZEROES.
        size, flags = out.export_name_reply(no_zeroes=len(out.unread()) == 10)
        assert size == self.exports[ev.export_name].size
        assert flags == ev.transmission_flags

    def _check_option_reply(self, out: Reader) -> None:
        opt, rep, data = out.option_reply()
        self.option_replies.append((opt, rep))
        assert rep in NbdRep.__members__.values(), hex(rep)
        if rep == NbdRep.NBD_REP_ACK:
            assert data == b""
            self.final_option_replies += 1
        elif rep & (1 << 31):
            data.decode()  # a human-readable message
            self.final_option_replies += 1
        elif rep == NbdRep.NBD_REP_SERVER:
            assert opt == O.NBD_OPT_LIST
            (n,) = struct.unpack_from(">I", data)
            assert 4 + n <= len(data)
            assert data[4 : 4 + n].decode() in self.exports
            data[4 + n :].decode()
        elif rep == NbdRep.NBD_REP_INFO:
            assert opt in (O.NBD_OPT_INFO, O.NBD_OPT_GO)
            (info,) = struct.unpack_from(">H", data)
            if info == NbdInfo.NBD_INFO_EXPORT:
                size, _flags = struct.unpack(">QH", data[2:])
                assert size in {e.size for e in self.exports.values()}
            elif info == NbdInfo.NBD_INFO_BLOCK_SIZE:
                lo, pref, hi = struct.unpack(">III", data[2:])
                assert lo <= pref <= hi <= DEFAULT_MAX_PAYLOAD
                assert lo & (lo - 1) == 0
                assert pref & (pref - 1) == 0
            else:
                assert info in (NbdInfo.NBD_INFO_NAME, NbdInfo.NBD_INFO_DESCRIPTION)
                assert len(data[2:].decode()) <= 4096
        else:
            assert rep == NbdRep.NBD_REP_META_CONTEXT
            assert opt in (O.NBD_OPT_LIST_META_CONTEXT, O.NBD_OPT_SET_META_CONTEXT)
            (ctx,) = struct.unpack_from(">I", data)
            assert data[4:] == BASE_ALLOCATION
            if opt == O.NBD_OPT_SET_META_CONTEXT:
                assert ctx == BASE_ALLOCATION_CONTEXT_ID

    def _check_error_reply(self, out: Reader, cookie: int, error: int | None) -> None:
        assert self.started is not None
        if self.started.structured_replies:
            flags, typ, got, payload = out.chunk()
            assert (flags, typ, got) == (
                NbdReplyFlag.NBD_REPLY_FLAG_DONE,
                NbdReplyType.NBD_REPLY_TYPE_ERROR,
                cookie,
            )
            err, message = parse_error_chunk(payload)
            assert len(message) <= _MAX_ERROR_MESSAGE
            message.decode()
        else:
            err, got = out.simple()
            assert got == cookie
        assert err in _KNOWN_ERRORS
        assert err != 0
        if error is not None:
            assert err == error

    def _check_read_reply(self, out: Reader, ev: Request) -> None:
        assert self.started is not None
        if not self.started.structured_replies:
            assert out.simple() == (0, ev.cookie)
            out.take(ev.length)
            assert out.at_end()
            return
        covered = 0
        while True:
            flags, typ, cookie, payload = out.chunk()
            assert cookie == ev.cookie
            (offset,) = struct.unpack_from(">Q", payload)
            if typ == NbdReplyType.NBD_REPLY_TYPE_OFFSET_DATA:
                n = len(payload) - 8
            else:
                assert typ == NbdReplyType.NBD_REPLY_TYPE_OFFSET_HOLE
                (n,) = struct.unpack(">I", payload[8:])
            assert n > 0
            assert ev.offset <= offset
            assert offset + n <= ev.offset + ev.length
            covered += n
            if flags & NbdReplyFlag.NBD_REPLY_FLAG_DONE:
                break
        assert covered == ev.length
        assert out.at_end()

    def _check_block_status(self, out: Reader, ev: Request) -> None:
        assert self.started is not None
        export = self.exports[self.started.export_name]
        flags, typ, cookie, payload = out.chunk()
        assert (flags, typ, cookie) == (
            NbdReplyFlag.NBD_REPLY_FLAG_DONE,
            NbdReplyType.NBD_REPLY_TYPE_BLOCK_STATUS,
            ev.cookie,
        )
        assert len(payload) >= 12
        assert (len(payload) - 4) % 8 == 0
        (ctx,) = struct.unpack_from(">I", payload)
        assert ctx == BASE_ALLOCATION_CONTEXT_ID
        total = 0
        extents = (len(payload) - 4) // 8
        for k in range(extents):
            n, _state = struct.unpack_from(">II", payload, 4 + 8 * k)
            assert n > 0
            total += n
        assert ev.offset + total <= export.size
        if ev.flags & NbdCmdFlag.NBD_CMD_FLAG_REQ_ONE:
            assert extents == 1
            assert total <= ev.length
        assert out.at_end()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given positions (taken modulo its length)."""
    if not data:
        return []
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --------------------------------------------------------------------- generators

_U32 = 0xFFFFFFFF
_NAMES = st.one_of(
    st.sampled_from([b"disk", b"", b"ro", b"x", b"nope", b"d\xffisk", b"disk\0"]),
    st.binary(max_size=12),
)
_QUERIES = st.lists(
    st.one_of(
        st.sampled_from(
            [BASE_ALLOCATION, b"base:", b"base:allocatio", b"qemu:dirty-bitmap:a", b""]
        ),
        st.binary(max_size=24),
    ),
    max_size=4,
)
_OPTIONS = [int(o) for o in O]


def _lie(draw: st.DrawFn, true: int, bits: int = 32) -> int:
    """Usually ``true``; sometimes off by a little, a random value or the maximum."""
    top = (1 << bits) - 1
    kind = draw(st.integers(0, 11))
    if kind < 8:
        return true
    if kind == 8:
        return max(0, min(top, true + draw(st.integers(-4, 4))))
    if kind == 9:
        return top
    return draw(st.integers(0, top))


def _string(draw: st.DrawFn, value: bytes) -> bytes:
    return struct.pack(">I", _lie(draw, len(value))) + value


@st.composite
def handshake_option(draw: st.DrawFn) -> bytes:
    """One option request, valid or with any of its fields mutated."""
    opt = draw(st.one_of(st.sampled_from(_OPTIONS), st.integers(0, 64), st.integers(0, _U32)))
    payload = b""
    if opt in (O.NBD_OPT_INFO, O.NBD_OPT_GO):
        infos = draw(st.lists(st.integers(0, 5) | st.integers(0, 0xFFFF), max_size=5))
        payload = (
            _string(draw, draw(_NAMES))
            + struct.pack(">H", _lie(draw, len(infos), 16))
            + b"".join(struct.pack(">H", i) for i in infos)
        )
    elif opt in (O.NBD_OPT_LIST_META_CONTEXT, O.NBD_OPT_SET_META_CONTEXT):
        queries = draw(_QUERIES)
        payload = (
            _string(draw, draw(_NAMES))
            + struct.pack(">I", _lie(draw, len(queries)))
            + b"".join(_string(draw, q) for q in queries)
        )
    elif opt == O.NBD_OPT_EXPORT_NAME:
        payload = draw(_NAMES)
    elif draw(st.integers(0, 3)) == 0:
        payload = draw(st.binary(max_size=16))
    length = _lie(draw, len(payload))
    if draw(st.integers(0, 15)) == 0:
        payload = payload[: draw(st.integers(0, len(payload)))]  # the option is cut short
    magic = IHAVEOPT if draw(st.integers(0, 30)) else draw(st.integers(0, 2**64 - 1))
    return struct.pack(">QII", magic, opt, length) + payload


@st.composite
def go_prefix(draw: st.DrawFn, exports: Mapping[str, ExportInfo]) -> bytes:
    """A valid handshake ending in GO (or EXPORT_NAME) with random negotiated features."""
    name = draw(st.sampled_from(sorted(exports))).encode()
    out = struct.pack(">I", draw(st.sampled_from([1, 3])))
    structured = draw(st.booleans())
    if structured:
        out += _opt(O.NBD_OPT_STRUCTURED_REPLY)
        if draw(st.booleans()):
            out += _opt(O.NBD_OPT_SET_META_CONTEXT, _meta(name, (BASE_ALLOCATION,)))
    if draw(st.integers(0, 4)) == 0:
        return out + _opt(O.NBD_OPT_EXPORT_NAME, name)
    infos = draw(st.sampled_from([(), (NbdInfo.NBD_INFO_BLOCK_SIZE,), (3, 2, 1, 0, 77)]))
    info = struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
    return out + _opt(O.NBD_OPT_GO, info + b"".join(struct.pack(">H", i) for i in infos))


def _opt(opt: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(payload)) + payload


def _meta(name: bytes, queries: tuple[bytes, ...]) -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q for q in queries)


@st.composite
def request_msg(draw: st.DrawFn, size: int) -> bytes:
    """One request: half of them valid-looking, the others with any field mutated."""
    if draw(st.booleans()):
        cmd = draw(st.sampled_from([0, 1, 1, 3, 4, 5, 6, 7]))
        offset = draw(st.integers(0, size // 512 - 1)) * 512
        length = draw(st.integers(1, min(64, (size - offset) // 512))) * 512
        flags = draw(st.sampled_from([0, 0, 1, 2, 4, 8, 16, 18]))
        if cmd == C.NBD_CMD_FLUSH:
            offset = length = 0
        cookie = draw(st.integers(0, 2**64 - 1))
        out = struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        return out + (bytes([cookie & 0xFF]) * length if cmd == C.NBD_CMD_WRITE else b"")
    cmd = draw(st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF)))
    flags = draw(st.one_of(st.just(0), st.integers(0, 0x3F), st.integers(0, 0xFFFF)))
    offset = draw(
        st.one_of(
            st.integers(0, size // 512).map(lambda k: k * 512),
            st.integers(max(0, size - 8192), size + 8),
            st.integers(0, 2**64 - 1),
        )
    )
    length = draw(
        st.one_of(
            st.integers(1, 16).map(lambda k: k * 512),
            st.integers(0, 4096),
            st.integers(max(0, size - 8192), size + 8),
            st.sampled_from([0, DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_PAYLOAD + 1, 64 << 20, _U32]),
            st.integers(0, _U32),
        )
    )
    if cmd == C.NBD_CMD_FLUSH and draw(st.booleans()):
        offset = length = 0
    magic = NBD_REQUEST_MAGIC if draw(st.integers(0, 30)) else draw(st.integers(0, _U32))
    cookie = draw(st.integers(0, 2**64 - 1))
    out = struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)
    if cmd == C.NBD_CMD_WRITE:
        # Payloads are never longer than 64 KiB here: a longer claim is cut short.
        n = max(0, min(_lie(draw, length), 65536))
        out += bytes([cookie & 0xFF]) * n
    return out


@st.composite
def handshake_case(draw: st.DrawFn) -> tuple[int, list[bytes]]:
    """Client flags, mutated options, maybe requests; split anywhere."""
    which = draw(st.integers(0, len(EXPORT_SETS) - 1))
    exports = EXPORT_SETS[which]
    flags = draw(st.sampled_from([1, 3, 3, 3, 3, 3, 0, 2, -1]))
    if flags < 0:
        flags = draw(st.integers(0, _U32))
    data = struct.pack(">I", flags)
    data += b"".join(draw(st.lists(handshake_option(), max_size=6)))
    if draw(st.booleans()):
        data += draw(go_prefix(exports))[4:]
        data += b"".join(draw(st.lists(request_msg(SIZE), max_size=4)))
    return which, split(data, draw(st.lists(st.integers(0, 1 << 20), max_size=12)))


@st.composite
def request_case(draw: st.DrawFn) -> tuple[int, list[bytes]]:
    """A valid handshake, then mutated requests; split anywhere."""
    which = draw(st.integers(0, len(EXPORT_SETS) - 1))
    exports = EXPORT_SETS[which]
    size = max(e.size for e in exports.values())
    data = draw(go_prefix(exports))
    data += b"".join(draw(st.lists(request_msg(size), min_size=1, max_size=10)))
    if draw(st.booleans()):
        data += struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, C.NBD_CMD_DISC, 0, 0, 0)
    return which, split(data, draw(st.lists(st.integers(0, 1 << 20), max_size=12)))


RECORDED: dict[str, bytes] = {
    name: zlib.decompress(base64.b64decode("".join(text))) for name, text in _RECORDED.items()
}
_MAGICS = (struct.pack(">I", NBD_REQUEST_MAGIC), struct.pack(">Q", IHAVEOPT))


def _message_starts(data: bytes) -> list[int]:
    """Offsets where an option or request header starts (where mutations hurt most)."""
    out = [0]
    for magic in _MAGICS:
        pos = data.find(magic)
        while pos >= 0:
            out.append(pos)
            pos = data.find(magic, pos + 1)
    return sorted(out)


_STARTS = {name: _message_starts(data) for name, data in RECORDED.items()}


@st.composite
def mutated_session(draw: st.DrawFn) -> tuple[int, list[bytes]]:
    """A recorded client session with flips, inserts, deletes, duplications and a cut."""
    name = draw(st.sampled_from(sorted(RECORDED)))
    data = bytearray(RECORDED[name])
    starts = _STARTS[name]
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        if draw(st.booleans()):  # near a message header
            pos = draw(st.sampled_from(starts)) + draw(st.integers(0, 31))
        else:
            pos = draw(st.integers(0, len(data)))
        pos = min(pos, len(data) - 1)
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "dup"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, 1]))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            n = draw(st.integers(1, 256))
            data[pos:pos] = data[pos : pos + n]
    if draw(st.integers(0, 3)) == 0:
        del data[draw(st.integers(0, len(data))) :]
    return 0, split(bytes(data), draw(st.lists(st.integers(0, 1 << 20), max_size=12)))


def check_case(case: tuple[int, list[bytes]], answer_seed: int = 0) -> Harness:
    """Run one generated case through a :class:`Harness` (the fuzz target)."""
    which, chunks = case
    return Harness(EXPORT_SETS[which], answer_seed).run(chunks)


# ------------------------------------------------------------------------- tests


def test_recorded_sessions_run_clean() -> None:
    """The corpus itself: every real session completes without a rejection."""
    for name, data in RECORDED.items():
        h = check_case((0, [data]))
        assert h.failed is None, name
        assert not any(isinstance(e, RejectedRequest) for e in h.events), name
        if name not in ("nbdinfo_list", "qemu_img_probe"):
            assert h.started is not None, name
        assert any(isinstance(e, Disconnect | HandshakeAborted) for e in h.events), name


@settings(FUZZ, max_examples=400)
@given(case=handshake_case(), seed=st.integers(0, 3))
def test_fuzz_structured_handshake(case: tuple[int, list[bytes]], seed: int) -> None:
    check_case(case, seed)


@settings(FUZZ, max_examples=400)
@given(case=request_case(), seed=st.integers(0, 3))
def test_fuzz_request_stream(case: tuple[int, list[bytes]], seed: int) -> None:
    check_case(case, seed)


@settings(FUZZ, max_examples=300)
@given(case=mutated_session(), seed=st.integers(0, 3))
def test_fuzz_mutated_recorded_sessions(case: tuple[int, list[bytes]], seed: int) -> None:
    check_case(case, seed)


@settings(FUZZ, max_examples=60)
@given(
    opt=st.sampled_from([*_OPTIONS, 0x7FFF]),
    length=st.one_of(st.integers(0, 1 << 26), st.integers(1 << 26, _U32)),
)
def test_fuzz_every_option_payload_of_every_length(opt: int, length: int) -> None:
    """Each option, its payload length declared anything and sent in full up to 64 KiB:
    exactly one final reply per option, unless it ended the handshake or the connection."""
    payload = bytes(range(256)) * 256
    data = struct.pack(">IQII", 3, IHAVEOPT, opt, length) + payload[:length]
    h = check_case((1, [data, _opt(O.NBD_OPT_LIST)]))
    if h.failed is None and h.started is None and length <= len(payload):
        assert h.final_option_replies == 2 - (opt == O.NBD_OPT_ABORT)


def _traced_peak(h: Harness, chunks: list[bytes]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for chunk in chunks:
            h.feed(chunk)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@settings(FUZZ, max_examples=40)
@given(
    which=st.sampled_from(["option", "write", "known-option"]),
    declared=st.one_of(
        st.integers(1 << 16, _U32), st.sampled_from([DEFAULT_MAX_PAYLOAD, 64 << 20, _U32])
    ),
    offset=st.sampled_from([0, 4096, 1 << 40]),
    sent=st.integers(0, 256 * 1024),
    step=st.sampled_from([1000, 4096, 65536]),
)
def test_fuzz_declared_lengths_do_not_allocate(
    which: str, declared: int, offset: int, sent: int, step: int
) -> None:
    """Claims up to 4 GiB: the core holds at most what it was fed (plus one copy)."""
    h = Harness(EXPORT_SETS[0])
    if which == "write":
        h.feed(struct.pack(">I", 3) + _opt(O.NBD_OPT_GO, struct.pack(">I4sH", 4, b"disk", 0)))
        assert h.started is not None
        head = struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, C.NBD_CMD_WRITE, 9, offset, declared)
    else:
        h.feed(struct.pack(">I", 3))
        opt = 0x1234 if which == "option" else O.NBD_OPT_SET_META_CONTEXT
        head = struct.pack(">QII", IHAVEOPT, opt, declared)
    body = b"\x5a" * sent
    chunks = [head, *(body[i : i + step] for i in range(0, sent, step))]
    peak = _traced_peak(h, chunks)
    assert len(h.conn._buf) <= sent + len(head)
    assert peak <= 2 * sent + (256 << 10), (peak, sent)


def test_eof_after_every_prefix_of_every_recorded_session() -> None:
    """EOF anywhere in a real session: a clean close (maybe truncated), never an error."""
    for name, data in RECORDED.items():
        cuts = range(0, len(data), 1) if len(data) < 10000 else _STARTS[name]
        for cut in cuts:
            for extra in (0, 1, 5) if len(data) < 10000 else (0, 3, 29):
                h = check_case((0, [data[: cut + extra]]))
                assert h.failed is None, (name, cut + extra, h.failed)


#: Fuzz targets for ``benchmarks/fuzz.py``: name -> (strategy of one input, check).
TARGETS: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], object]]] = {
    "nbd-handshake": (handshake_case(), check_case),
    "nbd-requests": (request_case(), check_case),
    "nbd-recorded": (mutated_session(), check_case),
}
