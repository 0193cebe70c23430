"""`locbe eval` arguments (no torch import: ``locbe eval --help`` stays instant); the work is in
``locbe.eval.evaluate.run``."""

from __future__ import annotations

import os
from pathlib import Path

CRF_BACKENDS = ("lattice", "pydensecrf")  # = locbe.eval.crf.BACKENDS (that module imports numpy); default first
CRF_WORKERS = None  # EvalOptions.workers: None = the CPU cores shared among this node's torchrun ranks


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="our .pth, or the authors' LOC-BE / ToCo .pth")
    p.add_argument("--dataset", default="voc", choices=["voc", "coco", "synthetic"],
                   help="dataset layout and class list")
    p.add_argument("--data-root", required=True, help="dataset root (VOC2012 / COCO in VOC layout / synthetic)")
    p.add_argument("--split", default="val",
                   help="split list to evaluate (ImageSets/.../<split>.txt; COCO: the full 'val' by default)")
    p.add_argument("--backbone", help="needed for the authors' checkpoints if not ViT-B/16")
    p.add_argument("--num-classes", type=int, help="21 VOC, 81 COCO (read from our checkpoints)")
    p.add_argument("--multi-scale", action="store_true",
                   help="the dataset protocol's scales x flip (locbe/eval/protocol.py)")
    p.add_argument("--crf", action="store_true", help="dense CRF post-processing (backend: --crf-backend)")
    p.add_argument("--crf-backend", choices=CRF_BACKENDS, default=CRF_BACKENDS[0],
                   help="with --crf: 'lattice' (locbe's lattice on the model's device, the default) or 'pydensecrf' "
                        "(the authors' library, --workers processes); both compute pydensecrf's CRF "
                        "(docs/fidelity.md gives their agreement)")
    p.add_argument("--cam", action="store_true", help="also CAM and PAR pseudo-label mIoU")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images (default: all)")
    p.add_argument("--protocol", choices=["voc", "coco", "smoke"], help="evaluation protocol (default: the dataset's)")
    p.add_argument("--workers", type=int, default=CRF_WORKERS,
                   help="CRF processes (default: the CPU cores / torchrun ranks on this node)")
    p.add_argument("--batch-size", type=int, help="images per forward where shapes allow (default: 1 CPU, 8 CUDA)")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                   help="autocast for the network passes (recorded in the metrics)")
    p.add_argument("--save-predictions", type=Path, help="write palette PNGs here: <name>.png the seg prediction, "
                   "<name>.crf-<backend>.png the CRF's (with --crf)")
    p.add_argument("--save-logits", action="store_true", help="with --save-predictions: also fp16 .npy logits")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda when available")
    p.add_argument("--out", type=Path, help="metrics.json goes here (default: next to the checkpoint)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over instead of resuming from the per-image records of an interrupted run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    out = args.out or Path(args.checkpoint).parent
    run_dir = run_dir_of(out)
    if run_dir is None:
        return _evaluate(args)
    from locbe.runtime.runlock import run_dir_lock

    # writing into a run directory: not while another locbe process uses it (torchrun: rank 0 holds the lock);
    # taken before torch loads, so a refusal comes at once
    with run_dir_lock(run_dir, "locbe eval", take=int(os.environ.get("RANK", "0")) == 0):
        return _evaluate(args)


def _evaluate(args) -> int:
    from locbe.eval.evaluate import run as evaluate_run

    return evaluate_run(args)


def run_dir_of(out: Path) -> Path | None:
    """The run directory that ``out`` is (or whose ``checkpoints/`` it is), or None when it is no run directory."""
    out = Path(out)
    for d in (out, out.parent):
        if (d / "config.json").is_file() or (d / "checkpoints").is_dir():
            return d
    return None
