"""TLS for the NBD server (``NBD_OPT_STARTTLS``), with X.509 certificates as QEMU uses them.

The server side is Python's :mod:`ssl` (OpenSSL); the client is normally QEMU with a
``tls-creds-x509`` object (GnuTLS), or libnbd.  :class:`TlsConfig` holds what the
``--tls*`` options of ``nbdvma serve`` say and builds the server's
:class:`ssl.SSLContext`: TLS 1.2 or later, the server certificate and key, and, with
``verify_client``, a client certificate required and checked against a CA.

What the client side needs is in ``docs/security.md``; :func:`qemu_tls_object` and
:func:`qemu_nbd_tls_fields` build the QMP arguments for it (``object-add`` of the
credentials, and the ``tls-creds``/``tls-hostname`` members of the NBD block node).

PSK (QEMU's ``tls-creds-psk``) is not supported: Python 3.11's :mod:`ssl` has no PSK
API at all, so it cannot act as a TLS 1.3 PSK server, and TLS is not something to
hand-roll.  Use X.509 certificates (a private CA is enough; see docs/security.md).
"""

from __future__ import annotations

import os
import ssl
from typing import NoReturn

import attrs

from nbdvma.errors import TlsError
from nbdvma.nbd import TlsMode

__all__ = ["TlsConfig", "TlsError", "TlsMode", "qemu_nbd_tls_fields", "qemu_tls_object"]


def _no_password() -> NoReturn:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise TlsError("the TLS private key is encrypted; give an unencrypted key file")


@attrs.frozen
class TlsConfig:
    """The server's TLS settings (``--tls``, ``--tls-cert``, ``--tls-key``, ...).

    Attributes:
        mode: ``OFF`` (STARTTLS refused), ``ON`` (offered; plain text allowed) or
            ``REQUIRE`` (nothing but STARTTLS before TLS).
        cert: PEM file with the server certificate (and any intermediate CAs).
        key: PEM file with its private key (unencrypted); may be the same file.
        ca: PEM file with the CA certificate(s) that client certificates must chain
            to; used only with ``verify_client``.
        verify_client: require a client certificate signed by ``ca`` (QEMU's
            ``verify-peer=on`` on a server endpoint).

    Raises:
        TlsError: (from the constructor) a mode other than ``OFF`` without a
            certificate and key, or ``verify_client`` without ``ca`` (or the reverse).
    """

    mode: TlsMode = TlsMode.OFF
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    verify_client: bool = False

    def __attrs_post_init__(self) -> None:
        if self.mode is TlsMode.OFF:
            if self.cert or self.key or self.ca or self.verify_client:
                raise TlsError("--tls-cert/--tls-key/--tls-ca/--tls-verify-client need --tls")
            return
        if not (self.cert and self.key):
            raise TlsError(f"--tls {self.mode.value} needs --tls-cert and --tls-key")
        if self.verify_client and not self.ca:
            raise TlsError("--tls-verify-client needs --tls-ca")
        if self.ca and not self.verify_client:
            raise TlsError("--tls-ca is used only with --tls-verify-client")

    @classmethod
    def from_creds_dir(
        cls, directory: str, mode: TlsMode = TlsMode.REQUIRE, *, verify_client: bool = False
    ) -> TlsConfig:
        """The server side of a credentials directory in QEMU's ``tls-creds-x509`` layout.

        ``server-cert.pem`` and ``server-key.pem`` are the server's; ``ca-cert.pem`` is
        the CA that signs client certificates (read only with ``verify_client``).  The
        files are read by :meth:`server_context`, which names any that is missing.

        Raises:
            TlsError: ``mode`` is ``OFF`` (a credentials directory is for TLS).
        """
        if mode is TlsMode.OFF:
            raise TlsError("--tls off contradicts --tls-creds: give --tls on or require")
        return cls(
            mode=mode,
            cert=os.path.join(directory, "server-cert.pem"),
            key=os.path.join(directory, "server-key.pem"),
            ca=os.path.join(directory, "ca-cert.pem") if verify_client else None,
            verify_client=verify_client,
        )

    @property
    def enabled(self) -> bool:
        """Whether STARTTLS is accepted at all."""
        return self.mode is not TlsMode.OFF

    def server_context(self) -> ssl.SSLContext | None:
        """The server's SSL context (``None`` when TLS is off).

        Raises:
            TlsError: a file is missing or unreadable, not PEM, or the key does not
                match the certificate.
        """
        if not self.enabled:
            return None
        assert self.cert is not None
        assert self.key is not None
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if path is not None:
                _check_readable(what, path)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # the NBD spec's MUST
        # No client-initiated TLS 1.2 renegotiation (a CPU denial of service).
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        try:  # (ssl.SSLError is an OSError)
            ctx.load_cert_chain(self.cert, self.key, password=_no_password)
        except OSError as exc:
            raise TlsError(
                f"cannot load the TLS certificate {self.cert} with the key {self.key}: "
                f"{_ssl_reason(exc)}"
            ) from None
        if self.verify_client:
            assert self.ca is not None
            try:
                ctx.load_verify_locations(cafile=self.ca)
            except OSError as exc:
                raise TlsError(f"cannot load the TLS CA {self.ca}: {_ssl_reason(exc)}") from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def _check_readable(what: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TlsError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None


def _ssl_reason(exc: OSError) -> str:
    reason = getattr(exc, "reason", None)
    if reason:  # "KEY_VALUES_MISMATCH", "NO_START_LINE"...
        return str(reason).lower().replace("_", " ")
    return str(exc.strerror or exc)


def qemu_tls_object(
    creds_id: str, directory: str, *, verify_peer: bool = True
) -> dict[str, object]:
    """The QMP ``object-add`` arguments of QEMU's client-side X.509 credentials.

    ``directory`` is a path *on QEMU's host* holding ``ca-cert.pem`` (the CA that
    signed nbdvma's server certificate) and, if the server verifies clients,
    ``client-cert.pem`` and ``client-key.pem``.

    Returns:
        ``{"qom-type": "tls-creds-x509", "id": ..., "dir": ..., "endpoint": "client",
        "verify-peer": ...}``, for ``{"execute": "object-add", "arguments": ...}``
        (QEMU >= 6.0 takes the properties flat).
    """
    return {
        "qom-type": "tls-creds-x509",
        "id": creds_id,
        "dir": directory,
        "endpoint": "client",
        "verify-peer": verify_peer,
    }


def qemu_nbd_tls_fields(creds_id: str, hostname: str | None = None) -> dict[str, str]:
    """The members to add to an ``nbd`` block node (``blockdev-add``) for TLS.

    Args:
        creds_id: the ``id`` of the ``tls-creds-x509`` object.
        hostname: the name QEMU checks the server certificate against.  Needed for a
            unix socket (QEMU has no host name to check then); over TCP QEMU uses
            the server's host unless this overrides it.  ``tls-hostname`` exists
            since QEMU 7.0.
    """
    fields = {"tls-creds": creds_id}
    if hostname is not None:
        fields["tls-hostname"] = hostname
    return fields
