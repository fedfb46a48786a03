"""systemd socket activation: the listening sockets a service manager passes.

The protocol is ``sd_listen_fds(3)``'s: when ``LISTEN_PID`` is this process's id,
``LISTEN_FDS`` = N says that fds 3 .. 3+N-1 are open sockets for it to accept on
(``LISTEN_FDNAMES`` names them, colon-separated; nbdvma needs no names and ignores
it).  A ``LISTEN_PID`` of another process means the variables were meant for someone
else (a parent that exec'd us without cleaning up) and nothing was passed to us.

As ``sd_listen_fds(unset_environment=1)`` does, the three variables are removed from
the environment whatever they say, so that no child (a ``--run`` command) inherits
them and mistakes the fds for its own; and the fds are marked close-on-exec.  What
each socket is (TCP or unix, listening or not) is :func:`nbdvma.listeners.adopt_listener`'s
business.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from nbdvma.errors import ActivationError

__all__ = ["LISTEN_FDS_START", "ActivationError", "listen_fds"]

#: The first passed fd (``SD_LISTEN_FDS_START``): after stdin, stdout and stderr.
LISTEN_FDS_START = 3
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(
    environ: MutableMapping[str, str] | None = None, *, pid: int | None = None
) -> tuple[int, ...]:
    """The fds passed by socket activation, if any; the variables are unset either way.

    Args:
        environ: the environment to read and clean (default ``os.environ``, whose
            changes reach the C environment that child processes inherit).
        pid: this process's id (default ``os.getpid()``).

    Returns:
        ``(3, 4, ...)``, one per passed socket, each now close-on-exec; ``()`` when
        the variables are absent, ``LISTEN_PID`` is another process's or
        ``LISTEN_FDS`` is 0.

    Raises:
        ActivationError: ``LISTEN_PID`` or ``LISTEN_FDS`` is not a number, or a
            passed fd is not open.
    """
    env = os.environ if environ is None else environ
    pid_text, fds_text = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    for name in _VARIABLES:
        env.pop(name, None)
    if pid_text is None or fds_text is None:
        return ()
    listen_pid = _number("LISTEN_PID", pid_text)
    count = _number("LISTEN_FDS", fds_text)
    if listen_pid != (os.getpid() if pid is None else pid):
        return ()
    fds = tuple(range(LISTEN_FDS_START, LISTEN_FDS_START + count))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise ActivationError(
                f"LISTEN_FDS={count}, but fd {fd} is not open: {exc.strerror or exc}"
            ) from None
    return fds


def _number(name: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ActivationError(f"{name}={text!r} is not a number (socket activation)")
    return int(text)
