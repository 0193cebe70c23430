"""`locbe bench`: run the pytest-benchmark suites in ``benchmarks/``, keep their JSON in
``reports/benchmarks/`` and print a table with the change against the previous run.

Peak memory on CPU is the process's resident high-water mark (``VmHWM``) reset just before the
measured call (``/proc/self/clear_refs``), minus the resident size at that moment, with glibc's mmap
threshold pinned so that freed blocks leave the resident set at once: what the call touched,
including allocator overhead. On CUDA it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

from locbe.runtime.fileio import atomic_write_text

SUITES = {"regloss": "test_bench_regloss.py", "par": "test_bench_par.py", "step": "test_bench_step.py",
          "cores": "test_bench_cores.py", "crf": "test_bench_crf.py"}
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- memory
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# allocator state for timings: blocks < 32 MiB (glibc's largest mmap threshold) come from the heap and
# are reused, freed memory is kept up to 256 MiB, so a step does not page-fault its way through fresh
# mappings; set once per benchmark process (benchmarks/conftest.py) so every timed round sees the same
TIMING_MALLOC = (32 * 2**20, 256 * 2**20)
# allocator state for peak memory: blocks >= 128 KiB are mapped and unmapped on free, so the resident
# size follows live memory and the peak does not depend on what ran before
PEAK_MALLOC = (128 * 2**10, 128 * 2**10)


_malloc_state: tuple[int, int] | None = None  # what set_malloc last pinned


def set_malloc(mmap_threshold: int, trim_threshold: int) -> bool:
    """Pin glibc's mmap and trim thresholds (no-op returning False where there is no glibc)."""
    global _malloc_state
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    _malloc_state = (mmap_threshold, trim_threshold)
    return bool(ok)


def measure_peak(fn, device: str = "cpu"):
    """Run ``fn()`` and return (result, peak extra bytes over the memory in use before the call).

    On CPU the allocator is switched to ``PEAK_MALLOC`` for the call and back to the pinned state
    afterwards, so measuring memory does not slow down the timings that follow. After timings in
    ``TIMING_MALLOC`` the heap may hold free chunks that large blocks of the call reuse and keep
    resident, so suites whose targets are memory run in ``PEAK_MALLOC`` throughout
    (``MALLOC_STATE = "peak"`` in the benchmark module, benchmarks/conftest.py)."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before
    previous = _malloc_state or TIMING_MALLOC
    set_malloc(*PEAK_MALLOC)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        before = _status_kb("VmRSS")
        result = fn()
        return result, (_status_kb("VmHWM") - before) * 1024
    finally:
        set_malloc(*previous)


# ----------------------------------------------------------------------------- devices and timing
def device_params() -> list:
    """pytest parameters for the benchmarked devices: "cpu", and "cuda" skipped where there is no GPU."""
    import pytest
    import torch

    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]


def synchronized(fn, device):
    """``fn`` followed by a CUDA synchronisation on a GPU, so wall-clock timers (pytest-benchmark) see
    the kernels' time rather than their launch."""
    import torch

    if torch.device(device).type != "cuda":
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return out

    return run


# ----------------------------------------------------------------------------- reporting
def load_results(path: Path) -> dict[str, dict]:
    data = json.loads(path.read_text())
    out = {}
    for b in data.get("benchmarks", []):
        row = {"mean_s": b["stats"]["mean"], "min_s": b["stats"]["min"], "rounds": b["stats"]["rounds"]}
        row.update(b.get("extra_info", {}))
        out[b["fullname"].split("::", 1)[-1]] = row
    return out


def table(current: dict[str, dict], previous: dict[str, dict] | None) -> str:
    from tabulate import tabulate

    rows = []
    for name, r in current.items():
        row = {"benchmark": name, "mean s": r["mean_s"]}
        for key in ("images_per_s", "peak_mb", "peak_over_S", "workspace_over_S", "speedup_vs_plain",
                    "speedup_cam_bf16_vs_plain", "plain_vs_authors", "fast_vs_authors", "reg_loss_share",
                    "peak_vs_plain", "loss_rel_diff_vs_plain", "max_rel_err", "locbe_busy_over_quiet",
                    "passive_busy_over_quiet", "default_busy_over_quiet", "quiet_locbe_over_default",
                    "quiet_passive_over_default", "locbe_op_busy_over_quiet", "passive_op_busy_over_quiet",
                    "default_op_busy_over_quiet", "neighbour_arrives_later_busy_over_quiet", "lattice_s",
                    "pydensecrf_s", "speedup", "lattice_1thread_s", "speedup_1thread", "pair_speedup_min",
                    "pair_speedup_max", "lattice_peak_mb",
                    "pydensecrf_peak_mb", "label_agreement", "gpu_ms_per_image", "load_before", "load_after"):
            if key in r:
                row[key] = r[key]
        if previous and name in previous:
            row["vs previous"] = f"{previous[name]['mean_s'] / r['mean_s']:.2f}x"
        rows.append(row)
    return tabulate(rows, headers="keys", floatfmt=".4g", tablefmt="github", missingval="-")


def _previous(folder: Path, suite: str, exclude: Path | None = None) -> Path | None:
    runs = sorted(p for p in folder.glob(f"{suite}-*.json") if p != exclude)
    return runs[-1] if runs else None


def add_arguments(p) -> None:
    p.add_argument("--suite", choices=["all", *SUITES], default="all", help="which benchmark suite to run")
    p.add_argument("--out", default="reports/benchmarks", help="folder for the JSON results and tables")
    p.add_argument("--show", action="store_true", help="only print the latest saved results")
    p.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    bench_dir = REPO / "benchmarks"
    if not bench_dir.is_dir():
        raise FileNotFoundError(f"{bench_dir} not found: `locbe bench` runs the suites of a source checkout")
    status = 0
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for suite in suites:
        if args.show:
            path = _previous(out, suite)
            if path is None:
                print(f"[{suite}] no saved results in {out}")
                continue
        else:
            path = out / f"{suite}-{stamp}.json"
            cmd = [sys.executable, "-m", "pytest", str(bench_dir / SUITES[suite]), "-q", "-p", "no:cacheprovider",
                   f"--benchmark-json={path}", *args.pytest_args]
            print("$", " ".join(cmd))
            rc = subprocess.call(cmd, cwd=REPO)
            status = status or rc
            if not path.exists():
                continue
        current = load_results(path)
        prev_path = _previous(out, suite, exclude=path)
        previous = load_results(prev_path) if prev_path else None
        text = table(current, previous)
        note = f"compared with {prev_path.name}" if prev_path else "no previous run to compare with"
        print(f"\n## {suite} ({path.name}; {note})\n\n{text}\n")
        atomic_write_text(out / f"{suite}.md", f"# Benchmark: {suite}\n\nSource: `{path.name}` ({note}).\n\n{text}\n")
    return status
