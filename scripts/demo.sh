#!/usr/bin/env bash
# The main job, for now: make two small raw disks, pack them with a VM config into a
# Proxmox VMA archive with `nbdvma create`, show it with `nbdvma list`, check it with
# `nbdvma verify -v`, and restore it with `nbdvma extract` to compare with the originals.
# (It becomes a backup of a running QEMU once `nbdvma backup` exists.)
#
# Output goes to $NBDVMA_DEMO_DIR (default: a new /tmp/nbdvma-demo.XXXXXX), kept for a look.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
NBDVMA=$PWD/.venv/bin/nbdvma

DIR=${NBDVMA_DEMO_DIR:-$(mktemp -d /tmp/nbdvma-demo.XXXXXX)}
mkdir -p "$DIR"
cd "$DIR"
rm -rf disk-a.raw disk-b.raw qemu-server.conf demo.vma restored
echo "demo: working in $DIR"

KiB=1024
MiB=$((1024 * KiB))
# Disk A: 5 MiB + 25 sectors (12800 bytes), so its last 64 KiB cluster is partial.
# (Disk sizes are whole 512-byte sectors, as QEMU and Proxmox's restore expect.)
#   [0, 256K) random data, then a hole, 64 KiB of 0xab at 2 MiB, 128 KiB of zeros
#   written as data at 3 MiB (stored zeros, not a hole), random bytes at the very end.
SIZE_A=$((5 * MiB + 25 * 512))
truncate -s "$SIZE_A" disk-a.raw
dd if=/dev/urandom of=disk-a.raw bs=64K count=4 conv=notrunc status=none
head -c $((64 * KiB)) /dev/zero | tr '\0' '\253' |
    dd of=disk-a.raw bs=64K seek=32 conv=notrunc status=none
dd if=/dev/zero of=disk-a.raw bs=64K seek=48 count=2 conv=notrunc status=none
dd if=/dev/urandom of=disk-a.raw bs=1 seek=$((SIZE_A - 1000)) count=1000 conv=notrunc status=none
# Disk B: 8 MiB, a hole except 1 MiB of random data at 4 MiB and a 4 KiB text block.
SIZE_B=$((8 * MiB))
truncate -s "$SIZE_B" disk-b.raw
dd if=/dev/urandom of=disk-b.raw bs=1M seek=4 count=1 conv=notrunc status=none
printf 'nbdvma demo disk b\n' | dd of=disk-b.raw bs=4K seek=100 conv=notrunc status=none

cat >qemu-server.conf <<CONF
boot: order=scsi0
cores: 1
memory: 128
name: nbdvma-demo
scsihw: virtio-scsi-pci
scsi0: local:100/vm-100-disk-0.raw,size=${SIZE_A}
scsi1: local:100/vm-100-disk-1.raw,size=${SIZE_B}
CONF

echo
echo "== nbdvma create"
"$NBDVMA" create -v -c qemu-server.conf demo.vma drive-scsi0=disk-a.raw drive-scsi1=disk-b.raw
ls -l disk-a.raw disk-b.raw demo.vma
echo
echo "== nbdvma list"
"$NBDVMA" list demo.vma
echo
echo "== nbdvma verify -v"
"$NBDVMA" verify -v demo.vma
echo
echo "== nbdvma extract"
"$NBDVMA" extract demo.vma restored
cmp disk-a.raw restored/disk-drive-scsi0.raw
cmp disk-b.raw restored/disk-drive-scsi1.raw
cmp qemu-server.conf restored/qemu-server.conf
echo "restored disks and config are identical to the originals"
echo
echo "demo: OK (files in $DIR)"
