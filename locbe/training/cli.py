"""`locbe train` arguments and the config they make. Imports no torch: ``locbe train --help`` stays instant.
The command's ``run`` is in ``locbe/train_command.py`` (modules of ``locbe/training/`` do not import
``locbe/train.py``, the loop they are parts of).

Defaults shown by ``--help`` are those of the chosen ``--preset`` (``locbe train --preset smoke --help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex

from locbe.config import PRESETS, TrainConfig, apply_overrides, get_preset
from locbe.errors import ConfigError

DEFAULT_PRESET = "voc"


def preset_from_argv(argv, default: str) -> str:
    """The ``--preset`` named in ``argv`` (if valid), so that help can show that preset's defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=default)
    known, _ = pre.parse_known_args(list(argv or []))
    return known.preset if known.preset in PRESETS else default


def add_arguments(p, argv=()) -> None:
    cfg = get_preset(preset_from_argv(argv, DEFAULT_PRESET))
    d = f"(preset {cfg.preset}: %(default)s)"
    p.add_argument("--preset", default=cfg.preset, choices=sorted(PRESETS),
                   help="named configuration; the defaults below are this preset's")
    p.add_argument("--data-root", default=cfg.data_root,
                   help=f"dataset root (VOC2012 / COCO in VOC layout / synthetic folder) {d}")
    p.add_argument("--pretrained", default=cfg.pretrained,
                   help=f"local ImageNet weights for the encoder (.npz/.pth/.safetensors) {d}")
    p.add_argument("--init-from", help="start from a full model checkpoint (ours, the authors' or ToCo's)")
    p.add_argument("--out", default=cfg.out_dir, help=f"run directory {d}")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoints/last.pth (an error if it is missing or the config differs)")
    p.add_argument("--force-new", action="store_true",
                   help="<out> holds a run: move it aside to <out>.old-<UTC time> and start over")
    p.add_argument("--max-steps", type=int,
                   help=f"optimiser steps (preset {cfg.preset}: {cfg.max_steps}); fewer shrink the whole schedule "
                        "(phase boundaries, warm-up, validation and checkpoint intervals) as `locbe reproduce "
                        "--max-steps` does, so both make the same run; --set max_steps=N changes the count alone")
    p.add_argument("--batch-size", type=int, default=cfg.batch_size, help=f"images per process {d}")
    p.add_argument("--seed", type=int, default=cfg.seed, help=f"seed of data order, augmentation and init {d}")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=cfg.device,
                   help=f"auto = cuda when available {d}")
    p.add_argument("--num-workers", type=int, default=cfg.num_workers, help=f"DataLoader processes {d}")
    p.add_argument("--backbone", default=cfg.backbone, help=f"registered encoder name {d}")
    p.add_argument("--fidelity", choices=["authors", "fixed"], default=cfg.fidelity,
                   help="'authors' reproduces the numbers-changing behaviour of the authors' code; 'fixed' applies "
                        f"locbe's fixes (docs/fidelity.md) {d}")
    p.add_argument("--no-loc", action="store_true", help=f"switch LOC off (preset: {'on' if cfg.use_loc else 'off'})")
    p.add_argument("--no-be", action="store_true", help=f"switch BE off (preset: {'on' if cfg.use_be else 'off'})")
    p.add_argument("--no-sc", action="store_true", help="switch the patch-token contrast off")
    p.add_argument("--no-reg", action="store_true", help="switch the regularized loss off")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (opt-in)")
    on = "on" if cfg.fast_step else "off"
    p.add_argument("--fast-step", action="store_true",
                   help=f"same maths with fewer passes, docs/benchmarks.md (preset {cfg.preset}: {on})")
    p.add_argument("--cam-bf16", action="store_true",
                   help="bf16 autocast for the no-grad multi-scale CAM views only (opt-in: CAMs change slightly)")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set lr=1e-4 (repeatable; --print-config lists them)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the logged scalars (losses, lr) as TensorBoard events in <out>/tensorboard/ "
                        "(needs the optional extra: pip install -e \".[tensorboard]\")")
    p.add_argument("--no-check-data", action="store_true",
                   help="skip the check of every image's and mask's header before step 0 (locbe check-data)")


def with_max_steps(cfg: TrainConfig, max_steps: int | None, max_images: int | None = None) -> TrainConfig:
    """``--max-steps`` of ``locbe train`` and ``locbe reproduce``, one meaning: fewer steps than ``cfg``'s shrink
    the whole schedule (``locbe.rehearsal.cap_schedule``), more lengthen the last phase; None keeps ``cfg``."""
    if max_steps is None:
        return cfg
    if max_steps <= 0:
        raise ConfigError(f"--max-steps {max_steps}: max_steps takes a positive integer")
    from locbe.rehearsal import cap_schedule

    try:
        capped = cap_schedule(cfg, max_steps, max_images)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return dataclasses.replace(capped, max_steps=max_steps).validate() if max_steps > cfg.max_steps else capped


def config_from_args(args) -> TrainConfig:
    mapping = {"data_root": args.data_root, "pretrained": args.pretrained, "out_dir": args.out,
               "batch_size": args.batch_size, "seed": args.seed,
               "device": args.device, "num_workers": args.num_workers, "backbone": args.backbone,
               "fidelity": args.fidelity}
    try:
        cfg = get_preset(args.preset)
        cfg = dataclasses.replace(cfg, **{k: v for k, v in mapping.items() if v is not None})
        for flag, name in (("no_loc", "use_loc"), ("no_be", "use_be"), ("no_sc", "use_sc"), ("no_reg", "use_reg")):
            if getattr(args, flag):
                cfg = dataclasses.replace(cfg, **{name: False})
        for flag in ("bf16", "cam_bf16", "fast_step", "deterministic"):
            if getattr(args, flag):
                cfg = dataclasses.replace(cfg, **{flag: True})
        return with_max_steps(apply_overrides(cfg, args.overrides), args.max_steps)
    except ConfigError as e:
        key = getattr(e, "key", None)  # a flag's value out of range: name the flag, not the config key
        if key in mapping and key not in {item.split("=", 1)[0].strip() for item in args.overrides}:
            flag = "--out" if key == "out_dir" else "--" + key.replace("_", "-")
            raise ConfigError(f"{flag} {shlex.quote(str(mapping[key]))}: {key} takes {e.expected}") from None
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
