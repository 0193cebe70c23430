"""Smoke training beside a busy neighbour, with and without the OpenMP wait settings ``locbe`` picks (issue 17).

libgomp reads its wait settings once, when it loads with torch, and ``locbe`` picks them from the machine's
load at that moment (locbe/runtime/openmp.py: libgomp's own spin on an idle machine, passive waiting on a shared one).
So every case here is a fresh child process started the way a user starts ``locbe``: after the neighbour
(one process spinning a Python loop) is already running, or on the quiet machine. "locbe" applies
``locbe.runtime.openmp.apply_shared_core_defaults`` before importing torch, as the command does; "default" sets
neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT (torch's defaults, the behaviour before issue 17). Each child runs
the real training loop (``locbe.train.train``, smoke preset, DataLoader workers included, every loss term on
so the lattice op runs in each step), then the lattice op alone. Round after round, quiet and busy, order
rotated every round, so drift hits every case alike. One more case per round is the weak spot of a choice
made at start: a "locbe" child started on the quiet machine (so it spins), then the neighbour arrives.

Reported: the steady-state seconds per step and the whole call's wall time, per policy and load. A step's
time is the median of the step durations in the run's log.jsonl (the first steps left out), pooled over the
rounds: one slow step (a DataLoader epoch starting, a burst from elsewhere on the host) moves a mean over 20
steps by several per cent, and the quiet target is a 5 % band. Then busy/quiet per policy; the quiet ratio
locbe/default (pooled, and round by round); the op's busy/quiet per policy; what each locbe child chose and why; the
neighbour-arrives-later ratio; the load average around every round. Every call computes the same steps:
their losses must agree to the last bit, whatever the settings and load. Targets (issue 17): busy/quiet
<= 1.6 with locbe's settings, quiet ratio 0.95-1.05, op busy ratio no worse.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from locbe.runtime.openmp import CHOICE_VARIABLE, WAIT_POLICY_VARIABLES

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 4
STEPS = 24  # training steps per timed call; steps 1-4 (start-up, first DataLoader batches) are left out
LATER_STEPS = 14  # per call of the neighbour-arrives-later case (reported, no target)
FIRST_TIMED_STEP = 4
OP_CALLS = 5
NEIGHBOUR_WARMUP_S = 1.0  # the neighbour runs this long before a child starts and samples the load
POLICIES = ("locbe", "default")
LOADS = ("quiet", "busy")

CHILD = r"""
import dataclasses, json, math, os, statistics, sys, time
if os.environ.get("BENCH_POLICY") == "locbe":
    from locbe.runtime.openmp import apply_shared_core_defaults
    apply_shared_core_defaults()
import torch
sys.path.insert(0, sys.argv[1])
from test_bench_regloss import photo_inputs
from locbe.config import Phase, _voc_phases, get_preset
from locbe.lattice import lattice_filter
from locbe.train import train

data_root, work = sys.argv[2], sys.argv[3]
late = _voc_phases(0)[-1]  # every loss term (seg, reg, loc, be, sc) from step 0
base = dataclasses.replace(get_preset("smoke"), data_root=data_root, phases=[Phase(math.inf, dict(late.weights))],
                           log_every=1, ckpt_every=10**9, val_every=0,
                           cpu_numerics="native")  # the process's threads: what the wait policy is about
image, s = photo_inputs(2, 21, 224)
calls = 0
print(json.dumps({"ready": True, **{k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                  "LOCBE_OMP_WAIT")}, "threads": torch.get_num_threads(), "num_workers": base.num_workers}),
      flush=True)
for line in sys.stdin:
    what, n = line.split()
    n = int(n)
    calls += 1
    if what == "train":
        out = os.path.join(work, f"run{calls}")
        cfg = dataclasses.replace(base, max_steps=n, out_dir=out)
        t0 = time.perf_counter()
        train(cfg, progress=False)
        wall = time.perf_counter() - t0
        rows = [json.loads(r) for r in open(os.path.join(out, "log.jsonl"))]
        at = {r["step"]: r["time"] for r in rows}
        first = int(sys.argv[4])
        durations = [at[k + 1] - at[k] for k in range(first, n)]
        losses = {k: v for k, v in rows[-1].items() if k not in ("time", "lr")}
        print(json.dumps({"wall_s": wall, "durations": durations, "losses": losses}), flush=True)
    else:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            lattice_filter(image, s, 50.0, 15.0)
            times.append(time.perf_counter() - t0)
        print(json.dumps({"op_s": statistics.median(times)}), flush=True)
"""


class Child:
    """A training process with one wait policy, answering ``train N`` / ``op N`` with one JSON line."""

    _count = 0

    def __init__(self, policy: str, data_root: Path, work: Path):
        env = {k: v for k, v in os.environ.items() if k not in WAIT_POLICY_VARIABLES + (CHOICE_VARIABLE,)}
        env.update(BENCH_POLICY=policy, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                                env.get("PYTHONPATH")])))
        Child._count += 1
        work = work / f"child{Child._count}"
        work.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(Path(__file__).parent), str(data_root),
                                      str(work), str(FIRST_TIMED_STEP)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark child exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, what: str, n: int) -> dict:
        self.proc.stdin.write(f"{what} {n}\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.close()


class Neighbour:
    """One process spinning a Python loop (or nothing, for the quiet case), running before and after."""

    def __init__(self, busy: bool):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None

    def __enter__(self):
        if self.proc is not None:
            time.sleep(NEIGHBOUR_WARMUP_S)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def pooled(calls: list[list[float]]) -> list[float]:
    return [d for durations in calls for d in durations]


def rotated(items, r):
    return items[r % len(items):] + items[: r % len(items)]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cores") / "synthetic"
    subprocess.run([sys.executable, "-m", "locbe.cli", "make-synthetic", "--out", str(root), "--num-train", "96",
                    "--num-val", "8"], check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return root


def test_smoke_steps_beside_a_busy_neighbour(benchmark, synthetic_root, tmp_path):
    with Child("locbe", synthetic_root, tmp_path) as child:  # the op's build, off the clock
        child.ask("op", 1)
    step_s = {(p, load): [] for p in POLICIES for load in LOADS}
    wall_s = {(p, load): [] for p in POLICIES for load in LOADS}
    op_s = {(p, load): [] for p in POLICIES for load in LOADS}
    later = {load: [] for load in LOADS}  # a locbe child started quiet; the neighbour arrives after its start
    choices, losses, load_avg = [], [], []

    def timed(child, steps=STEPS):
        res = child.ask("train", steps)
        losses.append(res["losses"])
        return res

    def paired():
        for r in range(ROUNDS):
            for load in rotated(LOADS, r):
                before = loadavg()
                with Neighbour(load == "busy"):
                    for policy in rotated(POLICIES, r):
                        with Child(policy, synthetic_root, tmp_path / policy) as child:
                            res = timed(child)
                            step_s[policy, load].append(res["durations"])
                            wall_s[policy, load].append(res["wall_s"])
                            op_s[policy, load].append(child.ask("op", OP_CALLS)["op_s"])
                            if policy == "locbe":
                                choices.append({"round": r, "load": load, "chose": child.info["LOCBE_OMP_WAIT"]})
                load_avg.append({"round": r, "load": load, "before": before, "after": loadavg()})
            with Child("locbe", synthetic_root, tmp_path / "later") as child:
                later["quiet"].append(timed(child, LATER_STEPS)["durations"])
                with Neighbour(True):
                    later["busy"].append(timed(child, LATER_STEPS)["durations"])
                choices.append({"round": r, "load": "quiet, then busy", "chose": child.info["LOCBE_OMP_WAIT"]})

    benchmark.pedantic(paired, rounds=1, iterations=1)

    med = {key: statistics.median(pooled(v)) for key, v in step_s.items()}
    op_med = {key: statistics.median(v) for key, v in op_s.items()}
    quiet_pairs = [statistics.median(a) / statistics.median(b)
                   for a, b in zip(step_s["locbe", "quiet"], step_s["default", "quiet"])]
    busy_ratio = {p: med[p, "busy"] / med[p, "quiet"] for p in POLICIES}
    op_busy_ratio = {p: op_med[p, "busy"] / op_med[p, "quiet"] for p in POLICIES}
    quiet_ratio = med["locbe", "quiet"] / med["default", "quiet"]
    later_ratio = statistics.median(pooled(later["busy"])) / statistics.median(pooled(later["quiet"]))
    benchmark.extra_info.update(
        rounds=ROUNDS, steps_per_call=STEPS, timed_steps=STEPS - FIRST_TIMED_STEP, later_steps=LATER_STEPS,
        op_calls=OP_CALLS,
        cpu_count=os.cpu_count(), choices=choices,
        **{f"{p}_{load}_step_s": med[p, load] for p in POLICIES for load in LOADS},
        **{f"{p}_{load}_op_ms": op_med[p, load] * 1e3 for p in POLICIES for load in LOADS},
        **{f"{p}_busy_over_quiet": busy_ratio[p] for p in POLICIES},
        **{f"{p}_op_busy_over_quiet": op_busy_ratio[p] for p in POLICIES},
        quiet_locbe_over_default=quiet_ratio, quiet_pair_ratios=quiet_pairs,
        quiet_pair_median=statistics.median(quiet_pairs),
        neighbour_arrives_later_busy_over_quiet=later_ratio,
        targets={"busy_over_quiet<=1.6": busy_ratio["locbe"] <= 1.6,
                 "quiet_ratio_0.95-1.05": 0.95 <= quiet_ratio <= 1.05,
                 "op_busy_ratio_no_worse": op_busy_ratio["locbe"] <= op_busy_ratio["default"]},
        step_durations_s={f"{p}/{load}": v for (p, load), v in step_s.items()},
        wall_s={f"{p}/{load}": v for (p, load), v in wall_s.items()},
        op_s={f"{p}/{load}": v for (p, load), v in op_s.items()},
        later_step_durations_s=later, loadavg=load_avg)
    assert all(c["chose"] for c in choices)  # every locbe child chose (nothing set by the caller)
    assert all(row == losses[0] for row in losses), losses  # the settings change who waits, not the arithmetic
    assert all(math.isfinite(v) for v in med.values())  # the targets are recorded, not asserted: shared machines drift
