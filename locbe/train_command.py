"""`locbe train`, the command: arguments from ``locbe.training.cli`` (torch-free, so ``--help`` stays
instant), ``run`` drives the loop in ``locbe.train``. It sits beside ``locbe/train.py`` because the parts
of the loop in ``locbe/training/`` must not import the loop itself.
"""

from __future__ import annotations

import json
import os

from locbe.training.cli import DEFAULT_PRESET, add_arguments, config_from_args  # noqa: F401 (cli reads it)

__all__ = ["add_arguments", "run"]


def run(args) -> int:
    cfg = config_from_args(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from locbe.runtime.runlock import run_dir_lock

    # one process per run directory; taken before torch loads so that a refusal comes at once (train() holds
    # it again: the lock is re-entrant; torchrun: rank 0 holds it)
    with run_dir_lock(cfg.out_dir, "locbe train", take=int(os.environ.get("RANK", "0")) == 0):
        import torch.distributed as dist

        from locbe.train import train

        try:
            result = train(cfg, resume=args.resume, init_from=args.init_from, force_new=args.force_new,
                           progress=not args.no_progress, check_data=not args.no_check_data,
                           tensorboard=args.tensorboard)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: step {result.step}, checkpoint {result.checkpoint}")
        curves = result.out_dir / "curves.png"
        if curves.is_file():
            print(f"training curves: {curves}")
        if result.last_losses:
            print("last losses: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.last_losses.items())))
    return 0
