"""Train augmentation (method.md "Data", "The authors' code, exactly") with the valid box ``img_box``.

Order, as the authors' ``VOC12ClsDataset``: random rescale (0.5-2.0; bilinear image, nearest mask) ->
horizontal flip (image and mask) -> pad with BLACK uint8 pixels (mask 255) and crop to ``crop_size``
at random offsets, recording ``img_box = (y0, y1, x0, x1)`` of the valid pixels -> ``global_view1``:
a second horizontal flip (p=0.5), colour jitter p=0.8, grayscale p=0.2, Gaussian blur radius
U(0.1, 2.0) p=1 -> ImageNet normalisation.

The photometric steps see the black padding (jitter shifts it, blur bleeds it into the border), as
theirs do. The second flip runs after the box was recorded and the authors do not mirror the box
(a defect that moves the box off the image when it does not span the full width):
``AugmentConfig.mirror_box=True`` (``fidelity="fixed"``) mirrors it. Every random draw comes from
the ``numpy.random.Generator`` passed in, so an item is a pure function of (seed, epoch, index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from locbe.data.classes import IGNORE_INDEX, normalize


@dataclass(frozen=True)
class AugmentConfig:
    crop_size: int = 448
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    photometric: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_radius: tuple[float, float] = (0.1, 2.0)
    blur_p: float = 1.0
    view_flip: bool = True  # the h-flip inside the authors' global_view1, after the box is recorded
    mirror_box: bool = False  # False = the authors' box, not mirrored by that flip; True = the fix


def rescale(image: Image.Image, mask: Image.Image | None, scale: float):
    w, h = image.size
    size = (max(int(w * scale), 1), max(int(h * scale), 1))
    image = image.resize(size, Image.BILINEAR)
    if mask is not None:
        mask = mask.resize(size, Image.NEAREST)
    return image, mask


def photometric(image: Image.Image, cfg: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    import torchvision.transforms.functional as TF

    if rng.random() < cfg.jitter_p:  # ColorJitter: factors drawn, applied in a random order
        factors = (rng.uniform(1 - cfg.brightness, 1 + cfg.brightness), rng.uniform(1 - cfg.contrast, 1 + cfg.contrast),
                   rng.uniform(1 - cfg.saturation, 1 + cfg.saturation), rng.uniform(-cfg.hue, cfg.hue))
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for i in rng.permutation(len(ops)):
            image = ops[i](image, float(factors[i]))
    if rng.random() < cfg.grayscale_p:
        image = image.convert("L").convert("RGB")
    if rng.random() < cfg.blur_p:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*cfg.blur_radius))))
    return image


def pad_and_crop(image: np.ndarray, mask: np.ndarray | None, crop_size: int, rng: np.random.Generator):
    """Place the image at a random offset in a (max(S,h), max(S,w)) zero (black) canvas, then take a
    random S x S window."""
    h, w = image.shape[:2]
    big_h, big_w = max(crop_size, h), max(crop_size, w)
    pad_y = int(rng.integers(big_h - h + 1))
    pad_x = int(rng.integers(big_w - w + 1))
    start_y = int(rng.integers(big_h - crop_size + 1))
    start_x = int(rng.integers(big_w - crop_size + 1))
    canvas = np.zeros((big_h, big_w, image.shape[2]), dtype=image.dtype)
    canvas[pad_y:pad_y + h, pad_x:pad_x + w] = image
    out_image = canvas[start_y:start_y + crop_size, start_x:start_x + crop_size]
    out_mask = None
    if mask is not None:
        mcanvas = np.full((big_h, big_w), IGNORE_INDEX, dtype=mask.dtype)
        mcanvas[pad_y:pad_y + h, pad_x:pad_x + w] = mask
        out_mask = mcanvas[start_y:start_y + crop_size, start_x:start_x + crop_size]
    box = np.array([max(pad_y - start_y, 0), min(crop_size, pad_y + h - start_y),
                    max(pad_x - start_x, 0), min(crop_size, pad_x + w - start_x)], dtype=np.int64)
    return out_image, out_mask, box


def mirror_box(box: np.ndarray, width: int) -> np.ndarray:
    """The valid box after a horizontal flip of a ``width``-wide crop."""
    y0, y1, x0, x1 = (int(v) for v in box)
    return np.array([y0, y1, width - x1, width - x0], dtype=np.int64)


def augment(image: Image.Image, mask: Image.Image | None, cfg: AugmentConfig, rng: np.random.Generator):
    """-> (normalised float32 (S, S, 3), int64 mask (S, S) or None, img_box int64 (4,))."""
    image, mask = rescale(image, mask, float(rng.uniform(*cfg.scale_range)))
    if cfg.flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.FLIP_LEFT_RIGHT) if mask is not None else None
    m = np.asarray(mask, dtype=np.int64) if mask is not None else None
    arr, m, box = pad_and_crop(np.asarray(image.convert("RGB"), dtype=np.uint8), m, cfg.crop_size, rng)
    # global_view1: flip (the box stays put unless mirror_box), then the photometric steps on the padded crop
    if cfg.view_flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
        m = m[:, ::-1] if m is not None else None
        if cfg.mirror_box:
            box = mirror_box(box, arr.shape[1])
    view = Image.fromarray(np.ascontiguousarray(arr))
    if cfg.photometric:
        view = photometric(view, cfg, rng)
    out = normalize(np.asarray(view, dtype=np.float32) / 255.0)
    return out, (np.ascontiguousarray(m) if m is not None else None), box
