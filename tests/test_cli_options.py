"""Option values of ``serve`` and ``backup`` are checked when parsed, with messages in
the user's terms (never a Python name such as ``parse_address`` or ``<lambda>``)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from nbdvma.cli import build_parser, main
from nbdvma.commands.serve import report_progress
from nbdvma.session import ArchiveSession, SessionOptions

SERVE = ["serve", "x.vma", "--disk", "d0=1M"]
BACKUP = ["backup", "--qmp", "unix:/run/q.sock", "x.vma"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [*SERVE, "--max-connections", "0"],
            "argument --max-connections: expected a whole number of at least 1, got '0'",
        ),
        ([*SERVE, "--max-connections", "x"], "expected a whole number of at least 1, got 'x'"),
        ([*SERVE, "--socket-mode", "999"], "expected an octal mode from 0600 to 0777"),
        ([*SERVE, "--socket-mode", "0"], "(the owner needs read and write), got '0'"),
        ([*SERVE, "--listen", "/path"], "argument --listen: '/path': expected unix:PATH"),
        ([*SERVE, "--vmstate", "udp:x"], "argument --vmstate: 'udp:x': unknown scheme 'udp'"),
        ([*SERVE, "--handshake-timeout", "-1"], "expected a positive number of seconds"),
        ([*SERVE, "--idle-timeout", "0"], "expected a positive number of seconds, got '0'"),
        (
            ["serve", "x.vma", "--disk", "vmstate=1M"],
            "the name vmstate is the VM state's: give it with --vmstate ADDRESS",
        ),
        (["serve", "x.vma", "--disk", "d0=1000x"], "invalid size '1000x'"),
        (["backup", "--qmp", "/nope", "x.vma"], "argument --qmp: '/nope': expected unix:PATH"),
        ([*BACKUP, "--listen", "tcp:host"], "argument --listen: 'tcp:host'"),
        ([*BACKUP, "--bandwidth-limit", "-5"], "argument --bandwidth-limit: invalid size '-5'"),
        (
            [*SERVE, "--compress", "zstd:0"],
            "argument --compress: zstd level '0': expected a whole number from 1 to 19",
        ),
        ([*BACKUP, "--compress", "lz4"], "argument --compress: unknown compression 'lz4'"),
    ],
)
def test_bad_option_values_say_what_is_wrong(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # if an option slipped through, x.vma.part lands here
    assert main(argv) == 1  # bad usage, as every error of nbdvma
    err = capsys.readouterr().err
    assert message in err, err
    assert "parse_address" not in err
    assert "<lambda>" not in err


def test_every_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--help"]) == 0
    assert "null: discard every write" in " ".join(capsys.readouterr().out.split())
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():  # type: ignore[union-attr]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"nbdvma {name} {action.option_strings[0]} has no help"


async def test_serve_says_what_it_still_waits_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], autojump_clock: object
) -> None:
    """No progress for 30 s: one line saying what is still awaited, every 30 s."""
    session = ArchiveSession(
        SessionOptions(archive=str(tmp_path / "a.vma"), disks=(("d0", 1 << 20),), listen=())
    )
    try:
        session.writer.write(1, 0, b"x" * 262144)
        with trio.move_on_after(65):
            await report_progress(session, 2.0)
    finally:
        session.abort()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "nbdvma serve: d0: 25% (256.0 KiB of 1.0 MiB)"
    waiting = "nbdvma serve: still waiting for: d0 (25% written, no client connected)"
    assert lines[1:] == [waiting, waiting]


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["backup", "--qmp", "unix:{tmp}/nope.sock", "{tmp}/x.vma"],
            "ERROR: backup failed: QMP unix:{tmp}/nope.sock: No such file or directory "
            "(is QEMU running with -qmp unix:{tmp}/nope.sock,server=on?)",
        ),
        (
            ["backup", "--qmp", "tcp:127.0.0.1:{port}", "{tmp}/x.vma"],
            "ERROR: backup failed: QMP tcp:127.0.0.1:{port}: Connection refused "
            "(is QEMU running with -qmp tcp:127.0.0.1:{port},server=on?)",
        ),
        (
            [*SERVE[:1], "{tmp}/nodir/x.vma", *SERVE[2:]],
            "nbdvma serve: {tmp}/nodir/x.vma.part: No such file or directory",
        ),
        (
            [*SERVE, "--config", "{tmp}/nope.conf"],
            "nbdvma serve: config {tmp}/nope.conf: No such file or directory",
        ),
    ],
)
def test_run_time_errors_are_one_line_naming_the_thing(
    argv: list[str],
    line: str,
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The failures an operator meets first (no QEMU behind the QMP address, a missing
    or unwritable archive directory, a missing config) name what failed."""
    monkeypatch.chdir(tmp_path)
    fill = {"tmp": str(tmp_path), "port": str(_free_tcp_port())}
    argv = [a.format(**fill) for a in argv]
    assert main(argv) == 1
    err = capfd.readouterr().err
    assert line.format(**fill) in err.splitlines(), err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "absent"),
    [
        (["list", "x.vma"], ["trio", "nbdvma.tools.create", "nbdvma.commands.serve"]),
        (["export", "x.vma"], ["nbdvma.tools.create", "nbdvma.commands.serve", "nbdvma.qmp"]),
        (["serve", "--disk", "d=1M", "x.vma"], ["nbdvma.tools.create", "nbdvma.commands.export"]),
    ],
)
def test_a_command_line_imports_only_its_own_command(argv: list[str], absent: list[str]) -> None:
    """Start-up time: parsing a command line imports that command's modules, not the
    others' (trio alone costs a tenth of a second)."""
    code = (
        "import sys, nbdvma.cli;"
        f"nbdvma.cli.build_parser(server_commands={argv[:1]!r}).parse_args({argv!r});"
        f"print([m for m in {absent!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
