"""Elapsed time of a block on CPU or GPU, for the step's timings and the benchmarks."""

from __future__ import annotations

import time


class Stopwatch:
    """Elapsed seconds of a block: CUDA events on a GPU (the work queued on the current stream),
    ``time.perf_counter`` on CPU."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.seconds = 0.0

    def __enter__(self):
        import torch

        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self.t0
        return False
