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
from locbe.runtime.fileio import DiskFullError, atomic_path, free_bytes, is_disk_full, megabytes
from locbe.runtime.numerics import numerics_record
from locbe.runtime.openmp import CHOICE_VARIABLE
from locbe.training.rng import rng_state, set_rng_state

CHECKPOINT_FORMAT = 1


def atomic_torch_save(obj, path: Path) -> None:
    # the file is ours to close: a failed save (a full disk) frees its space at once, not when the error's
    # traceback (which holds torch's writer) is dropped, so the error can say how much is free
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(path: Path, net, optimizer, step: int, cfg: TrainConfig) -> None:
    import locbe

    atomic_torch_save({
        "format": CHECKPOINT_FORMAT, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
        "step": step, "rng": rng_state(), "config": cfg.to_dict(), "locbe_version": locbe.__version__,
    }, path)


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def checkpoint_bytes(net, optimizer) -> int:
    """About the size of a checkpoint of ``net`` and ``optimizer``: the model's state, the optimiser's (before
    the first step AdamW has none yet: two moments per trainable parameter), and 1 % for the rest."""
    model = tensor_bytes(net.state_dict())
    opt = tensor_bytes(optimizer.state_dict()["state"])
    if not opt:
        opt = 2 * sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    return int((model + opt) * 1.01) + 2**16


LOG_ROW_BYTES = 400  # a log.jsonl / val.jsonl row, generously


def space_needed(cfg: TrainConfig, ckpt: int, step: int, last_size: int) -> int:
    """Free space a run from ``step`` needs: two checkpoints (``last.pth`` and the temp copy that replaces it,
    or ``final.pth`` beside it) less the ``last.pth`` already there, plus the rows of the logs still to come."""
    rows = (cfg.max_steps - step) // max(cfg.log_every, 1) + 1
    rows += (cfg.max_steps - step) // cfg.val_every + 1 if cfg.val_every else 0
    return max(2 * ckpt - last_size, ckpt) + rows * LOG_ROW_BYTES


def warn_if_short_of_space(out_dir: Path, needed: int, ckpt: int, command: str) -> str | None:
    """One line for stderr when ``out_dir``'s file system has less than ``needed`` bytes free, else None."""
    free = free_bytes(out_dir)
    if free >= needed:
        return None
    return (f"locbe {command}: warning: {free // 2**20} MB free for {out_dir}, the run needs about "
            f"{megabytes(needed)} MB (two checkpoints of about {megabytes(ckpt)} MB and the logs); a write that "
            "does not fit stops the run: free space now or choose another --out")


def disk_full(error: BaseException, path: Path, needs: int, last_path: Path, saved_step: int | None,
              rerun: str) -> DiskFullError | None:
    """The one-line error for a write of ``path`` that found the disk full (None: ``error`` is something else).
    ``saved_step``: the step of the state ``last_path`` holds (None: no checkpoint yet)."""
    if not is_disk_full(error):
        return None
    if saved_step is None:
        kept = f"no state is saved yet ({last_path} does not exist); free space and rerun the same command"
    else:
        kept = f"the state after step {saved_step} is in {last_path}; free space and {rerun}"
    return DiskFullError(f"disk full writing {path} (needs about {megabytes(needs)} MB, "
                         f"{free_bytes(path) // 2**20} MB free); {kept}")


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
