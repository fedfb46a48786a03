"""What ``serve``, ``backup`` and ``export`` share on the command line: options (and
the groups of them ``serve`` and ``export`` both take), one-line errors."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from nbdvma.errors import ActivationError, AddressError, NbdvmaError, TlsError, VmaWriterError
from nbdvma.units import parse_size
from nbdvma.vma.zstdframes import parse_compression

if TYPE_CHECKING:
    # Imported where used: the archive tools (create) take options from here too,
    # and must not load the server (trio) to start.
    from nbdvma.addresses import Address
    from nbdvma.limits import ServerLimits
    from nbdvma.tls import TlsConfig

__all__ = [
    "add_access_options",
    "add_compress_option",
    "add_listen_options",
    "add_output_options",
    "address_argument",
    "compress_argument",
    "count_argument",
    "describe_error",
    "first_error",
    "log_to_stderr",
    "mode_argument",
    "read_configs",
    "run_reporting",
    "seconds_argument",
    "server_limits",
    "size_argument",
    "tls_config",
]


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a nursery's exception group: its first leaf.

    trio wraps whatever fails inside a nursery in a group; the CLI reports one line.
    """
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def describe_error(exc: BaseException) -> str:
    """One line for an error that ends a command: the thing it concerns, then why.

    An ``OSError`` names its file (``/srv/x.vma.part: No space left on device``);
    a nursery's exception group is reported by its first error.
    """
    if isinstance(exc, BaseExceptionGroup):
        exc = first_error(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def run_reporting(say: Callable[[str], None], body: Callable[[], int]) -> int:
    """Run a command's ``body``; an error that ends it (an ``NbdvmaError``, an
    ``OSError``, or either inside a nursery's group) becomes one line through ``say``
    (:func:`describe_error`) and exit status 1.  Anything else is a bug: raised."""
    try:
        return body()
    except (NbdvmaError, OSError, BaseExceptionGroup) as exc:
        if isinstance(exc, BaseExceptionGroup) and not isinstance(
            first_error(exc), NbdvmaError | OSError
        ):
            raise first_error(exc) from None
        say(describe_error(exc))
        return 1


def add_compress_option(parser: argparse.ArgumentParser) -> None:
    """``--compress zstd[:LEVEL]`` (``serve``, ``backup``)."""
    parser.add_argument(
        "--compress",
        type=compress_argument,
        metavar="zstd[:LEVEL]",
        help="compress the archive with zstd, on every core (level 1-19; default 3, vzdump's)",
    )


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--force`` and ``--s3-endpoint URL``: how the archive is written (``serve``,
    ``backup``, ``create``)."""
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an archive that exists under ARCHIVE (at the end, once the new one "
        "is complete; default: refuse to start)",
    )
    parser.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="the S3 endpoint of an s3://BUCKET/KEY archive, e.g. http://127.0.0.1:8333 "
        "(default: AWS_ENDPOINT_URL, the AWS profile's, else AWS); credentials and region "
        "come from the AWS variables and files (docs/s3.md)",
    )


def log_to_stderr(prefix: str, *, verbose: bool) -> None:
    """Show the library's log records (``nbdvma.*``) on stderr: warnings always, as
    ``PREFIXwarning: …``; with ``verbose`` the INFO records too, as ``PREFIX…``."""

    class _Format(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            level = "warning: " if record.levelno >= logging.WARNING else ""
            return f"{prefix}{level}{record.getMessage()}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    logger = logging.getLogger("nbdvma")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


def read_configs(
    args: Sequence[tuple[str | None, str]],
) -> list[tuple[str | None, str, bytes]]:
    """Read the files of ``--config`` options.

    Raises:
        NbdvmaError: one cannot be read (the message names it and why).
    """
    items = []
    for name, path in args:
        try:
            with open(path, "rb") as f:
                items.append((name, path, f.read()))
        except OSError as exc:
            raise NbdvmaError(f"config {path}: {exc.strerror or exc}") from None
    return items


def compress_argument(text: str) -> str:
    """``--compress zstd`` or ``zstd:LEVEL`` (1..19), as argparse wants its errors."""
    try:
        parse_compression(text)
    except VmaWriterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def address_argument(text: str) -> Address:
    """An option's ``unix:PATH`` or ``tcp:HOST:PORT``, as argparse wants its errors."""
    from nbdvma.addresses import parse_address

    try:
        return parse_address(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def mode_argument(text: str) -> int:
    """A unix socket's permissions in octal; the owner must keep read and write."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600:
        raise argparse.ArgumentTypeError(
            f"expected an octal mode from 0600 to 0777 (the owner needs read and write), "
            f"got {text!r}"
        )
    return mode


def count_argument(text: str) -> int:
    """An option's whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def size_argument(text: str) -> int:
    """An option's size (``64K``, ``1.5G``), as argparse wants its errors."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def seconds_argument(text: str) -> float:
    """An option's positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_listen_options(parser: argparse.ArgumentParser, command: str) -> None:
    """``--listen`` and ``--pid-file`` (``command`` names the process in the help)."""
    parser.add_argument(
        "--listen",
        action="append",
        type=address_argument,
        metavar="unix:PATH|tcp:HOST:PORT",
        help="where to accept NBD clients (repeatable; default tcp:127.0.0.1:10809; "
        "under systemd socket activation, the sockets systemd passes instead)",
    )
    parser.add_argument(
        "--pid-file",
        metavar="FILE",
        help=f"write {command}'s process id to FILE once it listens (a script that waits for "
        "FILE can connect at once); removed at exit",
    )


def add_access_options(parser: argparse.ArgumentParser) -> None:
    """Who may connect and for how long: socket mode, limits, timeouts, ``-v``, TLS."""
    parser.add_argument(
        "--socket-mode",
        type=mode_argument,
        default=0o600,
        metavar="MODE",
        help="permissions of unix sockets (octal, default 0600)",
    )
    parser.add_argument(
        "--max-connections",
        type=count_argument,
        default=100,
        metavar="N",
        help="connection cap (default 100)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log every connection (peer, export, how it ended) on stderr",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=seconds_argument,
        default=10.0,
        metavar="SECONDS",
        help="drop a client that has not finished the handshake by then (default 10)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=seconds_argument,
        default=math.inf,
        metavar="SECONDS",
        help="drop a client that sends nothing for this long with no request in flight "
        "(default: never)",
    )
    tls = parser.add_argument_group("TLS (NBD_OPT_STARTTLS, X.509; see docs/security.md)")
    tls.add_argument(
        "--tls",
        choices=_tls_modes(),
        help="off: refuse STARTTLS; on: offer TLS, allow plain text; "
        "require: nothing works before TLS (default: require with --tls-creds, else off)",
    )
    tls.add_argument(
        "--tls-creds",
        metavar="DIR",
        help="the certificates in QEMU's tls-creds-x509 layout, as qemu-nbd takes them: "
        "DIR/server-cert.pem, DIR/server-key.pem, and DIR/ca-cert.pem for "
        "--tls-verify-client; implies --tls require (instead of --tls-cert/--tls-key/--tls-ca)",
    )
    tls.add_argument("--tls-cert", metavar="PEM", help="the server certificate (chain)")
    tls.add_argument("--tls-key", metavar="PEM", help="its private key (unencrypted)")
    tls.add_argument("--tls-ca", metavar="PEM", help="the CA that signs client certificates")
    tls.add_argument(
        "--tls-verify-client",
        action="store_true",
        help="require a client certificate signed by --tls-ca (or DIR/ca-cert.pem)",
    )


def _tls_modes() -> list[str]:
    from nbdvma.tls import TlsMode

    return [m.value for m in TlsMode]


def server_limits(args: argparse.Namespace) -> ServerLimits:
    """The limits of :func:`add_access_options`."""
    from nbdvma.limits import ServerLimits

    return ServerLimits(
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        handshake_timeout=args.handshake_timeout,
    )


def tls_config(args: argparse.Namespace) -> TlsConfig:
    """``--tls-creds DIR`` (TLS required unless ``--tls`` says otherwise), or the
    separate ``--tls-cert``/``--tls-key``/``--tls-ca`` files."""
    from nbdvma.tls import TlsConfig, TlsMode

    if args.tls_creds is None:
        return TlsConfig(
            mode=TlsMode(args.tls or TlsMode.OFF.value),
            cert=args.tls_cert,
            key=args.tls_key,
            ca=args.tls_ca,
            verify_client=args.tls_verify_client,
        )
    if args.tls_cert or args.tls_key or args.tls_ca:
        raise TlsError(
            "--tls-creds DIR holds the certificate, key and CA: "
            "give it or --tls-cert/--tls-key/--tls-ca, not both"
        )
    return TlsConfig.from_creds_dir(
        args.tls_creds,
        TlsMode(args.tls or TlsMode.REQUIRE.value),
        verify_client=args.tls_verify_client,
    )


def activated_sockets(listen: Sequence[object] | None, command: str) -> tuple[int, ...]:
    """The listening sockets systemd passes (``LISTEN_FDS``; read and unset, so that
    no child ever sees the variables), refused beside ``--listen``.

    Raises:
        ActivationError: sockets were passed and ``--listen`` given too.
    """
    from nbdvma.activation import listen_fds

    activated = listen_fds()
    if activated and listen:
        raise ActivationError(
            f"systemd passes {len(activated)} listening socket(s) (LISTEN_FDS): "
            f"{command} listens on those; drop --listen"
        )
    return activated
