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

SUITES = {"regloss": "test_bench_regloss.py", "par": "test_bench_par.py", "step": "test_bench_step.py"}
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- memory
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_peak(fn, device: str = "cpu"):
    """Run ``fn()`` and return (result, peak extra bytes over the memory in use before the call)."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before
    try:
        libc = ctypes.CDLL("libc.so.6")
        # a fixed mmap threshold (glibc otherwise raises it after frees): blocks >= 128 KiB are mapped and
        # unmapped on free, so resident size follows live memory and the peak does not depend on history
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)  # give freed heap back so the baseline is what is live
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _status_kb("VmRSS")
    result = fn()
    return result, (_status_kb("VmHWM") - before) * 1024


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
        for key in ("images_per_s", "peak_mb", "peak_over_S", "workspace_over_S", "speedup_vs_plain", "peak_vs_plain",
                    "max_rel_err"):
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
    p.add_argument("--suite", choices=["all", *SUITES], default="all")
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
        (out / f"{suite}.md").write_text(f"# Benchmark: {suite}\n\nSource: `{path.name}` ({note}).\n\n{text}\n")
    return status
