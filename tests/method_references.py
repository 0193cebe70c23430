"""Plain references and input helpers shared by tests/test_cam.py, test_par.py and test_losses.py.

Every reference is written from the spec's formulas (python loops over pixels / classes / token pairs, float64)
and never calls the function under test. Thresholds: the CAMs are float32, so a comparison such as ``v <= 0.7``
is a float32 comparison; the references compare against the float32-rounded threshold (``_f32``), which makes
the boundary cases (values exactly at a threshold) exact instead of depending on double rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

IGNORE = 255


# ============================================================================ helpers
def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _f32(x: float) -> float:
    return float(np.float32(x))


def _rand(seed: int, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(*shape, generator=_gen(seed), dtype=dtype)


def _random_labels(seed: int, b: int, f: int) -> torch.Tensor:
    """Multi-hot (B, F) float labels; rows may be all zero (an image with no foreground class)."""
    return (torch.rand(b, f, generator=_gen(seed + 7)) < 0.5).float()


def _random_box(seed: int, h: int, w: int) -> tuple[int, int, int, int]:
    """A non-empty half-open box (y0, y1, x0, x1) inside an h x w image."""
    r = np.random.default_rng(seed)
    y0 = int(r.integers(0, h))
    y1 = int(r.integers(y0 + 1, h + 1))
    x0 = int(r.integers(0, w))
    x1 = int(r.integers(x0 + 1, w + 1))
    return y0, y1, x0, x1


def _snap_to_thresholds(cam: torch.Tensor, seed: int, values) -> torch.Tensor:
    """Put exact threshold values into one channel per pixel for ~1/3 of the pixels (boundary cases,
    never creating a tie between two channels)."""
    b, f, h, w = cam.shape
    r = np.random.default_rng(seed)
    out = cam.clone()
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if r.random() < 1 / 3:
                    out[i, int(r.integers(f)), y, x] = float(r.choice(values))
    return out


def ref_normalize(cam: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Per image and channel: subtract the spatial min, divide by (spatial max + eps)."""
    out = np.zeros_like(cam, dtype=np.float64)
    for i in range(cam.shape[0]):
        for c in range(cam.shape[1]):
            m = cam[i, c] - cam[i, c].min()
            out[i, c] = m / (m.max() + eps)
    return out


def ref_masked_max(cam: np.ndarray, y: np.ndarray, i: int, r: int, s: int) -> tuple[float, int]:
    """max_c y_c * cam_c and its (first) argmax at one pixel."""
    best, arg = -math.inf, 0
    for c in range(cam.shape[1]):
        v = float(y[i, c]) * float(cam[i, c, r, s])
        if v > best:
            best, arg = v, c
    return best, arg


def ref_box_inside(box, r: int, s: int) -> bool:
    y0, y1, x0, x1 = (int(v) for v in box)
    return y0 <= r < y1 and x0 <= s < x1


def ref_cam_to_label(cam: np.ndarray, y: np.ndarray, boxes=None, bkg_thre=0.5, high=0.7, low=0.25,
                     ignore_mid=False) -> np.ndarray:
    """method.md "Pseudo labels": 1 + argmax_c(y_c cam_c), 0 where the max <= bkg_thre; with ignore_mid
    255 where the max <= high, then 0 where it is <= low. Outside the valid box: 255."""
    b, _, h, w = cam.shape
    out = np.zeros((b, h, w), dtype=np.int64)
    for i in range(b):
        for r in range(h):
            for s in range(w):
                v, c = ref_masked_max(cam, y, i, r, s)
                lab = c + 1
                if v <= _f32(bkg_thre):
                    lab = 0
                if ignore_mid:
                    if v <= _f32(high):
                        lab = IGNORE
                    if v <= _f32(low):
                        lab = 0
                if boxes is not None and not boxes[i](r, s):
                    lab = IGNORE
                out[i, r, s] = lab
    return out


def _pixel_boxes(img_box: torch.Tensor):
    return [lambda r, s, bx=tuple(int(v) for v in box): ref_box_inside(bx, r, s) for box in img_box]


def ref_log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_multilabel_soft_margin(logits: np.ndarray, y: np.ndarray) -> float:
    """mean over images of mean over classes of -(y log s(x) + (1 - y) log s(-x))."""
    b, f = logits.shape
    total = 0.0
    for i in range(b):
        row = 0.0
        for c in range(f):
            x = float(logits[i, c])
            row -= float(y[i, c]) * ref_log_sigmoid(x) + (1 - float(y[i, c])) * ref_log_sigmoid(-x)
        total += row / f
    return total / b
