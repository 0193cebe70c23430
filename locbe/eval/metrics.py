"""Segmentation and classification metrics.

mIoU follows the authors' (ToCo) ``scores()``: one confusion matrix over the whole split, 255
ignored, IoU averaged over the classes that occur in the ground truth of the split (a class that
is absent from the ground truth is excluded, even if it is predicted).
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE = 255


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int = IGNORE):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # rows: ground truth

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> ConfusionMatrix:
        pred, gt = torch.as_tensor(pred).reshape(-1).long().cpu(), torch.as_tensor(gt).reshape(-1).long().cpu()
        if pred.shape != gt.shape:
            raise ValueError(f"prediction has {pred.numel()} pixels, ground truth {gt.numel()}")
        keep = gt != self.ignore_index
        pred, gt = pred[keep], gt[keep]
        if len(gt) and (gt.max() >= self.num_classes or gt.min() < 0):
            raise ValueError(f"ground truth holds labels outside [0, {self.num_classes}) and {self.ignore_index}")
        if len(pred) and (pred.max() >= self.num_classes or pred.min() < 0):
            raise ValueError(f"prediction holds labels outside [0, {self.num_classes})")
        n = self.num_classes
        self.matrix += torch.bincount(gt * n + pred, minlength=n * n).view(n, n)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        self.matrix += other.matrix
        return self

    def compute(self) -> dict:
        m = self.matrix.double()
        tp = m.diag()
        gt_count, pred_count = m.sum(1), m.sum(0)
        present = gt_count > 0
        union = gt_count + pred_count - tp
        iou = torch.where(present, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        acc_cls = torch.where(present, tp / gt_count.clamp_min(1), torch.full_like(tp, float("nan")))
        total = m.sum()
        return {
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
            "mean_acc": float(acc_cls[present].mean()) if present.any() else float("nan"),
            "iou": iou.tolist(),
            "num_pixels": int(total),
        }


def multilabel_f1(pred: np.ndarray, target: np.ndarray) -> dict:
    """Micro and macro F1 of 0/1 multi-label predictions (N, F); macro over classes with any positive."""
    pred, target = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
    tp = (pred & target).sum(0).astype(float)
    fp = (pred & ~target).sum(0).astype(float)
    fn = (~pred & target).sum(0).astype(float)
    denom = 2 * tp + fp + fn
    per_class = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    micro_denom = 2 * tp.sum() + fp.sum() + fn.sum()
    return {"micro_f1": float(2 * tp.sum() / micro_denom) if micro_denom else float("nan"),
            "macro_f1": float(np.nanmean(per_class[target.sum(0) > 0])) if target.any() else float("nan"),
            "per_class_f1": per_class.tolist()}
