"""Build-on-first-use of the lattice op library (``locbe build-ext`` builds ahead of time).

The kernel sources are the repository's ``cuda/`` folder; a non-editable install carries a copy of them as
package data (``locbe/lattice/csrc``, copied at build time by setup.py), so the op builds wherever locbe is
installed. ``LOCBE_CUDA_SRC`` overrides the folder. The library registers the custom ops
``locbe::lattice_filter`` (CPU, and CUDA when built with nvcc) and ``locbe::lattice_filter_serial`` with
``TORCH_LIBRARY``; loading it makes them available as ``torch.ops.locbe.*``.

Builds are cached in ``<root>/<name>-<key>``, where the key hashes the sources, the compiler flags and the
Python/torch/CUDA versions: checkouts, environments and source versions never build over each other. The
root is ``LOCBE_EXTENSIONS_DIR``, else ``TORCH_EXTENSIONS_DIR``, else ``~/.cache/locbe/extensions``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_CUDA_ARCHS = "8.0;9.0"
SOURCE_SUFFIXES = (".h", ".cpp", ".cu")
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3", "--expt-relaxed-constexpr"]


def source_dir() -> Path:
    env = os.environ.get("LOCBE_CUDA_SRC")
    candidates = [Path(env)] if env else [Path(__file__).resolve().parent / "csrc",  # installed package data
                                          Path(__file__).resolve().parents[2] / "cuda"]  # a checkout
    for path in candidates:
        if (path / "lattice_cpu.cpp").is_file():
            return path
    raise FileNotFoundError(f"lattice sources not found in {' or '.join(map(str, candidates))}: reinstall locbe "
                            "(pip install .) or set LOCBE_CUDA_SRC to the repository's cuda/ folder")


def cache_root() -> Path:
    env = os.environ.get("LOCBE_EXTENSIONS_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "locbe" / "extensions"


def _check_compiler() -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r}) found: the regularized-loss op is compiled on first use; "
                           "install g++ (e.g. apt-get install g++) or set CXX")


def build_key(cuda: bool, archs: str | None = None) -> str:
    """Hash of every source file, the flags and the toolchain versions that the library depends on."""
    import torch

    h = hashlib.sha256()
    src = source_dir()
    for path in sorted(p for p in src.iterdir() if p.suffix in SOURCE_SUFFIXES):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    parts = [CFLAGS, LDFLAGS, CUDA_CFLAGS if cuda else [], [str(cuda), archs or ""],
             [sys.version, torch.__version__, str(torch.version.cuda), os.environ.get("CXX", "c++")]]
    h.update(repr(parts).encode())
    return h.hexdigest()[:16]


CUDA_RUNTIME_NOTICE = "No CUDA runtime is found"


def _no_cuda_runtime_notice(record) -> bool:
    return not record.getMessage().startswith(CUDA_RUNTIME_NOTICE)


def cpp_extension(cuda: bool):
    """``torch.utils.cpp_extension``. On a machine without a GPU its import says "No CUDA runtime is found,
    using CUDA_HOME=..." whenever a CUDA toolkit is around (a warning of its logger in recent torch, a print to
    stderr in torch 2.4); a build that compiles nothing for CUDA (``cuda=False``) imports it without that line."""
    if cuda:
        from torch.utils import cpp_extension as module

        return module
    import contextlib
    import io
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")  # the module's own logger (created here if first)
    logger.addFilter(_no_cuda_runtime_notice)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            from torch.utils import cpp_extension as module
    finally:
        logger.removeFilter(_no_cuda_runtime_notice)
        rest = [line for line in said.getvalue().splitlines(keepends=True) if not line.startswith(CUDA_RUNTIME_NOTICE)]
        sys.stderr.write("".join(rest))  # anything else the import said, as it said it
    return module


def _stage_sources(build_directory: Path) -> Path:
    """Copy the kernel sources into ``<build_directory>/src`` (once) and return that folder.

    ninja's build file names the source paths, so compiling straight from ``source_dir()`` made every other
    checkout or installed copy of the same sources (same key, same cache folder) rebuild the library, and two
    of them in turn rebuilt it again and again. From the build folder's own copy the command is the same
    whoever builds. A file is written only when absent (atomically, so a concurrent builder reads the old or
    the new file, never half of one): rewriting it would make it newer than the library and ninja would
    rebuild. Its content is the cached one by construction, since the folder's key hashes the sources."""
    from locbe.runtime.fileio import atomic_path

    staged = build_directory / "src"
    staged.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in source_dir().iterdir() if p.suffix in SOURCE_SUFFIXES):
        dest = staged / path.name
        if not dest.is_file():
            with atomic_path(dest) as tmp:
                shutil.copyfile(path, tmp)
    return staged


def _load(name: str, cuda: bool, build_directory: Path, verbose: bool = False) -> Path:
    load = cpp_extension(cuda).load
    src = _stage_sources(build_directory)
    sources = ["lattice_cpu.cpp"] + (["lattice_cuda.cu"] if cuda else [])
    # copies of the flag lists: torch's load appends to them in place, which changed build_key() (it hashes
    # them) after the first load, so library_path() then named a folder that was never built
    kwargs = dict(name=name, sources=[str(src / s) for s in sources],
                  extra_cflags=CFLAGS + (["-DWITH_CUDA"] if cuda else []), extra_ldflags=list(LDFLAGS),
                  extra_include_paths=[str(src)], verbose=verbose, is_python_module=False,
                  build_directory=str(build_directory))
    if cuda:
        kwargs["extra_cuda_cflags"] = list(CUDA_CFLAGS)
    load(**kwargs)  # builds if needed (ninja, under a file lock) and loads the library: registers torch.ops.locbe
    return build_directory / f"{name}.so"


def library_path(cuda: bool) -> Path:
    name = "locbe_lattice_cuda" if cuda else "locbe_lattice_cpu"
    return cache_root() / f"{name}-{build_key(cuda)}" / f"{name}.so"


_loaded: dict[str, bool] = {}


def load_extension(cuda: bool | None = None):
    """Load (building on first use) the op library and return ``torch.ops.locbe``.

    One library per process: the CUDA build (which contains the CPU kernels) when a GPU is available or
    ``cuda=True``, else the CPU build. Both register the same ``TORCH_LIBRARY`` and cannot be loaded together,
    so once one is loaded it serves every later call."""
    import torch

    if "cuda" in _loaded:
        if cuda and not _loaded["cuda"]:
            raise RuntimeError("the CPU-only lattice op library is already loaded in this process")
        return torch.ops.locbe
    if cuda is None:
        cuda = torch.cuda.is_available()
    _check_compiler()
    lib = library_path(cuda)
    if not lib.is_file():
        print(f"locbe: compiling the regularized-loss op ({'CPU+CUDA' if cuda else 'CPU'}) from {source_dir()} "
              f"into {lib.parent} (first use, about a minute)", file=sys.stderr, flush=True)
    _load(lib.stem, cuda, lib.parent)
    _loaded["cuda"] = cuda
    return torch.ops.locbe


def ensure_loaded() -> None:
    """Build/load the op now and run it once: training calls this before step 0 when it uses the reg loss."""
    import torch

    ops = load_extension()
    out = ops.lattice_filter(torch.zeros(1, 3, 2, 2), torch.ones(1, 1, 2, 2), 5.0, 5.0)
    if not torch.isfinite(out).all():
        raise RuntimeError("the lattice op loaded but returned non-finite values on a 2x2 test input")


def find_cuda_home() -> Path | None:
    """The CUDA toolkit to compile with: ``$CUDA_HOME`` / ``$CUDA_PATH``, else ``/usr/local/cuda``, else the
    toolkit of the ``nvcc`` on PATH (a wrapper script is followed to the toolkit it runs). A toolkit is a
    folder with ``bin/nvcc`` and ``include/cuda_runtime.h``; None when there is none."""
    def toolkit(folder) -> Path | None:
        folder = Path(folder)
        ok = (folder / "bin" / "nvcc").is_file() and (folder / "include" / "cuda_runtime.h").is_file()
        return folder if ok else None

    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and toolkit(candidate):
            return toolkit(candidate)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = Path(nvcc).resolve()
    if found := toolkit(nvcc.parent.parent):
        return found
    try:  # e.g. /usr/local/bin/nvcc holding `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
        text = nvcc.read_text(errors="ignore") if nvcc.stat().st_size < 4096 else ""
    except OSError:
        return None
    for word in text.split():
        if word.endswith("/bin/nvcc") and (found := toolkit(Path(word).parent.parent)):
            return found
    return None


def toolkit_release(home: Path) -> str | None:
    """The CUDA release of the toolkit at ``home`` ("13.0"), read from ``nvcc --version`` as torch reads it."""
    try:
        text = subprocess.run([str(Path(home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                              timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", text)
    return found.group(1) if found else None


def cuda_build_problem(home: Path | None) -> str | None:
    """Why this torch cannot compile the CUDA backend with the toolkit at ``home``, as one line; None if it can
    as far as torch's own checks go. torch refuses a toolkit of another CUDA major version than its own (torch
    2.4's wheels are CUDA 12, a CUDA 13 nvcc cannot build for them) and a CPU-only torch builds no CUDA at all."""
    import torch

    if home is None:
        return "nvcc not found: set CUDA_HOME (e.g. /usr/local/cuda) to build the CUDA backend"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build and compiles no CUDA code: install a CUDA build of torch"
    release = toolkit_release(home)
    wanted = torch.version.cuda.split(".")[0]
    if release is not None and release.split(".")[0] != wanted:
        return (f"{home}/bin/nvcc is CUDA {release} but torch {torch.__version__} was built with CUDA "
                f"{torch.version.cuda}, and torch compiles extensions only with the same major version: set CUDA_HOME "
                f"to a CUDA {wanted} toolkit")
    return None


def build_cuda(build_directory: str, archs: str = DEFAULT_CUDA_ARCHS, verbose: bool = False) -> Path:
    """Compile and link the CUDA backend (no GPU needed); returns the shared library's path.

    Runs in a subprocess: loading it here would register ``locbe`` a second time next to the CPU build."""
    from locbe.errors import ToolkitError

    home = find_cuda_home()
    if problem := cuda_build_problem(home):
        raise ToolkitError(problem)
    # torch guesses CUDA_HOME once at import, from nvcc on PATH (a wrapper script misleads it): name it
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=archs, CUDA_HOME=str(home))
    code = ("import sys, pathlib; from locbe.lattice.build import _load; "
            "_load('locbe_lattice_cuda_build', True, pathlib.Path(sys.argv[1]), verbose=sys.argv[2] == '1')")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-c", code, build_directory, "1" if verbose else "0"], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the CUDA build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    lib = Path(build_directory) / "locbe_lattice_cuda_build.so"
    if not lib.is_file():
        raise RuntimeError(f"the CUDA build finished without producing {lib}")
    return lib


def add_arguments(p) -> None:
    p.add_argument("--cuda", action="store_true", help="also compile and link the CUDA backend (needs nvcc)")
    p.add_argument("--archs", default=DEFAULT_CUDA_ARCHS, help="TORCH_CUDA_ARCH_LIST for the CUDA build")
    p.add_argument("--build-dir", default=None, help="where to put the CUDA build (default: a cache folder)")
    p.add_argument("--verbose", action="store_true", help="show the compiler commands and output")


def run(args) -> int:
    import time

    import torch

    t0 = time.perf_counter()
    load_extension()
    cuda = torch.cuda.is_available()
    print(f"{'CPU+CUDA' if cuda else 'CPU'} op library ready: {library_path(cuda)} ({time.perf_counter() - t0:.1f} s)")
    if args.cuda:
        t0 = time.perf_counter()
        build_dir = args.build_dir or str(cache_root() / "cuda_build")
        lib = build_cuda(build_dir, args.archs, args.verbose)
        print(f"CUDA backend compiled and linked for {args.archs}: {lib} ({time.perf_counter() - t0:.1f} s)")
    return 0
