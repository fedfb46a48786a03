"""``nbdvma s3-uploads s3://BUCKET/PREFIX [--abort] [--all]``: nbdvma's leftover uploads.

An archive being written to S3 is an incomplete multipart upload until it is
complete.  nbdvma aborts it on every failure, Ctrl-C and SIGTERM; a process killed
with SIGKILL (or a machine that died) cannot, and its parts keep costing storage
until someone aborts the upload, or the bucket's ``AbortIncompleteMultipartUpload``
lifecycle rule does (docs/s3.md).  This command lists those under a prefix (one line
each on stdout: key, upload id, when it began) and, with ``--abort``, aborts them.

Only nbdvma's own uploads (those with its marker part, :mod:`nbdvma.s3.upload`) are
touched, unless ``--all``: another program's upload under the same prefix may be
alive.  Nor can this command tell a live nbdvma's upload from a dead one's: run it
when no backup to that prefix is running, or give a prefix narrow enough.
"""

from __future__ import annotations

import argparse
import sys

from nbdvma.errors import NbdvmaError, S3UrlError
from nbdvma.s3.location import parse_s3_url

__all__ = ["add_arguments", "run"]

PREFIX = "nbdvma s3-uploads: "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``nbdvma s3-uploads``."""
    parser.add_argument(
        "prefix",
        metavar="s3://BUCKET[/PREFIX]",
        help="where to look: every key that begins with PREFIX (all of the bucket without)",
    )
    parser.add_argument(
        "--abort",
        action="store_true",
        help="abort the uploads listed (their parts are freed; nothing else is touched)",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="include the incomplete uploads of other programs (default: only nbdvma's)",
    )
    parser.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="the S3 endpoint (default: AWS_ENDPOINT_URL, the AWS profile's, else AWS)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``nbdvma s3-uploads``; one line per upload on stdout, errors on stderr.

    Returns:
        0, or 1 when the listing or an abort failed.
    """
    try:
        return _run(args)
    except NbdvmaError as exc:
        print(f"{PREFIX}{exc}", file=sys.stderr, flush=True)
        return 1


def _run(args: argparse.Namespace) -> int:
    location = parse_s3_url(args.prefix)
    if location is None:
        raise S3UrlError(f"{args.prefix!r}: expected s3://BUCKET[/PREFIX]")
    from nbdvma.s3.client import check_bucket, make_client
    from nbdvma.s3.upload import abort_upload, list_uploads

    client = make_client(args.s3_endpoint)
    check_bucket(client, location)
    others = failed = found = 0
    for upload in list_uploads(client, location):
        if not upload.ours and not args.all:
            others += 1
            continue
        found += 1
        url = f"s3://{location.bucket}/{upload.key}"
        who = "nbdvma" if upload.ours else "another program"
        line = f"{url}\t{upload.upload_id}\tbegun {upload.initiated}\t{who}"
        if args.abort:
            try:
                abort_upload(client, location.bucket, upload.key, upload.upload_id)
            except NbdvmaError as exc:
                print(f"{PREFIX}{exc}", file=sys.stderr, flush=True)
                failed += 1
                continue
            line += "\taborted"
        print(line, flush=True)
    what = "aborted" if args.abort else "found"
    summary = f"{found - failed} incomplete upload(s) {what} under {location.url}"
    if others:
        summary += f"; {others} other program(s)' left alone (--all to include them)"
    print(f"{PREFIX}{summary}", file=sys.stderr, flush=True)
    return 1 if failed else 0
