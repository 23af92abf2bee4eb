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
