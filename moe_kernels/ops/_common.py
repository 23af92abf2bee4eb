"""What every op shares: which implementation a call takes."""
from __future__ import annotations

import os

import torch


def interpret_mode() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through Triton's interpreter (how CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors take the Triton kernels; CPU tensors the reference, unless the interpreter is on."""
    return t.is_cuda or (t.device.type == "cpu" and interpret_mode())



def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` zeroed int32 arrival counters for a split-K kernel whose last-arriving program of each group does the
    epilogue (and stores that group's counter back to 0, so counters could serve a next launch). Fresh per launch
    (one small memset): a buffer cached across launches was tried and broke ``torch.compile(mode="reduce-overhead")``
    (its cudagraph trees find a live tensor in the graph's pool that is no output; H100, 2026-12-07)."""
    return torch.zeros(n, dtype=torch.int32, device=device)
