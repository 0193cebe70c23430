"""Rules of the package layout, read from the source with ``ast`` (nothing is imported).

The parts of the training loop in ``locbe/training/`` must not import the loop, ``locbe/train.py``:
the loop is the top that uses them (docs/DESIGN.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LOCBE = Path(__file__).resolve().parents[1] / "locbe"


def imported_modules(source: str, package: str) -> set[str]:
    """Every module an ``import`` / ``from ... import`` names, at any depth of the file; relative imports
    resolved against ``package``; ``from X import y`` counts both X and X.y (y may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def imports_the_loop(source: str, package: str = "locbe.training") -> bool:
    return any(m == "locbe.train" or m.startswith("locbe.train.") for m in imported_modules(source, package))


@pytest.mark.parametrize("source", [
    "import locbe.train",
    "from locbe.train import train",
    "from locbe import train",
    "from .. import train",
    "from ..train import build_optimizer",
    "def run():\n    from locbe.train import train\n    return train",
])
def test_the_scanner_sees_every_spelling_of_the_import(source):
    assert imports_the_loop(source)


@pytest.mark.parametrize("source", ["from locbe.training.optim import build_optimizer", "from . import rundir",
                                    "import locbe.training.cli", "from locbe import training"])
def test_the_scanner_lets_the_parts_import_each_other(source):
    assert not imports_the_loop(source)


def test_no_module_of_locbe_training_imports_locbe_train():
    files = sorted((LOCBE / "training").glob("*.py"))
    assert files
    offenders = [f.name for f in files if imports_the_loop(f.read_text(), "locbe.training")]
    assert offenders == [], f"these modules of locbe/training/ import locbe/train.py: {offenders}"
