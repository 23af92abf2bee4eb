"""Multi-head latent attention (DeepSeek-V2/V3), prefill, as the equations of the paper.

    c_q  = RMSNorm(x W_DQ)                      q latent, q_lora_rank (1536)
    q    = c_q W_UQ -> heads x (nope 128 | rope 64)
    c_kv, k_r = split(x W_DKV, [kv_lora_rank 512, rope 64]);  c_kv = RMSNorm(c_kv)
    k_nope, v = split(c_kv W_UKV -> heads x (128 | 128))
    RoPE on q's rope part and on the single shared k_r; k = [k_nope | k_r] for every head
    o    = softmax(q k^T * scaling, causal) v  -> heads x 128 -> W_O
RoPE pairs are either interleaved (x0, x1), (x2, x3), ... (DeepSeek's checkpoints, HF ``rope_interleave=True``),
with the rotated halves written out as [even | odd], or split-half (``rotate_half``).
"""
from __future__ import annotations

import math

import torch

__all__ = ["rms_norm", "rope_cos_sin", "apply_rope", "mla_prefill", "mla_prefill_heads", "default_inv_freq"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def default_inv_freq(rope_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)).float()


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
    """positions [...] -> cos, sin [..., rope_dim/2] fp32 (one angle per rotated pair)."""
    freqs = positions.float().unsqueeze(-1) * inv_freq.float().to(positions.device)
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """x [..., d] with cos/sin broadcastable to [..., d/2]; returns fp32."""
    xf = x.float()
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def mla_prefill_heads(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor,
                      nope_dim: int, v_dim: int, interleave: bool = True):
    """The per-head operands of prefill attention, laid out as scaled_dot_product_attention takes them.

    q [B, S, h, nope + rope] (the q up-projection, rope part not yet rotated), cos / sin [B, S, rope / 2] fp32,
    kv [B, L, h * (nope + v)] (c_kv W_UKV), k_rope [B, L, rope] (rotated, shared by the heads) ->
    q [B, h, S, nope + rope] with the rope part rotated, k [B, h, L, nope + rope] = [k_nope | k_rope],
    v [B, h, L, v], contiguous, in q's dtype (the rotation in fp32, rounded once)."""
    B, S, h, _ = q.shape
    L = kv.shape[1]
    dtype = q.dtype
    q_nope, q_rope = q[..., :nope_dim], q[..., nope_dim:]
    q_rope = apply_rope(q_rope, cos.unsqueeze(2), sin.unsqueeze(2), interleave).to(dtype)
    q_out = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2).contiguous()
    kv = kv.view(B, L, h, nope_dim + v_dim)
    k_rope = k_rope.to(dtype).unsqueeze(2).expand(B, L, h, k_rope.shape[-1])
    k_out = torch.cat([kv[..., :nope_dim].to(dtype), k_rope], dim=-1).transpose(1, 2).contiguous()
    v_out = kv[..., nope_dim:].to(dtype).transpose(1, 2).contiguous()
    return q_out, k_out, v_out


def mla_prefill(
    x: torch.Tensor,
    *,
    num_heads: int,
    kv_lora_rank: int,
    qk_nope_head_dim: int,
    qk_rope_head_dim: int,
    v_head_dim: int,
    w_kv_a: torch.Tensor,
    kv_a_norm: torch.Tensor,
    w_kv_b: torch.Tensor,
    w_o: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    w_q_a: torch.Tensor | None = None,
    q_a_norm: torch.Tensor | None = None,
    w_q_b: torch.Tensor | None = None,
    w_q: torch.Tensor | None = None,
    scaling: float | None = None,
    interleave: bool = True,
    eps: float = 1e-6,
    causal: bool = True,
) -> torch.Tensor:
    """x [B, S, H]; weights in nn.Linear layout [out, in]; cos/sin [S, rope/2] -> fp32 [B, S, H].

    Give either w_q_a + q_a_norm + w_q_b (q_lora_rank set, DeepSeek-V3) or w_q (DeepSeek-V2-Lite).
    """
    B, S, _ = x.shape
    xf = x.float()
    dqk = qk_nope_head_dim + qk_rope_head_dim
    if w_q is not None:
        q = xf @ w_q.float().t()
    else:
        q = rms_norm(xf @ w_q_a.float().t(), q_a_norm, eps) @ w_q_b.float().t()
    q = q.view(B, S, num_heads, dqk).transpose(1, 2)  # [B, h, S, dqk]
    q_nope, q_rope = q.split([qk_nope_head_dim, qk_rope_head_dim], dim=-1)

    ckv = xf @ w_kv_a.float().t()
    c_kv, k_rope = ckv.split([kv_lora_rank, qk_rope_head_dim], dim=-1)
    c_kv = rms_norm(c_kv, kv_a_norm, eps)
    kv = (c_kv @ w_kv_b.float().t()).view(B, S, num_heads, qk_nope_head_dim + v_head_dim).transpose(1, 2)
    k_nope, v = kv.split([qk_nope_head_dim, v_head_dim], dim=-1)

    q_rope = apply_rope(q_rope, cos, sin, interleave)
    k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin, interleave)  # one rope key shared by all heads
    qh = torch.cat([q_nope, q_rope], dim=-1)
    kh = torch.cat([k_nope, k_rope.expand(B, num_heads, S, qk_rope_head_dim)], dim=-1)

    scale = scaling if scaling is not None else 1.0 / math.sqrt(dqk)
    att = (qh @ kh.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf"))
    o = torch.softmax(att, dim=-1) @ v  # [B, h, S, v]
    o = o.transpose(1, 2).reshape(B, S, num_heads * v_head_dim)
    return o @ w_o.float().t()
