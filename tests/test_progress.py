"""Progress in a log file: whole lines at a readable pace, no carriage returns (locbe/runtime/progress.py), and no
torch notice about a CUDA runtime on a run that builds nothing for CUDA (locbe/lattice/build.py)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic_sets import make_synthetic_set
from tqdm import tqdm

from locbe.runtime.progress import LINE_EVERY_FRACTION, LINE_EVERY_SECONDS, LineProgress, progress_bar

REPO = Path(__file__).resolve().parents[1]
CUDA_NOTICE = "No CUDA runtime is found"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_lines_every_few_percent_with_rate_eta_and_postfix():
    out, clock = io.StringIO(), FakeClock()
    bar = LineProgress(total=200, desc="train smoke", unit="step", file=out, clock=clock)
    for i in range(200):
        clock.now += 0.5
        if i == 99:  # as the training loop does: the losses of the step, then the step counted
            bar.set_postfix({"total": "1.234", "cls": "0.500"})
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 1 + round(1 / LINE_EVERY_FRACTION)  # the start, then every 5% (10 steps)
    assert re.fullmatch(r"train smoke:\s+50% 100/200 \[00:50<00:50,\s+2\.00step/s, total=1\.234, cls=0\.500\]",
                        lines[10]), lines[10]
    assert lines[-1].startswith("train smoke: 100% 200/200 [01:40<00:00")


def test_a_line_after_tens_of_seconds_however_slow_and_a_last_line_on_close():
    out, clock = io.StringIO(), FakeClock()
    bar = LineProgress(total=10_000, desc="eval val", unit="img", initial=4000, file=out, clock=clock)
    clock.now += LINE_EVERY_SECONDS - 1
    bar.update(1)  # neither 5% nor the interval: no line
    clock.now += 2
    bar.update(1)  # the interval has passed
    bar.update(3)
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split("[")[0].split()[-1] for line in lines] == ["4000/10000", "4002/10000", "4005/10000"]
    assert "15.50s/img" in lines[1]  # rate of this run: 2 images in 31 s, not counting the resumed 4000


def test_iteration_and_choice_of_display():
    out = io.StringIO()
    assert list(progress_bar(range(40), desc="verify", file=out)) == list(range(40))
    assert out.getvalue().count("\n") == 1 + 20 and out.getvalue().splitlines()[-1].startswith("verify: 100% 40/40")
    assert isinstance(progress_bar(total=3, file=Terminal()), tqdm)  # on a terminal the bar stays
    assert isinstance(progress_bar(total=3, file=out, disable=True), tqdm)


def test_leave_false_is_quiet_for_a_quick_stage_and_paced_for_a_slow_one():
    out, clock = io.StringIO(), FakeClock()
    bar = LineProgress(total=100, desc="check val (headers)", unit="img", file=out, clock=clock, leave=False)
    for _ in range(100):
        clock.now += 0.01
        bar.update(1)
    bar.close()
    assert out.getvalue() == ""  # the caller prints the stage's one line
    bar = LineProgress(total=100, desc="check val (headers)", unit="img", file=out, clock=clock, leave=False)
    for i in range(100):
        clock.now += LINE_EVERY_SECONDS + 1 if i == 9 else 0.01
        bar.update(1)
    bar.close()
    assert [line.split("[")[0].split()[-1] for line in out.getvalue().splitlines()] == ["10/100", "100/100"]
    assert isinstance(progress_bar(total=3, file=Terminal(), leave=False), tqdm)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return make_synthetic_set(tmp_path_factory.mktemp("synthetic"), 24, 4, 3)


def test_smoke_run_logged_to_a_file_has_progress_lines_and_no_cuda_notice(synthetic_root, tmp_path):
    cuda_home = next((p for p in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if p and Path(p).is_dir()), None)
    env = {**os.environ, "PYTHONPATH": str(REPO), **({"CUDA_HOME": cuda_home} if cuda_home else {})}
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        proc = subprocess.run([sys.executable, "-m", "locbe.cli", "train", "--preset", "smoke", "--device", "cpu",
                               "--data-root", str(synthetic_root), "--out", str(tmp_path / "run"),
                               "--max-steps", "40", "--batch-size", "4", "--num-workers", "0",
                               "--set", "crop_size=64", "--set", "loc_crop_size=32"],
                              stderr=stderr, stdout=subprocess.PIPE, text=True, env=env, timeout=900)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text
    steps = [int(m) for m in re.findall(r"^train smoke:\s+\d+% (\d+)/40 ", text, flags=re.M)]
    assert steps[0] == 0 and steps[-1] == 40 and len(steps) >= 10 and steps == sorted(steps), text[-3000:]
    last = [line for line in text.splitlines() if line.startswith("train smoke: 100%")][-1]
    assert re.search(r"(step/s|s/step), .*total=\d", last), last  # rate (tqdm inverts it below 1 step/s), losses
    assert CUDA_NOTICE not in text
    recorded = json.loads((tmp_path / "run" / "env.json").read_text())  # the wait settings it ran under
    if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):  # locbe chose them (locbe/runtime/openmp.py)
        choice = recorded["omp_wait_choice"]
        assert choice.startswith(("OMP_WAIT_POLICY=PASSIVE (", "GOMP_SPINCOUNT=300000 (")), recorded
        assert (recorded["omp_wait_policy"], recorded["gomp_spincount"]) in (("PASSIVE", None), (None, "300000"))
    if cuda_home and torch.version.cuda and not torch.cuda.is_available():  # here the check can fail:
        plain = subprocess.run([sys.executable, "-c", "import torch.utils.cpp_extension"], env=env,
                               capture_output=True, text=True, timeout=300)
        assert CUDA_NOTICE in plain.stderr  # torch's plain import prints it in this environment


def test_header_check_is_one_line_per_split(synthetic_root, capsys):
    from locbe.data.check import check_before_training

    check_before_training("synthetic", synthetic_root, ["train_aug", "val", "train_aug"], 21, progress=True)
    captured = capsys.readouterr()
    assert captured.err == ""  # a quick check leaves no progress lines in a log
    lines = captured.out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("[data] split 'train_aug' of ") and "24 images" in lines[0]
    assert lines[1].startswith("[data] split 'val' of ") and lines[1].endswith("no problems")


def test_the_ops_cpu_build_imports_cpp_extension_without_the_cuda_notice(tmp_path):
    """Quick twin of the smoke run's check, on the import itself: torch 2.4 prints the notice to stderr, recent
    torch logs it; locbe.lattice.build.cpp_extension(cuda=False) says neither, and passes on what else is said."""
    if not torch.version.cuda or torch.cuda.is_available():
        pytest.skip("torch says the notice only in a CUDA build of torch without a GPU")
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    plain = subprocess.run([sys.executable, "-c", "import torch.utils.cpp_extension"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and CUDA_NOTICE in plain.stderr, plain.stderr[-2000:]  # the check can fail here
    code = ("import sys\nprint('before', file=sys.stderr)\nfrom locbe.lattice.build import cpp_extension\n"
            "assert cpp_extension(cuda=False).__name__ == 'torch.utils.cpp_extension'\n"
            "print('after', file=sys.stderr)\n")
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert CUDA_NOTICE not in ours.stderr and ours.stderr.splitlines()[0] == "before", ours.stderr[-2000:]
    assert ours.stderr.splitlines()[-1] == "after"
