"""What users of qemu-nbd and nbdkit expect of ``nbdvma serve``: ``--pid-file``,
``--run`` (nbdkit's captive mode) and systemd socket activation, with real clients.

``--tls-creds`` is in ``test_tls.py``, next to the certificates it needs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from servehelpers import (
    ServeProcess,
    StartServe,
    extract_disks,
    nbdvma,
    poll_until,
    run_tool,
    serve_command,
)

from nbdvma.activation import listen_fds
from nbdvma.addresses import TcpAddress, UnixAddress
from nbdvma.captive import nbd_uri
from nbdvma.errors import ActivationError

pytestmark = pytest.mark.interop

MiB = 1 << 20


@pytest.fixture
def image(workdir: Path) -> tuple[Path, bytes]:
    """A 1 MiB raw image of random data with a zero stretch; its bytes."""
    data = bytearray(os.urandom(MiB))
    data[256 * 1024 : 512 * 1024] = bytes(256 * 1024)
    path = workdir / "img.raw"
    path.write_bytes(data)
    return path, bytes(data)


def serve_run(
    workdir: Path, disks: dict[str, int], listen: Sequence[str], extra: Sequence[str]
) -> subprocess.CompletedProcess[str]:
    """Run ``serve`` to its end (in ``workdir``, archive ``out.vma``)."""
    cmd = serve_command(workdir / "out.vma", disks, listen, extra)
    return run_tool(cmd, check=False, timeout=60, cwd=workdir)


def lines(text: str) -> list[str]:
    return text.strip().splitlines()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


# -- --pid-file ---------------------------------------------------------------------------


def test_pid_file_appears_when_listening_and_goes_at_exit(
    workdir: Path, sockdir: Path, qemu_img: str, nbdinfo: str, image: tuple[Path, bytes]
) -> None:
    sock = sockdir / "s.sock"
    pid_file = workdir / "serve.pid"
    err = workdir / "serve.err"
    with err.open("wb") as f:
        process = subprocess.Popen(
            serve_command(workdir / "out.vma", {"d0": MiB}, [f"unix:{sock}"],
                          ["--pid-file", str(pid_file)]),
            stdin=subprocess.DEVNULL, stderr=f,
        )  # fmt: skip
    server = ServeProcess(process, str(workdir / "out.vma"), err)
    try:
        poll_until(pid_file.exists, 20, "the pid file", interval=0.001)
        # As a script would: the file is there, so connect at once.
        run_tool([nbdinfo, f"nbd+unix:///d0?socket={sock}"])
        assert pid_file.read_text() == f"{process.pid}\n"
        assert [p.name for p in workdir.iterdir() if p.name.startswith(".")] == []
        run_tool([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(image[0]),
                  f"nbd+unix:///d0?socket={sock}"])  # fmt: skip
        assert server.wait() == 0, server.stderr()
    finally:
        server.kill()
    assert not pid_file.exists()
    assert extract_disks(workdir / "out.vma", workdir / "x") == {"d0": image[1]}


def test_pid_file_of_another_server_is_left_alone(serve: StartServe, workdir: Path) -> None:
    pid_file = workdir / "serve.pid"
    server = serve({"d0": MiB}, ["--pid-file", str(pid_file)])
    poll_until(pid_file.exists, 10, "the pid file")
    other = workdir / "other.pid"
    other.write_text("1\n")
    other.replace(pid_file)  # a second server wrote its own since
    server.signal(signal.SIGTERM)
    assert server.wait() == 128 + signal.SIGTERM
    assert pid_file.read_text() == "1\n"


def test_pid_file_that_cannot_be_written_is_one_line(workdir: Path) -> None:
    result = serve_run(
        workdir, {"d0": MiB}, ["tcp:127.0.0.1:0"], ["--pid-file", "/nonexistent/serve.pid"]
    )
    assert result.returncode == 1
    assert lines(result.stderr)[-1] == (
        "nbdvma serve: cannot write the pid file /nonexistent/serve.pid: No such file or directory"
    )
    assert list(workdir.glob("out.vma*")) == []


# -- --run ----------------------------------------------------------------------------------


def test_run_qemu_img_writes_the_archive(
    workdir: Path, sockdir: Path, qemu_img: str, image: tuple[Path, bytes]
) -> None:
    run = f'qemu-img convert -n -f raw -O raw {image[0]} "$uri"'
    result = serve_run(workdir, {"d0": MiB}, [f"unix:{sockdir}/s.sock"], ["--run", run])
    assert result.returncode == 0, result.stderr
    nbdvma("verify", "--strict", str(workdir / "out.vma"))
    assert extract_disks(workdir / "out.vma", workdir / "x") == {"d0": image[1]}
    assert not (sockdir / "s.sock").exists()


def test_run_with_the_archive_on_stdout(
    workdir: Path, qemu_img: str, image: tuple[Path, bytes]
) -> None:
    """``serve -``: the command's stdout goes to stderr, never into the archive."""
    run = f'echo from-the-command; qemu-img convert -n -f raw -O raw {image[0]} "$uri"'
    out = workdir / "stdout.vma"
    with out.open("wb") as f:
        process = subprocess.run(
            serve_command("-", {"d0": MiB}, ["tcp:127.0.0.1:0"], ["--run", run]),
            stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.PIPE, timeout=60, check=False,
        )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert b"from-the-command\n" in process.stderr
    nbdvma("verify", "--strict", str(out))
    assert extract_disks(out, workdir / "x") == {"d0": image[1]}


@pytest.mark.parametrize("first", ["unix", "tcp"])
def test_run_environment(workdir: Path, sockdir: Path, first: str) -> None:
    """$uri/$nbd name the first disk on the first listener; $unixsocket and $port the
    first of each kind; $tls is unset without TLS; an inherited $uri is replaced."""
    sock = f"{sockdir}/s.sock"
    listen = [f"unix:{sock}", "tcp:127.0.0.1:0"]
    if first == "tcp":
        listen.reverse()
    show = 'printf "%s\\n" "$uri" "$nbd" "$unixsocket" "$port" "$exportname" "${tls-unset}"'
    cmd = serve_command(workdir / "out.vma", {"drive-scsi0": MiB, "d1": MiB}, listen,
                        ["--run", f"{show} > env.out; exit 3"])  # fmt: skip
    env = {**os.environ, "uri": "inherited", "tls": "inherited"}
    result = run_tool(cmd, check=False, timeout=60, cwd=workdir, env=env)
    assert result.returncode == 3, result.stderr
    port = next(
        line.rsplit(":", 1)[1] for line in lines(result.stderr) if "listening on tcp:" in line
    )
    if first == "unix":
        uri = f"nbd+unix:///drive-scsi0?socket={sock}"
    else:
        uri = f"nbd://127.0.0.1:{port}/drive-scsi0"
    assert lines((workdir / "env.out").read_text()) == [
        uri,
        uri,
        sock,
        port,
        "drive-scsi0",
        "unset",
    ]
    assert lines(result.stderr)[-1] == (
        "nbdvma serve: the --run command exited with status 3 before anything was "
        "written; no archive left; incomplete: drive-scsi0, d1"
    )
    assert list(workdir.glob("out.vma*")) == []


def test_run_exit_status_and_part(workdir: Path, qemu_io: str) -> None:
    """A command that fails half-way: its status, ``.part`` left, what is incomplete."""
    run = 'qemu-io -f raw -c "write -P 0x5a 0 64k" "$uri" && exit 7'
    result = serve_run(workdir, {"d0": MiB, "d1": MiB}, ["tcp:127.0.0.1:0"], ["--run", run])
    assert result.returncode == 7, result.stderr
    assert lines(result.stderr)[-1] == (
        "nbdvma serve: the --run command exited with status 7; the archive is incomplete "
        f"and left as {workdir}/out.vma.part; incomplete: d0, d1"
    )
    assert [p.name for p in workdir.glob("out.vma*")] == ["out.vma.part"]


def test_run_true_with_nothing_written_fails(workdir: Path) -> None:
    result = serve_run(workdir, {"d0": MiB}, ["tcp:127.0.0.1:0"], ["--run", "true"])
    assert result.returncode == 1
    assert lines(result.stderr)[-1] == (
        "nbdvma serve: the --run command exited with status 0 before anything was "
        "written; no archive left; incomplete: d0"
    )


def test_run_archive_finalized_while_the_command_runs(
    workdir: Path, qemu_img: str, image: tuple[Path, bytes]
) -> None:
    """Every disk written: the archive is finished at once, and serve waits for the
    command (which sees the archive) and exits with its status."""
    run = (
        f'qemu-img convert -n -f raw -O raw {image[0]} "$uri" || exit 1; '
        # (Still running a while after the rename, so that serve has said it waits.)
        "for i in $(seq 200); do [ -e out.vma ] && sleep 0.5 && exit 5; sleep 0.05; done; exit 1"
    )
    result = serve_run(workdir, {"d0": MiB}, ["tcp:127.0.0.1:0"], ["--run", run])
    assert result.returncode == 5, result.stderr
    assert "nbdvma serve: the archive is complete; waiting for the --run command to exit" in lines(
        result.stderr
    )
    assert lines(result.stderr)[-1] == (
        "nbdvma serve: the --run command exited with status 5; the archive is complete"
    )
    assert extract_disks(workdir / "out.vma", workdir / "x") == {"d0": image[1]}


#: A libnbd client that connects, then forks: the command (the parent) exits at once,
#: and the child writes the whole disk over the inherited connection a moment later.
FORKING_CLIENT = """
import nbd, os, time
h = nbd.NBD()
h.connect_uri(os.environ["uri"])
if os.fork():
    os._exit(0)
time.sleep(0.3)
h.pwrite(b"\\x5a" * h.get_size(), 0)
h.flush()
h.shutdown()
"""


def test_run_waits_for_the_connections_of_an_exited_command(workdir: Path, libnbd: object) -> None:
    """The server learns of its clients' ends after the command has exited: what they
    still do over connections open at that moment counts."""
    run = f"exec {sys.executable} -c '{FORKING_CLIENT}'"
    result = serve_run(workdir, {"d0": MiB}, ["tcp:127.0.0.1:0"], ["--run", run])
    assert result.returncode == 0, result.stderr
    assert extract_disks(workdir / "out.vma", workdir / "x") == {"d0": b"\x5a" * MiB}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_command_and_its_children(
    serve: StartServe, workdir: Path, signum: int
) -> None:
    run = "echo $$ > sh.pid; sleep 60 & echo $! > sleep.pid; wait; echo survived > out"
    server = serve({"d0": MiB}, ["--run", f"cd {workdir} && {run}"])
    poll_until((workdir / "sleep.pid").exists, 10, "the command's pid files")
    time.sleep(0.05)  # both pids written
    pids = [int((workdir / name).read_text()) for name in ("sh.pid", "sleep.pid")]
    assert all(alive(pid) for pid in pids)
    server.signal(signum)
    assert server.wait() == 128 + signum
    poll_until(lambda: not any(alive(pid) for pid in pids), 5, "the command and its child")
    assert not (workdir / "out").exists()
    assert lines(server.stderr())[-1] == (
        f"nbdvma serve: interrupted by {signal.Signals(signum).name} before anything was "
        "written; no archive left; incomplete: d0"
    )


def test_run_with_the_null_backend(
    workdir: Path, qemu_img: str, qemu_io: str, image: tuple[Path, bytes]
) -> None:
    """``--backend null`` ends as vma does, and so does its --run command."""
    run = 'qemu-io -f raw -c "write 0 64k" "$uri" && exit 4'
    null = ["--backend", "null", "--run"]
    result = serve_run(workdir, {"d0": MiB}, ["tcp:127.0.0.1:0"], [*null, run])
    assert result.returncode == 4, result.stderr
    assert lines(result.stderr)[-1] == (
        "nbdvma serve: the --run command exited with status 4; incomplete: d0"
    )
    run = f'qemu-img convert -n -f raw -O raw {image[0]} "$uri"; sleep 0.5; exit 6'
    result = serve_run(workdir, {"d0": MiB}, ["tcp:127.0.0.1:0"], [*null, run])
    assert result.returncode == 6, result.stderr
    assert "nbdvma serve: d0: size 1.0 MiB, discarded" in lines(result.stderr)
    assert lines(result.stderr)[-1] == (
        "nbdvma serve: the --run command exited with status 6; every disk is complete"
    )
    assert list(workdir.glob("out.vma*")) == []


@pytest.mark.parametrize(
    ("address", "export", "tls", "uri"),
    [
        (UnixAddress("/r/s p.sock"), "d0", False, "nbd+unix:///d0?socket=/r/s%20p.sock"),
        (UnixAddress("/r/s"), "a b", True, "nbds+unix:///a%20b?socket=/r/s"),
        (TcpAddress("0.0.0.0", 10809), "d0", False, "nbd://127.0.0.1:10809/d0"),
        (TcpAddress("::", 7), "d0", True, "nbds://[::1]:7/d0"),
        (TcpAddress("fe80::1", 7), "x/y", False, "nbd://[fe80::1]:7/x/y"),
        (TcpAddress("localhost", 7), "d0", False, "nbd://localhost:7/d0"),
    ],
)
def test_nbd_uri(address: UnixAddress | TcpAddress, export: str, tls: bool, uri: str) -> None:
    assert nbd_uri(address, export, tls=tls) == uri


# -- systemd socket activation ----------------------------------------------------------------

#: Run as ``python -c LAUNCH FD ARGV...``: make FD this process's fd 3, set the variables
#: as systemd would (LISTEN_PID is this pid, which exec keeps) and exec ARGV.
LAUNCH = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.set_inheritable(3, True)  # dup2 onto itself leaves close-on-exec set
if fd != 3:
    os.close(fd)
pid = os.environ.pop("TEST_LISTEN_PID", str(os.getpid()))
os.environ.update(LISTEN_PID=pid, LISTEN_FDS="1", LISTEN_FDNAMES="nbd")
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


@pytest.fixture
def activated(workdir: Path) -> Iterator[Callable[..., ServeProcess]]:
    """``activated(sock, argv, env=None) -> ServeProcess``: ``argv`` started with
    ``sock`` as fd 3 and the activation variables; killed at teardown."""
    started: list[ServeProcess] = []

    def start(
        sock: socket.socket, argv: list[str], env: dict[str, str] | None = None
    ) -> ServeProcess:
        err = workdir / f"activated-{len(started)}.err"
        with err.open("wb") as f:
            process = subprocess.Popen(
                [sys.executable, "-c", LAUNCH, str(sock.fileno()), *argv[1:]],
                pass_fds=(sock.fileno(),),
                stdin=subprocess.DEVNULL,
                stderr=f,
                cwd=workdir,
                env=env,
            )
        server = ServeProcess(process, str(workdir / "out.vma"), err)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def unix_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


def test_activation_unix_socket(
    activated: Callable[..., ServeProcess],
    workdir: Path,
    sockdir: Path,
    qemu_img: str,
    image: tuple[Path, bytes],
) -> None:
    """A unix socket passed as fd 3: served, named in $uri, never removed; the
    variables reach no child."""
    path = sockdir / "activated.sock"
    run = f'env > child.env; qemu-img convert -n -f raw -O raw {image[0]} "$uri"'
    with unix_listener(path) as sock:
        argv = serve_command(workdir / "out.vma", {"d0": MiB}, [], ["--run", run])
        server = activated(sock, argv)
        assert server.wait() == 0, server.stderr()
    assert f"nbdvma serve: listening on unix:{path}" in lines(server.stderr())
    assert path.exists()  # systemd's socket file: not serve's to remove
    child_env = (workdir / "child.env").read_text()
    assert f"uri=nbd+unix:///d0?socket={path}\n" in child_env
    assert "LISTEN_" not in child_env
    nbdvma("verify", "--strict", str(workdir / "out.vma"))
    assert extract_disks(workdir / "out.vma", workdir / "x") == {"d0": image[1]}


def test_activation_tcp_socket(
    activated: Callable[..., ServeProcess], workdir: Path, nbdcopy: str, image: tuple[Path, bytes]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
        server = activated(sock, serve_command(workdir / "out.vma", {"d0": MiB}, []))
        poll_until(lambda: "listening on" in server.stderr(), 20, "serve listening")
        assert f"nbdvma serve: listening on tcp:127.0.0.1:{port}" in lines(server.stderr())
        run_tool([nbdcopy, "--flush", str(image[0]), f"nbd://127.0.0.1:{port}/d0"])
        assert server.wait() == 0, server.stderr()
    assert extract_disks(workdir / "out.vma", workdir / "x") == {"d0": image[1]}


def test_activation_for_another_process_is_ignored(
    activated: Callable[..., ServeProcess], workdir: Path, sockdir: Path
) -> None:
    """LISTEN_PID of another process: fd 3 is not serve's; --listen is used, and the
    variables are unset all the same."""
    with unix_listener(sockdir / "not-ours.sock") as sock:
        argv = serve_command(
            workdir / "out.vma", {"d0": MiB}, [f"unix:{sockdir}/own.sock"],
            ["--run", "env > child.env; exit 9"],
        )  # fmt: skip
        server = activated(sock, argv, {**os.environ, "TEST_LISTEN_PID": str(os.getpid())})
        assert server.wait() == 9, server.stderr()
    assert [line for line in lines(server.stderr()) if "listening" in line] == [
        f"nbdvma serve: listening on unix:{sockdir}/own.sock"
    ]
    assert "LISTEN_" not in (workdir / "child.env").read_text()


def test_activation_with_listen_is_refused(
    activated: Callable[..., ServeProcess], workdir: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        argv = serve_command(workdir / "out.vma", {"d0": MiB}, ["tcp:127.0.0.1:0"])
        server = activated(sock, argv)
        assert server.wait() == 1
    assert lines(server.stderr()) == [
        "nbdvma serve: systemd passes 1 listening socket(s) (LISTEN_FDS): serve listens "
        "on those; drop --listen"
    ]
    assert list(workdir.glob("out.vma*")) == []


def test_activated_fd_that_is_not_listening(
    activated: Callable[..., ServeProcess], workdir: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        server = activated(sock, serve_command(workdir / "out.vma", {"d0": MiB}, []))
        assert server.wait() == 1
    assert lines(server.stderr()) == ["nbdvma serve: fd 3 is a socket that does not listen"]


def test_listen_fds_reads_and_unsets_the_variables() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "0", "LISTEN_FDNAMES": "", "PATH": "/bin"}
    assert listen_fds(env, pid=42) == ()
    assert env == {"PATH": "/bin"}
    env = {"LISTEN_PID": "41", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert listen_fds(env, pid=42) == ()  # someone else's
    assert env == {}
    assert listen_fds({"LISTEN_FDS": "1"}, pid=42) == ()  # no LISTEN_PID: not for us
    with pytest.raises(ActivationError, match=r"^LISTEN_FDS='x' is not a number"):
        listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "x"}, pid=42)
    with pytest.raises(ActivationError, match=r"^LISTEN_PID='-1' is not a number"):
        listen_fds({"LISTEN_PID": "-1", "LISTEN_FDS": "1"}, pid=42)
