"""Rehearsing a real preset on CPU: the same code path (schedule phases, evaluation protocol, report) with
the steps and images capped (``locbe reproduce --preset voc --max-steps 8 --max-images 2``).

``cap_schedule`` shrinks every step count of the preset by ``max_steps / cfg.max_steps``: phase boundaries
(each phase keeps at least one step, so every loss term of the real schedule runs), the LR warm-up, the
validation and checkpoint intervals. Nothing else changes.
"""

from __future__ import annotations

import dataclasses
import math

from locbe.config import TrainConfig


def cap_schedule(cfg: TrainConfig, max_steps: int, max_images: int | None = None) -> TrainConfig:
    if max_steps <= 0:
        raise ValueError(f"--max-steps must be positive, got {max_steps}")
    if max_steps >= cfg.max_steps:
        return dataclasses.replace(cfg, val_max_images=max_images or cfg.val_max_images)
    f = max_steps / cfg.max_steps
    phases, prev = [], 0
    for p in cfg.phases:
        if math.isinf(p.until):
            phases.append(p)
            continue
        until = min(max_steps - 1, max(prev + 1, math.ceil(p.until * f)))
        phases.append(dataclasses.replace(p, until=until))
        prev = until
    return dataclasses.replace(
        cfg, max_steps=max_steps, phases=phases, warmup_steps=max(1, round(cfg.warmup_steps * f)),
        val_every=max(1, max_steps - 1) if cfg.val_every else 0, ckpt_every=max(1, max_steps // 2),
        log_every=1, val_max_images=max_images if max_images is not None else cfg.val_max_images)
