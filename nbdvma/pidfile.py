"""``--pid-file``: the server's process id in a file, as qemu-nbd and nbdkit write it.

The file holds the pid and a newline.  It is written once the server listens, so that
a script that waits for it can connect at once, and atomically (a temporary file in
the same directory, renamed over the name), so that a reader never sees it half
written.  It is removed at exit only if it is still the file this process wrote: a
second server that has since written its own pid there keeps it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import attrs

from nbdvma.errors import PidFileError

__all__ = ["PidFile", "PidFileError", "pid_file"]


def _absolute(path: str) -> str:
    return os.path.abspath(path)


@attrs.define(eq=False)
class PidFile:
    """One pid file: :meth:`write` it, :meth:`remove` it (both at most once)."""

    #: Made absolute: removal must find the same file whatever the working directory.
    path: str = attrs.field(converter=_absolute)
    #: (st_dev, st_ino) of the file written, to recognise it at removal.
    _written: tuple[int, int] | None = None

    def write(self) -> None:
        """Write ``PID\\n`` to :attr:`path` (replacing any file there).

        Raises:
            PidFileError: the directory is missing or not writable (the message
                names the file and the reason).
        """
        directory, name = os.path.split(self.path)
        try:
            fd, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        except OSError as exc:
            raise PidFileError(
                f"cannot write the pid file {self.path}: {exc.strerror or exc}"
            ) from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
                # mkstemp's 0600 would hide the pid from the scripts that read it.
                os.fchmod(f.fileno(), 0o644)
                st = os.fstat(f.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise PidFileError(
                f"cannot write the pid file {self.path}: {exc.strerror or exc}"
            ) from None
        self._written = (st.st_dev, st.st_ino)

    def remove(self) -> None:
        """Remove the file if it is still the one :meth:`write` wrote."""
        written, self._written = self._written, None
        if written is None:
            return
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == written:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


@contextlib.contextmanager
def pid_file(path: str | None) -> Iterator[None]:
    """Write the pid file at ``path`` now (``None``: none), remove it when the block ends.

    Raises:
        PidFileError: it cannot be written.
    """
    if path is None:
        yield
        return
    written = PidFile(path)
    written.write()
    try:
        yield
    finally:
        written.remove()
