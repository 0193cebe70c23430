"""References for the lattice filter: the plain serial lattice (C++, one channel at a time) and the
exact dense O(N^2) Gaussian filter (PyTorch, tiled, float64-capable).

The lattice approximates the Gaussian only up to a scale and a few per cent of shape error
(regloss.md: ~0.60 x exact, 6-7 % relative L2 on a photo); tests measure and bound both.
"""

from __future__ import annotations

import torch

from locbe.lattice.checks import check_inputs


def serial_lattice_filter(image_255: torch.Tensor, values: torch.Tensor, sigma_xy: float, sigma_rgb: float,
                          transpose: bool = False):
    """W S (or W^T S) by the plain serial lattice (float64 accumulation); CPU tensors."""
    from locbe.lattice.build import load_extension

    check_inputs(image_255, values, sigma_xy, sigma_rgb)
    return load_extension().lattice_filter_serial(image_255.cpu(), values.cpu(), float(sigma_xy), float(sigma_rgb),
                                                  transpose)


def features(image_255: torch.Tensor, sigma_xy: float, sigma_rgb: float, dtype=torch.float64) -> torch.Tensor:
    """(B, N, 5) features (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb), x = column, y = row."""
    b, _, h, w = image_255.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    pos = torch.stack([xs, ys], dim=-1).reshape(1, h * w, 2).expand(b, -1, -1) / sigma_xy
    rgb = image_255.to(dtype).reshape(b, 3, h * w).transpose(1, 2) / sigma_rgb
    return torch.cat([pos.to(image_255.device), rgb], dim=-1)


def dense_filter(image_255: torch.Tensor, values: torch.Tensor, sigma_xy: float, sigma_rgb: float,
                 dtype=torch.float64, tile: int = 2048) -> torch.Tensor:
    """Exact sum_j exp(-|f_i - f_j|^2 / 2) S_j, including j = i, in tiles of ``tile`` rows."""
    check_inputs(image_255, values, sigma_xy, sigma_rgb)
    b, k, h, w = values.shape
    f = features(image_255, sigma_xy, sigma_rgb, dtype)
    v = values.to(dtype).reshape(b, k, h * w).transpose(1, 2)  # (B, N, K)
    out = torch.empty_like(v)
    for start in range(0, h * w, tile):
        block = f[:, start:start + tile]
        d2 = torch.cdist(block, f).pow(2)
        out[:, start:start + tile] = torch.bmm(torch.exp(-0.5 * d2), v)
    return out.transpose(1, 2).reshape(b, k, h, w)
