#!/usr/bin/env bash
# QEMU's legacy `drive-backup` into `nbdvma serve` over TCP, driven by raw QMP
# (JSON lines on QEMU's QMP socket, here from a few lines of python3).
#
#   bash examples/drive-backup-tcp.sh
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
[ -x "$py" ] || py=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

tmp=$(mktemp -d /tmp/nbdvma-example-XXXXXX)
qemu_pid= serve_pid=
cleanup() {
  [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null
  rm -rf "$tmp"
}
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

size=$((24 * 1024 * 1024))
truncate -s "$size" "$tmp/disk0.raw"
dd if=/dev/urandom of="$tmp/disk0.raw" bs=64k count=20 seek=33 conv=notrunc status=none
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

qemu-system-x86_64 -S -nodefaults -display none -machine q35 -accel tcg -m 128 -smp 1 \
  -qmp "unix:$tmp/qmp.sock,server=on,wait=off" \
  -blockdev "driver=file,filename=$tmp/disk0.raw,node-name=file0" \
  -blockdev driver=raw,file=file0,node-name=disk0 \
  -device virtio-blk-pci,drive=disk0,id=scsi0 2>"$tmp/qemu.log" &  # QEMU's own messages
qemu_pid=$!

"$py" -m nbdvma serve "$tmp/backup.vma" --listen "tcp:127.0.0.1:$port" \
  --disk "drive-scsi0=$size" --pid-file "$tmp/serve.pid" &
serve_pid=$!
for _ in $(seq 100); do [ -S "$tmp/qmp.sock" ] && break; sleep 0.1; done
# The pid file appears once serve listens (as with qemu-nbd and nbdkit).
for _ in $(seq 200); do [ -s "$tmp/serve.pid" ] && break; sleep 0.05; done

# Raw QMP: greeting, qmp_capabilities, drive-backup, then wait for BLOCK_JOB_COMPLETED.
# With format=raw and mode=existing QEMU opens the export as is (no probe, no create),
# and closes it (FLUSH, DISC) when the job ends, which completes the archive.
python3 - "$tmp/qmp.sock" "$port" <<'PY'
import json, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
f = sock.makefile("rw")
def send(cmd, **args):
    f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n"); f.flush()
    while True:
        msg = json.loads(f.readline())
        if "return" in msg or "error" in msg:
            if "error" in msg: sys.exit(f"{cmd}: {msg['error']['desc']}")
            return msg["return"]
json.loads(f.readline())  # greeting
send("qmp_capabilities")
send("drive-backup", **{"job-id": "job0", "device": "disk0", "sync": "full",
     "target": f"nbd://127.0.0.1:{sys.argv[2]}/drive-scsi0", "format": "raw", "mode": "existing"})
while True:
    msg = json.loads(f.readline())
    if msg.get("event") == "BLOCK_JOB_COMPLETED":
        if "error" in msg["data"]: sys.exit(f"backup failed: {msg['data']['error']}")
        print("QEMU: backup job completed")
        break
PY
wait "$serve_pid"; serve_pid=
qmp_quit

"$py" -m nbdvma extract "$tmp/backup.vma" "$tmp/restore"
cmp "$tmp/disk0.raw" "$tmp/restore/disk-drive-scsi0.raw" && echo "restored disk is identical"
