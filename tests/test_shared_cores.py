"""The ``locbe`` command picks the OpenMP wait settings from the machine's load before torch loads, unless the
user chose them (locbe/runtime/openmp.py; timings in benchmarks/test_bench_cores.py). GNU OpenMP prints the settings
it read when it loads with ``OMP_DISPLAY_ENV=VERBOSE``: that is what the runtime saw, not what the environment
holds later. Its wait-policy line reads PASSIVE when nothing is set, so the spin count tells the cases apart
(0: passive, 300000: libgomp's own, which locbe writes out on an idle machine)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from locbe.runtime.openmp import (
    BUSY_FROM_CORES,
    CHOICE_VARIABLE,
    IDLE_SETTINGS,
    WAIT_POLICY_VARIABLES,
    CpuSample,
    LateNeighbourWatch,
    choose_wait_settings,
    cores_used_by_others,
    measure_cores_used_by_others,
    read_cpu_sample,
)

REPO = Path(__file__).resolve().parents[1]
REAL_SLEEP = time.sleep  # a test below replaces time.sleep


def fresh_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_POLICY_VARIABLES + (CHOICE_VARIABLE,)}
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


class Spinner:
    """Another process holding a core, started a second before the block runs."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def torch_import_stderr(**extra) -> str:
    """What a plain ``import torch`` prints on stderr, OpenMP's settings display included."""
    return subprocess.run([sys.executable, "-c", "import torch"], env=fresh_env(**extra), capture_output=True,
                          text=True, timeout=300, check=True).stderr


@pytest.fixture(scope="module")
def plain_torch_stderr() -> str:
    return torch_import_stderr()


@pytest.mark.skipif(sys.platform != "linux", reason="GNU OpenMP display of the runtime settings, /proc/stat")
def test_locbe_sleeps_at_once_beside_a_busy_process(tmp_path, plain_torch_stderr):
    assert runtime_settings(plain_torch_stderr)[1] != "0"  # torch alone: libgomp's own spin
    with Spinner():
        assert locbe_runtime_settings(tmp_path) == ("PASSIVE", "0")  # locbe's choice reached the runtime


def display_block(stderr: str) -> str:
    """GNU OpenMP's whole OMP_DISPLAY_ENV block: every setting it prints."""
    block = re.search(r"OPENMP DISPLAY ENVIRONMENT BEGIN.*?OPENMP DISPLAY ENVIRONMENT END", stderr, re.S)
    if block is None:
        pytest.skip("this torch's OpenMP runtime does not print OMP_DISPLAY_ENV (not GNU OpenMP)")
    # the stack sizes are nothing locbe sets; the libgomp of torch 2.4 prints them unset from uninitialised
    # memory (another number in each of two runs with the same settings), so their values are left out
    return re.sub(r"\b(G?OMP_STACKSIZE = ')\d+'", r"\1(unset)'", block.group(0))


@pytest.mark.skipif(sys.platform != "linux", reason="GNU OpenMP display of the runtime settings")
def test_the_idle_choice_is_exactly_what_the_runtime_reads_with_nothing_set(plain_torch_stderr):
    idle = torch_import_stderr(**IDLE_SETTINGS)
    assert display_block(idle) == display_block(plain_torch_stderr)  # so quiet runs keep their speed


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/stat")
def test_measured_load_counts_a_busy_process():
    with Spinner():  # other load on the machine only adds to what is measured: this holds on a busy machine too
        others, cpus = measure_cores_used_by_others(0.5)
    assert cpus == len(os.sched_getaffinity(0))
    assert others >= BUSY_FROM_CORES, others  # one spinning process: about one core


def real_ticks(pid: int | str) -> int:
    """utime + stime of a live process, read from the real /proc (a name without spaces: a python process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class ControlledMachine:
    """A fake /proc whose machine-wide CPU counters say that only the processes in ``ran`` ran, and that the wall
    time that passed is exactly the CPU time the ``clock`` process used (one core's worth of it): so the
    measured load of others is known whatever the real machine does. ``self`` and the processes listed are
    the real ones (symlinks into /proc), so their own ticks are what the kernel counted."""

    def __init__(self, tmp_path: Path, ran: list[int], clock: int, children: list[int] = ()):
        self.proc, self.ran, self.clock = tmp_path / "proc", ran, clock
        self.proc.mkdir()
        (self.proc / "self").symlink_to(f"/proc/{os.getpid()}")
        for pid in children:
            (self.proc / str(pid)).symlink_to(f"/proc/{pid}")
        self.cpus = sorted(os.sched_getaffinity(0))
        self.start = {pid: real_ticks(pid) for pid in ran}
        self.write()

    def write(self) -> None:
        busy = sum(real_ticks(pid) - t for pid, t in self.start.items())
        wall = real_ticks(self.clock) - self.start[self.clock]
        # per CPU: its share of the busy ticks, and idle ticks up to the wall ticks (from a base of 1000)
        n = len(self.cpus)
        share = [busy // n + (k < busy % n) for k in range(n)]
        lines = [f"cpu{i} {share[k]} 0 0 {1000 + max(wall - share[k], 0)} 0 0 0 0" for k, i in enumerate(self.cpus)]
        (self.proc / "stat").write_text("cpu 0 0 0 0 0 0 0 0\n" + "\n".join(lines) + "\n")

    def read(self, children_too: bool = False):
        return read_cpu_sample(str(self.proc), children_too=children_too)

    def wait_for_ticks(self, pid: int, ticks: int = 20, timeout: float = 120) -> None:
        """Until ``pid`` has used ``ticks`` more clock ticks (however long a busy machine makes that take)."""
        start, deadline = real_ticks(pid), time.monotonic() + timeout
        while real_ticks(pid) - start < ticks:
            assert time.monotonic() < deadline, "the controlled process got no CPU time"
            REAL_SLEEP(0.05)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_measured_load_leaves_this_processs_own_threads_out(tmp_path, monkeypatch):
    from locbe.runtime import openmp

    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    thread = threading.Thread(target=spin)
    thread.start()
    try:  # the machine ran only this process (its spinning thread): others used nothing
        machine = ControlledMachine(tmp_path, ran=[os.getpid()], clock=os.getpid())
        monkeypatch.setattr(openmp, "read_cpu_sample", lambda children_too=False: machine.read(children_too))
        monkeypatch.setattr(openmp.time, "sleep", lambda s: (machine.wait_for_ticks(os.getpid()), machine.write()))
        others, cpus = measure_cores_used_by_others(0.5)
    finally:
        stop.set()
        thread.join()
    assert cpus == len(os.sched_getaffinity(0))
    assert others < 0.25, others  # without leaving our own ticks out it would read 1 core (of our one busy core)


def fake_proc(tmp_path, per_cpu: list[list[int]], own: tuple[int, int], children=(0, 0)) -> Path:
    """A /proc with one line per CPU of ours (user nice system idle iowait irq softirq steal) and our utime/stime."""
    cpus = sorted(os.sched_getaffinity(0))
    lines = ["cpu " + " ".join(str(sum(col)) for col in zip(*per_cpu))]
    lines += [f"cpu{i} " + " ".join(map(str, per_cpu[k % len(per_cpu)])) for k, i in enumerate(cpus)]
    lines += [f"cpu{max(cpus) + 1} 1000 1000 1000 0 0 0 0 0", "intr 1 2 3", "ctxt 99"]  # a CPU we may not use
    (tmp_path / "self").mkdir(parents=True, exist_ok=True)
    (tmp_path / "stat").write_text("\n".join(lines) + "\n")
    fields = ["S"] + ["0"] * 10 + [str(own[0]), str(own[1]), str(children[0]), str(children[1])] + ["0"] * 30
    (tmp_path / "self" / "stat").write_text(f"123 (py (thon) 2) {' '.join(fields)}\n")
    return tmp_path


def fake_process(proc: Path, pid: int, ppid: int, utime: int, stime: int) -> None:
    (proc / str(pid)).mkdir()
    fields = ["S", str(ppid)] + ["0"] * 9 + [str(utime), str(stime)] + ["0"] * 30
    (proc / str(pid) / "stat").write_text(f"{pid} (worker) {' '.join(fields)}\n")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux CPU affinity")
def test_read_cpu_sample_counts_our_children_as_ours_on_request(tmp_path):
    proc = fake_proc(tmp_path, [[10, 1, 5, 80, 3, 1, 1, 2]], own=(7, 4), children=(4, 1))
    me = os.getpid()
    fake_process(proc, 500, me, 3, 2)  # a DataLoader worker
    fake_process(proc, 501, 500, 1, 1)  # something the worker started
    fake_process(proc, 600, 1, 50, 50)  # someone else's
    assert read_cpu_sample(str(proc)).own == 11  # ours alone
    assert read_cpu_sample(str(proc), children_too=True).own == 11 + 5 + 5 + 2  # + ended children + live ones


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_a_spinning_child_process_counts_as_ours_with_children_too(tmp_path):
    with Spinner() as spinner:  # a controlled child; the fake machine ran only it and this process
        child = spinner.proc.pid
        machine = ControlledMachine(tmp_path, ran=[os.getpid(), child], clock=child, children=[child])
        before, before_alone = machine.read(children_too=True), machine.read()
        machine.wait_for_ticks(child)
        machine.write()
        after, after_alone = machine.read(children_too=True), machine.read()
        assert spinner.proc.poll() is None
    assert cores_used_by_others(before, after) < 0.25  # the spinner is our child
    assert cores_used_by_others(before_alone, after_alone) > 0.75  # counted as another process without children_too


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def samples(*busy_ticks):
    """CpuSamples 2 s apart on 2 CPUs at 100 ticks/s, with the busy ticks of other processes given."""
    for k, busy in enumerate(busy_ticks):
        yield CpuSample(busy=busy, total=400 * k, own=0, cpus=2)


SPUN = "GOMP_SPINCOUNT=300000 (idle machine: other processes used 0.00 of 2 cores)"


def test_late_neighbour_watch_tells_once_when_a_spinning_run_gets_a_neighbour():
    clock, feed = FakeClock(), samples(0, 40, 440, 840, 1240)
    watch = LateNeighbourWatch(2, environ={CHOICE_VARIABLE: SPUN}, every_s=2.0,
                               read=lambda children_too: next(feed), clock=clock)
    clock.now = 1.0
    assert watch.check() is None  # too soon: nothing read
    clock.now = 2.0
    assert watch.check() is None  # others used 40 ticks of 200: 0.2 cores
    clock.now = 4.0
    notice = watch.check()  # 400 of 200: 2 cores
    assert "other processes now use 2.00 of 2 cores" in notice
    assert "(GOMP_SPINCOUNT=300000, libgomp's default, kept because it started on an idle machine)" in notice
    assert "OMP_WAIT_POLICY=PASSIVE" in notice and "--resume" in notice
    clock.now = 6.0
    assert watch.check() is None  # once


def test_late_neighbour_watch_gives_the_advice_of_the_command_that_runs():
    def notice(command):
        clock, feed = FakeClock(), samples(0, 400)
        watch = LateNeighbourWatch(2, environ={CHOICE_VARIABLE: SPUN}, every_s=1.0, command=command,
                                   read=lambda children_too: next(feed), clock=clock)
        clock.now = 2.0
        return watch.check()

    assert notice("train").endswith("rerun the same command with OMP_WAIT_POLICY=PASSIVE set and --resume")
    text = notice("reproduce")  # `locbe reproduce --resume` is an unknown flag: the same command resumes
    assert "rerun the same command with OMP_WAIT_POLICY=PASSIVE set (it resumes by itself" in text
    assert "and --resume" not in text


@pytest.mark.parametrize("choice,threads,world", [
    ("OMP_WAIT_POLICY=PASSIVE (shared machine: other processes used 1.00 of 2 cores)", 2, 1),  # sleeps already
    (None, 2, 1),  # the user chose: not ours to second-guess
    (SPUN, 1, 1),  # one thread waits at no barrier
    (SPUN, 2, 2),  # torchrun: the other ranks are not our children
])
def test_late_neighbour_watch_stays_quiet_where_spinning_was_not_locbes_choice(choice, threads, world):
    clock = FakeClock()
    feed = samples(0, 400, 800)
    watch = LateNeighbourWatch(threads, world, environ={CHOICE_VARIABLE: choice} if choice else {}, every_s=1.0,
                               read=lambda children_too: next(feed), clock=clock)
    for now in (2.0, 4.0):
        clock.now = now
        assert watch.check() is None


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux CPU affinity")
def test_read_cpu_sample_sums_our_cpus_and_our_ticks(tmp_path):
    n = len(os.sched_getaffinity(0))
    sample = read_cpu_sample(str(fake_proc(tmp_path, [[10, 1, 5, 80, 3, 1, 1, 2]], own=(7, 4))))
    # busy = user + nice + system + irq + softirq + steal; idle and iowait are not; the extra CPU is left out
    assert sample == CpuSample(busy=20 * n, total=103 * n, own=11, cpus=n)
    assert read_cpu_sample(str(tmp_path / "missing")) is None


def test_cores_used_by_others_from_two_samples():
    before = CpuSample(busy=100, total=1000, own=10, cpus=2)
    # 0.2 s at 100 ticks/s on 2 CPUs: 40 ticks in all; 25 busy of which 5 ours -> 20 ticks over 20 = 1 core
    assert cores_used_by_others(before, CpuSample(busy=125, total=1040, own=15, cpus=2)) == pytest.approx(1.0)
    assert cores_used_by_others(before, CpuSample(busy=105, total=1040, own=15, cpus=2)) == 0.0  # only ours
    assert cores_used_by_others(before, before) is None  # no time passed: unknown


@pytest.mark.parametrize("others,expected", [
    (0.0, {"GOMP_SPINCOUNT": "300000"}), (BUSY_FROM_CORES - 0.01, {"GOMP_SPINCOUNT": "300000"}),
    (BUSY_FROM_CORES, {"OMP_WAIT_POLICY": "PASSIVE"}), (1.0, {"OMP_WAIT_POLICY": "PASSIVE"}),
    (None, {"OMP_WAIT_POLICY": "PASSIVE"}),  # unknown load: the setting that cannot cost 3x
])
def test_choose_wait_settings(others, expected):
    settings, why = choose_wait_settings(others, 2)
    assert settings == expected
    assert ("of 2 cores" in why) == (others is not None)


@pytest.mark.skipif(sys.platform != "linux", reason="GNU OpenMP display of the runtime settings")
def test_a_users_wait_policy_is_kept(tmp_path):
    policy, spin = locbe_runtime_settings(tmp_path, OMP_WAIT_POLICY="ACTIVE")
    assert policy == "ACTIVE" and spin != "0"
    assert locbe_runtime_settings(tmp_path, GOMP_SPINCOUNT="1000")[1] == "1000"


SHOW = ("import os, sys; {pre}from locbe.runtime.openmp import apply_shared_core_defaults as a; "
        "print(sorted(a(measure=lambda: ({others}, 2)).items()), os.environ.get('OMP_WAIT_POLICY'), "
        "os.environ.get('GOMP_SPINCOUNT'))")
IDLE = ("[('GOMP_SPINCOUNT', '300000'), ('LOCBE_OMP_WAIT', "
        "'GOMP_SPINCOUNT=300000 (idle machine: other processes used 0.10 of 2 cores)')] None 300000")
BUSY = ("[('LOCBE_OMP_WAIT', 'OMP_WAIT_POLICY=PASSIVE (shared machine: other processes used 1.00 of 2 cores)'), "
        "('OMP_WAIT_POLICY', 'PASSIVE')] PASSIVE None")


@pytest.mark.parametrize("extra,pre,others,expected", [
    ({}, "", 0.1, IDLE),
    ({}, "", 1.0, BUSY),
    ({"GOMP_SPINCOUNT": "1000"}, "", 1.0, "[] None 1000"),  # the user tuned spinning: nothing is added
    ({"OMP_WAIT_POLICY": "active"}, "", 0.1, "[] active None"),
    ({}, "import torch; ", 1.0, "[] None None"),  # too late to matter: the environment is left as it is
])
def test_apply_shared_core_defaults(extra, pre, others, expected):
    env = {k: v for k, v in fresh_env(**extra).items() if k != "OMP_DISPLAY_ENV"}
    out = subprocess.run([sys.executable, "-c", SHOW.format(pre=pre, others=others)], env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert out == expected
