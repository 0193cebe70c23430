"""The permutohedral-lattice engine: the custom ops ``locbe::lattice_filter``, ``lattice_build`` and
``lattice_apply`` (C++/CUDA sources in cuda/; ``Lattice`` builds once and applies many times), their build and
load, input checks, fake kernels and autograd, and the plain references they are tested against.

It serves the regularized loss (locbe/method/regloss.py) and the evaluation's dense CRF; it knows nothing of
either. May import: locbe.runtime and locbe.errors only. Everything is imported on first use, so that
``locbe build-ext --help`` does not import torch."""

_HOMES = {"lattice_filter": "op", "Lattice": "op", "image_features": "reference",
          "ensure_loaded": "build", "load_extension": "build"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"locbe.lattice.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'locbe.lattice' has no attribute {name!r}")
