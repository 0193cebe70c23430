"""Class lists, the VOC palette and ImageNet normalisation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # no torch import at run time: `locbe make-synthetic` and every --help stay torch-free
    import torch

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255
MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")  # VOC (+SBD) first, then COCO-in-VOC style
LABEL_FILE = "cls_labels_onehot.npy"
MASK_MODES = ("P", "L", "I", "I;16")  # class-index images: palette (VOC) or single channel (SBD, COCO)
DATASET_CLASSES = {"voc": 21, "synthetic": 21, "coco": 81}  # number of classes, background included


def voc_palette(n: int = 256) -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved label index), flat [r0, g0, b0, r1, ...]; 255 is cream."""
    palette = []
    for label in range(n):
        r = g = b = 0
        c = label
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def normalize(image_01: np.ndarray | torch.Tensor):
    """(H, W, 3) or (3, H, W) in [0, 1] -> ImageNet-normalised (channel-first for tensors)."""
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    if isinstance(image_01, np.ndarray):
        return (image_01 - mean) / std
    return (image_01 - image_01.new_tensor(mean)[:, None, None]) / image_01.new_tensor(std)[:, None, None]


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised -> [0, 1] (not clamped; the black crop padding maps back to 0)."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return images * std + mean


def denormalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """The authors' PAR input (``denormalize_img2``): x * std_255 + mean_255 cast to uint8 (truncation,
    not rounding), then / 255. Differs from :func:`denormalize` by up to 1/255 per pixel."""
    import torch

    mean = images.new_tensor([255.0 * m for m in IMAGENET_MEAN]).view(1, 3, 1, 1)
    std = images.new_tensor([255.0 * s for s in IMAGENET_STD]).view(1, 3, 1, 1)
    return (images * std + mean).to(torch.uint8).to(images.dtype) / 255.0
