"""CPU numerics pinned, so that a CPU run gives the same floats on any x86-64 CPU with AVX2, whatever its cores.

Three things change the floats of one CPU run of the same code on the same data (issue 25, docs/reproducibility.md):

- the intra-op thread count: ATen's parallel reductions and MKL's GEMM split their sums by thread;
- the instruction set ATen's vectorised kernels dispatch to (``ATEN_CPU_CAPABILITY``: AVX512 on a CPU that has it,
  AVX2 otherwise), and the code paths of MKL (``MKL_CBWR``) and oneDNN (``ONEDNN_MAX_CPU_ISA``), which each pick
  their own by CPU model and vendor;
- nothing else we found: the data pipeline draws from per-item generators (worker count is free), and the
  lattice op gives the same bits with its AVX2 and its baseline code (docs/regloss.md, "Instruction sets").

``cpu_numerics="pinned"`` (the smoke presets) fixes all of them: one intra-op thread and the AVX2 code paths.
Libraries read these variables once, when they first run, so the ``locbe`` command sets them before anything
imports torch (``apply_pinned_numerics``); the training loop and evaluation then check what is in force and
record it (``numerics_record``), and say so when a caller loaded torch first without them.
"""

from __future__ import annotations

import contextlib
import os
import sys

PINNED_THREADS = 1
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorised kernels (torch.backends.cpu.get_cpu_capability())
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility: one code path on every CPU with AVX2
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (convolutions, some matmuls)
    "OMP_NUM_THREADS": str(PINNED_THREADS),
    "MKL_NUM_THREADS": str(PINNED_THREADS),
}
NUMERICS_CHOICES = ("native", "pinned")
# every variable that changes the floats of a CPU run; recorded in env.json whether pinned or not
RECORDED_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "KMP_DETERMINISTIC_REDUCTION", "CUBLAS_WORKSPACE_CONFIG")
EXPECTED_CAPABILITY = "AVX2"


def apply_pinned_numerics(environ=None) -> dict[str, str]:
    """Set ``PINNED_ENV`` in ``environ`` (``os.environ``) before torch loads; returns the variables whose value
    this changed, as {name: previous value or ""} so that the caller can say what it overrode. A user's own
    value is overridden: a pinned run promises the reference's numbers (``--set cpu_numerics=native`` keeps
    the environment as it is)."""
    environ = os.environ if environ is None else environ
    changed = {}
    for name, value in PINNED_ENV.items():
        if environ.get(name) != value:
            changed[name] = environ.get(name, "")
            environ[name] = value
    return changed


def numerics_record(requested: str) -> dict:
    """What is in force in this process for the CPU's floats: env.json's ``numerics`` entry. ``pinned_ok``
    says whether a run asked to be pinned is (torch loaded after the variables were set, one thread)."""
    import torch

    record = {
        "cpu_numerics": requested,
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "env": {name: os.environ.get(name) for name in RECORDED_ENV},
        "cpu": cpu_model(),
        "torch_config": _parallel_info_lines(torch),
    }
    if requested == "pinned":
        missing = [n for n, v in PINNED_ENV.items() if os.environ.get(n) != v and n not in ("OMP_NUM_THREADS",
                                                                                          "MKL_NUM_THREADS")]
        record["pinned_ok"] = (not missing and record["intra_op_threads"] == PINNED_THREADS
                               and record["cpu_capability"] == EXPECTED_CAPABILITY)
        record["pinned_missing"] = missing
    return record


@contextlib.contextmanager
def pinned_threads(requested: str):
    """In a pinned run, ATen's intra-op threads set to ``PINNED_THREADS`` for the block and restored after it
    (a caller such as a test session may have loaded torch with another count)."""
    import torch

    before = torch.get_num_threads()
    change = requested == "pinned" and before != PINNED_THREADS
    if change:
        torch.set_num_threads(PINNED_THREADS)
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(before)


def pinned_warning(record: dict) -> str | None:
    """One line when a run asked for pinned numerics cannot have them (or None)."""
    if record.get("cpu_numerics") != "pinned" or record.get("pinned_ok"):
        return None
    if record["cpu_capability"] != EXPECTED_CAPABILITY and not record["pinned_missing"]:
        why = f"this CPU runs ATen's {record['cpu_capability']} kernels, not AVX2 (no AVX2 on this CPU?)"
    elif record["pinned_missing"]:
        why = (f"torch was loaded before locbe could set {', '.join(record['pinned_missing'])} (run it through "
               f"the `locbe` command, or set {_env_text()} yourself)")
    else:
        why = f"{record['intra_op_threads']} intra-op threads, not {PINNED_THREADS}"
    return f"cpu_numerics=pinned is not in force: {why}; the floats may differ from the published reference"


def _env_text() -> str:
    return " ".join(f"{k}={v}" for k, v in PINNED_ENV.items())


def _cpuinfo() -> tuple[str, set[str]] | None:
    """The first CPU's model name and flags from /proc/cpuinfo; None where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    name, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == "unknown":
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return name, flags


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``avx2``, ...), empty where they cannot be read."""
    info = _cpuinfo()
    return info[1] if info else set()


def cpu_model() -> str:
    """The CPU's model name (and its flags' AVX family), for env.json."""
    info = _cpuinfo()
    if info is None:
        import platform

        return platform.processor() or "unknown"
    name, flags = info
    avx = sorted(f for f in flags if f.startswith(("avx", "amx")))
    return f"{name} ({' '.join(avx) or 'no AVX'})"


def _parallel_info_lines(torch) -> dict:
    """Versions of what computes the floats: ATen's parallel backend, MKL, oneDNN (torch.__config__)."""
    try:
        lines = [line.strip().lstrip("- ") for line in
                 (torch.__config__.parallel_info() + "\n" + torch.__config__.show()).splitlines()]
    except Exception:  # an old or stripped torch: the versions are only a record
        return {}
    out = {}
    for key, prefix in (("parallel_backend", "ATen parallel backend:"), ("openmp", "OpenMP"),
                        ("mkl", "Intel(R) oneAPI Math Kernel Library"), ("mkl", "Intel(R) Math Kernel Library"),
                        ("onednn", "Intel(R) MKL-DNN"), ("onednn", "oneDNN")):
        found = next((line for line in lines if line.startswith(prefix)), None)
        if found and key not in out:
            out[key] = found.removeprefix("ATen parallel backend:").strip()
    return out


def say_overrides(changed: dict[str, str], stream=None) -> None:
    """One stderr line when pinning overrode a user's own setting (an unset variable is not worth a line)."""
    overridden = {k: v for k, v in changed.items() if v}
    if overridden:
        text = ", ".join(f"{k}={v} -> {PINNED_ENV[k]}" for k, v in overridden.items())
        print(f"locbe: cpu_numerics=pinned (the reference's numbers on any AVX2 CPU) overrides {text}; "
              f"--set cpu_numerics=native keeps yours", file=stream or sys.stderr)
