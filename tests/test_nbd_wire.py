"""nbdvma.nbd.wire and constants: layouts, untrusted parsers, encoders, receive buffer."""

from __future__ import annotations

import contextlib
import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nbd_client_sansio import info_payload, meta_payload

from nbdvma.errors import (
    NBD_ERRNO_NAMES,
    LocalProtocolError,
    PartialBufferFullError,
    RemoteProtocolError,
    VmaWriterError,
    errno_for_exception,
)
from nbdvma.nbd import wire
from nbdvma.nbd.constants import (
    NbdClientFlag,
    NbdCmdFlag,
    NbdError,
    NbdOption,
    NbdRep,
    NbdTransmissionFlag,
    nbd_error_from_errno,
)


def test_layout_sizes() -> None:
    assert wire.GREETING.size == 18
    assert wire.OPTION_HEADER.size == 16
    assert wire.OPTION_REPLY_HEADER.size == 20
    assert wire.REQUEST_HEADER.size == 28
    assert wire.SIMPLE_REPLY.size == 16
    assert wire.STRUCTURED_REPLY_HEADER.size == 20
    assert wire.INFO_EXPORT.size == 12
    assert wire.INFO_BLOCK_SIZE.size == 14


def test_constants_match_spec() -> None:
    assert NbdOption.NBD_OPT_GO == 7
    assert NbdRep.NBD_REP_ERR_UNSUP == 2**31 + 1
    assert NbdRep.NBD_REP_ERR_TOO_BIG == 2**31 + 9
    assert NbdTransmissionFlag.NBD_FLAG_SEND_FAST_ZERO == 0x800
    assert NbdCmdFlag.NBD_CMD_FLAG_FAST_ZERO == 0x10


# --- receive buffer -------------------------------------------------------------


def test_receive_buffer_basics() -> None:
    buf = wire.ReceiveBuffer()
    chunk = b"0123456789"
    buf.append(chunk)
    buf.append(bytearray(b"abc"))
    buf.append(b"")
    assert len(buf) == 13
    assert buf.consume_exactly(14) is None
    assert len(buf) == 13
    assert buf.consume_exactly(0) == b""
    assert buf.consume_exactly(4) == b"0123"
    assert buf.consume_exactly(8) == b"456789ab"
    assert buf.discard(5) == 1
    assert len(buf) == 0
    buf.append(chunk)
    assert buf.consume_exactly(10) is chunk  # a whole chunk: no copy


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(max_size=20), max_size=10),
    st.lists(
        st.tuples(st.sampled_from(["exactly", "into", "discard"]), st.integers(0, 30)), max_size=20
    ),
)
def test_receive_buffer_model(chunks: list[bytes], ops: list[tuple[str, int]]) -> None:
    buf = wire.ReceiveBuffer()
    model = b""
    for c in chunks:
        buf.append(c)
        model += c
    for op, n in ops:
        if op == "exactly":
            got = buf.consume_exactly(n)
            if n > len(model):
                assert got is None
            else:
                assert got == model[:n]
                model = model[n:]
        elif op == "into":
            # Into the middle of a larger buffer: nothing outside the view is touched.
            out = bytearray(b"\xee" * (n + 4))
            moved = buf.consume_into(memoryview(out)[2 : 2 + n])
            assert moved == min(n, len(model))
            assert out == b"\xee" * 2 + model[:moved] + b"\xee" * (n + 2 - moved)
            model = model[moved:]
        else:
            assert buf.discard(n) == min(n, len(model))
            model = model[n:]
        assert len(buf) == len(model)


# --- parsers --------------------------------------------------------------------


def test_parse_client_flags() -> None:
    assert wire.parse_client_flags_untrusted(b"\0\0\0\x03") == 3
    assert wire.parse_client_flags_untrusted(b"\0\0\0\x01") == NbdClientFlag(1)
    for bad in (b"\0\0\0\x04", b"\x80\0\0\0", b"\0\0\0", b""):
        with pytest.raises(RemoteProtocolError):
            wire.parse_client_flags_untrusted(bad)


def test_parse_option_header() -> None:
    hdr = wire.parse_option_header_untrusted(b"IHAVEOPT\0\0\0\x07\0\0\x01\x00")
    assert hdr == wire.OptionHeader(7, 256)
    with pytest.raises(RemoteProtocolError, match="magic"):
        wire.parse_option_header_untrusted(b"IHAVEOPU" + bytes(8))
    with pytest.raises(RemoteProtocolError):
        wire.parse_option_header_untrusted(b"IHAVEOPT")


def test_parse_request_header() -> None:
    data = struct.pack(">IHHQQI", 0x25609513, 1, 6, 2**64 - 1, 4096, 512)
    assert wire.parse_request_header_untrusted(data) == wire.RequestHeader(
        1, 6, 2**64 - 1, 4096, 512
    )
    with pytest.raises(RemoteProtocolError, match="magic"):
        wire.parse_request_header_untrusted(b"\0" + data[1:])
    with pytest.raises(RemoteProtocolError):
        wire.parse_request_header_untrusted(data[:-1])


def test_parse_info_request() -> None:
    got = wire.parse_info_request_untrusted(info_payload(b"disk", (3, 1)), max_string=4096)
    assert got == wire.InfoRequest(b"disk", (3, 1))
    with pytest.raises(RemoteProtocolError):
        wire.parse_info_request_untrusted(info_payload(b"x" * 11), max_string=10)


def test_parse_meta_context_request() -> None:
    payload = meta_payload(b"disk", (b"base:", b"qemu:x"))
    got = wire.parse_meta_context_request_untrusted(payload, max_string=4096)
    assert got == wire.MetaContextRequest(b"disk", (b"base:", b"qemu:x"))
    assert wire.parse_meta_context_request_untrusted(
        meta_payload(b""), max_string=4096
    ) == wire.MetaContextRequest(b"", ())


PARSERS = [
    wire.parse_client_flags_untrusted,
    wire.parse_option_header_untrusted,
    wire.parse_request_header_untrusted,
    lambda b: wire.parse_info_request_untrusted(b, max_string=16),
    lambda b: wire.parse_meta_context_request_untrusted(b, max_string=16),
]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(PARSERS), st.binary(max_size=64))
def test_parsers_raise_only_remote_protocol_error(parser: object, data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parser(data)  # type: ignore[operator]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=8), st.lists(st.binary(max_size=8), max_size=5), st.binary(max_size=4))
def test_meta_payload_roundtrip_and_mutation(
    name: bytes, queries: list[bytes], junk: bytes
) -> None:
    payload = meta_payload(name, tuple(queries))
    got = wire.parse_meta_context_request_untrusted(payload, max_string=4096)
    assert got == wire.MetaContextRequest(name, tuple(queries))
    if junk:
        with pytest.raises(RemoteProtocolError):
            wire.parse_meta_context_request_untrusted(payload + junk, max_string=4096)


# --- encoders -------------------------------------------------------------------


def test_encoders() -> None:
    assert wire.encode_greeting(3) == b"NBDMAGICIHAVEOPT\0\x03"
    assert wire.encode_option_reply(7, NbdRep.NBD_REP_ACK) == (
        bytes.fromhex("0003e889045565a9") + b"\0\0\0\x07\0\0\0\x01\0\0\0\0"
    )
    assert wire.encode_simple_reply(5, 28) == bytes.fromhex("674466980000001c") + struct.pack(
        ">Q", 5
    )
    assert wire.encode_export_name_reply(1, 1, no_zeroes=False) == struct.pack(">QH", 1, 1) + bytes(
        124
    )
    assert wire.encode_offset_data_header(9, 1, 4096, 512) == bytes.fromhex(
        "668e33ef00010001"
    ) + struct.pack(">QIQ", 9, 520, 4096)
    assert wire.encode_none_chunk(3) == bytes.fromhex("668e33ef00010000") + struct.pack(">QI", 3, 0)
    chunk = wire.encode_error_chunk(4, 22, b"bad")
    assert chunk[-9:] == b"\0\0\0\x16\0\x03bad"
    bs = wire.encode_block_status_chunk(2, 1, 1, [(512, 3), (1024, 0)])
    assert bs[20:] == struct.pack(">IIIII", 1, 512, 3, 1024, 0)
    assert struct.unpack(">I", bs[16:20]) == (20,)


def test_encoder_range_checks() -> None:
    with pytest.raises(LocalProtocolError):
        wire.encode_error_chunk(1, 0, b"")
    with pytest.raises(LocalProtocolError):
        wire.encode_offset_hole_chunk(1, 0, 0, 0)
    with pytest.raises(LocalProtocolError):
        wire.encode_block_status_chunk(1, 1, 1, [(0, 0)])
    with pytest.raises(LocalProtocolError):
        wire.encode_block_status_chunk(1, 1, 1, [(1, 2**32)])


def test_nbd_error_from_errno() -> None:
    assert nbd_error_from_errno(errno.ENOSPC) is NbdError.NBD_ENOSPC
    assert nbd_error_from_errno(errno.EDQUOT) is NbdError.NBD_ENOSPC
    assert nbd_error_from_errno(errno.ESHUTDOWN) == 108
    assert nbd_error_from_errno(errno.EBADF) is NbdError.NBD_EIO
    assert nbd_error_from_errno(errno.EROFS) is NbdError.NBD_EPERM


def test_errno_table_speaks_only_nbd_errors() -> None:
    # The one table maps into exactly the eight values the spec allows, each by itself.
    names = {f"NBD_{name}" for name in NBD_ERRNO_NAMES.values()}
    assert names == {e.name for e in NbdError}
    for e in NbdError:
        assert NBD_ERRNO_NAMES[getattr(errno, e.name[4:])] == e.name[4:]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
        (OSError(errno.EDQUOT, "quota"), errno.ENOSPC),
        (OSError(errno.EFBIG, "too big"), errno.ENOSPC),
        (OSError(errno.EROFS, "read-only"), errno.EPERM),
        (OSError(errno.EACCES, "denied"), errno.EPERM),
        (OSError(errno.EOPNOTSUPP, "no"), errno.ENOTSUP),
        (OSError(errno.EBADF, "bad fd"), errno.EIO),
        (OSError("no errno"), errno.EIO),
        (PartialBufferFullError("full"), errno.ENOMEM),
        (VmaWriterError("bad"), errno.EINVAL),
        (MemoryError(), errno.ENOMEM),
        (RuntimeError("bug"), errno.EIO),
    ],
)
def test_errno_for_exception(exc: BaseException, expected: int) -> None:
    err = errno_for_exception(exc)
    assert err == expected
    # The server sends what send_error maps it to: the same value on the wire.
    assert nbd_error_from_errno(err) == expected
