"""The lattice filter as an autograd op, and the gated regularized (dense-CRF) loss of regloss.md."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_FEATURE = 2000  # |elevated coordinate| <= ~14 x the largest feature; 14 * 2000 < 32767 (int16 keys)


def check_inputs(image_255: torch.Tensor, values: torch.Tensor, sigma_xy: float, sigma_rgb: float) -> None:
    if not torch.is_tensor(image_255) or not torch.is_tensor(values):
        raise TypeError("image and values must be torch tensors")
    if image_255.dim() != 4 or image_255.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image_255.shape)}")
    if values.dim() != 4:
        raise ValueError(f"values must be (B, K, H, W), got {tuple(values.shape)}")
    if values.shape[1] == 0:
        raise ValueError("values have K = 0 channels")
    if image_255.shape[0] != values.shape[0] or image_255.shape[2:] != values.shape[2:]:
        raise ValueError(f"image {tuple(image_255.shape)} and values {tuple(values.shape)} differ in batch or size")
    if image_255.device != values.device:
        raise ValueError(f"image is on {image_255.device} but values on {values.device}")
    if not values.is_floating_point() or values.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"values must be float32 or float64, got {values.dtype}")
    if not image_255.is_floating_point():
        raise TypeError(f"image must be a floating tensor in 0..255, got {image_255.dtype}")
    for name, s in (("sigma_xy", sigma_xy), ("sigma_rgb", sigma_rgb)):
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
            raise ValueError(f"{name} must be a finite positive number, got {s!r}")
    # min/max propagate NaN and expose inf without the full-size temporaries of isfinite()
    ranges = [tuple(float(v) for v in torch.aminmax(t.detach())) if t.numel() else (0.0, 0.0)
              for t in (image_255, values)]
    if not all(math.isfinite(v) for r in ranges for v in r):
        raise ValueError("image and values must be finite (found NaN or inf)")
    # lattice keys are int16: the elevated coordinates must stay below 2^15
    colour = max(abs(v) for v in ranges[0]) / sigma_rgb
    largest = max(max(values.shape[2:]) / sigma_xy, colour)
    if largest > MAX_FEATURE:
        raise ValueError(f"sigmas too small for this input: the largest feature value {largest:.0f} exceeds "
                         f"{MAX_FEATURE} (lattice coordinates would overflow); increase sigma_xy/sigma_rgb")


def _filter(image_255, values, sigma_xy, sigma_rgb, transpose: bool = False, atomic_splat: bool = False):
    """The raw kernel call. ``transpose`` gives W^T; ``atomic_splat`` forces the scatter splat (CUDA's default)."""
    from locbe.regloss.build import load_extension

    ext = load_extension(cuda=values.is_cuda)
    deterministic = torch.are_deterministic_algorithms_enabled()
    return ext.lattice_filter(image_255.detach().float().contiguous(), values.contiguous(), float(sigma_xy),
                              float(sigma_rgb), deterministic, transpose, atomic_splat and not deterministic)


class _LatticeFilter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image_255, values, sigma_xy, sigma_rgb):
        ctx.save_for_backward(image_255)
        ctx.sigmas = (sigma_xy, sigma_rgb)
        return _filter(image_255, values, sigma_xy, sigma_rgb)

    @staticmethod
    def backward(ctx, grad):
        (image_255,) = ctx.saved_tensors
        # vector-Jacobian product W^T grad: the same lattice with the axis blurs in reverse order (each
        # axis blur is symmetric; their product is symmetric up to their order, which does not commute)
        return None, _filter(image_255, grad.contiguous(), *ctx.sigmas, transpose=True), None, None


def lattice_filter(image_255: torch.Tensor, values: torch.Tensor, sigma_xy: float = 50.0,
                   sigma_rgb: float = 15.0) -> torch.Tensor:
    """W S for all K channels at once (permutohedral lattice), differentiable in ``values``."""
    check_inputs(image_255, values, sigma_xy, sigma_rgb)
    return _LatticeFilter.apply(image_255, values, sigma_xy, sigma_rgb)


class _GatedRegLoss(torch.autograd.Function):
    """Forward value and the authors' surrogate backward (regloss.md steps 2-5) at the filtered scale."""

    @staticmethod
    def forward(ctx, image_255, probs, crop_mask, pseudo_label, weight, sigma_xy, sigma_rgb, backend):
        b = probs.shape[0]
        gate = crop_mask - probs.detach().max(dim=1).values
        gate = torch.where(pseudo_label == 255, torch.ones_like(gate), gate).clamp_min(0).unsqueeze(1)
        s_masked = probs.detach() * crop_mask.unsqueeze(1)
        a = gate * _BACKENDS[backend](image_255, s_masked, sigma_xy, sigma_rgb).to(s_masked.dtype)
        ctx.save_for_backward(a, crop_mask)
        ctx.scale = -2.0 * weight / b
        return weight * (-(s_masked * a).sum() / b)

    @staticmethod
    def backward(ctx, grad_out):
        a, crop_mask = ctx.saved_tensors
        grad = ctx.scale * a * grad_out * crop_mask.unsqueeze(1)
        return None, grad, None, None, None, None, None, None


def _serial(image_255, values, sigma_xy, sigma_rgb):
    from locbe.regloss.reference import serial_lattice_filter

    return serial_lattice_filter(image_255, values, sigma_xy, sigma_rgb).to(values.device)


def _dense(image_255, values, sigma_xy, sigma_rgb):
    from locbe.regloss.reference import dense_filter

    return dense_filter(image_255, values, sigma_xy, sigma_rgb)


# "lattice": the compiled op; "serial": the plain one-channel-at-a-time lattice (same operator, slow);
# "dense": the exact Gaussian (a different operator: ~1/0.55 x larger values, see docs/regloss.md)
_BACKENDS = {"lattice": _filter, "serial": _serial, "dense": _dense}


class RegularizedLoss(torch.nn.Module):
    """Gated dense-CRF loss (Tang et al. 2018) as LOC-BE uses it; ``forward`` returns the value before ``w_reg``.

    Inputs at full resolution: ``images_255`` (B,3,H,W) de-normalised 0..255, ``probs`` softmax (B,K,H,W),
    ``crop_mask`` (B,H,W) 1 inside the valid box, ``pseudo_label`` (B,H,W) or (B,1,H,W), 255 unlabelled.
    Everything is downscaled by ``scale_factor`` first (nearest; probs bilinear) and sigma_xy scaled with it."""

    def __init__(self, weight: float = 1e-7, sigma_rgb: float = 15.0, sigma_xy: float = 100.0,
                 scale_factor: float = 0.5, backend: str = "lattice"):
        super().__init__()
        if backend not in _BACKENDS:
            raise ValueError(f"unknown regularized-loss backend {backend!r}; choose one of {sorted(_BACKENDS)}")
        self.weight, self.sigma_rgb, self.sigma_xy, self.scale_factor = weight, sigma_rgb, sigma_xy, scale_factor
        self.backend = backend

    def forward(self, images_255, probs, crop_mask, pseudo_label):
        if pseudo_label.dim() == 3:
            pseudo_label = pseudo_label.unsqueeze(1)
        s = self.scale_factor
        img = F.interpolate(images_255.float(), scale_factor=s, mode="nearest")
        small = F.interpolate(probs, scale_factor=s, mode="bilinear", align_corners=False)
        mask = F.interpolate(crop_mask.unsqueeze(1).to(small.dtype), scale_factor=s, mode="nearest").squeeze(1)
        label = F.interpolate(pseudo_label.float(), scale_factor=s, mode="nearest").squeeze(1)
        check_inputs(img, small, self.sigma_xy * s, self.sigma_rgb)
        return _GatedRegLoss.apply(img, small, mask, label, self.weight, self.sigma_xy * s, self.sigma_rgb,
                                   self.backend)
