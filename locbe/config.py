"""Training configuration: one dataclass, named presets, and the loss schedule.

The loss schedule is data, not code: a preset lists *phases* (``until`` step, the weight of every
loss term, and which CAM feeds the pseudo labels), exactly as method.md's "Total" paragraph reads.
Module switches (``use_loc``, ``use_be``, ...) zero a term in every phase, so the ToCo baseline and
the ablations are one flag away.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

# fields that do not change what a run computes: where it reads and writes, how often it logs and saves
NOT_HASHED = ("out_dir", "log_every", "ckpt_every", "num_workers", "data_root", "pretrained", "val_max_images")
LOSS_TERMS = ("cls", "cls_aux", "sc", "seg", "reg", "be", "loc")
DATASETS = ("voc", "coco", "synthetic")
FIDELITIES = ("authors", "fixed")


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
    dataset: str = "voc"
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
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = False
    deterministic: bool = False
    fast_step: bool = False  # fewer passes, maths unchanged (issue 6, locbe/step.py)
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
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        for name in ("batch_size", "max_steps", "crop_size", "num_classes", "loc_num_crops", "loc_crop_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.low < self.high <= 1:
            raise ValueError(f"need 0 <= low < high <= 1, got low={self.low} high={self.high}")
        if self.fidelity not in FIDELITIES:
            raise ValueError(f"fidelity must be one of {FIDELITIES}, got {self.fidelity!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
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
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        if "phases" in d:
            d["phases"] = [
                p if isinstance(p, Phase) else
                Phase(math.inf if p["until"] is None else p["until"], dict(p["weights"]), p.get("label_source", "cam"))
                for p in d["phases"]
            ]
        for key in ("betas", "cam_scales"):
            if key in d and d[key] is not None:
                d[key] = tuple(d[key])
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
    classify in 1200 steps (seg mIoU 32 against 51.5 without, same steps and time; README)."""
    return TrainConfig(
        preset="smoke", dataset="synthetic", data_root="data/synthetic", train_split="train_aug",
        backbone="vit_micro_patch16", crop_size=128, photometric_aug=False, batch_size=8, max_steps=1200, lr=5e-4,
        head_lr_mult=10.0, warmup_steps=60, phases=_voc_phases(seg_start=200), num_workers=2,
        log_every=10, val_every=400, ckpt_every=100, fast_step=True, out_dir="runs/smoke", **kw,
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
    """Apply ``key=value`` strings (``--set lr=1e-4``), parsing values as JSON where possible."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        if key not in d:
            raise ValueError(f"unknown config key {key!r} in override {item!r}; known: {sorted(d)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        d[key] = value
    return TrainConfig.from_dict(d).validate()
