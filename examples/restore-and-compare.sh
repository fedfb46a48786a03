#!/usr/bin/env bash
# Back up a demo VM with `nbdvma backup`, restore the archive with `nbdvma extract`
# and compare every restored disk with its source, byte for byte.
#
#   bash examples/restore-and-compare.sh
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
[ -x "$py" ] || py=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

tmp=$(mktemp -d /tmp/nbdvma-example-XXXXXX)
qemu_pid=
cleanup() { [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
# Stop QEMU as an administrator does: QMP "quit", then wait for it to exit (a signal
# would make it log "terminating on signal 15").
qmp_quit() {
  python3 - "$tmp/qmp.sock" <<'PY'
import json, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
f = sock.makefile("rw")
f.readline()  # greeting
for cmd in ("qmp_capabilities", "quit"):
    f.write(json.dumps({"execute": cmd}) + "\n"); f.flush()
    while "return" not in json.loads(f.readline() or '{"return": {}}'):
        pass  # an event
PY
  wait "$qemu_pid" || { echo "QEMU exited with $?; its messages: $tmp/qemu.log" >&2; exit 1; }
  qemu_pid=
}

truncate -s 48M "$tmp/disk0.raw"
dd if=/dev/urandom of="$tmp/disk0.raw" bs=1M count=4 seek=1 conv=notrunc status=none
dd if=/dev/zero of="$tmp/disk0.raw" bs=1M count=4 seek=10 conv=notrunc status=none  # stored zeros
truncate -s $((16 * 1024 * 1024 + 512)) "$tmp/disk1.raw"
printf 'last sector' | dd of="$tmp/disk1.raw" bs=512 seek=32768 conv=notrunc status=none

qemu-system-x86_64 -S -nodefaults -display none -machine q35 -accel tcg -m 128 -smp 1 \
  -qmp "unix:$tmp/qmp.sock,server=on,wait=off" \
  -blockdev "driver=file,filename=$tmp/disk0.raw,node-name=file0" \
  -blockdev driver=raw,file=file0,node-name=disk0 \
  -device virtio-blk-pci,drive=disk0,id=scsi0 \
  -blockdev "driver=file,filename=$tmp/disk1.raw,node-name=file1" \
  -blockdev driver=raw,file=file1,node-name=disk1 \
  -device virtio-blk-pci,drive=disk1,id=scsi1 2>"$tmp/qemu.log" &  # QEMU's own messages
qemu_pid=$!
for _ in $(seq 100); do [ -S "$tmp/qmp.sock" ] && break; sleep 0.1; done

"$py" -m nbdvma backup --qmp "unix:$tmp/qmp.sock" "$tmp/backup.vma.zst" --compress zstd --vmstate
qmp_quit
"$py" -m nbdvma extract "$tmp/backup.vma.zst" "$tmp/restore"

cmp "$tmp/disk0.raw" "$tmp/restore/disk-drive-scsi0.raw"
cmp "$tmp/disk1.raw" "$tmp/restore/disk-drive-scsi1.raw"
head -c 4 "$tmp/restore/vmstate.bin" | grep -q QEVM
echo "restored disks are identical to the sources; vmstate.bin starts with QEVM"
