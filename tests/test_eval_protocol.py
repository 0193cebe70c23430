"""Evaluation protocols per dataset (issue 10 item 6) against plain loops written from the authors'
inference scripts, batched inference against one image at a time, and resumable evaluation (issue 12)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_eval import StubSeg, assert_metrics_equal, loop_metrics

import locbe
from locbe.eval.evaluate import EvalOptions, evaluate
from locbe.eval.protocol import PROTOCOLS, get_protocol, protocol_cams, protocol_seg_logits, seg_logits_batch
from locbe.method import cam as camlib


class StubCam(StubSeg):
    """StubSeg plus a CAM head (a second random stride-4 conv): cheap at 448 px, neither flip- nor scale-invariant."""

    def __init__(self, num_classes=21, seed=0):
        super().__init__(num_classes, seed)
        g = torch.Generator().manual_seed(seed + 100)
        self.cam_conv = torch.nn.Conv2d(3, num_classes - 1, kernel_size=4, stride=4)
        with torch.no_grad():
            self.cam_conv.weight.copy_(torch.randn(self.cam_conv.weight.shape, generator=g))

    def cams(self, x, relu=True):
        c = self.cam_conv(x)
        return (F.relu(c), F.relu(-c)) if relu else (c, -c)


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def reference_voc_seg(model, image):
    """infer_seg_voc.py: scales (1.0, 1.5, 1.25) at the image size, flips summed, max over scales."""
    h, w = image.shape[-2:]
    per_scale = []
    for s in (1.0, 1.5, 1.25):
        x = up(image, (int(s * h), int(s * w)))
        a = up(model(x).seg_logits, (h, w))
        b = up(model(x.flip(-1)).seg_logits, (h, w)).flip(-1)
        per_scale.append(a + b)
    return torch.stack(per_scale).max(0).values


def reference_coco_seg(model, image, label_size, side=448):
    """infer_seg_coco_ddp.py: resize to 448x448, scales (1.0, 1.25, 1.5), logits to the label size, max over
    the flips, sum over the scales."""
    x448 = up(image, (side, side))
    total = 0
    for s in (1.0, 1.25, 1.5):
        x = up(x448, (int(side * s), int(side * s)))
        a = up(model(x).seg_logits, label_size)
        b = up(model(x.flip(-1)).seg_logits, label_size).flip(-1)
        total = total + torch.maximum(a, b)
    return total


def reference_cams(model, image, label_size, side=448):
    """infer_cam.py: resize to 448x448; per scale (1.0, 0.5, 1.5) raw CAMs of img and flip upsampled to 448,
    max with the un-flipped flipped map, relu, summed; min-max normalised; bilinear to the label size."""
    x448 = up(image, (side, side))
    total = 0
    for s in (1.0, 0.5, 1.5):
        x = up(x448, (int(side * s), int(side * s)))
        a = up(model.cams(x, relu=False)[0], (side, side))
        b = up(model.cams(x.flip(-1), relu=False)[0], (side, side)).flip(-1)
        total = total + F.relu(torch.maximum(a, b))
    total = total - total.amin(dim=(-2, -1), keepdim=True)
    total = total / (total.amax(dim=(-2, -1), keepdim=True) + 1e-5)
    return up(total, label_size)


def test_protocol_table_is_the_authors():
    voc, coco = PROTOCOLS["voc"], PROTOCOLS["coco"]
    assert voc.seg_scales == (1.0, 1.5, 1.25) and voc.seg_resize is None
    assert (voc.flip_combine, voc.scale_combine) == ("sum", "max")
    assert coco.seg_resize == (448, 448) and coco.seg_scales == (1.0, 1.25, 1.5)
    assert (coco.flip_combine, coco.scale_combine) == ("max", "sum")
    assert voc.cam_resize == coco.cam_resize == (448, 448)
    assert voc.cam_scales == coco.cam_scales == (1.0, 0.5, 1.5)
    assert get_protocol("synthetic").name == "smoke" and get_protocol("coco") is coco
    with pytest.raises(ValueError):
        get_protocol("cityscapes")


@torch.no_grad()
def test_voc_seg_protocol_matches_reference():
    torch.manual_seed(0)
    model = StubSeg(num_classes=21, seed=2).eval()
    image = torch.randn(1, 3, 37, 50)
    got = protocol_seg_logits(model, image, [(37, 50)], PROTOCOLS["voc"], multi_scale=True)[0]
    torch.testing.assert_close(got, reference_voc_seg(model, image), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_coco_seg_protocol_matches_reference_and_differs_from_voc_rule():
    torch.manual_seed(0)
    model = StubSeg(num_classes=81, seed=3).eval()
    image = torch.randn(1, 3, 60, 44)
    got = protocol_seg_logits(model, image, [(60, 44)], PROTOCOLS["coco"], multi_scale=True)[0]
    assert got.shape == (1, 81, 60, 44)
    want = reference_coco_seg(model, image, (60, 44))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # the rules matter: VOC's (no 448 resize, flips summed, max over scales) gives other logits
    voc_rule = protocol_seg_logits(model, image, [(60, 44)], PROTOCOLS["voc"], multi_scale=True)[0]
    assert not torch.allclose(got, voc_rule, atol=1e-2)
    # single scale keeps the 448 resize, without flip
    single = protocol_seg_logits(model, image, [(60, 44)], PROTOCOLS["coco"], multi_scale=False)[0]
    torch.testing.assert_close(single, up(model(up(image, (448, 448))).seg_logits, (60, 44)))


@torch.no_grad()
def test_cam_protocol_matches_reference():
    model = StubCam(num_classes=21, seed=5).eval()
    image = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    got = protocol_cams(model, image, [(40, 56)], PROTOCOLS["voc"])[0]
    want = reference_cams(model, image, (40, 56))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the smoke protocol keeps the image size: a different map
    native = protocol_cams(model, image, [(40, 56)], PROTOCOLS["smoke"])[0]
    assert not torch.allclose(got, native, atol=1e-3)


@torch.no_grad()
def test_batched_inference_equals_one_image_at_a_time():
    torch.manual_seed(0)
    model = StubSeg(num_classes=21, seed=4).eval()
    images = torch.randn(3, 3, 32, 48)
    sizes = [(32, 48), (50, 40), (20, 30)]  # label sizes differ (COCO: every image is 448 after the resize)
    for protocol in (PROTOCOLS["voc"], PROTOCOLS["coco"]):
        batched = seg_logits_batch(model, images, sizes, scales=protocol.seg_scales, flip=True,
                                   flip_combine=protocol.flip_combine, scale_combine=protocol.scale_combine,
                                   resize=protocol.seg_resize)
        for i in range(3):
            one = seg_logits_batch(model, images[i:i + 1], [sizes[i]], scales=protocol.seg_scales, flip=True,
                                   flip_combine=protocol.flip_combine, scale_combine=protocol.scale_combine,
                                   resize=protocol.seg_resize)[0]
            torch.testing.assert_close(batched[i], one, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- evaluate() on a dataset
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from locbe.data import build_dataset
    from locbe.data.synthetic import SyntheticConfig, make_synthetic

    root = make_synthetic(tmp_path_factory.mktemp("syn") / "voc",
                          SyntheticConfig(seed=5, num_train=1, num_val=6, min_size=36, max_size=52))
    return build_dataset("synthetic", root, "val", train=False)


def test_evaluate_coco_protocol_and_cam_match_reference(tiny):
    """evaluate() end to end under COCO's rules (448 side shrunk to 64 to keep the micro ViT cheap here)."""
    from dataclasses import replace

    from locbe.config import get_preset

    torch.manual_seed(0)
    model = locbe.build_model("vit_micro_patch16", num_classes=21).eval()
    cfg = get_preset("voc")
    protocol = replace(PROTOCOLS["coco"], seg_resize=(64, 64), cam_resize=(64, 64))
    res = evaluate(model, tiny, 21, EvalOptions(multi_scale=True, cam=True, protocol=protocol, progress=False,
                                                max_images=4, batch_size=2), cam_cfg=cfg)
    assert res["protocol"] == "coco" and res["scales"] == [1.0, 1.25, 1.5] and res["autocast"] == "off"
    seg_pairs, cam_pairs = [], []
    with torch.no_grad():
        for i in range(4):
            item = tiny[i]
            image, gt = item["image"][None], item["mask"]
            seg_pairs.append((reference_coco_seg(model, image, gt.shape, 64).argmax(1)[0].numpy(), gt.numpy()))
            cams = reference_cams(model, image, gt.shape, 64)
            cam_pairs.append((camlib.cam_to_label(cams, item["cls_label"][None], bkg_thre=cfg.bkg_thre)[0].numpy(),
                              gt.numpy()))
    assert_metrics_equal(res["seg"], loop_metrics(seg_pairs, 21))
    assert_metrics_equal(res["cam"], loop_metrics(cam_pairs, 21))


def test_autocast_option_is_recorded_and_close(tiny):
    torch.manual_seed(0)
    model = StubSeg(num_classes=21, seed=1)
    off = evaluate(model, tiny, 21, EvalOptions(progress=False, max_images=3))
    bf16 = evaluate(model, tiny, 21, EvalOptions(progress=False, max_images=3, amp="bf16"))
    assert off["autocast"] == "off" and bf16["autocast"] == "bf16"
    assert abs(off["seg"]["pixel_acc"] - bf16["seg"]["pixel_acc"]) < 0.05
    with pytest.raises(ValueError):
        evaluate(model, tiny, 21, EvalOptions(progress=False, max_images=1, amp="fp8"))


class Interrupting(torch.utils.data.Dataset):
    """Counts the items read; raises at ``stop_at`` (an evaluation killed there)."""

    def __init__(self, ds, stop_at=None):
        self.ds, self.stop_at, self.read = ds, stop_at, []
        self.names = ds.names

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if self.stop_at is not None and i == self.stop_at:
            raise KeyboardInterrupt
        self.read.append(i)
        return self.ds[i]


def test_interrupted_evaluation_resumes_where_it_stopped(tiny, tmp_path):
    model = StubSeg(num_classes=21, seed=1)
    opts = dict(multi_scale=True, crf=True, workers=1, progress=False, tag="ck-1")
    straight = evaluate(model, tiny, 21, EvalOptions(**opts))

    parts = tmp_path / "parts"
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, Interrupting(tiny, stop_at=4), 21, EvalOptions(**opts, resume_dir=parts))
    (part,) = parts.glob("part-*-0.jsonl")
    lines = part.read_text().splitlines()
    assert [json.loads(x)["i"] for x in lines] == [0, 1, 2, 3]  # written as made, CRF included
    assert all("seg_crf" in json.loads(x) for x in lines)
    with open(part, "a") as f:
        f.write('{"i": 4, "name": "torn')  # killed mid-write: ignored on resume

    again = Interrupting(tiny)
    resumed = evaluate(model, again, 21, EvalOptions(**opts, resume_dir=parts))
    assert again.read == [4, 5]  # only what was missing
    for key in ("seg", "seg_crf"):
        assert_metrics_equal(resumed[key], straight[key])
    lines = part.read_text().splitlines()
    assert [json.loads(x)["i"] for x in lines if x.endswith("}")] == list(range(6))  # the torn line stays alone

    # another checkpoint (tag) starts over
    fresh = Interrupting(tiny)
    evaluate(model, fresh, 21, EvalOptions(**{**opts, "tag": "ck-2"}, resume_dir=parts))
    assert fresh.read == list(range(6))


def test_records_sum_to_the_confusion_matrix(tiny, tmp_path):
    """The per-image records are the confusion contributions: summed they give the reported matrix."""
    from locbe.eval.metrics import ConfusionMatrix

    model = StubSeg(num_classes=21, seed=7)
    res = evaluate(model, tiny, 21, EvalOptions(progress=False, resume_dir=tmp_path / "p", batch_size=4))
    m = np.zeros(21 * 21, dtype=np.int64)
    (part,) = (tmp_path / "p").glob("part-*-0.jsonl")
    for line in part.read_text().splitlines():
        for idx, count in json.loads(line)["seg"]:
            m[idx] += count
    cm = ConfusionMatrix(21)
    cm.matrix = torch.from_numpy(m.reshape(21, 21))
    assert_metrics_equal(cm.compute(), res["seg"])


def test_crf_process_pool_gives_the_inline_result(tiny, tmp_path):
    """CRF jobs handed to a pool of 2 processes (bounded window, records written as they return) give the
    inline CRF's matrices."""
    model = StubSeg(num_classes=21, seed=9)
    opts = dict(multi_scale=True, crf=True, crf_backend="pydensecrf", progress=False, max_images=5)
    inline = evaluate(model, tiny, 21, EvalOptions(**opts, workers=1))
    pooled = evaluate(model, tiny, 21, EvalOptions(**opts, workers=2, resume_dir=tmp_path / "p"))
    for key in ("seg", "seg_crf"):
        assert_metrics_equal(pooled[key], inline[key])
    (part,) = (tmp_path / "p").glob("part-*-0.jsonl")
    lines = part.read_text().splitlines()
    assert sorted(json.loads(x)["i"] for x in lines) == list(range(5))


def test_records_of_another_evaluation_are_never_read(tiny, tmp_path):
    """A part file of another fingerprint in the folder (left by another run, e.g. on another node's disk that
    rank 0 never cleans) is ignored: its records would otherwise replace this evaluation's images."""
    model = StubSeg(num_classes=21, seed=1)
    opts = dict(progress=False, tag="ck-1", resume_dir=tmp_path / "p")
    first = evaluate(model, tiny, 21, EvalOptions(**opts))
    bogus = [json.dumps({"i": i, "name": "x", "seg": [[0, 10**6]]}) for i in range(len(tiny))]
    (tmp_path / "p" / "part-0123456789abcdef-1.jsonl").write_text("\n".join(bogus) + "\n")
    resumed = Interrupting(tiny)
    again = evaluate(model, resumed, 21, EvalOptions(**opts))
    assert resumed.read == []  # everything came from this evaluation's own records
    assert_metrics_equal(again["seg"], first["seg"])  # and none from the other file
