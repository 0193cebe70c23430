"""locbe.method.par (PAR) against a plain loop reference written from method.md."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from method_references import _rand

from locbe.method.par import PAR


# ============================================================================ PAR
def ref_offsets(dilations):
    """(dy, dx, distance) of the 8 neighbours per dilation: distance 1 or sqrt(2) times the dilation."""
    return [(dy * d, dx * d, d * math.hypot(dy, dx)) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)
            if (dy, dx) != (0, 0)]


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max())
    return e / e.sum()


def ref_par(image: np.ndarray, masks: np.ndarray, dilations, num_iter: int, w_color=0.3, w_pos=0.01) -> np.ndarray:
    """method.md "PAR", one image, float64, loops over pixels and neighbours (replicate padding = clamped
    indices). a_k = mean_rgb -(|I - I_k| / (std_k(I_k) + 1e-8) / w)^2, pos_k = -(dist_k / (std_k(dist) + 1e-8)
    / w)^2, aff = softmax_k(a) + w_pos softmax_k(pos); mask <- sum_k aff_k mask_k, num_iter times.
    std is torch.std's (unbiased), as the authors' code."""
    _, h, w = image.shape
    offs = ref_offsets(dilations)
    dist = np.array([o[2] for o in offs])
    pos_sm = _softmax(-(dist / (dist.std(ddof=1) + 1e-8) / w_color) ** 2)

    def nbr(r, s, k):
        return min(max(r + offs[k][0], 0), h - 1), min(max(s + offs[k][1], 0), w - 1)

    aff = np.zeros((h, w, len(offs)))
    for r in range(h):
        for s in range(w):
            neigh = np.stack([image[:, nr, ns] for nr, ns in (nbr(r, s, k) for k in range(len(offs)))])  # (K, 3)
            std = neigh.std(axis=0, ddof=1)
            a = (-(np.abs(neigh - image[:, r, s]) / (std + 1e-8) / w_color) ** 2).mean(axis=1)
            aff[r, s] = _softmax(a) + w_pos * pos_sm
    m = masks.astype(np.float64)
    for _ in range(num_iter):
        new = np.zeros_like(m)
        for r in range(h):
            for s in range(w):
                for k in range(len(offs)):
                    nr, ns = nbr(r, s, k)
                    new[:, r, s] += aff[r, s, k] * m[:, nr, ns]
        m = new
    return m


def ref_resize_align_corners(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear, align_corners=True, (C, h_in, w_in) -> (C, h, w)."""
    _, hi, wi = x.shape
    out = np.zeros((x.shape[0], h, w))
    for r in range(h):
        sy = r * (hi - 1) / (h - 1) if h > 1 else 0.0
        y0 = min(int(math.floor(sy)), hi - 1)
        y1, fy = min(y0 + 1, hi - 1), sy - y0
        for s in range(w):
            sx = s * (wi - 1) / (w - 1) if w > 1 else 0.0
            x0 = min(int(math.floor(sx)), wi - 1)
            x1, fx = min(x0 + 1, wi - 1), sx - x0
            out[:, r, s] = ((1 - fy) * ((1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1])
                            + fy * ((1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]))
    return out


dilation_sets = st.sampled_from([(1,), (1, 2), (2, 3), (1, 2, 4, 8, 12, 24)])


@settings(max_examples=25)
@given(b=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(2, 7), w=st.integers(2, 7), dil=dilation_sets,
       num_iter=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_par_plain_matches_loop_reference(b, c, h, w, dil, num_iter, seed):
    images = _rand(seed, b, 3, h, w, dtype=torch.float64)
    masks = _rand(seed + 1, b, c, h, w, dtype=torch.float64).softmax(dim=1)
    got = PAR(dilations=dil, num_iter=num_iter, low_memory=False)(images, masks)
    for i in range(b):
        want = ref_par(images[i].numpy(), masks[i].numpy(), dil, num_iter)
        # float64 run; the module's positional softmax is float32 (1e-7 rel, times w_pos=0.01)
        np.testing.assert_allclose(got[i].numpy(), want, rtol=1e-7, atol=1e-8)


def test_par_defaults_match_loop_reference_float32():
    # the training configuration: 6 dilations, 10 iterations, float32
    par = PAR()
    assert par.dilations == (1, 2, 4, 8, 12, 24) and par.num_iter == 10
    images = _rand(11, 1, 3, 9, 10)
    masks = _rand(12, 1, 3, 9, 10).softmax(dim=1)
    got = par(images, masks)[0].double().numpy()
    want = ref_par(images[0].double().numpy(), masks[0].double().numpy(), (1, 2, 4, 8, 12, 24), 10)
    # aff rows sum to 1.01, so 10 iterations scale masks by ~1.1; float32 accumulation over 48 x 10 terms
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_par_resizes_masks_with_align_corners_true():
    images = _rand(21, 1, 3, 7, 9, dtype=torch.float64)
    masks = _rand(22, 1, 2, 3, 4, dtype=torch.float64)
    got = PAR(dilations=(1, 2), num_iter=2)(images, masks)[0].numpy()
    want = ref_par(images[0].numpy(), ref_resize_align_corners(masks[0].numpy(), 7, 9), (1, 2), 2)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-8)


@settings(max_examples=25)
@given(b=st.integers(1, 2), c=st.integers(1, 4), h=st.integers(2, 24), w=st.integers(2, 24), dil=dilation_sets,
       num_iter=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_par_low_memory_equals_plain(b, c, h, w, dil, num_iter, seed):
    images = _rand(seed, b, 3, h, w)
    masks = _rand(seed + 1, b, c, h, w).softmax(dim=1)
    plain = PAR(dilations=dil, num_iter=num_iter, low_memory=False)(images, masks)
    low = PAR(dilations=dil, num_iter=num_iter, low_memory=True)(images, masks)
    # Same maths, float32: the layouts differ only in summation order (neighbour-stack sum vs running addcmul)
    # and in the std (two-pass torch.std vs moments of the centre-shifted differences). Measured against a
    # float64 run (default PAR, 40 random images up to 40x40), EACH layout is up to ~6e-6 relative off, the
    # rounding of exp(a) with |a| = O(100) over 10 iterations; so their difference is bounded by ~1.2e-5.
    torch.testing.assert_close(low, plain, rtol=2e-5, atol=1e-6)
    # in float64 the rounding vanishes and the two layouts must agree to ~1e-12: the maths is identical
    plain64 = PAR(dilations=dil, num_iter=num_iter, low_memory=False)(images.double(), masks.double())
    low64 = PAR(dilations=dil, num_iter=num_iter, low_memory=True)(images.double(), masks.double())
    torch.testing.assert_close(low64, plain64, rtol=1e-10, atol=1e-12)
