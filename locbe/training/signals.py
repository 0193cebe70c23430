"""SIGINT / SIGTERM stop a run at the next step boundary, where the loop saves a resumable checkpoint.

What schedulers send (SIGTERM) and Ctrl-C (SIGINT) only set a flag; the loop checks it after each
step, saves ``last.pth`` and raises ``locbe.errors.Interrupted`` (exit code 128 + signal number).
A second Ctrl-C stops at once, without saving. DataLoader workers ignore SIGINT (Ctrl-C reaches the
whole process group), so a terminal interrupt does not kill them before the step boundary.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from locbe.errors import Interrupted
from locbe.training.rundir import RESUME_HINT

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager installing the handlers (main thread only); ``signum`` is the first signal seen."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "none"

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, unsaved
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def ignore_interrupt_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the main process decides when to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def interrupted(stop: StopRequest, step: int, last_path: Path, out_dir: str) -> Interrupted:
    """The error that ends a run stopped by a signal, after the state of ``step`` was saved."""
    signum = stop.signum or signal.SIGTERM  # another rank received it
    return Interrupted(f"stopped by {signal.Signals(signum).name}: the state after step {step} is saved in "
                       f"{last_path}; {RESUME_HINT} (--out {out_dir})", signum)
