"""Benchmark configuration: fixed thread count, versions recorded next to every result."""

import pytest
import torch

from locbe.bench import PEAK_MALLOC, TIMING_MALLOC, set_malloc

torch.set_num_threads(min(2, torch.get_num_threads()))
MALLOC_STATES = {"timing": TIMING_MALLOC, "peak": PEAK_MALLOC}


@pytest.fixture(autouse=True, scope="module")
def malloc_state(request):
    """One allocator state per suite (locbe/bench.py): "timing" (blocks up to 32 MiB reused from the heap)
    unless the module's targets are peak memory and it sets MALLOC_STATE = "peak"."""
    name = getattr(request.module, "MALLOC_STATE", "timing")
    set_malloc(*MALLOC_STATES[name])
    return name


def pytest_benchmark_update_machine_info(config, machine_info):
    import timm

    machine_info["torch"] = torch.__version__
    machine_info["timm"] = timm.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["malloc_states"] = {k: list(v) for k, v in MALLOC_STATES.items()}
    machine_info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
