"""PAR refinement at 224 and 448 with 21 classes: plain (materialised neighbour stacks) vs
low-memory layout: time, peak memory, and equality of the results (issue 6)."""

from __future__ import annotations

import pytest
import torch

from locbe.bench import device_params, measure_peak, synchronized
from locbe.method.par import PAR

# the targets here are peak memory: the allocator returns large blocks on free (benchmarks/conftest.py)
MALLOC_STATE = "peak"

RESULTS: dict = {}


def inputs(size, b=2, k=21, device="cpu"):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(b, 3, size, size, generator=g)
    masks = torch.softmax(torch.randn(b, k, size // 16, size // 16, generator=g) * 3, 1)
    return images.to(device), masks.to(device)


@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("low_memory", [False, True], ids=["plain", "low_memory"])
@pytest.mark.parametrize("device", device_params())
def test_par(benchmark, device, size, low_memory):
    images, masks = inputs(size, device=device)
    par = PAR(low_memory=low_memory).to(device)
    run = synchronized(par, device)
    with torch.no_grad():
        run(images, masks)  # warm-up
        out, peak = measure_peak(lambda: run(images, masks), device=device)
        benchmark.pedantic(run, args=(images, masks), rounds=3, iterations=1)
    RESULTS[(device, size, low_memory)] = (out, peak)
    benchmark.extra_info.update(device=device, size=size, low_memory=low_memory, peak_mb=peak / 2**20)
    if low_memory and (device, size, False) in RESULTS:
        plain, plain_peak = RESULTS[(device, size, False)]
        err = float((out - plain).abs().max() / plain.abs().max())
        benchmark.extra_info.update(max_rel_err=err, peak_vs_plain=peak / plain_peak)
        assert err < 1e-5  # float32 accumulation order only (tests/test_cam_par_losses.py)
