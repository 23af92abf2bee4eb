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


_COUNTERS: dict = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` zeroed int32 arrival counters for a split-K kernel whose last-arriving program of each group does the
    epilogue and then stores that group's counter back to 0. One buffer per (device, CUDA stream), zeroed once:
    kernels of one stream run in order and each leaves its counters at 0, so no memset runs per launch (a CUDA
    graph of a decode step keeps no memset node for them); kernels of two streams never share counters (the
    shared experts' side stream runs beside the routed experts). CPU (interpreter): a fresh zeroed tensor."""
    if device.type != "cuda":
        return torch.zeros(n, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device)
    key = (stream.device_index, stream.cuda_stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        # a new buffer (the old one is freed in stream order, after the kernels queued on it); the zero fill is
        # recorded in a CUDA graph only when it first happens during that graph's capture
        buf = _COUNTERS[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf[:n]
