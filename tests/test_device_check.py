"""`locbe device-check` (issue 12): the no-GPU path on CPU, and the pieces of the GPU path that need no GPU
(stage runner, JUnit and benchmark parsing, the report), so that it can be run blind on a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from locbe import device_check as dc

REPO = Path(__file__).resolve().parents[1]


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "locbe.cli", "device-check", "--out", str(tmp_path / "dev")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "nothing to check" in lines[0], out.stdout
    assert not (tmp_path / "dev").exists()  # no report folder where nothing was checked


def test_stage_runner_records_ok_failure_and_timeout(tmp_path):
    ok = dc.run_stage("a", [sys.executable, "-c", "print('hello')"], 60, tmp_path / "a.log")
    assert ok["status"] == "ok" and ok["rc"] == 0 and "hello" in (tmp_path / "a.log").read_text()
    bad = dc.run_stage("b", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 60, tmp_path / "b.log")
    assert bad["status"] == "failed" and bad["rc"] == 3 and "boom" in bad["tail"]
    slow = dc.run_stage("c", [sys.executable, "-c", "import time; time.sleep(30)"], 1, tmp_path / "c.log")
    assert slow["status"] == "timeout" and slow["seconds"] < 20


def test_parse_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a"/>'
                   '<testcase classname="t" name="b"><failure message="x"/></testcase>'
                   '<testcase classname="t" name="c"><skipped/></testcase>'
                   '<testcase classname="t" name="d"><error message="y"/></testcase></testsuite></testsuites>')
    got = dc.parse_junit(xml)
    assert got == {"tests": 4, "passed": 1, "failed": 2, "skipped": 1, "failures": ["t::b", "t::d"]}
    assert dc.parse_junit(tmp_path / "missing.xml")["tests"] == 0


def test_steps_for_budget():
    assert dc.steps_for_budget(120, 0.1) == 1200
    assert dc.steps_for_budget(120, 0.5) == 240
    assert dc.steps_for_budget(120, 60) == 20
    assert dc.steps_for_budget(120, 0) == 1200


def test_report_names_the_environment_and_every_figure(tmp_path):
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps({"benchmarks": [
        {"name": "test_paired_speedup[cuda-vit_base_patch16_224]", "stats": {"mean": 3.5, "median": 3.4, "rounds": 1},
         "extra_info": {"plain_vs_authors": 4.25, "fast_vs_authors": 6.5, "speedup_vs_plain": 1.53}},
        {"name": "test_training_step[cuda-vit_base_patch16_224-authors]",
         "stats": {"mean": 0.91, "median": 0.9, "rounds": 3}, "extra_info": {"reg_loss_share": 0.625}}]}))
    report = {"started_utc": "2026-11-27T00:00:00+00:00", "verdict": "some stages did not pass", "seconds": 431.0,
              "environment": {"gpu": "NVIDIA H100 80GB HBM3", "driver": "550.54.15", "torch": "2.9.0",
                              "cuda_runtime": "12.8", "capability": "9.0"},
              "stages": [{"stage": "build", "status": "ok", "seconds": 61.2, "log": "build.log"},
                         {"stage": "smoke", "status": "failed", "seconds": 12.0, "log": "smoke.log",
                          "tail": "RuntimeError: out of luck"}],
              "cuda_tests": {"tests": 5, "passed": 4, "failed": 1, "skipped": 0, "failures": ["t::x"]},
              "benchmarks": {"step": dc.bench_figures(bench), "par": []},
              "smoke": {"steps": 812, "eval_ms_crf_miou": 33.25}}
    summary = dc.write_report(tmp_path / "r", report).read_text()
    assert json.loads((tmp_path / "r" / "device_check.json").read_text())["environment"]["driver"] == "550.54.15"
    for text in ("NVIDIA H100 80GB HBM3", "550.54.15", "2.9.0", "12.8", "4.25", "6.5", "1.53", "0.625", "812",
                 "33.25", "FAILED t::x", "out of luck", "some stages did not pass"):
        assert text in summary, text


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_gpu_info_names_the_device():
    info = dc.gpu_info()
    assert info["gpu"] and info["torch"] and info["cuda_runtime"]


@pytest.mark.slow
def test_smoke_stage_cpu_twin(tmp_path):
    """The smoke stage's code path (probe, shrunk schedule, training, three evaluations) on CPU, tiny; a zero
    time budget gives the minimum number of steps, whatever the machine's speed."""
    from locbe.data.synthetic import SyntheticConfig

    figures = dc.smoke(tmp_path, train_seconds=0.0, device="cpu", probe_steps=2, min_steps=3, cam_images=3,
                       data_cfg=SyntheticConfig(seed=4, num_train=8, num_val=3, min_size=48, max_size=64),
                       overrides=("crop_size=64", "batch_size=4", "num_workers=0", "loc_crop_size=32"))
    assert figures["device"] == "cpu" and figures["steps"] == 3 and figures["probe_steps"] == 2
    for key in ("eval_single_miou", "eval_ms_crf_miou", "eval_cam_miou"):
        assert 0 <= figures[key] <= 100, key
    assert {"cls", "total"} <= set(figures["final_losses"])


def test_orchestration_blind(tmp_path, monkeypatch, capsys):
    """The whole command with the GPU stages faked: stage order, what each stage runs, the report, the exit
    status (0 when every stage passed, 1 when one failed), the smoke figures picked up."""
    from types import SimpleNamespace

    calls = []

    def fake_stage(name, cmd, timeout, log, env=None):
        calls.append((name, cmd, env))
        if name == "cuda_tests":
            junit = next(a.split("=", 1)[1] for a in cmd if a.startswith("--junitxml="))
            Path(junit).write_text('<testsuite><testcase classname="t" name="a"/></testsuite>')
        if name.startswith("bench_"):
            path = next(a.split("=", 1)[1] for a in cmd if a.startswith("--benchmark-json="))
            Path(path).write_text(json.dumps({"benchmarks": [
                {"name": f"{name}[cuda]", "stats": {"mean": 0.5, "median": 0.5, "rounds": 3},
                 "extra_info": {"reg_loss_share": 0.7}}]}))
        if name == "smoke":
            Path(cmd[-1]).write_text(json.dumps({"steps": 640, "eval_ms_crf_miou": 31.5}))
        status = "failed" if name == fail_at else "ok"
        return {"stage": name, "status": status, "rc": 0 if status == "ok" else 1, "seconds": 1.0,
                "log": f"{name}.log", "tail": "boom" if status != "ok" else ""}

    monkeypatch.setattr(dc, "no_gpu_line", lambda: None)
    monkeypatch.setattr(dc, "gpu_info", lambda: {"gpu": "Fake GPU", "driver": "1.2", "torch": "x", "cuda_runtime": "y"})
    monkeypatch.setattr(dc, "run_stage", fake_stage)
    for fail_at, want in ((None, 0), ("bench_par", 1)):
        calls.clear()
        rc = dc.run(SimpleNamespace(out=str(tmp_path / str(fail_at)), skip=[]))
        assert rc == want
        assert [c[0] for c in calls] == ["build", "cuda_tests", "bench_regloss", "bench_par", "bench_step",
                                         "bench_crf", "smoke"]
        build_env = calls[0][2]
        assert build_env["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX" and "cuda=True" in calls[0][1][-1]
        assert ["-m", "cuda"] == calls[1][1][3:5]
        assert all(env["TORCH_EXTENSIONS_DIR"] == build_env["TORCH_EXTENSIONS_DIR"] for _, _, env in calls)
        (folder,) = (tmp_path / str(fail_at)).iterdir()
        report = json.loads((folder / "device_check.json").read_text())
        assert report["smoke"]["steps"] == 640 and report["cuda_tests"]["passed"] == 1
        assert report["benchmarks"]["step"][0]["reg_loss_share"] == 0.7
        out = capsys.readouterr().out
        assert "Fake GPU" in out and "31.5" in out and str(folder) in out
    assert "boom" in out and "some stages did not pass" in out
    calls.clear()
    fail_at = None
    assert dc.run(SimpleNamespace(out=str(tmp_path / "skip"), skip=["benchmarks", "smoke"])) == 0
    assert [c[0] for c in calls] == ["build", "cuda_tests"]
