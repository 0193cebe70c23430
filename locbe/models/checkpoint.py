"""Weights from local files: the authors' / ToCo / our checkpoints, and ImageNet encoder weights.

Nothing is fetched from a hub: every loader takes a path and fails with a message naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from locbe.errors import CheckpointError, CheckpointMismatchError, MissingPathError

# ToCo's network has no attn_proj; its checkpoints load into ours with these keys left at init.
OPTIONAL_KEYS = ("attn_proj.weight", "attn_proj.bias")

PRETRAINED_HINT = ("locbe never downloads weights: save ImageNet-21k ViT-B/16 weights to a local file: the authors' "
                   "'jx_vit_base_p16_224-80ecf9dd.pth' (= timm 'vit_base_patch16_224.orig_in21k_ft_in1k', saved "
                   "with torch.save(model.state_dict(), 'vit_b16.pth') or safetensors) or the original JAX "
                   "'ViT-B_16.npz', and pass --pretrained PATH")


@dataclass
class LoadReport:
    path: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped_optional: list[str] = field(default_factory=list)
    stripped_prefix: bool = False

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected


def read_checkpoint(path: str | Path, map_location="cpu"):
    """The object stored in a torch (``weights_only``) or safetensors file, with errors naming the path."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=str(map_location))
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt / foreign file: torch and safetensors raise assorted errors without the path
        raise CheckpointError(f"{path} is not a readable torch or safetensors checkpoint: "
                              f"{type(e).__name__}: {e}") from e


def _state_dict_of(obj, path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # our training checkpoints
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def load_checkpoint(model: torch.nn.Module, path: str | Path, strict: bool = True,
                    map_location="cpu") -> LoadReport:
    """Load the authors' LOC-BE, ToCo or our checkpoint; ``module.`` (DDP) prefixes are stripped.

    Strict by default: missing or unexpected keys raise, listed by name. A shape mismatch raises a
    ValueError naming the tensor; a class-count mismatch says which --num-classes the file needs."""
    return load_state(model, read_checkpoint(path, map_location), path, strict)


def load_state(model: torch.nn.Module, state, path: str | Path, strict: bool = True) -> LoadReport:
    """``load_checkpoint`` for an object already read from ``path`` (a state dict or a checkpoint
    holding one), so a caller that needs the rest of the file reads it once."""
    state = _state_dict_of(state, path)
    report = LoadReport(str(path))
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
        report.stripped_prefix = True
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            msg = f"{path}: tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            if key in ("classifier.weight", "aux_classifier.weight", "decoder.conv8.weight"):
                n = value.shape[0] + (1 if "classifier" in key else 0)
                msg += (f"; the checkpoint was trained with {n} classes: pass --num-classes {n} (locbe eval) "
                        f"or --set num_classes={n} (locbe train)")
            raise CheckpointError(msg)
    report.missing = sorted(k for k in own if k not in state and k not in OPTIONAL_KEYS)
    report.skipped_optional = sorted(k for k in OPTIONAL_KEYS if k in own and k not in state)
    report.unexpected = sorted(k for k in state if k not in own)
    if strict and not report.ok:
        raise CheckpointMismatchError(f"{path} does not match the model: missing keys {report.missing}, "
                       f"unexpected keys {report.unexpected}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return report


def load_pretrained_encoder(model: torch.nn.Module, path: str | Path) -> LoadReport:
    """ImageNet weights for ``model.encoder`` from a local timm .npz (JAX), .pth or .safetensors file.

    The position embedding is resized to the encoder's stored grid when it differs."""
    from timm.layers import resample_abs_pos_embed

    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"pretrained weights {path} do not exist. {PRETRAINED_HINT}")
    encoder = model.encoder
    if path.suffix == ".npz":
        from timm.models.vision_transformer import _load_weights

        _load_weights(encoder, str(path))
        return LoadReport(str(path))
    state = _state_dict_of(read_checkpoint(path), path)
    state = {k.removeprefix("module.").removeprefix("encoder."): v for k, v in state.items()}
    own = encoder.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        n_new = int((own["pos_embed"].shape[1] - 1) ** 0.5)
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (n_new, n_new), num_prefix_tokens=1)
    if "head.weight" in state and state["head.weight"].shape != own["head.weight"].shape:
        state.pop("head.weight"), state.pop("head.bias", None)  # a different ImageNet head is irrelevant here
    report = LoadReport(str(path))
    report.missing = sorted(k for k in own if k not in state and not k.startswith("head."))
    report.unexpected = sorted(k for k in state if k not in own)
    if report.missing or report.unexpected:
        raise CheckpointMismatchError(f"{path} is not a ViT encoder state dict matching {model.backbone_name}: missing "
                       f"{report.missing[:8]}, unexpected {report.unexpected[:8]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the encoder expects {tuple(own[k].shape)} "
                             f"(is it a {model.backbone_name} checkpoint?)")
    encoder.load_state_dict(state, strict=False)
    return report
