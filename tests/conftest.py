"""Test setup: without a GPU, Triton kernels run through Triton's CPU interpreter; gpu/multigpu tests skip.

Tests draw fresh random data: nothing is seeded globally.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    # must happen before any moe_kernels / triton kernel import: @triton.jit reads it at decoration time
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))  # tests/_helpers.py

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "multigpu: needs >= 2 CUDA GPUs, run under torchrun/spawn (skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs >= 2 CUDA GPUs (run under torchrun)")
    for item in items:
        if "multigpu" in item.keywords and n_gpu < 2:
            item.add_marker(skip_multi)
        elif "gpu" in item.keywords and n_gpu < 1:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Run a test on the CPU (Triton interpreter) and, marked gpu, on CUDA."""
    return request.param

