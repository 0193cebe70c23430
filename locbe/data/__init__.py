"""Datasets (VOC, COCO in VOC layout, the synthetic set), augmentation and class lists."""

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
from locbe.data.voc import VOCSegmentation, build_dataset, labels_from_mask

__all__ = ["COCO_CLASSES", "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "VOC_CLASSES", "VOCSegmentation",
           "build_dataset", "denormalize", "denormalize_uint8",
           "labels_from_mask", "normalize", "voc_palette"]
