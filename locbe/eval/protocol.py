"""Evaluation protocols per dataset, as the authors' inference scripts run them (method.md, "The
authors' code, exactly", Evaluation).

- VOC seg (``infer_seg_voc.py``): the image at its own size, scales (1.0, 1.5, 1.25) x {img, hflip}, each
  view's logits upsampled to the image size, flips **summed**, **max** over scales, then dense CRF.
- COCO seg (``infer_seg_coco_ddp.py``): the image first resized to 448x448, scales (1.0, 1.25, 1.5),
  logits upsampled to the label size, flips combined by **max**, scales **summed** (their
  ``torch.sum(torch.stack(seg_list), 0)``), on the full ``val`` list.
- CAM mIoU (``infer_cam.py``): the image resized to 448x448, multi-scale CAM (1.0, 0.5, 1.5) x flip,
  the CAM resized back to the label size, ``cam_to_label``.
- ``smoke`` (the synthetic set): VOC's seg rule, CAMs at the image's own size (the micro ViT trains at
  128 px; the smoke tables keep their earlier meaning).

Everything takes a batch of equally-shaped images (``images (B, 3, h, w)``) and one output size per
image, so images that share a shape after the protocol's resize run in one forward pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Protocol:
    name: str
    seg_resize: tuple[int, int] | None  # resize before the scales (COCO: 448x448)
    seg_scales: tuple[float, ...]
    flip_combine: str  # "sum" | "max": how the flipped view joins the plain one
    scale_combine: str  # "max" | "sum": how the scales are combined
    cam_resize: tuple[int, int] | None  # resize before the multi-scale CAM (448x448)
    cam_scales: tuple[float, ...]
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


PROTOCOLS = {
    "voc": Protocol("voc", None, (1.0, 1.5, 1.25), "sum", "max", (448, 448), (1.0, 0.5, 1.5),
                    "authors' infer_seg_voc.py / infer_cam.py"),
    "coco": Protocol("coco", (448, 448), (1.0, 1.25, 1.5), "max", "sum", (448, 448), (1.0, 0.5, 1.5),
                     "authors' infer_seg_coco_ddp.py / infer_cam.py"),
    "smoke": Protocol("smoke", None, (1.0, 1.25, 1.5), "sum", "max", None, (1.0, 0.5, 1.5),
                      "VOC's seg rule; CAMs at the image size (synthetic set)"),
}
DATASET_PROTOCOL = {"voc": "voc", "coco": "coco", "synthetic": "smoke"}
# the split each dataset's final evaluation reads by default (COCO: the full val list, not val_part)
DEFAULT_EVAL_SPLIT = {"voc": "val", "coco": "val", "synthetic": "val"}


def get_protocol(name_or_dataset: str | Protocol | None) -> Protocol:
    if isinstance(name_or_dataset, Protocol):
        return name_or_dataset
    if name_or_dataset is None:
        return PROTOCOLS["smoke"]
    key = DATASET_PROTOCOL.get(name_or_dataset, name_or_dataset)
    if key not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name_or_dataset!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[key]


AMP_DTYPES = {None: None, "off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, amp: str | None):
    """``torch.autocast`` for ``amp`` in {"bf16", "fp16"}; a no-op for None / "off"."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown autocast mode {amp!r}; choose off, bf16 or fp16")
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def seg_logits_batch(model, images: torch.Tensor, out_sizes: list[tuple[int, int]], *, scales=(1.0,),
                     flip: bool = False, flip_combine: str = "sum", scale_combine: str = "max",
                     resize: tuple[int, int] | None = None, amp: str | None = None) -> list[torch.Tensor]:
    """Per image ``(1, C, H_i, W_i)`` float32 logits at ``out_sizes[i]``.

    ``images`` (B, 3, h, w) share one shape. Optional ``resize`` first; per scale s the batch is resized to
    (int(s h), int(s w)), run with its h-flip in one pass, each view's logits upsampled (bilinear) to the
    image's output size, the flipped one un-flipped and joined by ``flip_combine``; scales joined by
    ``scale_combine``."""
    if flip_combine not in ("sum", "max") or scale_combine not in ("sum", "max"):
        raise ValueError("flip_combine and scale_combine must be 'sum' or 'max'")
    b = images.shape[0]
    if len(out_sizes) != b:
        raise ValueError(f"{b} images but {len(out_sizes)} output sizes")
    x0 = _resize(images, resize) if resize is not None else images
    h, w = x0.shape[-2:]
    best: list[torch.Tensor | None] = [None] * b
    for s in scales:
        x = _resize(x0, (int(s * h), int(s * w)))
        views = torch.cat([x, x.flip(-1)]) if flip else x
        with autocast_context(images.device, amp):
            raw = model(views).seg_logits
        raw = raw.float()
        for i in range(b):
            up = F.interpolate(raw[i::b] if flip else raw[i:i + 1], size=tuple(out_sizes[i]), mode="bilinear",
                               align_corners=False)
            if flip:
                a, f = up[:1], up[1:].flip(-1)
                logits = a + f if flip_combine == "sum" else torch.maximum(a, f)
            else:
                logits = up
            if best[i] is None:
                best[i] = logits
            elif scale_combine == "max":
                best[i] = torch.maximum(best[i], logits)
            else:
                best[i] = best[i] + logits
    return best


@torch.no_grad()
def protocol_seg_logits(model, images: torch.Tensor, out_sizes, protocol: Protocol, multi_scale: bool,
                        amp: str | None = None) -> list[torch.Tensor]:
    """The protocol's seg logits: multi-scale x flip, or its single-scale view (same resize, no flip)."""
    return seg_logits_batch(model, images, out_sizes, scales=protocol.seg_scales if multi_scale else (1.0,),
                            flip=multi_scale, flip_combine=protocol.flip_combine,
                            scale_combine=protocol.scale_combine, resize=protocol.seg_resize, amp=amp)


@torch.no_grad()
def protocol_cams(model, images: torch.Tensor, out_sizes, protocol: Protocol, amp: str | None = None):
    """Normalised multi-scale CAMs per image ``(1, F, H_i, W_i)``: the protocol's resize, ``multiscale_cam``
    over ``protocol.cam_scales`` x flip, then bilinear back to each output size."""
    from locbe.method import cam as camlib
    x = _resize(images, protocol.cam_resize) if protocol.cam_resize is not None else images
    cams, _ = camlib.multiscale_cam(model, x, scales=protocol.cam_scales,
                                    autocast_dtype=AMP_DTYPES[amp])
    return [_resize(cams[i:i + 1].float(), out_sizes[i]) for i in range(images.shape[0])]
