"""The gated regularized (dense-CRF) loss of regloss.md, LOC-BE's use of the lattice engine (locbe/lattice)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from locbe.lattice.checks import check_inputs
from locbe.lattice.op import ops


def _lattice(image_255, values, sigma_xy, sigma_rgb):
    return torch.ops.locbe.lattice_filter(image_255, values, sigma_xy, sigma_rgb)


def _serial(image_255, values, sigma_xy, sigma_rgb):
    out = torch.ops.locbe.lattice_filter_serial(image_255.cpu(), values.cpu(), sigma_xy, sigma_rgb)
    return out.to(device=values.device, dtype=values.dtype)


def _dense(image_255, values, sigma_xy, sigma_rgb):
    from locbe.lattice.reference import dense_filter

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
