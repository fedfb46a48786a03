"""TLS (``NBD_OPT_STARTTLS``) end to end: ``nbdvma serve --tls ...`` with real clients.

Certificates are made once per session with the ``openssl`` CLI: a CA, a server
certificate for ``IP:127.0.0.1`` and ``DNS:localhost``, a client certificate from the
same CA, and one from a foreign CA.  Client credentials are laid out as QEMU's
``tls-creds-x509`` (and libnbd's ``set_tls_certificates``) expect a directory:
``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``.

Every archive written through TLS is checked with ``nbdvma extract`` against the
source image.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pytest
from nbd_client_sansio import Reader, client_flags, info_payload, option
from servehelpers import ServeProcess, StartServe, extract_disks, poll_until, run_tool

from nbdvma.nbd.constants import NbdOption, NbdRep

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 4 * MiB
O = NbdOption  # noqa: E741
R = NbdRep


# -- certificates ------------------------------------------------------------------------


@attrs.frozen
class Pki:
    """Files made by :func:`pki`.

    Attributes:
        server_cert / server_key / ca: for ``serve --tls-cert/--tls-key/--tls-ca``.
        client: a QEMU/libnbd credentials dir with a good client certificate.
        ca_only: a credentials dir with only ``ca-cert.pem`` (no client certificate).
        foreign: a credentials dir whose client certificate is from another CA (which
            it also trusts, unlike the server).
    """

    server_cert: Path
    server_key: Path
    ca: Path
    client: Path
    ca_only: Path
    foreign: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60
    )


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem", "-subj", f"/CN={name}"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        cwd=d,
    )


def _make_cert(d: Path, name: str, ca: str, extensions: str) -> None:
    # GnuTLS (QEMU, libnbd) checks key usage and purpose as qcrypto_tls_creds_check_cert.
    (d / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n" + extensions
    )
    _openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem"),
        *("-out", f"{name}.csr", "-subj", f"/CN={name}"),
        cwd=d,
    )
    _openssl(
        *("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem"),
        *("-CAkey", f"{ca}-key.pem", "-CAcreateserial", "-days", "2"),
        *("-out", f"{name}-cert.pem", "-extfile", f"{name}.ext"),
        cwd=d,
    )


def _creds_dir(d: Path, *cas: Path, cert: Path | None = None, key: Path | None = None) -> Path:
    d.mkdir()
    (d / "ca-cert.pem").write_bytes(b"".join(ca.read_bytes() for ca in cas))
    if cert is not None and key is not None:
        (d / "client-cert.pem").write_bytes(cert.read_bytes())
        (d / "client-key.pem").write_bytes(key.read_bytes())
    return d


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, server and client certificates, and QEMU-style client credentials dirs."""
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "otherca")
    _make_cert(d, "server", "ca", "extendedKeyUsage=serverAuth\n"
               "subjectAltName=IP:127.0.0.1,DNS:localhost\n")  # fmt: skip
    _make_cert(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _make_cert(d, "intruder", "otherca", "extendedKeyUsage=clientAuth\n")
    ca = d / "ca-cert.pem"
    return Pki(
        server_cert=d / "server-cert.pem",
        server_key=d / "server-key.pem",
        ca=ca,
        client=_creds_dir(d / "client", ca, cert=d / "client-cert.pem", key=d / "client-key.pem"),
        ca_only=_creds_dir(d / "ca-only", ca),
        # QEMU checks its own certificate against its ca-cert.pem before connecting,
        # so the foreign CA is in there too: the refusal must come from the server.
        foreign=_creds_dir(
            d / "foreign",
            ca,
            d / "otherca-cert.pem",
            cert=d / "intruder-cert.pem",
            key=d / "intruder-key.pem",
        ),
    )


def tls_args(pki: Pki, mode: str = "require", *, verify: bool = False) -> list[str]:
    """``serve`` options for TLS with the test PKI."""
    args = ["--tls", mode, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    if verify:
        args += ["--tls-ca", str(pki.ca), "--tls-verify-client"]
    return args


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def source(raw_image: Callable[..., Path]) -> Path:
    """A 4 MiB image with data, an unaligned run and holes."""
    return raw_image(
        "src.raw",
        SIZE,
        {0: os.urandom(65536), MiB + 512: b"\xab" * 5000, SIZE - 4096: os.urandom(4096)},
    )


def qemu_tls_target(
    creds: Path, export: str, *, port: int | None = None, unix: str | None = None, **extra: str
) -> list[str]:
    """qemu-img arguments for an NBD target with ``tls-creds-x509`` credentials."""
    if unix is not None:
        server = f"server.type=unix,server.path={unix}"
    else:
        server = f"server.type=inet,server.host=127.0.0.1,server.port={port}"
    opts = ",".join([f"driver=nbd,{server},export={export},tls-creds=tls0"] + [
        f"{k.replace('_', '-')}={v}" for k, v in extra.items()
    ])  # fmt: skip
    return [
        "--object",
        f"tls-creds-x509,id=tls0,dir={creds},endpoint=client",
        "--target-image-opts",
        opts,
    ]


def qemu_img_convert(qemu_img: str, src: Path, target: list[str], *, check: bool = True) -> Any:
    return run_tool(
        [qemu_img, "convert", "-n", "-f", "raw", str(src), *target], timeout=60, check=check
    )


def finished(server: ServeProcess, workdir: Path, expected: dict[str, bytes]) -> None:
    """The server exits 0 by itself and the archive holds exactly ``expected``."""
    assert server.wait() == 0, server.stderr()
    assert extract_disks(workdir / "out.vma", workdir / "x") == expected


def raw_connect(server: ServeProcess, transport: str = "tcp") -> socket.socket:
    if transport == "tcp":
        sock = socket.create_connection(("127.0.0.1", server.tcp_port or 0), timeout=10)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(server.unix or "")
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += data
    return out


def read_option_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    head = recv_exactly(sock, 20)
    length = struct.unpack(">I", head[16:])[0]
    return Reader(head + recv_exactly(sock, length)).option_reply()


def handshake(sock: socket.socket) -> None:
    assert Reader(recv_exactly(sock, 18)).greeting() == 3
    sock.sendall(client_flags(3))


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed (EOF or reset) without sending anything more."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- TLS with QEMU ------------------------------------------------------------------------


@pytest.mark.parametrize("verify", [False, True], ids=["server-auth", "mutual"])
def test_qemu_img_tcp_require(
    serve: StartServe, pki: Pki, qemu_img: str, source: Path, workdir: Path, verify: bool
) -> None:
    server = serve({"d0": SIZE}, tls_args(pki, verify=verify), unix=False)
    creds = pki.client if verify else pki.ca_only
    qemu_img_convert(qemu_img, source, qemu_tls_target(creds, "d0", port=server.tcp_port))
    finished(server, workdir, {"d0": source.read_bytes()})
    assert "TLS handshake failed" not in server.stderr()


def test_qemu_img_unix_require_needs_tls_hostname(
    serve: StartServe, pki: Pki, qemu_img: str, source: Path, workdir: Path
) -> None:
    server = serve({"d0": SIZE}, tls_args(pki, verify=True), tcp=False)
    assert server.unix is not None
    # Without tls-hostname QEMU has no name to check the certificate against.
    no_name = qemu_tls_target(pki.client, "d0", unix=server.unix)
    assert qemu_img_convert(qemu_img, source, no_name, check=False).returncode != 0
    target = qemu_tls_target(pki.client, "d0", unix=server.unix, tls_hostname="localhost")
    qemu_img_convert(qemu_img, source, target)
    finished(server, workdir, {"d0": source.read_bytes()})


def test_qemu_img_tls_against_tls_off_fails(
    serve: StartServe, pki: Pki, qemu_img: str, source: Path
) -> None:
    server = serve({"d0": SIZE}, [], unix=False)
    result = qemu_img_convert(
        qemu_img, source, qemu_tls_target(pki.ca_only, "d0", port=server.tcp_port), check=False
    )
    assert result.returncode != 0
    assert "TLS" in result.stderr or "tls" in result.stderr
    assert server.alive()


# -- TLS with libnbd ----------------------------------------------------------------------


def libnbd_tls(libnbd: ModuleType, creds: Path | None) -> Any:
    h = libnbd.NBD()
    h.set_tls(libnbd.TLS_REQUIRE)
    if creds is not None:
        h.set_tls_certificates(str(creds))
    return h


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_libnbd_tls_client(
    serve: StartServe, pki: Pki, libnbd: ModuleType, workdir: Path, transport: str
) -> None:
    server = serve({"d0": 2 * MiB}, tls_args(pki, verify=True))
    h = libnbd_tls(libnbd, pki.client)
    h.set_export_name("d0")
    if transport == "tcp":
        h.connect_tcp("127.0.0.1", str(server.tcp_port))
    else:
        h.connect_unix(server.unix)
    assert h.get_tls_negotiated()
    assert h.get_size() == 2 * MiB
    data = os.urandom(MiB)
    h.pwrite(data, 0)
    h.zero(MiB, MiB)
    h.flush()
    assert h.pread(4096, 0) == data[:4096]
    h.shutdown()
    finished(server, workdir, {"d0": data + bytes(MiB)})


# -- FORCEDTLS: plain clients see nothing --------------------------------------------------


def test_require_plain_libnbd_and_nbdinfo_see_no_export(
    serve: StartServe, pki: Pki, libnbd: ModuleType, nbdinfo: str
) -> None:
    server = serve({"secret-disk": SIZE}, tls_args(pki))
    for uri in (server.uri("secret-disk", "tcp"), server.uri("secret-disk", "unix")):
        h = libnbd.NBD()
        h.set_opt_mode(True)
        h.connect_uri(uri)
        listed: list[str] = []
        with pytest.raises(libnbd.Error):
            h.opt_list(lambda name, desc, out=listed: out.append(name))
        assert listed == []
        for op in (h.opt_info, h.opt_go):
            with pytest.raises(libnbd.Error):
                op()
        h.opt_abort()
        result = run_tool([nbdinfo, "--list", uri], check=False)
        assert result.returncode != 0
        assert "secret-disk" not in result.stdout + result.stderr
    assert server.alive()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_require_raw_options_get_tls_reqd(serve: StartServe, pki: Pki, transport: str) -> None:
    server = serve({"d0": SIZE}, tls_args(pki))
    with raw_connect(server, transport) as sock:
        handshake(sock)
        for opt, payload in [
            (O.NBD_OPT_LIST, b""),
            (O.NBD_OPT_INFO, info_payload(b"d0")),
            (O.NBD_OPT_GO, info_payload(b"d0")),
            (O.NBD_OPT_GO, info_payload(b"")),
            (O.NBD_OPT_STRUCTURED_REPLY, b""),
            (0x1234, b"junk"),
        ]:
            sock.sendall(option(opt, payload))
            assert read_option_reply(sock) == (opt, R.NBD_REP_ERR_TLS_REQD, b"TLS required")
        # EXPORT_NAME cannot be answered with an error: the session ends, nothing leaks.
        sock.sendall(option(O.NBD_OPT_EXPORT_NAME, b"d0"))
        assert closed_by_server(sock)


def test_require_plain_qemu_img_refused(
    serve: StartServe, pki: Pki, qemu_img: str, source: Path
) -> None:
    server = serve({"d0": SIZE}, tls_args(pki), unix=False)
    result = run_tool(
        [qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(source),
         server.uri("d0", "tcp")],
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "TLS" in result.stderr
    assert server.alive()


# -- client certificates -------------------------------------------------------------------


def test_verify_client_rejects_missing_and_foreign_certificates(
    serve: StartServe,
    pki: Pki,
    qemu_img: str,
    libnbd: ModuleType,
    source: Path,
    workdir: Path,
) -> None:
    server = serve({"d0": SIZE}, [*tls_args(pki, verify=True), "-v"], unix=False)
    for creds in (pki.ca_only, pki.foreign):
        target = qemu_tls_target(creds, "d0", port=server.tcp_port)
        result = qemu_img_convert(qemu_img, source, target, check=False)
        assert result.returncode != 0, creds
    for lib_creds in (None, pki.ca_only, pki.foreign):
        h = libnbd_tls(libnbd, lib_creds)
        if lib_creds is None:
            h.set_tls_verify_peer(False)  # no CA to check the server with
        with pytest.raises(libnbd.Error):
            h.connect_uri(server.uri("d0", "tcp"))
    poll_until(
        lambda: server.stderr().count("TLS handshake failed") >= 5,
        10,
        "five failed TLS handshakes in the log",
    )
    log = server.stderr()
    assert log.count("PEER_DID_NOT_RETURN_A_CERTIFICATE") == 3
    assert log.count("CERTIFICATE_VERIFY_FAILED") == 2
    assert server.alive()
    # The server is unharmed: the rightful client completes the backup.
    qemu_img_convert(qemu_img, source, qemu_tls_target(pki.client, "d0", port=server.tcp_port))
    finished(server, workdir, {"d0": source.read_bytes()})


# -- SELECTIVETLS ------------------------------------------------------------------------------


def test_tls_on_accepts_plain_and_tls(
    serve: StartServe,
    pki: Pki,
    qemu_img: str,
    libnbd: ModuleType,
    source: Path,
    workdir: Path,
) -> None:
    server = serve({"plain": SIZE, "tls": SIZE, "lib": MiB}, tls_args(pki, "on"), unix=False)
    run_tool(
        [qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(source),
         server.uri("plain", "tcp")]
    )  # fmt: skip
    qemu_img_convert(qemu_img, source, qemu_tls_target(pki.ca_only, "tls", port=server.tcp_port))
    h = libnbd.NBD()
    h.set_tls(libnbd.TLS_ALLOW)
    h.set_tls_certificates(str(pki.ca_only))
    h.set_export_name("lib")
    h.connect_tcp("127.0.0.1", str(server.tcp_port))
    assert h.get_tls_negotiated()  # ALLOW: libnbd takes TLS when offered
    h.pwrite(b"\x5a" * MiB, 0)
    h.flush()
    h.shutdown()
    src = source.read_bytes()
    finished(server, workdir, {"plain": src, "tls": src, "lib": b"\x5a" * MiB})


# -- the TLS handshake itself --------------------------------------------------------------


def test_tls_handshake_is_under_the_handshake_deadline(serve: StartServe, pki: Pki) -> None:
    server = serve({"d0": SIZE}, [*tls_args(pki), "--handshake-timeout", "1", "-v"])
    with raw_connect(server) as sock:
        handshake(sock)
        sock.sendall(option(O.NBD_OPT_STARTTLS))
        assert read_option_reply(sock) == (O.NBD_OPT_STARTTLS, R.NBD_REP_ACK, b"")
        start = time.monotonic()
        assert closed_by_server(sock)  # no ClientHello: dropped at the deadline
        assert 0.5 < time.monotonic() - start < 8
    poll_until(lambda: "deadline" in server.stderr(), 10, "the deadline in the log")


def test_plain_text_after_starttls_is_refused(serve: StartServe, pki: Pki) -> None:
    server = serve({"d0": SIZE}, [*tls_args(pki), "-v"])
    with raw_connect(server) as sock:
        handshake(sock)
        # An injected option right behind STARTTLS, before any TLS: no ACK, dropped.
        sock.sendall(option(O.NBD_OPT_STARTTLS) + option(O.NBD_OPT_LIST))
        assert closed_by_server(sock)
    poll_until(lambda: "before the TLS handshake" in server.stderr(), 10, "the reason logged")


def test_not_tls_after_ack_fails_cleanly(serve: StartServe, pki: Pki) -> None:
    server = serve({"d0": SIZE}, [*tls_args(pki), "-v"])
    with raw_connect(server) as sock:
        handshake(sock)
        sock.sendall(option(O.NBD_OPT_STARTTLS))
        assert read_option_reply(sock)[1] == R.NBD_REP_ACK
        sock.sendall(option(O.NBD_OPT_LIST))  # plain text where a ClientHello belongs
        assert closed_by_server(sock)
    poll_until(lambda: "TLS handshake failed" in server.stderr(), 10, "the failure logged")
    assert server.alive()


# -- --tls-creds DIR: QEMU's layout, TLS required ------------------------------------------


@pytest.fixture(scope="session")
def server_creds(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's credentials dir as qemu-nbd takes it: ca-cert.pem, server-*.pem."""
    d = tmp_path_factory.mktemp("server-creds")
    for path in (pki.ca, pki.server_cert, pki.server_key):
        (d / path.name).write_bytes(path.read_bytes())
    return d


@pytest.mark.parametrize("verify", [False, True], ids=["server-auth", "mutual"])
def test_tls_creds_dir_means_require(
    serve: StartServe,
    pki: Pki,
    server_creds: Path,
    qemu_img: str,
    source: Path,
    workdir: Path,
    verify: bool,
) -> None:
    """``--tls-creds DIR`` alone requires TLS: a plain client is refused, a TLS one
    (with a client certificate when ``--tls-verify-client``) writes the archive."""
    extra = ["--tls-creds", str(server_creds), *(["--tls-verify-client"] if verify else [])]
    server = serve({"d0": SIZE}, extra, unix=False)
    plain = run_tool(
        [qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(source),
         server.uri("d0", "tcp")],
        check=False,
    )  # fmt: skip
    assert plain.returncode != 0
    assert "TLS" in plain.stderr
    if verify:  # ca-cert.pem of DIR is the one that checks client certificates
        no_cert = qemu_tls_target(pki.ca_only, "d0", port=server.tcp_port)
        assert qemu_img_convert(qemu_img, source, no_cert, check=False).returncode != 0
    creds = pki.client if verify else pki.ca_only
    qemu_img_convert(qemu_img, source, qemu_tls_target(creds, "d0", port=server.tcp_port))
    finished(server, workdir, {"d0": source.read_bytes()})


@pytest.mark.parametrize(
    ("mode", "scheme", "level"), [("require", "nbds", "2"), ("on", "nbd", "1")]
)
def test_run_command_gets_the_tls_uri(
    pki: Pki,
    server_creds: Path,
    nbdcopy: str,
    source: Path,
    workdir: Path,
    mode: str,
    scheme: str,
    level: str,
) -> None:
    """``--run`` with TLS: ``$uri`` is ``nbds://`` when TLS is required (and a client
    that follows it uses TLS), ``$tls`` is nbdkit's 1 (on) or 2 (require)."""
    run = (
        'printf "%s %s\\n" "$uri" "$tls" > env.out && '
        f'nbdcopy --flush {source} "$uri?tls-certificates={pki.ca_only}"'
    )
    result = run_tool(
        [sys.executable, "-m", "nbdvma", "serve", str(workdir / "out.vma"), "--disk",
         f"d0={SIZE}", "--listen", "tcp:127.0.0.1:0", "--tls-creds", str(server_creds),
         "--tls", mode, "--run", run, "-v"],
        check=False, timeout=60, cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    port = result.stderr.split("listening on tcp:127.0.0.1:", 1)[1].split()[0]
    assert (workdir / "env.out").read_text() == f"{scheme}://127.0.0.1:{port}/d0 {level}\n"
    assert "TLS handshake failed" not in result.stderr
    assert extract_disks(workdir / "out.vma", workdir / "x") == {"d0": source.read_bytes()}


def test_tls_creds_dir_missing_file_is_named(workdir: Path, server_creds: Path) -> None:
    partial = workdir / "creds"
    partial.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem"):
        (partial / name).write_bytes((server_creds / name).read_bytes())
    result = run_tool(
        [sys.executable, "-m", "nbdvma", "serve", str(workdir / "out.vma"), "--disk", "d0=1M",
         "--listen", "tcp:127.0.0.1:0", "--tls-creds", str(partial)],
        check=False, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        f"nbdvma serve: cannot read the TLS key {partial}/server-key.pem: "
        "No such file or directory\n"
    )
    assert not (workdir / "out.vma.part").exists()


# -- option errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls", "require"], "--tls require needs --tls-cert and --tls-key"),
        (["--tls-cert", "x.pem"], "need --tls"),
        (["--tls", "on", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.pem"],
         "cannot read the TLS certificate /nonexistent.pem: No such file"),
        (["--tls", "on", "--tls-verify-client", "--tls-cert", "c", "--tls-key", "k"],
         "--tls-verify-client needs --tls-ca"),
        (["--idle-timeout", "0"], "positive number of seconds"),
        (["--tls-creds", "/etc", "--tls-key", "k.pem"],
         "--tls-creds DIR holds the certificate, key and CA: "
         "give it or --tls-cert/--tls-key/--tls-ca, not both"),
        (["--tls-creds", "/etc", "--tls", "off"], "--tls off contradicts --tls-creds"),
    ],
)  # fmt: skip
def test_option_errors_are_one_line(workdir: Path, args: list[str], message: str) -> None:
    archive = workdir / "out.vma"
    result = run_tool(
        [sys.executable, "-m", "nbdvma",
         "serve", str(archive), "--disk", "d0=1M", "--listen", "tcp:127.0.0.1:0", *args],
        check=False,
        timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert message in result.stderr.strip().splitlines()[-1]  # (after argparse's usage)
    assert "Traceback" not in result.stderr
    assert not (workdir / "out.vma.part").exists()


def test_bad_key_and_mismatch(workdir: Path, pki: Pki) -> None:
    wrong = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client / "client-key.pem")]
    enc = workdir / "enc-key.pem"
    subprocess.run(
        ["openssl", "pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:x",
         "-out", str(enc)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    encrypted = ["--tls-cert", str(pki.server_cert), "--tls-key", str(enc)]
    for args, message in [(wrong, "key values mismatch"), (encrypted, "encrypted")]:
        result = run_tool(
            [sys.executable, "-m", "nbdvma", "serve", str(workdir / "out.vma"), "--disk", "d0=1M",
             "--listen", "tcp:127.0.0.1:0", "--tls", "require", *args],
            check=False, timeout=30,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (workdir / "out.vma.part").exists()
