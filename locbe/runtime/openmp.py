"""How OpenMP threads wait, chosen from the machine's load when ``locbe`` starts, before torch loads.

torch (ATen, MKL) and the lattice op run their CPU work on GNU OpenMP thread pools. Between two parallel
regions a libgomp thread spins for a while before it sleeps (3 ms by default). On an idle machine that spin is
what makes small steps fast: the thread catches the next region without being woken. Beside another busy
process it is what makes them slow: the spinning threads take the time slices the late thread and the
neighbour need, and smoke training beside one busy neighbour ran 3-4.6x slower (issue 17). No one setting is
right for both (docs/benchmarks.md "Shared cores"): a spin short enough to help beside a neighbour
(``GOMP_SPINCOUNT=2000``: 1.5-2x against 3x) cost the idle step 10-20 %, and one long enough to keep the
idle speed (20000) cost as much as the default beside a neighbour. libgomp reads its settings once, when it loads with
torch, so the ``locbe`` command measures how much CPU other processes use over a fifth of a second and picks:
libgomp's own default on an idle machine (written out, ``GOMP_SPINCOUNT=300000``, so subprocesses keep it and
runs record it), sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) on a shared one. Neither changes arithmetic
(same threads, same reduction order: only who waits how). A user who set ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` chose already (a process started by ``locbe`` inherits its choice): they are left alone.
``LOCBE_OMP_WAIT`` says what was chosen and why (runs record it in env.json).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

# libgomp's default when OMP_WAIT_POLICY is unset (spin ~3 ms, then sleep), written out: the runtime reads
# exactly what it reads with nothing set (same spin count, same 100-spin throttled count)
IDLE_SETTINGS = {"GOMP_SPINCOUNT": "300000"}
BUSY_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE"}  # sleep at once
BUSY_FROM_CORES = 0.5  # other processes' CPU use (cores' worth) from which the machine counts as shared
SAMPLE_SECONDS = 0.2
# a user who set any of these has chosen how OpenMP threads wait: locbe leaves all of them alone
WAIT_POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
CHOICE_VARIABLE = "LOCBE_OMP_WAIT"


@dataclass(frozen=True)
class CpuSample:
    """Clock ticks from /proc: all CPUs this process may run on (busy and in all), and this process's own."""

    busy: int
    total: int
    own: int
    cpus: int


def _process_ticks(stat_text: str, children_too: bool) -> tuple[int, int]:
    """(this process's CPU ticks, its parent pid) from a /proc/PID/stat text."""
    fields = stat_text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces and ")"
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    if children_too:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime: children that ended and were waited for
    return ticks, int(fields[1])


def _live_children_ticks(proc: str, pid: int) -> int:
    """CPU ticks of the running descendants of ``pid`` (DataLoader workers and what they start)."""
    parent_of, ticks_of = {}, {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat") as f:
                ticks_of[int(entry)], parent_of[int(entry)] = _process_ticks(f.read(), children_too=False)
        except (OSError, ValueError, IndexError):
            continue  # ended while we looked
    total = 0
    for child in ticks_of:
        ancestor = parent_of.get(child)
        while ancestor not in (None, 0, pid):
            ancestor = parent_of.get(ancestor)
        total += ticks_of[child] if ancestor == pid and child != pid else 0
    return total


def read_cpu_sample(proc: str = "/proc", children_too: bool = False) -> CpuSample | None:
    """None where /proc/stat is not Linux's (then the load is unknown). With ``children_too`` the process's
    own ticks include those of its child processes, running or ended (DataLoader workers are ours)."""
    try:
        allowed = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        busy = total = 0
        with open(f"{proc}/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name not in allowed:
                    continue
                # user nice system idle iowait irq softirq steal (guest time is inside user already)
                ticks = [int(v) for v in fields[:8]] + [0] * (8 - len(fields[:8]))
                busy += ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7]
                total += sum(ticks)
        with open(f"{proc}/self/stat") as f:
            own = _process_ticks(f.read(), children_too)[0]
        if children_too:
            own += _live_children_ticks(proc, os.getpid())
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return CpuSample(busy, total, own, len(allowed)) if total else None


def cores_used_by_others(before: CpuSample, after: CpuSample) -> float | None:
    """Cores' worth of CPU time the other processes used between two samples (None: too short to tell)."""
    elapsed = (after.total - before.total) / max(after.cpus, 1)  # ticks of wall time
    if elapsed <= 0:
        return None
    others = (after.busy - before.busy) - (after.own - before.own)
    return max(others, 0) / elapsed


def measure_cores_used_by_others(seconds: float = SAMPLE_SECONDS) -> tuple[float | None, int | None]:
    before = read_cpu_sample()
    if before is None:
        return None, None
    time.sleep(seconds)
    after = read_cpu_sample()
    return (None, before.cpus) if after is None else (cores_used_by_others(before, after), after.cpus)


def choose_wait_settings(others: float | None, cpus: int | None) -> tuple[dict[str, str], str]:
    """The settings for a machine where other processes use ``others`` cores (None: unknown), and why."""
    if others is None:
        return dict(BUSY_SETTINGS), "load unknown"
    seen = f"other processes used {others:.2f} of {cpus} cores"
    if others >= BUSY_FROM_CORES:
        return dict(BUSY_SETTINGS), f"shared machine: {seen}"
    return dict(IDLE_SETTINGS), f"idle machine: {seen}"


def settings_text(settings: dict[str, str]) -> str:
    """How a choice starts in ``LOCBE_OMP_WAIT`` (its reason follows in brackets), e.g. ``GOMP_SPINCOUNT=300000``."""
    return " ".join(f"{k}={v}" for k, v in settings.items())


def apply_shared_core_defaults(environ=None, measure=measure_cores_used_by_others) -> dict[str, str]:
    """Set the wait settings for this machine's load in ``environ`` (``os.environ``) unless the user chose a
    wait policy, and only while torch is not loaded yet (after that the OpenMP runtime has read its settings,
    and changing the environment would only surprise the caller). Returns what was set."""
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules or any(name in environ for name in WAIT_POLICY_VARIABLES):
        return {}
    settings, why = choose_wait_settings(*measure())
    chosen = {**settings, CHOICE_VARIABLE: f"{settings_text(settings)} ({why})"}
    environ.update(chosen)
    return chosen


class LateNeighbourWatch:
    """Tells once when other processes have come to use the CPUs of a run whose threads spin because the
    machine was idle when it started: the choice is made once, and a neighbour that arrives later costs
    such a run about 3x (docs/benchmarks.md "Shared cores"). Checks at most every ``every_s`` seconds."""

    # how the command that runs continues after a stop: `locbe reproduce` has no --resume, it resumes by itself
    RERUN = {"train": "rerun the same command with OMP_WAIT_POLICY=PASSIVE set and --resume",
             "reproduce": "rerun the same command with OMP_WAIT_POLICY=PASSIVE set (it resumes by itself; "
                          "`locbe reproduce` has no --resume)"}

    def __init__(self, threads: int, world_size: int = 1, environ=None, every_s: float = 30.0,
                 read=read_cpu_sample, clock=time.monotonic, command: str = "train"):
        environ = os.environ if environ is None else environ
        chose_spin = environ.get(CHOICE_VARIABLE, "").startswith(f"{settings_text(IDLE_SETTINGS)} (")
        # one thread never waits at a barrier; with torchrun the other ranks are ours but not our children
        self.active = chose_spin and threads > 1 and world_size == 1
        self.read, self.clock, self.every_s = read, clock, every_s
        self.rerun = self.RERUN.get(command, self.RERUN["train"])
        self.last = read(children_too=True) if self.active else None
        self.at = clock()

    def check(self) -> str | None:
        if not self.active or self.clock() - self.at < self.every_s:
            return None
        sample = self.read(children_too=True)
        others = None if self.last is None or sample is None else cores_used_by_others(self.last, sample)
        self.last, self.at = sample, self.clock()
        if others is None or others < BUSY_FROM_CORES:
            return None
        self.active = False
        return (f"locbe: other processes now use {others:.2f} of {sample.cpus} cores. This run's OpenMP threads "
                f"spin before they sleep ({settings_text(IDLE_SETTINGS)}, libgomp's default, kept because it "
                "started on an idle machine), which costs about 3x beside them; to make them sleep at once, stop "
                f"it (Ctrl-C keeps the state) and {self.rerun}")

