"""FP8 e4m3 quantisation with one fp32 scale per 1x128 group (activations) or 128x128 block (weights)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .._checks import FP8_DTYPE, FP8_MAX, check_multiple, check_tensor
from ..reference.quant import MIN_AMAX
from ._common import interpret_mode, use_triton

__all__ = [
    "quantize_fp8", "quantize_weight_fp8", "E4M3_MAX", "AMAX_FLOOR", "UPCAST_DOT", "to_e4m3_rne", "quantize_groups",
    "group_amax",
]

E4M3_MAX = tl.constexpr(FP8_MAX)
AMAX_FLOOR = tl.constexpr(MIN_AMAX)
# Triton's CPU interpreter multiplies bf16 tiles as raw integers: upcast dot operands there
UPCAST_DOT = tl.constexpr(interpret_mode())
# The interpreter truncates fp32 -> e4m3 casts: round to nearest even in fp32 there first. On the GPU the cast is
# one cvt.rn.satfinite.e4m3x2.f32 per two values, already round-to-nearest-even, and the emulation would cost ~12
# instructions per value (it made the fp8 permute compute-bound).
EMULATE_RNE = tl.constexpr(interpret_mode())


@triton.jit
def to_e4m3_rne(v):
    """Prepare fp32 values x / scale (|v| <= 448 up to rounding) for the e4m3 cast that follows, so that it rounds to
    nearest, ties to even, and saturates at +-448 on every backend.

    On the GPU the cast itself does both (cvt.rn.satfinite): v is returned as it is. In the interpreter, which
    truncates, v is clamped and rounded here to the nearest e4m3 value (still fp32), and the cast is then exact.
    e4m3 keeps 3 mantissa bits: the spacing at v is 2^(exponent(v) - 3), and 2^-9 below 2^-6 (subnormals). Scaling
    by powers of two is exact, so no division is needed.
    """
    if not EMULATE_RNE:
        return v
    v = tl.minimum(tl.maximum(v, -E4M3_MAX, propagate_nan=tl.PropagateNan.ALL), E4M3_MAX,
                   propagate_nan=tl.PropagateNan.ALL)
    bits = v.to(tl.int32, bitcast=True)
    exp = tl.maximum((bits >> 23) & 0xFF, 127 - 6)
    ulp = ((exp - 3) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((254 - (exp - 3)) << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds |x| < 2^22 to an integer, ties to even
    rounded = ((v * inv_ulp + magic) - magic) * ulp
    # NaN stays NaN (as cvt.rn.satfinite keeps it). The interpreter's cast clamps the exponent and keeps the top 3
    # mantissa bits (+1 when the next bit is set): the NaN 0x7FF00000 (mantissa 111 then 0s) lands on e4m3's NaN
    # (0x7F), where other NaNs land on 256, 384 or 448
    nan = tl.full(v.shape, 0x7FF00000, tl.int32).to(tl.float32, bitcast=True)
    return tl.where(v != v, nan, rounded)


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def group_amax(x, axis: tl.constexpr):
    """max |x| along ``axis``, at least AMAX_FLOOR, and NaN where the group holds a NaN (as the reference's
    ``amax``: tl.max and tl.maximum drop NaNs). A NaN amax makes the group's scale and every value of it NaN."""
    amax = tl.reduce(tl.abs(x), axis, _max_keep_nan)
    return tl.maximum(amax, AMAX_FLOOR, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def quantize_groups(x):
    """fp32 [R, GROUP] -> (values for the e4m3 cast [R, GROUP], fp32 scales [R]), bit-exact to the reference once cast.

    scale = max(amax, 1e-10) / 448; q = rne(clamp(x / scale, +-448)), the clamp and rounding by to_e4m3_rne and the
    cast. Both divisions are IEEE-rounded (tl.div_rn: div.rn.f32): Triton's plain fp32 "/" is an approximate
    division on NVIDIA GPUs, and Triton 3.6 drops tl.fdiv's ieee_rounding flag (div.full.f32, ~2 ulp). A group holding a NaN gets a NaN scale and NaN values (the reference's).
    """
    amax = group_amax(x, 1)  # all-zero groups get a tiny, finite scale
    scale = tl.div_rn(amax, tl.full(amax.shape, E4M3_MAX, tl.float32))
    scaled = tl.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
    return to_e4m3_rne(scaled), scale


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, stride_xm, stride_qm, stride_sm,
                          BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)  # which 1x128 group of the row
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = g * GROUP + tl.arange(0, GROUP)
    row_mask = offs_m < M
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=row_mask[:, None], other=0.0)
    q, scale = quantize_groups(x.to(tl.float32))
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q.to(q_ptr.dtype.element_ty),
             mask=row_mask[:, None])
    tl.store(s_ptr + offs_m * stride_sm + g, scale, mask=row_mask)


def _quantize_triton(x: torch.Tensor, block: int):
    M, K = x.shape
    q = torch.empty(M, K, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(M, K // block, dtype=torch.float32, device=x.device)
    if M:
        BLOCK_M = 16
        _quantize_rows_kernel[(triton.cdiv(M, BLOCK_M), K // block)](
            x, q, s, M, x.stride(0), q.stride(0), s.stride(0), BLOCK_M=BLOCK_M, GROUP=block, num_warps=4
        )
    return q, s


@torch.library.custom_op("moe_kernels::quantize_fp8", mutates_args=())
def _quantize_op(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return _quantize_triton(x.contiguous(), block)
    return reference.quantize_fp8(x, block)


@_quantize_op.register_fake
def _(x, block):
    M, K = x.shape
    return x.new_empty(M, K, dtype=FP8_DTYPE), x.new_empty(M, K // block, dtype=torch.float32)


def quantize_fp8(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of ``block``) -> (e4m3 [M, K], fp32 scales [M, K/block]); x ~= q * scale."""
    check_tensor("x", x, dtype=(torch.bfloat16, torch.float16, torch.float32), ndim=2)
    if block != 128:
        raise ValueError(f"block must be 128 (DeepSeek-V3's activation groups), got {block}")
    check_multiple("x.shape[1]", x.shape[1], block)
    return _quantize_op(x, block)


def quantize_weight_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (e4m3 [..., N, K], fp32 scales [..., ceil(N/128), ceil(K/128)]); runs once at load time."""
    check_tensor("w", w, dtype=(torch.bfloat16, torch.float16, torch.float32))
    if w.dim() < 2:
        raise ValueError(f"w must be at least 2-D [..., N, K], got shape {list(w.shape)}")
    if tuple(block) != (128, 128):
        raise ValueError(f"block must be (128, 128), got {block}")
    return reference.quantize_weight_fp8(w, tuple(block))
