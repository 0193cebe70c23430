"""One process per run directory (issue 25): `locbe train`, `locbe eval` (into a run directory) and `locbe reproduce`
take an exclusive flock on ``<parent>/.<name>.lock``; a second process is refused at once with one line naming the
holder, and a lock left by a process killed with SIGKILL is taken over by the next run. Two real processes: the
holder is a subprocess (the lock module alone, or a real `locbe train`), the second is this test process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from locbe import errors
from locbe.cli import main as cli
from locbe.runtime.ranks import RankInfo
from locbe.runtime.runlock import acquire, lock_path, release, run_dir_lock

fcntl = pytest.importorskip("fcntl", reason="flock is POSIX")

REPO = Path(__file__).resolve().parents[1]
TINY = ["crop_size=64", "batch_size=4", "warmup_steps=2", "log_every=1", "ckpt_every=1", "val_every=0",
        "loc_crop_size=32", "cam_scales=[1.0]", "num_workers=0"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "voc"
    assert cli(["make-synthetic", "--out", str(root), "--num-train", "12", "--num-val", "4", "--seed", "5"]) == 0
    return root


def train_args(root: Path, out: Path, max_steps: int = 2, *extra: str) -> list[str]:
    args = ["train", "--preset", "smoke", "--no-progress", "--data-root", str(root), "--out", str(out)]
    for o in [*TINY, f"max_steps={max_steps}", *extra]:
        args += ["--set", o]
    return args


def wait_for_holder(run_dir: Path, pid: int, proc: subprocess.Popen, timeout: float = 300) -> dict:
    """The lock file's record once process ``pid`` holds the lock (the holder starts at its own pace)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        try:
            info = json.loads(lock_path(run_dir).read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if info.get("pid") == pid:
            return info
        time.sleep(0.1)
    raise AssertionError(f"process {pid} did not take the lock of {run_dir} in {timeout} s")


class Holder:
    """A subprocess that takes the lock of ``run_dir`` with locbe's own code and keeps it until killed."""

    def __init__(self, run_dir: Path, command: str = "locbe train"):
        code = (f"import time; from locbe.runtime.runlock import acquire; acquire({str(run_dir)!r}, {command!r}); "
                "time.sleep(600)")
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=env(), stderr=subprocess.PIPE, text=True)
        self.info = wait_for_holder(run_dir, self.proc.pid, self.proc, timeout=60)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.kill()


def refusal(stderr: str, command: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"locbe {command}:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_second_train_is_refused_at_once_naming_the_holder_and_nothing_is_written(root, tmp_path, capsys):
    out = tmp_path / "run"
    with Holder(out) as holder:
        assert holder.info["host"] == socket.gethostname() and holder.info["command"] == "locbe train"
        assert cli(train_args(root, out)) == errors.EXIT_BAD_INPUT
        line = refusal(capsys.readouterr().err, "train")
        assert f"{out} is in use by PID {holder.proc.pid} on host {socket.gethostname()} (locbe train" in line
        assert not out.exists()  # refused before anything was written
        holder.kill()  # SIGKILL: no handler runs, the lock file stays with the dead holder's record
        assert json.loads(lock_path(out).read_text())["pid"] == holder.proc.pid
    assert cli(train_args(root, out)) == 0  # the kernel released the dead holder's lock: taken over, no user step
    assert int(torch.load(out / "checkpoints" / "final.pth", weights_only=True, mmap=True)["step"]) == 2


def test_reproduce_and_eval_into_a_run_directory_are_refused_too(root, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(train_args(root, out, 1)) == 0
    checkpoint = out / "checkpoints" / "final.pth"
    before = sorted(p.name for p in out.rglob("*"))
    with Holder(out) as holder:
        assert cli(["reproduce", "--preset", "smoke", "--data-root", str(root), "--out", str(out),
                    "--no-progress"]) == errors.EXIT_BAD_INPUT
        assert f"is in use by PID {holder.proc.pid}" in refusal(capsys.readouterr().err, "reproduce")
        assert cli(["eval", "--checkpoint", str(checkpoint), "--dataset", "synthetic", "--data-root", str(root),
                    "--no-progress", "--device", "cpu"]) == errors.EXIT_BAD_INPUT
        assert f"is in use by PID {holder.proc.pid}" in refusal(capsys.readouterr().err, "eval")
        assert sorted(p.name for p in out.rglob("*")) == before  # neither wrote anything there
        # an evaluation written elsewhere touches no run directory: it runs beside the holder
        assert cli(["eval", "--checkpoint", str(checkpoint), "--dataset", "synthetic", "--data-root", str(root),
                    "--no-progress", "--device", "cpu", "--out", str(tmp_path / "elsewhere")]) == 0
    assert cli(["eval", "--checkpoint", str(checkpoint), "--dataset", "synthetic", "--data-root", str(root),
                "--no-progress", "--device", "cpu"]) == 0  # the holder is gone
    assert (out / "checkpoints" / "metrics_val.json").is_file()


def test_a_real_train_killed_with_sigkill_leaves_a_lock_the_next_run_takes_over(root, tmp_path, capsys):
    out = tmp_path / "run"
    args = train_args(root, out, 10_000)
    proc = subprocess.Popen([sys.executable, "-m", "locbe.cli", *args], env=env(), stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL)
    try:
        info = wait_for_holder(out, proc.pid, proc)
        assert info["command"] == "locbe train"
        deadline = time.monotonic() + 300  # let it write a checkpoint, so there is a run to continue
        while not (out / "checkpoints" / "last.pth").is_file():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert cli([*args, "--resume"]) == errors.EXIT_BAD_INPUT  # the same run twice: refused
        assert f"is in use by PID {proc.pid}" in refusal(capsys.readouterr().err, "train")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert json.loads(lock_path(out).read_text())["pid"] == proc.pid  # the dead holder's record is still there
    assert cli(train_args(root, out, 2) + ["--force-new"]) == 0  # and yet the next run takes the lock at once
    assert int(torch.load(out / "checkpoints" / "final.pth", weights_only=True, mmap=True)["step"]) == 2


def test_the_lock_is_reentrant_in_one_process_and_released_for_others(tmp_path):
    run = tmp_path / "run"
    first = acquire(run, "locbe reproduce")
    assert acquire(run, "locbe train") == first  # reproduce trains into its own <out>: the same holder
    release(first)
    probe = ("import sys; from locbe.runtime.runlock import acquire\n"
             "try:\n    acquire(sys.argv[1], 'probe')\nexcept Exception as e:\n    print(e); sys.exit(2)")
    held = subprocess.run([sys.executable, "-c", probe, str(run)], env=env(), capture_output=True, text=True,
                          timeout=60)
    assert held.returncode == 2 and f"PID {os.getpid()}" in held.stdout  # still held: one release of two
    release(first)
    assert subprocess.run([sys.executable, "-c", probe, str(run)], env=env(), timeout=60).returncode == 0


def test_only_rank_0_takes_the_lock(tmp_path):
    from locbe.training.rundir import hold

    run = tmp_path / "run"
    with Holder(run):
        with hold(run, "locbe train", RankInfo(rank=1, world_size=1), torch.device("cpu")):
            pass  # rank 1 does not touch the lock
        with pytest.raises(errors.RunDirError, match="is in use by PID"):
            with hold(run, "locbe train", RankInfo(rank=0, world_size=1), torch.device("cpu")):
                pass
        with run_dir_lock(run, "locbe eval", take=False):
            pass
