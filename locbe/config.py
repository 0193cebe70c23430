"""Training configuration: one dataclass, named presets, and the loss schedule.

The loss schedule is data, not code: a preset lists *phases* (``until`` step, the weight of every
loss term, and which CAM feeds the pseudo labels), exactly as method.md's "Total" paragraph reads.
Module switches (``use_loc``, ``use_be``, ...) zero a term in every phase, so the ToCo baseline and
the ablations are one flag away.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from locbe.backbones import BACKBONES, list_backbones
from locbe.config_values import ValueTypeError, coerce, parse_text
from locbe.errors import ConfigError

# fields that do not change what a run computes: where it reads and writes, how often it logs and saves
NOT_HASHED = ("out_dir", "log_every", "ckpt_every", "num_workers", "data_root", "pretrained", "val_max_images")
LOSS_TERMS = ("cls", "cls_aux", "sc", "seg", "reg", "be", "loc")


@dataclass(frozen=True)
class Phase:
    """Loss weights in force for steps ``n_iter <= until``, ``n_iter`` 0-based as the authors' loop counts
    (``for n_iter in range(max_iters)``): ``until=2000`` is the first 2001 steps."""

    until: float
    weights: dict[str, float]
    label_source: str = "cam"  # "cam" (main CAM) or "aux" (aux CAM) feeds the seg / reg pseudo labels

    def __post_init__(self):
        unknown = set(self.weights) - set(LOSS_TERMS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {LOSS_TERMS}")
        if self.label_source not in ("cam", "aux"):
            raise ValueError(f"label_source must be 'cam' or 'aux', got {self.label_source!r}")


def _voc_phases(seg_start: int = 2000) -> list[Phase]:
    # method.md: n_iter <= 2000 (0-based): cls + cls_aux + 1.0*be + 0.3*sc; after: + 0.1*seg + 0.05*reg + 1.0*loc.
    # The authors' script reads an undefined `args.seg` after step 2000 (crash); 0.1 is its w_seg default.
    early = {"cls": 1.0, "cls_aux": 1.0, "be": 1.0, "sc": 0.3}
    late = {"cls": 1.0, "cls_aux": 1.0, "sc": 0.3, "seg": 0.1, "reg": 0.05, "be": 1.0, "loc": 1.0}
    return [Phase(seg_start, early), Phase(math.inf, late)]


def _coco_phases(cls_only_until: int = 8000, aux_labels_until: int = 12000) -> list[Phase]:
    return [
        Phase(cls_only_until, {"cls": 1.0, "cls_aux": 1.0}),
        Phase(aux_labels_until, {"cls": 1.0, "cls_aux": 1.0, "seg": 0.1, "reg": 0.05}, label_source="aux"),
        Phase(math.inf, {"cls": 1.0, "cls_aux": 1.0, "seg": 0.2, "reg": 0.05, "be": 1.0, "loc": 1.0, "sc": 0.3}),
    ]


@dataclass
class TrainConfig:
    preset: str = "voc"
    # --- data
    dataset: Literal["voc", "coco", "synthetic"] = "voc"
    data_root: str | None = None
    train_split: str = "train_aug"
    val_split: str = "val"
    num_classes: int = 21
    crop_size: int = 448
    # the train view's colour jitter, grayscale and blur (method.md "Data"); the smoke preset turns them off
    photometric_aug: bool = True
    num_workers: int = 4
    # --- model
    backbone: str = "vit_base_patch16_224"
    pretrained: str | None = None
    aux_layer: int = -3
    # --- optimisation (per process batch; the global batch is batch_size * world size)
    batch_size: int = 2
    max_steps: int = 20000
    lr: float = 6e-5
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 1500
    warmup_ratio: float = 1e-6
    poly_power: float = 0.9
    grad_clip: float | None = None
    # --- method
    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5)
    high: float = 0.7
    low: float = 0.25
    bkg_thre: float = 0.5
    loc_num_crops: int = 4
    loc_crop_size: int = 86
    phases: list[Phase] = field(default_factory=_voc_phases)
    use_loc: bool = True
    use_be: bool = True
    use_sc: bool = True
    use_seg: bool = True
    use_reg: bool = True
    # --- fidelity to the authors' code (docs/fidelity.md): "authors" reproduces every numbers-changing
    # behaviour of their code (unmirrored box after the view flip, pixel box on the patch grid, uint8 PAR
    # input, zero gradients from zero-weighted terms); "fixed" applies locbe's fixes.
    fidelity: Literal["authors", "fixed"] = "authors"
    # --- run
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False
    deterministic: bool = False
    # "pinned": one intra-op thread and the AVX2 code paths of ATen, MKL and oneDNN, so that a CPU run gives the
    # same floats on any x86-64 CPU with AVX2 whatever its cores (locbe/runtime/numerics.py; the smoke presets,
    # whose published numbers a user checks); "native": whatever the machine and environment choose
    cpu_numerics: Literal["native", "pinned"] = "native"
    fast_step: bool = False  # fewer passes, maths unchanged (issue 6, locbe/method/step.py)
    cam_bf16: bool = False  # bf16 autocast for the no-grad CAM views only: faster, changes the CAMs slightly
    out_dir: str = "runs/voc"
    log_every: int = 20
    val_every: int = 2000
    ckpt_every: int = 500
    val_max_images: int | None = None

    # ------------------------------------------------------------------ schedule
    def phase_at(self, step: int) -> Phase:
        """The phase in force at 0-based ``step`` (the authors' ``n_iter``)."""
        for phase in self.phases:
            if step <= phase.until:
                return phase
        return self.phases[-1]

    def loss_weights(self, step: int) -> dict[str, float]:
        """Weights of the active loss terms at 0-based ``step`` (switched-off modules removed)."""
        enabled = {"loc": self.use_loc, "be": self.use_be, "sc": self.use_sc, "seg": self.use_seg,
                   "reg": self.use_reg}
        return {k: w for k, w in self.phase_at(step).weights.items() if w != 0 and enabled.get(k, True)}

    # ------------------------------------------------------------------ checks and (de)serialisation
    def validate(self) -> TrainConfig:
        """The config's own checks (ranges and relations the types cannot say); ``ConfigError`` names the field."""
        for name in _POSITIVE_INTS:
            _check(name, getattr(self, name), getattr(self, name) > 0, "a positive integer")
        for name in _NON_NEGATIVE_INTS:
            _check(name, getattr(self, name), getattr(self, name) >= 0, "an integer >= 0")
        _check("seed", self.seed, self.seed < 2**63, "an integer below 2**63")
        for name in _POSITIVE_FLOATS:
            _check(name, getattr(self, name), getattr(self, name) > 0, "a positive number")
        for name in _NON_NEGATIVE_FLOATS:
            _check(name, getattr(self, name), getattr(self, name) >= 0, "a number >= 0")
        for name in _UNIT_INTERVAL:
            _check(name, getattr(self, name), 0 <= getattr(self, name) <= 1, "a number in [0, 1]")
        if not self.low < self.high:
            raise ConfigError(f"need 0 <= low < high <= 1, got low={self.low} high={self.high}")
        for name in ("grad_clip", "val_max_images"):
            value = getattr(self, name)
            _check(name, value, value is None or value > 0, "null (off) or a positive number")
        _check("betas", list(self.betas), all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)")
        _check("cam_scales", list(self.cam_scales), all(s > 0 for s in self.cam_scales), "positive numbers")
        for name, value in (("dataset", self.dataset), ("fidelity", self.fidelity), ("device", self.device)):
            _check(name, value, value in typing.get_args(field_types()[name]),
                   " or ".join(repr(a) for a in typing.get_args(field_types()[name])))
        _check_phases(self.phases)
        _check("backbone", self.backbone, self.backbone in BACKBONES, "one of " + ", ".join(list_backbones()))
        encoder = BACKBONES[self.backbone]
        _check("aux_layer", self.aux_layer, -encoder.depth <= self.aux_layer < encoder.depth,
               f"a block index of {self.backbone}'s {encoder.depth} blocks, -{encoder.depth} to {encoder.depth - 1}")
        # every CAM view must hold one patch: int(crop_size * scale) >= patch size
        smallest = min(int(self.crop_size * s) for s in (1.0, *self.cam_scales))
        if smallest < encoder.patch_size:
            raise ConfigError(f"crop_size={self.crop_size} with cam_scales={list(self.cam_scales)} gives a "
                              f"{smallest}px view, smaller than one {encoder.patch_size}px patch of "
                              f"{self.backbone}: need crop_size * min(cam_scales) >= {encoder.patch_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["phases"] = [
            {"until": None if math.isinf(p.until) else int(p.until), "weights": dict(p.weights),
             "label_source": p.label_source}
            for p in self.phases
        ]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A config from ``to_dict``'s form (a stored ``config.json``); every value is checked against its
        field's type (``ConfigError`` naming the key). Call ``validate`` for the ranges."""
        d = dict(d)
        hints = field_types()
        unknown = set(d) - set(hints)
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}")
        for key, value in d.items():
            try:
                d[key] = coerce_field(key, value)
            except ValueTypeError as e:
                error = ConfigError(f"config key {key}: expected {e.expected}, got {json.dumps(value)}")
                error.key, error.expected = key, e.expected
                raise error from None
        return cls(**d)

    def config_hash(self) -> str:
        """Hash of everything that changes the result (not where it is written or how often it logs)."""
        d = self.to_dict()
        for k in NOT_HASHED:
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _voc(**kw) -> TrainConfig:
    return TrainConfig(preset="voc", out_dir="runs/voc", **kw)


def _coco(**kw) -> TrainConfig:
    return TrainConfig(
        preset="coco", dataset="coco", train_split="train", val_split="val_part", num_classes=81,
        crop_size=224, max_steps=80000, val_every=4000, high=0.65, bkg_thre=0.45, phases=_coco_phases(),
        out_dir="runs/coco", **kw,
    )


def _smoke(**kw) -> TrainConfig:
    """A few minutes on 2 CPU cores: micro ViT from scratch on the synthetic VOC-layout set.

    Unlike the paper's recipe, no photometric augmentation (``photometric_aug=False``): the synthetic
    classes are told apart by hue (20 hues 12-32 degrees apart) and texture frequency, which the authors'
    hue jitter (+-36 degrees), grayscale and blur wipe out; with them the micro ViT barely learns to
    classify in 1200 steps (seg mIoU 32 against 51.5 without, same steps and time; docs/smoke.md)."""
    return TrainConfig(
        preset="smoke", dataset="synthetic", data_root="data/synthetic", train_split="train_aug",
        backbone="vit_micro_patch16", crop_size=128, photometric_aug=False, batch_size=8, max_steps=1200, lr=5e-4,
        head_lr_mult=10.0, warmup_steps=60, phases=_voc_phases(seg_start=200), num_workers=2,
        log_every=10, val_every=400, ckpt_every=100, fast_step=True, cpu_numerics="pinned", out_dir="runs/smoke",
        **kw,
    )


PRESETS = {
    "voc": _voc,
    "coco": _coco,
    "toco-voc": lambda: dataclasses.replace(_voc(), preset="toco-voc", use_loc=False, use_be=False,
                                            out_dir="runs/toco-voc"),
    "toco-coco": lambda: dataclasses.replace(_coco(), preset="toco-coco", use_loc=False, use_be=False,
                                             out_dir="runs/toco-coco"),
    "smoke": _smoke,
    "smoke-toco": lambda: dataclasses.replace(_smoke(), preset="smoke-toco", use_loc=False, use_be=False,
                                              out_dir="runs/smoke-toco"),
}


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings (``--set lr=1e-4``). Values are read as JSON where they parse, else as
    text, then checked against the field's type and the config's own checks: a bad one raises
    ``ConfigError`` naming the key, the value and what the field takes."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lr=1e-4")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in d:
            raise ConfigError(f"--set {_shown(item)}: unknown config key {key!r}; `locbe train --print-config` "
                              f"lists them: {', '.join(sorted(d))}")
        try:
            d[key] = coerce_field(key, parse_text(raw))
        except ValueTypeError as e:
            now = json.dumps(d[key])
            now = f" (now {now})" if len(now) <= 40 else ""  # the phases list would drown the line
            raise ConfigError(f"--set {_shown(item)}: {key} takes {e.expected}{now}, got {raw!r}") from None
    overridden = {item.split("=", 1)[0].strip(): item for item in overrides}
    try:
        return TrainConfig.from_dict(d).validate()
    except ConfigError as e:
        key = getattr(e, "key", None)
        if key in overridden:
            raw = overridden[key].split("=", 1)[1]
            raise ConfigError(f"--set {_shown(overridden[key])}: {key} takes {e.expected}, got {raw!r}") from None
        raise


def _shown(item: str) -> str:
    """An override as its message shows it: on one line (a value with a newline or a control character
    is shown escaped)."""
    return item if item.isprintable() else ascii(item)[1:-1]


@functools.cache
def field_types() -> dict[str, Any]:
    """Each TrainConfig field's annotation, evaluated (the module uses postponed annotations)."""
    return typing.get_type_hints(TrainConfig)


def coerce_field(key: str, value: Any) -> Any:
    """``value`` as field ``key``'s type; raises ``ValueTypeError`` (what the field takes) otherwise."""
    if key == "phases":
        return _coerce_phases(value)
    return coerce(value, field_types()[key])


_POSITIVE_INTS = ("batch_size", "max_steps", "crop_size", "num_classes", "loc_num_crops", "loc_crop_size",
                  "log_every", "ckpt_every")
_NON_NEGATIVE_INTS = ("num_workers", "warmup_steps", "val_every", "seed")  # val_every=0: no periodic validation
_POSITIVE_FLOATS = ("lr", "head_lr_mult", "eps")
_NON_NEGATIVE_FLOATS = ("weight_decay", "poly_power")
_UNIT_INTERVAL = ("high", "low", "bkg_thre", "warmup_ratio")
_PHASES_EXPECTED = 'a non-empty list of {"until": step or null, "weights": {term: number}, "label_source": "cam"|"aux"}'


def _check(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        error = ConfigError(f"config key {name}: expected {expected}, got {json.dumps(value)}")
        error.key, error.expected = name, expected  # apply_overrides names the --set item that did it
        raise error


def _coerce_phases(value) -> list[Phase]:
    if not isinstance(value, list) or not value:
        raise ValueTypeError(_PHASES_EXPECTED)
    phases = []
    for p in value:
        if isinstance(p, Phase):
            phases.append(p)
            continue
        if not isinstance(p, dict) or set(p) - {"until", "weights", "label_source"} or "weights" not in p:
            raise ValueTypeError(_PHASES_EXPECTED)
        try:
            until = coerce(p.get("until"), int | None)
            weights = {str(k): coerce(w, float) for k, w in dict(p["weights"]).items()}
            if set(weights) - set(LOSS_TERMS):
                raise ValueTypeError(f"loss weights of the terms {', '.join(LOSS_TERMS)}")
            source = coerce(p.get("label_source", "cam"), Literal["cam", "aux"])
        except ValueTypeError as e:
            raise ValueTypeError(e.expected if "loss weights" in e.expected else _PHASES_EXPECTED) from None
        except (TypeError, ValueError):
            raise ValueTypeError(_PHASES_EXPECTED) from None
        phases.append(Phase(math.inf if until is None else until, weights, source))
    return phases


def _check_phases(phases: list[Phase]) -> None:
    shown = [{"until": None if math.isinf(p.until) else p.until, "weights": p.weights} for p in phases]
    ok = bool(phases) and all(a.until < b.until for a, b in zip(phases, phases[1:])) and all(
        p.until >= 0 and set(p.weights) <= set(LOSS_TERMS) and all(w >= 0 for w in p.weights.values())
        for p in phases)
    _check("phases", shown, ok, "phases with increasing 'until' >= 0, non-negative weights of the terms "
                                f"{', '.join(LOSS_TERMS)}")
