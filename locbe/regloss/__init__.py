"""The regularized (dense-CRF) loss: permutohedral-lattice custom op ``locbe::lattice_filter`` (cuda/), its
autograd and fake kernels, the loss module, references."""

from locbe.regloss.build import ensure_loaded, load_extension
from locbe.regloss.op import RegularizedLoss, lattice_filter

__all__ = ["RegularizedLoss", "ensure_loaded", "lattice_filter", "load_extension"]
