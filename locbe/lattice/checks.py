"""Input validation shared by the op (op.py) and the references (reference.py)."""

from __future__ import annotations

import math

import torch

MAX_FEATURE = 1300  # packed lattice keys (cuda/lattice_serial.h) hold coordinates of features up to ~1380


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
    if torch.compiler.is_compiling():  # the value checks below read data: skipped inside a compiled graph
        return
    # min/max propagate NaN and expose inf without the full-size temporaries of isfinite(). Only the image (3
    # channels) is read here; the kernel finds non-finite values in its M x K lattice sums (a pass over S here
    # would cost as much as a tenth of the op).
    lo, hi = (float(v) for v in torch.aminmax(image_255.detach())) if image_255.numel() else (0.0, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("image must be finite (found NaN or inf)")
    # the lattice coordinates must fit the keys (int16; 12-bit fields in the CPU's packed keys)
    colour = max(abs(lo), abs(hi)) / sigma_rgb
    largest = max(max(values.shape[2:]) / sigma_xy, colour)
    if largest > MAX_FEATURE:
        raise ValueError(f"sigmas too small for this input: the largest feature value {largest:.0f} exceeds "
                         f"{MAX_FEATURE} (lattice coordinates would overflow); increase sigma_xy/sigma_rgb")
