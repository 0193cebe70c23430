"""The lattice filter as a PyTorch custom op (the engine's Python side; the loss that uses it is
locbe/method/regloss.py).

``locbe::lattice_filter`` is defined in C++ (``TORCH_LIBRARY`` in cuda/lattice_cpu.cpp, CPU and CUDA kernels).
This module adds what torch.library wants from Python: a fake (meta) kernel, so that torch.compile and
FakeTensor tracing know the output without running it, and the autograd formula (``register_autograd``):
the VJP of W is W^T, the same op with the axis blurs in reverse order, so double backward works too.
"""

from __future__ import annotations

import torch

from locbe.lattice.build import load_extension
from locbe.lattice.checks import check_inputs

OP = "locbe::lattice_filter"
_registered = False


def _fake(image, values, sigma_xy, sigma_rgb, reverse=False, atomic_splat=False):
    torch._check(image.dim() == 4 and image.shape[1] == 3, lambda: "image must be (B, 3, H, W)")
    torch._check(values.dim() == 4, lambda: "values must be (B, K, H, W)")
    torch._check(values.dtype in (torch.float32, torch.float64), lambda: "values must be float32 or float64")
    return values.new_empty(values.shape)  # the kernel returns a contiguous tensor of values' dtype


def _setup_context(ctx, inputs, output):
    image, _, sigma_xy, sigma_rgb, reverse, atomic_splat = inputs
    ctx.save_for_backward(image)
    ctx.args = (sigma_xy, sigma_rgb, not reverse, atomic_splat)


def _backward(ctx, grad):
    (image,) = ctx.saved_tensors
    # W^T grad: each axis blur is symmetric, their product is not (they do not commute), so the transpose
    # blurs the axes in reverse order. Not differentiable in the image (the lattice is piecewise constant in it).
    return None, torch.ops.locbe.lattice_filter(image, grad, *ctx.args), None, None, None, None


def ops():
    """``torch.ops.locbe`` with the op library loaded (built on first use) and its Python parts registered."""
    global _registered
    namespace = load_extension()
    if not _registered:
        torch.library.register_fake(OP)(_fake)
        torch.library.register_autograd(OP, _backward, setup_context=_setup_context)
        _registered = True
    return namespace


def _filter(image_255, values, sigma_xy, sigma_rgb, transpose: bool = False, atomic_splat: bool = False):
    """The op without input checks. ``transpose`` gives W^T; ``atomic_splat`` forces the atomic scatter splat
    (CUDA's default) on the CPU too. Honours torch.use_deterministic_algorithms (ordered splat)."""
    return ops().lattice_filter(image_255, values, float(sigma_xy), float(sigma_rgb), transpose, atomic_splat)


def lattice_filter(image_255: torch.Tensor, values: torch.Tensor, sigma_xy: float = 50.0,
                   sigma_rgb: float = 15.0) -> torch.Tensor:
    """W S for all K channels at once (permutohedral lattice), differentiable in ``values``."""
    check_inputs(image_255, values, sigma_xy, sigma_rgb)
    return _filter(image_255, values, sigma_xy, sigma_rgb)
