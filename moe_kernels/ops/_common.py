"""What every op shares: which implementation a call takes, and how the decode chain launches."""
from __future__ import annotations

import functools
import os

import torch

import triton
import triton.language as tl

try:  # the kernels' first statements under PDL (triton.language.extra.cuda: Triton 3.6 and 3.8 have them)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: pdl() is False, so no kernel traces them
    gdc_launch_dependents = gdc_wait = None


def interpret_mode() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through Triton's interpreter (how CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors take the Triton kernels; CPU tensors the reference, unless the interpreter is on."""
    return t.is_cuda or (t.device.type == "cpu" and interpret_mode())


def pdl_enabled() -> bool:
    """The switch alone: ``MOE_KERNELS_PDL`` unset or anything but ``0`` (read at each call)."""
    return os.environ.get("MOE_KERNELS_PDL", "1") != "0"


def pdl(device: torch.device) -> bool:
    """Programmatic dependent launch for the decode chain's kernels (route, permute, the decode GEMMs, unpermute):
    a kernel's programs start while the previous kernel of the stream still runs, and so its launch and ramp hide
    behind that kernel's tail. On by default on CUDA, not interpreted, sm_90+, with a Triton that has ``gdc_wait``;
    ``MOE_KERNELS_PDL=0`` (read at each call) turns it off. Measured on an H100 (`bench/README.md`, sixth and
    seventh sessions): 1.00-1.05x the decode block in CUDA graphs, never slower; the layer's outputs the same bits
    with it as without, eager and replayed (`tests/test_pdl.py`, H100).

    Safe: a kernel launched with it runs griddepcontrol.wait (the previous grid has completed and its writes are
    visible) before touching any memory. It lets its own dependents launch right after that wait: a dependent's
    wait still waits for this whole grid to complete."""
    if not pdl_enabled() or device.type != "cuda" or interpret_mode():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return gdc_wait is not None and _capability_major(index) >= 9


def pdl_kwargs(device: torch.device) -> dict:
    """A launch's keyword arguments for ``pdl(device)``: none when off (the interpreter sees no launch_pdl)."""
    return dict(PDL=True, launch_pdl=True) if pdl(device) else {}


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """A decode-chain kernel's first statement: under PDL wait for the previous grid (its writes visible), then let
    the next one launch; nothing (not even traced) without it."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` zeroed int32 arrival counters for a split-K kernel whose last-arriving program of each group does the
    epilogue (and stores that group's counter back to 0, so counters could serve a next launch). Fresh per launch
    (one small memset): a buffer cached across launches was tried and broke ``torch.compile(mode="reduce-overhead")``
    (its cudagraph trees find a live tensor in the graph's pool that is no output; H100, 2026-12-07). One buffer
    zeroed once per decode step and sliced for every split-K launch of it was tried too: 0.99-1.01x at T = 1 and 8
    (H100, seventh session, `bench/README.md`), so each launch keeps its own fill."""
    return torch.zeros(n, dtype=torch.int32, device=device)
