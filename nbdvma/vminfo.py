"""What a running QEMU says about its VM, over QMP, as :class:`nbdvma.pve.VmInfo`.

``query-block`` lists the drives but not the devices behind them; the QOM tree has
those (``/machine/peripheral/ID`` for a device with an id, ``peripheral-anon`` for the
others), their types, ``bootindex``, MACs and the bus each hangs on.  Every optional
fact that QEMU cannot give (a command missing, a property absent) is left at its
default: the config is the best description QEMU allows, never a failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbdvma.pve import NIC_MODELS, BlockDevice, Nic, VmInfo
from nbdvma.qmp import QmpClient, QmpError

__all__ = ["describe_vm"]

_PERIPHERAL = "/machine/peripheral/"
_PFLASH = {"/machine/system.flash0": "pflash0", "/machine/system.flash1": "pflash1"}


async def _optional(qmp: QmpClient, command: str, args: Mapping[str, Any] | None = None) -> Any:
    try:
        return await qmp.execute(command, args)
    except QmpError:
        return None


async def _qom_get(qmp: QmpClient, path: str, prop: str) -> Any:
    return await _optional(qmp, "qom-get", {"path": path, "property": prop})


async def _devices(qmp: QmpClient) -> dict[str, str]:
    """QOM path -> qdev type of every user-created device."""
    types = {}
    for parent in ("/machine/peripheral", "/machine/peripheral-anon"):
        for child in await _optional(qmp, "qom-list", {"path": parent}) or []:
            kind = str(child.get("type", ""))
            if kind.startswith("child<") and kind.endswith(">"):
                types[f"{parent}/{child['name']}"] = kind[6:-1]
    return types


def _device_path(qdev: str) -> str | None:
    """The QOM path of ``query-block``'s ``qdev`` (an id, or a path ending in the
    virtio backend of a virtio-blk device)."""
    if not qdev:
        return None
    if not qdev.startswith("/"):
        return _PERIPHERAL + qdev
    return qdev.removesuffix("/virtio-backend")


async def _bootindex(qmp: QmpClient, path: str) -> int | None:
    value = await _qom_get(qmp, path, "bootindex")
    return value if isinstance(value, int) and value >= 0 else None


async def _controller(qmp: QmpClient, path: str) -> tuple[str | None, str | None]:
    """The type and QOM path of the controller whose bus a device hangs on."""
    bus = await _qom_get(qmp, path, "parent_bus")
    if not isinstance(bus, str) or "/" not in bus:
        return None, None
    controller = bus.rsplit("/", 1)[0].removesuffix("/virtio-backend")
    kind = await _qom_get(qmp, controller, "type")
    return (kind if isinstance(kind, str) else None), controller


async def _block(qmp: QmpClient, info: Mapping[str, Any], types: Mapping[str, str]) -> BlockDevice:
    qdev = str(info.get("qdev", ""))
    path = _device_path(qdev)
    kind: str | None = _PFLASH.get(qdev)
    if kind is None and path is not None:
        kind = types.get(path)
        if kind is None:
            found = await _qom_get(qmp, path, "type")
            kind = found if isinstance(found, str) else None
    qdev_id = path[len(_PERIPHERAL) :] if path and path.startswith(_PERIPHERAL) else None
    controller = controller_path = None
    bootindex = None
    if path is not None and kind not in (None, "pflash0", "pflash1"):
        if kind is not None and kind.startswith(("scsi-", "ide-")):
            controller, controller_path = await _controller(qmp, path)
        bootindex = await _bootindex(qmp, path)
    inserted = info.get("inserted")
    node = size = None
    filename = ""
    read_only = False
    if isinstance(inserted, Mapping):
        node = str(inserted.get("node-name", "")) or None
        size = inserted.get("image", {}).get("virtual-size")
        filename = str(inserted.get("file", ""))
        read_only = bool(inserted.get("ro"))
    return BlockDevice(
        backend=str(info.get("device", "")),
        qdev_id=qdev_id,
        device_type=kind,
        controller=controller,
        controller_path=controller_path,
        node=node,
        size=size if isinstance(size, int) else 0,
        filename=filename,
        read_only=read_only,
        bootindex=bootindex,
    )


async def describe_vm(qmp: QmpClient) -> VmInfo:
    """Gather what a Proxmox config can say about the VM behind ``qmp``.

    Raises:
        QmpError: ``query-block`` failed (the only command that must answer).
    """
    types = await _devices(qmp)
    blocks = [await _block(qmp, info, types) for info in await qmp.execute("query-block")]
    nics = []
    for path, kind in types.items():
        if kind in NIC_MODELS:
            mac = await _qom_get(qmp, path, "mac")
            if isinstance(mac, str):
                qdev_id = path[len(_PERIPHERAL) :] if path.startswith(_PERIPHERAL) else None
                nics.append(Nic(qdev_id, kind, mac, await _bootindex(qmp, path)))
    cpus = await _optional(qmp, "query-cpus-fast") or []
    props = [c.get("props", {}) for c in cpus]
    sockets = len({p.get("socket-id", 0) for p in props}) or 1
    cores = max(1, len({(p.get("socket-id", 0), p.get("core-id", 0)) for p in props}) // sockets)
    threads = max(1, len(props) // (sockets * cores)) if props else 1
    memory = await _optional(qmp, "query-memory-size-summary") or {}
    name = await _optional(qmp, "query-name") or {}
    machine = await _qom_get(qmp, "/machine", "type")
    uuid = (await _optional(qmp, "query-uuid") or {}).get("UUID")
    vmgenid = (await _optional(qmp, "query-vm-generation-id") or {}).get("guid")
    return VmInfo(
        name=str(name.get("name", "")),
        memory=int(memory.get("base-memory", 0)),
        sockets=sockets,
        cores=cores,
        threads=threads,
        machine=machine.removesuffix("-machine") if isinstance(machine, str) else "",
        uuid=uuid if uuid and uuid.strip("0-") else None,
        vmgenid=vmgenid if vmgenid and vmgenid.strip("0-") else None,
        blocks=tuple(blocks),
        nics=tuple(nics),
    )
