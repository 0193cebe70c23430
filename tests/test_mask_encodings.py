"""Masks encoded as the real releases encode them (issue 17, point 8): VOC's ``SegmentationClass`` palette PNGs,
SBD's ``SegmentationClassAug`` and COCO's single-channel PNGs; the loaders give the same labels for both kinds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from locbe.cli import main as cli
from locbe.data.voc import build_dataset, labels_from_mask, read_mask
from locbe.data.voc_layout import make_coco_layout, make_voc_layout

# PASCAL VOC's colour map as published with the devkit: background, aeroplane, bicycle, ..., void (255)
VOC_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 15: (192, 128, 128),
               20: (0, 64, 128), 255: (224, 224, 192)}


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_voc_layout(tmp_path_factory.mktemp("voc"), num_train=4, num_val=2)


def test_voc_layout_palette_and_single_channel_masks_hold_the_same_labels(voc):
    both = sorted(p.stem for p in (voc / "SegmentationClass").glob("*.png"))
    assert len(both) >= 3  # val and a part of train: VOC's own masks
    checked = set()
    for name in both:
        with Image.open(voc / "SegmentationClass" / f"{name}.png") as p, \
                Image.open(voc / "SegmentationClassAug" / f"{name}.png") as gray:
            assert p.mode == "P" and gray.mode == "L"
            indices = np.asarray(p)
            assert np.array_equal(indices, np.asarray(gray))
            colours = np.asarray(p.convert("RGB"))
            checked |= set(np.unique(indices).tolist()) & set(VOC_COLOURS)
        for label, colour in VOC_COLOURS.items():  # the palette is VOC's colour map
            assert (colours[indices == label] == colour).all()
        assert np.array_equal(read_mask(voc / "SegmentationClass" / f"{name}.png", 21),
                              read_mask(voc / "SegmentationClassAug" / f"{name}.png", 21))
    assert checked - {0, 255}  # the colour check met labels beyond background and void


def _tiny_root(root: Path, mask: np.ndarray, mode: str) -> Path:
    from locbe.data.classes import voc_palette

    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)).save(root / "JPEGImages" / "a.jpg")
    m = Image.fromarray(mask, mode=mode)
    if mode == "P":
        m.putpalette(voc_palette())
    m.save(root / "SegmentationClassAug" / "a.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    return root


@pytest.mark.parametrize("train", [False, True])
def test_loaders_give_the_same_labels_for_palette_and_single_channel(tmp_path, train):
    mask = np.zeros((40, 56), np.uint8)
    mask[5:20, 8:30] = 3
    mask[22:35, 30:50] = 15
    mask[19:23, :] = 255
    items = [build_dataset("voc", _tiny_root(tmp_path / mode, mask, mode), "train", train=train, crop_size=32)[0]
             for mode in ("P", "L")]
    assert np.array_equal(items[0]["mask"].numpy(), items[1]["mask"].numpy())
    assert np.array_equal(items[0]["cls_label"].numpy(), items[1]["cls_label"].numpy())
    assert np.flatnonzero(items[0]["cls_label"].numpy()).tolist() == [2, 14]  # classes 3 and 15
    if not train:
        assert np.array_equal(items[0]["mask"].numpy(), mask)


def test_coco_layout_masks_are_single_channel_and_load(tmp_path, capsys):
    root = make_coco_layout(tmp_path / "coco", num_train=2, num_val=3)
    labels = np.load(root / "cls_labels_onehot.npy", allow_pickle=True).item()  # made from the generated arrays
    ds = build_dataset("coco", root, "val", train=False)
    for i in range(len(ds)):
        item = ds[i]
        with Image.open(root / "SegmentationClass" / "val2014" / f"{item['name']}.png") as m:
            assert m.mode == "L"
        mask = item["mask"].numpy()
        assert np.array_equal(labels_from_mask(mask, 81), labels[item["name"]])
    assert cli(["check-data", "--dataset", "coco", "--data-root", str(root), "--split", "train", "--split", "val",
                "--no-progress"]) == 0
    assert capsys.readouterr().out.count("no problems") == 2
