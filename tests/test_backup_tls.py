"""``nbdvma backup --tls-creds DIR``: QEMU's NBD clients talk to the session over TLS.

Certificates are made once per module with the ``openssl`` CLI: a CA, a server
certificate for ``DNS:localhost`` and ``IP:127.0.0.1`` and a client certificate from it,
and a second CA.  Each credentials directory is in QEMU's ``tls-creds-x509`` layout,
shared by nbdvma (``server-cert.pem``, ``server-key.pem``, ``ca-cert.pem`` for client
certificates) and QEMU (``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``).

The session requires TLS, so a backup that succeeds went through it.  Failures must
leave QEMU as it was: no node or ``tls-creds-x509`` object of ours, the run state
unchanged, and nothing under the archive's final name.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
from conftest import QemuVm
from test_backup import (
    assert_disks_equal,
    assert_qemu_clean,
    backup,
    extract,
    nbdvma,
    qmp,
    set_run_state,
)

pytestmark = pytest.mark.interop

MiB = 1 << 20


# -- certificates ------------------------------------------------------------------------


def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> Path:
    _openssl(
        d,
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}"),
        *("-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    return d / f"{name}-cert.pem"


def _make_cert(d: Path, name: str, ca: str, extensions: str) -> tuple[Path, Path]:
    # The key usage and purpose GnuTLS (QEMU) insists on.
    (d / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        f"keyUsage=critical,digitalSignature,keyEncipherment\n{extensions}\n"
    )
    _openssl(
        d,
        *("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}"),
        *("-keyout", f"{name}-key.pem", "-out", f"{name}.csr"),
    )
    _openssl(
        d,
        *("x509", "-req", "-in", f"{name}.csr", "-days", "2", "-CAcreateserial"),
        *("-CA", f"{ca}-cert.pem", "-CAkey", f"{ca}-key.pem"),
        *("-out", f"{name}-cert.pem", "-extfile", f"{name}.ext"),
    )
    return d / f"{name}-cert.pem", d / f"{name}-key.pem"


@attrs.frozen
class Creds:
    """Credentials directories (QEMU's ``tls-creds-x509`` layout).

    Attributes:
        good: the CA, the server certificate and key, a client certificate and key.
        server_only: the CA and the server certificate and key, no client certificate.
        wrong_ca: the server certificate and key, but ``ca-cert.pem`` is another CA:
            QEMU cannot verify the server.
    """

    good: Path
    server_only: Path
    wrong_ca: Path


def _creds_dir(d: Path, files: dict[str, Path]) -> Path:
    d.mkdir(mode=0o700)
    for name, source in files.items():
        (d / name).write_bytes(source.read_bytes())
    return d


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    d = tmp_path_factory.mktemp("pki")
    ca = _make_ca(d, "ca")
    other_ca = _make_ca(d, "otherca")
    server = _make_cert(
        d, "server", "ca", "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1"
    )
    client = _make_cert(d, "client", "ca", "extendedKeyUsage=clientAuth")
    server_files = {"server-cert.pem": server[0], "server-key.pem": server[1]}
    return Creds(
        good=_creds_dir(
            d / "good",
            {
                "ca-cert.pem": ca,
                **server_files,
                "client-cert.pem": client[0],
                "client-key.pem": client[1],
            },
        ),
        server_only=_creds_dir(d / "server-only", {"ca-cert.pem": ca, **server_files}),
        wrong_ca=_creds_dir(d / "wrong-ca", {"ca-cert.pem": other_ca, **server_files}),
    )


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture
def disks(raw_image: Callable[..., Path]) -> list[Path]:
    """Two small disks with data and holes (one of a size not a multiple of 64 KiB)."""
    return [
        raw_image("a.raw", 4 * MiB, {0: b"\xa5" * 70_000, 3 * MiB: b"tls" * 1000}),
        raw_image("b.raw", MiB + 512, {MiB: b"\x5a" * 512}),
    ]


def assert_no_tls_object(vm: QemuVm) -> None:
    objects = [o["name"] for o in qmp(vm, "qom-list", {"path": "/objects"})]
    assert not [o for o in objects if o.startswith("nbdvma-")], objects


def assert_backup_ok(result: subprocess.CompletedProcess[str], archive: Path, vm: QemuVm) -> None:
    assert result.returncode == 0, result.stderr
    assert "INFO: Backup job finished successfully" in result.stderr
    assert_qemu_clean(vm, "prelaunch")
    assert_no_tls_object(vm)
    verify = nbdvma("verify", archive)
    assert verify.returncode == 0, verify.stderr
    assert_disks_equal(extract(archive, archive.parent / "restore"), vm)


def assert_failed_cleanly(
    result: subprocess.CompletedProcess[str], archive: Path, vm: QemuVm, state: str
) -> str:
    """The backup failed with one line, left no archive, and QEMU is as it was."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("ERROR:")]
    assert len(errors) == 1, result.stderr
    assert all(line.startswith(("INFO:", "WARN:", "ERROR:")) for line in lines), result.stderr
    assert not archive.exists()
    assert_qemu_clean(vm, state)
    assert_no_tls_object(vm)
    return errors[0]


# -- tests ---------------------------------------------------------------------------------


def test_backup_over_tls_on_the_unix_socket(
    qemu_vm: Callable[..., QemuVm], disks: list[Path], workdir: Path, creds: Creds
) -> None:
    vm = qemu_vm(disks)
    archive = workdir / "vm.vma"
    args = ("--tls-creds", creds.server_only, "--tls-hostname", "localhost")
    result = backup("--qmp", vm.qmp_address, archive, "--vmstate", *args)
    assert_backup_ok(result, archive, vm)
    assert (workdir / "restore" / "vmstate.bin").read_bytes()[:4] == b"QEVM"


@pytest.mark.parametrize("listen", ["unix", "tcp"])
def test_backup_over_tls_with_client_certificates(
    qemu_vm: Callable[..., QemuVm], disks: list[Path], workdir: Path, creds: Creds, listen: str
) -> None:
    """Without --tls-hostname QEMU checks ``localhost`` on the unix socket and the
    listening host (``127.0.0.1``) over TCP."""
    vm = qemu_vm(disks)
    archive = workdir / "vm.vma"
    where = ["--listen", "tcp:127.0.0.1:0"] if listen == "tcp" else []
    result = backup(
        "--qmp", vm.qmp_address, archive, *where, "--tls-creds", creds.good, "--tls-verify-client"
    )
    assert_backup_ok(result, archive, vm)


def test_server_certificate_from_another_ca_fails_cleanly(
    qemu_vm: Callable[..., QemuVm], disks: list[Path], workdir: Path, creds: Creds
) -> None:
    vm = qemu_vm(disks)
    set_run_state(vm, "running")
    archive = workdir / "vm.vma"
    result = backup("--qmp", vm.qmp_address, archive, "--vmstate", "--tls-creds", creds.wrong_ca)
    error = assert_failed_cleanly(result, archive, vm, "running")
    assert "blockdev-add" in error
    assert "certificate" in error.lower()


def test_missing_client_certificate_is_refused(
    qemu_vm: Callable[..., QemuVm], disks: list[Path], workdir: Path, creds: Creds
) -> None:
    vm = qemu_vm(disks)
    archive = workdir / "vm.vma"
    result = backup(
        "--qmp", vm.qmp_address, archive, "--tls-creds", creds.server_only, "--tls-verify-client"
    )
    error = assert_failed_cleanly(result, archive, vm, "prelaunch")
    # QEMU's reason is vague; the server's is in the same line.
    assert "blockdev-add" in error
    assert "TLS handshake failed: PEER_DID_NOT_RETURN_A_CERTIFICATE" in error


def test_server_key_missing_fails_before_touching_qemu(
    qemu_vm: Callable[..., QemuVm], disks: list[Path], workdir: Path, creds: Creds
) -> None:
    vm = qemu_vm(disks)
    archive = workdir / "vm.vma"
    empty = workdir / "empty-creds"
    empty.mkdir()
    result = backup("--qmp", vm.qmp_address, archive, "--tls-creds", empty)
    error = assert_failed_cleanly(result, archive, vm, "prelaunch")
    assert "server-cert.pem" in error
    assert not Path(f"{archive}.part").exists()


def test_tls_options_need_tls_creds(workdir: Path) -> None:
    for option in (["--tls-hostname", "localhost"], ["--tls-verify-client"]):
        result = backup("--qmp", "unix:/nonexistent", workdir / "vm.vma", *option)
        assert result.returncode == 1
        assert result.stderr == "ERROR: --tls-hostname and --tls-verify-client need --tls-creds\n"
