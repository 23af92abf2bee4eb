"""The router's load monitor in one launch: an EMA of per-expert token counts, the step counter and, when asked,
the bias-balancing step (DeepSeek-V3's auxiliary-loss-free rule). At decode sizes the torch form of this update is
seven tiny kernels per layer and step; here it is one."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import use_triton


@triton.jit
def _observe_kernel(counts_ptr, load_ptr, steps_ptr, bias_ptr, E, decay, gamma, BIAS_STEP: tl.constexpr,
                    BLOCK_E: tl.constexpr):
    offs = tl.arange(0, BLOCK_E)
    mask = offs < E
    c = tl.load(counts_ptr + offs, mask=mask, other=0).to(tl.float32)
    first = tl.load(steps_ptr) == 0
    old = tl.load(load_ptr + offs, mask=mask, other=0.0)
    new = tl.where(first, c, decay * old + (1 - decay) * c)
    tl.store(load_ptr + offs, new, mask=mask)
    if BIAS_STEP:
        mean = tl.sum(c, axis=0) / E
        d = mean - c
        sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        b = tl.load(bias_ptr + offs, mask=mask, other=0.0)
        tl.store(bias_ptr + offs, b + gamma * sign, mask=mask)
    tl.store(steps_ptr, tl.load(steps_ptr) + 1)


@torch.no_grad()
def observe_load(counts: torch.Tensor, load: torch.Tensor, steps: torch.Tensor, decay: float,
                 bias: torch.Tensor | None = None, gamma: float = 0.0) -> None:
    """In place: ``load`` (fp32 [E]) <- counts on the first step, else decay * load + (1 - decay) * counts;
    ``steps`` (int64 scalar) += 1; with ``bias`` (fp32 [E]): bias += gamma * sign(mean(counts) - counts)."""
    if use_triton(counts) and not torch.compiler.is_compiling() and load.dtype == torch.float32 and load.is_contiguous() and counts.is_contiguous() \
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())):
        E = counts.numel()
        _observe_kernel[(1,)](counts, load, steps, bias if bias is not None else load, E, float(decay), float(gamma),
                              BIAS_STEP=bias is not None, BLOCK_E=max(16, triton.next_power_of_2(E)))
        return
    c = counts.float()
    first = steps == 0
    load.copy_(torch.where(first, c, decay * load + (1 - decay) * c))
    steps.add_(1)
    if bias is not None:
        bias.add_(gamma * torch.sign(c.mean() - c))
