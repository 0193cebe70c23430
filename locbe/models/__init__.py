"""LOC-BE network and weight loading (architecture and loading kept apart, as in timm)."""

from locbe.models.checkpoint import LoadReport, load_checkpoint, load_pretrained_encoder
from locbe.models.locbe_vit import BACKBONES, LOCBENet, LOCBEOutput, build_model, list_backbones

__all__ = ["BACKBONES", "LOCBENet", "LOCBEOutput", "LoadReport", "build_model", "list_backbones",
           "load_checkpoint", "load_pretrained_encoder"]
