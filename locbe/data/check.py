"""`locbe check-data`: every image and mask of a split read once, every bad file listed at once.

Without it a corrupt file is found only when its batch comes up, hours into a run (or never, in a short
one). Two depths:

- full (``locbe check-data``): decodes every image and mask in a process pool sized to the cores; finds
  missing, unreadable and truncated files, masks whose size differs from their image, masks that are not
  class-index images, and label values outside the classes (255, ignore, is allowed);
- fast (``train`` / ``reproduce`` before step 0, ``locbe check-data --fast``): opens headers only (format,
  mode, size), no pixel decode; finds missing and unreadable files, wrong mask modes and size mismatches.
  A file cut short after its header (truncated) and label values outside the classes need the full decode:
  the fast check cannot see them.

Torch-free: the pool's workers import PIL and numpy only.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from locbe.data.classes import DATASET_CLASSES, IGNORE_INDEX, MASK_MODES
from locbe.data.paths import require_root, split_folders, split_list, split_needs_masks
from locbe.errors import DataError, MissingPathError


@dataclass(frozen=True)
class BadFile:
    path: str
    problem: str  # one of PROBLEMS
    detail: str

    def line(self) -> str:
        return f"{self.path}: {self.problem}: {self.detail}"


PROBLEMS = ("missing", "unreadable", "truncated", "not a class-index mask", "mask size differs from the image",
            "labels outside the classes")


@dataclass
class CheckResult:
    dataset: str
    root: Path
    split: str
    split_file: Path
    full: bool
    images: int
    masks: int
    workers: int
    seconds: float
    bad: list[BadFile] = field(default_factory=list)

    def summary(self) -> str:
        what = "decoded" if self.full else "read (headers only)"
        rate = self.images / max(self.seconds, 1e-9)
        return (f"split {self.split!r} of {self.root}: {self.images} images and {self.masks} masks {what} in "
                f"{self.seconds:.1f} s ({rate:.0f} images/s, {self.workers} process(es)): "
                + ("no problems" if not self.bad else f"{len(self.bad)} bad files"))


# ----------------------------------------------------------------------------- one item (runs in a worker)
def _open_problem(path: str, error: BaseException, while_decoding: bool) -> BadFile:
    from PIL import UnidentifiedImageError

    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, UnidentifiedImageError):
        return BadFile(path, "unreadable", "not an image PIL can identify (corrupt header, empty, or another format)")
    if "truncated" in text.lower():
        return BadFile(path, "truncated", text)
    return BadFile(path, "unreadable", f"{'decoding failed' if while_decoding else 'cannot open'}: {text}")


def _read(path: str, full: bool):
    """(image or None, BadFile or None): a header-only PIL image, or a decoded one when ``full``."""
    from PIL import Image

    if not os.path.isfile(path):
        return None, BadFile(path, "missing", "listed in the split file but not on disk")
    try:
        im = Image.open(path)
    except Exception as e:  # noqa: BLE001 - any failure to open is a bad file, never a crashed check
        return None, _open_problem(path, e, while_decoding=False)
    if full:
        try:
            im.load()
        except Exception as e:  # noqa: BLE001
            im.close()
            return None, _open_problem(path, e, while_decoding=True)
    return im, None


def _label_values(mask) -> np.ndarray:
    if mask.mode in ("P", "L"):  # 256-bin histogram in C, no array copy
        return np.flatnonzero(np.asarray(mask.histogram()[:256]))
    return np.unique(np.asarray(mask))


def check_item(task: tuple[str, str | None], *, num_classes: int, full: bool) -> list[BadFile]:
    """The problems of one (image path, mask path or None) pair; [] when both are fine."""
    image_path, mask_path = task
    bad = []
    image, problem = _read(image_path, full)
    if problem:
        bad.append(problem)
    size = image.size if image is not None else None
    if image is not None:
        image.close()
    if mask_path is None:
        return bad
    mask, problem = _read(mask_path, full)
    if problem:
        return [*bad, problem]
    try:
        if mask.mode not in MASK_MODES:
            bad.append(BadFile(mask_path, "not a class-index mask",
                               f"mode {mask.mode}; expected a palette (P) or single-channel (L) PNG of class indices"))
            return bad
        if size is not None and mask.size != size:
            bad.append(BadFile(mask_path, "mask size differs from the image",
                               f"mask {mask.size[0]}x{mask.size[1]}, image {size[0]}x{size[1]}"))
        if full:
            values = _label_values(mask)
            outside = values[(values >= num_classes) & (values != IGNORE_INDEX)]
            if outside.size:
                bad.append(BadFile(mask_path, "labels outside the classes",
                                   f"values {outside.tolist()[:10]}; allowed 0-{num_classes - 1} and "
                                   f"{IGNORE_INDEX} (ignore); is the number of classes ({num_classes}) right?"))
    finally:
        mask.close()
    return bad


# ----------------------------------------------------------------------------- a split
def split_tasks(root: Path, split: str) -> tuple[Path, list[tuple[str, str | None]]]:
    """The split file and the (image path, mask path or None) of every item it lists, in list order."""
    require_root(root)
    split_file, names = split_list(root, split)
    image_dir, mask_dir = split_folders(root, split)
    if split_needs_masks(split) and mask_dir is None:
        raise MissingPathError(f"no mask folder under {root} (expected SegmentationClassAug or SegmentationClass)")
    with_masks = split_needs_masks(split)
    return split_file, [(str(image_dir / f"{n}.jpg"), str(mask_dir / f"{n}.png") if with_masks else None)
                        for n in names]


def check_split(dataset: str, root: str | Path, split: str, *, num_classes: int | None = None, full: bool = True,
                workers: int | None = None, progress: bool = True, leave: bool = True) -> CheckResult:
    """Check every item of ``split``; ``workers`` processes (default: the cores; 1 runs here, no pool).
    ``leave=False``: the bar is transient (``locbe.runtime.progress``), for a caller that prints the result."""
    from locbe.runtime.device import cpu_cores
    from locbe.runtime.progress import progress_bar

    if dataset not in DATASET_CLASSES:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASET_CLASSES)}")
    root = Path(root)
    split_file, tasks = split_tasks(root, split)
    num_classes = num_classes or DATASET_CLASSES[dataset]
    workers = max(1, min(workers or cpu_cores(), len(tasks)))
    one = functools.partial(check_item, num_classes=num_classes, full=full)
    bad: list[BadFile] = []
    t0 = time.perf_counter()
    with progress_bar(total=len(tasks), desc=f"check {split}{'' if full else ' (headers)'}", unit="img",
                      disable=not progress, leave=leave) as bar:
        if workers == 1:
            results = map(one, tasks)
            pool = None
        else:
            pool = ProcessPoolExecutor(max_workers=workers)
            results = pool.map(one, tasks, chunksize=max(1, min(64, len(tasks) // (8 * workers))))
        try:
            for problems in results:
                bad.extend(problems)
                bar.update(1)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    masks = sum(mask is not None for _, mask in tasks)
    return CheckResult(dataset, root, split, split_file, full, len(tasks), masks, workers, time.perf_counter() - t0,
                       bad)


def raise_if_bad(results: list[CheckResult], remedy: str, *, print_lines: bool = True) -> None:
    """Print every bad file, one line each, to stderr, then raise one ``DataError`` that sums them up."""
    bad = [b for r in results for b in r.bad]
    if not bad:
        return
    if print_lines:
        for b in bad:
            print(b.line(), file=sys.stderr)
    counts = {p: sum(b.problem == p for b in bad) for p in PROBLEMS}
    failed = [r for r in results if r.bad]
    where = (f"split {failed[0].split!r}" if len(failed) == 1 else
             "splits " + ", ".join(f"{r.split!r} ({len(r.bad)})" for r in failed))
    lists = " / ".join(str(r.split_file) for r in failed)
    raise DataError(f"{len(bad)} bad files in {where} of {results[0].root} (listed above: "
                    + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
                    + f"); re-extract them from the dataset archive or remove their names from {lists}{remedy}")


def check_before_training(dataset: str, root: str | Path, splits: list[str], num_classes: int, *,
                          progress: bool, is_main: bool = True) -> list[CheckResult]:
    """The fast check of every split a run will read, before anything is written; ``DataError`` (exit 2)
    after listing the bad files. Rank 0 prints one line per split (a transient bar while it runs, on a terminal);
    every rank raises."""
    results = []
    for s in dict.fromkeys(splits):
        results.append(check_split(dataset, root, s, num_classes=num_classes, full=False, workers=1,
                                   progress=progress and is_main, leave=False))
        if is_main:
            print(f"[data] {results[-1].summary()}", flush=True)
    raise_if_bad(results, "; `locbe check-data` decodes every file, --no-check-data skips this check",
                 print_lines=is_main)
    return results


# ----------------------------------------------------------------------------- the command
def add_arguments(p) -> None:
    p.add_argument("--dataset", choices=sorted(DATASET_CLASSES), required=True, help="sets the number of classes")
    p.add_argument("--data-root", required=True, help="dataset root (VOC2012, COCO in VOC layout, synthetic folder)")
    p.add_argument("--split", action="append", required=True,
                   help="split list to check, e.g. train_aug (repeatable: --split train_aug --split val)")
    p.add_argument("--num-classes", type=int, help="classes with background (default: the dataset's)")
    p.add_argument("--workers", type=int, help="processes (default: the CPU cores this process may use)")
    p.add_argument("--fast", action="store_true",
                   help="headers and sizes only, as train/reproduce do before step 0 (no truncation or label check)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    if args.workers is not None and args.workers < 1:
        raise DataError(f"--workers must be >= 1, got {args.workers}")
    results = []
    for split in dict.fromkeys(args.split):
        result = check_split(args.dataset, args.data_root, split, num_classes=args.num_classes, full=not args.fast,
                             workers=args.workers, progress=not args.no_progress)
        print(result.summary())
        results.append(result)
    raise_if_bad(results, "" if not args.fast else "; without --fast every file is decoded")
    return 0
