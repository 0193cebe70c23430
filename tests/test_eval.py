"""Evaluation: confusion-matrix metrics, multi-label F1, dense CRF, multi-scale x flip logits,
trivial baselines and the result tables (method.md "Evaluation protocol")."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from locbe.eval.crf import CRFParams, crf_labels_parallel, dense_crf
from locbe.eval.evaluate import MS_SCALES, EvalOptions, evaluate, seg_logits, to_uint8_image, trivial_baselines
from locbe.eval.metrics import IGNORE, ConfusionMatrix, multilabel_f1
from locbe.report import tables as report

NAN = float("nan")


# ----------------------------------------------------------------------------- reference metrics
def loop_metrics(pairs, num_classes: int) -> dict:
    """Plain per-pixel python loop: ToCo's scores() (classes absent from the ground truth excluded, 255 ignored)."""
    tp, gt_n, pred_n = [0] * num_classes, [0] * num_classes, [0] * num_classes
    total = 0
    for pred, gt in pairs:
        for p, g in zip(np.asarray(pred).ravel().tolist(), np.asarray(gt).ravel().tolist()):
            if g == IGNORE:
                continue
            total += 1
            gt_n[g] += 1
            pred_n[p] += 1
            tp[g] += int(p == g)
    present = [c for c in range(num_classes) if gt_n[c] > 0]
    iou = [tp[c] / (gt_n[c] + pred_n[c] - tp[c]) if gt_n[c] else NAN for c in range(num_classes)]
    acc = [tp[c] / gt_n[c] if gt_n[c] else NAN for c in range(num_classes)]
    return {"miou": sum(iou[c] for c in present) / len(present) if present else NAN,
            "pixel_acc": sum(tp) / total if total else NAN,
            "mean_acc": sum(acc[c] for c in present) / len(present) if present else NAN,
            "iou": iou, "num_pixels": total}


def assert_metrics_equal(got: dict, want: dict) -> None:
    for key in ("miou", "pixel_acc", "mean_acc"):
        if math.isnan(want[key]):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got["num_pixels"] == want["num_pixels"]
    assert len(got["iou"]) == len(want["iou"])
    for c, (g, w) in enumerate(zip(got["iou"], want["iou"])):
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, abs=1e-12), (c, g, w)


@st.composite
def label_maps(draw, num_classes=None, min_side=1, max_side=12):
    """(pred, gt, num_classes): gt has some 255 pixels, pred only valid classes."""
    n = num_classes if num_classes is not None else draw(st.integers(2, 5))
    h, w = draw(st.integers(min_side, max_side)), draw(st.integers(min_side, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    ignore_frac = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, n, size=(h, w))
    gt[rng.random((h, w)) < ignore_frac] = IGNORE
    # predictions agree with gt part of the time so IoUs are not all ~0
    pred = np.where(rng.random((h, w)) < 0.5, np.where(gt == IGNORE, 0, gt), rng.integers(0, n, size=(h, w)))
    return pred, gt, n


@given(label_maps())
def test_confusion_matrix_matches_pixel_loop(case):
    pred, gt, n = case
    got = ConfusionMatrix(n).update(torch.from_numpy(pred), torch.from_numpy(gt)).compute()
    assert_metrics_equal(got, loop_metrics([(pred, gt)], n))


@given(st.integers(2, 5).flatmap(lambda n: st.lists(label_maps(num_classes=n), min_size=1, max_size=4)))
def test_accumulated_updates_equal_one_update_on_concatenation(cases):
    n = cases[0][2]
    acc = ConfusionMatrix(n)
    for pred, gt, _ in cases:
        acc.update(torch.from_numpy(pred), torch.from_numpy(gt))
    flat_pred = np.concatenate([p.ravel() for p, _, _ in cases])
    flat_gt = np.concatenate([g.ravel() for _, g, _ in cases])
    once = ConfusionMatrix(n).update(torch.from_numpy(flat_pred), torch.from_numpy(flat_gt))
    assert torch.equal(acc.matrix, once.matrix)
    assert_metrics_equal(acc.compute(), loop_metrics([(p, g) for p, g, _ in cases], n))
    # merging per-image matrices (as a distributed eval would) gives the same matrix
    merged = ConfusionMatrix(n)
    for pred, gt, _ in cases:
        merged.merge(ConfusionMatrix(n).update(torch.from_numpy(pred), torch.from_numpy(gt)))
    assert torch.equal(merged.matrix, once.matrix)


def test_class_absent_from_ground_truth_is_excluded_even_if_predicted():
    # class 2 is predicted but never in the ground truth; class 3 appears nowhere
    gt = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 0, 1, 2]])
    res = ConfusionMatrix(4).update(pred, gt).compute()
    assert res["iou"][0] == 1.0
    assert res["iou"][1] == 0.5  # tp 1, union 2
    assert math.isnan(res["iou"][2]) and math.isnan(res["iou"][3])
    assert res["miou"] == pytest.approx(0.75)  # (1 + 0.5) / 2, not (1 + 0.5 + 0) / 3 = 0.5
    assert res["mean_acc"] == pytest.approx(0.75)  # (2/2 + 1/2) / 2
    assert res["pixel_acc"] == pytest.approx(0.75)
    # without the false positive on class 2 the same ground truth scores 1.0
    res2 = ConfusionMatrix(4).update(torch.tensor([[0, 0, 1, 1]]), gt).compute()
    assert res2["miou"] == 1.0


def test_all_ignore_image_changes_nothing():
    rng = np.random.default_rng(0)
    gt = torch.from_numpy(rng.integers(0, 3, size=(6, 7)))
    pred = torch.from_numpy(rng.integers(0, 3, size=(6, 7)))
    cm = ConfusionMatrix(3).update(pred, gt)
    before, before_res = cm.matrix.clone(), cm.compute()
    cm.update(torch.from_numpy(rng.integers(0, 3, size=(5, 5))), torch.full((5, 5), IGNORE))
    assert torch.equal(cm.matrix, before)
    assert_metrics_equal(cm.compute(), before_res)
    only_ignore = ConfusionMatrix(3).update(torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), IGNORE))
    assert only_ignore.matrix.sum() == 0 and math.isnan(only_ignore.compute()["miou"])


def test_perfect_prediction_scores_one():
    gt = torch.tensor([[0, 1, 2, IGNORE], [2, 2, 1, 0]])
    pred = torch.where(gt == IGNORE, torch.ones_like(gt), gt)  # whatever is predicted at 255 is ignored
    res = ConfusionMatrix(5).update(pred, gt).compute()
    assert res["miou"] == res["pixel_acc"] == res["mean_acc"] == 1.0
    assert res["iou"][:3] == [1.0, 1.0, 1.0] and all(math.isnan(v) for v in res["iou"][3:])
    assert res["num_pixels"] == 7


def test_confusion_matrix_rejects_bad_inputs():
    with pytest.raises(ValueError):
        ConfusionMatrix(3).update(torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError):
        ConfusionMatrix(3).update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError):
        ConfusionMatrix(3).update(torch.tensor([0]), torch.tensor([7]))


def test_multilabel_f1_by_hand():
    target = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
    pred = np.array([[1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 0]])
    res = multilabel_f1(pred, target)
    # class 0: tp 1 fp 0 fn 1 -> 2/3; class 1: tp 2 fp 1 fn 0 -> 4/5; class 2: tp 0 fp 1 fn 0 -> 0 (no positives)
    assert res["per_class_f1"] == pytest.approx([2 / 3, 4 / 5, 0.0])
    assert res["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert res["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)  # class 2 has no positive target: excluded
    perfect = multilabel_f1(target, target)
    assert perfect["micro_f1"] == 1.0 and perfect["macro_f1"] == 1.0
    assert math.isnan(perfect["per_class_f1"][2])  # neither predicted nor present


# ----------------------------------------------------------------------------- dense CRF
def edge_case(h=40, w=64, edge=32, shift=4, blur=3.0, seed=0):
    """Image with a sharp colour edge at column ``edge``; 2-class probs whose boundary is ``shift`` px off and soft."""
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w, 3), dtype=np.float32)
    image[:, :edge] = (200, 60, 50)
    image[:, edge:] = (40, 80, 190)
    image = np.clip(image + rng.normal(0, 3, size=image.shape), 0, 255).astype(np.uint8)
    xx = np.arange(w, dtype=np.float32)[None, :].repeat(h, 0)
    p1 = 1.0 / (1.0 + np.exp(-(xx - (edge + shift)) / blur))
    p1 = np.clip(p1, 0.05, 0.95)
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    truth = (xx >= edge).astype(np.int64)
    return image, probs, truth


def test_crf_params_are_the_protocol():
    assert CRFParams() == CRFParams(n_iter=10, gauss_sxy=1, gauss_compat=1, bi_sxy=121, bi_srgb=5, bi_compat=4)


@pytest.mark.parametrize("shift", [-4, 3, 5])
def test_dense_crf_snaps_blurred_boundary_to_colour_edge(shift):
    edge = 32
    image, probs, truth = edge_case(edge=edge, shift=shift)
    band = slice(edge - 8, edge + 8)
    before = (probs.argmax(0) == truth)[:, band].mean()
    out = dense_crf(image, probs)
    assert out.shape == probs.shape and out.dtype == np.float32
    assert np.allclose(out.sum(0), 1.0, atol=1e-4)
    after = (out.argmax(0) == truth)[:, band].mean()
    assert before <= 1 - (abs(shift) - 1) / 16 + 1e-9  # the input really is off by ~|shift| columns
    assert after > before + 0.1, (before, after)
    # without the bilateral term there is nothing pulling labels to the colour edge
    no_bilateral = dense_crf(image, probs, CRFParams(bi_compat=0.0))
    assert (no_bilateral.argmax(0) == truth)[:, band].mean() < after


def test_dense_crf_takes_read_only_arrays():
    """np.asarray of a PIL image is read-only; the result equals that of a writable copy, inputs untouched."""
    from PIL import Image

    image, probs, _ = edge_case(shift=3)
    frozen_image = np.asarray(Image.fromarray(image))
    frozen_probs = probs.copy()
    frozen_probs.setflags(write=False)
    assert not frozen_image.flags.writeable and not frozen_probs.flags.writeable
    np.testing.assert_array_equal(dense_crf(frozen_image, frozen_probs), dense_crf(image.copy(), probs.copy()))
    np.testing.assert_array_equal(frozen_image, image)


def test_dense_crf_rejects_mismatched_image():
    image, probs, _ = edge_case()
    with pytest.raises(ValueError):
        dense_crf(image[:-1], probs)
    with pytest.raises(ValueError):
        dense_crf(image.astype(np.float32), probs)


def test_crf_labels_parallel_matches_serial_in_order():
    # the first job is much larger than the rest: an unordered pool would hand it back last
    sizes = [(120, 160, 70), (24, 40, 12), (28, 40, 16), (32, 40, 20)]
    jobs = [edge_case(h=h, w=w, edge=e, shift=3, seed=i)[:2] for i, (h, w, e) in enumerate(sizes)]
    serial = list(crf_labels_parallel(jobs, workers=1, progress=False))
    parallel = list(crf_labels_parallel(jobs, workers=2, progress=False))
    assert len(serial) == len(parallel) == len(jobs)
    for (image, probs), s, p in zip(jobs, serial, parallel):
        assert s.shape == image.shape[:2] and s.dtype == np.uint8
        np.testing.assert_array_equal(s, dense_crf(image, probs).argmax(0))
        np.testing.assert_array_equal(p, s)
    # the jobs differ (size and edge position), so an order mix-up could not go unnoticed
    assert len({(s.shape, int(s.sum())) for s in serial}) == len(jobs)


# ----------------------------------------------------------------------------- multi-scale x flip logits
class StubSeg(nn.Module):
    """Neither flip- nor scale-invariant: a random stride-4 conv, as a patch-resolution seg head."""

    def __init__(self, num_classes=21, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, num_classes, kernel_size=4, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(num_classes, generator=g))
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return SimpleNamespace(seg_logits=self.conv(x))


def reference_ms_flip(model, image, scales):
    """method.md: logits at each scale for img and hflip(img), upsampled to (H, W); sum over flips, max over scales."""
    h, w = image.shape[-2:]
    per_scale = []
    for s in scales:
        size = (int(s * h), int(s * w))
        x = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        a = F.interpolate(model(x).seg_logits, size=(h, w), mode="bilinear", align_corners=False)
        b = F.interpolate(model(x.flip(-1)).seg_logits, size=(h, w), mode="bilinear", align_corners=False)
        per_scale.append(a + b.flip(-1))
    return torch.stack(per_scale).max(0).values


@pytest.mark.parametrize("hw", [(37, 50), (48, 48)])
def test_seg_logits_multiscale_flip_matches_loop(hw):
    torch.manual_seed(0)
    model = StubSeg().eval()
    image = torch.randn(1, 3, *hw)
    got = seg_logits(model, image, scales=MS_SCALES, flip=True)
    assert MS_SCALES == (1.0, 1.25, 1.5)
    assert got.shape == (1, 21, *hw)
    want = reference_ms_flip(model, image, MS_SCALES)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the stub is not flip/scale invariant, so the averaging rule matters: a mean over scales differs
    h, w = hw
    mean_rule = torch.stack([reference_ms_flip(model, image, (s,)) for s in MS_SCALES]).mean(0)
    assert not torch.allclose(got, mean_rule, atol=1e-3)
    assert [c[-2:] for c in model.calls[:3]] == [(h, w), (int(1.25 * h), int(1.25 * w)), (int(1.5 * h), int(1.5 * w))]


def test_seg_logits_single_scale_is_plain_upsampled_logits():
    model = StubSeg().eval()
    image = torch.randn(1, 3, 30, 41)
    got = seg_logits(model, image)
    want = F.interpolate(model(image).seg_logits, size=(30, 41), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want)


def test_seg_logits_with_micro_vit():
    import locbe

    torch.manual_seed(0)
    model = locbe.build_model("vit_micro_patch16", num_classes=5).eval()
    image = torch.randn(1, 3, 48, 64)
    got = seg_logits(model, image, scales=MS_SCALES, flip=True)
    assert got.shape == (1, 5, 48, 64)
    with torch.no_grad():
        want = reference_ms_flip(model, image, MS_SCALES)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- evaluate() and baselines
@pytest.fixture(scope="module")
def tiny_val(tmp_path_factory):
    from locbe.data import build_dataset
    from locbe.data.synthetic import SyntheticConfig, make_synthetic

    root = make_synthetic(tmp_path_factory.mktemp("syn") / "voc",
                          SyntheticConfig(seed=3, num_train=1, num_val=5, min_size=36, max_size=52))
    return root, build_dataset("synthetic", root, "val", train=False)


@pytest.mark.parametrize("backend", ["pydensecrf", "lattice"])
def test_evaluate_multiscale_crf_matches_reference(tiny_val, backend, tmp_path):
    from locbe.eval.crf import dense_crf_lattice

    def crf(image, probs):
        if backend == "pydensecrf":
            return dense_crf(image, probs)
        return dense_crf_lattice(torch.from_numpy(image)[None], torch.from_numpy(probs)[None])[0].numpy()

    _, ds = tiny_val
    model = StubSeg(num_classes=21, seed=1)
    opts = EvalOptions(multi_scale=True, crf=True, crf_backend=backend, workers=1, progress=False, max_images=4,
                       save_predictions=tmp_path / "pred")
    res = evaluate(model, ds, 21, opts)
    assert res["num_images"] == 4 and res["scales"] == list(MS_SCALES) and res["flip"] is True
    assert res["crf_backend"] == backend
    # the seg and CRF label maps, named so that one sees which is which
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == sorted(
        [f"{n}.png" for n in ds.names[:4]] + [f"{n}.crf-{backend}.png" for n in ds.names[:4]])
    seg_pairs, crf_pairs = [], []
    for i in range(4):
        item = ds[i]
        image, gt = item["image"][None], item["mask"].numpy()
        with torch.no_grad():
            logits = reference_ms_flip(model, image, MS_SCALES)
        assert logits.shape[-2:] == gt.shape
        seg_pairs.append((logits.argmax(1)[0].numpy(), gt))
        probs = torch.softmax(logits[0], 0).numpy()
        crf_labels = crf(to_uint8_image(image), probs).argmax(0)
        crf_pairs.append((crf_labels, gt))
        saved = np.array(Image.open(tmp_path / "pred" / f"{item['name']}.crf-{backend}.png"))
        np.testing.assert_array_equal(saved, crf_labels)
    assert_metrics_equal(res["seg"], loop_metrics(seg_pairs, 21))
    assert_metrics_equal(res["seg_crf"], loop_metrics(crf_pairs, 21))


def test_trivial_baselines_by_hand(tiny_val):
    root, ds = tiny_val
    labels = np.load(root / "cls_labels_onehot.npy", allow_pickle=True).item()
    bg_pairs, label_pairs = [], []
    for name in ds.names:
        gt = np.asarray(Image.open(root / "SegmentationClassAug" / f"{name}.png"), dtype=np.int64)
        present = np.flatnonzero(labels[name])
        bg_pairs.append((np.zeros_like(gt), gt))
        # documented definition: every pixel = the first present image class (background if none)
        label_pairs.append((np.full_like(gt, present[0] + 1 if len(present) else 0), gt))
    res = trivial_baselines(ds, 21)
    assert_metrics_equal(res["all_background"], loop_metrics(bg_pairs, 21))
    assert_metrics_equal(res["image_label_everywhere"], loop_metrics(label_pairs, 21))
    # all background: IoU(bg) = bg pixels / valid pixels, every present foreground class 0
    gts = np.concatenate([g.ravel() for _, g in bg_pairs])
    gts = gts[gts != IGNORE]
    present = np.unique(gts)
    assert 0 in present and len(present) > 1
    assert res["all_background"]["miou"] == pytest.approx((gts == 0).mean() / len(present))
    assert res["all_background"]["pixel_acc"] == pytest.approx((gts == 0).mean())


# ----------------------------------------------------------------------------- report
ENV = {"commit": "abc1234", "config_hash": "deadbeef", "seed": 0, "device": "cpu", "torch": "2.4.0", "timm": "1.0.9"}
REQUIRED = ["method", "backbone", "dataset", "split", "metric", "reported", "reproduced", "delta", "status",
            "commit", "config_hash", "seed", "device", "torch", "timm"]


def test_make_row_delta_is_reproduced_minus_reported():
    row = report.make_row("LOC-BE", "ViT-B/16", "voc", "val", "seg_miou", 0.7234, ENV, reported=73.1)
    assert row["reproduced"] == 72.34 and row["reported"] == 73.1
    assert row["delta"] == pytest.approx(72.34 - 73.1)
    assert list(row) == REQUIRED
    assert {k: row[k] for k in ENV} == ENV
    missing = report.make_row("LOC-BE", "ViT-micro", "synthetic", "val", "seg_miou", 0.5, ENV)
    assert missing["reported"] is None and missing["delta"] is None and missing["reproduced"] == 50.0


def test_environment_table_keeps_commits_and_hashes_as_text(tmp_path):
    env = {**ENV, "commit": "4068e63", "config_hash": "1234e10", "torch": "2.10"}
    rows = [report.make_row("LOC-BE", "ViT-B/16", "voc", "val", "seg_miou", 0.7, env),
            report.make_row("LOC-BE", "ViT-B/16", "coco", "val", "seg_miou", None, {}, status="not run")]
    report.write_tables(tmp_path, rows, None, "Results", [])
    md = (tmp_path / "results.md").read_text()
    env_part = md[md.index("## Environment"):]
    assert "4068e63" in env_part and "1234e10" in env_part and "2.10" in env_part
    assert "e+" not in env_part
    assert "| 0 " in env_part and "0.0" not in env_part  # the seed stays an integer next to a row without a run


def test_write_tables_markdown_and_csv(tmp_path):
    rows = [report.make_row("LOC-BE", "ViT-B/16", "voc", "val", "seg_miou", 0.7234, ENV, reported=73.1),
            report.make_row("LOC-BE", "ViT-B/16", "voc", "val", "cam_miou", 0.75, ENV, reported=74.2),
            report.make_row("LOC-BE", "ViT-micro", "synthetic", "val", "seg_miou", 0.4, ENV, status="smoke")]
    per_class = pd.DataFrame({"class": ["background", "aeroplane", "bicycle"], "seg": [91.25, 40.0, NAN]})
    report.write_tables(tmp_path, rows, per_class, "Results", ["a note"])
    assert report.ROW_COLUMNS == REQUIRED
    with open(tmp_path / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == REQUIRED and len(table) == 3
    for r in table[:2]:
        assert float(r["delta"]) == pytest.approx(float(r["reproduced"]) - float(r["reported"]), abs=1e-9)
    assert table[0]["commit"] == "abc1234" and table[0]["config_hash"] == "deadbeef" and table[0]["timm"] == "1.0.9"
    assert table[2]["reported"] == "" and table[2]["delta"] == "" and table[2]["status"] == "smoke"
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# Results")
    for col in REQUIRED:
        assert col in md, col
    assert "a note" in md and "Per-class IoU" in md and "91.2" in md
    line = next(ln for ln in md.splitlines() if "synthetic" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    # method backbone dataset split metric reported reproduced delta status: the missing ones are marked "-"
    assert cells[5] == "-" and cells[7] == "-" and cells[6] == "40" and cells[8] == "smoke"
    assert "nan" not in md.lower()
    bicycle = next(ln for ln in md.splitlines() if "bicycle" in ln)
    assert [c.strip() for c in bicycle.strip("|").split("|")] == ["bicycle", "-"]  # class absent from the split
    delta_line = next(ln for ln in md.splitlines() if "cam_miou" in ln)
    assert "0.8" in delta_line  # 75.0 - 74.2
    assert (tmp_path / "per_class.csv").read_text().splitlines()[0] == "class,seg"


def test_reported_numbers_have_sources():
    df = report.reported_numbers()
    assert {"method", "backbone", "dataset", "split", "metric", "protocol", "value", "source"} <= set(df.columns)
    assert len(df) >= 10
    assert df["source"].notna().all() and (df["source"].astype(str).str.strip() != "").all()
    assert df["value"].notna().all()
    # the spec's table
    assert report.lookup_reported("LOC-BE", "voc", "seg_miou") == 73.1
    assert report.lookup_reported("LOC-BE", "voc", "cam_miou") == 74.2
    assert report.lookup_reported("LOC-BE", "coco", "seg_miou") == 43.4
    assert report.lookup_reported("LOC-BE", "coco", "cam_miou") == 43.8
    assert report.lookup_reported("ToCo", "voc", "seg_miou", "single scale") == 69.2
    assert report.lookup_reported("ToCo", "coco", "seg_miou", "MS+CRF") == 42.2
    assert report.lookup_reported("LOC-BE", "synthetic", "seg_miou") is None
    # split and protocol: never the number of another split or protocol; "unstated" matches any
    assert report.lookup_reported("ToCo", "voc", "seg_miou", "MS+CRF", split="val") == 71.1
    assert report.lookup_reported("ToCo", "voc", "seg_miou", "MS+CRF", split="test") == 72.2
    assert report.lookup_reported("ToCo", "voc", "seg_miou", "single scale", split="test") is None
    assert report.lookup_reported("ToCo", "coco", "seg_miou", "single scale", split="val") is None
    assert report.lookup_reported("LOC-BE", "voc", "seg_miou", "MS+CRF", split="val") == 73.1
    assert report.lookup_reported("LOC-BE", "voc", "cam_miou", split="train") == 74.2
