"""Build-on-first-use of the lattice extension (`locbe build-ext` builds ahead of time).

Sources live in ``<repo>/cuda`` (override with ``LOCBE_CUDA_SRC``). The CPU extension always builds
(C++17 + OpenMP); the CUDA one when a GPU is present, or when asked (``locbe build-ext --cuda``),
which needs nvcc (``CUDA_HOME``). Builds are cached by torch under TORCH_EXTENSIONS_DIR.
"""

from __future__ import annotations

import os
import shutil
from functools import cache
from pathlib import Path

DEFAULT_CUDA_ARCHS = "8.0;9.0"


def source_dir() -> Path:
    env = os.environ.get("LOCBE_CUDA_SRC")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "cuda"
    if not (path / "lattice_cpu.cpp").is_file():
        raise FileNotFoundError(f"lattice sources not found in {path}: install locbe from a checkout "
                                "(pip install -e .) or set LOCBE_CUDA_SRC to the repository's cuda/ folder")
    return path


def _check_compiler() -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r}) found: the regularized-loss extension is compiled on first "
                           "use; install g++ (e.g. apt-get install g++) or set CXX")


def _load(name: str, sources: list[Path], cuda: bool, build_directory: str | None = None, verbose: bool = False,
          is_python_module: bool = True):
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-fopenmp"]
    kwargs = dict(name=name, sources=[str(s) for s in sources], extra_cflags=flags + (["-DWITH_CUDA"] if cuda else []),
                  extra_ldflags=["-fopenmp"], extra_include_paths=[str(source_dir())], verbose=verbose,
                  is_python_module=is_python_module)
    if cuda:
        kwargs["extra_cuda_cflags"] = ["-O3", "--expt-relaxed-constexpr"]
    if build_directory:
        os.makedirs(build_directory, exist_ok=True)
        kwargs["build_directory"] = build_directory
    return load(**kwargs)


@cache
def load_extension(cuda: bool | None = None):
    """The compiled module; with CUDA when ``cuda`` is True (or None and a GPU is available)."""
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    _check_compiler()
    src = source_dir()
    if cuda:
        return _load("locbe_lattice_cuda", [src / "lattice_cpu.cpp", src / "lattice_cuda.cu"], cuda=True)
    return _load("locbe_lattice_cpu", [src / "lattice_cpu.cpp"], cuda=False)


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


def build_cuda(build_directory: str, archs: str = DEFAULT_CUDA_ARCHS, verbose: bool = False) -> Path:
    """Compile and link the CUDA backend (no GPU needed); returns the shared library's path."""
    import torch.utils.cpp_extension as ext

    home = find_cuda_home()
    if home is None:
        raise RuntimeError("nvcc not found: set CUDA_HOME (e.g. /usr/local/cuda) to build the CUDA backend")
    src = source_dir()
    before = os.environ.get("TORCH_CUDA_ARCH_LIST"), ext.CUDA_HOME
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    ext.CUDA_HOME = str(home)  # torch guesses it once at import, from nvcc on PATH (a wrapper script misleads it)
    try:
        _load("locbe_lattice_cuda_build", [src / "lattice_cpu.cpp", src / "lattice_cuda.cu"], cuda=True,
              build_directory=build_directory, verbose=verbose, is_python_module=False)
    finally:
        ext.CUDA_HOME = before[1]
        if before[0] is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = before[0]
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

    t0 = time.perf_counter()
    load_extension(cuda=False)
    print(f"CPU extension ready ({time.perf_counter() - t0:.1f} s)")
    if args.cuda:
        t0 = time.perf_counter()
        build_dir = args.build_dir or os.path.join(os.path.expanduser("~"), ".cache", "locbe", "cuda_build")
        lib = build_cuda(build_dir, args.archs, args.verbose)
        print(f"CUDA backend compiled and linked for {args.archs}: {lib} ({time.perf_counter() - t0:.1f} s)")
    return 0
