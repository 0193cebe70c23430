"""`locbe device-check`: one command that checks a CUDA machine end to end and writes what it saw.

On a machine with a CUDA device, within about 8 minutes on one H100-class GPU:

1. builds the CUDA regularized-loss op for sm_80 / sm_90 + PTX (``TORCH_CUDA_ARCH_LIST``), and loads it;
2. runs every ``cuda``-marked test (``pytest -m cuda``);
3. runs the CUDA cases of the regloss, PAR, step and CRF benchmarks (few rounds; the step suite compares the
   authors' layout, plain and fast; the CRF suite gives GPU ms per image at 500x375 K=21 and 640x480 K=81);
4. trains the micro ViT on the synthetic set on the GPU for about 2 minutes (the smoke schedule shrunk to
   the steps that fit, every phase kept) and evaluates it there (single scale, multi-scale + CRF, CAM);
5. writes ``reports/device/<UTC time>/device_check.json`` and ``summary.md``: GPU name, driver, torch and
   CUDA versions, and every figure; prints the summary.

Each stage runs in its own process with a time limit, so a crash or a hang in one is recorded and the
others still run. Exit status 0 when every stage passed, 1 otherwise. Without a CUDA device it says so in
one line and exits 0. Run it from a source checkout (it needs ``tests/`` and ``benchmarks/``):

    locbe device-check            # or: tox -e gpu
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from locbe.runtime.fileio import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
CUDA_ARCHS = "8.0;9.0+PTX"
BUDGET_S = 480  # the whole check
# (stage, time limit in seconds); the smoke stage gets what is left of the budget, at most SMOKE_LIMIT_S
LIMITS = {"build": 170, "cuda_tests": 100, "benchmarks": 140}
SMOKE_TRAIN_S = 120
SMOKE_LIMIT_S = 260
BENCH_SUITES = ("regloss", "par", "step", "crf")


# ----------------------------------------------------------------------------- environment
def no_gpu_line() -> str | None:
    """The one line printed where there is nothing to check, or None when a CUDA device is usable."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"locbe device-check: no CUDA device here (torch {torch.__version__}, {build}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); nothing to check.")


def gpu_info() -> dict:
    import timm
    import torch

    props = torch.cuda.get_device_properties(0)
    info = {"gpu": props.name, "gpu_count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
            "driver": None, "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "nvcc": None, "timm": timm.__version__,
            "python": sys.version.split()[0], "cpu_cores": os.cpu_count(), "commit": _git_commit(),
            "cuda_archs_built": CUDA_ARCHS}
    smi = shutil.which("nvidia-smi")
    if smi:
        out = _quiet([smi, "--query-gpu=driver_version", "--format=csv,noheader"])
        info["driver"] = out.splitlines()[0].strip() if out else None
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME) / "bin" / "nvcc" if CUDA_HOME else None
    if nvcc and nvcc.is_file():
        out = _quiet([str(nvcc), "--version"])
        info["nvcc"] = next((ln.strip() for ln in out.splitlines() if "release" in ln), None) if out else None
    return info


def _quiet(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> str:
    return (_quiet(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "unknown").strip() or "unknown"


# ----------------------------------------------------------------------------- stages
def run_stage(name: str, cmd: list[str], timeout: float, log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` (output to ``log``) with a time limit: {stage, status ok/failed/timeout, rc, seconds, tail}."""
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(1.0, timeout), cwd=REPO,
                                env=env).returncode
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
    text = log.read_text(errors="replace")
    return {"stage": name, "status": status, "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "log": log.name, "tail": text[-1500:] if status != "ok" else ""}


def parse_junit(path: Path) -> dict:
    """Counts of a pytest JUnit XML file, and the names of failed tests."""
    if not path.is_file():
        return {"tests": 0, "passed": 0, "failed": 0, "skipped": 0, "failures": []}
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = sum(1 for c in cases if c.find("skipped") is not None)
    return {"tests": len(cases), "passed": len(cases) - len(failed) - skipped, "failed": len(failed),
            "skipped": skipped, "failures": failed}


BENCH_KEYS = ("images_per_s", "peak_mb", "speedup_vs_plain", "speedup_cam_bf16_vs_plain", "plain_vs_authors",
              "fast_vs_authors", "reg_loss_share", "authors_median_s", "plain_median_s", "fast_median_s",
              "fast_cam_bf16_median_s", "max_rel_err", "peak_vs_plain", "gpu_ms_per_image", "label_agreement")


def bench_figures(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for b in json.loads(path.read_text()).get("benchmarks", []):
        row = {"benchmark": b["name"], "mean_s": b["stats"]["mean"], "median_s": b["stats"]["median"],
               "rounds": b["stats"]["rounds"]}
        row.update({k: b.get("extra_info", {}).get(k) for k in BENCH_KEYS if k in b.get("extra_info", {})})
        rows.append(row)
    return rows


def steps_for_budget(seconds: float, step_s: float, lo: int = 20, hi: int = 1200) -> int:
    """Training steps that fit in ``seconds`` at ``step_s`` seconds a step, within [lo, hi]."""
    if step_s <= 0:
        return hi
    return int(max(lo, min(hi, int(seconds / step_s + 1e-9))))


# ----------------------------------------------------------------------------- smoke (runs in its own process)
def smoke(out: Path, train_seconds: float, device: str = "cuda", data_cfg=None, probe_steps: int = 20,
          overrides: tuple[str, ...] = (), min_steps: int = 20, cam_images: int = 80) -> dict:
    """Micro ViT on the synthetic set on the GPU: time a few steps, train the smoke schedule shrunk to the steps
    that fit in ``train_seconds``, then evaluate on the GPU (CRF in a pool over the CPU cores). The keyword
    arguments shrink it further for the CPU twin in tests/test_device_check.py."""
    import dataclasses

    import torch

    from locbe.config import apply_overrides, get_preset
    from locbe.data import build_dataset
    from locbe.data.synthetic import SyntheticConfig, make_synthetic
    from locbe.eval.evaluate import EvalOptions, evaluate, load_model_for_eval
    from locbe.rehearsal import cap_schedule
    from locbe.train import train

    data = make_synthetic(out / "data", data_cfg or SyntheticConfig(num_train=160, num_val=40))
    base = apply_overrides(get_preset("smoke"), [f"data_root={json.dumps(str(data))}", f"device={json.dumps(device)}",
                                                 "val_every=0", "num_workers=4", *overrides])
    t0 = time.perf_counter()
    train(dataclasses.replace(base, out_dir=str(out / "probe"), max_steps=probe_steps), progress=False)
    probe_s = time.perf_counter() - t0
    step_s = probe_s / probe_steps  # start-up included: errs towards fewer steps
    steps = steps_for_budget(train_seconds, step_s, lo=min_steps)
    cfg = dataclasses.replace(cap_schedule(base, steps), out_dir=str(out / "run"), log_every=10)
    t0 = time.perf_counter()
    result = train(cfg, progress=False)
    train_s = time.perf_counter() - t0
    dev = torch.device(device)
    model, _ = load_model_for_eval(str(result.checkpoint), None, None, dev)
    val = build_dataset("synthetic", data, "val", train=False)
    figures = {"device": device, "probe_steps": probe_steps, "probe_s": round(probe_s, 1), "steps": result.step,
               "train_s": round(train_s, 1), "steps_per_s": round(result.step / train_s, 2),
               "images_per_s_train": round(result.step * cfg.batch_size / train_s, 1),
               "final_losses": {k: round(v, 4) for k, v in result.last_losses.items()}}
    for key, opts, ds in (("single", dict(), val), ("ms_crf", dict(multi_scale=True, crf=True), val),
                          ("cam", dict(cam=True, max_images=cam_images),
                           build_dataset("synthetic", data, "train_aug", train=False))):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = evaluate(model, ds, 21, EvalOptions(progress=False, protocol="smoke", batch_size=8, **opts),
                       device=dev, cam_cfg=cfg)
        seconds = time.perf_counter() - t0
        metric = {"single": "seg", "ms_crf": "seg_crf", "cam": "cam"}[key]
        figures[f"eval_{key}_miou"] = round(100 * res[metric]["miou"], 2)
        figures[f"eval_{key}_images_per_s"] = round(res["num_images"] / seconds, 1)
    return figures


# ----------------------------------------------------------------------------- report
def summary_markdown(report: dict) -> str:
    info = report["environment"]
    lines = [f"# locbe device-check, {report['started_utc']}", "",
             f"**{report['verdict']}** in {report['seconds']:.0f} s (budget {BUDGET_S} s).", "",
             "| | |", "|---|---|"]
    for key in ("gpu", "gpu_count", "capability", "memory_gib", "driver", "torch", "cuda_runtime", "cudnn",
                "nvcc", "cuda_archs_built", "timm", "python", "cpu_cores", "commit"):
        lines.append(f"| {key} | {info.get(key)} |")
    lines += ["", "## Stages", "", "| stage | status | seconds | log |", "|---|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['stage']} | {s['status']} | {s.get('seconds', '-')} | {s.get('log', '-')} |")
    tests = report.get("cuda_tests")
    if tests:
        lines += ["", "## CUDA tests", "",
                  f"{tests['tests']} collected: {tests['passed']} passed, {tests['failed']} failed, "
                  f"{tests['skipped']} skipped."]
        lines += [f"- FAILED {name}" for name in tests["failures"]]
    bench = report.get("benchmarks") or {}
    if any(bench.values()):
        lines += ["", "## Benchmarks (CUDA cases)", ""]
        for suite, rows in bench.items():
            if not rows:
                continue
            keys = ["mean_s"] + [k for k in BENCH_KEYS if any(k in r for r in rows)]
            lines += [f"### {suite}", "", "| benchmark | " + " | ".join(keys) + " |",
                      "|---|" + "---|" * len(keys)]
            for r in rows:
                lines.append(f"| {r['benchmark']} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
            lines.append("")
    smoke_figs = report.get("smoke")
    if smoke_figs:
        lines += ["", "## Smoke training and evaluation on the GPU (micro ViT, synthetic set)", "", "| | |",
                  "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in smoke_figs.items()]
    failed = [s for s in report["stages"] if s["status"] != "ok"]
    for s in failed:
        lines += ["", f"## {s['stage']}: {s['status']} (end of its log)", "", "```", s.get("tail", "").strip(), "```"]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(folder: Path, report: dict) -> Path:
    atomic_write_json(folder / "device_check.json", report)
    atomic_write_text(folder / "summary.md", summary_markdown(report))
    return folder / "summary.md"


# ----------------------------------------------------------------------------- the command
def add_arguments(p) -> None:
    p.add_argument("--out", default="reports/device", help="a <UTC time> folder is made here")
    p.add_argument("--skip", action="append", default=[], choices=["build", "cuda_tests", "benchmarks", "smoke"],
                   help="leave a stage out (repeatable)")


def run(args) -> int:
    line = no_gpu_line()
    if line is not None:
        print(line)
        return 0
    t_start = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc)
    folder = Path(args.out) / started.strftime("%Y%m%dT%H%M%SZ")
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": CUDA_ARCHS, "PYTHONPATH": str(REPO),
           "TORCH_EXTENSIONS_DIR": str(folder / "torch_extensions"), "MAX_JOBS": str(os.cpu_count() or 4),
           "PYTHONUNBUFFERED": "1"}
    info = gpu_info()
    print(f"locbe device-check: {info['gpu']} (driver {info['driver']}, torch {info['torch']}, CUDA "
          f"{info['cuda_runtime']}); report in {folder}")
    report = {"started_utc": started.isoformat(timespec="seconds"), "environment": info, "stages": [],
              "budget_s": BUDGET_S}
    py = sys.executable

    def left() -> float:
        return BUDGET_S - (time.perf_counter() - t_start)

    def stage(name, cmd, limit) -> dict:
        if name in args.skip or (name.startswith("bench_") and "benchmarks" in args.skip):
            result = {"stage": name, "status": "skipped", "seconds": 0}
        elif left() < 20:
            result = {"stage": name, "status": "skipped: time budget spent", "seconds": 0}
        else:
            print(f"[{len(report['stages']) + 1}] {name} (limit {min(limit, left()):.0f} s) ...", flush=True)
            result = run_stage(name, cmd, min(limit, left()), folder / f"{name}.log", env)
        report["stages"].append(result)
        print(f"    {name}: {result['status']} ({result['seconds']} s)", flush=True)
        return result

    # the CUDA op for TORCH_CUDA_ARCH_LIST (sm_80, sm_90 + PTX) and the CPU op the references use; later
    # stages load both from the same TORCH_EXTENSIONS_DIR
    stage("build", [py, "-c", "from locbe.lattice.build import load_extension as f; c = f(cuda=False); "
                              "g = f(cuda=True); print('built and loaded', c.__file__, g.__file__)"],
          LIMITS["build"])
    junit = folder / "cuda_tests.xml"
    stage("cuda_tests", [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                         "tests"], LIMITS["cuda_tests"])
    report["cuda_tests"] = parse_junit(junit)
    bench_t0 = time.perf_counter()
    report["benchmarks"] = {}
    for suite in BENCH_SUITES:
        path = folder / f"bench_{suite}.json"
        budget = LIMITS["benchmarks"] - (time.perf_counter() - bench_t0)
        stage(f"bench_{suite}", [py, "-m", "pytest", str(REPO / "benchmarks" / f"test_bench_{suite}.py"), "-k",
                                 "cuda", "-q", "-p", "no:cacheprovider", f"--benchmark-json={path}"],
              max(20.0, budget))
        report["benchmarks"][suite] = bench_figures(path)
    smoke_json = folder / "smoke.json"
    train_s = max(30.0, min(SMOKE_TRAIN_S, left() - 90))
    stage("smoke", [py, "-m", "locbe.device_check", "smoke", str(folder / "smoke"), str(train_s), str(smoke_json)],
          min(SMOKE_LIMIT_S, left()))
    if smoke_json.is_file():
        report["smoke"] = json.loads(smoke_json.read_text())
    shutil.rmtree(folder / "torch_extensions", ignore_errors=True)
    shutil.rmtree(folder / "smoke", ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    ok = all(s["status"] in ("ok", "skipped") for s in report["stages"]) and not report["cuda_tests"]["failed"]
    report["verdict"] = "all stages passed" if ok else "some stages did not pass"
    summary = write_report(folder, report)
    print(summary.read_text())
    print(f"report: {folder / 'device_check.json'} and {summary}")
    return 0 if ok else 1


def _main(argv: list[str]) -> int:
    """``python -m locbe.device_check smoke OUT SECONDS JSON`` (the smoke stage's own process)."""
    if len(argv) == 4 and argv[0] == "smoke":
        figures = smoke(Path(argv[1]), float(argv[2]))
        atomic_write_json(Path(argv[3]), figures)
        print(json.dumps(figures, indent=2))
        return 0
    print("usage: locbe device-check  (this module's own entry is for its smoke stage)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
