"""The permutohedral-lattice engine: the custom op ``locbe::lattice_filter`` (C++/CUDA sources in cuda/), its
build and load, input checks, fake kernel and autograd, the plain references it is tested against, and the
authors' host layout for benchmarks.

It serves the regularized loss (locbe/method/regloss.py) and the evaluation's dense CRF; it knows nothing of
either. May import: locbe.runtime and locbe.errors only. Everything is imported on first use, so that
``locbe build-ext --help`` does not import torch."""

_HOMES = {"lattice_filter": "op", "Lattice": "op", "build_lattice": "op", "image_features": "reference",
          "ensure_loaded": "build", "load_extension": "build"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"locbe.lattice.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'locbe.lattice' has no attribute {name!r}")
