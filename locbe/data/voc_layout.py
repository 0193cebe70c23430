"""Synthetic datasets laid out exactly like the real ones, for rehearsing the real presets on CPU.

``make_voc_layout(root)``: ``root/VOCdevkit/VOC2012`` as PASCAL VOC 2012 + SBD ships it: full-size JPEGs
(500 px on the long side: 500x375, 375x500, 500x333, ...) named like ``2008_000123``, SBD's
``SegmentationClassAug/`` for every train_aug and val image, VOC's own ``SegmentationClass/`` for the
val and a part of the train images, ``ImageSets/Segmentation/{train,val,trainval,train_aug}.txt``, the 20
real classes with 255 void bands. Masks are encoded as the releases encode them: VOC's ``SegmentationClass``
as palette PNGs ("P", the VOC colour map), SBD's ``SegmentationClassAug`` as single-channel ("L") PNGs of
class indices; both decode to the same label array. No ``cls_labels_onehot.npy``: VOC does not ship one,
locbe derives the labels from the masks.

``make_coco_layout(root)``: COCO 2014 in the layout the authors' COCO loader reads: ``JPEGImages/train2014/
COCO_train2014_<12 digits>.jpg`` and ``val2014/``, masks in ``SegmentationClass/{train2014,val2014}/``,
lists ``ImageSets/{train,val,val_part}.txt`` (val_part a subset of val), 80 foreground classes,
``cls_labels_onehot.npy`` (their list folder ships one), images around 640x480, masks as single-channel
("L") PNGs of class indices, which the authors' loader reads as they are.

Pictures come from the synthetic generator (``locbe.data.synthetic``): same seed, same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from locbe.data.classes import COCO_CLASSES, VOC_CLASSES, voc_palette
from locbe.data.synthetic import SyntheticConfig, make_image

VOC_SIZES = [(375, 500), (500, 375), (333, 500), (366, 500), (500, 332), (281, 500)]  # (H, W) common in VOC
COCO_SIZES = [(480, 640), (427, 640), (640, 480), (425, 640), (640, 427)]
LAYOUT_VERSION = 2  # 2: masks encoded per release (was: all palette PNGs)


def encode_mask(mask: np.ndarray, mode: str) -> Image.Image:
    """A uint8 class-index mask as a PNG-ready image: "P" (palette, the VOC colour map: VOC's
    ``SegmentationClass``) or "L" (single channel: SBD's ``SegmentationClassAug``, COCO). Same indices."""
    if mode not in ("P", "L"):
        raise ValueError(f"mask encoding must be 'P' or 'L', got {mode!r}")
    image = Image.fromarray(mask.astype(np.uint8), mode=mode)
    if mode == "P":
        image.putpalette(voc_palette())
    return image


def _write_item(rng, first, size, num_fg, jpg: Path, pngs: list[tuple[Path, str]]) -> np.ndarray:
    """Write one picture and its mask in each (path, encoding) of ``pngs``; returns the mask."""
    image, mask = make_image(rng, first, SyntheticConfig(), size=size, num_fg=num_fg)
    jpg.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(jpg, quality=90, optimize=False)
    for path, mode in pngs:
        path.parent.mkdir(parents=True, exist_ok=True)
        encode_mask(mask, mode).save(path, optimize=False)
    return mask


def _onehot(mask: np.ndarray, num_fg: int) -> np.ndarray:
    v = np.zeros(num_fg, dtype=np.float32)
    present = np.unique(mask)
    v[present[(present > 0) & (present < 255)] - 1] = 1
    return v


def _atomic_tree(out: Path, manifest: dict, build) -> Path:
    """Build into a temp folder beside ``out`` and rename; an existing tree with the same manifest is kept."""
    marker = out / ".locbe-layout.json"
    if marker.is_file() and json.loads(marker.read_text()) == manifest:
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not this rehearsal dataset; choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(tmp)
        (tmp / ".locbe-layout.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def make_voc_layout(root: str | Path, num_train: int = 16, num_val: int = 6, seed: int = 0) -> Path:
    """Write ``root/VOCdevkit/VOC2012`` (see the module docstring); returns that folder (the --data-root)."""
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    manifest = {"layout": "voc2012+sbd", "version": LAYOUT_VERSION, "num_train": num_train, "num_val": num_val,
                "seed": seed, "classes": VOC_CLASSES}

    def build(tmp: Path) -> None:
        names = {"train_aug": [], "val": []}
        in_voc_train = []
        for split, count, sid in (("train_aug", num_train, 0), ("val", num_val, 1)):
            for i in range(count):
                rng = np.random.default_rng([seed, 7, sid, i])
                name = f"{2007 + (i + 3 * sid) % 5}_{(1 + sid) * 1000 + 17 * i:06d}"
                size = VOC_SIZES[int(rng.integers(len(VOC_SIZES)))]
                pngs = [(tmp / "SegmentationClassAug" / f"{name}.png", "L")]  # SBD: single-channel
                if split == "val" or i % 3 == 0:  # VOC's own masks: val and part of train (SBD adds the rest)
                    pngs.append((tmp / "SegmentationClass" / f"{name}.png", "P"))  # VOC: palette
                    if split == "train_aug":
                        in_voc_train.append(name)
                _write_item(rng, i % (len(VOC_CLASSES) - 1), size, len(VOC_CLASSES) - 1,
                            tmp / "JPEGImages" / f"{name}.jpg", pngs)
                names[split].append(name)
        lists = tmp / "ImageSets" / "Segmentation"
        lists.mkdir(parents=True)
        for split, ns in (("train_aug", names["train_aug"]), ("train", in_voc_train), ("val", names["val"]),
                          ("trainval", in_voc_train + names["val"])):
            (lists / f"{split}.txt").write_text("\n".join(ns) + "\n")

    _atomic_tree(voc, manifest, build)
    return voc


def make_coco_layout(root: str | Path, num_train: int = 16, num_val: int = 6, seed: int = 0) -> Path:
    """Write COCO 2014 in the authors' layout under ``root`` (see the module docstring); returns ``root``."""
    root = Path(root)
    num_fg = len(COCO_CLASSES) - 1
    manifest = {"layout": "coco2014-authors", "version": LAYOUT_VERSION, "num_train": num_train, "num_val": num_val,
                "seed": seed, "classes": COCO_CLASSES}

    def build(tmp: Path) -> None:
        labels, names = {}, {"train": [], "val": []}
        for split, count, sid, folder in (("train", num_train, 0, "train2014"), ("val", num_val, 1, "val2014")):
            for i in range(count):
                rng = np.random.default_rng([seed, 8, sid, i])
                name = f"COCO_{folder}_{(sid + 1) * 100000 + 37 * i:012d}"
                size = COCO_SIZES[int(rng.integers(len(COCO_SIZES)))]
                mask = _write_item(rng, (5 * i) % num_fg, size, num_fg, tmp / "JPEGImages" / folder / f"{name}.jpg",
                                   [(tmp / "SegmentationClass" / folder / f"{name}.png", "L")])
                labels[name] = _onehot(mask, num_fg)
                names[split].append(name)
        lists = tmp / "ImageSets"
        lists.mkdir(parents=True)
        part = names["val"][: max(1, len(names["val"]) // 2)]
        for split, ns in (("train", names["train"]), ("val", names["val"]), ("val_part", part)):
            (lists / f"{split}.txt").write_text("\n".join(ns) + "\n")
        with open(tmp / "cls_labels_onehot.npy", "wb") as f:
            np.save(f, {k: labels[k] for k in sorted(labels)}, allow_pickle=True)

    return _atomic_tree(root, manifest, build)


def add_arguments(p) -> None:
    p.add_argument("--dataset", choices=["voc", "coco"], required=True,
                   help="voc: VOC 2012 + SBD layout (21 classes); coco: the authors' COCO 2014 layout (81 classes)")
    p.add_argument("--out", required=True, help="voc: writes OUT/VOCdevkit/VOC2012; coco: writes OUT")
    p.add_argument("--num-train", type=int, default=16, help="training images (train_aug / train2014)")
    p.add_argument("--num-val", type=int, default=6, help="validation images (val / val2014)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")


def run(args) -> int:
    make = make_voc_layout if args.dataset == "voc" else make_coco_layout
    root = make(args.out, args.num_train, args.num_val, args.seed)
    print(f"{args.dataset} layout at {root} ({args.num_train} train / {args.num_val} val); "
          f"use it as --data-root {root}")
    return 0
