"""CAM utilities (method.md: "Multi-scale CAM", "Region partition", "Pseudo labels", "Losses: be, loc").

CAMs here are foreground-only ``(B, F, H, W)``; background channels are added where a function
needs them. Label maps: 0 background, 1..F classes, 255 ignore.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = 255


# ----------------------------------------------------------------------------- multi-scale CAM
@torch.no_grad()
def multiscale_cam(model, images: torch.Tensor, scales=(1.0, 0.5, 1.5),
                   unflipped_raw: tuple[torch.Tensor, torch.Tensor] | None = None,
                   autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised CAM and aux CAM ``(B, F, H, W)`` in [0, 1].

    Per scale: bilinear resize to (int(sH), int(sW)), run [img, hflip(img)], upsample the raw maps,
    max with the un-flipped flipped map, relu; sum over scales; per image and channel subtract the
    spatial min and divide by (spatial max + 1e-5).

    ``unflipped_raw``: the pre-relu (CAM, aux CAM) of the un-resized, un-flipped images, already
    computed elsewhere (the fast training step takes them from its main forward, which sees exactly
    these images); then only the flipped images run at scale 1.

    ``autocast_dtype`` (e.g. bfloat16, opt-in ``cam_bf16``) runs the model's passes under autocast; the
    maps are upsampled, fused and normalised in float32."""
    b, _, h, w = images.shape
    both = torch.cat([images, images.flip(-1)], dim=0)
    total = [torch.zeros(()), torch.zeros(())]

    def run(x):
        if autocast_dtype is None:
            return model.cams(x, relu=False)
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
            return tuple(r.float() for r in model.cams(x, relu=False))

    for s in scales:
        size = (int(s * h), int(s * w))
        if size == (h, w) and unflipped_raw is not None:
            raws = [torch.cat([r.detach().to(f.dtype), f], dim=0)
                    for r, f in zip(unflipped_raw, run(images.flip(-1)))]
        else:
            x = both if size == (h, w) else F.interpolate(both, size=size, mode="bilinear", align_corners=False)
            raws = run(x)
        for i, raw in enumerate(raws):
            raw = F.interpolate(raw, size=(h, w), mode="bilinear", align_corners=False)
            total[i] = total[i] + F.relu(torch.max(raw[:b], raw[b:].flip(-1)))
    return normalize_cam(total[0]), normalize_cam(total[1])


def normalize_cam(cam: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    cam = cam - cam.amin(dim=(-2, -1), keepdim=True)
    return cam / (cam.amax(dim=(-2, -1), keepdim=True) + eps)


# ----------------------------------------------------------------------------- regions and labels
def _masked_max(cam: torch.Tensor, cls_label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel max and argmax of y_c * cam_c."""
    return (cam * cls_label[:, :, None, None]).max(dim=1)


def region_partition(aux_cam: torch.Tensor, cls_label: torch.Tensor, low: float = 0.25,
                     high: float = 0.7) -> torch.Tensor:
    """0 background (v <= low), 2 confident (v >= high), 1 uncertain; v = max_c y_c * aux_cam_c."""
    v, _ = _masked_max(aux_cam, cls_label)
    regions = torch.ones_like(v, dtype=torch.long)
    regions[v <= low] = 0
    regions[v >= high] = 2
    return regions


def box_mask(img_box: torch.Tensor, size: tuple[int, int], device=None) -> torch.Tensor:
    """(B, H, W) bool, True inside each valid box (y0, y1, x0, x1), half-open."""
    h, w = size
    box = img_box.to(device if device is not None else img_box.device).long().view(-1, 4, 1, 1)
    ys = torch.arange(h, device=box.device).view(1, h, 1)
    xs = torch.arange(w, device=box.device).view(1, 1, w)
    return (ys >= box[:, 0]) & (ys < box[:, 1]) & (xs >= box[:, 2]) & (xs < box[:, 3])


def cam_to_label(cam: torch.Tensor, cls_label: torch.Tensor, img_box: torch.Tensor | None = None,
                 bkg_thre: float = 0.5, high: float = 0.7, low: float = 0.25,
                 ignore_mid: bool = False) -> torch.Tensor:
    """label = 1 + argmax_c(y_c cam_c), 0 where the max <= bkg_thre; with ``ignore_mid`` 255 where the
    max <= high and 0 where it is <= low. Outside the valid box: 255."""
    value, index = _masked_max(cam, cls_label)
    label = index + 1
    label[value <= bkg_thre] = 0
    if ignore_mid:
        label[value <= high] = IGNORE
        label[value <= low] = 0
    if img_box is not None:
        label[~box_mask(img_box, cam.shape[-2:], cam.device)] = IGNORE
    return label


def patch_box(img_box: torch.Tensor, patch: int) -> torch.Tensor:
    """A pixel box on the patch grid: every patch that overlaps the valid box.

    The authors apply the *pixel* box to patch-resolution labels, which leaves the labels all-ignore
    whenever the box does not start at 0 (a defect); locbe maps the box to the grid instead."""
    y0, y1, x0, x1 = img_box.long().unbind(-1)
    ceil = lambda v: torch.div(v + patch - 1, patch, rounding_mode="floor")
    return torch.stack([y0 // patch, ceil(y1), x0 // patch, ceil(x1)], dim=-1)


def patch_labels(aux_cam: torch.Tensor, cls_label: torch.Tensor, img_box: torch.Tensor, grid: tuple[int, int],
                 patch: int, bkg_thre: float, high: float, low: float, pixel_box: bool = False) -> torch.Tensor:
    """Aux pseudo labels (ignore_mid) at patch resolution for the patch-token contrast (sc).

    ``pixel_box=True`` is the authors' defect (``fidelity="authors"``): the pixel box cut out of the
    patch grid as if it were in patch units; otherwise the box is mapped to the grid (:func:`patch_box`)."""
    small = F.interpolate(aux_cam, size=grid, mode="bilinear", align_corners=False)
    box = img_box if pixel_box else patch_box(img_box, patch)
    return cam_to_label(small, cls_label, box, bkg_thre=bkg_thre, high=high, low=low, ignore_mid=True)


# ----------------------------------------------------------------------------- PAR refinement
def refine_cams_with_par(par, images_denorm: torch.Tensor, cams: torch.Tensor, cls_label: torch.Tensor,
                         img_box: torch.Tensor, high: float = 0.7, low: float = 0.25,
                         down_scale: int = 2, batched: bool = True) -> torch.Tensor:
    """Pseudo labels from CAMs refined by PAR (method.md "Refinement with PAR").

    Per image, over the present classes only: stacks [bkg=high, cams] and [bkg=low, cams], both
    downsampled by ``down_scale`` with the image, softmax over classes, PAR, upsample, argmax ->
    L_h, L_l. Result L_h, 255 where L_h is background, 0 where both are background, 255 outside the box.

    PAR acts on each channel independently and linearly, so ``batched=True`` refines both stacks of
    every image in ONE call (channels of absent classes zero-padded; zeros stay zero and are never
    read). ``batched=False`` is the authors' layout: one PAR call per image and stack (2B calls, each
    recomputing the image affinity). Same maths; tests/test_cam_par_losses.py and tests/test_step.py."""
    b, _, h, w = images_denorm.shape
    small = (h // down_scale, w // down_scale)
    images_small = F.interpolate(images_denorm, size=small, mode="bilinear", align_corners=False)
    cams = cams * cls_label[:, :, None, None]
    bkg = torch.ones_like(cams[:, :1])
    stacks = [F.interpolate(torch.cat([bkg * t, cams], dim=1), size=small, mode="bilinear", align_corners=False)
              for t in (high, low)]
    present = torch.cat([torch.ones_like(cls_label[:, :1]), cls_label], dim=1) > 0
    inside = box_mask(img_box, (h, w), cams.device)
    keys = [torch.nonzero(present[i]).flatten() for i in range(b)]
    if batched:
        cmax = max(len(k) for k in keys)
        probs = cams.new_zeros((b, 2 * cmax, *small))
        for i in range(b):
            for j, stack in enumerate(stacks):
                probs[i, j * cmax: j * cmax + len(keys[i])] = stack[i, keys[i]].softmax(dim=0)
        refined = F.interpolate(par(images_small, probs), size=(h, w), mode="bilinear", align_corners=False)
        pairs = [[keys[i][refined[i, j * cmax: j * cmax + len(keys[i])].argmax(dim=0)] for j in range(2)]
                 for i in range(b)]
    else:
        pairs = []
        for i in range(b):
            labels = []
            for stack in stacks:
                probs = stack[i:i + 1, keys[i]].softmax(dim=1)
                refined = par(images_small[i:i + 1], probs)
                refined = F.interpolate(refined, size=(h, w), mode="bilinear", align_corners=False)
                labels.append(keys[i][refined.argmax(dim=1)[0]])
            pairs.append(labels)
    out = torch.full((b, h, w), IGNORE, dtype=torch.long, device=cams.device)
    for i, (label_h, label_l) in enumerate(pairs):
        label = label_h.clone()
        label[label_h == 0] = IGNORE
        label[(label_h + label_l) == 0] = 0
        out[i] = torch.where(inside[i], label, torch.full_like(label, IGNORE))
    return out


# ----------------------------------------------------------------------------- BE and LOC views
def erase_for_be(images: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Keep the uncertain band (region 1); regions 0 and 2 become 0 in normalised space (the mean colour)."""
    return images * (regions == 1).unsqueeze(1).to(images.dtype)


def sample_loc_crops(regions: torch.Tensor, num_crops: int = 4, crop_size: int = 86,
                     generator: torch.Generator | None = None) -> list[tuple[int, int, int, int]]:
    """Crop boxes (y0, y1, x0, x1): centres drawn uniformly among all (image, pixel) positions of region 2
    in the batch, window of side ``crop_size`` around each centre clipped at the border.

    With no region-2 pixel in the batch the authors' code raises; locbe draws uniform centres instead."""
    b, h, w = regions.shape
    candidates = torch.nonzero(regions.cpu() == 2)  # (N, 3): image, row, col
    boxes = []
    for _ in range(num_crops):
        if len(candidates):
            k = int(torch.randint(len(candidates), (1,), generator=generator))
            _, cy, cx = (int(v) for v in candidates[k])
        else:
            cy = int(torch.randint(h, (1,), generator=generator))
            cx = int(torch.randint(w, (1,), generator=generator))
        y0, x0 = cy - crop_size // 2, cx - crop_size // 2
        boxes.append((max(y0, 0), min(y0 + crop_size, h), max(x0, 0), min(x0 + crop_size, w)))
    return boxes


def crop_views(images: torch.Tensor, boxes) -> list[torch.Tensor]:
    """The same window from every image of the batch, one view per box."""
    return [images[:, :, y0:y1, x0:x1] for (y0, y1, x0, x1) in boxes]
