"""RMSNorm as HuggingFace's Llama-style models compute it (``reference.llama_rms_norm``), in one kernel.

transformers' ``LlamaRMSNorm`` runs about six kernels a norm (cast to fp32, square, mean, rsqrt and multiply, cast
back, weight multiply), each a pass over [T, H]; this kernel reads x once and writes the output once. A program
holds ROWS whole rows in registers (BLOCK_H = next_pow2(H) columns, up to MAX_H): small H takes several rows a
program so that each one still moves a few thousand elements.

Both of HF's roundings are kept: the normalised row to x's dtype, then the weight product (in fp32, rounded once
to the promoted dtype: what torch's bf16 * bf16 computes). Only the fp32 sum of squares (another order) and rsqrt
may differ from torch's in the last bits; where that flips the rounding of a normalised value, its output differs
from HF's by an ulp, two where |weight| > 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_number, check_tensor
from ..reference.norm import llama_rms_norm
from ._common import use_triton

__all__ = ["rms_norm"]

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_H = 65536  # one row in registers: 64 fp32 values a thread at 32 warps
TILE = 2048  # elements a program normalises at least (rows x BLOCK_H): several rows a program below H = 2048


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_rows, H, stride_x, stride_out, eps,
                     ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    mask = (offs_m < n_rows)[:, None] & h_mask[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
    # masked columns load as 0, so the sum is the row's; rows past n_rows normalise zeros and are not stored
    h = x * tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)[:, None]
    # HF rounds the normalised row to x's dtype before the weight multiply (a no-op for fp32 x)
    h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_h[None, :], (h * w[None, :]).to(out_ptr.dtype.element_ty),
             mask=mask)


def _launch_config(H: int) -> tuple[int, int, int]:
    """(BLOCK_H, ROWS, num_warps): 16 elements a thread up to 32 warps (one 7168-wide bf16 row: 16 warps)."""
    block_h = triton.next_power_of_2(H)
    rows = max(1, TILE // block_h)
    return block_h, rows, min(32, max(4, rows * block_h // 512))


def _rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """x [N, H] with unit last stride -> out [N, H] (contiguous, written in full)."""
    N, H = x.shape
    if N == 0 or H == 0:
        return out
    BLOCK_H, ROWS, num_warps = _launch_config(H)
    _rms_norm_kernel[(triton.cdiv(N, ROWS),)](
        x, weight.contiguous(), out, N, H, x.stride(0), out.stride(0), eps,
        ROWS=ROWS, BLOCK_H=BLOCK_H, num_warps=num_warps,
    )
    return out


@torch.library.custom_op("moe_kernels::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not use_triton(x):
        return llama_rms_norm(x, weight, eps)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if out.numel():
        H = x.shape[-1]
        x2 = x.reshape(-1, H)  # a view where the leading dims allow it, else a copy
        _rms_norm_triton(x2 if x2.stride(-1) == 1 else x2.contiguous(), weight, eps, out.view(-1, H))
    return out


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)`` with the statistics in fp32: transformers'
    ``LlamaRMSNorm`` (and DeepSeek-V3's, Qwen-MoE's, Mixtral's...) in one kernel.

    Args: x [..., H] bf16/fp16/fp32, H <= 65536 (any leading dims; a non-unit last stride is copied); weight [H]
    bf16/fp16/fp32 on x's device; eps >= 0. Returns [..., H] in ``torch.promote_types(weight.dtype, x.dtype)``.
    No backward (``moe_kernels.RMSNorm`` runs the torch formula when gradients are required).
    """
    check_tensor("x", x, dtype=DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalised one), got a 0-D tensor")
    H = x.shape[-1]
    if H > MAX_H:
        raise ValueError(f"x's last dimension must be <= {MAX_H} (one row in registers), got {H}")
    check_tensor("weight", weight, dtype=DTYPES, shape=(H,), device=x.device)
    eps = check_number("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return _rms_norm_op(x, weight, eps)
