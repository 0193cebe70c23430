"""Small synthetic VOC-layout sets for the tests that run locbe end to end, made by the `make-synthetic` command
in a child process (as a user makes them; the child needs no import of the test's process state)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_synthetic_set(parent: Path, num_train: int, num_val: int, seed: int) -> Path:
    root = parent / "voc"
    subprocess.run([sys.executable, "-m", "locbe.cli", "make-synthetic", "--out", str(root), "--num-train",
                    str(num_train), "--num-val", str(num_val), "--seed", str(seed)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return root
