"""The regularized (dense-CRF) loss: permutohedral-lattice op (cuda/), autograd, loss module, references."""

from locbe.regloss.op import RegularizedLoss, lattice_filter

__all__ = ["RegularizedLoss", "lattice_filter"]
