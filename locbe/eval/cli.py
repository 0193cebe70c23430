"""`locbe eval` arguments (no torch import: ``locbe eval --help`` stays instant); the work is in
``locbe.eval.evaluate.run``."""

from __future__ import annotations

import os
from pathlib import Path

CRF_WORKERS = max(1, min(2, os.cpu_count() or 1))  # EvalOptions.workers


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="our .pth, or the authors' LOC-BE / ToCo .pth")
    p.add_argument("--dataset", default="voc", choices=["voc", "coco", "synthetic"],
                   help="dataset layout and class list")
    p.add_argument("--data-root", required=True, help="dataset root (VOC2012 / COCO in VOC layout / synthetic)")
    p.add_argument("--split", default="val", help="split list to evaluate (ImageSets/.../<split>.txt)")
    p.add_argument("--backbone", help="needed for the authors' checkpoints if not ViT-B/16")
    p.add_argument("--num-classes", type=int, help="21 VOC, 81 COCO (read from our checkpoints)")
    p.add_argument("--multi-scale", action="store_true", help="scales 1.0/1.25/1.5 x flip")
    p.add_argument("--crf", action="store_true", help="dense CRF post-processing (pydensecrf)")
    p.add_argument("--cam", action="store_true", help="also CAM and PAR pseudo-label mIoU")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images (default: all)")
    p.add_argument("--workers", type=int, default=CRF_WORKERS, help="CRF processes")
    p.add_argument("--save-predictions", type=Path, help="write palette PNGs here")
    p.add_argument("--save-logits", action="store_true", help="with --save-predictions: also fp16 .npy logits")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda when available")
    p.add_argument("--out", type=Path, help="metrics.json goes here (default: next to the checkpoint)")


def run(args) -> int:
    from locbe.eval.evaluate import run as evaluate_run

    return evaluate_run(args)
