"""One rule for ``--device auto|cpu|cuda`` everywhere (train, eval, reproduce, device-check)."""

from __future__ import annotations

import os

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(pref: str | None = "auto"):
    """``auto``: CUDA when available, else CPU. Under torchrun a CUDA device is ``cuda:LOCAL_RANK``.
    ``cuda`` without a usable GPU is an error that says so. (torch is imported here, not at module level:
    ``DEVICE_CHOICES`` serves ``--help`` without torch.)"""
    import torch

    pref = pref or "auto"
    if pref not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {pref!r}")
    if pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is usable here "
                           "(torch.cuda.is_available() is False); use --device cpu or auto")
    if pref == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def cpu_cores() -> int:
    """The CPU cores this process may use (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
