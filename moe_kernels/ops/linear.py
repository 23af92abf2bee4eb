"""A dense linear layer with block-scaled FP8 weights: DeepSeek-V3's FP8 ``Linear`` (e4m3 weight, one fp32 scale
per 128x128 block, activations quantised 1x128 on the fly), run by the grouped FP8 GEMM with one group.

DeepSeek-V3's checkpoints store every projection this way, the attention's included; bf16 copies of the attention
projections are half of MLA's prefill GEMM time. One group is one expert of ``grouped_gemm``: the same kernels
(the Hopper Gluon wgmma kernel for many rows, the weight-streaming decode kernel for a few), the same configs
(tuned tables keyed by (N, K), else the defaults), the same numerics (fp32 accumulation per 128-deep K block, the
block scales applied at each block's promotion).
"""
from __future__ import annotations

import torch

from .._checks import check_multiple, check_tensor
from .. import reference
from .._checks import FP8_DTYPE
from ._common import use_triton
from .grouped_gemm import SCALE_BLOCK, _launch
from .quant import _quantize_triton

__all__ = ["linear_fp8"]

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


_ONE_GROUP: dict = {}  # (M, device) -> int32 [0, M] on the device: the offsets of one group, made once


def _one_group(M: int, device: torch.device) -> torch.Tensor:
    """offsets [0, M] on the device, made by kernels (no host-to-device copy, so a CUDA-graph capture can take
    it) and kept for the next call of the same size, except one made during a capture (graph-pool memory). Kept
    for good: a CUDA graph captured later reads the tensor without holding it, so dropping it could hand its
    memory to something else under the graph (one small block per distinct row count)."""
    key = (M, device)
    offsets = _ONE_GROUP.get(key)
    if offsets is None:
        offsets = torch.arange(2, dtype=torch.int32, device=device) * M
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _ONE_GROUP[key] = offsets
    return offsets


def _linear_fp8_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, out: torch.Tensor,
                       cfg: dict | None = None) -> None:
    """Quantise x's rows and launch the grouped FP8 GEMM with one group into ``out``; ``cfg``: a launch config
    of ``grouped_gemm_configs`` (default: the tables' for (N, K) and M rows, else the defaults)."""
    M = x.shape[0]
    q, q_scale = _quantize_triton(x, SCALE_BLOCK)
    _launch(q, q_scale, weight.unsqueeze(0), weight_scale.unsqueeze(0), out, offsets=_one_group(M, x.device),
            cfg=cfg)


@torch.library.custom_op("moe_kernels::linear_fp8", mutates_args=())
def _linear_fp8_op(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    if use_triton(x):
        _linear_fp8_triton(x, weight, weight_scale, out)
    else:
        out.copy_(reference.linear_fp8(x, weight, weight_scale, out_dtype=torch.float32))
    return out


@_linear_fp8_op.register_fake
def _(x, weight, weight_scale, out_dtype):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=out_dtype)


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T with W block-scaled e4m3; x is quantised to e4m3 with one scale per 1x128
    group of each row (DeepSeek-V3's activation groups) inside the call.

    Args:
        x: [..., K] bf16 / fp16 / fp32, K a multiple of 128.
        weight: e4m3 [N, K]; weight_scale: fp32 [ceil(N/128), K/128] (DeepSeek-V3's ``weight_scale_inv``:
            W[n, k] ~= weight[n, k] * weight_scale[n // 128, k // 128]).
        out_dtype: the output's dtype (default x's): bf16, fp16 or fp32.
    Returns:
        [..., N] in out_dtype; the reference on CPU tensors without TRITON_INTERPRET=1.
    """
    check_tensor("x", x, dtype=OUT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (its last is K)")
    K = x.shape[-1]
    check_multiple("x.shape[-1] (K)", K, SCALE_BLOCK)
    check_tensor("weight", weight, dtype=FP8_DTYPE, ndim=2, device=x.device)
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight must have shape [N, {K}] to match x's last dimension, got {list(weight.shape)}")
    check_tensor("weight_scale", weight_scale, dtype=torch.float32,
                 shape=(-(-N // SCALE_BLOCK), K // SCALE_BLOCK), device=x.device)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    lead = x.shape[:-1]
    y = _linear_fp8_op(x.reshape(-1, K).contiguous(), weight.contiguous(), weight_scale.contiguous(), out_dtype)
    return y.view(*lead, N)
