"""Packaging hook: the lattice op's kernel sources live in cuda/ (their single home); a build of the package
(wheel, non-editable install) copies them into locbe/lattice/csrc so that an installed locbe can compile the op
on first use from any directory. Everything else is declared in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SUFFIXES = (".h", ".cpp", ".cu")


class BuildPyWithKernelSources(build_py):
    def run(self):
        super().run()
        dest = Path(self.build_lib) / "locbe" / "lattice" / "csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOT / "cuda").iterdir()):
            if src.suffix in SUFFIXES:
                shutil.copyfile(src, dest / src.name)


setup(cmdclass={"build_py": BuildPyWithKernelSources})
