"""Where a split's files live, torch-free: the split list, the image folder and the mask folder.

One rule for the dataset (``locbe.data.voc``) and the data check (``locbe.data.check``), so both read the
same files: lists in ``ImageSets/Segmentation/<split>.txt`` (or ``ImageSets/<split>.txt``), images
``JPEGImages/<name>.jpg``, masks ``<mask folder>/<name>.png`` with the first of ``MASK_DIRS`` that exists,
and the authors' COCO layout's ``train2014`` / ``val2014`` sub-folders.
"""

from __future__ import annotations

from pathlib import Path

from locbe.data.classes import MASK_DIRS
from locbe.errors import DataError, MissingPathError


def require_root(root: Path) -> None:
    if not root.is_dir():
        raise MissingPathError(f"dataset root {root} does not exist; pass --data-root pointing at "
                               "VOC2012 (or COCO in VOC layout), or make one with "
                               "`locbe make-synthetic --out DIR`")


def split_list(root: Path, split: str) -> tuple[Path, list[str]]:
    """The split's list file and the image names it lists (first column of each non-empty line)."""
    candidates = [root / "ImageSets" / "Segmentation" / f"{split}.txt", root / "ImageSets" / f"{split}.txt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise MissingPathError(f"split file for {split!r} not found: looked for "
                               f"{', '.join(map(str, candidates))}; check --data-root and the split name")
    names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"split file {path} lists no images")
    return path, names


def coco_subdir(root: Path, split: str) -> str | None:
    """``train2014`` / ``val2014`` when ``root`` has the authors' COCO layout (``JPEGImages/train2014/...``), as
    their loader picks it: val2014 for a split whose name contains "val", train2014 otherwise."""
    if not (root / "JPEGImages" / "train2014").is_dir() and not (root / "JPEGImages" / "val2014").is_dir():
        return None
    return "val2014" if "val" in split else "train2014"


def split_folders(root: Path, split: str) -> tuple[Path, Path | None]:
    """(image folder, mask folder or None when the root has none) of ``split``."""
    image_dir = root / "JPEGImages"
    mask_dir = next((root / d for d in MASK_DIRS if (root / d).is_dir()), None)
    sub = coco_subdir(root, split)
    if sub is not None:  # the authors' COCO layout: JPEGImages/{train2014,val2014}, masks likewise
        image_dir = image_dir / sub
        if mask_dir is not None:
            mask_dir = mask_dir / sub
    return image_dir, mask_dir


def split_needs_masks(split: str) -> bool:
    """Every split but ``test`` has masks (the dataset reads them for training too)."""
    return split != "test"
