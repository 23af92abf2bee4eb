"""Block-scaled FP8 (e4m3) quantisation, DeepSeek-V3 style.

Activations: one fp32 scale per 1x128 group of a row. Weights: one fp32 scale per 128x128 block (the
``weight_scale_inv`` of DeepSeek-V3's FP8 checkpoints). A scale is the dequantisation multiplier:
x ~= q * scale, with scale = amax(block) / 448 so the block's largest magnitude maps to e4m3's largest finite
value. All-zero blocks get a tiny positive scale (never 0, never inf); values are clamped to +-448 so nothing
overflows to inf or NaN.

Both divisions are IEEE-rounded on every device, as in the kernels (div.rn.f32): ``scale_of`` divides by a tensor
of 448s, because torch on CUDA turns a division by a Python scalar into a multiplication by its rounded reciprocal,
which moves ~1 scale in 10^3 by one fp32 ulp and then ~0.2% of the e4m3 values by one e4m3 step.
"""
from __future__ import annotations

import torch

from .._checks import FP8_DTYPE, FP8_MAX

__all__ = ["quantize_fp8", "dequantize_fp8", "quantize_weight_fp8", "dequantize_weight_fp8", "MIN_AMAX", "scale_of"]

MIN_AMAX = 1e-10  # guards all-zero blocks


def scale_of(amax: torch.Tensor) -> torch.Tensor:
    """max(amax, MIN_AMAX) / 448 with IEEE rounding on CPU and CUDA alike (see the module's docstring)."""
    amax = amax.clamp(min=MIN_AMAX)
    return amax / torch.full_like(amax, FP8_MAX)


def quantize_fp8(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q e4m3 [M, K], scale fp32 [M, ceil(K/block)])."""
    M, K = x.shape
    nb = -(-K // block)
    xf = torch.nn.functional.pad(x.float(), (0, nb * block - K)).view(M, nb, block)
    scale = scale_of(xf.abs().amax(-1))
    q = (xf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(M, nb * block)[:, :K].contiguous(), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Inverse of quantize_fp8, in fp32."""
    K = q.shape[1]
    return q.float() * scale.repeat_interleave(block, dim=1)[:, :K]


def quantize_weight_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (q e4m3 [..., N, K], scale fp32 [..., ceil(N/bn), ceil(K/bk)])."""
    bn, bk = block
    *lead, N, K = w.shape
    nbn, nbk = -(-N // bn), -(-K // bk)
    wf = torch.nn.functional.pad(w.float(), (0, nbk * bk - K, 0, nbn * bn - N))
    wf = wf.view(*lead, nbn, bn, nbk, bk)
    scale = scale_of(wf.abs().amax(dim=(-3, -1)))  # [..., nbn, nbk]
    q = (wf / scale.unsqueeze(-1).unsqueeze(-3)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.view(*lead, nbn * bn, nbk * bk)[..., :N, :K].contiguous()
    return q, scale


def dequantize_weight_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    bn, bk = block
    N, K = q.shape[-2:]
    s = scale.repeat_interleave(bn, dim=-2).repeat_interleave(bk, dim=-1)[..., :N, :K]
    return q.float() * s
