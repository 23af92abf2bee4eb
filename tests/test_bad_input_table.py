"""One test per row of docs/bad_input.md: every public op and module rejects bad input on the host, before any
kernel runs, with a TypeError/ValueError that names the argument (``test_reject``); inputs that are legal but
unusual (strided views, 1-D positions) give the same result as the plain input (``test_accept``).

Row ids are the ids of the table. ``test_table_lists_every_row`` keeps the table and these tests in step.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from unittest import mock

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before moe_kernels: kernels run through the interpreter

import pytest  # noqa: E402

import moe_kernels as mk  # noqa: E402
from moe_kernels import reference as R  # noqa: E402
from moe_kernels.ops import mla as ops_mla  # noqa: E402
from moe_kernels.reference import mla as RM  # noqa: E402

H, E, T, K = 256, 8, 6, 2
F8 = torch.float8_e4m3fn
META = torch.device("meta")  # a second device on any machine: device checks run before anything is read
DOC = Path(__file__).resolve().parent.parent / "docs" / "bad_input.md"

REJECT: dict = {}  # id -> (callable, exception type, regex the message must match)
ACCEPT: dict = {}  # id -> callable returning (got, want), compared exactly


def reject(rid: str, exc, match: str):
    def deco(fn):
        assert rid not in REJECT, rid
        REJECT[rid] = (fn, exc, match)
        return fn
    return deco


def accept(rid: str):
    def deco(fn):
        assert rid not in ACCEPT, rid
        ACCEPT[rid] = fn
        return fn
    return deco


# ---- inputs ----------------------------------------------------------------------------------------------------

def x_():
    return torch.randn(T, H)


def w_():
    return torch.randn(E, H)


def ids_(t=T, k=K, e=E):
    return torch.rand(t, e).argsort(1)[:, :k].to(torch.int32)


def fp8_operands(M=10, e=3, N=128, k=256):
    a, s = mk.ops.quantize_fp8(torch.randn(M, k))
    w, ws = mk.ops.quantize_weight_fp8(torch.randn(e, N, k))
    return a, s, w, ws, torch.tensor([0, 4, 4, M], dtype=torch.int32)


def masked_operands(e=2, max_m=8, N=128, k=256):
    a, s = mk.ops.quantize_fp8(torch.randn(e * max_m, k))
    w, ws = mk.ops.quantize_weight_fp8(torch.randn(e, N, k))
    return a.view(e, max_m, k), s.view(e, max_m, -1), w, ws, torch.tensor([3, 8], dtype=torch.int32)


def mlp_operands(fp8: bool, M=10, e=3, h=256, i=128):
    w13, w2 = torch.randn(e, 2 * i, h) * h**-0.5, torch.randn(e, h, i) * i**-0.5
    offsets = torch.tensor([0, 4, 4, M], dtype=torch.int32)
    x = torch.randn(M, h)
    if not fp8:
        return dict(x=x, x_scale=None, offsets=offsets, w13=w13, w13_scale=None, w2=w2, w2_scale=None)
    (xq, xs), (q13, s13), (q2, s2) = mk.ops.quantize_fp8(x), R.quantize_weight_fp8(w13), R.quantize_weight_fp8(w2)
    return dict(x=xq, x_scale=xs, offsets=offsets, w13=q13, w13_scale=s13, w2=q2, w2_scale=s2)


def mlp(fp8, **over):
    args = mlp_operands(fp8)
    args.update(over)
    return mk.ops.expert_mlp(**args)


def latent_args(T_=5, h=128, Q=64, C=32, rope=16, fp8=False):
    x = torch.randn(T_, h)
    w = torch.randn(Q + C + rope, h) * h**-0.5
    cos, sin = RM.rope_cos_sin(torch.arange(T_), RM.default_inv_freq(rope))
    args = dict(x=x, w=w, q_norm_weight=torch.rand(Q) + 0.5, kv_norm_weight=torch.rand(C) + 0.5, cos=cos, sin=sin,
                q_lora_rank=Q, kv_lora_rank=C)
    if fp8:
        args["w"], args["w_scale"] = R.quantize_weight_fp8(w)
    return args


def latent(fp8=False, **over):
    args = latent_args(fp8=fp8)
    args.update(over)
    return ops_mla.mla_latent_proj(**args)


def decode_args(B=2, h=4, C=64, rope=16, S=20, paged=False):
    args = dict(q_latent=torch.randn(B, h, C), q_rope=torch.randn(B, h, rope), kv_cache=torch.randn(B, S, C + rope),
                cache_seqlens=torch.tensor([S, 7], dtype=torch.int32)[:B], softmax_scale=0.1)
    if paged:
        page = 16
        args["kv_cache"] = torch.randn(B * 2 + 1, page, C + rope)
        args["block_table"] = torch.randperm(B * 2 + 1)[: B * 2].view(B, 2).int()
    return args


def decode(paged=False, **over):
    args = decode_args(paged=paged)
    args.update(over)
    return ops_mla.mla_decode(**args)


def moe_layer(**over):
    args = dict(hidden_size=H, intermediate_size=128, num_experts=E, top_k=2, precision="bf16")
    args.update(over)
    return mk.MoELayer(**args)


def mla_module():
    return mk.MultiHeadLatentAttention(hidden_size=128, num_heads=4, q_lora_rank=64, kv_lora_rank=32,
                                       qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)


def mla_ctor(**over):
    args = dict(hidden_size=128, num_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=16, v_head_dim=16)
    args.update(over)
    return mk.MultiHeadLatentAttention(**args)


def nan_at(t, idx, value=float("nan")):
    t = t.clone()
    t[idx] = value
    return t


# ---- route -----------------------------------------------------------------------------------------------------

reject("route-x-type", TypeError, r"x must be a torch\.Tensor")(lambda: mk.ops.route([[0.0] * H], w_(), 2))
reject("route-x-dtype", TypeError, r"x must have dtype")(lambda: mk.ops.route(x_().int(), w_(), 2))
reject("route-x-ndim", ValueError, r"x must be 2-D")(lambda: mk.ops.route(x_()[0], w_(), 2))
reject("route-w-dtype", TypeError, r"router_weight must have dtype")(lambda: mk.ops.route(x_(), w_().to(F8), 2))
reject("route-w-shape", ValueError, r"router_weight must have shape \[E, 256\]")(
    lambda: mk.ops.route(x_(), torch.randn(E, H + 128), 2))
reject("route-w-device", TypeError, r"router_weight must be on cpu")(
    lambda: mk.ops.route(x_(), torch.empty(E, H, device=META), 2))
reject("route-E-max", ValueError, r"router_weight has 257 experts; route supports at most 256")(
    lambda: mk.ops.route(x_(), torch.randn(257, H), 2))
reject("route-topk-zero", ValueError, r"top_k must be >= 1")(lambda: mk.ops.route(x_(), w_(), 0))
reject("route-topk-above-E", ValueError, r"top_k must be <= 8")(lambda: mk.ops.route(x_(), w_(), E + 1))
reject("route-topk-above-8", ValueError, r"top_k must be <= 8, got 9")(
    lambda: mk.ops.route(x_(), torch.randn(16, H), 9))
reject("route-topk-type", TypeError, r"top_k must be an int")(lambda: mk.ops.route(x_(), w_(), 2.0))
reject("route-ngroup-divides", ValueError, r"n_group must divide num_experts=8")(
    lambda: mk.ops.route(x_(), w_(), 2, n_group=3))
reject("route-topk_group-range", ValueError, r"topk_group must be <= 4")(
    lambda: mk.ops.route(x_(), w_(), 2, n_group=4, topk_group=5))
reject("route-group-size", ValueError, r"num_experts/n_group must be >= 2")(
    lambda: mk.ops.route(x_(), w_(), 1, n_group=8, topk_group=1))
reject("route-topk-kept-groups", ValueError, r"top_k=5 exceeds the experts in the 1 kept groups")(
    lambda: mk.ops.route(x_(), torch.randn(16, H), 5, n_group=4, topk_group=1))
reject("route-scoring", ValueError, r"scoring must be one of")(lambda: mk.ops.route(x_(), w_(), 2, scoring="relu"))
reject("route-bias-shape", ValueError, r"bias must have shape \[8\]")(
    lambda: mk.ops.route(x_(), w_(), 2, bias=torch.zeros(E + 1)))
reject("route-bias-dtype", TypeError, r"bias must have dtype")(
    lambda: mk.ops.route(x_(), w_(), 2, bias=torch.zeros(E, dtype=torch.int32)))
reject("route-bias-device", TypeError, r"bias must be on cpu")(
    lambda: mk.ops.route(x_(), w_(), 2, bias=torch.zeros(E, device=META)))
reject("route-bias-nan", ValueError, r"bias must hold no NaN or \+inf")(
    lambda: mk.ops.route(x_(), w_(), 2, scoring="sigmoid", bias=nan_at(torch.zeros(E), 3)))
reject("route-bias-inf", ValueError, r"bias must hold no NaN or \+inf")(
    lambda: mk.ops.route(x_(), w_(), 2, n_group=4, topk_group=2, bias=nan_at(torch.zeros(E), 0, float("inf"))))
reject("route-expert_scale-shape", ValueError, r"expert_scale must have shape \[8\]")(
    lambda: mk.ops.route(x_(), w_(), 2, expert_scale=torch.ones(4)))
reject("route-expert_scale-nan", ValueError, r"expert_scale must hold no NaN or inf")(
    lambda: mk.ops.route(x_(), w_(), 2, expert_scale=nan_at(torch.ones(E), 5)))
reject("route-scaling-nan", ValueError, r"routed_scaling_factor must be finite")(
    lambda: mk.ops.route(x_(), w_(), 2, routed_scaling_factor=float("nan")))
reject("route-scaling-type", TypeError, r"routed_scaling_factor must be a real number")(
    lambda: mk.ops.route(x_(), w_(), 2, routed_scaling_factor="2.5"))
reject("route-logits-nan-x", ValueError, r"router logits are non-finite")(
    lambda: mk.ops.route(nan_at(x_(), (2, 7)), w_(), 2))
reject("route-logits-inf-w", ValueError, r"router logits are non-finite")(
    lambda: mk.ops.route(x_(), nan_at(w_(), (1, 3), float("inf")), 2))


@accept("route-bias-neg-inf")
def _():
    # a -inf bias masks an expert out (also with group-limited routing); it is never chosen
    bias = torch.zeros(16)
    bias[[3, 9]] = float("-inf")
    _, ids, counts = mk.ops.route(torch.randn(40, H), torch.randn(16, H), 4, scoring="sigmoid", n_group=4,
                                  topk_group=2, bias=bias)
    return (ids == 3) | (ids == 9), torch.zeros_like(ids, dtype=torch.bool)


@accept("route-x-strided")
def _():
    x, w = torch.randn(H, T).t(), w_()  # last stride != 1
    return mk.ops.route(x, w, 2), mk.ops.route(x.contiguous(), w, 2)


# ---- permute / unpermute ---------------------------------------------------------------------------------------

reject("permute-x-dtype", TypeError, r"x must have dtype")(lambda: mk.ops.permute(x_().to(F8), ids_(), E))
reject("permute-x-ndim", ValueError, r"x must be 2-D")(lambda: mk.ops.permute(x_()[None], ids_(), E))
reject("permute-ids-dtype", TypeError, r"topk_ids must have dtype int32 or int64")(
    lambda: mk.ops.permute(x_(), ids_().float(), E))
reject("permute-ids-ndim", ValueError, r"topk_ids must be 2-D")(lambda: mk.ops.permute(x_(), ids_()[:, 0], E))
reject("permute-ids-rows", ValueError, r"topk_ids must have one row per token of x \(6\)")(
    lambda: mk.ops.permute(x_(), ids_(t=T + 1), E))
reject("permute-ids-device", TypeError, r"topk_ids must be on cpu")(
    lambda: mk.ops.permute(x_(), torch.zeros(T, K, dtype=torch.int32, device=META), E))
reject("permute-ids-above", ValueError, r"topk_ids must lie in \[0, 8\)")(
    lambda: mk.ops.permute(x_(), nan_at(ids_(), (3, 1), E), E))
reject("permute-ids-negative", ValueError, r"topk_ids must lie in \[0, 8\)")(
    lambda: mk.ops.permute(x_(), nan_at(ids_(), (0, 0), -1), E))
reject("permute-num_experts", ValueError, r"num_experts must be >= 1")(lambda: mk.ops.permute(x_(), ids_(), 0))
reject("permute-num_experts-type", TypeError, r"num_experts must be an int")(
    lambda: mk.ops.permute(x_(), ids_(), 8.0))
reject("permute-fp8-hidden", ValueError, r"hidden size\) for fp8 must be a multiple of 128")(
    lambda: mk.ops.permute(torch.randn(T, 200), ids_(), E, fp8=True))
# 2^30 tokens x 4 as stride-0 views: the check comes before anything reads them
reject("permute-pairs-int32", ValueError, r"topk_ids has T\*k = 4294967296 .* at most 2147483647")(
    lambda: mk.ops.permute(torch.zeros(1, 128).expand(2**30, 128),
                           torch.zeros(1, 4, dtype=torch.int32).expand(2**30, 4), E))


def _permuted():
    x = x_()
    ids = ids_()
    return mk.ops.permute(x, ids, E), torch.rand(T, K)


def _unpermute_with_slot(slot):
    p, w = _permuted()
    return mk.ops.unpermute(p.x, p._replace(slot=slot), w)


reject("unpermute-y-dtype", TypeError, r"y must have dtype")(
    lambda: mk.ops.unpermute(_permuted()[0].x.int(), *_permuted()))
reject("unpermute-y-ndim", ValueError, r"y must be 2-D")(
    lambda: mk.ops.unpermute(torch.randn(T * K), *_permuted()))
reject("unpermute-y-rows", ValueError, r"y must have T\*k = 12 rows")(
    lambda: mk.ops.unpermute(torch.randn(T * K - 1, H), *_permuted()))
reject("unpermute-permuted-type", TypeError, r"permuted must be the Permuted returned by permute")(
    lambda: mk.ops.unpermute(torch.randn(T * K, H), tuple(_permuted()[0]), torch.rand(T, K)))
reject("unpermute-weights-shape", ValueError, r"topk_weights must have shape \[6, 2\]")(
    lambda: mk.ops.unpermute(torch.randn(T * K, H), _permuted()[0], torch.rand(T, K + 1)))
reject("unpermute-weights-dtype", TypeError, r"topk_weights must be floating point")(
    lambda: mk.ops.unpermute(torch.randn(T * K, H), _permuted()[0], torch.ones(T, K, dtype=torch.int32)))
reject("unpermute-weights-device", TypeError, r"topk_weights must be on cpu")(
    lambda: mk.ops.unpermute(torch.randn(T * K, H), _permuted()[0], torch.rand(T, K, device=META)))
reject("unpermute-slot-dtype", TypeError, r"permuted.slot must have dtype int32 or int64")(
    lambda: _unpermute_with_slot(torch.zeros(T, K)))
reject("unpermute-slot-range", ValueError, r"permuted.slot must lie in \[0, 12\)")(
    lambda: _unpermute_with_slot(torch.arange(T * K, dtype=torch.int32).view(T, K) + 5))


@accept("permute-x-strided")
def _():
    x, ids = torch.randn(H, T).t(), ids_()
    a, b = mk.ops.permute(x, ids, E), mk.ops.permute(x.contiguous(), ids, E)
    return (a.x, a.offsets, a.slot), (b.x, b.offsets, b.slot)


@accept("permute-ids-strided")
def _():
    x, ids = x_(), ids_()
    strided = torch.zeros(T, 2 * K, dtype=torch.int32)
    strided[:, ::2] = ids
    a, b = mk.ops.permute(x, strided[:, ::2], E, fp8=True), mk.ops.permute(x, ids, E, fp8=True)
    return (a.x.view(torch.uint8), a.scale, a.slot), (b.x.view(torch.uint8), b.scale, b.slot)


@accept("unpermute-y-strided")
def _():
    p, w = _permuted()
    y = torch.randn(H, T * K).t()
    return mk.ops.unpermute(y, p, w), mk.ops.unpermute(y.contiguous(), p, w)


# ---- quantisation ----------------------------------------------------------------------------------------------

reject("quant-x-type", TypeError, r"x must be a torch\.Tensor")(lambda: mk.ops.quantize_fp8(None))
reject("quant-x-dtype", TypeError, r"x must have dtype")(lambda: mk.ops.quantize_fp8(torch.zeros(4, 128).to(F8)))
reject("quant-x-ndim", ValueError, r"x must be 2-D")(lambda: mk.ops.quantize_fp8(torch.randn(4, 2, 128)))
reject("quant-x-hidden", ValueError, r"x.shape\[1\] must be a multiple of 128, got 200")(
    lambda: mk.ops.quantize_fp8(torch.randn(4, 200)))
reject("quant-block", ValueError, r"block must be 128")(lambda: mk.ops.quantize_fp8(torch.randn(4, 256), block=64))
reject("wquant-dtype", TypeError, r"w must have dtype")(
    lambda: mk.ops.quantize_weight_fp8(torch.ones(128, 128, dtype=torch.int32)))
reject("wquant-ndim", ValueError, r"w must be at least 2-D")(lambda: mk.ops.quantize_weight_fp8(torch.randn(128)))
reject("wquant-block", ValueError, r"block must be \(128, 128\)")(
    lambda: mk.ops.quantize_weight_fp8(torch.randn(128, 128), block=(64, 128)))


@accept("quant-x-strided")
def _():
    x = torch.randn(256, 7).t()
    (q1, s1), (q2, s2) = mk.ops.quantize_fp8(x), mk.ops.quantize_fp8(x.contiguous())
    return (q1.view(torch.uint8), s1), (q2.view(torch.uint8), s2)


# ---- grouped GEMMs ---------------------------------------------------------------------------------------------

def gemm_fp8(**over):
    a, s, w, ws, off = fp8_operands()
    args = dict(a=a, a_scale=s, w=w, w_scale=ws, offsets=off)
    args.update(over)
    return mk.ops.grouped_gemm_fp8(**args)


def gemm_bf16(**over):
    args = dict(a=torch.randn(10, 256), w=torch.randn(3, 128, 256), offsets=torch.tensor([0, 4, 4, 10]).int())
    args.update(over)
    return mk.ops.grouped_gemm_bf16(**args)


def gemm_masked(**over):
    a, s, w, ws, m = masked_operands()
    args = dict(a=a, a_scale=s, w=w, w_scale=ws, masked_m=m)
    args.update(over)
    return mk.ops.grouped_gemm_fp8_masked(**args)


reject("gemm-a-dtype", TypeError, r"a must have dtype float8_e4m3fn")(lambda: gemm_fp8(a=torch.randn(10, 256)))
reject("gemm-a-ndim", ValueError, r"a must be 2-D")(lambda: gemm_fp8(a=torch.zeros(1, 10, 256).to(F8)))
reject("gemm-K-multiple", ValueError, r"a.shape\[-1\] \(K\) must be a multiple of 128, got 200")(
    lambda: gemm_fp8(a=torch.zeros(10, 200).to(F8)))
reject("gemm-a_scale-shape", ValueError, r"a_scale must have shape \[10, 2\]")(
    lambda: gemm_fp8(a_scale=torch.ones(10, 1)))
reject("gemm-a_scale-dtype", TypeError, r"a_scale must have dtype float32")(
    lambda: gemm_fp8(a_scale=torch.ones(10, 2, dtype=torch.bfloat16)))
reject("gemm-w-dtype", TypeError, r"w must have dtype float8_e4m3fn")(lambda: gemm_fp8(w=torch.randn(3, 128, 256)))
reject("gemm-w-K", ValueError, r"w must have shape \[E, N, 256\]")(
    lambda: gemm_fp8(w=torch.zeros(3, 128, 128).to(F8)))
reject("gemm-w-device", TypeError, r"w must be on cpu")(
    lambda: gemm_fp8(w=torch.empty(3, 128, 256, dtype=F8, device=META)))
reject("gemm-w_scale-shape", ValueError, r"w_scale must have shape \[3, 1, 2\]")(
    lambda: gemm_fp8(w_scale=torch.ones(3, 2, 2)))
reject("gemm-offsets-dtype", TypeError, r"offsets must have dtype int32")(
    lambda: gemm_fp8(offsets=torch.tensor([0, 4, 4, 10])))
reject("gemm-offsets-length", ValueError, r"offsets must have shape \[4\]")(
    lambda: gemm_fp8(offsets=torch.tensor([0, 4, 10], dtype=torch.int32)))
reject("gemm-offsets-start", ValueError, r"offsets must start at 0, never decrease and end at M=10")(
    lambda: gemm_fp8(offsets=torch.tensor([1, 4, 4, 10], dtype=torch.int32)))
reject("gemm-offsets-monotone", ValueError, r"offsets must start at 0, never decrease and end at M=10")(
    lambda: gemm_fp8(offsets=torch.tensor([0, 6, 4, 10], dtype=torch.int32)))
reject("gemm-offsets-sum", ValueError, r"offsets must start at 0, never decrease and end at M=10")(
    lambda: gemm_fp8(offsets=torch.tensor([0, 4, 4, 9], dtype=torch.int32)))
reject("gemm-out_dtype", TypeError, r"out_dtype must be bfloat16, float16 or float32")(
    lambda: gemm_fp8(out_dtype=torch.float64))
reject("gemm-out-small", ValueError, r"out must have shape \[10, 128\]")(
    lambda: gemm_fp8(out=torch.empty(9, 128, dtype=torch.bfloat16)))
reject("gemm-out-stride", ValueError, r"out must have unit stride along its last dimension")(
    lambda: gemm_fp8(out=torch.empty(128, 10, dtype=torch.bfloat16).t()))
reject("gemm-bf16-w-dtype", TypeError, r"w must have dtype float32")(
    lambda: gemm_bf16(w=torch.randn(3, 128, 256, dtype=torch.bfloat16)))
reject("gemm-bf16-K", ValueError, r"w must have shape \[E, N, 256\]")(lambda: gemm_bf16(w=torch.randn(3, 128, 128)))
reject("gemm-bf16-offsets-sum", ValueError, r"offsets must start at 0, never decrease and end at M=10")(
    lambda: gemm_bf16(offsets=torch.tensor([0, 4, 4, 11], dtype=torch.int32)))
reject("masked-a-ndim", ValueError, r"a must be 3-D")(lambda: gemm_masked(a=torch.zeros(16, 256).to(F8)))
reject("masked-a_scale-shape", ValueError, r"a_scale must have shape")(
    lambda: gemm_masked(a_scale=torch.ones(2, 8, 1)))
reject("masked-w-experts", ValueError, r"w must have 2 experts to match a")(
    lambda: gemm_masked(w=mk.ops.quantize_weight_fp8(torch.randn(3, 128, 256))[0],
                        w_scale=torch.ones(3, 1, 2)))
reject("masked-m-dtype", TypeError, r"masked_m must have dtype int32")(
    lambda: gemm_masked(masked_m=torch.tensor([3, 8])))
reject("masked-m-range", ValueError, r"masked_m must lie in \[0, 8\]")(
    lambda: gemm_masked(masked_m=torch.tensor([3, 9], dtype=torch.int32)))


def _strided_int(values):
    """The same int32 values as a view with stride 2."""
    base = torch.full((2 * len(values),), -7, dtype=torch.int32)
    base[::2] = torch.tensor(values, dtype=torch.int32)
    return base[::2]


@accept("gemm-offsets-strided")
def _():
    a, s, w, ws, off = fp8_operands()
    return gemm_fp8(a=a, a_scale=s, w=w, w_scale=ws, offsets=_strided_int(off.tolist())), \
        gemm_fp8(a=a, a_scale=s, w=w, w_scale=ws, offsets=off)


@accept("gemm-bf16-offsets-strided")
def _():
    a, w = torch.randn(10, 256), torch.randn(3, 128, 256)
    return gemm_bf16(a=a, w=w, offsets=_strided_int([0, 4, 4, 10])), \
        gemm_bf16(a=a, w=w, offsets=torch.tensor([0, 4, 4, 10], dtype=torch.int32))


@accept("gemm-a-strided")
def _():
    a, s, w, ws, off = fp8_operands()
    a_t = a.view(torch.uint8).t().contiguous().t().view(F8)  # column-major copy of the same values
    return gemm_fp8(a=a_t, a_scale=s, w=w, w_scale=ws, offsets=off), \
        gemm_fp8(a=a, a_scale=s, w=w, w_scale=ws, offsets=off)


@accept("masked-m-strided")
def _():
    a, s, w, ws, m = masked_operands()
    got = gemm_masked(a=a, a_scale=s, w=w, w_scale=ws, masked_m=_strided_int(m.tolist()))
    want = gemm_masked(a=a, a_scale=s, w=w, w_scale=ws, masked_m=m)
    return [got[e, :n] for e, n in enumerate(m.tolist())], [want[e, :n] for e, n in enumerate(m.tolist())]


# ---- expert MLP ------------------------------------------------------------------------------------------------

reject("mlp-w2-shape", ValueError, r"w2 must have shape \[3, 256, 128\]")(
    lambda: mlp(False, w2=torch.randn(3, 256, 64)))
reject("mlp-fp8-x_scale-missing", TypeError, r"x_scale must be a torch\.Tensor")(lambda: mlp(True, x_scale=None))
reject("mlp-fp8-intermediate", ValueError, r"intermediate size \(w2.shape\[2\]\) must be a multiple of 128")(
    lambda: mlp(True, w13=torch.zeros(3, 128, 256).to(F8), w13_scale=torch.ones(3, 1, 2),
                w2=torch.zeros(3, 256, 64).to(F8), w2_scale=torch.ones(3, 2, 1)))
reject("mlp-fp8-w2-dtype", TypeError, r"w2 must have dtype float8_e4m3fn")(
    lambda: mlp(True, w2=torch.randn(3, 256, 128)))
reject("mlp-fp8-w2_scale-shape", ValueError, r"w2_scale must have shape \[3, 2, 1\]")(
    lambda: mlp(True, w2_scale=torch.ones(3, 1, 1)))
reject("mlp-fp8-w13_scale-shape", ValueError, r"w13_scale must have shape \[3, 2, 2\]")(
    lambda: mlp(True, w13_scale=torch.ones(3, 1, 2)))
reject("mlp-bf16-x-dtype", TypeError, r"w13_scale is None but x is float8_e4m3fn")(
    lambda: mlp(False, x=torch.zeros(10, 256).to(F8)))
reject("mlp-fp8-w13_scale-missing", TypeError, r"w13_scale is None but x is float8_e4m3fn: the FP8 path needs w13_scale")(
    lambda: mlp(True, w13_scale=None, w2_scale=None))
reject("mlp-fp8-w13-no-scale", TypeError, r"w13_scale is None but w13 is float8_e4m3fn")(
    lambda: mlp(True, x=torch.randn(10, 256), x_scale=None, w13_scale=None, w2_scale=None))
reject("mlp-bf16-w13-dtype", TypeError, r"w13 must have dtype float32")(
    lambda: mlp(False, w13=torch.randn(3, 256, 256, dtype=torch.bfloat16)))
reject("mlp-bf16-scales", ValueError, r"x_scale and w2_scale belong to the FP8 path")(
    lambda: mlp(False, x_scale=torch.ones(10, 2)))
reject("mlp-x-hidden", ValueError, r"x must have shape \[\*, 256\]")(lambda: mlp(False, x=torch.randn(10, 128)))
reject("mlp-topk_weight-shape", ValueError, r"topk_weight must have shape \[10\]")(
    lambda: mlp(False, topk_weight=torch.rand(9)))
reject("mlp-offsets-sum", ValueError, r"offsets must start at 0, never decrease and end at M=10")(
    lambda: mlp(False, offsets=torch.tensor([0, 4, 4, 12], dtype=torch.int32)))
reject("mlp-offsets-device", TypeError, r"offsets must be on cpu")(
    lambda: mlp(False, offsets=torch.zeros(4, dtype=torch.int32, device=META)))


@accept("mlp-offsets-strided")
def _():
    args = mlp_operands(True)
    want = mk.ops.expert_mlp(**args)
    args["offsets"] = _strided_int(args["offsets"].tolist())
    return mk.ops.expert_mlp(**args), want


# ---- MLA ops ---------------------------------------------------------------------------------------------------

reject("latent-x-dtype", TypeError, r"x must have dtype")(lambda: latent(x=torch.ones(5, 128, dtype=torch.int32)))
reject("latent-w-dtype", TypeError, r"w must have dtype float32")(
    lambda: latent(w=torch.randn(112, 128, dtype=torch.bfloat16)))
reject("latent-w-hidden", ValueError, r"w must have shape \[N, 128\]")(lambda: latent(w=torch.randn(112, 256)))
reject("latent-rope-odd", ValueError, r"even rope >= 2")(lambda: latent(w=torch.randn(64 + 32 + 3, 128)))
reject("latent-q_lora_rank", ValueError, r"q_lora_rank must be >= 0")(lambda: latent(q_lora_rank=-1))
reject("latent-fp8-hidden", ValueError, r"hidden size, FP8 path\) must be a multiple of 128")(
    lambda: latent(x=torch.randn(5, 64), w=torch.zeros(112, 64).to(F8), w_scale=torch.ones(1, 1)))
reject("latent-w_scale-shape", ValueError, r"w_scale must have shape \[1, 1\]")(
    lambda: latent(fp8=True, w_scale=torch.ones(2, 1)))
reject("latent-q_norm-shape", ValueError, r"q_norm_weight must have shape \[64\]")(
    lambda: latent(q_norm_weight=torch.ones(32)))
reject("latent-q_norm-unused", ValueError, r"q_norm_weight must be None when q_lora_rank is 0")(
    lambda: latent(q_lora_rank=0, kv_lora_rank=96))
reject("latent-kv_norm-shape", ValueError, r"kv_norm_weight must have shape \[32\]")(
    lambda: latent(kv_norm_weight=torch.ones(64)))
reject("latent-kv_norm-dtype", TypeError, r"kv_norm_weight must have dtype")(
    lambda: latent(kv_norm_weight=torch.ones(32, dtype=torch.int64)))
reject("latent-cos-shape", ValueError, r"cos must have shape \[5, 8\]")(lambda: latent(cos=torch.ones(5, 16)))
reject("latent-cos-dtype", TypeError, r"cos must have dtype float32")(
    lambda: latent(cos=torch.ones(5, 8, dtype=torch.bfloat16)))
reject("latent-cos-stride", ValueError, r"cos and sin must have unit stride")(
    lambda: latent(cos=torch.ones(8, 5).t()))
reject("latent-x-device", TypeError, r"w must be on meta")(lambda: latent(x=torch.empty(5, 128, device=META)))

reject("decode-q-dtype", TypeError, r"q_latent must have dtype")(
    lambda: decode(q_latent=torch.ones(2, 4, 64, dtype=torch.int32)))
reject("decode-q-ndim", ValueError, r"q_latent must be \[B, h, C\] or \[B, s_q, h, C\]")(lambda: decode(q_latent=torch.randn(2, 64)))
reject("decode-q_rope-shape", ValueError, r"q_rope must have shape \[2, 4, '?R'?\]")(
    lambda: decode(q_rope=torch.randn(2, 3, 16)))
reject("decode-q_rope-dtype", TypeError, r"q_rope must have dtype float32")(
    lambda: decode(q_rope=torch.randn(2, 4, 16, dtype=torch.bfloat16)))
reject("decode-cache-columns", ValueError, r"kv_cache must have C \+ R = 80 columns")(
    lambda: decode(kv_cache=torch.randn(2, 20, 96)))
reject("decode-cache-stride", ValueError, r"kv_cache must have unit stride along its last dimension")(
    lambda: decode(kv_cache=torch.randn(2, 80, 20).transpose(1, 2)))
reject("decode-q-stride", ValueError, r"q_latent and q_rope must have unit stride")(
    lambda: decode(q_latent=torch.randn(2, 64, 4).transpose(1, 2)))
reject("decode-cache-rows", ValueError, r"kv_cache must have 2 rows")(lambda: decode(kv_cache=torch.randn(3, 20, 80)))
reject("decode-cache-device", TypeError, r"kv_cache must be on cpu")(
    lambda: decode(kv_cache=torch.empty(2, 20, 80, device=META)))
reject("decode-seqlens-dtype", TypeError, r"cache_seqlens must have dtype int32")(
    lambda: decode(cache_seqlens=torch.tensor([20, 7])))
reject("decode-seqlens-shape", ValueError, r"cache_seqlens must have shape \[2\]")(
    lambda: decode(cache_seqlens=torch.tensor([20, 7, 1], dtype=torch.int32)))
reject("decode-seqlens-capacity", ValueError, r"cache_seqlens must lie in \[0, 20\]")(
    lambda: decode(cache_seqlens=torch.tensor([21, 7], dtype=torch.int32)))
reject("decode-seqlens-negative", ValueError, r"cache_seqlens must lie in \[0, 20\]")(
    lambda: decode(cache_seqlens=torch.tensor([-1, 7], dtype=torch.int32)))
reject("decode-table-rows", ValueError, r"block_table must have 2 rows")(
    lambda: decode(paged=True, block_table=torch.zeros(3, 2, dtype=torch.int32)))
reject("decode-table-dtype", TypeError, r"block_table must have dtype int32")(
    lambda: decode(paged=True, block_table=torch.zeros(2, 2, dtype=torch.int64)))
reject("decode-table-capacity", ValueError, r"cache_seqlens must lie in \[0, 32\]")(
    lambda: decode(paged=True, cache_seqlens=torch.tensor([33, 7], dtype=torch.int32)))
reject("decode-table-entries", ValueError, r"block_table entries must lie in \[0, 5\)")(
    lambda: decode(paged=True, block_table=torch.tensor([[0, 5], [1, 2]], dtype=torch.int32)))
reject("decode-scale-type", TypeError, r"softmax_scale must be a float")(lambda: decode(softmax_scale="0.1"))
reject("decode-splits", ValueError, r"num_splits must be <= 256")(lambda: decode(num_splits=300))


@accept("latent-norm-strided")
def _():
    args = latent_args()
    want = ops_mla.mla_latent_proj(**args)
    for name in ("q_norm_weight", "kv_norm_weight"):
        base = torch.full((2 * args[name].shape[0],), 100.0)
        base[::2] = args[name]
        args[name] = base[::2]
    return ops_mla.mla_latent_proj(**args), want


# ---- RMSNorm ---------------------------------------------------------------------------------------------------

def norm(x=None, weight=None, eps=1e-6):
    x = torch.randn(4, 16) if x is None else x
    return mk.ops.rms_norm(x, torch.ones(x.shape[-1]) if weight is None else weight, eps)


reject("norm-x-dtype", TypeError, r"x must have dtype bfloat16 or float16 or float32, got float64")(
    lambda: norm(x=torch.randn(4, 16, dtype=torch.float64)))
reject("norm-w-dtype", TypeError, r"weight must have dtype bfloat16 or float16 or float32, got int64")(
    lambda: norm(weight=torch.ones(16, dtype=torch.int64)))
reject("norm-x-ndim", ValueError, r"x must have at least one dimension")(lambda: norm(x=torch.tensor(1.0), weight=torch.ones(1)))
reject("norm-x-hidden", ValueError, r"x's last dimension must be <= 65536")(lambda: norm(x=torch.empty(0, 65537)))
reject("norm-w-shape", ValueError, r"weight must have shape \[16\], got \[8\]")(lambda: norm(weight=torch.ones(8)))
reject("norm-w-device", TypeError, r"weight must be on cpu")(lambda: norm(weight=torch.ones(16, device=META)))
reject("norm-eps", ValueError, r"eps must be >= 0")(lambda: norm(eps=-1e-6))
reject("norm-eps-type", TypeError, r"eps must be a real number")(lambda: norm(eps="1e-6"))
reject("rmsnorm-hidden", ValueError, r"hidden_size must be >= 1")(lambda: mk.RMSNorm(0))
reject("rmsnorm-eps", ValueError, r"eps must be finite")(lambda: mk.RMSNorm(16, eps=float("nan")))
reject("rmsnorm-from-module", TypeError, r"Linear must have a 1-D weight Parameter")(
    lambda: mk.RMSNorm.from_module(torch.nn.Linear(4, 4)))


# ---- FP8 linear ------------------------------------------------------------------------------------------------

def lin8(x=None, weight=None, weight_scale=None, out_dtype=None):
    q, s = R.quantize_weight_fp8(torch.randn(200, 256) * 0.05)
    return mk.ops.linear_fp8(torch.randn(3, 256) if x is None else x, q if weight is None else weight,
                             s if weight_scale is None else weight_scale, out_dtype)


reject("lin8-x-dtype", TypeError, r"x must have dtype bfloat16 or float16 or float32, got float64")(
    lambda: lin8(x=torch.randn(3, 256, dtype=torch.float64)))
reject("lin8-x-k", ValueError, r"x.shape\[-1\] \(K\) must be a multiple of 128, got 200")(
    lambda: lin8(x=torch.randn(3, 200)))
reject("lin8-w-dtype", TypeError, r"weight must have dtype float8_e4m3fn")(lambda: lin8(weight=torch.randn(200, 256)))
reject("lin8-w-shape", ValueError, r"weight must have shape \[N, 256\]")(
    lambda: lin8(weight=torch.zeros(200, 128, dtype=F8)))
reject("lin8-scale-shape", ValueError, r"weight_scale must have shape \[2, 2\]")(
    lambda: lin8(weight_scale=torch.ones(2, 1)))
reject("lin8-w-device", TypeError, r"weight must be on cpu")(lambda: lin8(weight=torch.zeros(200, 256, dtype=F8,
                                                                                               device=META)))
reject("lin8-out-dtype", TypeError, r"out_dtype must be bfloat16, float16 or float32")(
    lambda: lin8(out_dtype=torch.int32))
reject("fp8linear-in", ValueError, r"in_features to be a multiple of 128 \(one activation scale per 1x128 group\), got 100")(lambda: mk.FP8Linear(100, 8))
reject("fp8linear-bias", ValueError, r"FP8Linear has no bias")(
    lambda: mk.FP8Linear.from_linear(torch.nn.Linear(128, 8)))


@accept("lin8-x-strided")
def _():
    q, s = R.quantize_weight_fp8(torch.randn(64, 128) * 0.05)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    return mk.ops.linear_fp8(x[:, ::2], q, s), mk.ops.linear_fp8(x[:, ::2].contiguous(), q, s)


@accept("norm-x-strided")
def _():
    x, w = torch.randn(2, 3, 32, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    return mk.ops.rms_norm(x[..., ::2], w), mk.ops.rms_norm(x[..., ::2].contiguous(), w)


@accept("decode-seqlens-strided")
def _():
    args = decode_args()
    want = ops_mla.mla_decode(**args)
    args["cache_seqlens"] = _strided_int(args["cache_seqlens"].tolist())
    return ops_mla.mla_decode(**args), want


@accept("decode-table-strided")
def _():
    args = decode_args(paged=True)
    want = ops_mla.mla_decode(**args)
    args["block_table"] = args["block_table"].t().contiguous().t()  # column-major: stride (1, B)
    return ops_mla.mla_decode(**args), want


# ---- modules ---------------------------------------------------------------------------------------------------

reject("moe-hidden", ValueError, r"precision='fp8' needs hidden_size to be a multiple of 128 .*, got 200")(
    lambda: moe_layer(hidden_size=200, precision="fp8"))
reject("moe-num_experts-max", ValueError, r"num_experts must be <= 256 \(the routing kernel's limit\), got 512")(
    lambda: moe_layer(num_experts=512))
reject("moe-topk", ValueError, r"top_k must be <= 8")(lambda: moe_layer(top_k=9))
reject("moe-topk-zero", ValueError, r"top_k must be >= 1")(lambda: moe_layer(top_k=0))
reject("moe-ngroup", ValueError, r"n_group must divide num_experts=8")(lambda: moe_layer(n_group=3))
reject("moe-topk_group", ValueError, r"topk_group must be <= 4")(lambda: moe_layer(n_group=4, topk_group=5))
reject("moe-precision", ValueError, r"precision must be one of")(lambda: moe_layer(precision="int4"))
reject("moe-scoring", ValueError, r"scoring must be one of")(lambda: moe_layer(scoring="relu"))
reject("moe-balance", ValueError, r"balance must be one of")(lambda: moe_layer(balance="magic"))
reject("moe-num_experts", ValueError, r"num_experts must be >= 1")(lambda: moe_layer(num_experts=0))
reject("moe-shared", ValueError, r"n_shared_experts must be >= 0")(lambda: moe_layer(n_shared_experts=-1))
reject("moe-intermediate-fp8", ValueError, r"precision='fp8' needs intermediate_size to be a multiple of 128")(
    lambda: moe_layer(intermediate_size=100, precision="fp8"))
reject("moe-scaling-inf", ValueError, r"routed_scaling_factor must be finite")(
    lambda: moe_layer(routed_scaling_factor=float("inf")))
reject("moe-x-type", TypeError, r"x must be a torch\.Tensor")(lambda: moe_layer()([[0.0] * H]))
reject("moe-x-hidden", ValueError, r"x must have last dimension hidden_size=256")(
    lambda: moe_layer()(torch.randn(4, 255)))
reject("moe-x-dtype", TypeError, r"x must be bf16, fp16 or fp32")(
    lambda: moe_layer()(torch.ones(4, H, dtype=torch.int32)))
reject("moe-x-fp8", TypeError, r"x must be bf16, fp16 or fp32")(lambda: moe_layer()(torch.zeros(4, H).to(F8)))
reject("moe-x-device", TypeError, r"x is on meta but the layer's weights are on cpu")(
    lambda: moe_layer()(torch.empty(4, H, device=META)))

reject("router-hidden", ValueError, r"hidden_size must be >= 1")(lambda: mk.TopKRouter(0, E, 2))
reject("router-topk-8", ValueError, r"top_k must be <= 8")(lambda: mk.TopKRouter(H, 16, 9))
reject("router-num_experts-max", ValueError, r"num_experts must be <= 256")(lambda: mk.TopKRouter(H, 257, 2))
reject("router-alpha", ValueError, r"alpha must lie in \[0.1, 0.3\]")(
    lambda: mk.TopKRouter(H, E, 2, balance="adaptive", alpha=0.5))
reject("router-load_decay", ValueError, r"load_decay must lie in \[0, 1\)")(
    lambda: mk.TopKRouter(H, E, 2, load_decay=1.0))
reject("router-scaling-nan", ValueError, r"routed_scaling_factor must be finite")(
    lambda: mk.TopKRouter(H, E, 2, routed_scaling_factor=float("nan")))
reject("router-x-shape", ValueError, r"x must have shape \[\*, 256\]")(lambda: mk.TopKRouter(H, E, 2)(x_()[:, :128]))
reject("router-x-device", TypeError, r"x must be on cpu, got meta")(
    lambda: mk.TopKRouter(H, E, 2)(torch.empty(T, H, device=META)))

reject("experts-hidden", ValueError, r"precision='fp8' needs hidden_size to be a multiple of 128")(
    lambda: mk.GroupedExperts(2, 200, 128, precision="fp8"))
reject("experts-intermediate-fp8", ValueError, r"precision='fp8' needs intermediate_size to be a multiple of 128")(
    lambda: mk.GroupedExperts(2, H, 100, precision="fp8"))
reject("experts-precision", ValueError, r"precision must be one of")(
    lambda: mk.GroupedExperts(2, H, 128, precision="int8"))
reject("experts-x-shape", ValueError, r"x must have shape \[\*, 256\]")(
    lambda: mk.GroupedExperts(2, H, 128, precision="bf16")(torch.randn(4, 128), torch.tensor([0, 2, 4]).int()))
reject("experts-offsets-shape", ValueError, r"offsets must have shape \[3\]")(
    lambda: mk.GroupedExperts(2, H, 128, precision="bf16")(torch.randn(4, H), torch.tensor([0, 4]).int()))
reject("experts-offsets-dtype", TypeError, r"offsets must have dtype int32")(
    lambda: mk.GroupedExperts(2, H, 128, precision="bf16")(torch.randn(4, H), torch.tensor([0, 2, 4])))
reject("experts-x-device", TypeError, r"x must be on cpu, got meta")(
    lambda: mk.GroupedExperts(2, H, 128, precision="bf16")(torch.empty(4, H, device=META),
                                                           torch.tensor([0, 2, 4]).int()))
reject("experts-load-shape", ValueError, r"w13 must have shape \[2, 256, 256\]")(
    lambda: mk.GroupedExperts(2, H, 128, precision="fp8").load_weights(torch.randn(2, 255, H), torch.randn(2, H, 128)))
reject("experts-load-fp8-no-scales", ValueError, r"FP8 weights need their scales")(
    lambda: mk.GroupedExperts(2, H, 128, precision="fp8").load_weights(
        mk.ops.quantize_weight_fp8(torch.randn(2, 256, H))[0], torch.randn(2, H, 128)))
reject("experts-load-fp8-into-bf16", TypeError, r"w13 is float8_e4m3fn but this layer has precision='bf16'")(
    lambda: mk.GroupedExperts(2, H, 128, precision="bf16").load_weights(
        mk.ops.quantize_weight_fp8(torch.randn(2, 256, H))[0], torch.randn(2, H, 128)))
reject("experts-load-scale-shape", ValueError, r"w13_scale must have shape \[2, 2, 2\]")(
    lambda: mk.GroupedExperts(2, H, 128, precision="fp8").load_weights(
        *mk.ops.quantize_weight_fp8(torch.randn(2, 256, H))[:1], *mk.ops.quantize_weight_fp8(torch.randn(2, H, 128))[:1],
        torch.ones(2, 1, 2), torch.ones(2, 2, 1)))

reject("mla-rope-odd", ValueError, r"qk_rope_head_dim must be even")(lambda: mla_ctor(qk_rope_head_dim=15))
reject("mla-heads", ValueError, r"num_heads must be >= 1")(lambda: mla_ctor(num_heads=0))
reject("mla-q_lora", ValueError, r"q_lora_rank must be >= 1")(lambda: mla_ctor(q_lora_rank=0))
reject("mla-weight_dtype", ValueError, r"weight_dtype must be one of")(lambda: mla_ctor(weight_dtype="int8"))
reject("mla-fp8-widths", ValueError, r"FP8 projection weights need hidden_size to be a multiple of 128 .*, got 96")(
    lambda: mla_ctor(hidden_size=96, weight_dtype="fp8"))
reject("mla-x-shape", ValueError, r"x must have shape \[\*, \*, 128\]")(lambda: mla_module()(torch.randn(1, 3, 64)))
reject("mla-x-ndim", ValueError, r"x must be 3-D")(lambda: mla_module()(torch.randn(3, 128)))
reject("mla-x-dtype", TypeError, r"x has dtype torch.bfloat16 but the weights are torch.float32")(
    lambda: mla_module()(torch.randn(1, 3, 128, dtype=torch.bfloat16)))
reject("mla-x-device", TypeError, r"x is on meta but the layer's weights are on cpu")(
    lambda: mla_module()(torch.empty(1, 3, 128, device=META)))
reject("mla-positions-shape", ValueError, r"positions must have shape \[2, 3\], \[1, 3\] or \[3\]")(
    lambda: mla_module()(torch.randn(2, 3, 128), positions=torch.arange(4)[None]))
reject("mla-positions-batch", ValueError, r"positions must have shape \[2, 3\]")(
    lambda: mla_module()(torch.randn(2, 3, 128), positions=torch.arange(3).expand(3, 3)))
reject("mla-cache-type", TypeError, r"cache must be an MLACache")(
    lambda: mla_module()(torch.randn(1, 3, 128), cache={}))


def _cache_batch_mismatch():
    m, cache = mla_module(), mk.MLACache()
    with torch.no_grad():
        m(torch.randn(2, 3, 128), cache=cache)
        m(torch.randn(1, 1, 128), cache=cache)


reject("mla-cache-batch", ValueError, r"cache holds 2 sequences but x has batch size 1")(_cache_batch_mismatch)


@accept("mla-positions-1d")
def _():
    # S == num_heads: [S] positions broadcast against [B, h, S, rope] queries would pair positions with heads
    m = mla_module()
    x = torch.randn(1, 4, 128)
    with torch.no_grad():
        return m(x, positions=torch.arange(4) + 3), m(x, positions=(torch.arange(4) + 3)[None])


# ---- expert parallelism (one-process gloo group; the multi-rank rows run in tests/test_dist.py) ------------------

def ep(**over):
    from moe_kernels.dist.ep import ExpertParallel

    args = dict(group=None, num_experts=4, backend="nccl", timeout=5.0)
    args.update(over)
    return ExpertParallel(**args)


def ep_dispatch(fp8=False, **over):
    x = torch.randn(T, H)
    args = dict(x=x, topk_ids=ids_(e=4), topk_weights=torch.rand(T, K), fp8=fp8)
    args.update(over)
    return ep().dispatch(**args)


def _placement(e2r, ranks):
    from moe_kernels.dist.placement import Placement

    return Placement(tuple(e2r), ranks)


def _ep_combine(y_rows=None, dispatched=None):
    e = ep()
    d = e.dispatch(torch.randn(T, H), ids_(e=4), torch.rand(T, K))
    y = torch.randn(d.x.shape[0] + (y_rows or 0), H)
    return e.combine(y, d if dispatched is None else dispatched)


def _ep_closed():
    e = ep()
    e.close()
    e.dispatch(torch.randn(T, H), ids_(e=4), torch.rand(T, K))


def _ep_no_process_group():
    from moe_kernels.dist.ep import ExpertParallel

    with mock.patch.object(torch.distributed, "is_initialized", return_value=False):
        ExpertParallel(None, 4)


def _default_placement(e, g):
    from moe_kernels.dist.placement import default_placement

    return default_placement(e, g)


reject("ep-no-process-group", RuntimeError, r"ExpertParallel needs torch.distributed")(_ep_no_process_group)
reject("ep-num_experts", ValueError, r"num_experts must be >= 1")(lambda: ep(num_experts=0))
reject("ep-backend", ValueError, r"backend must be one of")(lambda: ep(backend="mpi"))
reject("ep-timeout", ValueError, r"timeout must be a positive number of seconds")(lambda: ep(timeout=-1.0))
reject("ep-combine_dtype", TypeError, r"combine_dtype must be None, float32, bfloat16 or float16")(
    lambda: ep(combine_dtype=torch.int32))
reject("ep-buffer_tokens", ValueError, r"buffer_tokens must be >= 1")(lambda: ep(buffer_tokens=0))
reject("ep-placement-type", TypeError, r"placement must be a moe_kernels.dist.Placement")(
    lambda: ep(placement=[0, 0, 0, 0]))
reject("ep-placement-world", ValueError, r"placement is for world size 2 but the group has world size 1")(
    lambda: ep(placement=_placement([0, 0, 1, 1], 2)))
reject("ep-placement-experts", ValueError, r"placement places 3 experts but num_experts=4")(
    lambda: ep(placement=_placement([0, 0, 0], 1)))
reject("ep-world-divides-experts", ValueError, r"the world size \(4\) must divide num_experts")(
    lambda: _default_placement(10, 4))
reject("ep-dispatch-x-dtype", TypeError, r"x must have dtype")(lambda: ep_dispatch(x=torch.ones(T, H).int()))
reject("ep-dispatch-ids-dtype", TypeError, r"topk_ids must have dtype int32 or int64")(
    lambda: ep_dispatch(topk_ids=ids_(e=4).float()))
reject("ep-dispatch-ids-rows", ValueError, r"topk_ids must have shape \[6, k\]")(
    lambda: ep_dispatch(topk_ids=ids_(t=T - 1, e=4)))
reject("ep-dispatch-ids-range", ValueError, r"topk_ids must lie in \[-1, 4\)")(
    lambda: ep_dispatch(topk_ids=ids_(e=4) + 4))
reject("ep-dispatch-k", ValueError, r"topk_ids must have between 1 and 32 columns")(
    lambda: ep_dispatch(topk_ids=torch.zeros(T, 33, dtype=torch.int32), topk_weights=torch.rand(T, 33)))
reject("ep-dispatch-weights-dtype", TypeError, r"topk_weights must have dtype float32")(
    lambda: ep_dispatch(topk_weights=torch.rand(T, K).double()))
reject("ep-dispatch-weights-shape", ValueError, r"topk_weights must have shape \[6, 2\]")(
    lambda: ep_dispatch(topk_weights=torch.rand(T, 1)))
reject("ep-dispatch-fp8-hidden", ValueError, r"fp8 dispatch needs a hidden size that is a multiple of 128")(
    lambda: ep_dispatch(fp8=True, x=torch.randn(T, 200)))
reject("ep-dispatch-ids-device", TypeError, r"topk_ids must be on cpu")(
    lambda: ep_dispatch(topk_ids=torch.zeros(T, K, dtype=torch.int32, device=META)))
reject("ep-combine-y-shape", ValueError, r"y must have shape")(lambda: _ep_combine(y_rows=1))
reject("ep-combine-dispatched-type", TypeError, r"dispatched must be what dispatch\(\) returned")(
    lambda: _ep_combine(dispatched=object()))
reject("ep-closed", RuntimeError, r"this ExpertParallel was closed")(_ep_closed)


# ---- the tests -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A one-process gloo group for the ExpertParallel rows (torch.distributed allows one default group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            pytest.skip("another test left a multi-rank default group in this process")
        yield
        return
    store = dist.FileStore(str(tmp_path_factory.mktemp("ep1") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rid", list(REJECT))
def test_reject(rid, request):
    fn, exc, match = REJECT[rid]
    if rid.startswith("ep-") and rid not in ("ep-no-process-group", "ep-world-divides-experts"):
        request.getfixturevalue("one_rank_group")
    with pytest.raises(exc, match=match):
        fn()


def _assert_same(got, want, where="result"):
    if isinstance(got, (tuple, list)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{where}[{i}]")
        return
    assert got.shape == want.shape and got.dtype == want.dtype, f"{where}: {got.shape} {got.dtype}"
    if got.is_cuda and got.is_floating_point() and got.dtype.itemsize > 1:
        # CUDA: split-K atomics (MLA's latent GEMM) sum in any order; a stride bug gives garbage, not rounding
        tol = 1.6e-2 if got.dtype in (torch.bfloat16, torch.float16) else 1e-5
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=f"{where}: differs from the plain input's")
    else:
        assert torch.equal(got, want), f"{where}: differs from the result on the plain input"


@pytest.mark.parametrize("rid", list(ACCEPT))
def test_accept(rid):
    # the kernels: on CUDA where there is a GPU (CPU tensors there would take the reference), else the interpreter
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        got, want = ACCEPT[rid]()
    _assert_same(got, want)


def test_value_checks_can_be_turned_off(monkeypatch):
    """MOE_KERNELS_VALUE_CHECKS=0 skips the checks that read tensor values (documented: a NaN logit then gives
    NaN weights instead of a ValueError); checks of shapes and host values stay."""
    x = nan_at(x_(), (2, 7))
    monkeypatch.setenv("MOE_KERNELS_VALUE_CHECKS", "0")
    weights, _, _ = mk.ops.route(x, w_(), 2)
    assert torch.isnan(weights[2]).all() and torch.isfinite(weights[[0, 1, 3, 4, 5]]).all()
    with pytest.raises(ValueError, match="routed_scaling_factor must be finite"):
        mk.ops.route(x, w_(), 2, routed_scaling_factor=math.inf)
    with pytest.raises(ValueError, match="topk_ids must have one row per token"):
        mk.ops.permute(x, ids_(t=T - 1), E)


def test_table_lists_every_row():
    """docs/bad_input.md names every row id of this file, and every id it names has a test here."""
    text = DOC.read_text()
    named = set(re.findall(r"`((?:reject|accept):[A-Za-z0-9_\-]+)`", text))
    ours = {f"reject:{r}" for r in REJECT} | {f"accept:{r}" for r in ACCEPT}
    assert not ours - named, f"rows missing from docs/bad_input.md: {sorted(ours - named)}"
    assert not named - ours, f"docs/bad_input.md names rows without a test: {sorted(named - ours)}"
