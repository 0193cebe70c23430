"""The training data: this rank's shard of each epoch (resumable mid-epoch), and batch fetching whose
errors the loop can tell from its own (``FetchError``, the DataLoader's error chained)."""

from __future__ import annotations

import torch

from locbe.config import TrainConfig
from locbe.errors import DataError
from locbe.runtime.ranks import RankInfo
from locbe.training.signals import ignore_interrupt_in_worker


class _ShardFromOffset(torch.utils.data.Sampler):
    """This rank's indices for one epoch, skipping the first ``skip`` (resume mid-epoch)."""

    def __init__(self, indices: list[int], skip: int):
        self.indices = indices[skip:]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def epoch_batches(dataset, cfg: TrainConfig, info: RankInfo, epoch: int, skip_batches: int):
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
        persistent_workers=False, worker_init_fn=ignore_interrupt_in_worker if cfg.num_workers else None)


def batches_per_epoch(dataset, cfg: TrainConfig, info: RankInfo) -> int:
    per_rank = len(dataset) // info.world_size
    n = per_rank // cfg.batch_size
    if n == 0:
        raise DataError(f"the training split has {len(dataset)} images: fewer than one batch of "
                         f"{cfg.batch_size} per process x {info.world_size} processes; lower --batch-size")
    return n


def build_train_dataset(cfg: TrainConfig):
    from locbe.data import build_dataset

    if cfg.data_root is None:
        raise DataError(f"--data-root is required for dataset {cfg.dataset!r} "
                         "(e.g. VOCdevkit/VOC2012; `locbe make-synthetic --out DIR` makes a small one)")
    from locbe.data.transforms import AugmentConfig

    augment_cfg = AugmentConfig(crop_size=cfg.crop_size, mirror_box=cfg.fidelity == "fixed",
                                photometric=cfg.photometric_aug)
    return build_dataset(cfg.dataset, cfg.data_root, cfg.train_split, train=True, crop_size=cfg.crop_size,
                         num_classes=cfg.num_classes, seed=cfg.seed, augment_cfg=augment_cfg)


class FetchError(Exception):
    """Raised from the batch iterator: the DataLoader (or a worker) failed; the cause is chained."""


def fetch(loader):
    """Iterate ``loader``, wrapping its errors in ``FetchError`` so the loop can tell them from its own."""
    try:
        batches = iter(loader)
    except Exception as e:
        raise FetchError() from e
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            raise FetchError() from e
        yield batch
