#!/usr/bin/env bash
# The main job: back up a running QEMU VM into a Proxmox VMA archive, with defaults.
#
# It starts a small demo VM (QEMU paused, no guest OS needed: the backup job reads the
# disks all the same) with two raw disks of different sizes, one not a multiple of
# 64 KiB, both with data and holes; backs it up with `nbdvma backup --vmstate` and a
# VM config; prints `nbdvma list` and the result of `nbdvma verify`; then restores the
# archive with `nbdvma extract` and compares the disks with the VM's.
#
# Output goes to $NBDVMA_DEMO_DIR (default: a new /tmp/nbdvma-demo.XXXXXX), kept for a look.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
NBDVMA=$PWD/.venv/bin/nbdvma

DIR=${NBDVMA_DEMO_DIR:-$(mktemp -d /tmp/nbdvma-demo.XXXXXX)}
mkdir -p "$DIR"
cd "$DIR"
rm -rf disk-a.raw disk-b.raw qemu-server.conf vzdump-qemu-100.vma restored qmp.sock
echo "demo: working in $DIR"

KiB=1024
MiB=$((1024 * KiB))
# Disk A (scsi0): 5 MiB + 25 sectors, so its last 64 KiB cluster is partial.
#   random data at the start, 64 KiB of 0xab at 2 MiB, 128 KiB of zeros written as data
#   at 3 MiB (stored zeros, not a hole), random bytes at the very end; holes elsewhere.
SIZE_A=$((5 * MiB + 25 * 512))
truncate -s "$SIZE_A" disk-a.raw
dd if=/dev/urandom of=disk-a.raw bs=64K count=4 conv=notrunc status=none
head -c $((64 * KiB)) /dev/zero | tr '\0' '\253' |
    dd of=disk-a.raw bs=64K seek=32 conv=notrunc status=none
dd if=/dev/zero of=disk-a.raw bs=64K seek=48 count=2 conv=notrunc status=none
dd if=/dev/urandom of=disk-a.raw bs=1 seek=$((SIZE_A - 1000)) count=1000 conv=notrunc status=none
# Disk B (scsi1): 8 MiB, a hole except 1 MiB of random data at 4 MiB and a text block.
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
echo "== a demo VM: paused QEMU, two virtio disks, QMP on $DIR/qmp.sock"
qemu-system-x86_64 -S -nodefaults -display none -machine q35 -accel tcg -m 128 -smp 1 \
    -qmp "unix:$DIR/qmp.sock,server=on,wait=off" \
    -blockdev "driver=file,filename=$DIR/disk-a.raw,node-name=file0" \
    -blockdev driver=raw,file=file0,node-name=disk0 \
    -device virtio-blk-pci,drive=disk0,id=scsi0 \
    -blockdev "driver=file,filename=$DIR/disk-b.raw,node-name=file1" \
    -blockdev driver=raw,file=file1,node-name=disk1 \
    -device virtio-blk-pci,drive=disk1,id=scsi1 &
QEMU_PID=$!
trap 'kill "$QEMU_PID" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    [ -S qmp.sock ] && break
    sleep 0.1
done

echo
echo "== nbdvma backup --vmstate"
"$NBDVMA" backup --qmp "unix:$DIR/qmp.sock" --vmstate --config qemu-server.conf \
    vzdump-qemu-100.vma
ls -l disk-a.raw disk-b.raw vzdump-qemu-100.vma
echo
echo "== nbdvma list"
"$NBDVMA" list vzdump-qemu-100.vma
echo
echo "== nbdvma verify"
"$NBDVMA" verify vzdump-qemu-100.vma && echo "verify: OK"
echo
echo "== nbdvma extract, and a comparison with the VM's disks"
"$NBDVMA" extract vzdump-qemu-100.vma restored
cmp disk-a.raw restored/disk-drive-scsi0.raw
cmp disk-b.raw restored/disk-drive-scsi1.raw
cmp qemu-server.conf restored/qemu-server.conf
head -c 4 restored/vmstate.bin | grep -q QEVM
echo "restored disks and config are identical to the VM's; vmstate.bin starts with QEVM"
echo
echo "demo: OK (files in $DIR)"
