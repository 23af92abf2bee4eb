"""The SwiGLU expert MLP and the full MoE layer, composed from the other references."""
from __future__ import annotations

import torch

from .gemm import grouped_gemm, swiglu
from .permute import permute, unpermute
from .quant import dequantize_fp8, quantize_fp8
from .routing import route

__all__ = ["expert_mlp", "dense_mlp", "moe_layer"]


def expert_mlp(
    x: torch.Tensor,
    offsets: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    x_scale: torch.Tensor | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Grouped SwiGLU MLP over expert-grouped rows.

    x [M, H] (with x_scale [M, H/128] when x is e4m3), w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I].
    FP8 weights come with their 128x128 scales. On the FP8 path the SwiGLU output is re-quantised to e4m3 with
    1x128 scales before the down projection, exactly as the fused kernel does; on the bf16 path it is rounded to
    x's dtype. Returns y [M, H] in out_dtype (default: bf16 for fp8 inputs, else x's dtype).
    """
    fp8 = w13_scale is not None
    if out_dtype is None:
        out_dtype = torch.bfloat16 if x.dtype == torch.float8_e4m3fn else x.dtype
    a = dequantize_fp8(x, x_scale) if x_scale is not None else x.float()
    h = swiglu(grouped_gemm(a, w13, offsets, out_dtype=torch.float32, w_scale=w13_scale))
    if fp8:
        h = dequantize_fp8(*quantize_fp8(h))
    elif out_dtype != torch.float32:
        h = h.to(out_dtype).float()
    return grouped_gemm(h, w2, offsets, out_dtype=out_dtype, w_scale=w2_scale)


def dense_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w13_scale=None, w2_scale=None) -> torch.Tensor:
    """One SwiGLU MLP (a shared expert) on every token: x [T, H], w13 [2I, H], w2 [H, I]."""
    offsets = torch.tensor([0, x.shape[0]], dtype=torch.int32, device=x.device)
    xs = None
    if w13_scale is not None:
        x, xs = quantize_fp8(x)
        w13_scale, w2_scale = w13_scale.unsqueeze(0), w2_scale.unsqueeze(0)
    return expert_mlp(x, offsets, w13.unsqueeze(0), w2.unsqueeze(0), xs, w13_scale, w2_scale)


def moe_layer(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    shared_w13: torch.Tensor | None = None,
    shared_w2: torch.Tensor | None = None,
    shared_w13_scale: torch.Tensor | None = None,
    shared_w2_scale: torch.Tensor | None = None,
    **routing_kwargs,
) -> torch.Tensor:
    """x [T, H] -> [T, H]: route, permute, expert MLPs, weighted un-permute, plus the shared experts."""
    num_experts = router_weight.shape[0]
    weights, ids, _ = route(x, router_weight, top_k, **routing_kwargs)
    fp8 = w13_scale is not None
    p = permute(x, ids, num_experts, fp8=fp8)
    y = expert_mlp(p.x, p.offsets, w13, w2, p.scale, w13_scale, w2_scale, out_dtype=torch.float32)
    out = unpermute(y, p, weights, out_dtype=torch.float32)
    if shared_w13 is not None:
        out = out + dense_mlp(x, shared_w13, shared_w2, shared_w13_scale, shared_w2_scale).float()
    return out.to(x.dtype)
