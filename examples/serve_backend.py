"""Serve your own storage over NBD with nbdvma's server: a RAM disk backend.

    python examples/serve_backend.py            (needs qemu-io; run from anywhere)

A backend is any object with ``exports`` and the request methods of
:class:`nbdvma.Backend` (``pread``, ``pwrite``, ``zero``, ``trim``, ``flush``,
``extents``); the server does the protocol (handshake, structured replies, block
status, multi-conn, limits).  Here one 16 MiB RAM disk is served on a unix socket,
``qemu-io`` writes a pattern into it and reads it back, and the server stops.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence

import trio

from nbdvma import ExportInfo, NbdServer, UnixAddress, full_exports, open_listener

MiB = 1 << 20


class RamDisks:
    """Disks in memory; every capability (FLUSH is trivially durable here)."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.disks = {name: bytearray(size) for name, size in sizes.items()}
        self._exports = full_exports(sizes.items())

    @property
    def exports(self) -> Sequence[ExportInfo]:
        return self._exports

    async def pread(self, export_name: str, offset: int, length: int) -> bytes:
        return bytes(self.disks[export_name][offset : offset + length])

    async def pwrite(
        self, export_name: str, offset: int, data: bytes | bytearray, *, fua: bool
    ) -> None:
        self.disks[export_name][offset : offset + len(data)] = data

    async def zero(self, export_name: str, offset: int, length: int, *, fua: bool) -> None:
        self.disks[export_name][offset : offset + length] = bytes(length)

    async def trim(self, export_name: str, offset: int, length: int, *, fua: bool) -> None:
        await self.zero(export_name, offset, length, fua=fua)

    async def flush(self) -> None:
        pass

    async def extents(self, export_name: str, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 0)]  # all data: nothing known to be a hole


async def main() -> int:
    backend = RamDisks({"ram0": 16 * MiB})
    server = NbdServer(backend)
    socket = os.path.join(tempfile.mkdtemp(prefix="nbdvma-"), "nbd.sock")
    listener, _ = await open_listener(UnixAddress(socket))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, [listener])
        uri = f"nbd+unix:///ram0?socket={socket}"
        for command in ("write -P 0xab 1M 64k", "read -P 0xab 1M 64k"):
            done = await trio.run_process(
                ["qemu-io", "-f", "raw", "-c", command, uri], capture_stdout=True
            )
            print(done.stdout.decode().strip())
        nursery.cancel_scope.cancel()
    assert backend.disks["ram0"][MiB : MiB + 65536] == b"\xab" * 65536
    print("the RAM disk holds what qemu-io wrote")
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
