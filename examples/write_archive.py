"""Write a Proxmox VMA archive from Python, then read it back: nbdvma as a library.

    python examples/write_archive.py [DIR]      (default: a new temporary directory)

Two disks are written the way an NBD client would write them (out of order, in
pieces, zeros as zeros), with a config Proxmox restores (``qemu-server.conf`` with its
``#qmdump#map`` lines) and a small VM-state stream; the archive is then read back
with every check of Proxmox's reader and compared with what was written.
"""

from __future__ import annotations

import os
import sys
import tempfile

from nbdvma import VmaReader, VmaWriter, archive_configs, open_sink

MiB = 1 << 20


def main(directory: str) -> int:
    path = os.path.join(directory, "vzdump-qemu-100-2026_01_01-00_00_00.vma.zst")
    disks = {
        "drive-scsi0": bytearray(os.urandom(MiB) + bytes(3 * MiB)),  # data, then a hole
        "drive-virtio1": bytearray(bytes(MiB) + b"boot sector".ljust(512, b"\0")),
    }
    config = (
        b"memory: 2048\nscsi0: local-lvm:vm-100-disk-0,size=4M\n"
        b"virtio1: local-lvm:vm-100-disk-1,size=1049088\n"
    )
    configs, _, warnings = archive_configs([(None, "100.conf", config)], list(disks))
    for warning in warnings:
        print(f"warning: {warning}")

    writer = VmaWriter(open_sink(path))  # .zst: compressed, one zstd frame per extent
    for name, data in configs:
        writer.add_config(name, data)
    ids = {name: writer.add_device(name, len(data)) for name, data in disks.items()}
    vmstate = writer.add_stream()
    # Any order, any piece size: the writer assembles 64 KiB clusters.
    for name, data in disks.items():
        for offset in reversed(range(0, len(data), 96 * 1024)):
            piece = data[offset : offset + 96 * 1024]
            if any(piece):
                writer.write(ids[name], offset, piece)
            else:
                writer.write_zeroes(ids[name], offset, len(piece))
    writer.append(vmstate, b"QEVM\0\0\0\3" + os.urandom(100_000))
    writer.finish()  # pads the last clusters, fsyncs, renames from .part
    print(f"wrote {path}: {os.path.getsize(path)} bytes")

    # Whole 64 KiB clusters: the last one of a disk runs past its end.
    restored = {name: bytearray(-(-len(data) // 65536) * 65536) for name, data in disks.items()}
    with VmaReader.open(path) as reader:
        for cluster in reader.clusters():
            if cluster.dev.is_vmstate:
                continue
            target = restored[cluster.dev.name]
            stored = iter(range(0, len(cluster.data), 4096))
            for block in range(16):
                if cluster.mask >> block & 1:
                    start = cluster.cluster * 65536 + block * 4096
                    at = next(stored)
                    target[start : start + 4096] = cluster.data[at : at + 4096]
        reader.check_missing()
        # The BLAKE3 digest nbdvma records for a file archive: raises if a byte changed.
        digest = reader.check_digest()
        assert digest is not None
        print(f"configs: {[name for name, _ in reader.header.configs]}")
        print(f"data digest (blake3) verified over {digest.length} bytes")
    for name, data in disks.items():
        assert restored[name][: len(data)] == data, name
        print(f"{name}: {len(data)} bytes read back identical")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="nbdvma-")))
