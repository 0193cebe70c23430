"""Multi-process training under torchrun: process group, gradient mean, metric mean, agreement on stopping.

NCCL on GPU, gloo on CPU. Gradients are averaged with one coalesced all-reduce after ``backward``:
a LOC-BE step calls the network many times with different sub-graphs (CAM scales, main view, erased
view, local crops); averaging explicitly keeps that correct without DDP's single-forward assumptions,
and equals DDP's gradient mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from locbe.errors import LocbeError
from locbe.runtime.ranks import RankInfo, join_process_group


def setup_distributed(device_pref: str) -> tuple[RankInfo, torch.device]:
    """This process's ranks (joining torchrun's process group when launched by it) and its device."""
    want_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise LocbeError("--device cuda was requested but torch.cuda.is_available() is False; use --device cpu")
    info = join_process_group(cuda=want_cuda)
    if not want_cuda:
        return info, torch.device("cpu")
    if info.world_size == 1:
        return info, torch.device("cuda")
    torch.cuda.set_device(info.local_rank)
    return info, torch.device("cuda", info.local_rank)


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


def broadcast_parameters(net: torch.nn.Module, world_size: int) -> None:
    """Start every rank from rank 0's parameters and buffers, as DDP does."""
    if world_size > 1:
        for t in net.state_dict().values():
            dist.broadcast(t, src=0)


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank, so that every rank stops at the same step."""
    if world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()
