"""The ``vma``-compatible tools: list, config, verify, extract and create.

Each command behaves and prints like Proxmox's ``vma`` (format doc §8), except that
errors never abort with a core dump: every failure is a
:class:`~nbdvma.errors.ToolError` carrying the one line to print on stderr and the
exit status.  Format errors keep the real tool's wording (``verify failed - found
duplicated cluster 5 for stream disk0``).

The commands live in :mod:`~nbdvma.tools.inspect` (list, config, verify),
:mod:`~nbdvma.tools.extract` and :mod:`~nbdvma.tools.create`; what they share is in
:mod:`~nbdvma.tools.common`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from nbdvma.errors import ToolError

#: Public name -> the module that defines it; imported on first use, so that a
#: command pays only for its own tool (``export`` needs none of ``create``).
_EXPORTS = {
    "DEFAULT_CONFIG": "nbdvma.tools.inspect",
    "create_archive": "nbdvma.tools.create",
    "extract_archive": "nbdvma.tools.extract",
    "list_archive": "nbdvma.tools.inspect",
    "print_config": "nbdvma.tools.inspect",
    "verify_archive": "nbdvma.tools.inspect",
}

__all__ = [
    "DEFAULT_CONFIG",
    "ToolError",
    "create_archive",
    "extract_archive",
    "list_archive",
    "print_config",
    "verify_archive",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nbdvma.tools' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from nbdvma.tools.create import create_archive
    from nbdvma.tools.extract import extract_archive
    from nbdvma.tools.inspect import DEFAULT_CONFIG, list_archive, print_config, verify_archive
