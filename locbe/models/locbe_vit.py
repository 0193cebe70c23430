"""The LOC-BE network (method.md, "Network"): a timm ViT encoder with an auxiliary tap, GMP / hybrid
pooled classifiers, CAMs and a LargeFOV segmentation decoder.

Attribute names follow the authors' checkpoint layout (``encoder``, ``classifier``,
``aux_classifier``, ``decoder.conv6/7/8``, ``attn_proj``) so their ``.pth`` files load as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from locbe.backbones import BACKBONES, list_backbones


@dataclass
class LOCBEOutput:
    cls_logits: torch.Tensor  # (B, F) main head, pooled as requested
    aux_cls_logits: torch.Tensor  # (B, F) aux head, always GMP
    seg_logits: torch.Tensor  # (B, C, h, w) at patch resolution
    cls_token: torch.Tensor  # (B, D) after the final norm
    patch_tokens: torch.Tensor  # (B, D, h, w) after the final norm
    aux_tokens: torch.Tensor  # (B, D, h, w) block `aux_layer`, before the final norm


class LargeFOV(nn.Module):
    """DeepLab-LargeFOV head: two dilated 3x3 convs and a 1x1 classifier, no biases."""

    def __init__(self, in_dim: int, num_classes: int, mid_dim: int = 512, dilation: int = 5):
        super().__init__()
        self.conv6 = nn.Conv2d(in_dim, mid_dim, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv7 = nn.Conv2d(mid_dim, mid_dim, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv8 = nn.Conv2d(mid_dim, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv8(F.relu(self.conv7(F.relu(self.conv6(x)))))


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """Resize the square patch part of (1, prefix + n*n, D) to ``grid`` with bicubic, align_corners=False,
    as the authors do. (timm's dynamic path uses antialiased bicubic, a different kernel: not used.)"""
    prefix, patch = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    n = math.isqrt(patch.shape[1])
    if (n, n) != tuple(grid):
        patch = patch.reshape(1, n, n, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
        patch = patch.flatten(2).transpose(1, 2)
    return torch.cat([prefix, patch], dim=1)


def gmp(x: torch.Tensor) -> torch.Tensor:
    """Global max pooling (B, D, h, w) -> (B, D, 1, 1)."""
    return F.adaptive_max_pool2d(x, 1)


def hybrid_pool(x: torch.Tensor, bins: tuple[int, ...] = (1, 2, 8)) -> torch.Tensor:
    """Spatial-pyramid hybrid pooling: (2*GMP + sum_i mean(avg_pool(kernel=(h//i, w//i)))) / 5 (method.md)."""
    h, w = x.shape[-2:]
    pooled = 2 * gmp(x)
    for i in bins:
        kernel = (max(h // i, 1), max(w // i, 1))
        pooled = pooled + F.avg_pool2d(x, kernel_size=kernel, stride=kernel).mean(dim=(-2, -1), keepdim=True)
    return pooled / (2 + len(bins))


def _pool(x: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "gmp":
        return gmp(x)
    if pooling == "hybrid":
        return hybrid_pool(x)
    raise ValueError(f"pooling must be 'gmp' or 'hybrid', got {pooling!r}")


class LOCBENet(nn.Module):
    def __init__(self, backbone: str = "vit_base_patch16_224", num_classes: int = 21, aux_layer: int = -3,
                 decoder_dim: int = 512):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; known: {list_backbones()}")
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
        cfg = BACKBONES[backbone]
        if not -cfg.depth <= aux_layer < cfg.depth:
            raise ValueError(f"aux_layer={aux_layer} outside the {cfg.depth} blocks of {backbone}")
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.aux_index = aux_layer % cfg.depth
        self.patch_size = cfg.patch_size
        # timm ViT as in vit_base_patch16_224: qkv bias, LayerNorm eps 1e-6 (timm's default), 1000-way head
        # kept only for the checkpoint layout; it never runs.
        self.encoder = VisionTransformer(
            img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
            num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, num_classes=1000,
            dynamic_img_size=True, **cfg.extra)
        # the authors freeze the position embedding at its pretrained value (requires_grad=False): no
        # gradient, no weight decay, for the whole run; the class token trains
        self.encoder.pos_embed.requires_grad_(False)
        dim = cfg.embed_dim
        # kept for checkpoint compatibility: the authors' 1x1 conv over the last two blocks' attention
        # maps (2 x 12 heads); its output never enters a loss, so it is not computed.
        self.attn_proj = nn.Conv2d(2 * cfg.num_heads, 1, kernel_size=1, bias=True)
        self.decoder = LargeFOV(dim, num_classes, mid_dim=decoder_dim)
        self.classifier = nn.Conv2d(dim, num_classes - 1, kernel_size=1, bias=False)
        self.aux_classifier = nn.Conv2d(dim, num_classes - 1, kernel_size=1, bias=False)

    # ------------------------------------------------------------------ encoder
    def grid_size(self, h: int, w: int) -> tuple[int, int]:
        return h // self.patch_size, w // self.patch_size

    def encode(self, x: torch.Tensor):
        """(class token, patch tokens, aux patch tokens) for any H, W >= patch size.

        Grid floor(H/16) x floor(W/16); the stored 14x14 position embedding is resized bicubically
        (align_corners=False), class-token position kept (timm's dynamic_img_size path)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        h, w = self.grid_size(*x.shape[-2:])
        if h == 0 or w == 0:
            raise ValueError(f"input {tuple(x.shape[-2:])} is smaller than one {self.patch_size}px patch")
        enc = self.encoder
        x = x[..., : h * self.patch_size, : w * self.patch_size]  # floor: drop the partial border patch
        patches = enc.patch_embed(x).reshape(x.shape[0], h * w, -1)  # (B, h*w, D)
        cls = enc.cls_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, patches], dim=1) + resize_pos_embed(enc.pos_embed, (h, w))
        tokens = enc.norm_pre(tokens)
        aux = None
        for i, block in enumerate(enc.blocks):
            tokens = block(tokens)
            if i == self.aux_index:
                aux = tokens[:, 1:]
        tokens = enc.norm(tokens)
        b, d = tokens.shape[0], tokens.shape[-1]
        to_map = lambda t: t.transpose(1, 2).reshape(b, d, h, w)
        return tokens[:, 0], to_map(tokens[:, 1:]), to_map(aux)

    # ------------------------------------------------------------------ heads
    def heads(self, cls_token, patch_tokens, aux_tokens, pooling: str = "gmp") -> LOCBEOutput:
        pooled = _pool(patch_tokens, pooling)
        return LOCBEOutput(
            cls_logits=self.classifier(pooled).flatten(1),
            aux_cls_logits=self.aux_classifier(gmp(aux_tokens)).flatten(1),
            seg_logits=self.decoder(patch_tokens),
            cls_token=cls_token, patch_tokens=patch_tokens, aux_tokens=aux_tokens,
        )

    def forward(self, x: torch.Tensor, pooling: str = "gmp") -> LOCBEOutput:
        return self.heads(*self.encode(x), pooling)

    def classify(self, x: torch.Tensor, pooling: str = "gmp") -> torch.Tensor:
        """Main-head logits only (B, F): what the BE view needs, without the decoder and aux head."""
        _, patch_tokens, _ = self.encode(x)
        return self.classifier(_pool(patch_tokens, pooling)).flatten(1)

    def raw_cams(self, patch_tokens: torch.Tensor, aux_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-activation CAM and aux CAM (B, F, h, w) from encoder tokens: the classifiers as 1x1 convs."""
        return F.conv2d(patch_tokens, self.classifier.weight), F.conv2d(aux_tokens, self.aux_classifier.weight)

    def cams(self, x: torch.Tensor, relu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """CAMs relu(conv(x, classifier.weight)) and aux CAMs at patch resolution (B, F, h, w).

        ``relu=False`` gives the pre-activation maps: the multi-scale CAM upsamples and flip-maxes
        those and applies the relu afterwards, as the authors do."""
        _, patch_tokens, aux_tokens = self.encode(x)
        cam, aux = self.raw_cams(patch_tokens, aux_tokens)
        return (F.relu(cam), F.relu(aux)) if relu else (cam, aux)

    def class_token(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm class token only (LOC crops)."""
        return self.encode(x)[0]

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, head_lr_mult: float = 10.0) -> list[dict]:
        """method.md: encoder weights and encoder norms at the base lr; classifiers and decoder at 10x
        (``head_lr_mult``, TrainConfig.head_lr_mult).
        (Same weight decay everywhere, as the spec states.) Frozen parameters (the position embedding)
        are in no group, so no optimizer ever decays them."""
        enc_weights, enc_norms = [], []
        for name, p in self.encoder.named_parameters():
            if p.requires_grad:
                (enc_norms if "norm" in name else enc_weights).append(p)
        heads = [self.classifier.weight, self.aux_classifier.weight]
        return [
            {"name": "encoder", "params": enc_weights, "lr_mult": 1.0},
            {"name": "encoder_norm", "params": enc_norms, "lr_mult": 1.0},
            {"name": "classifiers", "params": heads, "lr_mult": head_lr_mult},
            {"name": "decoder", "params": list(self.decoder.parameters()), "lr_mult": head_lr_mult},
        ]


def build_model(backbone: str = "vit_base_patch16_224", num_classes: int = 21, pretrained: str | None = None,
                aux_layer: int = -3, **kwargs) -> LOCBENet:
    model = LOCBENet(backbone, num_classes=num_classes, aux_layer=aux_layer, **kwargs)
    if pretrained is not None:
        from locbe.models.checkpoint import load_pretrained_encoder

        load_pretrained_encoder(model, pretrained)
    return model
