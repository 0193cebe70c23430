"""The lattice filter as a PyTorch custom op, and the gated regularized (dense-CRF) loss of regloss.md.

``locbe::lattice_filter`` is defined in C++ (``TORCH_LIBRARY`` in cuda/lattice_cpu.cpp, CPU and CUDA kernels).
This module adds what torch.library wants from Python: a fake (meta) kernel, so that torch.compile and
FakeTensor tracing know the output without running it, and the autograd formula (``register_autograd``):
the VJP of W is W^T, the same op with the axis blurs in reverse order, so double backward works too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from locbe.regloss.build import load_extension
from locbe.regloss.checks import check_inputs

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


def _lattice(image_255, values, sigma_xy, sigma_rgb):
    return torch.ops.locbe.lattice_filter(image_255, values, sigma_xy, sigma_rgb)


def _serial(image_255, values, sigma_xy, sigma_rgb):
    out = torch.ops.locbe.lattice_filter_serial(image_255.cpu(), values.cpu(), sigma_xy, sigma_rgb)
    return out.to(device=values.device, dtype=values.dtype)


def _dense(image_255, values, sigma_xy, sigma_rgb):
    from locbe.regloss.reference import dense_filter

    return dense_filter(image_255, values, sigma_xy, sigma_rgb)


# "lattice": the compiled op; "serial": the plain one-channel-at-a-time lattice (same operator, slow);
# "dense": the exact Gaussian (a different operator: ~1/0.55 x larger values, see docs/regloss.md)
_BACKENDS = {"lattice": _lattice, "serial": _serial, "dense": _dense}


class RegularizedLoss(torch.nn.Module):
    """Gated dense-CRF loss (Tang et al. 2018) as LOC-BE uses it; ``forward`` returns the value before ``w_reg``.

    Inputs at full resolution: ``images_255`` (B,3,H,W) de-normalised 0..255, ``probs`` softmax (B,K,H,W),
    ``crop_mask`` (B,H,W) 1 inside the valid box, ``pseudo_label`` (B,H,W) or (B,1,H,W), 255 unlabelled.
    Everything is downscaled by ``scale_factor`` first (nearest; probs bilinear) and sigma_xy scaled with it.

    The gradient is the authors' surrogate (regloss.md step 5): dL/dS' = -2 w A / B with A = G (W S') held
    constant, times R, then through the downscale and whatever produced ``probs`` by autograd. It is written as
    ``value + (surrogate - surrogate.detach())`` with plain tensor ops, so torch.compile traces the whole loss,
    the op included, in one graph."""

    def __init__(self, weight: float = 1e-7, sigma_rgb: float = 15.0, sigma_xy: float = 100.0,
                 scale_factor: float = 0.5, backend: str = "lattice"):
        super().__init__()
        if backend not in _BACKENDS:
            raise ValueError(f"unknown regularized-loss backend {backend!r}; choose one of {sorted(_BACKENDS)}")
        self.weight, self.sigma_rgb, self.sigma_xy, self.scale_factor = weight, sigma_rgb, sigma_xy, scale_factor
        self.backend = backend
        if backend != "dense":
            ops()  # load (or build) the op now, not at the first call (which may be inside a compiled graph)

    def downsample(self, images_255, probs, crop_mask, pseudo_label):
        """The authors' inputs to the filter at ``scale_factor``: image and masks nearest, probabilities
        bilinear; returns (image, probs, crop mask, label, sigma_xy at that scale), checked."""
        if pseudo_label.dim() == 3:
            pseudo_label = pseudo_label.unsqueeze(1)
        s = self.scale_factor
        img = F.interpolate(images_255.float(), scale_factor=s, mode="nearest")
        small = F.interpolate(probs, scale_factor=s, mode="bilinear", align_corners=False)
        mask = F.interpolate(crop_mask.unsqueeze(1).to(small.dtype), scale_factor=s, mode="nearest").squeeze(1)
        label = F.interpolate(pseudo_label.float(), scale_factor=s, mode="nearest").squeeze(1)
        check_inputs(img, small, self.sigma_xy * s, self.sigma_rgb)
        return img, small, mask, label, self.sigma_xy * s

    def forward(self, images_255, probs, crop_mask, pseudo_label):
        img, small, mask, label, sigma_xy = self.downsample(images_255, probs, crop_mask, pseudo_label)
        b = small.shape[0]
        gate = mask - small.detach().amax(dim=1)
        gate = torch.where(label == 255, torch.ones_like(gate), gate).clamp_min(0).unsqueeze(1)
        s_masked = small * mask.unsqueeze(1)
        s_const = s_masked.detach()
        a = gate * _BACKENDS[self.backend](img, s_const, sigma_xy, self.sigma_rgb).to(s_const.dtype)
        value = self.weight * (-(s_const * a).sum() / b)
        surrogate = (-2.0 * self.weight / b) * (s_masked * a).sum()
        return value + (surrogate - surrogate.detach())
