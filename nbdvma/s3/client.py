"""The S3 client, made the way AWS tools make theirs, and one-line errors.

Why boto3/botocore: it is what every S3 tool a backup administrator already runs is
built on (the AWS CLI, s3transfer), so the endpoint, the credentials and the region
come from the same places (environment, ``AWS_PROFILE``, ``~/.aws/config`` and
``~/.aws/credentials``, instance roles), and it gives full control of multipart uploads
(create, upload a part by number, complete, abort, list the incomplete ones), which
the archive writer needs.  It is blocking: nbdvma calls it from worker threads.  This
module is the only one that imports it, and only an ``s3://`` archive imports this
module.

Where things come from, first match wins:

* endpoint: ``--s3-endpoint URL``, then ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``,
  the profile's ``endpoint_url`` (botocore reads those), else AWS itself;
* credentials: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
  then the profile (``AWS_PROFILE``, default ``default``) in the shared files
  (``AWS_SHARED_CREDENTIALS_FILE``, ``AWS_CONFIG_FILE``), then the rest of botocore's
  chain;
* region: ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile's, else ``us-east-1``
  (what S3-compatible stores expect when they care at all).

Addressing is path-style (``http://HOST/BUCKET/KEY``) when the endpoint is an IP
address or ``localhost``, where virtual-host names (``BUCKET.HOST``) cannot resolve;
otherwise the profile's ``s3.addressing_style`` or botocore's default applies.

Failures become :class:`~nbdvma.errors.S3Error` with one line from
:func:`describe_s3_error`: what was asked (``s3://bucket/key``), the cause in words,
then S3's error code, the operation and the endpoint, e.g. ``s3://b/x.vma: the secret
access key does not match the access key ID (SignatureDoesNotMatch, CreateMultipartUpload
at http://127.0.0.1:8333)``.  No secret ever appears in one.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from collections.abc import Mapping
from typing import Any, cast

import boto3
import botocore.exceptions as bexc
from botocore.config import Config

from nbdvma.errors import S3Error
from nbdvma.s3.location import S3Location

__all__ = [
    "CONNECT_TIMEOUT",
    "MAX_ATTEMPTS",
    "READ_TIMEOUT",
    "S3Client",
    "call",
    "check_bucket",
    "describe_s3_error",
    "endpoint_of",
    "error_code",
    "head_object",
    "make_client",
]

#: A botocore S3 client (botocore ships no type information).
S3Client = Any

#: Seconds to wait for a TCP connection: an endpoint that does not answer is reported
#: within seconds (times :data:`MAX_ATTEMPTS`), not after the kernel's two minutes.
CONNECT_TIMEOUT = 5.0
#: Seconds to wait for an answer once a request is sent (a part of tens of MiB included).
READ_TIMEOUT = 120.0
#: Attempts per request (botocore's "standard" retries: throttling, 5xx, dropped
#: connections), unless ``AWS_MAX_ATTEMPTS``/``AWS_RETRY_MODE`` say otherwise.
MAX_ATTEMPTS = 3
_DEFAULT_REGION = "us-east-1"

#: What S3's error codes mean, in words a user acts on.
_CODES: Mapping[str, str] = {
    "NoSuchBucket": "no such bucket",
    "NoSuchKey": "no such key",
    "NoSuchUpload": "the multipart upload is gone (aborted by another process or by "
    "the bucket's lifecycle rule)",
    "InvalidAccessKeyId": "the endpoint knows no such access key ID",
    "SignatureDoesNotMatch": "the secret access key does not match the access key ID",
    "AccessDenied": "access denied (the credentials lack the permission)",
    "AllAccessDisabled": "access denied: all access to this bucket is disabled",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is invalid",
    "EntityTooSmall": "a part other than the last is smaller than S3's minimum of 5 MiB",
    "EntityTooLarge": "a part or the object is larger than the endpoint allows",
    "InvalidPart": "a part of the upload is missing or changed",
    "InvalidPartOrder": "the parts were not listed in ascending order",
    "InvalidBucketName": "the endpoint refuses this bucket name",
    "RequestTimeTooSkewed": "this machine's clock is too far from the endpoint's",
    "SlowDown": "the endpoint is overloaded (SlowDown), even after retries",
    "ServiceUnavailable": "the endpoint is unavailable, even after retries",
    "InternalError": "the endpoint failed internally, even after retries",
    "QuotaExceeded": "the bucket's quota is exceeded",
    "PreconditionFailed": "the object changed meanwhile",
    "KeyTooLongError": "the key is too long for the endpoint",
    # HEAD requests carry no body, so only the status tells.
    "400": "bad request",
    "301": "the bucket is in another region (set AWS_REGION)",
    "403": "forbidden (wrong credentials, or no permission)",
    "404": "not found",
}


def _env_retries() -> bool:
    return "AWS_MAX_ATTEMPTS" in os.environ or "AWS_RETRY_MODE" in os.environ


def make_client(
    endpoint: str | None = None,
    *,
    max_pool_connections: int = 10,
    read_timeout: float = READ_TIMEOUT,
    attempts: int | None = None,
) -> S3Client:
    """A botocore S3 client configured as described in the module docstring.

    Args:
        endpoint: ``--s3-endpoint URL``; ``None``: the environment's or the profile's.
        max_pool_connections: HTTP connections kept: at least the requests that may
            run at once (the parts in flight, plus one).
        read_timeout: seconds to wait for an answer (shorter for requests that must
            not hold an exit up: the abort of an upload).
        attempts: attempts per request (default :data:`MAX_ATTEMPTS`, or the
            environment's ``AWS_MAX_ATTEMPTS``).

    Raises:
        S3Error: a bad endpoint URL, an unknown profile, unreadable shared files.
    """
    if endpoint is not None:
        _check_endpoint(endpoint, "--s3-endpoint")
    else:
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if os.environ.get(name):
                endpoint = os.environ[name]
                _check_endpoint(endpoint, name)
                break
    try:
        session = boto3.session.Session()
        region = session.region_name or _DEFAULT_REGION
        options = _options(max_pool_connections, read_timeout, attempts)
        client = _client(session, endpoint, region, options)
        resolved = client.meta.endpoint_url
        if _local_host(resolved):
            options["s3"] = {"addressing_style": "path"}
            client = _client(session, resolved, region, options)
    except (bexc.BotoCoreError, ValueError) as exc:
        raise S3Error(describe_s3_error(exc, endpoint=endpoint)) from None
    return client


def _options(pool: int, read_timeout: float, attempts: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT,
        "read_timeout": read_timeout,
        "max_pool_connections": pool,
        # Checksums only where S3 demands them: the parts are signed (SigV4 hashes
        # the payload over http) or sent over TLS, and older S3-compatible stores
        # reject botocore's newer streaming-trailer checksums.
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
    if attempts is not None or not _env_retries():
        options["retries"] = {"mode": "standard", "max_attempts": attempts or MAX_ATTEMPTS}
    return options


def _client(
    session: boto3.session.Session, endpoint: str | None, region: str, options: dict[str, Any]
) -> S3Client:
    return session.client("s3", endpoint_url=endpoint, region_name=region, config=Config(**options))


def _check_endpoint(url: str, source: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise S3Error(
            f"{source} {_safe_url(url)!r}: expected http://HOST[:PORT] or https://HOST[:PORT]"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise S3Error(f"{source} {_safe_url(url)!r}: the port is not a number") from None


def _local_host(url: str | None) -> bool:
    """Whether ``url``'s host is an IP address or localhost (no virtual-host names)."""
    host = urllib.parse.urlsplit(url or "").hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _safe_url(url: str) -> str:
    """``url`` without any ``user:password@`` part."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _server(url: object) -> str:
    """The scheme, host and port of ``url`` (a request's URL carries the bucket, key
    and upload id, which the message names otherwise)."""
    if not url:
        return "the endpoint"
    parts = urllib.parse.urlsplit(_safe_url(str(url)))
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "", "", ""))


def endpoint_of(client: S3Client) -> str:
    """The endpoint ``client`` talks to, as messages name it (no credentials)."""
    return _safe_url(str(client.meta.endpoint_url))


def _redact(text: str) -> str:
    """``text`` with the secrets of the environment blanked out (defence in depth: a
    server's message could echo what it was sent)."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def describe_s3_error(
    exc: BaseException,
    *,
    location: S3Location | None = None,
    endpoint: str | None = None,
) -> str:
    """One line for a botocore error: what it concerns, the cause, the code, where.

    Args:
        exc: a ``ClientError``, a connection error, a credentials error...
        location: the bucket and key the request was about.
        endpoint: the endpoint URL (named in the line without any credentials).

    Returns:
        e.g. ``s3://bk/x.vma: no such bucket (NoSuchBucket, CreateMultipartUpload at
        http://127.0.0.1:8333)``; never a secret.
    """
    what = f"{location.url}: " if location is not None else ""
    where = f" at {_safe_url(endpoint)}" if endpoint else ""
    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = str(
            error.get("Code")
            or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "unknown")
        )
        text = _CODES.get(code) or str(error.get("Message") or "the request failed")[:200]
        if code == "NoSuchBucket" and location is not None:
            text = f"no such bucket {location.bucket!r}"
        return _redact(f"{what}{text} ({code}, {exc.operation_name}{where})")
    if isinstance(exc, bexc.EndpointConnectionError | bexc.ConnectTimeoutError):
        url = _server(endpoint or exc.kwargs.get("endpoint_url"))
        why = "timed out" if isinstance(exc, bexc.ConnectTimeoutError) else "failed"
        return (
            f"{what}cannot connect to {url}: the connection {why} (is the endpoint up and right?)"
        )
    if isinstance(exc, bexc.ReadTimeoutError | bexc.ConnectionClosedError):
        url = _server(endpoint or exc.kwargs.get("endpoint_url"))
        return f"{what}{url} stopped answering mid-request ({type(exc).__name__})"
    if isinstance(exc, bexc.NoCredentialsError):
        return (
            f"{what}no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE with a profile in ~/.aws/credentials"
        )
    if isinstance(exc, bexc.PartialCredentialsError):
        var = exc.kwargs.get("cred_var", "a credential")
        return f"{what}incomplete S3 credentials: {var} is missing ({exc.kwargs.get('provider')})"
    if isinstance(exc, bexc.ProfileNotFound):
        return f"{what}AWS profile {exc.kwargs.get('profile')!r} not found in the shared files"
    if isinstance(exc, bexc.ParamValidationError):
        return _redact(f"{what}invalid request: {str(exc).splitlines()[-1].strip()}")
    if isinstance(exc, ValueError) and "endpoint" in str(exc).lower():
        return f"{what}invalid endpoint {_safe_url(endpoint or '')!r}"
    return _redact(f"{what}{exc or type(exc).__name__}{where}".replace("\n", " "))


def call(
    client: S3Client, operation: str, location: S3Location | None, **params: Any
) -> dict[str, Any]:
    """``client.OPERATION(**params)``, a failure raised as one line.

    Args:
        client: from :func:`make_client`.
        operation: the method, e.g. ``"create_multipart_upload"``.
        location: what the request is about, for the message.
        params: the request's parameters.

    Raises:
        S3Error: the request failed (:func:`describe_s3_error`); the botocore error is
            its ``__cause__``.
    """
    try:
        return cast(dict[str, Any], getattr(client, operation)(**params))
    except (bexc.BotoCoreError, bexc.ClientError) as exc:
        raise S3Error(
            describe_s3_error(exc, location=location, endpoint=endpoint_of(client))
        ) from exc


def error_code(exc: BaseException) -> str | None:
    """S3's error code behind an :class:`S3Error` raised by :func:`call` (or of a
    ``ClientError``), e.g. ``"NoSuchUpload"`` or ``"404"``; ``None`` for other failures."""
    cause = exc.__cause__ if isinstance(exc, S3Error) else exc
    if isinstance(cause, bexc.ClientError):
        error = cause.response.get("Error", {})
        return str(error.get("Code") or cause.response["ResponseMetadata"]["HTTPStatusCode"])
    return None


def head_object(client: S3Client, location: S3Location) -> dict[str, Any] | None:
    """The object's HEAD (``ContentLength``, ``Metadata``...), ``None`` if there is none.

    A HEAD answer has no body, hence no error code: a refusal (403...) is asked again
    as a one-byte GET, whose answer names the cause (``SignatureDoesNotMatch``,
    ``InvalidAccessKeyId``, ``AccessDenied``).  A missing *bucket* also answers 404 to
    a HEAD: :func:`check_bucket` tells the two apart.

    Raises:
        S3Error: the request failed for another reason than a missing key.
    """
    params = {"Bucket": location.bucket, "Key": location.key}
    try:
        return call(client, "head_object", location, **params)
    except S3Error as exc:
        code = error_code(exc)
        if code == "404":
            check_bucket(client, location)
            return None
        if code not in ("400", "403"):
            raise
    try:
        call(client, "get_object", location, Range="bytes=0-0", **params)["Body"].close()
    except S3Error as exc:
        if error_code(exc) in ("NoSuchKey", "InvalidRange"):
            return None
        raise
    # The GET succeeded where the HEAD was refused: report the HEAD's refusal.
    return call(client, "head_object", location, **params)


def check_bucket(client: S3Client, location: S3Location) -> None:
    """Raise if the bucket of ``location`` does not exist.

    Asked explicitly, because some stores (SeaweedFS) create a missing bucket on the
    first write instead of refusing it, and an archive must not go to a bucket that a
    typo made.  A refusal to answer (403: the credentials may write but not list) is
    no proof of absence: then the write itself will tell.

    Raises:
        S3Error: no such bucket, or the request failed otherwise.
    """
    try:
        call(client, "head_bucket", location, Bucket=location.bucket)
    except S3Error as exc:
        code = error_code(exc)
        if code == "404":
            raise S3Error(
                f"{location.url}: no such bucket {location.bucket!r} "
                f"(NoSuchBucket, HeadBucket at {endpoint_of(client)})"
            ) from exc
        if code not in ("400", "403"):
            raise
