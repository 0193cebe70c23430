"""`locbe train`: one readable training loop, single process or under torchrun.

Multi-process: launch with ``torchrun --nproc_per_node=N -m locbe.cli train ...`` (NCCL on GPU,
gloo on CPU). Every rank reads its own shard through a DistributedSampler; gradients are averaged
with one coalesced all-reduce after ``backward``. A LOC-BE step calls the network many times with
different sub-graphs (CAM scales, main view, erased view, local crops); averaging explicitly keeps
that correct without DDP's single-forward assumptions, and equals DDP's gradient mean.

Batch-coupled terms (sc, seg, reg, loc: ratios of sums or sampling over the batch) are computed
per rank on the rank's own images, as in the authors' multi-GPU training.

Nothing is lost on a crash: checkpoints are written atomically (temp file + rename) with model,
optimiser, step and RNG states; ``--resume`` continues bit-for-bit (on CPU) because data order,
augmentation and the step's random choices are pure functions of (seed, epoch/step, index/rank).
A non-finite loss stops the run before the optimiser step and saves the last good state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from locbe.config import PRESETS, TrainConfig, apply_overrides, get_preset
from locbe.fileio import atomic_path, atomic_write_json

CHECKPOINT_FORMAT = 1


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    step: int
    last_losses: dict[str, float]


class NonFiniteLossError(FloatingPointError):
    pass


# ----------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch.cuda.is_available() is False")
    if world == 1:
        return DistInfo(), torch.device("cuda" if want_cuda else "cpu")
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    if want_cuda:
        torch.cuda.set_device(info.local_rank)
        return info, torch.device("cuda", info.local_rank)
    return info, torch.device("cpu")


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Mean of every gradient over ranks, one flat all-reduce (what DDP computes, minus its overlap).

    A None gradient stays None (AdamW then skips that parameter, as in one process): zero-filling it
    would let AdamW decay parameters that never entered the loss, so runs would depend on the number
    of processes. Every rank computes the same step graph, so every rank has the same None set."""
    if world_size == 1:
        return
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def reduce_mean(values: dict[str, float], world_size: int, device: torch.device) -> dict[str, float]:
    if world_size == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / world_size for k, v in zip(keys, t.tolist())}


# ----------------------------------------------------------------------------- optimisation
def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from ``warmup_ratio`` over ``warmup_steps``, then poly decay on the global step."""
    if step < cfg.warmup_steps:
        return 1.0 - (1.0 - step / cfg.warmup_steps) * (1.0 - cfg.warmup_ratio)
    return max(0.0, 1.0 - step / cfg.max_steps) ** cfg.poly_power


def build_optimizer(net: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = []
    for g in net.param_groups():
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


# ----------------------------------------------------------------------------- reproducibility
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All RNG states as tensors/ints/tuples, so checkpoints load with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        "threads": torch.get_num_threads(), "seed": cfg.seed, "deterministic": cfg.deterministic,
        "commit": commit, "config_hash": cfg.config_hash(), "argv": sys.argv,
    }


# ----------------------------------------------------------------------------- checkpoints
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
        raise ValueError(f"{path} is not a locbe training checkpoint (no 'format': {CHECKPOINT_FORMAT}); "
                         "to start from foreign weights use --init-from instead of --resume")
    load_state(net, ckpt, path, strict=True)
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return int(ckpt["step"])


# ----------------------------------------------------------------------------- data
class _ShardFromOffset(torch.utils.data.Sampler):
    """This rank's indices for one epoch, skipping the first ``skip`` (resume mid-epoch)."""

    def __init__(self, indices: list[int], skip: int):
        self.indices = indices[skip:]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def epoch_batches(dataset, cfg: TrainConfig, info: DistInfo, epoch: int, skip_batches: int):
    """DataLoader over this rank's shard of ``epoch`` (reshuffled per epoch by the seed)."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                                  shuffle=True, seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    indices = list(sampler)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=_ShardFromOffset(indices, skip_batches * cfg.batch_size),
        num_workers=cfg.num_workers, drop_last=True, pin_memory=False,
        persistent_workers=False)


def batches_per_epoch(dataset, cfg: TrainConfig, info: DistInfo) -> int:
    per_rank = len(dataset) // info.world_size
    n = per_rank // cfg.batch_size
    if n == 0:
        raise ValueError(f"the training split has {len(dataset)} images: fewer than one batch of "
                         f"{cfg.batch_size} per process x {info.world_size} processes; lower --batch-size")
    return n


def build_train_dataset(cfg: TrainConfig):
    from locbe.data import build_dataset

    if cfg.data_root is None:
        raise ValueError(f"--data-root is required for dataset {cfg.dataset!r} "
                         "(e.g. VOCdevkit/VOC2012; `locbe make-synthetic --out DIR` makes a small one)")
    from locbe.data.transforms import AugmentConfig

    augment_cfg = AugmentConfig(crop_size=cfg.crop_size, mirror_box=cfg.fidelity == "fixed")
    return build_dataset(cfg.dataset, cfg.data_root, cfg.train_split, train=True, crop_size=cfg.crop_size,
                         num_classes=cfg.num_classes, seed=cfg.seed, augment_cfg=augment_cfg)


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, *, resume: bool = False, init_from: str | None = None,
          progress: bool = True, max_steps_this_run: int | None = None) -> TrainResult:
    """Train ``cfg`` into ``cfg.out_dir``. ``max_steps_this_run`` stops early (tests, resumable chunks)."""
    from tqdm import tqdm

    from locbe.models import build_model, load_checkpoint
    from locbe.par import PAR
    from locbe.step import step_generator, training_step

    cfg.validate()
    info, device = setup_distributed(cfg.device)
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    last_path, final_path = ckpt_dir / "last.pth", ckpt_dir / "final.pth"
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.seed + info.rank)

    dataset = build_train_dataset(cfg)
    net = build_model(cfg.backbone, num_classes=cfg.num_classes, pretrained=cfg.pretrained,
                      aux_layer=cfg.aux_layer).to(device)
    if init_from:
        load_checkpoint(net, init_from, strict=True)
    optimizer = build_optimizer(net, cfg)
    par = PAR(low_memory=cfg.fast_step).to(device)  # same maths, no neighbour stacks (tests/test_step.py)
    reg_loss = _build_reg_loss(cfg, device)

    step = 0
    if resume and last_path.exists():
        step = load_training_state(last_path, net, optimizer)
    elif not resume and last_path.exists() and info.is_main:
        raise FileExistsError(f"{last_path} exists: pass --resume to continue that run, or choose another --out")
    if info.world_size > 1:  # start every rank from rank 0's parameters, as DDP does
        for t in net.state_dict().values():
            dist.broadcast(t, src=0)

    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "config.json", cfg.to_dict())
        atomic_write_json(out_dir / "env.json", environment_info(cfg, device, info.world_size))

    params = [p for p in net.parameters() if p.requires_grad]
    n_batches = batches_per_epoch(dataset, cfg, info)
    stop_at = cfg.max_steps if max_steps_this_run is None else min(cfg.max_steps, step + max_steps_this_run)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if cfg.bf16
                else contextlib.nullcontext())
    bar = tqdm(total=stop_at, initial=step, desc=f"train {cfg.preset}", disable=not (progress and info.is_main),
               dynamic_ncols=True)
    log_path = out_dir / "log.jsonl"
    last_losses: dict[str, float] = {}
    net.train()
    t_start = time.perf_counter()
    try:
        while step < stop_at:
            epoch, skip = divmod(step, n_batches)
            for batch in epoch_batches(dataset, cfg, info, epoch, skip):
                if step >= stop_at:
                    break
                n = step + 1  # steps done after this one
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                lr = set_lr(optimizer, step, cfg)
                with autocast:  # schedule, LR and crop draws all use the authors' 0-based n_iter = step
                    out = training_step(net, batch, step, cfg, par=par, reg_loss=reg_loss,
                                        generator=step_generator(cfg.seed, step, info.rank))
                if not torch.isfinite(out.total):
                    terms = {k: float(v) for k, v in out.terms.items()}
                    if info.is_main:
                        save_checkpoint(last_path, net, optimizer, step, cfg)
                    raise NonFiniteLossError(
                        f"non-finite loss at step {n}: {terms}. The state after step {step} is saved in "
                        f"{last_path}; lower --lr or enable --set grad_clip=1.0, then --resume.")
                optimizer.zero_grad(set_to_none=True)
                out.total.backward()
                average_gradients(params, info.world_size)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                step = n

                if step % cfg.log_every == 0 or step == stop_at:
                    losses = {k: float(v) for k, v in out.terms.items()}
                    losses["total"] = float(out.total.detach())
                    last_losses = reduce_mean(losses, info.world_size, device)
                    if info.is_main:
                        row = {"step": step, "lr": lr, "time": round(time.perf_counter() - t_start, 2),
                               **{k: round(v, 5) for k, v in last_losses.items()}}
                        with open(log_path, "a") as f:
                            f.write(json.dumps(row) + "\n")
                        bar.set_postfix({k: f"{v:.3f}" for k, v in last_losses.items()
                                         if k in ("total", "cls", "seg", "be", "loc")})
                bar.update(1)
                if info.is_main and (step % cfg.ckpt_every == 0 or step == stop_at):
                    save_checkpoint(last_path, net, optimizer, step, cfg)
                if cfg.val_every and step % cfg.val_every == 0 and step < cfg.max_steps:
                    _periodic_validation(net, cfg, device, info, step, out_dir)
    except KeyboardInterrupt:
        if info.is_main:
            save_checkpoint(last_path, net, optimizer, step, cfg)
            print(f"\ninterrupted: state after step {step} saved to {last_path}; continue with --resume",
                  file=sys.stderr)
        raise
    finally:
        bar.close()

    if info.is_main and step >= cfg.max_steps:
        save_checkpoint(final_path, net, optimizer, step, cfg)
    if info.world_size > 1:
        dist.barrier()
    return TrainResult(out_dir, final_path if step >= cfg.max_steps else last_path, step, last_losses)


def _build_reg_loss(cfg: TrainConfig, device: torch.device):
    if not cfg.use_reg or not any("reg" in p.weights for p in cfg.phases):
        return None
    from locbe.regloss import RegularizedLoss, ensure_loaded

    ensure_loaded()  # build/load the op and run it once now: a missing op must fail before step 0, not at step 2001
    return RegularizedLoss().to(device)


def _periodic_validation(net, cfg: TrainConfig, device, info: DistInfo, step: int, out_dir: Path) -> None:
    """CAM, aux-CAM and seg mIoU on the val split at single scale (rank 0 only), appended to val.jsonl."""
    if not info.is_main:
        return
    from locbe.eval.evaluate import validate_during_training

    was_training = net.training
    net.eval()
    try:
        metrics = validate_during_training(net, cfg, device, max_images=cfg.val_max_images)
    finally:
        net.train(was_training)
    with open(out_dir / "val.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    print(f"\n[val step {step}] " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                              if isinstance(v, float)), file=sys.stderr)


# ----------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.add_argument("--preset", default="voc", choices=sorted(PRESETS), help="named configuration")
    p.add_argument("--data-root", help="dataset root (VOC2012 / COCO-VOC-style / synthetic folder)")
    p.add_argument("--pretrained", help="local ImageNet weights for the encoder (.npz/.pth/.safetensors)")
    p.add_argument("--init-from", help="start from a full model checkpoint (ours, the authors' or ToCo's)")
    p.add_argument("--out", help="run directory (default: the preset's runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.pth")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, help="images per process")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--num-workers", type=int)
    p.add_argument("--backbone")
    p.add_argument("--fidelity", choices=["authors", "fixed"],
                   help="'authors' (every preset's default) reproduces the numbers-changing behaviour of the "
                        "authors' code; 'fixed' applies locbe's fixes (docs/fidelity.md)")
    p.add_argument("--no-loc", action="store_true", help="switch LOC off")
    p.add_argument("--no-be", action="store_true", help="switch BE off")
    p.add_argument("--no-sc", action="store_true", help="switch the patch-token contrast off")
    p.add_argument("--no-reg", action="store_true", help="switch the regularized loss off")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (opt-in)")
    p.add_argument("--fast-step", action="store_true", help="same maths with fewer passes (docs/benchmarks.md)")
    p.add_argument("--cam-bf16", action="store_true",
                   help="bf16 autocast for the no-grad multi-scale CAM views only (opt-in: CAMs change slightly)")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig field, e.g. --set lr=1e-4 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def config_from_args(args) -> TrainConfig:
    cfg = get_preset(args.preset)
    mapping = {"data_root": args.data_root, "pretrained": args.pretrained, "out_dir": args.out,
               "max_steps": args.max_steps, "batch_size": args.batch_size, "seed": args.seed,
               "device": args.device, "num_workers": args.num_workers, "backbone": args.backbone,
               "fidelity": args.fidelity}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in mapping.items() if v is not None})
    for flag, name in (("no_loc", "use_loc"), ("no_be", "use_be"), ("no_sc", "use_sc"), ("no_reg", "use_reg")):
        if getattr(args, flag):
            cfg = dataclasses.replace(cfg, **{name: False})
    for flag in ("bf16", "cam_bf16", "fast_step", "deterministic"):
        if getattr(args, flag):
            cfg = dataclasses.replace(cfg, **{flag: True})
    return apply_overrides(cfg, args.overrides)


def run(args) -> int:
    cfg = config_from_args(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    result = train(cfg, resume=args.resume, init_from=args.init_from)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: step {result.step}, checkpoint {result.checkpoint}")
        if result.last_losses:
            print("last losses: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.last_losses.items())))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if math.isfinite(result.last_losses.get("total", 0.0)) else 1
