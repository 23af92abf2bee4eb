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

from .._checks import check_choice, check_int, check_tensor
from ..ops._common import use_triton
from ..ops.mla import _mla_decode_op, fp8_row_bytes, mla_latent_proj, pack_latent_fp8
from ..ops.mla_prefill import mla_prefill_heads
from ..reference.mla import apply_rope, default_inv_freq, rms_norm, rope_cos_sin
from ..reference.mla_decode import mla_decode_absorbed, split_kv_b, unpack_latent_fp8
from ..reference.mla_decode import pack_latent_fp8 as ref_pack_latent_fp8
from .converters import get_converter
from .linear import FP8Linear


# tokens a step may have for ``attention(decode=True)`` to run the absorbed latent decode (a decode step, or a
# speculative / MTP verification of a few); longer chunks are prefill, cheaper through the expanded heads
DECODE_MAX_TOKENS = 4


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

    ``weight_dtype``: "auto" keeps every projection in the module's dtype; "fp8" stores ``q_a_proj``,
    ``kv_a_proj_with_mqa``, ``q_b_proj`` (or ``q_proj``) and ``o_proj`` as ``FP8Linear`` (e4m3 with 128x128 block
    scales, DeepSeek-V3's checkpoint format; activations quantised 1x128 per call), which halves their weight
    bytes and runs them on the FP8 tensor cores. ``kv_b_proj`` stays in the module's dtype (the decode absorbs it
    into the query and the output per step, and it is 5% of the projections' FLOPs). Inference only; the input
    widths (hidden_size, q_lora_rank, num_heads * v_head_dim) must be multiples of 128. Error: docs/numerics.md.
    ``quantize_weights_()`` turns a float module into this.

    ``kv_cache_dtype``: "auto" stores the cache in the model's dtype; "fp8" as e4m3 with one fp32 scale per token
    (rope in bf16; 656 bytes a token instead of 1152 at DeepSeek-V3's sizes), written at prefill and decode; every
    attention then reads the rows as stored (dequantised). Error against a bf16 cache: docs/numerics.md (MLA).
    A decode step over a static ``MLACache(batch_size, capacity)`` runs on the device only (CUDA-graph capturable).
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
        kv_cache_dtype: str = "auto",
        weight_dtype: str = "auto",
    ):
        super().__init__()
        check_choice("kv_cache_dtype", kv_cache_dtype, ("auto", "fp8"))
        check_choice("weight_dtype", weight_dtype, ("auto", "fp8"))
        self.kv_cache_dtype = kv_cache_dtype
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
        self._down_scale: torch.Tensor | None = None  # and their block scales (FP8 weights)
        self._warned = False
        if weight_dtype == "fp8":
            self.quantize_weights_()

    @property
    def weight_dtype(self) -> str:
        """"fp8" when the projections are ``FP8Linear`` (see the class docstring), else "auto"."""
        return "fp8" if isinstance(self.o_proj, FP8Linear) else "auto"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the activations (and of ``kv_b_proj``, which stays unquantised)."""
        return self.kv_b_proj.weight.dtype

    def _fp8_projections(self) -> list[str]:
        return ["kv_a_proj_with_mqa", "o_proj"] + (["q_proj"] if self.q_lora_rank is None else ["q_a_proj", "q_b_proj"])

    def _check_fp8_widths(self) -> None:
        widths = {"hidden_size": self.hidden_size, "num_heads * v_head_dim": self.num_heads * self.v_head_dim}
        if self.q_lora_rank is not None:
            widths["q_lora_rank"] = self.q_lora_rank
        for name, v in widths.items():
            if v % 128:
                raise ValueError(f"FP8 projection weights need {name} to be a multiple of 128 (1x128 activation "
                                 f"groups, 128x128 weight blocks), got {v}")

    @torch.no_grad()
    def quantize_weights_(self) -> "MultiHeadLatentAttention":
        """Turn the float projections (all but ``kv_b_proj``) into ``FP8Linear`` (block-scaled e4m3, round to
        nearest), in place; returns self. Projections that are FP8 already stay as they are."""
        self._check_fp8_widths()
        for name in self._fp8_projections():
            lin = getattr(self, name)
            if not isinstance(lin, FP8Linear):
                setattr(self, name, FP8Linear.from_linear(lin))
        self._down_weight = self._down_scale = None
        return self

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, q_lora_rank={self.q_lora_rank}, "
            f"kv_lora_rank={self.kv_lora_rank}, rope={self.qk_rope_head_dim}"
            + (", kv_cache_dtype=fp8" if self.kv_cache_dtype == "fp8" else "")
            + (", weight_dtype=fp8" if self.weight_dtype == "fp8" else "")
        )

    def _apply(self, fn, *args, **kwargs):
        self._down_weight = self._down_scale = None  # the tensors move one by one: the fused views are rebuilt
        return super()._apply(fn, *args, **kwargs)

    # -- kernel path -------------------------------------------------------------------------------------------

    def _kernels(self, x: torch.Tensor) -> bool:
        """Whether this call runs the kernels (see ``use_kernels``)."""
        wanted = x.is_cuda if self.use_kernels is None else (self.use_kernels and use_triton(x))
        if wanted and torch.is_grad_enabled() and self.kv_b_proj.weight.requires_grad:
            if not self._warned:
                warnings.warn("MultiHeadLatentAttention: gradients are required, so the reference path runs "
                              "(the MLA kernels have no backward); use torch.no_grad() for inference")
                self._warned = True
            return False
        return wanted

    def _fused_rows(self, attr: str, fused: torch.Tensor | None) -> torch.Tensor:
        """[q_a_proj.<attr>; kv_a_proj_with_mqa.<attr>] as one tensor, without a copy: the two modules' tensors
        are re-pointed at views of one buffer (again after .to(), load_state_dict of new tensors...). ``fused``:
        the buffer of the last call, returned when the views still are its."""
        mods = [self.kv_a_proj_with_mqa] if self.q_lora_rank is None else [self.q_a_proj, self.kv_a_proj_with_mqa]
        parts = [getattr(m, attr) for m in mods]
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
            for m, p in zip(mods, parts):
                view = fused[row : row + p.shape[0]]
                if isinstance(p, nn.Parameter):
                    p.data = view
                else:  # a buffer (FP8Linear's)
                    setattr(m, attr, view)
                row += p.shape[0]
        return fused

    def _fused_down_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the down projections' weights [q_a_proj; kv_a_proj_with_mqa] as one tensor, and with FP8 weights their
        block scales likewise: q_lora_rank is a multiple of 128, so the blocks stack as the rows do)."""
        self._down_weight = self._fused_rows("weight", self._down_weight)
        if isinstance(self.kv_a_proj_with_mqa, FP8Linear):
            self._down_scale = self._fused_rows("weight_scale_inv", self._down_scale)
            return self._down_weight, self._down_scale
        return self._down_weight, None

    def _project_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The projections of the kernel path: (q [B,S,h,nope+rope] in x's dtype, the rope part not yet rotated;
        kv [B,S,kv_lora+rope] in x's dtype: [RMSNorm(c_kv) | RoPE(k_rope)], one latent cache row per token;
        cos, sin [B,S,rope/2] fp32, contiguous)."""
        B, S, H = x.shape
        Q = self.q_lora_rank or 0
        half = self.qk_rope_head_dim // 2
        cos2 = cos.expand(B, S, half).float().contiguous()
        sin2 = sin.expand(B, S, half).float().contiguous()
        w_down, s_down = self._fused_down_weight()
        c_q, kv = mla_latent_proj(
            x.reshape(B * S, H), w_down, self.q_a_layernorm.weight if Q else None,
            self.kv_a_layernorm.weight, cos2.view(B * S, half), sin2.view(B * S, half), Q, self.kv_lora_rank,
            w_scale=s_down, eps=self.eps, interleave=self.rope_interleave,
        )
        q = self.q_b_proj(c_q) if Q else self.q_proj(x.reshape(B * S, H))
        return q.view(B, S, self.num_heads, self.qk_head_dim), kv.view(B, S, -1), cos2, sin2

    def _split_rotate(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [B,S,h,nope+rope] -> (q_nope [B,S,h,nope], q_rope [B,S,h,rope] rotated, fp32)."""
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos.unsqueeze(2), sin.unsqueeze(2), self.rope_interleave)

    def _latents_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The kernel path of ``latents``: (q_nope [B,S,h,nope], q_rope [B,S,h,rope] rotated fp32,
        kv [B,S,kv_lora+rope] in x's dtype: [RMSNorm(c_kv) | RoPE(k_rope)], one latent cache row per token)."""
        q, kv, cos2, sin2 = self._project_fused(x, cos, sin)
        return (*self._split_rotate(q, cos2, sin2), kv)

    def _sdpa(self, q, k, v, q_offset: int, mask=None) -> torch.Tensor:
        """scaled_dot_product_attention of q [B,h,S,d], k [B,h,L,d], v [B,h,L,dv] (queries at positions q_offset..,
        causal unless ``mask``: HF's 4-D bool keep-mask or additive float) -> o_proj of the heads, [B, S, H]."""
        B, h, S, _ = q.shape
        L = k.shape[2]
        causal = False
        if mask is None:
            if S == L and q_offset == 0:
                causal = True
            else:
                qpos = torch.arange(S, device=q.device).unsqueeze(1) + q_offset
                mask = torch.arange(L, device=q.device).unsqueeze(0) <= qpos
        else:
            mask = mask[..., :L] if mask.dtype == torch.bool else mask[..., :L].to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, h * self.v_head_dim))

    def _attend_prefill(self, q, cos, sin, c_kv, k_rope, q_offset: int, dtype, mask=None) -> torch.Tensor:
        """The kernel path's prefill attention from ``_project_fused``'s q (rope part unrotated) and cos / sin, and
        the latent keys c_kv [B,L,kv_lora], k_rope [B,L,rope] (rotated): the heads' q / k / v built by one kernel
        each (``ops.mla_prefill``), then SDPA. Same values as ``_attend_sdpa`` on ``_split_rotate``'s output."""
        kv = F.linear(c_kv.to(dtype), self.kv_b_proj.weight)
        if k_rope.stride(-1) != 1:
            k_rope = k_rope.contiguous()
        qh, kh, vh = mla_prefill_heads(q, cos, sin, kv, k_rope, self.qk_nope_head_dim, self.v_head_dim,
                                       interleave=self.rope_interleave)
        return self._sdpa(qh, kh, vh, q_offset, mask)

    def _attend_sdpa(self, q_nope, q_rope, c_kv, k_rope, q_offset: int, dtype, mask=None) -> torch.Tensor:
        """``attend`` with the expanded keys/values through scaled_dot_product_attention (flash/efficient kernels)."""
        B, h, S, _ = q_nope.shape
        L = c_kv.shape[1]
        kv = F.linear(c_kv.to(dtype), self.kv_b_proj.weight)
        kv = kv.view(B, L, h, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope.to(dtype), q_rope.to(dtype)], dim=-1)
        k = torch.cat([k_nope, k_rope.to(dtype).unsqueeze(1).expand(B, h, L, self.qk_rope_head_dim)], dim=-1)
        return self._sdpa(q, k, v.contiguous(), q_offset, mask)

    def _decode_absorbed(self, q_nope, q_rope, cache: "MLACache") -> torch.Tensor:
        """One new token per row (q_nope [B,1,h,nope], q_rope [B,1,h,rope]) over the latent cache -> [B, 1, H].
        A static cache passes its device-side lengths and block table: no host sync."""
        B = q_nope.shape[0]
        if cache.static:
            seqlens = cache.seqlens
        else:
            seqlens = torch.full((B,), cache.length, dtype=torch.int32, device=q_nope.device)
        return self._decode_over(q_nope, q_rope, cache.kv, seqlens, cache.block_table)

    def _decode_over(self, q_nope, q_rope, kv, seqlens, block_table=None) -> torch.Tensor:
        """``_decode_absorbed`` over cache rows kv (stored as the latent cache: [B, S_max, kv_lora + rope] in the
        weights' dtype, or the FP8 cache's uint8 rows; paged with block_table) of lengths seqlens (int32 [B]).
        q_nope [B, S, h, nope] / q_rope [B, S, h, rope]: the rows' last S keys' queries, causal among themselves
        (S > 1: speculative / MTP steps) -> [B, S, H]."""
        B, S = q_nope.shape[:2]
        h = self.num_heads
        dtype = self.kv_b_proj.weight.dtype
        w_uk, w_uv = split_kv_b(self.kv_b_proj.weight, h, self.qk_nope_head_dim, self.v_head_dim)
        # W_UK absorbed into the query: q_latent[b, s, h] = q_nope[b, s, h] @ W_UK[h]   [h, B S, C] -> [B, S, h, C]
        q_latent = torch.bmm(q_nope.reshape(B * S, h, -1).transpose(0, 1).to(dtype), w_uk)
        q_latent = q_latent.transpose(0, 1).reshape(B, S, h, -1)
        qr = q_rope.to(dtype).contiguous()
        if S == 1:
            q_latent, qr = q_latent[:, 0], qr[:, 0]
        # the op itself, without mla_decode's argument checks (one host sync each): valid by construction here
        o_latent = _mla_decode_op(q_latent, qr, kv, seqlens, block_table, float(self.softmax_scale), 0)
        # W_UV applied once to the attended latent: o[b, s, h] = o_latent[b, s, h] @ W_UV[h]^T
        o = torch.bmm(o_latent.reshape(B * S, h, -1).transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
        return self.o_proj(o.reshape(B, S, h * self.v_head_dim))

    def _decode_static_reference(self, x, cos, sin, cache: "MLACache") -> torch.Tensor:
        """The reference path of a static cache's decode step (rows of different lengths): fp32 latents, the row
        written as stored, absorbed attention over each row's own length (reference.mla_decode)."""
        q_nope, q_rope, c_kv, k_rope = self.latents(x, cos, sin)
        cache.write_step(torch.cat([c_kv, k_rope], -1))
        kv = cache._rows(cache.kv.shape[1] * (1 if cache.block_table is None else cache.block_table.shape[1]))
        if cache.fp8:
            kv = unpack_latent_fp8(kv, self.kv_lora_rank, self.qk_rope_head_dim)
        o = mla_decode_absorbed(q_nope[:, :, 0], q_rope[:, :, 0], kv.float(), cache.seqlens, self.kv_b_proj.weight,
                                self.qk_nope_head_dim, self.v_head_dim, self.softmax_scale)
        return self.o_proj(o.reshape(x.shape[0], 1, -1).to(x.dtype))

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

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None, update=None,
                  decode: bool = False) -> torch.Tensor:
        """x [B,S,H] with the tokens' cos / sin [B,S,rope/2] (fp32) -> [B,S,H]: the latents, then attention of the
        S queries over the row's latent keys, the last S of which are this step's. ``mask``: HF's 4-D [B, 1, S, L]
        mask (bool keep-mask or additive float), else causal.

        For an external cache (the HF adapter's): ``update(rows) -> all rows``. ``rows`` [B, S, row] are this
        step's latent cache rows as ``MLACache`` stores them (``encode_rows``): [c_kv | rotated k_rope] in x's
        dtype, or with ``kv_cache_dtype="fp8"`` the FP8 cache's packed uint8 rows; it returns the rows of all L keys
        [B, L, row], in the same format. ``decode``: the caller vouches that those are exactly the row's L keys and
        that the mask is the plain causal one (query s sees keys 0 .. L - S + s, no padding hidden); with S <=
        ``DECODE_MAX_TOKENS`` (one token, or a speculative / MTP step's few) the kernel path then runs the absorbed
        latent decode (``ops.mla_decode``) over them instead of expanding every key through kv_b_proj."""
        B, S, _ = x.shape
        if self._kernels(x):  # x's dtype throughout: no fp32 copy of the latents or the queries
            q, kv, cos2, sin2 = self._project_fused(x, cos, sin)
            if update is None:
                c_kv, k_rope = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
                return self._attend_prefill(q, cos2, sin2, c_kv, k_rope, 0, x.dtype, mask)
            rows = update(self.encode_rows(kv))
            if decode and S <= DECODE_MAX_TOKENS:
                L = rows.shape[1]
                seqlens = torch.full((B,), L, dtype=torch.int32, device=x.device)
                return self._decode_over(*self._split_rotate(q, cos2, sin2), rows.contiguous(), seqlens)
            c_kv, k_rope = self.decode_rows(rows, x.dtype)
            return self._attend_prefill(q, cos2, sin2, c_kv, k_rope, c_kv.shape[1] - S, x.dtype, mask)
        q_nope, q_rope, c_kv, k_rope = self.latents(x, cos, sin)
        if update is not None:
            rows = update(self.encode_rows(torch.cat([c_kv, k_rope], -1).to(x.dtype)))
            c_kv, k_rope = (t.float() for t in self.decode_rows(rows, x.dtype))
        return self.attend(q_nope, q_rope, c_kv, k_rope, c_kv.shape[1] - S, x.dtype, mask)

    def encode_rows(self, kv: torch.Tensor) -> torch.Tensor:
        """Latent rows [B, S, kv_lora + rope] (x's dtype) -> as the cache stores them: unchanged, or with
        ``kv_cache_dtype="fp8"`` packed to the FP8 cache's uint8 rows [B, S, fp8_row_bytes]."""
        if self.kv_cache_dtype != "fp8":
            return kv
        B, S, D = kv.shape
        flat = kv.reshape(B * S, D)
        packed = pack_latent_fp8(flat, self.kv_lora_rank) if use_triton(flat) else ref_pack_latent_fp8(
            flat, self.kv_lora_rank)
        return packed.view(B, S, -1)

    def decode_rows(self, rows: torch.Tensor, dtype: torch.dtype):
        """Stored rows [B, L, row] (``encode_rows``' format) -> (c_kv [B, L, kv_lora], k_rope [B, L, rope]) in
        ``dtype`` (FP8 rows dequantised)."""
        if rows.dtype == torch.uint8:
            rows = unpack_latent_fp8(rows, self.kv_lora_rank, self.qk_rope_head_dim).to(dtype)
        return rows.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: "MLACache | None" = None):
        weight = self.kv_b_proj.weight
        check_tensor("x", x, ndim=3, shape=(None, None, self.hidden_size))
        if x.dtype != weight.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the weights are {weight.dtype}")
        if x.device != weight.device:
            raise TypeError(f"x is on {x.device} but the layer's weights are on {weight.device}")
        B, S, _ = x.shape
        if cache is not None:
            if not isinstance(cache, MLACache):
                raise TypeError(f"cache must be an MLACache, got {type(cache).__name__}")
            if cache.kv is not None and cache.batch != B:
                raise ValueError(f"cache holds {cache.batch} sequences but x has batch size {B}")
        if positions is not None:
            check_tensor("positions", positions, device=x.device)
            if positions.dim() == 1 and positions.shape[0] == S:
                positions = positions.unsqueeze(0)  # [S]: the same positions for every row
            # [S] broadcast against the [B, h, S, rope] queries would pair positions with heads instead
            if positions.dim() != 2 or positions.shape[1] != S or positions.shape[0] not in (1, B):
                raise ValueError(f"positions must have shape [{B}, {S}], [1, {S}] or [{S}] to match x, "
                                 f"got {list(positions.shape)}")
        fp8 = self.kv_cache_dtype == "fp8"
        static_step = cache is not None and cache.static and cache.kv is not None and S == 1
        if static_step:  # positions and lengths on the device: nothing here waits for the GPU
            offset = None
            if positions is None:
                positions = cache.seqlens[:, None]
        else:
            offset = cache.length if cache is not None else 0
            if positions is None:
                positions = torch.arange(offset, offset + S, device=x.device).unsqueeze(0).expand(B, S)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.attention_scaling)
        if self._kernels(x):
            q, kv, cos2, sin2 = self._project_fused(x, cos, sin)
            if static_step:
                cache.write_step(kv)
                return self._decode_absorbed(*self._split_rotate(q, cos2, sin2), cache)
            if cache is not None:
                kv = cache.append_latent(kv, self.kv_lora_rank, fp8)
                if S == 1 and (cache.fp8 or cache.kv.dtype == self.kv_b_proj.weight.dtype):
                    return self._decode_absorbed(*self._split_rotate(q, cos2, sin2), cache)
            c_kv, k_rope = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
            return self._attend_prefill(q, cos2, sin2, c_kv, k_rope, offset, x.dtype)
        if static_step:
            return self._decode_static_reference(x, cos, sin, cache)
        q_nope, q_rope, c_kv, k_rope = self.latents(x, cos, sin)
        if cache is not None:
            c_kv, k_rope = cache.append(c_kv, k_rope, fp8)
        return self.attend(q_nope, q_rope, c_kv, k_rope, offset, x.dtype)

    @classmethod
    def from_hf(cls, module: nn.Module, weight_dtype: str | None = None,
                kv_cache_dtype: str = "auto") -> "MultiHeadLatentAttention":
        """Build from a HuggingFace ``DeepseekV3Attention`` / ``DeepseekV2Attention`` (weights copied, yarn scaling
        kept; FP8 checkpoint projections taken as they are unless ``weight_dtype="auto"``, float ones quantised
        with ``weight_dtype="fp8"``). The converter comes from ``modules.converters`` (filled by the integration;
        no import of it here)."""
        return get_converter(cls, "hf")(module, weight_dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype)


class MLACache:
    """The latent KV cache of one layer: one row [c_kv | k_rope] (kv_lora_rank + rope values) per token.

    ``MLACache()``: a growable cache. ``kv`` is a buffer [B, capacity, row] that grows by doubling, so that
    appending a decode step copies one row; every row holds the same number of tokens, ``length``.

    ``MLACache(batch_size, capacity, page_size=None)``: a static cache for CUDA graphs. ``kv`` is allocated once
    (at the first append) for ``capacity`` tokens per row, contiguous [B, capacity, row] or paged
    [B * ceil(capacity / page_size), page_size, row] with ``block_table`` int32 [B, blocks] (row b's blocks; any
    permutation of the blocks may be written into it). ``seqlens`` int32 [B] on the device holds each row's
    length: a decode step (one new token per row) writes its row at position seqlens[b], adds 1 and attends, all
    on the device, so a decode step of the module can be captured once and replayed while the lengths change
    (set ``seqlens`` to any lengths < capacity between replays). A prefill (several tokens) needs equal lengths.

    The row is stored in the module's dtype, or with ``MultiHeadLatentAttention(kv_cache_dtype="fp8")`` as the FP8
    cache (uint8 rows of ``fp8_row_bytes(kv_lora_rank, rope)`` bytes: e4m3 latent + one fp32 scale per token,
    bf16 rope; see moe_kernels/reference/mla_decode.py). ``c_kv`` [B, L, kv_lora_rank] and ``k_rope`` [B, L, rope]
    give the first ``length`` rows (views; fp32 copies of the dequantised rows for the FP8 cache).
    """

    def __init__(self, batch_size: int | None = None, capacity: int | None = None, *, page_size: int | None = None):
        self.static = batch_size is not None or capacity is not None
        if self.static:
            check_int("batch_size", batch_size, lo=1)
            check_int("capacity", capacity, lo=1)
            if page_size is not None:
                check_int("page_size", page_size, lo=1)
        elif page_size is not None:
            raise ValueError("page_size needs batch_size and capacity (a static cache)")
        self.batch_size, self.capacity, self.page_size = batch_size, capacity, page_size
        self.kv: torch.Tensor | None = None
        self.kv_lora_rank: int | None = None
        self.rope_dim: int | None = None
        self.fp8 = False
        self.seqlens: torch.Tensor | None = None  # static cache: int32 [B] on the device
        self.block_table: torch.Tensor | None = None  # static paged cache: int32 [B, blocks]
        self._length = 0

    @property
    def batch(self) -> int | None:
        """Sequences (batch rows) this cache holds; None before the first append of a growable cache."""
        return self.batch_size if self.static else (None if self.kv is None else self.kv.shape[0])

    @property
    def length(self) -> int:
        """Tokens per row (a growable cache; a static one: the length of its rows, read from the device)."""
        if self.static and self.seqlens is not None:
            lo, hi = int(self.seqlens.min()), int(self.seqlens.max())
            if lo != hi:
                raise ValueError(f"the rows of this cache have different lengths ({lo} to {hi})")
            return hi
        return self._length

    def _rows(self, L: int) -> torch.Tensor:
        """The first L rows of every batch row as stored: [B, L, row] (gathered through the block table)."""
        if self.block_table is None:
            return self.kv[:, :L]
        page = self.kv.shape[1]
        n = torch.arange(L, device=self.kv.device)
        return self.kv[self.block_table[:, n // page].long(), n % page]

    def rows(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The first ``length`` rows [B, L, kv_lora_rank + rope], dequantised (FP8 cache) to ``dtype`` (default:
        fp32 for the FP8 cache, else the stored dtype)."""
        kv = self._rows(self.length)
        if self.fp8:
            kv = unpack_latent_fp8(kv, self.kv_lora_rank, self.rope_dim)
        return kv if dtype is None else kv.to(dtype)

    @property
    def c_kv(self) -> torch.Tensor | None:
        return None if self.kv is None else self.rows()[..., : self.kv_lora_rank]

    @property
    def k_rope(self) -> torch.Tensor | None:
        return None if self.kv is None else self.rows()[..., self.kv_lora_rank :]

    def append(self, c_kv: torch.Tensor, k_rope: torch.Tensor, fp8: bool = False):
        """Append c_kv [B, S, kv_lora_rank] and k_rope [B, S, rope]; returns all (c_kv, k_rope) so far (as read
        back from the cache: dequantised for the FP8 cache)."""
        kv = self.append_latent(torch.cat([c_kv, k_rope.to(c_kv.dtype)], dim=-1), c_kv.shape[-1], fp8)
        return kv[..., : self.kv_lora_rank], kv[..., self.kv_lora_rank :]

    def _allocate(self, kv: torch.Tensor, kv_lora_rank: int, fp8: bool, length: int):
        B, _, D = kv.shape
        self.kv_lora_rank, self.rope_dim, self.fp8 = kv_lora_rank, D - kv_lora_rank, fp8
        width = fp8_row_bytes(kv_lora_rank, D - kv_lora_rank) if fp8 else D
        dtype = torch.uint8 if fp8 else kv.dtype
        if not self.static:
            self.kv = torch.zeros(B, max(length, 16), width, dtype=dtype, device=kv.device)
            return
        if B != self.batch_size:
            raise ValueError(f"this cache was made for batch size {self.batch_size}, got kv for {B} rows")
        self.seqlens = torch.zeros(B, dtype=torch.int32, device=kv.device)
        if self.page_size is None:
            self.kv = torch.zeros(B, self.capacity, width, dtype=dtype, device=kv.device)
        else:
            nblk = -(-self.capacity // self.page_size)
            self.kv = torch.zeros(B * nblk, self.page_size, width, dtype=dtype, device=kv.device)
            self.block_table = torch.arange(B * nblk, dtype=torch.int32, device=kv.device).view(B, nblk)

    def _encode(self, kv: torch.Tensor) -> torch.Tensor:
        """Rows [T, D] as stored: packed to FP8 (the kernel on CUDA) or cast to the cache's dtype."""
        if self.fp8:
            return pack_latent_fp8(kv, self.kv_lora_rank) if use_triton(kv) else ref_pack_latent_fp8(
                kv, self.kv_lora_rank)
        return kv.to(self.kv.dtype)

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Flat row index (into kv viewed as [-1, row]) of position positions[b, s] of batch row b; int64 [B, S]."""
        B = positions.shape[0]
        pos = positions.long()
        if self.block_table is None:
            return torch.arange(B, device=pos.device)[:, None] * self.kv.shape[1] + pos
        page = self.kv.shape[1]
        blk = torch.gather(self.block_table.long(), 1, torch.div(pos, page, rounding_mode="floor"))
        return blk * page + pos % page

    def write_step(self, kv: torch.Tensor) -> None:
        """Static cache, one new token per row: kv [B, 1, row] goes to position seqlens[b]; seqlens += 1. Device
        only (no host sync): capturable in a CUDA graph. The caller keeps seqlens < capacity."""
        B, S, D = kv.shape
        slots = self._slots(self.seqlens[:, None])  # [B, 1]
        self.kv.view(-1, self.kv.shape[-1]).index_copy_(0, slots.view(-1), self._encode(kv.reshape(B * S, D)))
        self.seqlens += S

    def append_latent(self, kv: torch.Tensor, kv_lora_rank: int, fp8: bool = False) -> torch.Tensor:
        """Append rows kv [B, S, kv_lora_rank + rope]; returns all rows so far, [B, L, kv_lora_rank + rope] in kv's
        dtype (as read back from the cache). ``fp8``: the format of a new cache (an existing one keeps its own)."""
        B, S, D = kv.shape
        if self.kv is None:
            self._allocate(kv, kv_lora_rank, fp8, S)
        elif B != (self.batch_size if self.static else self.kv.shape[0]) or D != self.kv_lora_rank + self.rope_dim \
                or kv_lora_rank != self.kv_lora_rank:
            raise ValueError(f"kv must have shape [{self.batch_size if self.static else self.kv.shape[0]}, S, "
                             f"{self.kv_lora_rank + self.rope_dim}] to extend the cache, got {list(kv.shape)}")
        if self.static:
            start = self.length  # one host sync: prefill only
            if start + S > self.capacity:
                raise ValueError(f"appending {S} tokens to rows of {start} exceeds the capacity {self.capacity}")
            pos = torch.arange(start, start + S, device=kv.device).expand(B, S)
            self.kv.view(-1, self.kv.shape[-1]).index_copy_(0, self._slots(pos).reshape(-1),
                                                            self._encode(kv.reshape(B * S, D)))
            self.seqlens += S
            return self.rows(kv.dtype)
        L = self._length + S
        if L > self.kv.shape[1]:
            grown = self.kv.new_zeros(B, max(L, 2 * self.kv.shape[1]), self.kv.shape[2])
            grown[:, : self._length] = self.kv[:, : self._length]
            self.kv = grown
        self.kv[:, self._length : L] = self._encode(kv.reshape(B * S, D)).view(B, S, -1)
        self._length = L
        return self.rows(kv.dtype)
