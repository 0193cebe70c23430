"""Rules of the package layout, read from the source with ``ast`` (nothing is imported): the training parts
never import the loop, and each layer (runtime, lattice, method, report) imports only what its rule allows.

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


# ----------------------------------------------------------------------------- the layers (docs/DESIGN.md)
COMMANDS = ("locbe.cli", "locbe.__main__", "locbe.train", "locbe.train_command", "locbe.reproduce",
            "locbe.device_check", "locbe.bench", "locbe.rehearsal")
# package -> (allowed locbe modules, or None for "anything not forbidden"; forbidden prefixes)
LAYER_RULES = {
    "runtime": (("locbe.runtime", "locbe.errors"), ()),
    "lattice": (("locbe.lattice", "locbe.runtime", "locbe.errors"), ()),
    "method": (None, ("locbe.report", "locbe.training") + COMMANDS),
    "report": (None, ("locbe.training", "locbe.method") + COMMANDS),
}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_violations(source: str, package: str) -> list[str]:
    allowed, forbidden = LAYER_RULES[package]
    bad = []
    for m in sorted(imported_modules(source, f"locbe.{package}")):
        if not _under(m, "locbe") or m == "locbe":
            continue
        if allowed is not None and not any(_under(m, a) for a in allowed):
            bad.append(m)
        elif any(_under(m, f) for f in forbidden):
            bad.append(m)
    return bad


@pytest.mark.parametrize("package, source", [
    ("runtime", "from locbe.config import TrainConfig"),
    ("runtime", "def f():\n    from locbe.data import build_dataset"),
    ("lattice", "from locbe.method.regloss import RegularizedLoss"),
    ("lattice", "from ..models import build_model"),
    ("method", "from locbe.report import stats"),
    ("method", "from locbe.training.rundir import RESUME_HINT"),
    ("method", "from locbe import train"),
    ("report", "from locbe.method import cam as camlib"),
    ("report", "from ..training import rundir"),
])
def test_the_layer_scanner_sees_a_forbidden_import(package, source):
    assert layer_violations(source, package)


@pytest.mark.parametrize("package, source", [
    ("runtime", "from locbe.errors import LocbeError\nfrom .fileio import atomic_path"),
    ("lattice", "from locbe.runtime.fileio import atomic_path\nfrom .checks import check_inputs"),
    ("method", "from locbe.lattice.op import ops\nfrom locbe.data import denormalize\nfrom . import losses"),
    ("report", "from locbe.runtime.fileio import atomic_write_text\nfrom locbe.data import VOC_CLASSES"),
])
def test_the_layer_scanner_lets_allowed_imports_pass(package, source):
    assert layer_violations(source, package) == []


@pytest.mark.parametrize("package", sorted(LAYER_RULES))
def test_each_layer_imports_only_what_its_rule_allows(package):
    files = sorted((LOCBE / package).glob("*.py"))
    assert files, f"locbe/{package}/ has no modules"
    offenders = {f.name: v for f in files if (v := layer_violations(f.read_text(), package))}
    assert offenders == {}, f"locbe/{package}/ breaks its import rule (its __init__.py docstring): {offenders}"


@pytest.mark.parametrize("package", sorted(LAYER_RULES))
def test_each_layer_says_its_concern_and_rule(package):
    doc = ast.get_docstring(ast.parse((LOCBE / package / "__init__.py").read_text())) or ""
    assert "May import" in doc, f"locbe/{package}/__init__.py must say what the package may import"
