#!/usr/bin/env bash
# The main job: back up a running QEMU VM into a Proxmox VMA archive that Proxmox restores.
#
# It starts a small demo VM set up as Proxmox sets one up (QEMU paused, no guest OS
# needed: the backup job reads the disks all the same): a SCSI disk on virtio-scsi
# (scsi0), a virtio disk (virtio1) whose size is not a multiple of 64 KiB, and a
# read-only virtio disk (virtio2), all with data and holes, plus a CD-ROM and a NIC.
# It backs the VM up with `nbdvma backup --vmstate --vmid 100` into a directory, as
# vzdump does: the archive gets vzdump's name, a `.log` and a `qemu-server.conf`
# made from what QEMU tells (with the `#qmdump#map` lines restore needs).  It then
# prints `nbdvma list`, the config and the result of `nbdvma verify`; checks the
# archive with Proxmox's restore rules (tests/pverules.py); restores it with
# `nbdvma extract` and compares the disks; and loads the VM state, extracted the way
# Proxmox's reader extracts it, into a matching QEMU, which must accept it.
#
# Output goes to $NBDVMA_DEMO_DIR (default: a new /tmp/nbdvma-demo.XXXXXX), kept for a look.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
ROOT=$PWD
NBDVMA=$ROOT/.venv/bin/nbdvma
PYTHON=$ROOT/.venv/bin/python

DIR=${NBDVMA_DEMO_DIR:-$(mktemp -d /tmp/nbdvma-demo.XXXXXX)}
mkdir -p "$DIR"
cd "$DIR"
rm -rf disk-*.raw cd.iso dump restored vmstate-proxmox.bin ./*.sock ./*.copy ./*.log
mkdir dump
echo "demo: working in $DIR"

KiB=1024
MiB=$((1024 * KiB))
# scsi0: 8 MiB, a hole except 1 MiB of random data at 4 MiB and a text block.
truncate -s $((8 * MiB)) disk-scsi0.raw
dd if=/dev/urandom of=disk-scsi0.raw bs=1M seek=4 count=1 conv=notrunc status=none
printf 'nbdvma demo disk scsi0\n' | dd of=disk-scsi0.raw bs=4K seek=100 conv=notrunc status=none
# virtio1: 5 MiB + 25 sectors, so its last 64 KiB cluster is partial: random data at the
#   start, 64 KiB of 0xab at 2 MiB, 128 KiB of zeros written as data at 3 MiB (stored
#   zeros, not a hole), random bytes at the very end; holes elsewhere.
SIZE_V=$((5 * MiB + 25 * 512))
truncate -s "$SIZE_V" disk-virtio1.raw
dd if=/dev/urandom of=disk-virtio1.raw bs=64K count=4 conv=notrunc status=none
head -c $((64 * KiB)) /dev/zero | tr '\0' '\253' |
    dd of=disk-virtio1.raw bs=64K seek=32 conv=notrunc status=none
dd if=/dev/zero of=disk-virtio1.raw bs=64K seek=48 count=2 conv=notrunc status=none
dd if=/dev/urandom of=disk-virtio1.raw bs=1 seek=$((SIZE_V - 1000)) count=1000 \
    conv=notrunc status=none
# virtio2: 1 MiB, read-only in the VM (vzdump backs such disks up too).
truncate -s $((1 * MiB)) disk-virtio2.raw
printf 'a read-only disk\n' | dd of=disk-virtio2.raw conv=notrunc status=none
truncate -s $((1 * MiB)) cd.iso

# The VM's hardware; the disks are given as $1 $2 $3 (the demo's, or copies).
vm_args() {
    echo -nodefaults -display none -machine q35 -accel tcg -m 128 -smp 1 -name nbdvma-demo \
        -device virtio-scsi-pci,id=virtioscsi0 \
        -blockdev "driver=file,filename=$1,node-name=f0" \
        -blockdev driver=raw,file=f0,node-name=d0 \
        -device scsi-hd,drive=d0,id=scsi0,bus=virtioscsi0.0,bootindex=100 \
        -blockdev "driver=file,filename=$2,node-name=f1" \
        -blockdev driver=raw,file=f1,node-name=d1 \
        -device virtio-blk-pci,drive=d1,id=virtio1 \
        -blockdev "driver=file,filename=$3,node-name=f2,read-only=on" \
        -blockdev driver=raw,file=f2,node-name=d2,read-only=on \
        -device virtio-blk-pci,drive=d2,id=virtio2 \
        -blockdev "driver=file,filename=$DIR/cd.iso,node-name=cdf,read-only=on" \
        -blockdev driver=raw,file=cdf,node-name=cd0,read-only=on \
        -device ide-cd,drive=cd0,id=ide2,bus=ide.0 \
        -netdev user,id=n0 -device virtio-net-pci,netdev=n0,id=net0,mac=bc:24:11:de:4d:01
}

wait_socket() {
    for _ in $(seq 100); do
        [ -S "$1" ] && return 0
        sleep 0.1
    done
    echo "demo: $1 did not appear" >&2
    return 1
}

PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT

echo
echo "== a demo VM: paused QEMU, QMP on $DIR/qmp.sock (its output: $DIR/qemu.log)"
# shellcheck disable=SC2046 # word splitting of vm_args is wanted
qemu-system-x86_64 -S $(vm_args "$DIR/disk-scsi0.raw" "$DIR/disk-virtio1.raw" \
    "$DIR/disk-virtio2.raw") -qmp "unix:$DIR/qmp.sock,server=on,wait=off" >qemu.log 2>&1 &
PIDS+=($!)
wait_socket qmp.sock

echo
echo "== nbdvma backup --vmstate --vmid 100 dump/   (no --config: one is made from QEMU)"
"$NBDVMA" backup --qmp "unix:$DIR/qmp.sock" --vmstate --vmid 100 dump
ARCHIVE=$(ls dump/vzdump-qemu-100-*.vma)
LOG=${ARCHIVE%.vma}.log
ls -l dump
echo
echo "== nbdvma list $ARCHIVE"
"$NBDVMA" list "$ARCHIVE"
echo
echo "== the stored qemu-server.conf"
"$NBDVMA" config "$ARCHIVE"
echo
echo "== nbdvma verify"
"$NBDVMA" verify "$ARCHIVE" && echo "verify: OK"
echo
echo "== Proxmox's restore rules (file name, map lines, config), and its VM-state extraction"
"$PYTHON" "$ROOT/tests/pverules.py" "$ARCHIVE" vmstate-proxmox.bin
echo "qmrestore's checks pass; the .log has $(wc -l <"$LOG") timestamped lines"
echo
echo "== nbdvma extract, and a comparison with the VM's disks"
"$NBDVMA" extract "$ARCHIVE" restored
for key in scsi0 virtio1 virtio2; do
    cmp "disk-$key.raw" "restored/disk-drive-$key.raw"
done
cmp <(head -c "$(stat -c %s restored/vmstate.bin)" vmstate-proxmox.bin) restored/vmstate.bin
echo "restored disks are identical to the VM's; both extractions give the same VM state"
echo
echo "== the VM state, as Proxmox's reader extracts it, loaded into a matching QEMU"
for key in scsi0 virtio1 virtio2; do cp --sparse=always "disk-$key.raw" "$key.copy"; done
# shellcheck disable=SC2046
qemu-system-x86_64 -S $(vm_args "$DIR/scsi0.copy" "$DIR/virtio1.copy" "$DIR/virtio2.copy") \
    -qmp "unix:$DIR/incoming.sock,server=on,wait=off" \
    -incoming "exec:cat $DIR/vmstate-proxmox.bin" >qemu-incoming.log 2>&1 &
PIDS+=($!)
wait_socket incoming.sock
"$PYTHON" - "$DIR/incoming.sock" <<'PY'
import sys, time, trio
from nbdvma.qmp import QmpClient

async def main() -> str:
    async with QmpClient.connect(f"unix:{sys.argv[1]}") as qmp:
        for _ in range(600):
            status = (await qmp.execute("query-migrate")).get("status")
            if status in ("completed", "failed"):
                return status
            await trio.sleep(0.05)
    return "timeout"

status = trio.run(main)
print(f"incoming migration: {status}")
if status != "completed":
    print(open(sys.argv[1].replace("incoming.sock", "qemu-incoming.log")).read())
sys.exit(status != "completed")
PY
echo
echo "== both QEMUs stopped as an administrator does: QMP quit"
"$PYTHON" - "$DIR/qmp.sock" "$DIR/incoming.sock" <<'PY'
import sys, trio
from nbdvma.qmp import QmpClient, QmpConnectionClosed

async def main() -> None:
    for path in sys.argv[1:]:
        async with QmpClient.connect(f"unix:{path}") as qmp:
            try:
                await qmp.execute("quit")
            except QmpConnectionClosed:
                pass  # QEMU may close the socket before its answer arrives

trio.run(main)
PY
for pid in "${PIDS[@]}"; do wait "$pid"; done
PIDS=()
echo
echo "== restore on Proxmox VE:  qmrestore $(basename "$ARCHIVE") 100 --storage local-lvm"
echo
echo "demo: OK (files in $DIR)"
