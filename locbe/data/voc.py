"""PASCAL VOC 2012 (+SBD ``SegmentationClassAug``) and COCO-2014-in-VOC-style datasets.

Layout under ``root``: ``JPEGImages/<name>.jpg``, masks in ``SegmentationClassAug/`` (VOC; falls back
to ``SegmentationClass/``), split lists ``ImageSets/Segmentation/<split>.txt`` (or ``ImageSets/<split>.txt``),
image-level labels ``cls_labels_onehot.npy`` (dict name -> F-dim 0/1) or derived from the masks. COCO in
the authors' layout keeps images and masks in ``train2014/`` and ``val2014/`` sub-folders
(``JPEGImages/val2014/COCO_val2014_000000000042.jpg``); ``coco_subdir`` picks one as their loader does.

Class-label file vs masks: when both exist and disagree for an item, locbe warns once per item and
uses the file's labels (the labels the authors trained with); ``verify()`` lists every disagreement.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from locbe.data.classes import DATASET_CLASSES, IGNORE_INDEX, LABEL_FILE, MASK_DIRS, MASK_MODES, normalize
from locbe.data.paths import coco_subdir, require_root, split_folders, split_list, split_needs_masks
from locbe.data.transforms import AugmentConfig, augment
from locbe.errors import DataError, MissingPathError

__all__ = ["DATASET_CLASSES", "LABEL_FILE", "MASK_DIRS", "VOCSegmentation", "build_dataset", "coco_subdir",
           "labels_from_mask", "read_image", "read_mask"]


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """F-dim 0/1 vector of the foreground classes present in a mask (255 and background ignored)."""
    present = np.unique(mask)
    out = np.zeros(num_classes - 1, dtype=np.float32)
    fg = present[(present > 0) & (present < num_classes)]
    out[fg - 1] = 1
    return out


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot read image {path} ({e}); the file is corrupt or not an image: "
                         "re-extract it from the dataset archive or remove it from the split list") from e


def read_mask(path: Path, num_classes: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode not in MASK_MODES:
                raise DataError(f"mask {path} has mode {im.mode}; expected a palette (P) or gray (L) index image")
            mask = np.asarray(im, dtype=np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot read mask {path} ({e}); re-extract it from the dataset archive") from e
    bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE_INDEX)])
    if bad.size:
        raise DataError(f"mask {path} holds values {bad.tolist()[:10]} outside [0, {num_classes}) and 255; "
                         f"is the number of classes ({num_classes}) right for this dataset? "
                         "(locbe eval --num-classes N; locbe train --set num_classes=N)")
    return mask


class VOCSegmentation(torch.utils.data.Dataset):
    """Items as DESIGN.md "Data items": train crops with ``img_box``, or full-size val/test images."""

    def __init__(self, root: str | Path, split: str, *, train: bool = False, crop_size: int = 448,
                 num_classes: int = 21, seed: int = 0, augment_cfg: AugmentConfig | None = None,
                 label_file: str | Path | None = None, require_masks: bool | None = None):
        self.root = Path(root)
        require_root(self.root)
        self.split, self.train, self.num_classes, self.seed = split, train, num_classes, seed
        self.epoch = 0
        self.aug = augment_cfg or AugmentConfig(crop_size=crop_size)
        _, self.names = split_list(self.root, split)
        self.image_dir, self.mask_dir = split_folders(self.root, split)
        needs_masks = split_needs_masks(split) if require_masks is None else require_masks
        self._check_files(needs_masks)
        label_path = Path(label_file) if label_file else self.root / LABEL_FILE
        self.file_labels = self._read_label_file(label_path) if label_path.is_file() else None
        if self.file_labels is None and self.mask_dir is None:
            raise MissingPathError(f"no image-level labels for {self.root}: neither {label_path} nor a mask "
                                    f"folder ({' / '.join(MASK_DIRS)}) exists")
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ construction checks
    def _check_files(self, needs_masks: bool) -> None:
        missing = [n for n in self.names if not (self.image_dir / f"{n}.jpg").is_file()]
        if missing:
            raise MissingPathError(f"{len(missing)} images of split {self.split!r} are missing, e.g. "
                                    f"{self.image_dir / (missing[0] + '.jpg')}; fix the dataset or the split list")
        if needs_masks:
            if self.mask_dir is None:
                raise MissingPathError(f"no mask folder under {self.root} (expected {' or '.join(MASK_DIRS)})")
            missing = [n for n in self.names if not (self.mask_dir / f"{n}.png").is_file()]
            if missing:
                raise MissingPathError(f"{len(missing)} masks of split {self.split!r} are missing, e.g. "
                                        f"{self.mask_dir / (missing[0] + '.png')}")
        self.has_masks = needs_masks

    def _read_label_file(self, path: Path) -> dict[str, np.ndarray]:
        try:
            labels = np.load(path, allow_pickle=True).item()
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise DataError(f"cannot read class labels {path} ({e}); regenerate it with "
                             "`locbe make-cls-labels --data-root ROOT --split SPLIT`") from e
        missing = [n for n in self.names if n not in labels]
        if missing and not self.has_masks:
            raise DataError(f"{path} has no labels for {len(missing)} images of {self.split!r}, e.g. {missing[0]}")
        for name, vec in labels.items():
            if len(vec) != self.num_classes - 1:
                raise DataError(f"{path}: labels of {name} have {len(vec)} entries, expected "
                                 f"{self.num_classes - 1} (num_classes - 1)")
            break
        return labels

    # ------------------------------------------------------------------ items
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.names)

    def _labels(self, name: str, mask: np.ndarray | None) -> np.ndarray:
        derived = labels_from_mask(mask, self.num_classes) if mask is not None else None
        if self.file_labels is not None and name in self.file_labels:
            given = np.asarray(self.file_labels[name], dtype=np.float32)
            if derived is not None and not np.array_equal(given, derived) and name not in self._warned:
                self._warned.add(name)
                warnings.warn(f"{name}: class labels in {LABEL_FILE} {np.flatnonzero(given).tolist()} differ from "
                              f"the mask's {np.flatnonzero(derived).tolist()}; using the file's", stacklevel=2)
            return given
        if derived is None:
            raise DataError(f"no class labels for {name}: add it to {self.root / LABEL_FILE}")
        return derived

    def load(self, index: int) -> tuple[str, Image.Image, np.ndarray | None]:
        name = self.names[index]
        image = read_image(self.image_dir / f"{name}.jpg")
        mask = None
        if self.has_masks:
            mask_path = self.mask_dir / f"{name}.png"
            mask = read_mask(mask_path, self.num_classes)
            if mask.shape != (image.height, image.width):
                raise DataError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                                 f"{image.width}x{image.height}; image and mask must have the same size")
        return name, image, mask

    def __getitem__(self, index: int) -> dict:
        name, image, mask = self.load(index)
        cls_label = torch.from_numpy(self._labels(name, mask))
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            mask_img = Image.fromarray(mask.astype(np.uint8)) if mask is not None else None
            arr, m, box = augment(image, mask_img, self.aug, rng)
            if m is None:
                m = np.full(arr.shape[:2], IGNORE_INDEX, dtype=np.int64)
        else:
            arr = normalize(np.asarray(image, dtype=np.float32) / 255.0)
            m = mask if mask is not None else np.full(arr.shape[:2], IGNORE_INDEX, dtype=np.int64)
            box = np.array([0, arr.shape[0], 0, arr.shape[1]], dtype=np.int64)
        return {"name": name, "image": torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))),
                "cls_label": cls_label, "img_box": torch.from_numpy(box), "mask": torch.from_numpy(m.astype(np.int64))}

    # ------------------------------------------------------------------ whole-split check
    def verify(self, progress: bool = False) -> list[str]:
        """Read every item once; returns the names whose label-file entry disagrees with the mask."""
        from locbe.runtime.progress import progress_bar

        disagree = []
        for i in progress_bar(range(len(self)), desc=f"verify {self.split}", unit="img", disable=not progress):
            name, _, mask = self.load(i)
            if mask is not None and self.file_labels is not None and name in self.file_labels:
                if not np.array_equal(np.asarray(self.file_labels[name], np.float32),
                                      labels_from_mask(mask, self.num_classes)):
                    disagree.append(name)
        return disagree


def build_dataset(dataset: str, root, split: str, *, train: bool, crop_size: int = 448,
                  num_classes: int | None = None, seed: int = 0, **kwargs) -> VOCSegmentation:
    if dataset not in DATASET_CLASSES:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASET_CLASSES)}")
    return VOCSegmentation(root, split, train=train, crop_size=crop_size,
                           num_classes=num_classes or DATASET_CLASSES[dataset], seed=seed, **kwargs)
