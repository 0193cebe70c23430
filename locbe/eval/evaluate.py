"""`locbe eval`: segmentation mIoU (single scale or multi-scale x flip, optional dense CRF) and
CAM / pseudo-label quality, on our checkpoints or the authors'.

Final protocol: per dataset, as the authors' inference scripts (``locbe.eval.protocol``: VOC sums
flips and takes the max over scales at the image size; COCO resizes to 448 first, takes the max over
flips and sums the scales; CAM mIoU resizes to 448), then dense CRF on the softmax. Runs on any device,
optionally under autocast, sharded over torchrun ranks and resumable (``locbe.eval.sharded``). During
training: val at a single scale with the image resized to the crop size, CAM / aux-CAM labels from
``cam_to_label`` with the ground-truth image labels.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from locbe.data import denormalize
from locbe.eval.metrics import ConfusionMatrix
from locbe.eval.protocol import Protocol, get_protocol, protocol_cams, protocol_seg_logits, seg_logits_batch
from locbe.method import cam as camlib
from locbe.runtime.fileio import atomic_path, atomic_write_json
from locbe.runtime.progress import progress_bar

MS_SCALES = (1.0, 1.25, 1.5)


@torch.no_grad()
def seg_logits(model, image: torch.Tensor, scales=(1.0,), flip: bool = False, **kwargs) -> torch.Tensor:
    """(1, C, H, W) logits at the image size: sum over flips, max over scales (``kwargs``: see
    ``locbe.eval.protocol.seg_logits_batch``)."""
    return seg_logits_batch(model, image, [tuple(image.shape[-2:])], scales=scales, flip=flip, **kwargs)[0]


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
    workers: int | None = None  # CRF processes; None: the CPU cores shared among this node's ranks
    save_predictions: Path | None = None
    save_logits: bool = False
    progress: bool = True
    protocol: str | Protocol | None = None  # "voc", "coco", "smoke" (or a dataset name); None: smoke
    amp: str | None = None  # None / "bf16" / "fp16": autocast for the network passes (off by default)
    batch_size: int | None = None  # images per forward where shapes allow; None: 1 on CPU, 8 on CUDA
    resume_dir: Path | None = None  # per-image records written here as made; a rerun resumes from them
    tag: str | None = None  # identifies what is evaluated (e.g. checkpoint and step) for resuming


def _batches(items: list[dict], resize: tuple[int, int] | None, device: torch.device):
    """``(indices, images)`` per group of items whose input has one shape (after ``resize``, when given)."""
    groups: dict[tuple, list[int]] = {}
    for j, item in enumerate(items):
        groups.setdefault(tuple(resize) if resize else tuple(item["image"].shape), []).append(j)
    for group in groups.values():
        images = [items[j]["image"][None].to(device) for j in group]
        if resize:
            images = [F.interpolate(x, size=tuple(resize), mode="bilinear", align_corners=False) for x in images]
        yield group, torch.cat(images)


@torch.no_grad()
def evaluate(model, dataset, num_classes: int, opts: EvalOptions, device="cpu", cam_cfg=None) -> dict:
    """Seg metrics (and CAM / PAR pseudo-label metrics with ``opts.cam``) over a val-style dataset, on
    ``device``, under the dataset's protocol (``locbe.eval.protocol``). Under torchrun every rank takes its
    chunks of the list (``locbe.eval.sharded``) and the confusion matrices are summed; with
    ``opts.resume_dir`` the per-image contributions are written as made and a rerun skips what is done."""
    from collections import deque

    from locbe.data import voc_palette
    from locbe.eval.crf import CRFParams, crf_job
    from locbe.eval.sharded import (
        RecordStore,
        add_sparse,
        all_reduce_matrices,
        crf_workers,
        my_chunks,
        sparse_confusion,
    )
    from locbe.runtime.ranks import current_ranks

    device = torch.device(device)
    model.eval()
    protocol = get_protocol(opts.protocol)
    shard = current_ranks()
    n = len(dataset) if opts.max_images is None else min(opts.max_images, len(dataset))
    batch_size = opts.batch_size or (8 if device.type == "cuda" else 1)
    scales = protocol.seg_scales if opts.multi_scale else (1.0,)
    keys = ["seg"] + (["seg_crf"] if opts.crf else []) + (["cam", "pseudo_label_par"] if opts.cam else [])
    names = getattr(dataset, "names", None)
    meta = {"tag": opts.tag, "split": opts.split, "num_images": n, "names": fingerprint_names(names, n),
            "multi_scale": opts.multi_scale, "crf": opts.crf, "cam": opts.cam, "amp": opts.amp,
            "protocol": protocol.to_dict(), "num_classes": num_classes}
    store = RecordStore(Path(opts.resume_dir) if opts.resume_dir else None, shard, meta)
    mine = [c for c in my_chunks(n, batch_size, shard)]
    my_count = sum(len(c) for c in mine)
    done_mine = sum(1 for c in mine for i in c if i in store.done)
    par = None
    if opts.cam:
        from locbe.method.par import PAR

        par = PAR().to(device)
    workers = crf_workers(opts.workers, shard)
    pool = None
    if opts.crf and workers > 1 and done_mine < my_count:
        from multiprocessing import get_context

        pool = get_context("spawn").Pool(workers)
    pending: deque = deque()
    if opts.save_predictions:
        opts.save_predictions.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(total=my_count, initial=done_mine, desc=f"eval {opts.split}", unit="img",
                       disable=not (opts.progress and shard.is_main))

    def finish(record, crf_labels, gt):
        if crf_labels is not None:
            record["seg_crf"] = sparse_confusion(torch.from_numpy(crf_labels.astype(np.int64)), gt, num_classes)
        store.write(record)
        bar.update(1)

    try:
        for chunk in mine:
            todo = [i for i in chunk if i not in store.done]
            if not todo:
                continue
            items = [dataset[i] for i in todo]
            # one forward per group of equally-shaped inputs (after the protocol's resize)
            logits: dict[int, torch.Tensor] = {}
            for group, images in _batches(items, protocol.seg_resize, device):
                sizes = [tuple(items[j]["mask"].shape) for j in group]
                for j, lg in zip(group, protocol_seg_logits(model, images, sizes, protocol, opts.multi_scale,
                                                            amp=opts.amp)):
                    logits[j] = lg
            cams: dict[int, torch.Tensor] = {}
            if opts.cam:
                for group, images in _batches(items, protocol.cam_resize, device):
                    sizes = [tuple(items[j]["mask"].shape) for j in group]
                    for j, c in zip(group, protocol_cams(model, images, sizes, protocol, amp=opts.amp)):
                        cams[j] = c
            for j, i in enumerate(todo):
                item = items[j]
                gt = item["mask"]
                lg = logits[j]
                pred = lg.argmax(1)[0].cpu()
                record = {"i": i, "name": item["name"], "seg": sparse_confusion(pred, gt, num_classes)}
                if opts.save_predictions:
                    _save_palette(opts.save_predictions / f"{item['name']}.png", pred.numpy(), voc_palette())
                    if opts.save_logits:
                        np.save(opts.save_predictions / f"{item['name']}.npy", lg[0].cpu().numpy().astype(np.float16))
                if opts.cam:
                    image = item["image"][None].to(device)
                    label = item["cls_label"][None].to(device)
                    cam = cams[j].to(device)
                    record["cam"] = sparse_confusion(camlib.cam_to_label(cam, label, bkg_thre=cam_cfg.bkg_thre)[0],
                                                     gt, num_classes)
                    refined = camlib.refine_cams_with_par(par, denormalize(image), cam, label,
                                                          item["img_box"][None].to(device),
                                                          high=cam_cfg.high, low=cam_cfg.low)[0].cpu()
                    # pseudo labels leave uncertain pixels at 255; scored as background (what training does not learn)
                    refined = torch.where(refined == camlib.IGNORE, torch.zeros_like(refined), refined)
                    record["pseudo_label_par"] = sparse_confusion(refined, gt, num_classes)
                if not opts.crf:
                    finish(record, None, gt)
                    continue
                job = (to_uint8_image(item["image"][None]), torch.softmax(lg[0], 0).cpu().numpy(), CRFParams())
                if pool is None:
                    finish(record, crf_job(job), gt)
                else:
                    pending.append((record, pool.apply_async(crf_job, (job,)), gt))
                    while len(pending) >= 2 * workers:
                        rec, res, g = pending.popleft()
                        finish(rec, res.get(), g)
        while pending:
            rec, res, g = pending.popleft()
            finish(rec, res.get(), g)
    finally:
        bar.close()
        store.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    mats = {k: torch.zeros(num_classes * num_classes, dtype=torch.int64) for k in keys}
    for chunk in mine:
        for i in chunk:
            rec = store.done[i]
            for k in keys:
                add_sparse(mats[k], rec[k])
    mats = all_reduce_matrices(mats, device)
    results = {"split": opts.split, "num_images": n, "protocol": protocol.name, "scales": list(scales),
               "flip": opts.multi_scale, "autocast": opts.amp or "off", "device": device.type,
               "world_size": shard.world_size}
    for k in keys:
        cm = ConfusionMatrix(num_classes)
        cm.matrix = mats[k].view(num_classes, num_classes).clone()
        results[k] = cm.compute()
    return results


def fingerprint_names(names, n: int) -> str | None:
    if names is None:
        return None
    from locbe.eval.sharded import fingerprint

    return fingerprint(list(names[:n]))


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


def load_model_for_eval(checkpoint: str, backbone: str | None, num_classes: int | None, device,
                        dataset_classes: int = 21):
    """Our checkpoints carry their config; the authors' and ToCo's take --backbone (default ViT-B/16) and
    --num-classes (default: the dataset's, ``dataset_classes``). What of the file is not loaded (ToCo's
    training-only heads) is said on one line."""
    from locbe.models import build_model
    from locbe.models.checkpoint import load_state, read_checkpoint

    path = Path(checkpoint)
    obj = read_checkpoint(path)  # read once: the config (ours) and the weights
    config = obj.get("config") if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None
    backbone = backbone or (config or {}).get("backbone", "vit_base_patch16_224")
    num_classes = num_classes or (config or {}).get("num_classes", dataset_classes)
    model = build_model(backbone, num_classes=num_classes)
    note = load_state(model, obj, path, strict=True).note()
    if note and int(os.environ.get("RANK", "0")) == 0:
        print(f"{path}: {note}", file=sys.stderr)
    return model.to(device).eval(), config


def run(args) -> int:
    """`locbe eval` (arguments: locbe/eval/cli.py)."""
    from locbe.config import get_preset
    from locbe.data import COCO_CLASSES, VOC_CLASSES, build_dataset
    from locbe.data.voc import DATASET_CLASSES
    from locbe.eval.sharded import fingerprint
    from locbe.runtime.device import resolve_device
    from locbe.runtime.ranks import join_process_group

    device = resolve_device(args.device)
    shard = join_process_group(cuda=device.type == "cuda")
    model, config = load_model_for_eval(args.checkpoint, args.backbone, args.num_classes, device,
                                        dataset_classes=DATASET_CLASSES[args.dataset])
    ds = build_dataset(args.dataset, args.data_root, args.split, train=False, num_classes=model.num_classes)
    cam_cfg = get_preset("coco" if args.dataset == "coco" else "voc")
    out = args.out or Path(args.checkpoint).parent
    amp = None if args.amp == "off" else args.amp
    ck = Path(args.checkpoint).resolve()
    tag = f"{ck}:{ck.stat().st_size}:{ck.stat().st_mtime_ns}"
    opts = EvalOptions(split=args.split, multi_scale=args.multi_scale, crf=args.crf, cam=args.cam,
                       max_images=args.max_images, workers=args.workers, save_predictions=args.save_predictions,
                       save_logits=args.save_logits, protocol=args.protocol or args.dataset, amp=amp,
                       batch_size=args.batch_size, progress=not args.no_progress, tag=tag)
    parts = out / f".eval-{args.split}-{fingerprint([tag, args.multi_scale, args.crf, args.cam, args.max_images])}"
    if not args.no_resume:
        opts.resume_dir = parts
    results = evaluate(model, ds, model.num_classes, opts, device, cam_cfg=cam_cfg)
    if not shard.is_main:
        return 0
    atomic_write_json(out / f"metrics_{args.split}.json", {"checkpoint": str(args.checkpoint), **results})
    shutil.rmtree(parts, ignore_errors=True)  # the records are summed into the metrics file now
    names = VOC_CLASSES if model.num_classes == 21 else COCO_CLASSES if model.num_classes == 81 else \
        [str(i) for i in range(model.num_classes)]
    print(f"split {results['split']} ({results['num_images']} images), protocol {results['protocol']}, "
          f"device {results['device']} x {results['world_size']} process(es), autocast {results['autocast']}")
    for key in ("seg", "seg_crf", "cam", "pseudo_label_par"):
        if key in results:
            print(f"{key:>18}: mIoU {100 * results[key]['miou']:.2f}  pixel acc {100 * results[key]['pixel_acc']:.2f}")
    if "seg" in results:
        per = [f"{names[c]}={100 * v:.1f}" for c, v in enumerate(results["seg"]["iou"]) if v == v]
        print("per-class IoU (seg): " + ", ".join(per))
    print(f"metrics written to {out / f'metrics_{args.split}.json'}")
    return 0
