"""The ``locbe`` command sets a passive OpenMP wait policy before torch loads, unless the user chose one
(locbe/openmp.py; timings in benchmarks/test_bench_cores.py). GNU OpenMP prints the settings it read when
it loads with ``OMP_DISPLAY_ENV=TRUE``: that is what the runtime saw, not what the environment holds later."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fresh_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_DISPLAY_ENV": "TRUE", **extra}


def runtime_wait_policy(tmp_path, **extra) -> str:
    """The wait policy OpenMP read in a fresh ``locbe train`` process (it imports torch, then stops: no data)."""
    proc = subprocess.run([sys.executable, "-m", "locbe.cli", "train", "--preset", "smoke", "--data-root",
                           str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), "--no-progress"],
                          env=fresh_env(**extra), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]  # the missing data root, after torch loaded
    found = re.findall(r"OMP_WAIT_POLICY\s*=\s*'(\w+)'", proc.stderr)
    if not found:
        pytest.skip("this torch's OpenMP runtime does not print OMP_DISPLAY_ENV (not GNU OpenMP)")
    return found[0]


@pytest.mark.skipif(sys.platform != "linux", reason="GNU OpenMP display of the runtime settings")
def test_locbe_sets_passive_wait_policy_before_torch_loads(tmp_path):
    assert runtime_wait_policy(tmp_path) == "PASSIVE"


@pytest.mark.skipif(sys.platform != "linux", reason="GNU OpenMP display of the runtime settings")
def test_a_users_wait_policy_is_kept(tmp_path):
    assert runtime_wait_policy(tmp_path, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


SHOW = ("import os, sys; {pre}from locbe.openmp import apply_shared_core_defaults as a; "
        "print(a(), os.environ.get('OMP_WAIT_POLICY'))")


@pytest.mark.parametrize("extra,pre,expected", [
    ({}, "", "{'OMP_WAIT_POLICY': 'PASSIVE'} PASSIVE"),
    ({"GOMP_SPINCOUNT": "1000"}, "", "{} None"),  # the user tuned spinning: nothing is added
    ({"OMP_WAIT_POLICY": "active"}, "", "{} active"),
    ({}, "import torch; ", "{} None"),  # too late to matter: the environment is left as it is
])
def test_apply_shared_core_defaults(extra, pre, expected):
    env = {k: v for k, v in fresh_env(**extra).items() if k != "OMP_DISPLAY_ENV"}
    out = subprocess.run([sys.executable, "-c", SHOW.format(pre=pre)], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == expected
