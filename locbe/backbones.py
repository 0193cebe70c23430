"""The encoders locbe can build, by name: shapes only, no torch, so the config can check a name (and the
aux tap and crop sizes against it) before anything runs. ``locbe.models.locbe_vit`` builds them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BackboneConfig:
    """Constructor arguments of the timm VisionTransformer used as encoder."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 16
    img_size: int = 224  # the grid the position embedding is stored at (14x14 for 224/16)
    mlp_ratio: float = 4.0
    extra: dict = field(default_factory=dict)


BACKBONES: dict[str, BackboneConfig] = {
    "vit_base_patch16_224": BackboneConfig(embed_dim=768, depth=12, num_heads=12),  # the paper's encoder
    "vit_small_patch16_224": BackboneConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_tiny_patch16_224": BackboneConfig(embed_dim=192, depth=12, num_heads=3),
    # from-scratch CPU runs (tests, smoke preset): small enough to train in minutes on 2 cores
    "vit_micro_patch16": BackboneConfig(embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0),
}


def list_backbones() -> list[str]:
    return sorted(BACKBONES)
