"""PAR: pixel-adaptive refinement (method.md "PAR"; from AFA/ToCo).

Eight neighbours per dilation (replicate padding), dilations (1, 2, 4, 8, 12, 24), 10 iterations.
Affinity over all neighbours k (48 here): softmax_k(a) + 0.01 * softmax_k(pos), with
a_k = mean_rgb(-(|I - I_k| / (std_k(I_k) + 1e-8) / 0.3)^2) and the same form on the neighbour
distances (1 or sqrt(2) times the dilation). Each iteration: mask <- sum_k aff_k * mask_k.

Two layouts with the same maths:
- ``low_memory=False`` materialises the neighbour stacks ``(B, C, K, H, W)`` of the masks every
  iteration, as the authors do;
- ``low_memory=True`` never builds a stack of the masks: it accumulates sum_k aff_k * shift_k(mask)
  one neighbour at a time, and computes the colour std with running moments. Peak memory is then
  about the (B, 1, K, H, W) affinity plus a few (B, C, H, W) maps instead of K of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# neighbour order of the authors' 3x3 kernel: row-major over the 3x3 window without its centre
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def shift(x: torch.Tensor, dy: int, dx: int, pad: int) -> torch.Tensor:
    """x[..., i + dy, j + dx] with replicate padding, from an input already padded by ``pad``."""
    h, w = x.shape[-2] - 2 * pad, x.shape[-1] - 2 * pad
    return x[..., pad + dy: pad + dy + h, pad + dx: pad + dx + w]


def offsets(dilations) -> list[tuple[int, int]]:
    return [(dy * d, dx * d) for d in dilations for dy, dx in NEIGHBOURS]


class PAR(nn.Module):
    def __init__(self, dilations=(1, 2, 4, 8, 12, 24), num_iter: int = 10, w_color: float = 0.3,
                 w_pos: float = 0.01, low_memory: bool = False):
        super().__init__()
        self.dilations = tuple(dilations)
        self.num_iter = num_iter
        self.w_color, self.w_pos = w_color, w_pos
        self.low_memory = low_memory
        dist = [d * (math.sqrt(2) if dy and dx else 1.0) for d in self.dilations for dy, dx in NEIGHBOURS]
        self.register_buffer("pos", torch.tensor(dist).view(1, 1, -1, 1, 1), persistent=False)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        p = max(self.dilations)
        return F.pad(x, [p] * 4, mode="replicate")

    def _neighbours(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, K, H, W) stack of every neighbour (the authors' layout)."""
        p = max(self.dilations)
        padded = self._pad(x)
        return torch.stack([shift(padded, dy, dx, p) for dy, dx in offsets(self.dilations)], dim=2)

    def _pos_softmax(self) -> torch.Tensor:
        # position term: same form as the colour term with std over the K neighbour distances (unbiased)
        pos_aff = -(self.pos / (self.pos.std(dim=2, keepdim=True) + 1e-8) / self.w_color) ** 2
        return F.softmax(pos_aff, dim=2)

    def affinity(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, K, H, W) affinity of each pixel to each neighbour."""
        if not self.low_memory:
            nb = self._neighbours(images)
            std = nb.std(dim=2, keepdim=True)
            a = -((nb - images.unsqueeze(2)).abs() / (std + 1e-8) / self.w_color) ** 2
            a = a.mean(dim=1, keepdim=True)
        else:
            p = max(self.dilations)
            padded = self._pad(images)
            offs = offsets(self.dilations)
            # unbiased std over K neighbours from running moments (shifted by the centre pixel for stability)
            s1 = torch.zeros_like(images)
            s2 = torch.zeros_like(images)
            for dy, dx in offs:
                diff = shift(padded, dy, dx, p) - images
                s1 += diff
                s2 += diff * diff
            k = len(offs)
            std = ((s2 - s1 * s1 / k).clamp_min(0) / (k - 1)).sqrt()
            del s1, s2
            a = torch.empty((images.shape[0], 1, k, *images.shape[-2:]), dtype=images.dtype, device=images.device)
            for i, (dy, dx) in enumerate(offs):
                d = (shift(padded, dy, dx, p) - images).abs()
                a[:, 0, i] = (-(d / (std + 1e-8) / self.w_color) ** 2).mean(dim=1)
        return F.softmax(a, dim=2) + self.w_pos * self._pos_softmax().to(a.dtype)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 3, H, W) de-normalised in [0, 1]; ``masks`` (B, C, h, w) class scores."""
        if masks.shape[-2:] != images.shape[-2:]:
            masks = F.interpolate(masks, size=images.shape[-2:], mode="bilinear", align_corners=True)
        aff = self.affinity(images)
        if not self.low_memory:
            for _ in range(self.num_iter):
                masks = (self._neighbours(masks) * aff).sum(dim=2)
            return masks
        p = max(self.dilations)
        offs = offsets(self.dilations)
        for _ in range(self.num_iter):
            padded = self._pad(masks)
            acc = torch.zeros_like(masks)
            for i, (dy, dx) in enumerate(offs):
                acc.addcmul_(shift(padded, dy, dx, p), aff[:, :, i])
            masks = acc
        return masks
