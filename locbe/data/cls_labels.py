"""``locbe make-cls-labels``: derive image-level labels from segmentation masks.

Writes ``cls_labels_onehot.npy`` in the format the dataset loader (``locbe.data.voc``) reads: a pickled
dict ``name -> float32 (num_classes - 1,)`` 0/1 vector of the foreground classes present in the mask
(background 0 excluded, 255 ignored), saved with ``np.save(..., allow_pickle=True)``, keys sorted.
The file is written atomically (temp file in the same folder + ``os.replace``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from locbe.data.classes import LABEL_FILE, MASK_DIRS
from locbe.errors import ConfigError
from locbe.runtime.fileio import atomic_path


def split_files(root: Path) -> dict[str, Path]:
    """Split lists found under ``ImageSets/Segmentation`` (VOC) or ``ImageSets`` (COCO in VOC style)."""
    found: dict[str, Path] = {}
    for d in (root / "ImageSets" / "Segmentation", root / "ImageSets"):
        if d.is_dir():
            for p in sorted(d.glob("*.txt")):
                found.setdefault(p.stem, p)
    return found


def resolve_mask_dir(root: Path, mask_dir: str | None) -> Path:
    if mask_dir:
        path = Path(mask_dir)
        path = path if path.is_absolute() else root / path
        if not path.is_dir():
            raise FileNotFoundError(f"mask folder {path} does not exist; check --mask-dir")
        return path
    for d in MASK_DIRS:
        if (root / d).is_dir():
            return root / d
    raise FileNotFoundError(f"no mask folder under {root}: expected {' or '.join(str(root / d) for d in MASK_DIRS)}; "
                            "extract SegmentationClassAug (VOC+SBD) there or pass --mask-dir")


def collect_names(root: Path, splits: list[str] | None) -> list[str]:
    available = split_files(root)
    if splits is None:  # every list that has masks (test lists have none)
        chosen = [s for s in available if not s.startswith("test")]
        if not chosen:
            raise FileNotFoundError(f"no split lists found in {root / 'ImageSets' / 'Segmentation'} or "
                                    f"{root / 'ImageSets'}; check --data-root or pass --splits")
    else:
        chosen = splits
        for s in chosen:
            if s not in available:
                raise FileNotFoundError(f"split file for {s!r} not found: looked for "
                                        f"{root / 'ImageSets' / 'Segmentation' / (s + '.txt')} and "
                                        f"{root / 'ImageSets' / (s + '.txt')}; found splits: "
                                        f"{', '.join(available) or 'none'}")
    names: dict[str, None] = {}
    for s in chosen:
        for line in available[s].read_text().splitlines():
            if line.strip():
                names.setdefault(line.split()[0], None)
    if not names:
        raise ValueError(f"the split lists {', '.join(str(available[s]) for s in chosen)} name no images")
    return list(names)


def make_cls_labels(root: str | Path, splits: list[str] | None = None, num_classes: int = 21,
                    out: str | Path | None = None, mask_dir: str | None = None, force: bool = False,
                    progress: bool = True) -> tuple[Path, dict[str, np.ndarray]]:
    """Derive the labels of every image in ``splits`` (default: all non-test lists) and write them to ``out``
    (default ``root/cls_labels_onehot.npy``). Returns (path, labels)."""
    from locbe.data.voc import labels_from_mask, read_mask
    from locbe.runtime.progress import progress_bar

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist; pass --data-root pointing at VOC2012 "
                                "(or COCO in VOC layout)")
    if num_classes < 2:
        raise ConfigError(f"--num-classes must be >= 2 (background + at least one class), got {num_classes}")
    out = Path(out) if out else root / LABEL_FILE
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it or --out to write elsewhere")
    masks = resolve_mask_dir(root, mask_dir)
    names = collect_names(root, splits)
    missing = [n for n in names if not (masks / f"{n}.png").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(names)} listed masks are missing, e.g. "
                                f"{masks / (missing[0] + '.png')}; extract the masks there (VOC: "
                                "SegmentationClassAug from SBD) or pass --splits without lists that lack masks")
    labels: dict[str, np.ndarray] = {}
    for name in progress_bar(sorted(names), desc="cls labels", unit="mask", disable=not progress):
        labels[name] = labels_from_mask(read_mask(masks / f"{name}.png", num_classes), num_classes)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, labels, allow_pickle=True)
    return out, labels


def add_arguments(p) -> None:
    p.add_argument("--data-root", required=True, help="VOC-layout root (JPEGImages/, SegmentationClassAug/, "
                                                      "ImageSets/Segmentation/*.txt)")
    p.add_argument("--splits", "--split", dest="splits", default=None,
                   help="comma-separated split lists to cover; None = every list found except test*")
    p.add_argument("--num-classes", type=int, default=21, help="including background (VOC 21, COCO 81)")
    p.add_argument("--mask-dir", default=None,
                   help=f"mask folder; None = the first of {', '.join(MASK_DIRS)} under DATA_ROOT")
    p.add_argument("--out", default=None, help=f"output file; None = DATA_ROOT/{LABEL_FILE}")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    t0 = time.perf_counter()
    out, labels = make_cls_labels(args.data_root, splits, args.num_classes, out=args.out, mask_dir=args.mask_dir,
                                  force=args.force, progress=not args.no_progress)
    counts = np.sum(list(labels.values()), axis=0).astype(int)
    print(f"wrote {out}: labels of {len(labels)} images, {int((counts > 0).sum())}/{args.num_classes - 1} "
          f"classes present ({time.perf_counter() - t0:.1f} s)")
    return 0
