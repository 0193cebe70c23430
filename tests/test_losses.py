"""locbe.method.losses against plain references written from method.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from method_references import IGNORE, _gen, _random_labels, ref_multilabel_soft_margin

from locbe.method import losses


# ============================================================================ losses
@settings(max_examples=40)
@given(b=st.integers(1, 4), f=st.integers(1, 6), scale=st.sampled_from([0.1, 3.0, 30.0]), seed=st.integers(0, 2**16))
def test_cls_and_be_loss_are_multilabel_soft_margin(b, f, scale, seed):
    logits = (torch.randn(b, f, generator=_gen(seed)) * scale).double()
    y = _random_labels(seed, b, f).double()
    want = ref_multilabel_soft_margin(logits.numpy(), y.numpy())
    assert losses.cls_loss(logits, y).item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert losses.be_loss(logits, y).item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def ref_seg_loss(logits: np.ndarray, label: np.ndarray) -> float:
    """0.5 * (mean CE over pixels labelled 0 + mean CE over pixels labelled 1..C-1); 255 ignored; a group
    with no pixel contributes 0 (locbe's documented fallback; torch's mean over nothing is NaN)."""
    bg, fg = [], []
    b, _, h, w = logits.shape
    for i in range(b):
        for r in range(h):
            for s in range(w):
                lab = int(label[i, r, s])
                if lab == IGNORE:
                    continue
                z = logits[i, :, r, s]
                ce = float(np.log(np.exp(z - z.max()).sum()) + z.max() - z[lab])
                (bg if lab == 0 else fg).append(ce)
    mean = lambda v: sum(v) / len(v) if v else 0.0
    return 0.5 * (mean(bg) + mean(fg))


@settings(max_examples=40)
@given(b=st.integers(1, 3), c=st.integers(2, 5), h=st.integers(1, 6), w=st.integers(1, 6),
       p=st.sampled_from([(0.3, 0.3), (0.0, 0.5), (0.5, 0.0), (0.0, 0.0), (0.1, 0.1)]), seed=st.integers(0, 2**16))
def test_seg_loss_balanced_ce(b, c, h, w, p, seed):
    p_bg, p_ign = p  # (share of background, share of ignore): includes no-bg, no-fg and all-ignore maps
    g = _gen(seed)
    logits = torch.randn(b, c, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.rand(b, h, w, generator=g)
    label = torch.randint(1, c, (b, h, w), generator=g)
    label[u < p_bg] = 0
    label[u > 1 - p_ign] = IGNORE
    if p == (0.0, 0.0) and seed % 2:
        label[:] = IGNORE  # all-ignore
    got = losses.seg_loss(logits, label)
    assert got.item() == pytest.approx(ref_seg_loss(logits.detach().numpy(), label.numpy()), rel=1e-10, abs=1e-12)
    got.backward()
    assert torch.isfinite(logits.grad).all()


def test_seg_loss_weights_background_and_foreground_halves_equally():
    # 1 background pixel and 3 foreground pixels: the lone background pixel carries half the loss
    logits = torch.zeros(1, 3, 1, 4, dtype=torch.float64)
    logits[0, 1, 0, 0] = 2.0  # background pixel predicted as class 1: CE = log(e^2 + 2) - 0
    label = torch.tensor([[[0, 1, 2, 255]]])
    ce_bg = math.log(math.exp(2) + 2)
    ce_fg = math.log(3)
    assert losses.seg_loss(logits, label).item() == pytest.approx(0.5 * ce_bg + 0.5 * ce_fg, rel=1e-12)
    all_ignore = losses.seg_loss(logits.requires_grad_(), torch.full((1, 1, 4), IGNORE))
    assert all_ignore.item() == 0.0
    all_ignore.backward()
    assert torch.isfinite(logits.grad).all()


def ref_patch_contrast(tokens: np.ndarray, label: np.ndarray) -> float:
    """ToCo sc, double loop over token pairs of each image; sums over the batch."""
    b, d, h, w = tokens.shape
    pos = neg = 0.0
    npos = nneg = 0
    for i in range(b):
        t = tokens[i].reshape(d, h * w)
        lab = label[i].reshape(h * w)
        for p in range(h * w):
            for q in range(h * w):
                if p == q or lab[p] == IGNORE or lab[q] == IGNORE:
                    continue
                u = t[:, p] / max(np.linalg.norm(t[:, p]), 1e-8)
                v = t[:, q] / max(np.linalg.norm(t[:, q]), 1e-8)
                s = abs(float(u @ v))
                if lab[p] == lab[q]:
                    pos, npos = pos + s, npos + 1
                else:
                    neg, nneg = neg + s, nneg + 1
    return 0.5 * (1 - pos / (npos + 1)) + 0.5 * neg / (nneg + 1)


@settings(max_examples=40)
@given(b=st.integers(1, 3), d=st.integers(1, 6), h=st.integers(1, 4), w=st.integers(1, 4),
       p_ign=st.sampled_from([0.0, 0.3, 1.0]), zero_token=st.booleans(), seed=st.integers(0, 2**16))
def test_patch_contrast_loss_matches_pair_loop(b, d, h, w, p_ign, zero_token, seed):
    g = _gen(seed)
    tokens = torch.randn(b, d, h, w, generator=g, dtype=torch.float64)
    if zero_token:
        tokens[0, :, 0, 0] = 0.0  # normalisation eps: a zero token has cos 0 with everything, no NaN
    label = torch.randint(0, 3, (b, h, w), generator=g)
    label[torch.rand(b, h, w, generator=g) < p_ign] = IGNORE
    got = losses.patch_contrast_loss(tokens, label)
    want = ref_patch_contrast(tokens.numpy(), label.numpy())
    assert math.isfinite(got.item())
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_patch_contrast_loss_all_ignore_is_finite():
    tokens = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = losses.patch_contrast_loss(tokens, torch.full((2, 3, 3), IGNORE))
    assert loss.item() == pytest.approx(0.5)  # no pair: 0.5 * (1 - 0 / 1) + 0.5 * 0 / 1
    loss.backward()
    assert torch.isfinite(tokens.grad).all()


def ref_loc_loss(g: np.ndarray, l: np.ndarray, y: np.ndarray) -> float:
    """d[j, c] = sqrt(sum_i (g[j, c] - l[i, c] + 1e-6)^2); p = mean(y);
    loss = p * mean(d^2) + (1 - p) * mean(relu(1 - d)^2)."""
    bg, dim = g.shape
    d = np.zeros((bg, dim))
    for j in range(bg):
        for c in range(dim):
            d[j, c] = math.sqrt(sum((g[j, c] - l[i, c] + 1e-6) ** 2 for i in range(l.shape[0])))
    p = float(y.mean())
    pull = sum(d[j, c] ** 2 for j in range(bg) for c in range(dim)) / d.size
    push = sum(max(1 - d[j, c], 0.0) ** 2 for j in range(bg) for c in range(dim)) / d.size
    return p * pull + (1 - p) * push


@settings(max_examples=40)
@given(b=st.integers(1, 4), dim=st.integers(1, 8), f=st.integers(1, 5), scale=st.sampled_from([0.05, 1.0]),
       y_kind=st.sampled_from(["random", "zeros", "ones"]), seed=st.integers(0, 2**16))
def test_loc_loss_matches_reference(b, dim, f, scale, y_kind, seed):
    g = _gen(seed)
    glob = torch.randn(b, dim, generator=g, dtype=torch.float64) * scale
    loc = torch.randn(b, dim, generator=g, dtype=torch.float64) * scale
    y = {"random": _random_labels(seed, b, f), "zeros": torch.zeros(b, f), "ones": torch.ones(b, f)}[y_kind]
    got = losses.loc_loss(glob, loc, y)
    want = ref_loc_loss(glob.numpy(), loc.numpy(), y.numpy())
    # p = mean(y) is taken in float32 by loc_loss (labels are float32 in training): ~1e-7 relative
    assert got.item() == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_loc_loss_identical_tokens_is_finite_with_gradient():
    # the +1e-6 keeps sqrt away from 0, so identical global and local tokens still give finite gradients
    g = torch.ones(1, 3, requires_grad=True)
    loss = losses.loc_loss(g, g.detach().clone(), torch.tensor([[1.0, 0.0]]))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(g.grad).all()
