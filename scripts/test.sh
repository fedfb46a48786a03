#!/usr/bin/env bash
# The whole test suite: set-up, then pytest, ruff check, ruff format --check, mypy.
#
# Every step runs even if an earlier one failed, and the script exits non-zero if any
# did, so one run shows every problem.  pytest's exit 5 ("no tests collected") counts
# as a failure.  Extra arguments go to pytest (e.g. `bash scripts/test.sh -k qmp`).
# NBDVMA_TEST_WORKERS sets pytest-xdist's worker count (default 2; 0 = no workers).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh || exit 1

VENV=.venv/bin
failed=()

step() {
    local name=$1
    shift
    printf '\n==> %s\n' "$name"
    "$@" </dev/null
    local rc=$?
    if ((rc == 5)) && [[ $name == pytest ]]; then
        echo "pytest collected no tests: that is a failure here"
    fi
    ((rc == 0)) || failed+=("$name (exit $rc)")
}

step pytest "$VENV/python" -m pytest -n "${NBDVMA_TEST_WORKERS:-2}" "$@"
step "ruff check" "$VENV/ruff" check .
step "ruff format" "$VENV/ruff" format --check .
step mypy "$VENV/mypy"

echo
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all checks passed: pytest, ruff check, ruff format --check, mypy"
