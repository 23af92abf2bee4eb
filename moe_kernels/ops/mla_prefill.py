"""MLA prefill: the per-head queries, keys and values that scaled_dot_product_attention takes, one pass each.

Prefill attention runs on expanded heads (``reference.mla.mla_prefill_heads``): q [B, h, S, nope + rope] with the
rope part rotated, k [B, h, L, nope + rope] = [k_nope | the one shared k_rope], v [B, h, L, v], each contiguous.
Composed from torch ops that is a chain over tensors of 100-200 MB each at S = 4096 and 128 heads: the rotation in
fp32 (an upcast copy, strided halves, four products, a concatenation), the cast back, and two concatenations and a
copy over transposed views. Here each operand is read once and written once, in its final layout:

  * ``_prefill_q_kernel``: program (token block, head, batch row) copies the nope columns of its tokens' q rows
    and rotates the rope columns in fp32 (pairs interleaved or split-half, written [first | second] as the
    reference writes them), rounding once to q's dtype.
  * ``_prefill_kv_kernel``: program (key block, head, batch row) writes k = [k_nope | k_rope] (k_rope already
    rotated by the latent projection, the same for every head) and v, from the rows of c_kv W_UKV.

The layouts are the ones the torch composition produces, so SDPA picks the same attention kernel for either.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_int, check_tensor
from ..reference import mla as ref
from ._common import use_triton

__all__ = ["mla_prefill_heads"]

BLOCK_T = 32  # tokens a program: a [32, 128] bf16 tile is 8 KB, and 128 heads x S / 32 programs fill any GPU


@triton.jit
def _prefill_q_kernel(
    q_ptr, cos_ptr, sin_ptr, out_ptr, S, H,
    stride_qb, stride_qs, stride_qh, stride_cb, stride_cs, stride_sb, stride_ss,
    DN: tl.constexpr, DR: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DN: tl.constexpr, HALF: tl.constexpr,
    INTERLEAVE: tl.constexpr,
):
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < S
    src = q_ptr + b * stride_qb + offs_t[:, None].to(tl.int64) * stride_qs + head * stride_qh
    dst = out_ptr + ((b * H + head) * S + offs_t[:, None]) * (DN + DR)
    out_ty = out_ptr.dtype.element_ty

    offs_d = tl.arange(0, BLOCK_DN)
    d_mask = t_mask[:, None] & (offs_d < DN)[None, :]
    tl.store(dst + offs_d[None, :], tl.load(src + offs_d[None, :], mask=d_mask), mask=d_mask)

    offs_i = tl.arange(0, HALF)
    i_mask = t_mask[:, None] & (offs_i < DR // 2)[None, :]
    if INTERLEAVE:  # pairs (x0, x1), (x2, x3), ...
        x1 = tl.load(src + DN + 2 * offs_i[None, :], mask=i_mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + DN + 2 * offs_i[None, :] + 1, mask=i_mask, other=0.0).to(tl.float32)
    else:  # pairs (x_i, x_{i + DR/2})
        x1 = tl.load(src + DN + offs_i[None, :], mask=i_mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + DN + DR // 2 + offs_i[None, :], mask=i_mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + b * stride_cb + offs_t[:, None] * stride_cs + offs_i[None, :], mask=i_mask, other=0.0)
    sin = tl.load(sin_ptr + b * stride_sb + offs_t[:, None] * stride_ss + offs_i[None, :], mask=i_mask, other=0.0)
    tl.store(dst + DN + offs_i[None, :], (x1 * cos - x2 * sin).to(out_ty), mask=i_mask)
    tl.store(dst + DN + DR // 2 + offs_i[None, :], (x2 * cos + x1 * sin).to(out_ty), mask=i_mask)


@triton.jit
def _prefill_kv_kernel(
    kv_ptr, kr_ptr, k_ptr, v_ptr, L, H,
    stride_kvb, stride_kvl, stride_krb, stride_krl,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DN: tl.constexpr,
    BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < L
    src = kv_ptr + b * stride_kvb + offs_t[:, None].to(tl.int64) * stride_kvl + head * (DN + DV)
    row = (b * H + head) * L + offs_t[:, None]  # the key's row in k / v viewed [B * H * L, d]
    out_ty = k_ptr.dtype.element_ty

    offs_n = tl.arange(0, BLOCK_DN)
    n_mask = t_mask[:, None] & (offs_n < DN)[None, :]
    tl.store(k_ptr + row * (DN + DR) + offs_n[None, :], tl.load(src + offs_n[None, :], mask=n_mask).to(out_ty),
             mask=n_mask)
    offs_r = tl.arange(0, BLOCK_DR)
    r_mask = t_mask[:, None] & (offs_r < DR)[None, :]
    k_rope = tl.load(kr_ptr + b * stride_krb + offs_t[:, None].to(tl.int64) * stride_krl + offs_r[None, :],
                     mask=r_mask)
    tl.store(k_ptr + row * (DN + DR) + DN + offs_r[None, :], k_rope.to(out_ty), mask=r_mask)
    offs_v = tl.arange(0, BLOCK_DV)
    v_mask = t_mask[:, None] & (offs_v < DV)[None, :]
    tl.store(v_ptr + row * DV + offs_v[None, :], tl.load(src + DN + offs_v[None, :], mask=v_mask).to(out_ty),
             mask=v_mask)


def _launch(q, cos, sin, kv, k_rope, nope_dim, v_dim, interleave, q_out, k_out, v_out):
    B, S, H, D = q.shape
    L = kv.shape[1]
    rope_dim = D - nope_dim
    warps = 4 if nope_dim >= 64 else 2
    if S:
        _prefill_q_kernel[(triton.cdiv(S, BLOCK_T), H, B)](
            q, cos, sin, q_out, S, H, q.stride(0), q.stride(1), q.stride(2),
            cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            DN=nope_dim, DR=rope_dim, BLOCK_T=BLOCK_T, BLOCK_DN=triton.next_power_of_2(nope_dim),
            HALF=triton.next_power_of_2(rope_dim // 2), INTERLEAVE=interleave, num_warps=warps,
        )
    if L:
        _prefill_kv_kernel[(triton.cdiv(L, BLOCK_T), H, B)](
            kv, k_rope, k_out, v_out, L, H, kv.stride(0), kv.stride(1), k_rope.stride(0), k_rope.stride(1),
            DN=nope_dim, DR=rope_dim, DV=v_dim, BLOCK_T=BLOCK_T, BLOCK_DN=triton.next_power_of_2(nope_dim),
            BLOCK_DR=triton.next_power_of_2(rope_dim), BLOCK_DV=triton.next_power_of_2(v_dim), num_warps=warps,
        )


@torch.library.custom_op("moe_kernels::mla_prefill_heads", mutates_args=())
def _mla_prefill_heads_op(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor,
                          k_rope: torch.Tensor, nope_dim: int, v_dim: int, interleave: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not use_triton(q):
        return ref.mla_prefill_heads(q, cos, sin, kv, k_rope, nope_dim, v_dim, interleave)
    B, S, H, D = q.shape
    L = kv.shape[1]
    q_out = torch.empty(B, H, S, D, dtype=q.dtype, device=q.device)
    k_out = torch.empty(B, H, L, D, dtype=q.dtype, device=q.device)
    v_out = torch.empty(B, H, L, v_dim, dtype=q.dtype, device=q.device)
    if B and H:
        _launch(q, cos, sin, kv, k_rope, nope_dim, v_dim, interleave, q_out, k_out, v_out)
    return q_out, k_out, v_out


@_mla_prefill_heads_op.register_fake
def _(q, cos, sin, kv, k_rope, nope_dim, v_dim, interleave):
    B, S, H, D = q.shape
    L = kv.shape[1]
    return q.new_empty(B, H, S, D), q.new_empty(B, H, L, D), q.new_empty(B, H, L, v_dim)


def mla_prefill_heads(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor,
                      k_rope: torch.Tensor, nope_dim: int, v_dim: int, *, interleave: bool = True):
    """q [B, S, h, nope + rope] (rope part unrotated), cos / sin [B, S, rope / 2] fp32, kv [B, L, h * (nope + v)]
    (c_kv W_UKV), k_rope [B, L, rope] (rotated) -> (q [B, h, S, nope + rope] rotated, k [B, h, L, nope + rope],
    v [B, h, L, v]), contiguous, in q's dtype: the operands of scaled_dot_product_attention for MLA prefill
    (``reference.mla.mla_prefill_heads``). Every input needs unit stride along its last dimension."""
    check_tensor("q", q, dtype=(torch.bfloat16, torch.float16, torch.float32), ndim=4)
    B, S, H, D = q.shape
    check_int("nope_dim", nope_dim, lo=1)
    check_int("v_dim", v_dim, lo=1)
    rope_dim = D - nope_dim
    if rope_dim < 2 or rope_dim % 2:
        raise ValueError(f"q's last dimension ({D}) minus nope_dim ({nope_dim}) must be an even rope size >= 2")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, dtype=torch.float32, shape=(B, S, rope_dim // 2), device=q.device)
    check_tensor("kv", kv, ndim=3, device=q.device)
    L = kv.shape[1]
    if kv.shape[0] != B or kv.shape[2] != H * (nope_dim + v_dim):
        raise ValueError(f"kv must have shape [{B}, L, {H} * ({nope_dim} + {v_dim})], got {list(kv.shape)}")
    check_tensor("k_rope", k_rope, shape=(B, L, rope_dim), device=q.device)
    if any(t.stride(-1) != 1 for t in (q, cos, sin, kv, k_rope)):
        raise ValueError("q, cos, sin, kv and k_rope must have unit stride along their last dimension")
    return _mla_prefill_heads_op(q, cos, sin, kv, k_rope, int(nope_dim), int(v_dim), bool(interleave))
