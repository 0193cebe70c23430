"""The regularized (dense-CRF) loss: permutohedral-lattice custom op ``locbe::lattice_filter`` (cuda/), its
autograd and fake kernels, the loss module, references.

Everything is imported on first use, so that ``locbe build-ext --help`` does not import torch."""

_HOMES = {"RegularizedLoss": "op", "lattice_filter": "op", "ensure_loaded": "build", "load_extension": "build"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"locbe.regloss.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'locbe.regloss' has no attribute {name!r}")
