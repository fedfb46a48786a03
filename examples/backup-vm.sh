#!/usr/bin/env bash
# Back up a (demo, paused) QEMU VM with `nbdvma backup`, as vzdump would: two raw disks,
# the VM state and its Proxmox config (with the #qmdump#map lines restore needs) into
# DIR/vzdump-qemu-100-<time>.vma and its .log; then list and verify it.
#
#   bash examples/backup-vm.sh            (needs qemu-system-x86_64; run from anywhere)
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

# Two raw disks with some data and holes; the second is not a multiple of 64 KiB.
truncate -s 64M "$tmp/disk0.raw"
dd if=/dev/urandom of="$tmp/disk0.raw" bs=1M count=8 seek=4 conv=notrunc status=none
truncate -s $((32 * 1024 * 1024 + 4096)) "$tmp/disk1.raw"
dd if=/dev/urandom of="$tmp/disk1.raw" bs=4k count=1 seek=8192 conv=notrunc status=none

# A paused VM without a guest OS: the backup job reads its disks all the same.
qemu-system-x86_64 -S -nodefaults -display none -machine q35 -accel tcg -m 256 -smp 1 \
  -qmp "unix:$tmp/qmp.sock,server=on,wait=off" \
  -blockdev "driver=file,filename=$tmp/disk0.raw,node-name=file0" \
  -blockdev driver=raw,file=file0,node-name=disk0 \
  -device virtio-blk-pci,drive=disk0,id=scsi0 \
  -blockdev "driver=file,filename=$tmp/disk1.raw,node-name=file1" \
  -blockdev driver=raw,file=file1,node-name=disk1 \
  -device virtio-blk-pci,drive=disk1,id=scsi1 2>"$tmp/qemu.log" &  # QEMU's own messages
qemu_pid=$!
for _ in $(seq 100); do [ -S "$tmp/qmp.sock" ] && break; sleep 0.1; done

cat > "$tmp/qemu-server.conf" <<CONF
name: demo
memory: 256
scsi0: local:100/vm-100-disk-0.raw,size=64M
scsi1: local:100/vm-100-disk-1.raw,size=32772K
CONF

mkdir "$tmp/dump"
"$py" -m nbdvma backup --qmp "unix:$tmp/qmp.sock" --vmid 100 "$tmp/dump" \
  --vmstate --config "$tmp/qemu-server.conf"
qmp_quit

archive=$(ls "$tmp"/dump/vzdump-qemu-100-*.vma)
"$py" -m nbdvma list "$archive"
"$py" -m nbdvma config "$archive"   # qemu-server.conf, with the map lines
"$py" -m nbdvma verify "$archive" && echo "archive verified"
