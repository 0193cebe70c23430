"""Rehearsing a real preset on CPU: the same code path (schedule phases, evaluation protocol, report) with
the steps and images capped (``locbe reproduce --preset voc --max-steps 8 --max-images 2``).

``cap_schedule`` shrinks every step count of the preset by ``max_steps / cfg.max_steps``: phase boundaries
(0-based, as ``TrainConfig.phase_at``; each phase keeps at least one step, so every loss term of the real
schedule runs), the LR warm-up, the validation and checkpoint intervals. Nothing else changes.
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
    finite = [p for p in cfg.phases if not math.isinf(p.until)]
    if max_steps < len(finite) + 1:
        raise ValueError(f"--max-steps {max_steps} is too few for the {len(finite) + 1} phases of {cfg.preset!r}; "
                         f"use at least {len(finite) + 1}")
    # phases cover 0-based steps n <= until: phase k keeps its share of the steps, at least one, and
    # leaves at least one to each later phase
    phases, prev, k = [], -1, 0
    for p in cfg.phases:
        if math.isinf(p.until):
            phases.append(p)
            continue
        k += 1
        until = max(prev + 1, math.ceil((p.until + 1) * f) - 1)
        until = min(until, max_steps - 2 - (len(finite) - k))
        phases.append(dataclasses.replace(p, until=until))
        prev = until
    return dataclasses.replace(
        cfg, max_steps=max_steps, phases=phases, warmup_steps=max(1, round(cfg.warmup_steps * f)),
        val_every=max(1, max_steps - 1) if cfg.val_every else 0, ckpt_every=max(1, max_steps // 2),
        log_every=1, val_max_images=max_images if max_images is not None else cfg.val_max_images)
