"""Loss terms of LOC-BE (method.md "Losses"); the regularized loss lives in locbe.method.regloss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = 255


def cls_loss(logits: torch.Tensor, cls_label: torch.Tensor) -> torch.Tensor:
    """Multilabel soft-margin loss (main head with GMP, aux head, and BE's hybrid-pooled head)."""
    return F.multilabel_soft_margin_loss(logits, cls_label)


be_loss = cls_loss  # BE: the erased view's hybrid-pooled logits against the image labels


def _ce_or_zero(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE over non-ignored pixels; 0 (not NaN, as torch's mean over nothing gives) when there are none."""
    if not (target != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=IGNORE)


def seg_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Balanced CE: 0.5 * (CE over pixels labelled 0 + CE over pixels labelled > 0); 255 ignored.

    ``logits`` must already be at the label's size (the step upsamples bilinearly)."""
    label = label.long()
    bg = torch.where(label == 0, label, torch.full_like(label, IGNORE))
    fg = torch.where(label == 0, torch.full_like(label, IGNORE), label)
    return 0.5 * (_ce_or_zero(logits, bg) + _ce_or_zero(logits, fg))


def patch_contrast_loss(tokens: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """ToCo's masked patch-token contrast (sc).

    M_ij = [l_i == l_j] over the patches of each image, rows/cols of 255 and the diagonal ignored;
    S = |cos| between final patch tokens;
    sc = 0.5 * (1 - sum(M=1 * S) / (#(M=1) + 1)) + 0.5 * sum(M=0 * S) / (#(M=0) + 1), sums over the batch."""
    b, d, h, w = tokens.shape
    x = F.normalize(tokens.reshape(b, d, h * w), dim=1, eps=1e-8)
    sim = torch.bmm(x.transpose(1, 2), x).abs()  # (B, N, N)
    lab = label.reshape(b, h * w)
    valid = (lab != IGNORE)
    pair_valid = valid[:, :, None] & valid[:, None, :]
    pair_valid &= ~torch.eye(h * w, dtype=torch.bool, device=tokens.device)
    same = (lab[:, :, None] == lab[:, None, :]) & pair_valid
    diff = ~(lab[:, :, None] == lab[:, None, :]) & pair_valid
    pos = (sim * same).sum() / (same.sum() + 1)
    neg = (sim * diff).sum() / (diff.sum() + 1)
    return 0.5 * (1 - pos) + 0.5 * neg


def loc_loss(global_token: torch.Tensor, local_token: torch.Tensor, cls_label: torch.Tensor) -> torch.Tensor:
    """LOC term for one crop, with the authors' broadcast of pairwise_distance.

    d[j, c] = sqrt(sum_i (g[j, c] - l[i, c] + 1e-6)^2) over the batch index i of the local tokens;
    p = mean(y); loss = p * mean(d^2) + (1 - p) * mean(relu(1 - d)^2)."""
    diff = global_token[:, None, :] - local_token[None, :, :] + 1e-6  # (B_g, B_l, D)
    d = diff.pow(2).sum(dim=1).sqrt()  # (B, D)
    p = cls_label.float().mean()
    return p * d.pow(2).mean() + (1 - p) * F.relu(1 - d).pow(2).mean()
