"""AdamW over the network's parameter groups, and the warmup + poly learning-rate schedule (method.md)."""

from __future__ import annotations

import torch

from locbe.config import TrainConfig


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from ``warmup_ratio`` over ``warmup_steps``, then poly decay on the global step."""
    if step < cfg.warmup_steps:
        return 1.0 - (1.0 - step / cfg.warmup_steps) * (1.0 - cfg.warmup_ratio)
    return max(0.0, 1.0 - step / cfg.max_steps) ** cfg.poly_power


def build_optimizer(net: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = []
    for g in net.param_groups(head_lr_mult=cfg.head_lr_mult):
        g = dict(g)
        g.setdefault("lr_mult", 1.0)
        g["lr"] = cfg.lr * g["lr_mult"]
        g.setdefault("weight_decay", cfg.weight_decay)
        groups.append(g)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    mult = lr_multiplier(step, cfg)
    for g in optimizer.param_groups:
        g["lr"] = cfg.lr * g.get("lr_mult", 1.0) * mult
    return cfg.lr * mult
