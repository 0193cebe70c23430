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


def image_features(image_255: torch.Tensor, sigma_xy: float, sigma_rgb: float) -> torch.Tensor:
    """(B, N, 5) float32 features of the regularized loss's lattice, rounded exactly as the op computes them from
    the image (float32 x times float32 1/sigma): ``Lattice(image_features(...))`` is ``lattice_filter``'s lattice."""
    b, _, h, w = image_255.shape
    dev = image_255.device
    inv_xy = torch.tensor(1.0 / sigma_xy, dtype=torch.float32, device=dev)
    inv_rgb = torch.tensor(1.0 / sigma_rgb, dtype=torch.float32, device=dev)
    ys, xs = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    pos = torch.stack([xs.reshape(-1).float() * inv_xy, ys.reshape(-1).float() * inv_xy], dim=-1)
    rgb = image_255.float().reshape(b, 3, h * w).transpose(1, 2) * inv_rgb
    return torch.cat([pos.unsqueeze(0).expand(b, -1, -1), rgb], dim=-1).contiguous()


def plain_lattice(features, values, transpose: bool = False):
    """W values for one image by a plain permutohedral lattice (Adams et al. 2010, Kraehenbuehl's constants), written
    from the paper with Python loops, a dict of lattice points and float64 arithmetic: ``features`` (N, d) already
    divided by the standard deviations, ``values`` (K, N). Slow: for small N only (the tests' reference)."""
    import numpy as np

    f = np.asarray(features, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    n, d = f.shape
    scale = np.sqrt(2.0 / 3.0) * (d + 1) / np.sqrt(np.arange(1, d + 1) * np.arange(2, d + 2))
    points: dict = {}
    verts = np.zeros((n, d + 1), dtype=np.int64)
    bary = np.zeros((n, d + 1))
    for i in range(n):
        cf = f[i] * scale
        el = np.zeros(d + 1)  # E p: el[j] = sum_{t >= j} cf[t] - j cf[j-1]
        for j in range(d + 1):
            el[j] = cf[j:].sum() - (j * cf[j - 1] if j > 0 else 0.0)
        rem0 = np.array([int(np.floor(x / (d + 1) + 0.5)) * (d + 1) for x in el])
        diff = el - rem0
        rank = np.array([sum(1 for t in range(d + 1) if diff[t] > diff[j] or (diff[t] == diff[j] and t < j))
                         for j in range(d + 1)])
        s = int(rem0.sum()) // (d + 1)
        rank = rank + s
        for j in range(d + 1):
            if rank[j] < 0:
                rank[j] += d + 1
                rem0[j] += d + 1
            elif rank[j] > d:
                rank[j] -= d + 1
                rem0[j] -= d + 1
        b = np.zeros(d + 2)
        for j in range(d + 1):
            t = (el[j] - rem0[j]) / (d + 1)
            b[d - rank[j]] += t
            b[d - rank[j] + 1] -= t
        b[0] += 1.0 + b[d + 1]
        for r in range(d + 1):
            key = tuple(int(rem0[j] + (r if rank[j] <= d - r else r - (d + 1))) for j in range(d))
            verts[i, r] = points.setdefault(key, len(points))
            bary[i, r] = b[r]
    keys = list(points)
    lat = np.zeros((len(keys), v.shape[0]))
    for i in range(n):
        for r in range(d + 1):
            lat[verts[i, r]] += bary[i, r] * v[:, i]
    axes = range(d, -1, -1) if transpose else range(d + 1)
    for axis in axes:
        new = lat.copy()
        for idx, key in enumerate(keys):
            for sign in (1, -1):  # the neighbours: every coordinate -1 and the axis's +d, and the opposite
                nb = tuple(key[t] - sign + (sign * (d + 1) if t == axis else 0) for t in range(d))
                if nb in points:
                    new[idx] += 0.5 * lat[points[nb]]
        lat = new
    alpha = 1.0 / (1.0 + 2.0 ** (-d))
    out = np.zeros_like(v)
    for i in range(n):
        for r in range(d + 1):
            out[:, i] += alpha * bary[i, r] * lat[verts[i, r]]
    return out
