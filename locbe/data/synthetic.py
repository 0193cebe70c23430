"""A deterministic synthetic dataset in the exact VOC layout (``locbe make-synthetic``).

Each of the 20 VOC foreground classes gets its own statistics: a hue band, a texture (stripes,
checks, dots or blotches at a class-specific frequency and orientation) and a shape family (a
radial outline with class-specific harmonics and aspect ratio). Images have textured, low-saturation
backgrounds and one to three objects covering 5-40 % of the image, with soft, irregular boundaries,
partial occlusion (later objects are drawn over earlier ones) and a thin 255 "void" band along
object boundaries as in VOC's masks. Classes share hues and textures pairwise, so image-level
labels make localisation learnable without making it trivial.

Same seed -> byte-identical files: all randomness comes from ``np.random.default_rng([seed, split,
index])``, PNG/JPEG are written with fixed parameters and no metadata.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from locbe.data.classes import VOC_CLASSES, voc_palette
from locbe.errors import ConfigError

GENERATOR_VERSION = 1
NUM_FG = len(VOC_CLASSES) - 1


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    num_train: int = 320
    num_val: int = 80
    min_size: int = 112
    max_size: int = 192
    jpeg_quality: int = 92


def class_style(c: int) -> dict:
    """Fixed statistics of foreground class ``c`` (0-based): pairs of classes share a hue or a texture."""
    rng = np.random.default_rng([12345, c])
    return {
        "hue": (c * 0.618034) % 1.0,  # golden-ratio spread of hues
        "texture": c % 4,  # 0 stripes, 1 checks, 2 dots, 3 blotches
        "freq": 0.12 + 0.05 * ((c // 4) % 5),
        "angle": float(rng.uniform(0, np.pi)),
        "harmonics": rng.uniform(0.05, 0.3, size=3) * (1 if c % 2 else 0.5),
        "lobes": 2 + (c % 5),
        "aspect": 0.6 + 0.8 * ((c * 7) % 10) / 10,
    }


def hsv_to_rgb(h, s, v):
    h = np.asarray(h) % 1.0
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(np.broadcast(h, s, v).shape + (3,), dtype=np.float32)
    for k, (r, g, b) in enumerate(choices):
        sel = i == k
        for ch, val in enumerate((r, g, b)):
            out[..., ch] = np.where(sel, np.broadcast_to(val, sel.shape), out[..., ch])
    return out


def smooth_noise(rng, h, w, cells) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray((grid * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def texture(style, rng, yy, xx) -> np.ndarray:
    a = style["angle"] + rng.uniform(-0.3, 0.3)
    f = style["freq"] * rng.uniform(0.85, 1.15)
    u = xx * np.cos(a) + yy * np.sin(a)
    v = -xx * np.sin(a) + yy * np.cos(a)
    kind = style["texture"]
    if kind == 0:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * f * u)
    elif kind == 1:
        t = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * f * u) * np.sin(2 * np.pi * f * v))
    elif kind == 2:
        t = (np.sin(2 * np.pi * f * u) * np.sin(2 * np.pi * f * v) > 0.5).astype(np.float32)
    else:
        t = smooth_noise(rng, *yy.shape, cells=max(2, int(f * 40)))
    return t.astype(np.float32)


def draw_object(rng, style, h, w, area_frac):
    """Soft alpha (H, W) in [0, 1] and the object's RGB (H, W, 3)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    radius = np.sqrt(area_frac * h * w / np.pi)
    ry, rx = radius * np.sqrt(style["aspect"]), radius / np.sqrt(style["aspect"])
    cy = rng.uniform(ry * 0.6, h - ry * 0.6)
    cx = rng.uniform(rx * 0.6, w - rx * 0.6)
    rot = rng.uniform(0, 2 * np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = -dx * np.sin(rot) + dy * np.cos(rot)
    theta = np.arctan2(v / ry, u / rx)
    r = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    outline = 1.0
    phases = rng.uniform(0, 2 * np.pi, size=3)
    for k, amp in enumerate(style["harmonics"]):
        outline = outline + amp * np.sin((style["lobes"] + k) * theta + phases[k])
    outline = outline + 0.08 * (smooth_noise(rng, h, w, 6) - 0.5)  # irregular boundary
    softness = rng.uniform(0.03, 0.08)
    with np.errstate(over="ignore"):  # far outside the shape exp() is inf and alpha exactly 0, as meant
        alpha = 1.0 / (1.0 + np.exp(-(outline - r) / softness))  # (numpy 1.24 warned about that overflow)
    hue = style["hue"] + rng.uniform(-0.03, 0.03)
    tex = texture(style, rng, yy, xx)
    sat = 0.55 + 0.35 * tex
    val = 0.45 + 0.45 * (1 - tex) * rng.uniform(0.6, 1.0) + 0.1 * smooth_noise(rng, h, w, 5)
    rgb = hsv_to_rgb(np.full((h, w), hue), sat, np.clip(val, 0, 1))
    return alpha.astype(np.float32), rgb


def background(rng, h, w) -> np.ndarray:
    base = rng.uniform(0.25, 0.75, size=3).astype(np.float32)
    gray = 0.5 * smooth_noise(rng, h, w, 4) + 0.3 * smooth_noise(rng, h, w, 16) + 0.2 * rng.random((h, w))
    img = base * 0.5 + 0.5 * gray[..., None]
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    return np.clip(img * (0.8 + 0.4 * yy), 0, 1)


def make_image(rng: np.random.Generator, first_class: int, cfg: SyntheticConfig,
               size: tuple[int, int] | None = None, num_fg: int = NUM_FG):
    """(H, W, 3) uint8 image and its mask; ``size`` (H, W) fixed or drawn from the config's range, extra
    objects drawn among ``num_fg`` foreground classes (20 VOC, 80 COCO)."""
    if size is None:
        h = int(rng.integers(cfg.min_size, cfg.max_size + 1))
        w = int(rng.integers(cfg.min_size, cfg.max_size + 1))
    else:
        h, w = size
    img = background(rng, h, w)
    mask = np.zeros((h, w), dtype=np.uint8)
    void = np.zeros((h, w), dtype=bool)
    n_obj = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    classes = [first_class] + [int(c) for c in rng.integers(num_fg, size=n_obj - 1)]
    for c in classes:
        alpha, rgb = draw_object(rng, class_style(c), h, w, area_frac=rng.uniform(0.05, 0.4 / n_obj + 0.05))
        img = alpha[..., None] * rgb + (1 - alpha[..., None]) * img
        inside = alpha > 0.5
        mask[inside] = c + 1
        band = (alpha > 0.35) & (alpha < 0.65)
        void = (void & ~inside) | band  # occluded boundaries are no longer boundaries
    noise = rng.normal(0, 0.02, size=img.shape).astype(np.float32)
    img = np.clip(img + noise, 0, 1)
    mask[void] = 255
    return (img * 255 + 0.5).astype(np.uint8), mask


def _write_split(root: Path, split: str, split_id: int, count: int, cfg: SyntheticConfig, labels: dict) -> list[str]:
    palette = voc_palette()
    names = []
    order = np.random.default_rng([cfg.seed, split_id, 10**6]).permutation(count)
    for i in range(count):
        rng = np.random.default_rng([cfg.seed, split_id, i])
        first = int(order[i] % NUM_FG)  # every class is the main object of count/20 images
        image, mask = make_image(rng, first, cfg)
        name = f"syn_{split}_{i:05d}"
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=cfg.jpeg_quality, optimize=False)
        m = Image.fromarray(mask, mode="P")
        m.putpalette(palette)
        m.save(root / "SegmentationClassAug" / f"{name}.png", optimize=False)
        onehot = np.zeros(NUM_FG, dtype=np.float32)
        present = np.unique(mask)
        onehot[present[(present > 0) & (present < 255)] - 1] = 1
        labels[name] = onehot
        names.append(name)
    return names


def make_synthetic(out: str | Path, cfg: SyntheticConfig = SyntheticConfig(), force: bool = False) -> Path:
    """Write the dataset to ``out`` atomically (temp folder + rename). An existing dataset with the same
    manifest is kept as is; a different one is replaced only with ``force``."""
    out = Path(out)
    manifest = {"generator": "locbe.synthetic", "version": GENERATOR_VERSION, **asdict(cfg)}
    if out.exists():
        existing = out / "synthetic.json"
        if existing.is_file() and json.loads(existing.read_text()) == manifest:
            return out
        if not force:
            raise FileExistsError(f"{out} exists and is not this synthetic dataset (seed/size differ or not "
                                  "synthetic); choose another --out or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
            (tmp / d).mkdir(parents=True)
        labels: dict[str, np.ndarray] = {}
        train = _write_split(tmp, "train", 0, cfg.num_train, cfg, labels)
        val = _write_split(tmp, "val", 1, cfg.num_val, cfg, labels)
        lists = tmp / "ImageSets" / "Segmentation"
        for split, names in (("train_aug", train), ("train", train), ("val", val)):
            (lists / f"{split}.txt").write_text("\n".join(names) + "\n")
        with open(tmp / "cls_labels_onehot.npy", "wb") as f:
            np.save(f, {k: labels[k] for k in sorted(labels)}, allow_pickle=True)
        (tmp / "synthetic.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="target folder (VOC layout)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images and masks")
    p.add_argument("--num-train", type=int, default=SyntheticConfig.num_train, help="images in the train_aug split")
    p.add_argument("--num-val", type=int, default=SyntheticConfig.num_val, help="images in the val split")
    p.add_argument("--size-range", type=int, nargs=2, default=(SyntheticConfig.min_size, SyntheticConfig.max_size),
                   metavar=("MIN", "MAX"), help="image side lengths in pixels")
    p.add_argument("--force", action="store_true", help="replace an existing, different dataset at --out")


def run(args) -> int:
    lo, hi = args.size_range
    if args.num_train < 1 or args.num_val < 1 or not 32 <= lo <= hi:
        raise ConfigError("need --num-train >= 1, --num-val >= 1 and 32 <= MIN <= MAX for --size-range")
    cfg = SyntheticConfig(seed=args.seed, num_train=args.num_train, num_val=args.num_val, min_size=lo, max_size=hi)
    t0 = time.perf_counter()
    out = make_synthetic(args.out, cfg, force=args.force)
    print(f"synthetic VOC-layout dataset at {out} ({cfg.num_train} train / {cfg.num_val} val, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0
