"""MultiHeadLatentAttention: DeepSeek-V3's attention with compressed (latent) keys and values.

On CUDA the module runs MLA's kernels (``moe_kernels.ops.mla``): the two down-projections as one GEMM with both
RMSNorms and the k RoPE fused after it, prefill attention through ``scaled_dot_product_attention``, and decode
steps (one new token with an ``MLACache``) as absorbed attention straight over the latent cache. On the CPU it
runs the fp32 reference path (set ``use_kernels=True`` to run the kernels through Triton's interpreter there).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int, check_tensor
from ..ops._common import use_triton
from ..ops.mla import _mla_decode_op, mla_latent_proj
from ..reference.mla import apply_rope, default_inv_freq, rms_norm, rope_cos_sin
from ..reference.mla_decode import split_kv_b


class MultiHeadLatentAttention(nn.Module):
    """MLA with DeepSeek-V3's dimensions by default.

    Projections (nn.Linear layout, no bias): ``q_a_proj`` H->q_lora_rank, ``q_a_layernorm``, ``q_b_proj``
    q_lora_rank->heads*(nope+rope) (or ``q_proj`` H->heads*(nope+rope) when q_lora_rank is None),
    ``kv_a_proj_with_mqa`` H->kv_lora_rank+rope, ``kv_a_layernorm``, ``kv_b_proj`` kv_lora_rank->heads*(nope+v),
    ``o_proj`` heads*v->H. The cache holds only the normalised latent and the rotated rope key
    ([B, S, kv_lora_rank + rope], 576 values per token), never per-head keys.

    ``forward(x [B, S, H], positions=None, cache=None) -> [B, S, H]``: causal attention of the S new tokens over
    the cached ones and themselves; ``cache`` is an ``MLACache`` that is appended to in place.

    ``use_kernels``: None (default) runs the kernels on CUDA tensors and the reference on the CPU; True also runs
    them on CPU tensors when TRITON_INTERPRET=1; False always runs the reference. The kernels have no backward:
    with gradients required the reference runs (and says so once).
    """

    def __init__(
        self,
        hidden_size: int = 7168,
        num_heads: int = 128,
        q_lora_rank: int | None = 1536,
        kv_lora_rank: int = 512,
        qk_nope_head_dim: int = 128,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        rope_theta: float = 10000.0,
        rope_interleave: bool = True,
        rms_norm_eps: float = 1e-6,
        softmax_scale: float | None = None,
        device=None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        for name, v in [("hidden_size", hidden_size), ("num_heads", num_heads), ("kv_lora_rank", kv_lora_rank),
                        ("qk_nope_head_dim", qk_nope_head_dim), ("v_head_dim", v_head_dim)]:
            check_int(name, v, lo=1)
        check_int("qk_rope_head_dim", qk_rope_head_dim, lo=2)
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {qk_rope_head_dim}")
        if q_lora_rank is not None:
            check_int("q_lora_rank", q_lora_rank, lo=1)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.rope_interleave, self.eps = rope_interleave, rms_norm_eps
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.qk_head_dim)
        kw = dict(bias=False, device=device, dtype=dtype)
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, num_heads * self.qk_head_dim, **kw)
        else:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, **kw)
            self.q_a_layernorm = nn.RMSNorm(q_lora_rank, eps=rms_norm_eps, device=device, dtype=dtype)
            self.q_b_proj = nn.Linear(q_lora_rank, num_heads * self.qk_head_dim, **kw)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, **kw)
        self.kv_a_layernorm = nn.RMSNorm(kv_lora_rank, eps=rms_norm_eps, device=device, dtype=dtype)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), **kw)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, **kw)
        self.register_buffer("inv_freq", default_inv_freq(qk_rope_head_dim, rope_theta).to(device), persistent=False)
        self.attention_scaling = 1.0  # yarn's cos/sin multiplier, set by from_hf
        self.use_kernels: bool | None = None
        self._down_weight: torch.Tensor | None = None  # [q_a_proj; kv_a_proj_with_mqa] weights, one buffer
        self._warned = False

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, q_lora_rank={self.q_lora_rank}, "
            f"kv_lora_rank={self.kv_lora_rank}, rope={self.qk_rope_head_dim}"
        )

    def _apply(self, fn, *args, **kwargs):
        self._down_weight = None  # the parameters move one by one: the fused view is rebuilt on the next call
        return super()._apply(fn, *args, **kwargs)

    # -- kernel path -------------------------------------------------------------------------------------------

    def _kernels(self, x: torch.Tensor) -> bool:
        """Whether this call runs the kernels (see ``use_kernels``)."""
        wanted = x.is_cuda if self.use_kernels is None else (self.use_kernels and use_triton(x))
        if wanted and torch.is_grad_enabled() and self.kv_a_proj_with_mqa.weight.requires_grad:
            if not self._warned:
                warnings.warn("MultiHeadLatentAttention: gradients are required, so the reference path runs "
                              "(the MLA kernels have no backward); use torch.no_grad() for inference")
                self._warned = True
            return False
        return wanted

    def _fused_down_weight(self) -> torch.Tensor:
        """[q_a_proj.weight; kv_a_proj_with_mqa.weight] as one tensor, without a copy of the weights: the two
        parameters are re-pointed at views of one buffer (again after .to(), load_state_dict of new tensors...)."""
        parts = [self.kv_a_proj_with_mqa.weight] if self.q_lora_rank is None else \
            [self.q_a_proj.weight, self.kv_a_proj_with_mqa.weight]
        fused = self._down_weight
        if fused is not None and fused.device == parts[0].device and fused.dtype == parts[0].dtype:
            offset, ok = 0, True
            for p in parts:
                ok = ok and p.data_ptr() == fused.data_ptr() + offset * fused.element_size() and p.is_contiguous()
                offset += p.numel()
            if ok and offset == fused.numel():
                return fused
        with torch.no_grad():
            fused = torch.cat([p.detach() for p in parts])
            row = 0
            for p in parts:
                p.data = fused[row : row + p.shape[0]]
                row += p.shape[0]
        self._down_weight = fused
        return fused

    def _latents_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The kernel path of ``latents``: (q_nope [B,S,h,nope], q_rope [B,S,h,rope] rotated fp32,
        kv [B,S,kv_lora+rope] in x's dtype: [RMSNorm(c_kv) | RoPE(k_rope)], one latent cache row per token)."""
        B, S, H = x.shape
        Q = self.q_lora_rank or 0
        half = self.qk_rope_head_dim // 2
        cos2 = cos.expand(B, S, half).reshape(B * S, half).float().contiguous()
        sin2 = sin.expand(B, S, half).reshape(B * S, half).float().contiguous()
        c_q, kv = mla_latent_proj(
            x.reshape(B * S, H), self._fused_down_weight(), self.q_a_layernorm.weight if Q else None,
            self.kv_a_layernorm.weight, cos2, sin2, Q, self.kv_lora_rank, eps=self.eps,
            interleave=self.rope_interleave,
        )
        q = self.q_b_proj(c_q) if Q else self.q_proj(x.reshape(B * S, H))
        q = q.view(B, S, self.num_heads, self.qk_head_dim)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos2.view(B, S, 1, half), sin2.view(B, S, 1, half), self.rope_interleave)
        return q_nope, q_rope, kv.view(B, S, -1)

    def _attend_sdpa(self, q_nope, q_rope, c_kv, k_rope, q_offset: int, dtype, mask=None) -> torch.Tensor:
        """``attend`` with the expanded keys/values through scaled_dot_product_attention (flash/efficient kernels)."""
        B, h, S, _ = q_nope.shape
        L = c_kv.shape[1]
        kv = F.linear(c_kv.to(dtype), self.kv_b_proj.weight)
        kv = kv.view(B, L, h, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope.to(dtype), q_rope.to(dtype)], dim=-1)
        k = torch.cat([k_nope, k_rope.to(dtype).unsqueeze(1).expand(B, h, L, self.qk_rope_head_dim)], dim=-1)
        causal = False
        if mask is None:
            if S == L and q_offset == 0:
                causal = True
            else:
                qpos = torch.arange(S, device=q.device).unsqueeze(1) + q_offset
                mask = torch.arange(L, device=q.device).unsqueeze(0) <= qpos
        else:
            mask = mask[..., :L] if mask.dtype == torch.bool else mask[..., :L].to(dtype)
        o = F.scaled_dot_product_attention(q, k, v.contiguous(), attn_mask=mask, is_causal=causal,
                                           scale=self.softmax_scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, h * self.v_head_dim))

    def _decode_absorbed(self, q_nope, q_rope, cache: "MLACache") -> torch.Tensor:
        """One new token per row (q_nope [B,1,h,nope], q_rope [B,1,h,rope]) over the latent cache -> [B, 1, H]."""
        B = q_nope.shape[0]
        dtype = cache.kv.dtype
        w_uk, w_uv = split_kv_b(self.kv_b_proj.weight, self.num_heads, self.qk_nope_head_dim, self.v_head_dim)
        # W_UK absorbed into the query: q_latent[b, h] = q_nope[b, h] @ W_UK[h]      [h, B, C] -> [B, h, C]
        q_latent = torch.bmm(q_nope[:, 0].transpose(0, 1).to(dtype), w_uk).transpose(0, 1)
        seqlens = torch.full((B,), cache.length, dtype=torch.int32, device=q_nope.device)
        # the op itself, without mla_decode's argument checks (one host sync each): valid by construction here
        o_latent = _mla_decode_op(q_latent, q_rope[:, 0].to(dtype).contiguous(), cache.kv, seqlens, None,
                                  float(self.softmax_scale), 0)
        # W_UV applied once to the attended latent: o[b, h] = o_latent[b, h] @ W_UV[h]^T
        o = torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
        return self.o_proj(o.reshape(B, 1, self.num_heads * self.v_head_dim))

    # -- the equations (reference path), and the entry points the HF adapter calls ------------------------------

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, S, H] -> (q_nope [B,h,S,nope], q_rope [B,h,S,rope], c_kv [B,S,kv_lora], k_rope [B,S,rope]), fp32."""
        B, S, _ = x.shape
        if self._kernels(x):
            q_nope, q_rope, kv = self._latents_fused(x, cos, sin)
            c_kv, k_rope = kv.float().split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
            return q_nope.float().transpose(1, 2), q_rope.transpose(1, 2), c_kv, k_rope
        if self.q_lora_rank is None:
            q = self.q_proj(x).float()
        else:
            c_q = rms_norm(self.q_a_proj(x), self.q_a_layernorm.weight, self.eps)
            q = self.q_b_proj(c_q.to(x.dtype)).float()
        q = q.view(B, S, self.num_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).float().split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = rms_norm(c_kv, self.kv_a_layernorm.weight, self.eps)
        q_rope = apply_rope(q_rope, cos.unsqueeze(1), sin.unsqueeze(1), self.rope_interleave)
        k_rope = apply_rope(k_rope, cos, sin, self.rope_interleave)
        return q_nope, q_rope, c_kv, k_rope

    def attend(self, q_nope, q_rope, c_kv, k_rope, q_offset: int, dtype, mask=None) -> torch.Tensor:
        """Causal attention of queries at positions q_offset.. over latent keys 0..L-1; returns [B, S, H].

        ``mask`` (HF's 4-D [B, 1, S, L] attention mask: bool keep-mask or additive float) replaces the causal rule.
        """
        if self._kernels(q_nope):
            return self._attend_sdpa(q_nope, q_rope, c_kv, k_rope, q_offset, dtype, mask)
        B, h, S, _ = q_nope.shape
        L = c_kv.shape[1]
        kv = (c_kv.to(dtype) @ self.kv_b_proj.weight.t()).float()
        kv = kv.view(B, L, h, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        scores = (q_nope @ k_nope.transpose(-1, -2) + q_rope @ k_rope.unsqueeze(1).transpose(-1, -2)).mul(
            self.softmax_scale
        )
        qpos = torch.arange(S, device=q_nope.device).unsqueeze(1) + q_offset
        kpos = torch.arange(L, device=q_nope.device).unsqueeze(0)
        if mask is None:
            scores = scores.masked_fill(kpos > qpos, float("-inf"))
        elif mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask[..., :L], float("-inf"))
        else:
            scores = scores + mask[..., :L].float()
        o = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, S, h * self.v_head_dim)
        return self.o_proj(o.to(dtype))

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: "MLACache | None" = None):
        weight = self.kv_a_proj_with_mqa.weight
        check_tensor("x", x, ndim=3, shape=(None, None, self.hidden_size))
        if x.dtype != weight.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the weights are {weight.dtype}")
        if x.device != weight.device:
            raise TypeError(f"x is on {x.device} but the layer's weights are on {weight.device}")
        B, S, _ = x.shape
        if cache is not None:
            if not isinstance(cache, MLACache):
                raise TypeError(f"cache must be an MLACache, got {type(cache).__name__}")
            if cache.kv is not None and cache.kv.shape[0] != B:
                raise ValueError(f"cache holds {cache.kv.shape[0]} sequences but x has batch size {B}")
        if positions is not None:
            check_tensor("positions", positions, device=x.device)
            if positions.dim() == 1 and positions.shape[0] == S:
                positions = positions.unsqueeze(0)  # [S]: the same positions for every row
            # [S] broadcast against the [B, h, S, rope] queries would pair positions with heads instead
            if positions.dim() != 2 or positions.shape[1] != S or positions.shape[0] not in (1, B):
                raise ValueError(f"positions must have shape [{B}, {S}], [1, {S}] or [{S}] to match x, "
                                 f"got {list(positions.shape)}")
        offset = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(offset, offset + S, device=x.device).unsqueeze(0).expand(B, S)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.attention_scaling)
        if self._kernels(x):
            q_nope, q_rope, kv = self._latents_fused(x, cos, sin)
            if cache is not None:
                kv = cache.append_latent(kv, self.kv_lora_rank)
                if S == 1 and cache.kv.dtype == self.kv_b_proj.weight.dtype:
                    return self._decode_absorbed(q_nope, q_rope, cache)
            c_kv, k_rope = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
            return self._attend_sdpa(q_nope.transpose(1, 2), q_rope.transpose(1, 2), c_kv, k_rope, offset, x.dtype)
        q_nope, q_rope, c_kv, k_rope = self.latents(x, cos, sin)
        if cache is not None:
            c_kv, k_rope = cache.append(c_kv, k_rope)
        return self.attend(q_nope, q_rope, c_kv, k_rope, offset, x.dtype)

    @classmethod
    def from_hf(cls, module: nn.Module) -> "MultiHeadLatentAttention":
        """Build from a HuggingFace ``DeepseekV3Attention`` (weights copied, yarn scaling kept)."""
        from ..integrations.hf import mla_from_hf  # noqa: PLC0415

        return mla_from_hf(module)


class MLACache:
    """The latent KV cache of one layer: one row [c_kv | k_rope] (kv_lora_rank + rope values) per token.

    ``kv`` is a buffer [B, capacity, kv_lora_rank + rope] that grows by doubling, so that appending a decode step
    copies one row; ``c_kv`` [B, L, kv_lora_rank] and ``k_rope`` [B, L, rope] are views of its first ``length``
    rows. It keeps the dtype of the first rows appended (fp32 on the reference path, the model's on CUDA).
    """

    def __init__(self):
        self.kv: torch.Tensor | None = None
        self.kv_lora_rank: int | None = None
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    @property
    def c_kv(self) -> torch.Tensor | None:
        return None if self.kv is None else self.kv[:, : self._length, : self.kv_lora_rank]

    @property
    def k_rope(self) -> torch.Tensor | None:
        return None if self.kv is None else self.kv[:, : self._length, self.kv_lora_rank :]

    def append(self, c_kv: torch.Tensor, k_rope: torch.Tensor):
        """Append c_kv [B, S, kv_lora_rank] and k_rope [B, S, rope]; returns all (c_kv, k_rope) so far."""
        kv = self.append_latent(torch.cat([c_kv, k_rope.to(c_kv.dtype)], dim=-1), c_kv.shape[-1])
        return kv[..., : self.kv_lora_rank], kv[..., self.kv_lora_rank :]

    def append_latent(self, kv: torch.Tensor, kv_lora_rank: int) -> torch.Tensor:
        """Append rows kv [B, S, kv_lora_rank + rope]; returns all rows so far, [B, L, kv_lora_rank + rope]."""
        B, S, D = kv.shape
        L = self._length + S
        if self.kv is None:
            self.kv_lora_rank = kv_lora_rank
            self.kv = kv.new_empty(B, max(L, 16), D)
        elif tuple(self.kv.shape[::2]) != (B, D) or kv_lora_rank != self.kv_lora_rank:
            raise ValueError(f"kv must have shape [{self.kv.shape[0]}, S, {self.kv.shape[2]}] to extend the cache, "
                             f"got {list(kv.shape)}")
        elif L > self.kv.shape[1]:
            grown = self.kv.new_empty(B, max(L, 2 * self.kv.shape[1]), D)
            grown[:, : self._length] = self.kv[:, : self._length]
            self.kv = grown
        self.kv[:, self._length : L] = kv
        self._length = L
        return self.kv[:, :L]
