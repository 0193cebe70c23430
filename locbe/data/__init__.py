"""Datasets (VOC, COCO in VOC layout, the synthetic set), augmentation and class lists.

``locbe.data.voc`` (torch) is imported on first use of its names, so that torch-free commands
(``locbe make-synthetic``, every ``--help``) do not pay for importing torch."""

from locbe.data.classes import (
    COCO_CLASSES,
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VOC_CLASSES,
    denormalize,
    denormalize_uint8,
    normalize,
    voc_palette,
)

_FROM_VOC = ("VOCSegmentation", "build_dataset", "labels_from_mask")

__all__ = ["COCO_CLASSES", "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "VOC_CLASSES", "VOCSegmentation",
           "build_dataset", "denormalize", "denormalize_uint8", "labels_from_mask", "normalize", "voc_palette"]


def __getattr__(name: str):
    if name in _FROM_VOC:
        from locbe.data import voc

        return getattr(voc, name)
    raise AttributeError(f"module 'locbe.data' has no attribute {name!r}")
