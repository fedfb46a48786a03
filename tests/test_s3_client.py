"""s3:// URLs, the S3 client made as AWS tools make it, and its one-line errors.

The client tests talk to a real SeaweedFS (the ``s3`` fixture); no mock stands in.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from conftest import S3Bucket

from nbdvma.errors import S3Error, S3UrlError
from nbdvma.s3.location import S3Location, is_s3_url, parse_s3_url

# -- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bucket", "key"),
    [
        ("s3://backups/pve1/x.vma", "backups", "pve1/x.vma"),
        ("s3://backups/x.vma.zst", "backups", "x.vma.zst"),
        ("s3://backups/pve1/", "backups", "pve1/"),
        ("s3://backups/", "backups", ""),
        ("s3://backups", "backups", ""),
        ("s3://b.with-dots_and_Caps/a//b", "b.with-dots_and_Caps", "a//b"),
        ("s3://backups/ü ber/x.vma", "backups", "ü ber/x.vma"),
    ],
)
def test_parse_s3_url(text: str, bucket: str, key: str) -> None:
    location = parse_s3_url(text)
    assert location == S3Location(bucket, key)
    assert is_s3_url(text)
    assert location.url == f"s3://{bucket}/{key}"


@pytest.mark.parametrize("text", ["x.vma", "/srv/s3://x", "-", "S3://b/k", "s3:/b/k", ""])
def test_a_path_is_no_s3_url(text: str) -> None:
    assert parse_s3_url(text) is None
    assert not is_s3_url(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("s3://", "no bucket"),
        ("s3:///x.vma", "no bucket"),
        ("s3://bad bucket/x", "invalid bucket name 'bad bucket'"),
        ("s3://b:8333/x", "invalid bucket name 'b:8333'"),
        ("s3://b/" + "k" * 1025, "longer than S3's 1024 bytes"),
        ("s3://b/a\0b", "NUL"),
    ],
)
def test_bad_s3_urls_are_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(S3UrlError, match=message) as info:
        parse_s3_url(text)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)  # argparse reports it as a bad value


def test_prefix_and_object() -> None:
    prefix = parse_s3_url("s3://b/pve/")
    assert prefix is not None
    assert prefix.is_prefix
    assert prefix.child("x.vma") == S3Location("b", "pve/x.vma")
    with pytest.raises(S3UrlError, match="names a bucket or prefix, not an object"):
        prefix.require_object()
    obj = prefix.child("x.vma")
    assert obj.require_object() is obj
    with pytest.raises(S3UrlError, match="names an object, not a prefix"):
        obj.child("y")


def test_the_command_line_and_file_archives_do_not_import_boto3() -> None:
    code = (
        "import sys, nbdvma.cli, nbdvma.session, nbdvma.vma.sink, nbdvma.s3.location;"
        "nbdvma.cli.build_parser();"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the client against SeaweedFS ------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, s3: S3Bucket) -> S3Bucket:
    """This process's environment set as an nbdvma subprocess would get it."""
    for name, value in s3.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    return s3


def test_make_client_takes_the_environment(aws_env: S3Bucket) -> None:
    from nbdvma.s3.client import call, endpoint_of, head_object, make_client

    client = make_client()
    assert endpoint_of(client) == aws_env.endpoint.url
    # Path-style on an IP endpoint: BUCKET.127.0.0.1 could not resolve.
    assert client.meta.config.s3 == {"addressing_style": "path"}
    assert client.meta.region_name == "us-east-1"
    location = S3Location(aws_env.bucket, "a/x.vma")
    assert head_object(client, location) is None
    call(client, "put_object", location, Bucket=location.bucket, Key=location.key, Body=b"x")
    head = head_object(client, location)
    assert head is not None
    assert head["ContentLength"] == 1


def test_explicit_endpoint_wins_over_the_environment(
    aws_env: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbdvma.s3.client import endpoint_of, make_client

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    client = make_client(aws_env.endpoint.url)
    assert endpoint_of(client) == aws_env.endpoint.url
    client.head_bucket(Bucket=aws_env.bucket)


def test_region_from_the_environment(aws_env: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbdvma.s3.client import make_client

    monkeypatch.delenv("AWS_REGION")
    assert make_client().meta.region_name == "us-east-1"  # the default when none is set
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    assert make_client().meta.region_name == "eu-central-1"


def _start_upload(location: S3Location) -> None:
    """What a writer does first: HEAD the key, then create the upload."""
    from nbdvma.s3.client import call, head_object, make_client

    client = make_client()
    if head_object(client, location) is None:
        upload = call(
            client,
            "create_multipart_upload",
            location,
            Bucket=location.bucket,
            Key=location.key,
        )
        client.abort_multipart_upload(
            Bucket=location.bucket, Key=location.key, UploadId=upload["UploadId"]
        )


def _error(aws_env: S3Bucket, key: str = "x.vma", bucket: str | None = None) -> str:
    with pytest.raises(S3Error) as info:
        _start_upload(S3Location(bucket or aws_env.bucket, key))
    message = str(info.value)
    assert "\n" not in message
    assert aws_env.endpoint.secret_key not in message
    return message


def test_wrong_secret_is_signature_does_not_match(
    aws_env: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    message = _error(aws_env)
    assert message.startswith(f"s3://{aws_env.bucket}/x.vma: ")
    assert "the secret access key does not match the access key ID" in message
    assert "SignatureDoesNotMatch" in message
    assert aws_env.endpoint.url in message
    assert "not-the-secret" not in message


def test_unknown_access_key(aws_env: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY")
    assert "InvalidAccessKeyId" in _error(aws_env)


def test_missing_bucket(aws_env: S3Bucket) -> None:
    message = _error(aws_env, bucket="no-such-bucket")
    assert message.startswith("s3://no-such-bucket/x.vma: no such bucket 'no-such-bucket'")
    assert "NoSuchBucket" in message


def test_unknown_endpoint_fails_fast(
    aws_env: S3Bucket, monkeypatch: pytest.MonkeyPatch, free_tcp_port: object
) -> None:
    port = free_tcp_port()  # type: ignore[operator]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    message = _error(aws_env)
    assert time.monotonic() - start < 15
    assert f"cannot connect to http://127.0.0.1:{port}" in message


def test_no_credentials(aws_env: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in _error(aws_env)


def test_unknown_profile(aws_env: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "nosuchprofile")
    assert "AWS profile 'nosuchprofile' not found" in _error(aws_env)


def test_profile_from_the_shared_files(
    aws_env: S3Bucket, monkeypatch: pytest.MonkeyPatch, workdir: object
) -> None:
    from pathlib import Path

    from nbdvma.s3.client import make_client

    base = Path(str(workdir))
    (base / "credentials").write_text(
        f"[backup]\naws_access_key_id = {aws_env.endpoint.access_key}\n"
        f"aws_secret_access_key = {aws_env.endpoint.secret_key}\n"
    )
    (base / "config").write_text(
        f"[profile backup]\nregion = eu-west-3\nendpoint_url = {aws_env.endpoint.url}\n"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(base / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(base / "config"))
    monkeypatch.setenv("AWS_PROFILE", "backup")
    client = make_client()
    assert client.meta.region_name == "eu-west-3"
    assert client.meta.config.s3 == {"addressing_style": "path"}  # the profile's endpoint
    client.head_bucket(Bucket=aws_env.bucket)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:8333", "expected http://HOST[:PORT] or https://HOST[:PORT]"),
        ("ftp://host", "expected http://HOST[:PORT]"),
        ("http://host:port", "the port is not a number"),
        ("http://user:hunter2@:1", "expected http://HOST"),
    ],
)
def test_bad_endpoint_url(url: str, message: str) -> None:
    from nbdvma.s3.client import make_client

    with pytest.raises(S3Error, match=re.escape(message)) as info:
        make_client(url)
    assert "hunter2" not in str(info.value)
