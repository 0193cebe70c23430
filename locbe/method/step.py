"""One LOC-BE training step: every view, every pseudo label, every loss term.

Order follows method.md: multi-scale CAMs (no grad) -> region partition -> main forward ->
pseudo labels (PAR-refined) -> cls / aux / sc / seg / reg -> BE (erased view, hybrid pooling) ->
LOC (4 local crops vs the global class token). Terms whose weight is zero in the current phase
are not computed. The authors compute them and add ``0.0 * term``, so the decoder gets all-zero
gradients from step 0 and AdamW decays it and advances its moments; ``fidelity="authors"``
reproduces that optimizer state by giving the decoder zero gradients without the work.

``fidelity`` ("authors" | "fixed", docs/fidelity.md) also picks the PAR input (their uint8-truncated
image vs the float one) and the box of the patch-contrast labels (their pixel box applied to the
patch grid vs the box mapped to the grid).

``fast=True`` computes the same maths with less work: the main forward runs first and its
(detached) maps serve as the un-flipped scale-1 CAM view, so the multi-scale CAM runs one
ViT pass fewer; the erased BE view computes only the pooled logits its loss reads (no decoder, no
aux head); equal-shaped LOC crops share one encoder pass; PAR refines both label stacks of the
whole batch in one call with the low-memory layout. Results equal the plain path up to float
reduction order (tests/test_step.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from locbe.config import TrainConfig
from locbe.data import denormalize, denormalize_uint8
from locbe.method import cam as camlib
from locbe.method import losses
from locbe.runtime.stopwatch import Stopwatch


@dataclass
class StepOutput:
    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, detached
    weights: dict[str, float] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # cams, regions, labels (detached)


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """RNG for the step's own random choices (LOC crop centres). A pure function of (seed, step, rank),
    so a resumed run draws exactly what the uninterrupted run drew."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step) * 997 + rank)
    return g


class _Timer:
    """Optional per-component time breakdown for benchmarks (no-op unless given a dict); CUDA events
    on a GPU (locbe.runtime.stopwatch.Stopwatch)."""

    def __init__(self, sink: dict[str, float] | None, device: torch.device):
        self.sink, self.device = sink, device

    @contextmanager
    def __call__(self, name: str):
        if self.sink is None:
            yield
            return
        with Stopwatch(self.device) as watch:
            yield
        self.sink[name] = self.sink.get(name, 0.0) + watch.seconds


def training_step(
    model: torch.nn.Module,
    batch: dict,
    step: int,
    cfg: TrainConfig,
    *,
    par: torch.nn.Module,
    reg_loss: torch.nn.Module | None,
    generator: torch.Generator | None = None,
    fast: bool | None = None,
    timings: dict[str, float] | None = None,
) -> StepOutput:
    """Compute the weighted total loss for 0-based ``step`` (the authors' ``n_iter``).

    Multi-process training averages gradients after ``backward`` (locbe.train), so ``model`` is the
    bare network here and may be called any number of times per step."""
    fast = cfg.fast_step if fast is None else fast
    authors = cfg.fidelity == "authors"
    images = batch["image"]
    cls_label = batch["cls_label"].to(images.dtype)
    img_box = batch["img_box"]
    device = images.device
    weights = cfg.loss_weights(step)
    timer = _Timer(timings, device)
    generator = generator if generator is not None else step_generator(cfg.seed, step)

    need_labels = any(k in weights for k in ("seg", "reg"))
    need_regions = any(k in weights for k in ("be", "loc"))
    need_aux_labels = "sc" in weights
    need_cams = need_labels or need_regions or need_aux_labels

    extras: dict[str, torch.Tensor] = {}
    out = None
    if fast:
        # main forward first: its (detached) maps are the un-flipped scale-1 CAM view
        with timer("main_forward"):
            out = model(images)
    if need_cams:
        with timer("cam_forwards"):
            reuse = None
            if fast and 1.0 in cfg.cam_scales:
                with torch.no_grad():
                    reuse = model.raw_cams(out.patch_tokens, out.aux_tokens)
            cams, aux_cams = camlib.multiscale_cam(model, images, scales=cfg.cam_scales, unflipped_raw=reuse,
                                                   autocast_dtype=torch.bfloat16 if cfg.cam_bf16 else None)
        extras["cam"], extras["aux_cam"] = cams, aux_cams
    regions = None
    if need_regions:
        regions = camlib.region_partition(aux_cams, cls_label, low=cfg.low, high=cfg.high)
        extras["regions"] = regions
    if out is None:
        with timer("main_forward"):
            out = model(images)

    terms: dict[str, torch.Tensor] = {}
    terms["cls"] = losses.cls_loss(out.cls_logits, cls_label)
    terms["cls_aux"] = losses.cls_loss(out.aux_cls_logits, cls_label)

    if need_aux_labels:
        aux_label = camlib.patch_labels(aux_cams, cls_label, img_box, grid=out.patch_tokens.shape[-2:],
                                        patch=model.patch_size, bkg_thre=cfg.bkg_thre, high=cfg.high, low=cfg.low,
                                        pixel_box=authors)
        extras["aux_patch_label"] = aux_label
        terms["sc"] = losses.patch_contrast_loss(out.patch_tokens, aux_label)

    if need_labels:
        with timer("par"):
            source = aux_cams if cfg.phase_at(step).label_source == "aux" else cams
            par_images = denormalize_uint8(images) if authors else denormalize(images)
            pseudo = camlib.refine_cams_with_par(
                par, par_images, source, cls_label, img_box, high=cfg.high, low=cfg.low, batched=fast)
        extras["pseudo_label"] = pseudo
        seg_logits = F.interpolate(out.seg_logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        if "seg" in weights:
            terms["seg"] = losses.seg_loss(seg_logits, pseudo)
        if "reg" in weights:
            if reg_loss is None:
                raise ValueError("the active phase uses the regularized loss but reg_loss=None was given")
            with timer("reg_loss"):
                crop_mask = camlib.box_mask(img_box, images.shape[-2:], device).to(images.dtype)
                terms["reg"] = reg_loss(denormalize(images) * 255.0, torch.softmax(seg_logits, dim=1),
                                        crop_mask, pseudo)

    if "be" in weights:
        with timer("be"):
            erased = camlib.erase_for_be(images, regions)
            # the fast path computes only the pooled main-head logits the BE loss reads
            be_logits = model.classify(erased, pooling="hybrid") if fast else model(erased, pooling="hybrid").cls_logits
            terms["be"] = losses.be_loss(be_logits, cls_label)

    if "loc" in weights:
        with timer("loc_crops"):
            boxes = camlib.sample_loc_crops(regions, num_crops=cfg.loc_num_crops, crop_size=cfg.loc_crop_size,
                                            generator=generator)
            crops = camlib.crop_views(images, boxes)
            local_tokens = _class_tokens(model, crops, fast)
            terms["loc"] = torch.stack(
                [losses.loc_loss(out.cls_token, tok, cls_label) for tok in local_tokens]).mean()

    total = sum(weights[k] * v for k, v in terms.items() if k in weights)
    if authors and not any(k in weights for k in ("seg", "reg")):
        # their `+ 0.0 * seg + 0.0 * reg`: all-zero decoder gradients (not None), at no cost
        total = total + 0.0 * sum(p.sum() for p in model.decoder.parameters() if p.requires_grad)
    return StepOutput(total=total, terms={k: v.detach() for k, v in terms.items()}, weights=weights,
                      extras=extras)


def _class_tokens(net, crops: list[torch.Tensor], fast: bool) -> list[torch.Tensor]:
    """Global class tokens of each LOC crop view. The fast path runs equal-shaped crops in one pass
    (no resizing or padding, so nothing changes mathematically)."""
    if not fast:
        return [net.class_token(c) for c in crops]
    tokens: list[torch.Tensor | None] = [None] * len(crops)
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(crops):
        groups.setdefault(tuple(c.shape[-2:]), []).append(i)
    for idx in groups.values():
        batched = net.class_token(torch.cat([crops[i] for i in idx], dim=0))
        for j, tok in zip(idx, batched.split(crops[idx[0]].shape[0], dim=0)):
            tokens[j] = tok
    return tokens
