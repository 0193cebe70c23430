"""locbe.method.cam against plain references written from method.md (helpers: tests/method_references.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from method_references import (
    IGNORE,
    _f32,
    _gen,
    _pixel_boxes,
    _rand,
    _random_box,
    _random_labels,
    _snap_to_thresholds,
    ref_box_inside,
    ref_cam_to_label,
    ref_masked_max,
    ref_normalize,
)

from locbe.data.classes import IMAGENET_MEAN, denormalize
from locbe.method import cam as camlib
from locbe.method.par import PAR

# ============================================================================ normalize / partition / labels
shape_bfhw = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 7), st.integers(1, 7))


@settings(max_examples=40)
@given(shape=shape_bfhw, seed=st.integers(0, 2**16), constant=st.booleans())
def test_normalize_cam_matches_reference(shape, seed, constant):
    cam = _rand(seed, *shape) * 5 - 1
    if constant:  # a flat channel must map to 0, not NaN
        cam[0, 0] = 3.0
    got = camlib.normalize_cam(cam)
    want = ref_normalize(cam.double().numpy())
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)
    if constant:
        assert (got[0, 0] == 0).all()


@settings(max_examples=40)
@given(shape=shape_bfhw, seed=st.integers(0, 2**16), th=st.sampled_from([(0.25, 0.7), (0.25, 0.65), (0.3, 0.5)]))
def test_region_partition_matches_reference(shape, seed, th):
    low, high = th
    y = _random_labels(seed, shape[0], shape[1])
    aux = _snap_to_thresholds(_rand(seed, *shape), seed, [low, high, 0.0, 1.0])
    got = camlib.region_partition(aux, y, low=low, high=high)
    a, yy = aux.double().numpy(), y.numpy()
    b, _, h, w = shape
    want = np.zeros((b, h, w), dtype=np.int64)
    for i in range(b):
        for r in range(h):
            for s in range(w):
                v, _ = ref_masked_max(a, yy, i, r, s)
                want[i, r, s] = 0 if v <= _f32(low) else (2 if v >= _f32(high) else 1)
    np.testing.assert_array_equal(got.numpy(), want)


def test_region_partition_boundaries_and_absent_classes():
    # v exactly at low -> background, exactly at high -> confident; an absent class never counts
    aux = torch.tensor([[[[0.25, 0.7, 0.5, 0.9]], [[0.0, 0.0, 0.0, 0.0]], [[0.99, 0.99, 0.99, 0.99]]]])
    y = torch.tensor([[1.0, 1.0, 0.0]])
    assert camlib.region_partition(aux, y, low=0.25, high=0.7).tolist() == [[[0, 2, 1, 2]]]
    assert (camlib.region_partition(aux, torch.zeros(1, 3)) == 0).all()  # no class: all background


@settings(max_examples=40)
@given(shape=shape_bfhw, seed=st.integers(0, 2**16), ignore_mid=st.booleans(), use_box=st.booleans(),
       th=st.sampled_from([(0.5, 0.7, 0.25), (0.45, 0.65, 0.25), (0.8, 0.7, 0.25)]))
def test_cam_to_label_matches_reference(shape, seed, ignore_mid, use_box, th):
    bkg, high, low = th
    b, f, h, w = shape
    y = _random_labels(seed, b, f)
    cam = _snap_to_thresholds(_rand(seed, *shape), seed, [bkg, high, low])
    img_box = torch.tensor([_random_box(seed + i, h, w) for i in range(b)]) if use_box else None
    got = camlib.cam_to_label(cam, y, img_box, bkg_thre=bkg, high=high, low=low, ignore_mid=ignore_mid)
    want = ref_cam_to_label(cam.double().numpy(), y.numpy(), _pixel_boxes(img_box) if use_box else None,
                            bkg_thre=bkg, high=high, low=low, ignore_mid=ignore_mid)
    np.testing.assert_array_equal(got.numpy(), want)


@settings(max_examples=40)
@given(b=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_box_mask_matches_reference(b, h, w, seed):
    boxes = torch.tensor([_random_box(seed + i, h, w) for i in range(b)])
    got = camlib.box_mask(boxes, (h, w))
    assert got.dtype == torch.bool and got.shape == (b, h, w)
    for i in range(b):
        for r in range(h):
            for s in range(w):
                assert bool(got[i, r, s]) == ref_box_inside(boxes[i], r, s)


# ============================================================================ patch-grid labels (sc)
def ref_patch_rows(lo: int, hi: int, p: int) -> set[int]:
    """Patch indices that contain at least one pixel of [lo, hi)."""
    return {v // p for v in range(lo, hi)}


@settings(max_examples=60)
@given(p=st.sampled_from([2, 4, 16]), gh=st.integers(1, 5), gw=st.integers(1, 5), extra=st.integers(0, 15),
       seed=st.integers(0, 2**16))
def test_patch_box_is_every_overlapping_patch(p, gh, gw, extra, seed):
    h, w = gh * p + extra % p, gw * p + extra % p  # image sizes need not be multiples of p
    y0, y1, x0, x1 = _random_box(seed, h, w)
    pb = camlib.patch_box(torch.tensor([[y0, y1, x0, x1]]), p)
    rows, cols = ref_patch_rows(y0, y1, p), ref_patch_rows(x0, x1, p)
    assert pb.tolist() == [[min(rows), max(rows) + 1, min(cols), max(cols) + 1]]
    mask = camlib.box_mask(pb, (h // p, w // p))[0]
    for r in range(h // p):
        for s in range(w // p):
            assert bool(mask[r, s]) == (r in rows and s in cols)


@settings(max_examples=30)
@given(b=st.integers(1, 3), f=st.integers(1, 4), p=st.sampled_from([2, 4]), gh=st.integers(1, 5),
       gw=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_patch_labels_match_reference(b, f, p, gh, gw, seed):
    h, w = gh * p, gw * p
    aux = _rand(seed, b, f, h, w)
    y = _random_labels(seed, b, f)
    boxes = torch.tensor([_random_box(seed + i, h, w) for i in range(b)])
    got = camlib.patch_labels(aux, y, boxes, grid=(gh, gw), patch=p, bkg_thre=0.5, high=0.7, low=0.25)
    small = F.interpolate(aux, size=(gh, gw), mode="bilinear", align_corners=False)  # spec: bilinear resize
    inside = [lambda r, s, bx=tuple(int(v) for v in box): (r in ref_patch_rows(bx[0], bx[1], p)
                                                           and s in ref_patch_rows(bx[2], bx[3], p))
              for box in boxes]
    want = ref_cam_to_label(small.double().numpy(), y.numpy(), inside, 0.5, 0.7, 0.25, ignore_mid=True)
    np.testing.assert_array_equal(got.numpy(), want)


def test_patch_labels_fix_the_authors_box_defect():
    # box starting at pixel 16 on a 64 px crop (grid 4x4, p=16): the authors' pixel box on the patch grid
    # (rows 16:64 of a 4-row map) leaves every label 255; the mapped box keeps the 3x3 valid patches.
    aux = torch.full((1, 2, 64, 64), 0.95)
    aux[:, 1] = 0.1
    y = torch.tensor([[1.0, 1.0]])
    lab = camlib.patch_labels(aux, y, torch.tensor([[16, 64, 16, 64]]), grid=(4, 4), patch=16, bkg_thre=0.5,
                              high=0.7, low=0.25)
    want = torch.full((4, 4), IGNORE)
    want[1:, 1:] = 1
    assert torch.equal(lab[0], want)


def test_patch_labels_reproduce_the_authors_box_defect():
    """fidelity="authors": the pixel box sliced out of the patch grid, as their
    `pseudo_label[i, y0:y1, x0:x1] = ...` on the (h/16, w/16) map does (numpy slicing clips at the edge)."""
    aux = torch.full((2, 2, 64, 64), 0.95)
    aux[:, 1] = 0.1
    y = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    boxes = torch.tensor([[16, 64, 16, 64], [0, 48, 0, 3]])
    lab = camlib.patch_labels(aux, y, boxes, grid=(4, 4), patch=16, bkg_thre=0.5, high=0.7, low=0.25,
                              pixel_box=True)
    for i, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        want = np.full((4, 4), IGNORE)
        want[y0:y1, x0:x1] = 1  # pixel coordinates used as patch indices
        np.testing.assert_array_equal(lab[i].numpy(), want)
    assert (lab[0] == IGNORE).all()  # the box does not start at 0: every patch label lost
    assert (lab[1, :, :3] == 1).all() and (lab[1, :, 3] == IGNORE).all()


@settings(max_examples=40)
@given(b=st.integers(1, 2), h=st.integers(1, 6), w=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_denormalize_uint8_is_the_authors_truncation(b, h, w, seed):
    """Their `denormalize_img2`: x * std_255 + mean_255, cast to uint8 (truncation toward zero), / 255."""
    from locbe.data.classes import IMAGENET_STD, denormalize_uint8

    pixels = torch.randint(0, 256, (b, 3, h, w), generator=_gen(seed)).double() / 255
    noise = (torch.rand(b, 3, h, w, generator=_gen(seed + 1), dtype=torch.float64) - 0.5) * 0.9 / 255
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    images = ((pixels + noise).clamp(0, 1) - mean) / std
    got = denormalize_uint8(images.float())
    x255 = (images.float() * (std * 255).float() + (mean * 255).float()).double()
    want = np.zeros((b, 3, h, w))
    for idx in np.ndindex(b, 3, h, w):
        want[idx] = math.trunc(float(x255[idx])) / 255  # values stay inside 0..255 here
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=1e-7)
    assert (got <= denormalize(images.float()) + 1e-6).all()  # truncation never rounds up


# ============================================================================ BE erasing, LOC crops
@settings(max_examples=30)
@given(b=st.integers(1, 3), h=st.integers(1, 8), w=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_erase_for_be_keeps_only_the_uncertain_band(b, h, w, seed):
    images = torch.randn(b, 3, h, w, generator=_gen(seed))
    regions = torch.randint(0, 3, (b, h, w), generator=_gen(seed + 1))
    got = camlib.erase_for_be(images, regions)
    assert got.shape == images.shape
    for i in range(b):
        for r in range(h):
            for s in range(w):
                for ch in range(3):
                    want = float(images[i, ch, r, s]) if int(regions[i, r, s]) == 1 else 0.0
                    assert float(got[i, ch, r, s]) == want
    # erased pixels are the ImageNet mean colour once de-normalised (method.md: "the mean colour")
    erased = (regions != 1).unsqueeze(1).expand_as(images)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand_as(images)
    assert torch.allclose(denormalize(got)[erased], mean[erased], atol=1e-6)


def _expected_box(cy: int, cx: int, size: int, h: int, w: int) -> tuple[int, int, int, int]:
    """Window of side ``size`` around the centre (offset size // 2), clipped at the border."""
    y0, x0 = cy - size // 2, cx - size // 2
    return max(y0, 0), min(y0 + size, h), max(x0, 0), min(x0 + size, w)


@settings(max_examples=40)
@given(b=st.integers(1, 3), h=st.integers(1, 12), w=st.integers(1, 12), size=st.integers(1, 14),
       n=st.integers(1, 6), p2=st.sampled_from([0.0, 0.02, 0.3, 1.0]), seed=st.integers(0, 2**16))
def test_sample_loc_crops_boxes_come_from_region_two(b, h, w, size, n, p2, seed):
    g = _gen(seed)
    regions = torch.randint(0, 2, (b, h, w), generator=g)
    regions[torch.rand(b, h, w, generator=g) < p2] = 2
    boxes = camlib.sample_loc_crops(regions, num_crops=n, crop_size=size, generator=_gen(seed + 1))
    assert len(boxes) == n
    confident = {(r, s) for i in range(b) for r in range(h) for s in range(w) if int(regions[i, r, s]) == 2}
    # no confident pixel in the batch: the documented fallback draws uniform centres over the image
    centres = confident if confident else {(r, s) for r in range(h) for s in range(w)}
    allowed = {_expected_box(r, s, size, h, w) for r, s in centres}
    for box in boxes:
        y0, y1, x0, x1 = box
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        assert tuple(box) in allowed, (box, sorted(allowed))
    # deterministic for a fixed generator
    again = camlib.sample_loc_crops(regions, num_crops=n, crop_size=size, generator=_gen(seed + 1))
    assert [tuple(x) for x in again] == [tuple(x) for x in boxes]


def test_sample_loc_crops_uniform_over_image_pixel_positions():
    # one confident pixel in image 0, three in image 1: uniform over (image, pixel) positions gives 1/4 each
    # (uniform over images first would give the lone pixel 1/2). crop_size 1 makes the box the centre.
    regions = torch.zeros(2, 5, 5, dtype=torch.long)
    regions[0, 0, 0] = 2
    regions[1, 1, 1] = regions[1, 2, 2] = regions[1, 3, 3] = 2
    boxes = camlib.sample_loc_crops(regions, num_crops=4000, crop_size=1, generator=_gen(0))
    counts = {}
    for box in boxes:
        counts[tuple(box)] = counts.get(tuple(box), 0) + 1
    assert set(counts) == {(k, k + 1, k, k + 1) for k in range(4)}
    for c in counts.values():  # binomial sd ~ 0.007; 6 sd
        assert abs(c / 4000 - 0.25) < 0.04, counts


def test_sample_loc_crops_no_confident_region_does_not_crash():
    regions = torch.ones(2, 20, 30, dtype=torch.long)
    boxes = camlib.sample_loc_crops(regions, num_crops=4, crop_size=86, generator=_gen(3))
    assert boxes == [(0, 20, 0, 30)] * 4  # an 86 px window clipped to a 20x30 image is the whole image
    boxes = camlib.sample_loc_crops(regions, num_crops=50, crop_size=5, generator=_gen(3))
    assert len({tuple(b) for b in boxes}) > 1  # centres are random, not a fixed fallback position


@settings(max_examples=30)
@given(b=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_crop_views_take_the_same_window_from_every_image(b, h, w, seed):
    images = torch.randn(b, 3, h, w, generator=_gen(seed))
    boxes = [_random_box(seed + k, h, w) for k in range(3)]
    views = camlib.crop_views(images, boxes)
    assert len(views) == len(boxes)
    for view, (y0, y1, x0, x1) in zip(views, boxes):
        assert view.shape == (b, 3, y1 - y0, x1 - x0)
        for i in range(b):
            for r in range(y1 - y0):
                for s in range(x1 - x0):
                    assert torch.equal(view[i, :, r, s], images[i, :, y0 + r, x0 + s])


# ============================================================================ multi-scale CAM
class StubCAMNet(nn.Module):
    """CAMs are a known function of the input: per patch of side ``patch`` (floor grid), a signed linear
    map of the mean colour plus a left-to-right ramp, so the CAM is neither flip-equivariant nor >= 0."""

    def __init__(self, num_fg: int, patch: int, seed: int):
        super().__init__()
        g = _gen(seed)
        self.patch = patch
        self.w = torch.randn(2, num_fg, 3, generator=g)
        self.ramp = torch.randn(2, num_fg, generator=g) * 2
        self.bias = torch.randn(2, num_fg, generator=g) * 0.5
        self.calls: list[torch.Tensor] = []

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = F.avg_pool2d(x, self.patch)
        gw = pooled.shape[-1]
        col = torch.linspace(0, 1, gw).view(1, 1, 1, gw)
        return tuple(torch.einsum("fc,bchw->bfhw", self.w[k], pooled) + self.ramp[k].view(1, -1, 1, 1) * col
                     + self.bias[k].view(1, -1, 1, 1) for k in range(2))

    def cams(self, x: torch.Tensor, relu: bool = True):
        self.calls.append(x.detach().clone())
        cam, aux = self.raw(x)
        return (F.relu(cam), F.relu(aux)) if relu else (cam, aux)


def ref_multiscale_cam(stub: StubCAMNet, images: torch.Tensor, scales) -> list[np.ndarray]:
    """method.md "Multi-scale CAM": per scale resize to (int(sH), int(sW)), CAM of img and hflip(img),
    upsample both to (H, W), max(cam, unflip(flipped cam)), relu; sum over scales; normalise."""
    _, _, h, w = images.shape
    totals = [np.zeros(0), np.zeros(0)]
    for s in scales:
        x = F.interpolate(images, size=(int(s * h), int(s * w)), mode="bilinear", align_corners=False)
        plain = stub.raw(x)
        flipped = stub.raw(x.flip(-1))
        for k in range(2):
            a = F.interpolate(plain[k], size=(h, w), mode="bilinear", align_corners=False).double().numpy()
            bf = F.interpolate(flipped[k], size=(h, w), mode="bilinear", align_corners=False).double().numpy()
            fused = np.maximum(np.maximum(a, bf[..., ::-1]), 0.0)
            totals[k] = fused if totals[k].size == 0 else totals[k] + fused
    return [ref_normalize(t) for t in totals]


@settings(max_examples=20)
@given(b=st.integers(1, 2), f=st.integers(1, 3), h=st.integers(4, 13), w=st.integers(4, 13),
       scales=st.sampled_from([(1.0,), (1.0, 0.5, 1.5), (0.5, 1.5), (1.25,)]), seed=st.integers(0, 2**16))
def test_multiscale_cam_matches_reference(b, f, h, w, scales, seed):
    stub = StubCAMNet(f, patch=2, seed=seed)
    images = torch.randn(b, 3, h, w, generator=_gen(seed + 1))
    cam, aux = camlib.multiscale_cam(stub, images, scales=scales)
    want_cam, want_aux = ref_multiscale_cam(stub, images, scales)
    assert cam.shape == aux.shape == (b, f, h, w)
    np.testing.assert_allclose(cam.double().numpy(), want_cam, atol=2e-5)
    np.testing.assert_allclose(aux.double().numpy(), want_aux, atol=2e-5)
    # the model saw every requested scale, each as [img, hflip(img)]
    assert [tuple(c.shape[-2:]) for c in stub.calls] == [(int(s * h), int(s * w)) for s in scales]
    for c in stub.calls:
        # the code flips before resizing, the spec resizes then flips: equal maths (bilinear with
        # align_corners=False is mirror-symmetric), float rounding only
        assert c.shape[0] == 2 * b
        torch.testing.assert_close(c[b:], c[:b].flip(-1), rtol=1e-5, atol=1e-5)
        if c.shape[-2:] == images.shape[-2:]:
            assert torch.equal(c[:b], images)


@settings(max_examples=10)
@given(b=st.integers(1, 2), h=st.integers(4, 11), w=st.integers(4, 11),
       scales=st.sampled_from([(1.0,), (1.0, 0.5, 1.5), (0.5, 1.0)]), seed=st.integers(0, 2**16))
def test_multiscale_cam_with_given_unflipped_maps(b, h, w, scales, seed):
    """The fast step hands in the un-flipped scale-1 maps from its main forward: same result as the
    reference, and the model then sees only the flipped images at scale 1."""
    stub = StubCAMNet(2, patch=2, seed=seed)
    images = torch.randn(b, 3, h, w, generator=_gen(seed + 1))
    cam, aux = camlib.multiscale_cam(stub, images, scales=scales, unflipped_raw=stub.raw(images))
    want_cam, want_aux = ref_multiscale_cam(stub, images, scales)
    np.testing.assert_allclose(cam.double().numpy(), want_cam, atol=2e-5)
    np.testing.assert_allclose(aux.double().numpy(), want_aux, atol=2e-5)
    seen = {tuple(c.shape[-2:]): c for c in stub.calls}
    assert len(stub.calls) == len(scales) and seen[(h, w)].shape[0] == b
    assert torch.equal(seen[(h, w)], images.flip(-1))
    # a wrong hand-in must change the result: the given maps are really used
    wrong = tuple(r + 5.0 for r in stub.raw(images))
    bad, _ = camlib.multiscale_cam(stub, images, scales=scales, unflipped_raw=wrong)
    assert not np.allclose(bad.double().numpy(), want_cam, atol=1e-3)


def test_multiscale_cam_bf16_autocast_within_bf16_rounding(monkeypatch):
    """Opt-in cam_bf16: the summed multi-scale maps (before the min/max normalisation, which amplifies
    any change in channels whose range is near zero) stay within bf16 rounding of float32: 8-bit
    mantissa, 2^-8 = 0.4 % per op, measured 0.4 % relative L2 on the micro ViT; allowed 2 %."""
    from locbe.models import build_model

    torch.manual_seed(0)
    model = build_model("vit_micro_patch16", num_classes=6)
    images = torch.randn(2, 3, 64, 80, generator=_gen(3))
    monkeypatch.setattr(camlib, "normalize_cam", lambda cam: cam)
    ref = camlib.multiscale_cam(model, images)
    low = camlib.multiscale_cam(model, images, autocast_dtype=torch.bfloat16)
    for r, x in zip(ref, low):
        assert x.dtype == torch.float32
        err = float((x - r).norm() / r.norm())
        assert 0 < err < 2e-2, err


def test_multiscale_cam_flip_fusion_is_a_max():
    # a CAM that ramps up over the left half only, whatever the content: the flipped pass, un-flipped, covers
    # the right half; the fusion max(cam, unflip(cam_flip)) is the symmetric 1 2 3 4 4 3 2 1 -> normalised.
    class LeftRamp(nn.Module):
        def cams(self, x, relu=True):
            w = x.shape[-1]
            cam = torch.zeros(x.shape[0], 1, x.shape[-2], w)
            cam[..., : w // 2] = torch.arange(1, w // 2 + 1, dtype=torch.float32)
            return cam, -cam  # aux <= 0 everywhere: relu -> 0 -> normalised 0 (not NaN)

    cam, aux = camlib.multiscale_cam(LeftRamp(), torch.randn(1, 3, 2, 8, generator=_gen(0)), scales=(1.0,))
    want = torch.tensor([0.0, 1, 2, 3, 3, 2, 1, 0]) / (3 + 1e-5)
    torch.testing.assert_close(cam[0, 0], want.expand(2, 8))
    assert (aux == 0).all()



# ============================================================================ PAR pseudo labels
class ResizeOnlyPAR(nn.Module):
    """PAR stand-in without refinement: lets the label logic of refine_cams_with_par be checked exactly."""

    def forward(self, images, masks):
        return masks


def ref_refine_labels(par, images: torch.Tensor, cams: torch.Tensor, y: torch.Tensor, boxes: torch.Tensor,
                      high: float, low: float) -> np.ndarray:
    """method.md "Refinement with PAR", per image over present classes (keys 0 = background, 1 + c):
    [bkg=high, cams] and [bkg=low, cams], downsample by 2 with the image, softmax over classes, PAR,
    upsample, argmax -> L_h, L_l; result L_h, 255 where L_h == 0, 0 where both are 0, 255 outside the box."""
    b, _, h, w = images.shape
    small = (h // 2, w // 2)
    out = np.full((b, h, w), IGNORE, dtype=np.int64)
    for i in range(b):
        keys = [0] + [c + 1 for c in range(y.shape[1]) if y[i, c] > 0]
        img_small = F.interpolate(images[i:i + 1], size=small, mode="bilinear", align_corners=False)
        labels = []
        for bkg in (high, low):
            stack = torch.cat([torch.full((1, 1, h, w), bkg)] + [cams[i:i + 1, k - 1:k] for k in keys[1:]], dim=1)
            stack = F.interpolate(stack, size=small, mode="bilinear", align_corners=False).softmax(dim=1)
            refined = F.interpolate(par(img_small, stack), size=(h, w), mode="bilinear", align_corners=False)
            idx = refined[0].argmax(dim=0)
            labels.append(np.asarray(keys)[idx.numpy()])
        lh, ll = labels
        for r in range(h):
            for s in range(w):
                if not ref_box_inside(boxes[i], r, s):
                    continue
                lab = int(lh[r, s])
                if lh[r, s] == 0:
                    lab = IGNORE
                if lh[r, s] == 0 and ll[r, s] == 0:
                    lab = 0
                out[i, r, s] = lab
    return out


@settings(max_examples=25)
@given(b=st.integers(1, 3), f=st.integers(1, 4), h=st.integers(2, 12), w=st.integers(2, 12),
       seed=st.integers(0, 2**16), batched=st.booleans())
def test_refine_cams_with_par_label_logic(b, f, h, w, seed, batched):
    images = _rand(seed, b, 3, h, w)
    cams = _rand(seed + 1, b, f, h, w)
    y = _random_labels(seed, b, f)
    boxes = torch.tensor([_random_box(seed + i, h, w) for i in range(b)])
    got = camlib.refine_cams_with_par(ResizeOnlyPAR(), images, cams, y, boxes, high=0.7, low=0.25, batched=batched)
    want = ref_refine_labels(ResizeOnlyPAR(), images, cams, y, boxes, 0.7, 0.25)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("batched", [False, True], ids=["per_image", "batched"])
def test_refine_cams_with_par_real_par_labels_in_range_and_box(batched):
    b, f, h, w = 2, 5, 24, 20
    images = _rand(31, b, 3, h, w)
    cams = _rand(32, b, f, h, w)
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])  # image 1: no foreground class
    boxes = torch.tensor([[3, 20, 2, 17], [0, 24, 0, 20]])
    par = PAR(dilations=(1, 2, 4), num_iter=5)
    got = camlib.refine_cams_with_par(par, images, cams, y, boxes, high=0.7, low=0.25, batched=batched)
    assert got.shape == (b, h, w) and got.dtype == torch.long
    inside = camlib.box_mask(boxes, (h, w))
    assert (got[~inside] == IGNORE).all()
    assert set(got[0][inside[0]].unique().tolist()) <= {0, 1, 3, IGNORE}  # only present classes (1 + c)
    assert (got[1] == 0).all()  # nothing present: both stacks are background everywhere
    want = ref_refine_labels(par, images, cams, y, boxes, 0.7, 0.25)
    np.testing.assert_array_equal(got.numpy(), want)
