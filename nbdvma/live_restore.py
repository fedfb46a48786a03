"""Live restore: the disks of a running VM pulled out of an export into their overlays.

The VM runs on qcow2 overlays whose backing files are disks of an ``nbdvma export``
(docs/restore.md, "Instant restore").  This module finds those overlays over QMP, starts
one ``block-stream`` job per overlay (QEMU copies every cluster the overlay does not
have yet from the backing file, while the guest runs), reports progress, and returns
once every job has completed and no node of the VM refers to the export any more: the
export can then stop.  It prints nothing; the caller gets the lines through ``say``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import attrs

from nbdvma.addresses import Address, TcpAddress, UnixAddress
from nbdvma.errors import NbdvmaError, QmpTimeout
from nbdvma.qmp import QmpClient
from nbdvma.units import format_bytes

__all__ = ["LiveRestoreError", "Overlay", "overlays_on", "stream_overlays"]

#: Seconds between progress lines while the jobs run.
PROGRESS_INTERVAL = 5.0
_ENDS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")


class LiveRestoreError(NbdvmaError):
    """The VM has no overlay on the export, or a stream job failed."""


@attrs.frozen
class Overlay:
    """A block node of the VM whose backing file is one of the export's disks."""

    node: str
    backing: str


def _needles(addresses: Collection[Address]) -> list[str]:
    """What a backing file name served by ``addresses`` contains: the socket path, or
    ``HOST:PORT`` (in a URI or in a ``json:`` file name alike)."""
    out = []
    for address in addresses:
        if isinstance(address, UnixAddress):
            out.append(address.path)
        elif isinstance(address, TcpAddress):
            out.append(f"{address.host}:{address.port}")
    return out


def overlays_on(
    nodes: Sequence[Mapping[str, Any]], addresses: Collection[Address]
) -> list[Overlay]:
    """The nodes (``query-named-block-nodes``) whose backing file the export serves."""
    needles = _needles(addresses)
    found = []
    for node in nodes:
        backing = str(node.get("backing_file") or "")
        if backing and any(n in backing for n in needles):
            found.append(Overlay(str(node["node-name"]), backing))
    return found


async def stream_overlays(
    qmp: QmpClient,
    addresses: Collection[Address],
    say: Callable[[str], None],
    *,
    progress_interval: float = PROGRESS_INTERVAL,
) -> list[Overlay]:
    """Stream every overlay of the VM behind ``qmp`` that the export at ``addresses``
    backs; return them once all are complete and none refers to the export.

    Raises:
        LiveRestoreError: no such overlay, a job failed or was cancelled, or a node
            still has its backing file on the export afterwards.
        QmpError, QmpConnectionClosed: QEMU refused a command or went away.
    """
    overlays = overlays_on(await qmp.execute("query-named-block-nodes"), addresses)
    if not overlays:
        where = ", ".join(str(a) for a in addresses)
        raise LiveRestoreError(
            f"no block node of the VM has its backing file on this export ({where}): "
            "start it on qcow2 overlays created with -b 'nbd+unix:///DISK?socket=PATH'"
        )
    events = qmp.events()  # before the jobs start: none of their events is missed
    jobs: dict[str, Overlay] = {}
    for i, overlay in enumerate(overlays):
        job = f"nbdvma-restore{i}"
        await qmp.execute("block-stream", {"job-id": job, "device": overlay.node})
        jobs[job] = overlay
        say(f"{overlay.node}: streaming from {overlay.backing}")
    while jobs:
        try:
            event = await events.wait(
                _ENDS, match=lambda e: e.data.get("device") in jobs, timeout=progress_interval
            )
        except QmpTimeout:
            for info in await qmp.execute("query-block-jobs"):
                running = jobs.get(str(info.get("device")))
                if running is not None and info.get("len"):
                    done, total = int(info["offset"]), int(info["len"])
                    say(
                        f"{running.node}: {100 * done // total}% "
                        f"({format_bytes(done)} of {format_bytes(total)})"
                    )
            continue
        overlay = jobs.pop(str(event.data["device"]))
        if event.name == "BLOCK_JOB_CANCELLED":
            raise LiveRestoreError(f"{overlay.node}: the stream job was cancelled")
        if "error" in event.data:
            raise LiveRestoreError(f"{overlay.node}: the stream job failed: {event.data['error']}")
        say(f"{overlay.node}: complete ({format_bytes(int(event.data.get('len', 0)))})")
    left = overlays_on(await qmp.execute("query-named-block-nodes"), addresses)
    if left:
        names = ", ".join(o.node for o in left)
        raise LiveRestoreError(f"{names}: still backed by the export after the stream")
    return overlays
