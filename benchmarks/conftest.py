"""Benchmark configuration: fixed thread count, versions recorded next to every result."""

import torch

from locbe.bench import TIMING_MALLOC, set_malloc

torch.set_num_threads(min(2, torch.get_num_threads()))
MALLOC_PINNED = set_malloc(*TIMING_MALLOC)  # same allocator state for every timed round (locbe/bench.py)


def pytest_benchmark_update_machine_info(config, machine_info):
    import timm

    machine_info["torch"] = torch.__version__
    machine_info["timm"] = timm.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["malloc_thresholds"] = list(TIMING_MALLOC) if MALLOC_PINNED else None
    machine_info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
