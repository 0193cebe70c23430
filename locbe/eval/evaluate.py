"""`locbe eval`: segmentation mIoU (single scale or multi-scale x flip, optional dense CRF) and
CAM / pseudo-label quality, on our checkpoints or the authors'.

Final protocol (method.md): seg logits at scales (1.0, 1.25, 1.5) x {img, hflip}, upsampled to the
image size; sum over flips, max over scales; dense CRF on the softmax. During training: val at a
single scale with the image resized to the crop size, CAM / aux-CAM labels from ``cam_to_label``
with the ground-truth image labels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from locbe import cam as camlib
from locbe.data import denormalize
from locbe.eval.metrics import ConfusionMatrix
from locbe.fileio import atomic_path, atomic_write_json

MS_SCALES = (1.0, 1.25, 1.5)


@torch.no_grad()
def seg_logits(model, image: torch.Tensor, scales=(1.0,), flip: bool = False) -> torch.Tensor:
    """(1, C, H, W) logits at the image size: sum over flips, max over scales."""
    h, w = image.shape[-2:]
    best = None
    for s in scales:
        x = image if s == 1.0 else F.interpolate(image, size=(int(s * h), int(s * w)), mode="bilinear",
                                                 align_corners=False)
        views = torch.cat([x, x.flip(-1)]) if flip else x
        out = F.interpolate(model(views).seg_logits, size=(h, w), mode="bilinear", align_corners=False)
        logits = out[:1] + out[1:].flip(-1) if flip else out
        best = logits if best is None else torch.maximum(best, logits)
    return best


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """Normalised (1, 3, H, W) -> (H, W, 3) uint8 for CRF and panels."""
    return (denormalize(image)[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


@torch.no_grad()
def validate_during_training(model, cfg, device, max_images: int | None = None) -> dict:
    """CAM, aux-CAM and seg mIoU on ``cfg.val_split`` at single scale (image resized to the crop size)."""
    from locbe.data import build_dataset

    ds = build_dataset(cfg.dataset, cfg.data_root, cfg.val_split, train=False, num_classes=cfg.num_classes)
    n = len(ds) if max_images is None else min(max_images, len(ds))
    mats = {k: ConfusionMatrix(cfg.num_classes) for k in ("cam", "aux_cam", "seg")}
    for i in range(n):
        item = ds[i]
        gt = item["mask"]
        image = F.interpolate(item["image"][None].to(device), size=(cfg.crop_size, cfg.crop_size),
                              mode="bilinear", align_corners=False)
        label = item["cls_label"][None].to(device)
        cams, aux = camlib.multiscale_cam(model, image, scales=cfg.cam_scales)
        for key, c in (("cam", cams), ("aux_cam", aux)):
            c = F.interpolate(c, size=gt.shape, mode="bilinear", align_corners=False)
            mats[key].update(camlib.cam_to_label(c, label, bkg_thre=cfg.bkg_thre)[0], gt)
        logits = F.interpolate(model(image).seg_logits, size=gt.shape, mode="bilinear", align_corners=False)
        mats["seg"].update(logits.argmax(1)[0], gt)
    return {f"{k}_miou": m.compute()["miou"] for k, m in mats.items()}


@dataclass
class EvalOptions:
    split: str = "val"
    multi_scale: bool = False
    crf: bool = False
    cam: bool = False
    max_images: int | None = None
    workers: int = max(1, min(2, os.cpu_count() or 1))
    save_predictions: Path | None = None
    save_logits: bool = False
    progress: bool = True


@torch.no_grad()
def evaluate(model, dataset, num_classes: int, opts: EvalOptions, device="cpu", cam_cfg=None) -> dict:
    """Seg metrics (and CAM / PAR pseudo-label metrics with ``opts.cam``) over a val-style dataset."""
    from tqdm import tqdm

    from locbe.data import voc_palette
    from locbe.eval.crf import crf_labels_parallel

    model.eval()
    n = len(dataset) if opts.max_images is None else min(opts.max_images, len(dataset))
    scales = MS_SCALES if opts.multi_scale else (1.0,)
    seg_cm, crf_cm = ConfusionMatrix(num_classes), ConfusionMatrix(num_classes)
    cam_cm, par_cm = ConfusionMatrix(num_classes), ConfusionMatrix(num_classes)
    par = None
    if opts.cam:
        from locbe.par import PAR

        par = PAR().to(device)
    crf_jobs, gts, names = [], [], []
    if opts.save_predictions:
        opts.save_predictions.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(n), desc=f"eval {opts.split}", disable=not opts.progress):
        item = dataset[i]
        image, gt = item["image"][None].to(device), item["mask"]
        logits = seg_logits(model, image, scales=scales, flip=opts.multi_scale)
        pred = logits.argmax(1)[0].cpu()
        seg_cm.update(pred, gt)
        if opts.crf:
            crf_jobs.append((to_uint8_image(image), torch.softmax(logits[0], 0).cpu().numpy()))
            gts.append(gt)
            names.append(item["name"])
        if opts.save_predictions:
            _save_palette(opts.save_predictions / f"{item['name']}.png", pred.numpy(), voc_palette())
            if opts.save_logits:
                np.save(opts.save_predictions / f"{item['name']}.npy", logits[0].cpu().numpy().astype(np.float16))
        if opts.cam:
            label = item["cls_label"][None].to(device)
            cams, _ = camlib.multiscale_cam(model, image, scales=cam_cfg.cam_scales)
            cam_cm.update(camlib.cam_to_label(cams, label, bkg_thre=cam_cfg.bkg_thre)[0], gt)
            box = item["img_box"][None]
            refined = camlib.refine_cams_with_par(par, denormalize(image), cams, label, box, high=cam_cfg.high,
                                                  low=cam_cfg.low)
            # pseudo labels leave uncertain pixels at 255; scored as background (what training does not learn)
            refined = refined[0].cpu()
            par_cm.update(torch.where(refined == camlib.IGNORE, torch.zeros_like(refined), refined), gt)
    results = {"split": opts.split, "num_images": n, "scales": list(scales), "flip": opts.multi_scale,
               "seg": seg_cm.compute()}
    if opts.crf:
        for labels, gt in zip(crf_labels_parallel(crf_jobs, opts.workers, progress=opts.progress), gts):
            crf_cm.update(torch.from_numpy(labels.astype(np.int64)), gt)
        results["seg_crf"] = crf_cm.compute()
    if opts.cam:
        results["cam"] = cam_cm.compute()
        results["pseudo_label_par"] = par_cm.compute()
    return results


def _save_palette(path: Path, label: np.ndarray, palette: list[int]) -> None:
    from PIL import Image

    im = Image.fromarray(label.astype(np.uint8), mode="P")
    im.putpalette(palette)
    with atomic_path(path, suffix=".png") as tmp:
        im.save(tmp)


def trivial_baselines(dataset, num_classes: int, max_images: int | None = None) -> dict:
    """mIoU of two label-only predictions: all background; every pixel = the first present image class."""
    cms = {"all_background": ConfusionMatrix(num_classes), "image_label_everywhere": ConfusionMatrix(num_classes)}
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    for i in range(n):
        _, _, mask = dataset.load(i)
        gt = torch.from_numpy(mask)
        present = torch.nonzero(dataset[i]["cls_label"]).flatten()
        cms["all_background"].update(torch.zeros_like(gt), gt)
        first = int(present[0]) + 1 if len(present) else 0
        cms["image_label_everywhere"].update(torch.full_like(gt, first), gt)
    return {k: v.compute() for k, v in cms.items()}


def load_model_for_eval(checkpoint: str, backbone: str | None, num_classes: int | None, device):
    """Our checkpoints carry their config; the authors' need --backbone / --num-classes (defaults: ViT-B, 21)."""
    from locbe.models import build_model
    from locbe.models.checkpoint import load_state, read_checkpoint

    path = Path(checkpoint)
    obj = read_checkpoint(path)  # read once: the config (ours) and the weights
    config = obj.get("config") if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None
    backbone = backbone or (config or {}).get("backbone", "vit_base_patch16_224")
    num_classes = num_classes or (config or {}).get("num_classes", 21)
    model = build_model(backbone, num_classes=num_classes)
    load_state(model, obj, path, strict=True)
    return model.to(device).eval(), config


def run(args) -> int:
    """`locbe eval` (arguments: locbe/eval/cli.py)."""
    from locbe.config import get_preset
    from locbe.data import VOC_CLASSES, build_dataset

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    model, config = load_model_for_eval(args.checkpoint, args.backbone, args.num_classes, device)
    ds = build_dataset(args.dataset, args.data_root, args.split, train=False, num_classes=model.num_classes)
    cam_cfg = get_preset("coco" if args.dataset == "coco" else "voc")
    opts = EvalOptions(split=args.split, multi_scale=args.multi_scale, crf=args.crf, cam=args.cam,
                       max_images=args.max_images, workers=args.workers, save_predictions=args.save_predictions,
                       save_logits=args.save_logits)
    results = evaluate(model, ds, model.num_classes, opts, device, cam_cfg=cam_cfg)
    out = args.out or Path(args.checkpoint).parent
    atomic_write_json(out / f"metrics_{args.split}.json", {"checkpoint": str(args.checkpoint), **results})
    names = VOC_CLASSES if model.num_classes == 21 else [str(i) for i in range(model.num_classes)]
    for key in ("seg", "seg_crf", "cam", "pseudo_label_par"):
        if key in results:
            print(f"{key:>18}: mIoU {100 * results[key]['miou']:.2f}  pixel acc {100 * results[key]['pixel_acc']:.2f}")
    if "seg" in results:
        per = [f"{names[c]}={100 * v:.1f}" for c, v in enumerate(results["seg"]["iou"]) if v == v]
        print("per-class IoU (seg): " + ", ".join(per))
    print(f"metrics written to {out / f'metrics_{args.split}.json'}")
    return 0
