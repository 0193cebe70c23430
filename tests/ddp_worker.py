"""Run by tests/test_train.py under `torchrun --nproc_per_node=2` (gloo on CPU).

Rank r takes item r of the synthetic train split; rank 0 writes the initial weights and the
all-reduced step gradients for the parent test to compare with single-process gradients, then
both ranks run `locbe train` for two steps through the real loop.
"""

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import tiny_config  # noqa: E402

from locbe.data import build_dataset  # noqa: E402
from locbe.method.par import PAR  # noqa: E402
from locbe.method.regloss import RegularizedLoss  # noqa: E402
from locbe.method.step import step_generator, training_step  # noqa: E402
from locbe.models import build_model  # noqa: E402
from locbe.train import average_gradients, setup_distributed, train  # noqa: E402


def main(root: str, out: str) -> None:
    out_dir = Path(out)
    info, _ = setup_distributed("cpu")
    assert info.world_size == 2, "run me with torchrun --nproc_per_node=2"
    cfg = tiny_config(Path(root), out_dir / "run", batch_size=1)
    ds = build_dataset("synthetic", root, "train_aug", train=True, crop_size=cfg.crop_size, num_classes=21,
                       seed=cfg.seed)
    batch = torch.utils.data.default_collate([ds[info.rank]])
    torch.manual_seed(0)
    net = build_model(cfg.backbone, num_classes=21)
    for t in net.state_dict().values():
        torch.distributed.broadcast(t, src=0)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), out_dir / "init.pth")
    par, reg = PAR(), RegularizedLoss()
    params = list(net.parameters())
    grads = {}
    for key, step, use_sc in (("a", 1, False), ("b", 3, True)):
        step_cfg = dataclasses.replace(cfg, use_sc=use_sc)
        net.zero_grad(set_to_none=True)
        out = training_step(net, batch, step, step_cfg, par=par, reg_loss=reg,
                            generator=step_generator(cfg.seed, step, info.rank))
        out.total.backward()
        average_gradients(params, info.world_size)
        grads[key] = {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}
    if info.is_main:
        torch.save(grads, out_dir / "grads.pth")

    result = train(dataclasses.replace(cfg, batch_size=2, max_steps=2), progress=False)
    assert result.step == 2
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
