"""PAR refinement at 224 and 448 with 21 classes: plain (materialised neighbour stacks) vs
low-memory layout: time, peak memory, and equality of the results (issue 6)."""

from __future__ import annotations

import pytest
import torch

from locbe.bench import measure_peak
from locbe.par import PAR

# the targets here are peak memory: the allocator returns large blocks on free (benchmarks/conftest.py)
MALLOC_STATE = "peak"

RESULTS: dict = {}


def inputs(size, b=2, k=21):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(b, 3, size, size, generator=g)
    masks = torch.softmax(torch.randn(b, k, size // 16, size // 16, generator=g) * 3, 1)
    return images, masks


@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("low_memory", [False, True], ids=["plain", "low_memory"])
def test_par(benchmark, size, low_memory):
    images, masks = inputs(size)
    par = PAR(low_memory=low_memory)
    with torch.no_grad():
        par(images, masks)  # warm-up
        out, peak = measure_peak(lambda: par(images, masks))
        benchmark.pedantic(par, args=(images, masks), rounds=3, iterations=1)
    RESULTS[(size, low_memory)] = (out, peak)
    benchmark.extra_info.update(size=size, low_memory=low_memory, peak_mb=peak / 2**20)
    if low_memory and (size, False) in RESULTS:
        plain, plain_peak = RESULTS[(size, False)]
        err = float((out - plain).abs().max() / plain.abs().max())
        benchmark.extra_info.update(max_rel_err=err, peak_vs_plain=peak / plain_peak)
        assert err < 1e-5  # float32 accumulation order only (tests/test_cam_par_losses.py)
