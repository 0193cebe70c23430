"""Seeds of a reproduction and what each seed's run directory holds.

``--seeds 3`` means seeds 0, 1, 2; ``--seeds 0,4,7`` those seeds (``--seeds 5,`` seed 5 alone). Seed k of a
reproduction into ``<out>`` runs in ``<out>/seed-<k>``, a run directory like any other (bound to its config,
resumable). A seed's result is a *record*, a JSON-able dict read back from the run directory's evaluation
files, so the tables, ``seeds.json`` and ``locbe compare`` all read the same thing:

    {"seed", "run_dir", "status": "ok" | "failed", "error", "exit_code", "dataset", "env",
     "metrics": {name: {"value" (%), "split", "protocol", "num_images", "autocast"}},
     "per_class": {column: [IoU % per class]}}
"""

from __future__ import annotations

import json
from pathlib import Path

from locbe.errors import ConfigError

SEED_DIR_PREFIX = "seed-"
# (evaluation file, key in it, metric name in the tables, per-class column or None)
METRIC_SOURCES = (
    ("val_single", "seg", "seg mIoU (single scale)", "seg (single)"),
    ("val_ms_crf", "seg_crf", "seg mIoU (MS+CRF)", "seg (MS+CRF)"),
    ("train_cam", "cam", "CAM mIoU", "CAM (train)"),
    ("train_cam", "pseudo_label_par", "pseudo-label mIoU (PAR)", None),
)


def parse_seeds(text: str) -> list[int]:
    """``"3"`` -> [0, 1, 2]; ``"0,4,7"`` -> [0, 4, 7]; ``"5,"`` -> [5]. Raises ``ConfigError`` naming --seeds."""
    text = text.strip()
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ValueError
            return list(range(count))
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give a count (--seeds 3 for seeds 0,1,2) or a comma-separated list "
                          "of seeds >= 0 (--seeds 0,4,7; --seeds 5, for seed 5 alone)") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: the seeds must be distinct integers >= 0, e.g. --seeds 0,1,2")
    return seeds


def seed_dir(out: str | Path, seed: int) -> Path:
    return Path(out) / f"{SEED_DIR_PREFIX}{seed}"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_record(run_dir: str | Path, seed: int | None = None) -> dict:
    """The record of a run directory from its ``eval/*.json``, ``config.json`` and ``env.json``."""
    run_dir = Path(run_dir)
    config, env = _read_json(run_dir / "config.json"), _read_json(run_dir / "env.json")
    metrics, per_class = {}, {}
    for key, field, name, column in METRIC_SOURCES:
        res = _read_json(run_dir / "eval" / f"{key}.json")
        if field not in res:
            continue
        metrics[name] = {"value": 100 * res[field]["miou"], "split": res.get("split"),
                         "protocol": res.get("protocol"), "num_images": res.get("num_images"),
                         "autocast": res.get("autocast", "off"), "device": res.get("device"),
                         "world_size": res.get("world_size", 1),
                         **({"crf_backend": res["crf_backend"]} if res.get("crf_backend") else {})}
        if column is not None:
            per_class[column] = [100 * float(v) if v is not None else float("nan") for v in res[field]["iou"]]
    seed = config.get("seed", env.get("seed")) if seed is None else seed
    return {"seed": seed, "run_dir": str(run_dir), "status": "ok", "error": None, "exit_code": None,
            "dataset": config.get("dataset"), "env": env, "metrics": metrics, "per_class": per_class}


def failed_record(run_dir: str | Path, seed: int, error: str, exit_code: int) -> dict:
    rec = run_record(run_dir, seed)  # what it left behind, for the environment table
    rec.update(status="failed", error=error, exit_code=exit_code, metrics={}, per_class={})
    return rec


def seed_dirs(group: str | Path) -> list[tuple[int, Path]]:
    """``(seed, dir)`` of every ``seed-<k>`` run directory in ``group``, by seed."""
    found = []
    for p in Path(group).glob(f"{SEED_DIR_PREFIX}*"):
        suffix = p.name[len(SEED_DIR_PREFIX):]
        if p.is_dir() and suffix.isdigit():
            found.append((int(suffix), p))
    return sorted(found)
