"""The regularized (dense-CRF) loss: permutohedral-lattice op (cuda/), autograd, loss module, references.

The op (torch) is imported on first use, so that ``locbe build-ext --help`` does not import torch."""

__all__ = ["RegularizedLoss", "lattice_filter"]


def __getattr__(name: str):
    if name in __all__:
        from locbe.regloss import op

        return getattr(op, name)
    raise AttributeError(f"module 'locbe.regloss' has no attribute {name!r}")
