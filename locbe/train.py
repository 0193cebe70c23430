"""`locbe train`: one readable training loop, single process or under torchrun.

The loop is ``train`` below, top to bottom; its parts live in ``locbe/training/``: ``distributed``
(torchrun process group, gradient mean), ``optim`` (AdamW groups, warmup + poly LR), ``rng`` (seeds,
RNG states), ``checkpoint`` (atomic resumable checkpoints, environment record), ``sharding`` (this
rank's shard of each epoch), ``rundir`` (a run directory bound to its config, logs), ``signals``
(SIGINT/SIGTERM stop at a step boundary) and ``cli`` (the arguments).

Multi-process: launch with ``torchrun --nproc_per_node=N -m locbe.cli train ...``. Every rank reads
its own shard; gradients are averaged with one all-reduce after ``backward``. Batch-coupled terms
(sc, seg, reg, loc) are computed per rank on the rank's own images, as in the authors' training.

Nothing is lost on a crash: checkpoints are atomic with model, optimiser, step and RNG states;
``--resume`` continues bit-for-bit (on CPU) because data order, augmentation and the step's random
choices are pure functions of (seed, epoch/step, index/rank). A non-finite loss, SIGINT/SIGTERM and
a data error save the state at the last step boundary before the run stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from locbe.config import TrainConfig
from locbe.data.check import check_before_training
from locbe.errors import DataError, NonFiniteLossError, one_line
from locbe.runtime.numerics import pinned_threads, pinned_warning
from locbe.runtime.openmp import LateNeighbourWatch
from locbe.runtime.ranks import RankInfo
from locbe.training import rundir
from locbe.training.checkpoint import (
    checkpoint_bytes,
    disk_full,
    environment_info,
    load_training_state,
    save_checkpoint,
    space_needed,
    warn_if_short_of_space,
)
from locbe.training.distributed import (
    any_rank,
    average_gradients,
    barrier,
    broadcast_parameters,
    reduce_mean,
    setup_distributed,
)
from locbe.training.optim import build_optimizer, lr_multiplier, set_lr
from locbe.training.rng import seed_everything
from locbe.training.sharding import FetchError, batches_per_epoch, build_train_dataset, epoch_batches, fetch
from locbe.training.signals import StopRequest, interrupted
from locbe.training.tensorboard import TensorBoardLog, require_tensorboard

__all__ = ["NonFiniteLossError", "TrainResult", "average_gradients", "build_optimizer", "lr_multiplier",
           "setup_distributed", "train"]


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    step: int
    last_losses: dict[str, float]


def train(cfg: TrainConfig, *, resume: bool = False, init_from: str | None = None, force_new: bool = False,
          progress: bool = True, max_steps_this_run: int | None = None, check_data: bool = True,
          tensorboard: bool = False, command: str = "train") -> TrainResult:
    """Train ``cfg`` into ``cfg.out_dir``. ``max_steps_this_run`` stops early (tests, resumable chunks);
    ``check_data``: the fast data check (locbe.data.check) of the splits the run reads, before anything is written;
    ``tensorboard``: the logged scalars also as TensorBoard events in ``<out>/tensorboard/`` (optional extra);
    ``command``: the ``locbe`` command that runs it ("train" or "reproduce"), for the advice its messages give.
    The run directory is locked for the run (one process per directory; rank 0 holds it); pinned CPU numerics
    (``cpu_numerics``, locbe/runtime/numerics.py) use one intra-op thread for the run. ``<out>/curves.png``
    (locbe.report.curves) is redrawn from the log at each checkpoint and at the end."""
    cfg.validate()
    if tensorboard:
        require_tensorboard()  # before anything is written
    info, device = setup_distributed(cfg.device)
    with rundir.hold(cfg.out_dir, f"locbe {command}", info, device), pinned_threads(cfg.cpu_numerics):
        return _train(cfg, info, device, resume=resume, init_from=init_from, force_new=force_new, progress=progress,
                      max_steps_this_run=max_steps_this_run, check_data=check_data, tensorboard=tensorboard,
                      command=command)


def _train(cfg: TrainConfig, info: RankInfo, device: torch.device, *, resume: bool, init_from: str | None,
           force_new: bool, progress: bool, max_steps_this_run: int | None, check_data: bool, tensorboard: bool,
           command: str) -> TrainResult:
    from locbe.method.step import step_generator, training_step
    from locbe.report.curves import try_write_run_curves
    from locbe.runtime.progress import progress_bar

    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.seed + info.rank)
    if check_data and cfg.data_root is not None:
        check_before_training(cfg.dataset, cfg.data_root, training_splits(cfg), cfg.num_classes,
                              progress=progress, is_main=info.is_main)
    dataset = build_train_dataset(cfg)
    done = rundir.finished_step(cfg) if resume and not force_new else None
    if done is not None:  # nothing to resume: say so and rewrite nothing (final.pth, config.json, logs)
        final = rundir.checkpoint_paths(cfg.out_dir)[1]
        if info.is_main:
            print(f"--resume: the run in {cfg.out_dir} finished at step {done} ({final}); nothing to do, nothing "
                  "rewritten", file=sys.stderr)
        return TrainResult(Path(cfg.out_dir), final, done, {})
    rundir.prepare(cfg, resume=resume, force_new=force_new, is_main=info.is_main)
    net, optimizer, par, reg_loss = build_training(cfg, device, init_from)
    out_dir, (last_path, final_path) = Path(cfg.out_dir), rundir.checkpoint_paths(cfg.out_dir)
    step = load_training_state(last_path, net, optimizer) if resume else 0
    saved_step = step if resume else None  # the step whose state last.pth holds
    ckpt_size = checkpoint_bytes(net, optimizer)
    rerun = rundir.RERUN.get(command, rundir.RERUN["train"])

    @contextlib.contextmanager
    def said_if_disk_full(path: Path, needs: int):
        """A write of ``path`` that finds the disk full ends the run with one line (locbe.runtime.fileio)."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            error = disk_full(e, path, needs, last_path, saved_step, rerun)
            if error is None:
                raise
            raise error from e

    def save(path: Path) -> None:
        nonlocal saved_step
        with said_if_disk_full(path, ckpt_size):
            save_checkpoint(path, net, optimizer, step, cfg)
        if path == last_path:
            saved_step = step

    broadcast_parameters(net, info.world_size)
    if info.is_main:
        if resume:
            print(f"resuming from step {step} (of {cfg.max_steps}) in {last_path}", file=sys.stderr)
        last_size = last_path.stat().st_size if resume else 0
        warning = warn_if_short_of_space(out_dir, space_needed(cfg, ckpt_size, step, last_size), ckpt_size, command)
        if warning:
            print(warning, file=sys.stderr)
        env = environment_info(cfg, device, info.world_size)
        with said_if_disk_full(out_dir / "config.json", 2**20):
            rundir.start(out_dir, step, cfg.to_dict(), env)
        if (warning := pinned_warning(env["numerics"])) and device.type == "cpu":
            print(f"locbe {command}: {warning}", file=sys.stderr)
    board = TensorBoardLog(out_dir, step) if tensorboard and info.is_main else None

    params = [p for p in net.parameters() if p.requires_grad]
    n_batches = batches_per_epoch(dataset, cfg, info)
    stop_at = cfg.max_steps if max_steps_this_run is None else min(cfg.max_steps, step + max_steps_this_run)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
    bar = progress_bar(total=stop_at, initial=step, desc=f"train {cfg.preset}", unit="step",
                       disable=not (progress and info.is_main))
    last_losses: dict[str, float] = {}
    curves_at = None  # the step curves.png was last drawn at
    t_start = time.perf_counter()
    # a neighbour that arrives after the start meets the wait settings chosen at the start (locbe/runtime/openmp.py)
    neighbour_watch = LateNeighbourWatch(torch.get_num_threads(), info.world_size, command=command) if (
        info.is_main and device.type == "cpu") else None

    def save_and_stop(error: BaseException) -> None:
        """Keep the state after ``step`` (a step boundary), then raise ``error``."""
        if info.is_main:
            save(last_path)
            try_write_run_curves(out_dir)
        raise error

    net.train()
    with StopRequest() as stop:
        try:
            while step < stop_at:
                for batch in fetch(epoch_batches(dataset, cfg, info, *divmod(step, n_batches))):
                    if step >= stop_at:
                        break
                    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                             for k, v in batch.items()}
                    lr = set_lr(optimizer, step, cfg)
                    with autocast:  # schedule, LR and crop draws all use the authors' 0-based n_iter = step
                        out = training_step(net, batch, step, cfg, par=par, reg_loss=reg_loss,
                                            generator=step_generator(cfg.seed, step, info.rank))
                    if not torch.isfinite(out.total):
                        save_and_stop(NonFiniteLossError(
                            f"non-finite loss at step {step + 1}: {loss_values(out)}. The state after step {step} "
                            f"is saved in {last_path}. Start over with a lower lr (--set lr=...) or with "
                            "--set grad_clip=1.0, and --force-new (a resume keeps the run's config)."))
                    optimizer.zero_grad(set_to_none=True)
                    out.total.backward()
                    average_gradients(params, info.world_size)
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    optimizer.step()
                    step += 1

                    if step % cfg.log_every == 0 or step == stop_at:
                        last_losses = reduce_mean(loss_values(out), info.world_size, device)
                        if info.is_main:
                            with said_if_disk_full(out_dir / "log.jsonl", 2**20):
                                log_step(out_dir, step, lr, time.perf_counter() - t_start, last_losses, bar)
                            if board is not None:
                                board.log(step, lr, last_losses)
                        if neighbour_watch and (notice := neighbour_watch.check()):
                            tqdm.write(notice, file=sys.stderr)
                    bar.update(1)
                    if info.is_main and (step % cfg.ckpt_every == 0 or step == stop_at):
                        save(last_path)
                        try_write_run_curves(out_dir)  # a plotting error is one line, never the end of the run
                        curves_at = step
                        if board is not None:
                            board.flush()
                    if cfg.val_every and step % cfg.val_every == 0 and step < cfg.max_steps:
                        with said_if_disk_full(out_dir / "val.jsonl", 2**20):
                            periodic_validation(net, cfg, device, info, step, out_dir)
                    if any_rank(stop.requested, info.world_size, device) and step < stop_at:
                        save_and_stop(interrupted(stop, step, last_path, cfg.out_dir))
        except FetchError as e:  # the DataLoader failed; a stop signal may have taken its workers down
            save_and_stop(interrupted(stop, step, last_path, cfg.out_dir) if stop.requested else
                          DataError(f"{one_line(e.__cause__)} [reading the batch of step {step + 1}; the state "
                                    f"after step {step} is saved in {last_path}; fix the data: {rundir.RESUME_HINT}]"))
        finally:
            bar.close()
            if board is not None:
                board.close()

    if info.is_main and step >= cfg.max_steps:
        save(final_path)
    if info.is_main and curves_at != step:
        try_write_run_curves(out_dir)
    barrier(info.world_size)
    return TrainResult(out_dir, final_path if step >= cfg.max_steps else last_path, step, last_losses)


# ----------------------------------------------------------------------------- the loop's helpers
def training_splits(cfg: TrainConfig) -> list[str]:
    """The splits a training run reads: the training split, and the val split when it validates on the way."""
    return [cfg.train_split] + ([cfg.val_split] if cfg.val_every and cfg.val_every < cfg.max_steps else [])


def build_training(cfg: TrainConfig, device: torch.device, init_from: str | None):
    """Network (optionally from a full checkpoint), AdamW, PAR and the regularized loss (None when unused)."""
    from locbe.method.par import PAR
    from locbe.models import build_model, load_checkpoint

    net = build_model(cfg.backbone, num_classes=cfg.num_classes, pretrained=cfg.pretrained,
                      aux_layer=cfg.aux_layer).to(device)
    if init_from:
        note = load_checkpoint(net, init_from, strict=True).note()  # ToCo's .pth: its training-only heads left out
        if note and int(os.environ.get("RANK", "0")) == 0:
            print(f"--init-from {init_from}: {note}", file=sys.stderr)
    par = PAR(low_memory=cfg.fast_step).to(device)  # same maths, no neighbour stacks (tests/test_step.py)
    return net, build_optimizer(net, cfg), par, build_reg_loss(cfg, device)


def build_reg_loss(cfg: TrainConfig, device: torch.device):
    """The regularized loss, or None when no phase uses it. The op is built/loaded and run once here, so
    a missing op fails before step 0, not at the first reg step (step 2001 on VOC)."""
    if not cfg.use_reg or not any("reg" in p.weights for p in cfg.phases):
        return None
    from locbe.lattice import ensure_loaded
    from locbe.method.regloss import RegularizedLoss

    ensure_loaded()
    return RegularizedLoss().to(device)


def loss_values(out) -> dict[str, float]:
    return {**{k: float(v) for k, v in out.terms.items()}, "total": float(out.total.detach())}


def log_step(out_dir: Path, step: int, lr: float, seconds: float, losses: dict[str, float], bar) -> None:
    """One row of ``log.jsonl`` and the progress bar's loss read-out."""
    row = {"step": step, "lr": lr, "time": round(seconds, 3),  # ms: step times are read from it
           **{k: round(v, 5) for k, v in losses.items()}}
    with open(out_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items() if k in ("total", "cls", "seg", "be", "loc")})


def periodic_validation(net, cfg: TrainConfig, device, info: RankInfo, step: int, out_dir: Path) -> None:
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
