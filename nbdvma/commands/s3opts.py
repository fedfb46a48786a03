"""``--s3-endpoint URL``: the option of every command that takes an ``s3://`` archive.

Only the option and its syntax check live here (no boto3 import: ``nbdvma --help``
stays fast); :func:`nbdvma.s3.client.make_client` uses the value, ahead of
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` and the profile's ``endpoint_url``.
"""

from __future__ import annotations

import argparse
import urllib.parse

__all__ = ["add_s3_endpoint_option", "endpoint_argument"]


def endpoint_argument(text: str) -> str:
    """``http://HOST[:PORT]`` or ``https://HOST[:PORT]``, as argparse wants its errors
    (which never repeat the value: it could hold a ``user:password@``)."""
    parts = urllib.parse.urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise argparse.ArgumentTypeError("the port is not a number") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError("expected http://HOST[:PORT] or https://HOST[:PORT]")
    return text


def add_s3_endpoint_option(parser: argparse.ArgumentParser) -> None:
    """``--s3-endpoint URL``: the S3 endpoint of an ``s3://BUCKET/KEY`` archive."""
    parser.add_argument(
        "--s3-endpoint",
        type=endpoint_argument,
        metavar="URL",
        help="the S3 endpoint of an s3://BUCKET/KEY archive (default: AWS_ENDPOINT_URL, "
        "the profile's endpoint_url, else AWS); credentials and region as AWS tools "
        "take them (AWS_ACCESS_KEY_ID..., AWS_PROFILE, ~/.aws)",
    )
