"""Data pipeline: augmentation geometry (img_box), bad inputs, the synthetic generator, make-cls-labels.

Expected values are derived independently of the code under test: pixel ids encoded in the image,
masks built from the same ids, ImageNet mean/std written out here, labels from ``np.unique``.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from locbe.cli import main as cli_main
from locbe.data.synthetic import SyntheticConfig, make_synthetic
from locbe.data.transforms import AugmentConfig, augment
from locbe.data.voc import build_dataset

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
C = 21  # VOC classes incl. background
LABEL_FILE = "cls_labels_onehot.npy"


# ---------------------------------------------------------------------------------------------- helpers
def to_uint8(normalised: np.ndarray) -> np.ndarray:
    """ImageNet-normalised float (..., 3) -> the uint8 pixel values it came from."""
    return np.rint((normalised.astype(np.float64) * STD + MEAN) * 255).astype(np.int64)


def onehot_from_mask(mask: np.ndarray, num_classes: int = C) -> np.ndarray:
    out = np.zeros(num_classes - 1, dtype=np.float32)
    for v in np.unique(mask):
        if 0 < v < num_classes:
            out[v - 1] = 1
    return out


def id_image(h: int, w: int):
    """RGB image whose pixel (y, x) encodes id = y*w + x as (id % 256, id // 256, 7); mask = id % 20 + 1."""
    ids = np.arange(h * w, dtype=np.int64).reshape(h, w)
    rgb = np.stack([ids % 256, ids // 256, np.full_like(ids, 7)], axis=-1).astype(np.uint8)
    mask = (ids % 20 + 1).astype(np.uint8)
    return Image.fromarray(rgb), Image.fromarray(mask), ids


def geometric(crop: int, scale: float = 1.0, flip: bool = True, mirror_box: bool = True) -> AugmentConfig:
    """No photometric ops; both flips on (``flip``); the box mirrored with the second flip unless
    ``mirror_box=False`` (the authors' defect)."""
    return AugmentConfig(crop_size=crop, scale_range=(scale, scale), flip=flip, view_flip=flip,
                         mirror_box=mirror_box, photometric=False)


def box_mask(box, crop: int) -> np.ndarray:
    y0, y1, x0, x1 = (int(v) for v in box)
    valid = np.zeros((crop, crop), dtype=bool)
    valid[y0:y1, x0:x1] = True
    return valid


def check_padding(out, m, box, crop):
    """Outside img_box: image black (0 in 0..255 before normalisation), mask 255; returns the box mask."""
    assert out.shape == (crop, crop, 3) and m.shape == (crop, crop) and tuple(box.shape) == (4,)
    y0, y1, x0, x1 = (int(v) for v in box)
    assert 0 <= y0 < y1 <= crop and 0 <= x0 < x1 <= crop
    valid = box_mask(box, crop)
    assert np.all(to_uint8(out[~valid]) == 0)
    assert np.all(m[~valid] == 255)
    return valid


def write_voc(root: Path, n: int = 3, h: int = 24, w: int = 32, labels_file: bool = False) -> list[str]:
    """A tiny hand-made VOC-layout dataset: random images, masks with one class square and a 255 pixel."""
    rng = np.random.default_rng(0)
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    names = [f"img{i}" for i in range(n)]
    labels = {}
    for i, name in enumerate(names):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[4:12, 5:15] = i + 1
        mask[0, 0] = 255
        Image.fromarray(mask, mode="L").save(root / "SegmentationClassAug" / f"{name}.png")
        vec = np.zeros(C - 1, dtype=np.float32)
        vec[i] = 1
        labels[name] = vec
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names) + "\n")
    if labels_file:
        np.save(root / LABEL_FILE, labels, allow_pickle=True)
    return names


TINY_SYN = SyntheticConfig(seed=3, num_train=12, num_val=4, min_size=64, max_size=96)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn") / "voc", TINY_SYN)


# ---------------------------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("h,w", [(37, 53), (60, 20), (20, 20), (70, 90), (48, 48)])
@pytest.mark.parametrize("seed", range(6))
def test_img_box_exact_pixel_ids(h, w, seed):
    """Scale 1: every pixel inside img_box is a real image pixel, the window is a contiguous (possibly
    mirrored) block of the original, and its mask value is the one derived from the same pixel id."""
    crop = 48
    img, mask, _ = id_image(h, w)
    out, m, box = augment(img, mask, geometric(crop), np.random.default_rng(seed))
    valid = check_padding(out, m, box, crop)
    y0, y1, x0, x1 = (int(v) for v in box)
    assert (y1 - y0, x1 - x0) == (min(h, crop), min(w, crop))
    px = to_uint8(out[y0:y1, x0:x1])
    assert np.all(px[..., 2] == 7)
    ids = px[..., 0] + 256 * px[..., 1]
    assert np.all(ids < h * w)
    oy, ox = ids // w, ids % w
    # rows map to consecutive original rows, columns to consecutive (or mirrored) original columns
    assert np.all(oy == oy[:, :1]) and np.all(np.diff(oy[:, 0]) == 1)
    assert np.all(ox == ox[:1, :])
    if ox.shape[1] > 1:
        steps = np.unique(np.diff(ox[0]))
        assert steps.tolist() in ([1], [-1])
    assert np.array_equal(m[y0:y1, x0:x1], ids % 20 + 1)
    assert np.all(m[valid] != 255)


def _flip_direction(seed: int, flip: bool) -> int:
    img, mask, _ = id_image(16, 24)
    out, m, box = augment(img, mask, geometric(32, flip=flip), np.random.default_rng(seed))
    y0, y1, x0, x1 = (int(v) for v in box)
    ids = to_uint8(out[y0, x0:x1])
    ids = ids[:, 0] + 256 * ids[:, 1]
    assert np.array_equal(m[y0, x0:x1], ids % 20 + 1)  # the mask follows the image in both directions
    return int(np.sign(ids[1] - ids[0]))


def test_flip_happens_and_mask_follows():
    directions = {_flip_direction(s, True) for s in range(24)}
    assert directions == {1, -1}
    assert {_flip_direction(s, False) for s in range(12)} == {1}


@settings(max_examples=60)
@given(h=st.integers(6, 96), w=st.integers(6, 96), crop=st.integers(16, 64),
       scale=st.floats(0.5, 2.0, allow_nan=False), seed=st.integers(0, 2**32 - 1))
def test_augment_geometry_any_size(h, w, crop, scale, seed):
    """Random sizes and scales: box size, padding, and image/mask alignment. The image is a pair of linear
    ramps (R ~ x, G ~ y), which bilinear resizing preserves, so each valid pixel's R/G give its original
    position; the mask (a 3x3 grid of regions, nearest-resized) must name the region at that position."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([np.rint(xx * 255 / max(w - 1, 1)), np.rint(yy * 255 / max(h - 1, 1)),
                    np.zeros_like(xx)], axis=-1).astype(np.uint8)
    col, row = xx * 3 // w, yy * 3 // h
    mask = (1 + col + 3 * row).astype(np.uint8)
    out, m, box = augment(Image.fromarray(rgb), Image.fromarray(mask), geometric(crop, scale),
                          np.random.default_rng(seed))
    valid = check_padding(out, m, box, crop)
    y0, y1, x0, x1 = (int(v) for v in box)
    rh, rw = max(int(h * scale), 1), max(int(w * scale), 1)
    assert (y1 - y0, x1 - x0) == (min(rh, crop), min(rw, crop))
    assert np.all((m[valid] >= 1) & (m[valid] <= 9))
    px = to_uint8(out[valid])
    x_est = px[:, 0] * max(w - 1, 1) / 255
    y_est = px[:, 1] * max(h - 1, 1) / 255
    mv = m[valid] - 1
    tol = 2 + 1 / scale  # resampling footprint + uint8 rounding, in original pixels
    for region_of, est, size, coord in ((mv % 3, x_est, w, xx[0]), (mv // 3, y_est, h, yy[:, 0])):
        lo = np.array([coord[coord * 3 // size == r].min() for r in range(3)])
        hi = np.array([coord[coord * 3 // size == r].max() for r in range(3)])
        assert np.all(est >= lo[region_of] - tol), "image and mask disagree on position"
        assert np.all(est <= hi[region_of] + tol), "image and mask disagree on position"


def _id_crop(seed: int, mirror_box: bool, h: int = 20, w: int = 14, crop: int = 32):
    img, mask, _ = id_image(h, w)
    out, m, box = augment(img, mask, geometric(crop, mirror_box=mirror_box), np.random.default_rng(seed))
    real = to_uint8(out)[..., 2] == 7  # every image pixel has blue 7; the padding is black
    return real, m, box, crop


def test_authors_box_is_not_mirrored_by_the_view_flip():
    """fidelity="authors": the second flip (inside global_view1) moves the pixels but not the box, so for
    some seeds the box names padding; the fix mirrors it. Same draws in both modes."""
    moved = 0
    for seed in range(24):
        real_a, m_a, box_a, crop = _id_crop(seed, mirror_box=False)
        real_f, m_f, box_f, _ = _id_crop(seed, mirror_box=True)
        assert np.array_equal(real_a, real_f) and np.array_equal(m_a, m_f)
        assert np.array_equal(real_f, box_mask(box_f, crop))  # the fixed box is exactly the image pixels
        assert np.array_equal(m_f != 255, real_f)  # the mask follows the pixels in both modes
        if not np.array_equal(box_a, box_f):
            y0, y1, x0, x1 = (int(v) for v in box_a)
            assert [y0, y1, crop - x1, crop - x0] == [int(v) for v in box_f]
            assert not np.array_equal(real_a, box_mask(box_a, crop))
            moved += 1
    assert 0 < moved < 24


def test_padding_is_black_and_seen_by_the_photometric_steps():
    """Black pixels are padded BEFORE the photometric steps: blur bleeds the image into the padding and
    brightness scales it (still black); with photometric steps off the padding is exactly black."""
    img = Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8))
    plain = AugmentConfig(crop_size=40, scale_range=(1.0, 1.0), flip=False, view_flip=False, photometric=False)
    blur = AugmentConfig(crop_size=40, scale_range=(1.0, 1.0), flip=False, view_flip=False, jitter_p=0.0,
                         grayscale_p=0.0, blur_p=1.0, blur_radius=(2.0, 2.0))
    out, _, box = augment(img, None, plain, np.random.default_rng(1))
    outside = ~box_mask(box, 40)
    assert np.all(to_uint8(out[outside]) == 0)
    out_b, _, box_b = augment(img, None, blur, np.random.default_rng(1))
    assert np.array_equal(box_b, box)
    y0, y1, x0, x1 = (int(v) for v in box)
    ring = np.zeros((40, 40), dtype=bool)  # the padding pixels touching the image
    ring[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True
    ring &= outside
    assert ring.any()
    px = to_uint8(out_b)
    assert np.all(px[ring] > 0), "blur did not see the padding"
    assert px[box_mask(box, 40)].mean() < 200  # the black border darkens the image's edge


def test_augment_rescale_changes_size():
    img, mask, _ = id_image(40, 40)
    for scale, expected in ((0.5, 20), (1.5, 60), (2.0, 80)):
        out, m, box = augment(img, mask, geometric(128, scale), np.random.default_rng(0))
        assert (int(box[1] - box[0]), int(box[3] - box[2])) == (expected, expected)


def test_augment_seeded():
    img, mask, _ = id_image(50, 70)
    cfg = AugmentConfig(crop_size=48)  # full pipeline incl. photometric ops
    a = augment(img, mask, cfg, np.random.default_rng([0, 0, 5]))
    b = augment(img, mask, cfg, np.random.default_rng([0, 0, 5]))
    c = augment(img, mask, cfg, np.random.default_rng([1, 0, 5]))
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_dataset_item_pure_function_of_seed_epoch_index(tmp_path):
    write_voc(tmp_path, n=2, h=40, w=50)
    ds = build_dataset("voc", tmp_path, "train", train=True, crop_size=32, seed=0)
    a, b = ds[1], ds[1]
    for k in ("image", "mask", "img_box", "cls_label"):
        assert np.array_equal(a[k].numpy(), b[k].numpy())
    ds.set_epoch(1)
    assert not np.array_equal(ds[1]["image"].numpy(), a["image"].numpy())
    other = build_dataset("voc", tmp_path, "train", train=True, crop_size=32, seed=1)
    assert not np.array_equal(other[1]["image"].numpy(), a["image"].numpy())
    # a train item: (3,S,S) crop, mask 255 outside the box, labels from the mask
    assert tuple(a["image"].shape) == (3, 32, 32) and tuple(a["mask"].shape) == (32, 32)
    valid = box_mask(a["img_box"].numpy(), 32)
    assert np.all(a["mask"].numpy()[~valid] == 255)
    assert np.all(a["image"].numpy()[:, ~valid] == 0)
    assert set(np.unique(a["mask"].numpy())) <= {0, 2, 255}
    assert a["cls_label"].tolist() == [0.0, 1.0] + [0.0] * 18


def test_val_path_is_not_augmented(tmp_path):
    write_voc(tmp_path, n=2, h=24, w=32)
    ds = build_dataset("voc", tmp_path, "train", train=False)
    for i, name in enumerate(ds.names):
        item = ds[i]
        raw = np.asarray(Image.open(tmp_path / "JPEGImages" / f"{name}.jpg").convert("RGB"), dtype=np.float64)
        expected = ((raw / 255 - MEAN) / STD).transpose(2, 0, 1)
        assert tuple(item["image"].shape) == (3, 24, 32)
        np.testing.assert_allclose(item["image"].numpy(), expected, atol=1e-5)
        assert np.array_equal(item["mask"].numpy(), np.asarray(Image.open(tmp_path / "SegmentationClassAug" /
                                                                          f"{name}.png")))
        assert item["img_box"].tolist() == [0, 24, 0, 32]
        assert item["name"] == name
        assert np.flatnonzero(item["cls_label"].numpy()).tolist() == [i]


# ---------------------------------------------------------------------------------------------- bad inputs
def _break(root: Path, case: str):
    """Damage a tiny dataset; -> (split, offending path, exception type, raised at 'build' or 'item')."""
    img, msk = root / "JPEGImages" / "img1.jpg", root / "SegmentationClassAug" / "img1.png"
    if case == "missing_root":
        return "train", root / "does_not_exist", FileNotFoundError, "build"
    if case == "missing_split":
        return "nosuch", root / "ImageSets" / "Segmentation" / "nosuch.txt", FileNotFoundError, "build"
    if case == "missing_image":
        img.unlink()
        return "train", img, FileNotFoundError, "build"
    if case == "missing_mask":
        msk.unlink()
        return "train", msk, FileNotFoundError, "build"
    if case == "garbage_image":
        img.write_bytes(b"this is not a jpeg" * 20)
        return "train", img, ValueError, "item"
    if case == "truncated_image":
        data = img.read_bytes()
        img.write_bytes(data[: len(data) // 3])
        return "train", img, ValueError, "item"
    if case == "mask_value_out_of_range":
        bad = np.zeros((24, 32), dtype=np.uint8)
        bad[3, 3] = 30
        Image.fromarray(bad, mode="L").save(msk)
        return "train", msk, ValueError, "item"
    if case == "mask_size_mismatch":
        Image.fromarray(np.zeros((24, 33), dtype=np.uint8), mode="L").save(msk)
        return "train", msk, ValueError, "item"
    if case == "rgb_mask":
        Image.fromarray(np.zeros((24, 32, 3), dtype=np.uint8)).save(msk)
        return "train", msk, ValueError, "item"
    if case == "corrupt_label_file":
        (root / LABEL_FILE).write_bytes(b"garbage")
        return "train", root / LABEL_FILE, ValueError, "build"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_root", "missing_split", "missing_image", "missing_mask", "garbage_image",
                                  "truncated_image", "mask_value_out_of_range", "mask_size_mismatch", "rgb_mask",
                                  "corrupt_label_file"])
@pytest.mark.parametrize("train", [False, True])
def test_bad_input_names_the_path(tmp_path, case, train):
    write_voc(tmp_path)
    split, path, exc, when = _break(tmp_path, case)
    root = path if case == "missing_root" else tmp_path
    if when == "build":
        with pytest.raises(exc) as info:
            build_dataset("voc", root, split, train=train, crop_size=32)
    else:
        ds = build_dataset("voc", root, split, train=train, crop_size=32)
        ds[0]  # the intact items still load
        with pytest.raises(exc) as info:
            ds[1]
    assert str(path) in str(info.value)
    if case == "mask_value_out_of_range":
        assert "30" in str(info.value)


def test_label_file_disagreeing_with_masks_warns_and_uses_file(tmp_path):
    names = write_voc(tmp_path, labels_file=True)
    labels = np.load(tmp_path / LABEL_FILE, allow_pickle=True).item()
    wrong = np.zeros(C - 1, dtype=np.float32)
    wrong[[4, 9]] = 1  # the mask of img1 holds class 2 only (index 1)
    labels[names[1]] = wrong
    np.save(tmp_path / LABEL_FILE, labels, allow_pickle=True)
    ds = build_dataset("voc", tmp_path, "train", train=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # agreeing items do not warn
        assert np.flatnonzero(ds[0]["cls_label"].numpy()).tolist() == [0]
    with pytest.warns(UserWarning, match=names[1]):
        item = ds[1]
    assert np.flatnonzero(item["cls_label"].numpy()).tolist() == [4, 9]  # the file's labels, not the mask's [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per item
        ds[1]
    assert ds.verify() == [names[1]]


# ---------------------------------------------------------------------------------------------- synthetic set
def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_same_seed_byte_identical(tmp_path, synth):
    again = make_synthetic(tmp_path / "again", TINY_SYN)
    a, b = _files(synth), _files(again)
    assert len(a) == 12 + 4 + 12 + 4 + 3 + 2  # jpg + png per image, 3 lists, labels, manifest
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k
    other = _files(make_synthetic(tmp_path / "other", SyntheticConfig(**{**TINY_SYN.__dict__, "seed": 4})))
    assert other.keys() == a.keys()
    differing = [k for k in a if k.endswith((".jpg", ".png")) and a[k] != other[k]]
    assert len(differing) == 32


def test_synthetic_generation_warns_nothing(tmp_path):
    """Seed 3 drew a shape whose far pixels overflow exp() (alpha 0 there, as meant); numpy 1.24 warned about it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_synthetic(tmp_path / "voc", SyntheticConfig(seed=3, num_train=1, num_val=2))


def test_synthetic_existing_dataset(tmp_path, synth):
    assert make_synthetic(synth, TINY_SYN) == synth  # same manifest: kept
    with pytest.raises(FileExistsError, match="--force"):
        make_synthetic(synth, SyntheticConfig(**{**TINY_SYN.__dict__, "seed": 9}))


def test_synthetic_loads_and_labels_match_masks(synth):
    file_labels = np.load(synth / LABEL_FILE, allow_pickle=True).item()
    assert len(file_labels) == 16
    for split, n in (("train", 12), ("train_aug", 12), ("val", 4)):
        ds = build_dataset("synthetic", synth, split, train=False)
        assert len(ds) == n
        for i in range(n):
            item = ds[i]
            mask = np.asarray(Image.open(synth / "SegmentationClassAug" / f"{item['name']}.png"))
            assert np.array_equal(item["mask"].numpy(), mask)
            expected = onehot_from_mask(mask)
            assert np.array_equal(file_labels[item["name"]], expected)
            assert np.array_equal(item["cls_label"].numpy(), expected)
            assert 1 <= expected.sum() <= 3
        assert ds.verify() == []


def test_synthetic_object_sizes(synth):
    fg_fracs = []
    for p in sorted((synth / "SegmentationClassAug").glob("*.png")):
        mask = np.asarray(Image.open(p))
        h, w = mask.shape
        assert 64 <= h <= 96 and 64 <= w <= 96
        assert set(np.unique(mask)) <= set(range(C)) | {255}
        fg = (mask > 0).mean()  # objects incl. their void boundary band
        assert 0.02 <= fg <= 0.75, (p, fg)
        assert (mask == 255).mean() < 0.5 * fg  # the void band is thin relative to the objects
        assert (mask == 0).mean() > 0.2  # background stays visible
        fg_fracs.append(fg)
        img = Image.open(synth / "JPEGImages" / f"{p.stem}.jpg")
        assert img.size == (w, h) and img.mode == "RGB"
    assert 0.05 <= np.mean(fg_fracs) <= 0.5


# ---------------------------------------------------------------------------------------------- make-cls-labels
def test_make_cls_labels_regenerates_synthetic_file(tmp_path, synth, capsys):
    root = tmp_path / "voc"
    shutil.copytree(synth, root)
    original = np.load(root / LABEL_FILE, allow_pickle=True).item()
    (root / LABEL_FILE).unlink()
    assert cli_main(["make-cls-labels", "--data-root", str(root), "--no-progress"]) == 0
    assert str(root / LABEL_FILE) in capsys.readouterr().out
    regenerated = np.load(root / LABEL_FILE, allow_pickle=True).item()
    assert list(regenerated) == list(original)
    for k in original:
        assert regenerated[k].dtype == original[k].dtype and np.array_equal(regenerated[k], original[k]), k
    assert not list(root.glob(".*tmp"))  # no temp file left behind
    # the loader accepts it, and it agrees with the masks
    assert build_dataset("synthetic", root, "val", train=False).verify() == []


def test_make_cls_labels_splits_and_out(tmp_path):
    names = write_voc(tmp_path, n=3)
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("img2\n")
    (tmp_path / "ImageSets" / "Segmentation" / "test.txt").write_text("nomask\n")  # skipped by default
    out = tmp_path / "sub" / "labels.npy"
    assert cli_main(["make-cls-labels", "--data-root", str(tmp_path), "--split", "val", "--out", str(out),
                     "--no-progress"]) == 0
    labels = np.load(out, allow_pickle=True).item()
    assert list(labels) == ["img2"] and np.flatnonzero(labels["img2"]).tolist() == [2]
    assert cli_main(["make-cls-labels", "--data-root", str(tmp_path), "--no-progress"]) == 0
    labels = np.load(tmp_path / LABEL_FILE, allow_pickle=True).item()
    assert sorted(labels) == names
    assert all(np.flatnonzero(labels[n]).tolist() == [i] for i, n in enumerate(names))
    assert all(v.shape == (C - 1,) and v.dtype == np.float32 for v in labels.values())
    with pytest.raises(FileExistsError, match="--force"):  # --debug: the error itself, not its one-line print
        cli_main(["--debug", "make-cls-labels", "--data-root", str(tmp_path), "--no-progress"])
    assert cli_main(["make-cls-labels", "--data-root", str(tmp_path), "--no-progress", "--force",
                     "--splits", "train,val", "--num-classes", "81"]) == 0
    assert np.load(tmp_path / LABEL_FILE, allow_pickle=True).item()["img0"].shape == (80,)


@pytest.mark.parametrize("case", ["missing_root", "missing_mask_dir", "missing_mask", "missing_split",
                                  "bad_mask_value"])
def test_make_cls_labels_errors_name_the_path(tmp_path, case):
    write_voc(tmp_path)
    root, extra = tmp_path, []
    if case == "missing_root":
        root = path = tmp_path / "nope"
        exc = FileNotFoundError
    elif case == "missing_mask_dir":
        shutil.rmtree(tmp_path / "SegmentationClassAug")
        path, exc = tmp_path / "SegmentationClassAug", FileNotFoundError
    elif case == "missing_mask":
        path, exc = tmp_path / "SegmentationClassAug" / "img2.png", FileNotFoundError
        path.unlink()
    elif case == "missing_split":
        path, exc, extra = tmp_path / "ImageSets" / "Segmentation" / "train_aug.txt", FileNotFoundError, \
            ["--split", "train_aug"]
    else:
        path, exc = tmp_path / "SegmentationClassAug" / "img0.png", ValueError
        Image.fromarray(np.full((24, 32), 40, dtype=np.uint8), mode="L").save(path)
    with pytest.raises(exc) as info:
        cli_main(["--debug", "make-cls-labels", "--data-root", str(root), "--no-progress", *extra])
    assert str(path) in str(info.value)
    assert cli_main(["make-cls-labels", "--data-root", str(root), "--no-progress", *extra]) == 2  # one line
    assert not (tmp_path / LABEL_FILE).exists()
