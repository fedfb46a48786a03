"""``s3://BUCKET/KEY`` URLs: where an archive lies in object storage.

Parsing only, with no third-party import, so that the command line can tell an S3
archive from a file without loading boto3.  The rules are the ones AWS tools apply
before they send anything: a bucket name of 1 to 255 letters, digits, dots, hyphens
and underscores (botocore's own check, lenient enough for the legacy names of
S3-compatible stores; the server refuses what it does not accept), a key of at most
1024 bytes of UTF-8.  A URL whose key is empty or ends in ``/`` names a *prefix*
(``s3://backups/pve1/``), where ``nbdvma backup`` puts the vzdump file name as it
does in a directory.
"""

from __future__ import annotations

import re

import attrs

from nbdvma.errors import S3UrlError

__all__ = ["S3_SCHEME", "S3Location", "is_s3_url", "parse_s3_url"]

#: How an S3 URL begins (AWS tools accept no other spelling).
S3_SCHEME = "s3://"
#: The most bytes S3 allows in a key.
MAX_KEY_BYTES = 1024
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")


@attrs.frozen
class S3Location:
    """A bucket and a key (or a prefix: a key that is empty or ends in ``/``)."""

    bucket: str
    key: str

    @property
    def url(self) -> str:
        """``s3://BUCKET/KEY``: how messages name it."""
        return f"{S3_SCHEME}{self.bucket}/{self.key}"

    @property
    def is_prefix(self) -> bool:
        """Whether this names a "directory" (an empty key or one ending in ``/``)."""
        return not self.key or self.key.endswith("/")

    def child(self, name: str) -> S3Location:
        """The object ``name`` under this prefix (``s3://b/pve/`` + ``x.vma``).

        Raises:
            S3UrlError: this is no prefix, or the key would be too long.
        """
        if not self.is_prefix:
            raise S3UrlError(f"{self.url}: names an object, not a prefix ending in '/'")
        return _checked(self.bucket, self.key + name)

    def require_object(self) -> S3Location:
        """This location, if it names an object (for an archive to write or read).

        Raises:
            S3UrlError: it names a bucket or a prefix (empty key, or ending in ``/``).
        """
        if self.is_prefix:
            raise S3UrlError(
                f"{self.url}: names a bucket or prefix, not an object: "
                f"give the archive's key, e.g. {S3_SCHEME}{self.bucket}/{self.key}backup.vma"
            )
        return self


def is_s3_url(text: str) -> bool:
    """Whether ``text`` is meant as an S3 URL (begins with ``s3://``)."""
    return text.startswith(S3_SCHEME)


def parse_s3_url(text: str) -> S3Location | None:
    """Parse ``s3://BUCKET[/KEY]``; ``None`` when ``text`` is no S3 URL (a file path).

    Raises:
        S3UrlError: ``s3://`` without a bucket, a bucket name S3 refuses, a key that
            is too long or holds a NUL.
    """
    if not is_s3_url(text):
        return None
    bucket, _, key = text[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise S3UrlError(f"{text!r}: no bucket: expected {S3_SCHEME}BUCKET/KEY")
    if not _BUCKET.fullmatch(bucket):
        raise S3UrlError(
            f"{text!r}: invalid bucket name {bucket!r} (1 to 255 letters, digits, '.', '-', '_')"
        )
    return _checked(bucket, key)


def _checked(bucket: str, key: str) -> S3Location:
    location = S3Location(bucket, key)
    if "\0" in key:
        raise S3UrlError(f"{location.url!r}: a key cannot hold a NUL character")
    if len(key.encode("utf-8", "surrogateescape")) > MAX_KEY_BYTES:
        raise S3UrlError(
            f"{S3_SCHEME}{bucket}/{key[:40]}...: the key is longer than S3's {MAX_KEY_BYTES} bytes"
        )
    return location
