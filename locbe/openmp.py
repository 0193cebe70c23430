"""OpenMP settings for machines whose cores are shared with other jobs, applied before torch loads.

torch (ATen, MKL) and the lattice op run their CPU work on GNU OpenMP thread pools. By default a libgomp
thread that waits at a barrier spins for a while before it sleeps; when another process holds the core
that the barrier waits for, the spinning threads burn the time slices the late thread needs, and smoke
training beside one busy neighbour ran 3-4.6x slower (issue 17). ``OMP_WAIT_POLICY=PASSIVE`` makes the
waiting threads sleep at once. It changes no arithmetic (same threads, same reduction order): only who
waits how. libgomp reads its environment once, when the library loads (with torch), so the ``locbe``
command sets it first thing; DataLoader workers, torchrun workers and subprocesses inherit it.
docs/benchmarks.md "Shared cores" has the measurements.
"""

from __future__ import annotations

import os
import sys

# what locbe sets when the user set none of WAIT_POLICY_VARIABLES
SHARED_CORE_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
# a user who set any of these has chosen how OpenMP threads wait: locbe leaves all of them alone
WAIT_POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def apply_shared_core_defaults(environ=None) -> dict[str, str]:
    """Set ``SHARED_CORE_DEFAULTS`` in ``environ`` (``os.environ``) unless the user chose a wait policy, and
    only while torch is not loaded yet (after that the OpenMP runtime has read its settings, and changing the
    environment would only surprise the caller). Returns what was set."""
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules or any(name in environ for name in WAIT_POLICY_VARIABLES):
        return {}
    environ.update(SHARED_CORE_DEFAULTS)
    return dict(SHARED_CORE_DEFAULTS)
