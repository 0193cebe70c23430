"""The ``locbe`` command sets a passive OpenMP wait policy before torch loads, unless the user chose one
(locbe/openmp.py; timings in benchmarks/test_bench_cores.py). GNU OpenMP prints the settings it read when
it loads with ``OMP_DISPLAY_ENV=VERBOSE``: that is what the runtime saw, not what the environment holds later.
Its wait-policy line reads PASSIVE when nothing is set, so the spin count tells the cases apart (0: passive)."""

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
    return {**env, "PYTHONPATH": str(REPO), "OMP_DISPLAY_ENV": "VERBOSE", **extra}


def runtime_settings(stderr: str) -> tuple[str, str]:
    """(wait policy, spin count) as GNU OpenMP printed them."""
    policy = re.findall(r"OMP_WAIT_POLICY\s*=\s*'(\w+)'", stderr)
    spin = re.findall(r"GOMP_SPINCOUNT\s*=\s*'(\d+)'", stderr)
    if not (policy and spin):
        pytest.skip("this torch's OpenMP runtime does not print OMP_DISPLAY_ENV (not GNU OpenMP)")
    return policy[0], spin[0]


def locbe_runtime_settings(tmp_path, **extra) -> tuple[str, str]:
    """What OpenMP read in a fresh ``locbe train`` process (it imports torch, then stops: no data)."""
    proc = subprocess.run([sys.executable, "-m", "locbe.cli", "train", "--preset", "smoke", "--data-root",
                           str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), "--no-progress"],
                          env=fresh_env(**extra), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]  # the missing data root, after torch loaded
    return runtime_settings(proc.stderr)


@pytest.mark.skipif(sys.platform != "linux", reason="GNU OpenMP display of the runtime settings")
def test_locbe_sets_passive_wait_policy_before_torch_loads(tmp_path):
    plain = subprocess.run([sys.executable, "-c", "import torch"], env=fresh_env(), capture_output=True, text=True,
                           timeout=300, check=True)
    assert runtime_settings(plain.stderr)[1] != "0"  # torch alone: threads spin before they sleep
    assert locbe_runtime_settings(tmp_path) == ("PASSIVE", "0")


@pytest.mark.skipif(sys.platform != "linux", reason="GNU OpenMP display of the runtime settings")
def test_a_users_wait_policy_is_kept(tmp_path):
    policy, spin = locbe_runtime_settings(tmp_path, OMP_WAIT_POLICY="ACTIVE")
    assert policy == "ACTIVE" and spin != "0"
    assert locbe_runtime_settings(tmp_path, GOMP_SPINCOUNT="1000")[1] == "1000"


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
