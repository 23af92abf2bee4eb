"""Grouped GEMMs: rows of A grouped by expert through offsets, each group times its expert's weight."""
from __future__ import annotations

import torch

from .quant import dequantize_fp8, dequantize_weight_fp8, quantize_fp8

__all__ = ["grouped_gemm", "grouped_gemm_fp8", "linear_fp8", "swiglu"]


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, out_dtype=None, w_scale=None) -> torch.Tensor:
    """a [M, K], w [E, N, K], offsets [E+1] -> out [M, N] = a[o_e:o_e+1] @ w[e]^T, in fp32.

    With ``w_scale`` (FP8 weights) each expert's weight is dequantised when its rows are multiplied, so the fp32
    copy of one expert, not of all of them, is in memory at a time.
    """
    M, E, N = a.shape[0], w.shape[0], w.shape[1]
    out = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    bounds = offsets.tolist()
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            we = dequantize_weight_fp8(w[e], w_scale[e]) if w_scale is not None else w[e].float()
            out[lo:hi] = a[lo:hi].float() @ we.t()
    return out.to(out_dtype or a.dtype)


def grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out_dtype=torch.bfloat16) -> torch.Tensor:
    """The FP8 grouped GEMM as its exact meaning: dequantise both operands, multiply in fp32."""
    return grouped_gemm(dequantize_fp8(a, a_scale), w, offsets, out_dtype=out_dtype, w_scale=w_scale)


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """x [M, K] @ W^T with W = weight (e4m3 [N, K]) dequantised by its 128x128 block scales, x first quantised to
    e4m3 with one scale per 1x128 group (as the FP8 kernels take it); the product in fp32."""
    q, s = quantize_fp8(x.float())
    return (dequantize_fp8(q, s) @ dequantize_weight_fp8(weight, weight_scale).t()).to(out_dtype or x.dtype)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[M, 2I] with gate in the first half and up in the second -> silu(gate) * up, fp32."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
