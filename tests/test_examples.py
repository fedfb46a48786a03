"""Every script in ``examples/`` runs to the end (with the real QEMU, qemu-img, qemu-io
it drives) and says it checked what it claims."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

EXAMPLES = Path(__file__).parent.parent / "examples"
#: The line each example prints once its own check passed.
CHECKED = {
    "backup-vm.sh": "archive verified",
    "drive-backup-tcp.sh": "restored disk is identical",
    "qemu-img-into-serve.sh": "restored image is identical",
    "restore-and-compare.sh": "restored disks are identical",
    "write_archive.py": "read back identical",
    "serve_backend.py": "the RAM disk holds what qemu-io wrote",
}


def test_every_example_is_listed() -> None:
    scripts = {p.name for p in EXAMPLES.iterdir() if p.suffix in (".sh", ".py")}
    assert scripts == set(CHECKED)


@pytest.mark.parametrize("name", sorted(CHECKED))
def test_example_runs(name: str, tmp_path: Path) -> None:
    script = EXAMPLES / name
    if script.suffix == ".py":
        argv = [sys.executable, str(script)]
        if name == "write_archive.py":
            argv.append(str(tmp_path))
    else:
        argv = ["bash", str(script)]
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert CHECKED[name] in result.stdout + result.stderr
    # QEMU's own messages ("terminating on signal 15") go to a log file, not the user.
    assert "qemu-system-x86_64:" not in result.stdout + result.stderr
