"""Shared test configuration.

Hypothesis runs derandomized in CI (`CI=true`) so a red build reproduces locally with the same
examples; locally it explores new examples each run.
"""

import os

from locbe.runtime.numerics import PINNED_ENV

# The library code paths of cpu_numerics="pinned" (the smoke presets), set as the `locbe` command sets them:
# before torch loads, since ATen, MKL and oneDNN read them once. The thread count stays the session's
# (pinned runs set theirs for the run); the test's numbers are then the same on any AVX2 CPU.
for _name, _value in PINNED_ENV.items():
    if "THREADS" not in _name:
        os.environ.setdefault(_name, _value)

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
# `tox -e hypothesis`: random (not derandomized) and the properties that read SCALE run 10x their examples
settings.register_profile("nightly", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# two cores: keep intra-op threads bounded so parallel helpers and CI behave the same
torch.set_num_threads(min(2, torch.get_num_threads()))
