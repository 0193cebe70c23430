"""What a run saves: resumable training checkpoints (atomic, fsync'ed) and its environment record."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from locbe.config import TrainConfig
from locbe.data.digest import dataset_digest
from locbe.errors import LocbeError
from locbe.runtime.fileio import atomic_path
from locbe.runtime.numerics import numerics_record
from locbe.runtime.openmp import CHOICE_VARIABLE
from locbe.training.rng import rng_state, set_rng_state

CHECKPOINT_FORMAT = 1


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(path: Path, net, optimizer, step: int, cfg: TrainConfig) -> None:
    import locbe

    atomic_torch_save({
        "format": CHECKPOINT_FORMAT, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
        "step": step, "rng": rng_state(), "config": cfg.to_dict(), "locbe_version": locbe.__version__,
    }, path)


def load_training_state(path: Path, net, optimizer) -> int:
    """Restore model, optimiser and RNG from our checkpoint; returns the completed step."""
    from locbe.models.checkpoint import load_state, read_checkpoint

    ckpt = read_checkpoint(path)  # once: weights, optimiser and RNG come from the same read
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise LocbeError(f"{path} is not a locbe training checkpoint (no 'format': {CHECKPOINT_FORMAT}); "
                         "to start from foreign weights use --init-from instead of --resume")
    load_state(net, ckpt, path, strict=True)
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return int(ckpt["step"])


def environment_info(cfg: TrainConfig, device: torch.device, world_size: int) -> dict:
    import timm

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
        "numpy": np.__version__, "device": str(device), "world_size": world_size,
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"), "omp_wait_choice": os.environ.get(CHOICE_VARIABLE),
        "seed": cfg.seed, "deterministic": cfg.deterministic, "num_workers": cfg.num_workers,
        "commit": commit, "config_hash": cfg.config_hash(), "argv": sys.argv,
        # every other factor that changes a CPU run's floats (locbe/runtime/numerics.py) and the data it read
        "numerics": numerics_record(cfg.cpu_numerics), "data": dataset_digest(cfg.data_root),
    }
