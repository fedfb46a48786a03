#!/usr/bin/env bash
# Write a raw image into `nbdvma serve` with `qemu-img convert` over a unix socket;
# serve finishes the archive when the image is complete and the client has gone.
#
#   bash examples/qemu-img-into-serve.sh
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
[ -x "$py" ] || py=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

tmp=$(mktemp -d /tmp/nbdvma-example-XXXXXX)
serve_pid=
cleanup() { [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

size=$((40 * 1024 * 1024 + 512))
truncate -s "$size" "$tmp/disk.raw"
dd if=/dev/urandom of="$tmp/disk.raw" bs=1M count=3 seek=7 conv=notrunc status=none

"$py" -m nbdvma serve "$tmp/disk.vma" --listen "unix:$tmp/nbd.sock" \
  --disk "drive-scsi0=$size" &
serve_pid=$!
for _ in $(seq 100); do [ -S "$tmp/nbd.sock" ] && break; sleep 0.1; done

# -n: the export exists already (qemu-img must not try to create it).
qemu-img convert -n -f raw -O raw "$tmp/disk.raw" "nbd+unix:///drive-scsi0?socket=$tmp/nbd.sock"
wait "$serve_pid"; serve_pid=

"$py" -m nbdvma verify "$tmp/disk.vma"
"$py" -m nbdvma extract "$tmp/disk.vma" "$tmp/restore"
cmp "$tmp/disk.raw" "$tmp/restore/disk-drive-scsi0.raw" && echo "restored image is identical"
