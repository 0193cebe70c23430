"""Weights from local files: the authors' / ToCo / our checkpoints, and ImageNet encoder weights.

Nothing is fetched from a hub: every loader takes a path and fails with a message naming it.
"""

from __future__ import annotations

import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from locbe.errors import CheckpointError, CheckpointMismatchError, MissingPathError

# ToCo's network has no attn_proj; its checkpoints load into ours with these keys left at init.
OPTIONAL_KEYS = ("attn_proj.weight", "attn_proj.bias")
# ToCo's two contrast heads (method.md "Checkpoint layout"): saved in its .pth, used only by its training loss,
# absent from this network. A checkpoint holding them loads without them; the report names what was left out.
TRAINING_ONLY_PREFIXES = ("proj_head.", "proj_head_t.")
# the first bytes of what torch.save writes: a zip archive, or (before torch 1.6) a pickled magic number
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"

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
    training_only: list[str] = field(default_factory=list)  # ToCo's contrast heads: in the file, not loaded
    stripped_prefix: bool = False

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def note(self) -> str | None:
        """One line saying what of the file was not loaded and what kept its initialisation (None: nothing)."""
        parts = []
        if self.training_only:
            heads = sorted({k.split(".", 1)[0] for k in self.training_only})
            parts.append(f"left out {len(self.training_only)} tensors of ToCo's training-only heads "
                         f"{' and '.join(heads)} (its contrast loss; no part of CAMs or segmentation)")
        if self.skipped_optional:
            parts.append(f"{', '.join(self.skipped_optional)} not in the file (ToCo has none): kept at initialisation, "
                         "unused by the forward pass")
        return "; ".join(parts) or None


def read_checkpoint(path: str | Path, map_location="cpu"):
    """The object stored in a torch (``weights_only``) or safetensors file, with errors naming the path.

    The format is told from the file's first bytes, not its name; a file that is neither gets one plain
    line (torch's own message would advise ``weights_only=False``, which locbe never uses)."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"checkpoint {path} does not exist")
    kind = checkpoint_format(path)
    if kind is None:
        raise CheckpointError(f"{path} is not a checkpoint: neither a torch.save file nor safetensors "
                              f"({path.stat().st_size} bytes, starting {_head(path)})")
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=str(map_location))
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a damaged file, or one holding Python objects besides tensors
        text = str(e)
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if unsupported:
            raise CheckpointError(f"{path} holds a Python object ({unsupported.group(1)}) besides tensors; locbe "
                                  "reads weights only: save the state dict alone, torch.save(model.state_dict(), "
                                  "PATH)") from e
        first = next((line.strip() for line in text.splitlines() if line.strip()), "").split(". ")[0][:160]
        raise CheckpointError(f"{path} is a damaged {kind} checkpoint ({type(e).__name__}"
                              f"{': ' + first if first else ''}): copy it again") from e


def checkpoint_format(path: Path) -> str | None:
    """"torch" (zip archive or legacy pickle, as torch.save writes) or "safetensors" by the first bytes, else None."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return "torch"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                if any(name.endswith("data.pkl") for name in z.namelist()):
                    return "torch"
        except (zipfile.BadZipFile, OSError):
            return "torch"  # torch's zip, damaged: torch.load names the damage
        return None
    if len(head) >= 9:
        (header_size,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 8 + header_size <= path.stat().st_size:
            return "safetensors"
    return None


def _head(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    return "0x" + head.hex() if head else "empty"


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
    report.training_only = sorted(k for k in state if k not in own and k.startswith(TRAINING_ONLY_PREFIXES))
    report.unexpected = sorted(k for k in state if k not in own and k not in report.training_only)
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
