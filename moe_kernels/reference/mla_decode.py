"""MLA's fused latent projection and absorbed decode, as plain PyTorch (fp32 inside): what the kernels compute.

Latent projection (one GEMM over the concatenated down-projections, then the per-row epilogue):

    y = x [W_DQ; W_DKV]^T                     [T, q_lora_rank + kv_lora_rank + rope]
    c_q = RMSNorm(y[:, :q_lora_rank])         the input of the q up-projection
    kv  = [RMSNorm(c_kv) | RoPE(k_r)]         one row of the latent cache, [T, kv_lora_rank + rope]

Absorbed decode (DeepSeek-V2 section 2.1.3): with W_UKV = kv_b_proj viewed as [h, nope + v, kv_lora_rank],
W_UK = its first ``nope`` rows per head and W_UV the last ``v``, the score q_nope . k_nope equals
(q_nope W_UK) . c_kv, and o_h = sum_j p_j (c_kv_j W_UV^T) equals (sum_j p_j c_kv_j) W_UV^T. So a decode step
attends with the latent query q_latent = q_nope W_UK [h, kv_lora_rank] directly over the cache rows
[c_kv | k_rope] (keys) and c_kv (values) and applies W_UV once to the result: no per-head keys are ever formed.

FP8 latent cache (``pack_latent_fp8``): each token's row is stored in ``fp8_row_bytes(C, R)`` bytes,

    [ c_kv as e4m3 (C bytes) | k_rope in bf16 (2 R bytes) | scale fp32 (4 bytes) | zero padding to 16 bytes ]

with one scale per token for its C latent columns: scale = max(amax(|c_kv|), 1e-10) / 448, e4m3 = rne(c_kv /
scale). (576 values: 656 bytes instead of 1152 in bf16.) The rope part stays bf16: it is 10% of the bytes and
carries the position. The decode reads the row as c_kv = e4m3 * scale (the scale applied to the scores and to
the softmax weights, never to the stored values). See docs/numerics.md (MLA) for the error against a bf16 cache.
"""
from __future__ import annotations

import torch

from .mla import apply_rope, rms_norm
from .._checks import FP8_MAX
from .quant import dequantize_fp8, dequantize_weight_fp8, quantize_fp8, scale_of

__all__ = ["mla_latent_proj", "mla_decode", "split_kv_b", "mla_decode_absorbed", "fp8_row_bytes", "pack_latent_fp8",
           "unpack_latent_fp8", "mla_decode_fp8_products"]


def fp8_row_bytes(C: int, R: int) -> int:
    """Bytes of one token's row in the FP8 latent cache: C e4m3 + R bf16 + one fp32 scale, padded to 16."""
    return -(-(C + 2 * R + 4) // 16) * 16


def pack_latent_fp8(kv: torch.Tensor, C: int) -> torch.Tensor:
    """Latent cache rows kv [..., C + R] (any float dtype) -> uint8 [..., fp8_row_bytes(C, R)] (layout above)."""
    *lead, D = kv.shape
    R = D - C
    x = kv.reshape(-1, D).float()
    c = x[:, :C]
    scale = scale_of(c.abs().amax(-1))  # [T], IEEE-rounded as the kernels'
    q = (c / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    out = torch.zeros(x.shape[0], fp8_row_bytes(C, R), dtype=torch.uint8, device=kv.device)
    out[:, :C] = q.view(torch.uint8)
    out[:, C : C + 2 * R] = x[:, C:].to(torch.bfloat16).view(torch.uint8)
    out[:, C + 2 * R : C + 2 * R + 4] = scale[:, None].contiguous().view(torch.uint8)
    return out.view(*lead, -1)


def unpack_latent_fp8(packed: torch.Tensor, C: int, R: int) -> torch.Tensor:
    """uint8 [..., fp8_row_bytes(C, R)] -> the rows it stands for, fp32 [..., C + R]."""
    *lead, nb = packed.shape
    p = packed.reshape(-1, nb).contiguous()
    q = p[:, :C].view(torch.float8_e4m3fn).float()
    rope = p[:, C : C + 2 * R].contiguous().view(torch.bfloat16).float()
    scale = p[:, C + 2 * R : C + 2 * R + 4].contiguous().view(torch.float32)  # [T, 1]
    return torch.cat([q * scale, rope], -1).view(*lead, C + R)


def mla_latent_proj(
    x: torch.Tensor,
    w: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    kv_norm_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_lora_rank: int,
    kv_lora_rank: int,
    w_scale: torch.Tensor | None = None,
    eps: float = 1e-6,
    interleave: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H]; w [q_lora_rank + kv_lora_rank + rope, H] (float, or e4m3 with 128x128 ``w_scale``, in which case
    x is quantised to e4m3 with 1x128 scales first); cos/sin [T, rope/2] -> (c_q [T, q_lora_rank], kv [T, kv_lora_rank
    + rope]), fp32. q_lora_rank may be 0 (no q latent: DeepSeek-V2-Lite)."""
    if w_scale is not None:
        xq, xs = quantize_fp8(x)
        y = dequantize_fp8(xq, xs) @ dequantize_weight_fp8(w, w_scale).t()
    else:
        y = x.float() @ w.float().t()
    Q, C = q_lora_rank, kv_lora_rank
    c_q = rms_norm(y[:, :Q], q_norm_weight, eps) if Q else y[:, :0]
    c_kv = rms_norm(y[:, Q : Q + C], kv_norm_weight, eps)
    k_r = apply_rope(y[:, Q + C :], cos, sin, interleave)
    return c_q, torch.cat([c_kv, k_r], dim=-1)


def _cache_rows(kv_cache, b: int, L: int, block_table, page: int):
    if block_table is None:
        return kv_cache[b, :L]
    n = torch.arange(L, device=kv_cache.device)
    return kv_cache[block_table[b, n // page].long(), n % page]


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Queries of each batch row over its latent cache -> o_latent [B, h, kv_lora_rank] (or [B, s_q, h, C]) fp32.

    q_latent [B, h, C] (q_nope already multiplied by W_UK), q_rope [B, h, R] (rotated); or [B, s_q, h, C] /
    [B, s_q, h, R]: s_q new tokens per row (speculative / MTP decoding), the last s_q of the row's keys, causal:
    query t sees keys 0 .. cache_seqlens[b] - s_q + t. kv_cache [B, S_max, C + R] rows [c_kv | k_rope], or paged
    [num_blocks, page, C + R] with block_table int32 [B, max_blocks] (logical key n of row b lives in block
    block_table[b, n // page], slot n % page); either may be the FP8 cache (uint8 rows of ``fp8_row_bytes(C, R)``
    bytes). cache_seqlens int32 [B]: row b's keys; a query with no key gets zeros.
    """
    if q_latent.dim() == 3:
        return mla_decode(q_latent.unsqueeze(1), q_rope.unsqueeze(1), kv_cache, cache_seqlens, softmax_scale,
                          block_table)[:, 0]
    B, s_q, h, C = q_latent.shape
    R = q_rope.shape[-1]
    if kv_cache.dtype == torch.uint8:
        kv_cache = unpack_latent_fp8(kv_cache, C, R)
    page = kv_cache.shape[1]
    out = torch.zeros(B, s_q, h, C, dtype=torch.float32, device=q_latent.device)
    for b, L in enumerate(cache_seqlens.tolist()):
        if L == 0:
            continue
        rows = _cache_rows(kv_cache, b, L, block_table, page).float()  # [L, C + R]
        for t in range(s_q):
            n = L - (s_q - 1 - t)  # keys this query sees
            if n <= 0:
                continue
            scores = (q_latent[b, t].float() @ rows[:n, :C].t() + q_rope[b, t].float() @ rows[:n, C:].t())
            out[b, t] = torch.softmax(scores * softmax_scale, dim=-1) @ rows[:n, :C]
    return out


def mla_decode_fp8_products(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mla_decode`` over the FP8 cache with the roundings of the e4m3-product kernel (ops/mla_decode_sm90_fp8.py),
    in float64 otherwise: each query row's latent part quantised to e4m3 (scale amax / 448), S = sq sk (q8 . k8) +
    q_rope . k_rope, and the softmax weights times each key's scale, P x sk (in [0, 1] against the scale-shifted
    max), rounded to e4m3 before they multiply the raw e4m3 values; the row sums stay unrounded. The kernel shifts
    by the running max of each tile rather than the row's final max: the same roundings wherever the weights stay
    above e4m3's normal range (2^-6). Arguments and result as ``mla_decode``, whose FP8 cache layout it needs."""
    if q_latent.dim() == 3:
        return mla_decode_fp8_products(q_latent.unsqueeze(1), q_rope.unsqueeze(1), kv_cache, cache_seqlens,
                                       softmax_scale, block_table)[:, 0]
    if kv_cache.dtype != torch.uint8:
        raise ValueError(f"mla_decode_fp8_products needs the FP8 cache (uint8 rows), got {kv_cache.dtype}")
    B, s_q, h, C = q_latent.shape
    R = q_rope.shape[-1]
    page = kv_cache.shape[1]
    f8 = torch.float8_e4m3fn
    out = torch.zeros(B, s_q, h, C, dtype=torch.float32, device=q_latent.device)
    for b, L in enumerate(cache_seqlens.tolist()):
        if L == 0:
            continue
        p = _cache_rows(kv_cache, b, L, block_table, page)  # [L, bytes]
        v8 = p[:, :C].contiguous().view(f8).double()  # raw e4m3 values
        kr = p[:, C : C + 2 * R].contiguous().view(torch.bfloat16).double()
        sk = p[:, C + 2 * R : C + 2 * R + 4].contiguous().view(torch.float32).double()[:, 0]
        for t in range(s_q):
            n = L - (s_q - 1 - t)
            if n <= 0:
                continue
            q = q_latent[b, t].double()  # [h, C]
            amax = q.abs().amax(-1, keepdim=True)
            sq = amax / FP8_MAX
            q8 = torch.where(amax > 0, q / torch.where(amax > 0, sq, 1.0), 0.0).to(f8).double()
            scores = sq * (q8 @ v8[:n].t()) * sk[:n] + q_rope[b, t].double() @ kr[:n].t()
            x = scores * softmax_scale
            m = (x + sk[:n].log()).amax(-1, keepdim=True)
            w = torch.exp(x + sk[:n].log() - m)  # P x sk, <= 1
            den = (w / sk[:n]).sum(-1, keepdim=True)
            out[b, t] = ((w.to(f8).double() @ v8[:n]) / den).float()
    return out


def split_kv_b(w_kv_b: torch.Tensor, num_heads: int, qk_nope_head_dim: int, v_head_dim: int):
    """kv_b_proj.weight [h * (nope + v), C] -> (W_UK [h, nope, C], W_UV [h, v, C]) as views."""
    w = w_kv_b.view(num_heads, qk_nope_head_dim + v_head_dim, -1)
    return w[:, :qk_nope_head_dim], w[:, qk_nope_head_dim:]


def mla_decode_absorbed(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    w_kv_b: torch.Tensor,
    qk_nope_head_dim: int,
    v_head_dim: int,
    softmax_scale: float,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """q_nope [B, h, nope], q_rope [B, h, R] (rotated) -> per-head attention output [B, h, v] fp32, through the
    latent cache only (equal to expanding the cache with kv_b_proj and attending per head)."""
    h = q_nope.shape[1]
    w_uk, w_uv = split_kv_b(w_kv_b.float(), h, qk_nope_head_dim, v_head_dim)
    q_latent = torch.einsum("bhd,hdc->bhc", q_nope.float(), w_uk)
    o_latent = mla_decode(q_latent, q_rope, kv_cache, cache_seqlens, softmax_scale, block_table)
    return torch.einsum("bhc,hvc->bhv", o_latent, w_uv)
