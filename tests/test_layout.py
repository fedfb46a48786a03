"""The shape of the package: two I/O-free cores, imports pointing inward.

* ``nbdvma.nbd`` and ``nbdvma.vma`` (every module of them) load neither trio nor any
  ``nbdvma`` module outside their own package but ``nbdvma.errors``; each module is
  imported in a fresh interpreter, so one module's imports cannot hide another's.
* Only the command line (``nbdvma.cli``, ``nbdvma.commands``, ``nbdvma.__main__``)
  imports the command line: the library never parses arguments.
* No module grows past what a reader can hold in their head.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import nbdvma
import nbdvma.nbd
import nbdvma.vma

PACKAGE = Path(nbdvma.__file__).parent
#: The most lines a module may have (the house rule: ~600).
MAX_MODULE_LINES = 600


def _modules(package: object) -> list[str]:
    path = package.__path__  # type: ignore[attr-defined]
    prefix = package.__name__ + "."  # type: ignore[attr-defined]
    return sorted(m.name for m in pkgutil.walk_packages(path, prefix))


CORE_MODULES = ["nbdvma.nbd", "nbdvma.vma", *_modules(nbdvma.nbd), *_modules(nbdvma.vma)]

_CHECK = """
import importlib, sys
importlib.import_module(sys.argv[1])
core = sys.argv[1].split(".")[1]
allowed = {"nbdvma", "nbdvma.errors", f"nbdvma.{core}"}
outside = sorted(
    m for m in sys.modules
    if m.startswith("nbdvma.") and m not in allowed and not m.startswith(f"nbdvma.{core}.")
)
bad = (["trio"] if "trio" in sys.modules else []) + outside
print(" ".join(bad))
"""


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_nothing_of_the_shell(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _CHECK, module], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [], f"{module} loads {result.stdout.strip()}"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_only_the_command_line_imports_the_command_line() -> None:
    command_line = ("nbdvma.cli", "nbdvma.commands", "nbdvma.__main__")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if name.startswith(command_line):
            continue
        for imported in _imports(path):
            if imported.startswith(command_line) or imported == "argparse":
                offenders.append(f"{name} imports {imported}")
    assert offenders == []


def test_modules_stay_small() -> None:
    sizes = {
        _module_name(p): len(p.read_text().splitlines()) for p in sorted(PACKAGE.rglob("*.py"))
    }
    assert {m: n for m, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_the_library_surface_resolves() -> None:
    """Every public name of ``nbdvma`` loads, and ``__all__`` lists exactly them."""
    public = set(nbdvma.__all__) - {"__version__"}
    assert public == set(nbdvma._EXPORTS)
    for name in sorted(public):
        value = getattr(nbdvma, name)
        assert getattr(value, "__name__", name) == name, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        nbdvma.nope  # noqa: B018
