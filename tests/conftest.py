"""Shared test configuration.

Hypothesis runs derandomized in CI (`CI=true`) so a red build reproduces locally with the same
examples; locally it explores new examples each run.
"""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
# `tox -e hypothesis`: random (not derandomized) and the properties that read SCALE run 10x their examples
settings.register_profile("nightly", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# two cores: keep intra-op threads bounded so parallel helpers and CI behave the same
torch.set_num_threads(min(2, torch.get_num_threads()))
