"""Fused routing: router GEMM + scoring + (group-limited) top-k + renormalisation + per-expert counts.

One program owns BLOCK_M tokens and all E experts (E padded to a power of two, padding scored -inf): the
[BLOCK_M, E] logits never leave registers, and the block's per-expert histogram is added to ``counts`` with
one atomic per expert. A row whose logits are not all finite gets NaN weights (the wrapper turns that into a
ValueError when value checks are on).
"""
from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from .. import reference
from .._checks import (
    check_choice, check_finite, check_number, check_routing_args, check_tensor, value_checks_enabled,
)
from ._common import arrival_counters, pdl_kwargs, pdl_start, use_triton
from .quant import UPCAST_DOT

__all__ = ["route"]

_SCORINGS = ("softmax", "sigmoid")
MAX_EXPERTS = 256
MAX_TOP_K = 8


@triton.jit
def _argmax_low(v, avail, cols, BLOCK_N: tl.constexpr):
    """Row-wise max over the available columns and the lowest such column holding it (ties to the lower index)."""
    mx = tl.max(tl.where(avail, v, float("-inf")), axis=1)
    idx = tl.min(tl.where(avail & (v == mx[:, None]), cols[None, :], BLOCK_N), axis=1)
    return mx, idx


@triton.jit
def _route_kernel(
    x_ptr, w_ptr, bias_ptr, escale_ptr, weights_ptr, ids_ptr, counts_ptr, ws_ptr, sem_ptr,
    T, H, E, group_size, stride_xm, stride_we, routed_scaling_factor,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, SIGMOID: tl.constexpr, N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ESCALE: tl.constexpr,
    NORM: tl.constexpr, FP32_DOT: tl.constexpr, EVEN_K: tl.constexpr, GROUPS_AS_AXIS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr = 1,
    E_SPLIT: tl.constexpr = 1, PDL: tl.constexpr = False,
):
    pdl_start(PDL)  # before any load (ops/_common.pdl)
    # SPLIT_K x E_SPLIT > 1: that many programs share a token tile, each multiplying one slice of H (SPLIT_K) for
    # one block of BLOCK_E // E_SPLIT experts (E_SPLIT); each stores its partial logits in the workspace
    # ws [tiles, SPLIT_K, BLOCK_M, BLOCK_E] and counts itself in the tile's semaphore; the last to arrive adds the
    # partials in slice order (the same logits whichever arrives last) and runs the rest.
    # More programs than token tiles: at T = 4096 and 64-token tiles, 64 programs leave half of 132 SMs idle; at
    # T = 1 one program per slice of H would stream the whole width of the gate (E rows) alone.
    PARTS: tl.constexpr = SPLIT_K * E_SPLIT
    BLOCK_EB: tl.constexpr = BLOCK_E // E_SPLIT  # experts of one program's product
    pid = tl.program_id(0).to(tl.int64)
    split = 0
    eb = 0
    if PARTS > 1:
        split = pid % SPLIT_K
        eb = (pid // SPLIT_K) % E_SPLIT
        pid = pid // PARTS
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_E)
    gcols = eb * BLOCK_EB + tl.arange(0, BLOCK_EB)  # this program's experts
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = offs_m < T
    col_mask = cols < E
    gcol_mask = gcols < E
    neg_inf = float("-inf")

    # router GEMM [BLOCK_M, H] x [H, BLOCK_EB], fp32 accumulation. Mixed or fp32 inputs multiply in fp32 with
    # IEEE products (no tf32), so the logits are those of x.float() @ w.float().t().
    acc = tl.zeros((BLOCK_M, BLOCK_EB), dtype=tl.float32)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + gcols[:, None] * stride_we + offs_k[None, :]
    k_lo = 0
    k_hi = H
    if SPLIT_K > 1:  # this program's slice of H: whole BLOCK_K steps
        k_per = tl.cdiv(tl.cdiv(H, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = split * k_per
        k_hi = tl.minimum(H, k_lo + k_per)
        x_ptrs += k_lo
        w_ptrs += k_lo
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            xb = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
            wb = tl.load(w_ptrs, mask=gcol_mask[:, None], other=0.0)
        else:
            k_mask = (k0 + offs_k) < H
            xb = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            wb = tl.load(w_ptrs, mask=gcol_mask[:, None] & k_mask[None, :], other=0.0)
        if BLOCK_M < 16:  # decode sizes: a GEMV on the FMA units (tl.dot pads M to 16: 16x the work at T = 1)
            acc += tl.sum(xb.to(tl.float32)[:, None, :] * wb.to(tl.float32)[None, :, :], axis=2)
        elif FP32_DOT:
            acc += tl.dot(xb.to(tl.float32), tl.trans(wb.to(tl.float32)), input_precision="ieee")
        elif UPCAST_DOT:  # the interpreter's bf16 dot is wrong; fp32 products of bf16 inputs are exact anyway
            acc += tl.dot(xb.to(tl.float32), tl.trans(wb.to(tl.float32)))
        else:
            acc += tl.dot(xb, tl.trans(wb))
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if PARTS > 1:
        tile = ws_ptr + pid * (SPLIT_K * BLOCK_M * BLOCK_E)
        rows_at = tl.arange(0, BLOCK_M)[:, None] * BLOCK_E
        tl.store(tile + split * (BLOCK_M * BLOCK_E) + rows_at + gcols[None, :], acc)
        tl.debug_barrier()  # every thread's partial is written before the release below
        if tl.atomic_add(sem_ptr + pid, 1, sem="acq_rel") != PARTS - 1:
            return
        tl.store(sem_ptr + pid, 0)  # every part has arrived: the counter is left at 0 for the next launch
        acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)  # every expert's logits (one part: acc has them)
        for s in tl.static_range(SPLIT_K):  # slice order: the logits do not depend on who arrived last
            acc += tl.load(tile + s * (BLOCK_M * BLOCK_E) + rows_at + cols[None, :], cache_modifier=".cg")

    # a row with a NaN/inf logit is routed as if its logits were 0, and its weights are poisoned with NaN below
    finite = (acc == acc) & (tl.abs(acc) != float("inf"))
    row_bad = tl.max(tl.where(col_mask[None, :] & ~finite, 1, 0), axis=1) > 0
    logits = tl.where(row_bad[:, None], 0.0, acc)
    logits = tl.where(col_mask[None, :], logits, neg_inf)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    else:
        mx = tl.max(logits, axis=1)
        p = tl.exp(logits - mx[:, None])
        scores = p / tl.sum(p, axis=1)[:, None]
    scores = tl.where(col_mask[None, :], scores, 0.0)

    # selection score: balancing terms move the choice, never the weights
    choice = scores
    if HAS_ESCALE:
        choice = choice * tl.load(escale_ptr + cols, mask=col_mask, other=1.0)[None, :]
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + cols, mask=col_mask, other=0.0)[None, :]
    avail = tl.broadcast_to(col_mask[None, :], (BLOCK_M, BLOCK_E))

    if N_GROUP > 1:
        # groups ranked by the sum of their best two selection scores; the TOPK_GROUP best are kept
        gcols = tl.arange(0, G_PAD)
        if GROUPS_AS_AXIS:  # E == BLOCK_E, power-of-two groups: one reduction per step over a [M, G, E/G] view
            GS: tl.constexpr = BLOCK_E // N_GROUP
            lane = tl.arange(0, GS)
            grouped = tl.reshape(choice, (BLOCK_M, N_GROUP, GS))
            best = tl.max(grouped, axis=2)
            first = tl.min(tl.where(grouped == best[:, :, None], lane[None, None, :], GS), axis=2)
            second = tl.max(tl.where(lane[None, None, :] == first[:, :, None], neg_inf, grouped), axis=2)
            gscore = best + second
        else:
            col_group = tl.where(col_mask, cols // group_size, N_GROUP)
            gscore = tl.full((BLOCK_M, G_PAD), neg_inf, tl.float32)
            for g in tl.static_range(N_GROUP):
                in_g = avail & (col_group == g)[None, :]
                best, best_idx = _argmax_low(choice, in_g, cols, BLOCK_E)
                second, _ = _argmax_low(choice, in_g & (cols[None, :] != best_idx[:, None]), cols, BLOCK_E)
                gscore = tl.where(gcols[None, :] == g, (best + second)[:, None], gscore)
        g_avail = tl.broadcast_to((gcols < N_GROUP)[None, :], (BLOCK_M, G_PAD))
        keep = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            _, gi = _argmax_low(gscore, g_avail, gcols, G_PAD)
            g_avail = g_avail & (gcols[None, :] != gi[:, None])
            if not GROUPS_AS_AXIS:
                keep = keep | (col_group[None, :] == gi[:, None])
        if GROUPS_AS_AXIS:
            kept = ~g_avail  # [M, G]: the chosen groups, spread back over their experts
            keep = tl.reshape(tl.broadcast_to(kept[:, :, None], (BLOCK_M, N_GROUP, GS)), (BLOCK_M, BLOCK_E))
        choice = tl.where(keep, choice, neg_inf)

    # top-k by repeated argmax: descending selection score, ties to the lower expert index
    kcols = tl.arange(0, K_PAD)
    top_w = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_M, K_PAD), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        _, idx = _argmax_low(choice, avail, cols, BLOCK_E)
        hit = cols[None, :] == idx[:, None]
        w = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        top_w = tl.where(kcols[None, :] == j, w[:, None], top_w)
        top_i = tl.where(kcols[None, :] == j, idx[:, None], top_i)
        avail = avail & ~hit
    if NORM:
        top_w = top_w / (tl.sum(top_w, axis=1)[:, None] + 1e-20)
    top_w = top_w * routed_scaling_factor
    top_w = tl.where(row_bad[:, None], float("nan"), top_w)

    out_mask = row_mask[:, None] & (kcols[None, :] < TOP_K)
    out_offs = offs_m[:, None] * TOP_K + kcols[None, :]
    tl.store(weights_ptr + out_offs, top_w, mask=out_mask)
    tl.store(ids_ptr + out_offs, top_i, mask=out_mask)

    # the chosen experts are exactly the valid columns no longer available: one atomic per expert per block
    chosen = col_mask[None, :] & ~avail & row_mask[:, None]
    block_counts = tl.sum(chosen.to(tl.int32), axis=0)
    tl.atomic_add(counts_ptr + cols, block_counts, mask=col_mask & (block_counts > 0))


def _cfg(m: int, k: int, w: int, s: int) -> dict:
    return dict(BLOCK_M=m, BLOCK_K=k, num_warps=w, num_stages=s)


# Block sizes keyed by (E padded to a power of two, H >= 4096): rows of (largest T, config for a light epilogue
# (top_k <= 2, no groups), config for a heavy one); the last row takes any larger T. The E=256 rows come from the
# H100 sweep of `bench/bench_routing.py --sweep` at H=7168 (bench/results/routing-NVIDIA_H100_80GB_HBM3.json):
# 16 warps halve the per-thread epilogue of k=8 / group-limited routing (1.4-1.5x faster there). Other entries are
# untuned defaults. Decode sizes (T <= 64: at most 4 token tiles) split K over 16 programs per tile (SPLIT_K, see
# _route_kernel): one program per tile streamed the whole gate alone, 61-70 us at T = 1 and 8 (E 256, k 8, groups
# 8/4, H 7168, H100, CUDA graph, 2026-12-07); 16 slices of BLOCK_K 64 took 31-32 us there (4: 36-39, 56: 36-37).
# The other E take the same split by the same reasoning, not timed. SPLIT_K 0: ``_fill_split`` picks it from T (16
# at T <= 64). Tables without a sweep use these tiles up to T = 1024 too: their former 16-row tiles without a split
# were 5-64 programs there, each streaming the whole gate over all of H (Mixtral-like E 8 at T = 128: 8 programs on
# 8 SMs), and at E 128 their 128-wide steps spilled 4.9-7.9 KB on sm_90a (these: none). Mixtral-like T = 128 / 256
# on one H100 (bench/probe_route.py --case mixtral, results/route_probe-mixtral-*.json): 6.3 / 7.6 us, the former
# unsplit tiles 19.3 / 19.3 us in the same run.
_SPLIT_DECODE = dict(BLOCK_M=16, BLOCK_K=64, num_warps=4, num_stages=3, SPLIT_K=0)
_CONFIGS = {
    (256, True): [(64, _SPLIT_DECODE, _SPLIT_DECODE),
                  (1024, _cfg(16, 128, 4, 4), _cfg(16, 128, 4, 4)),
                  (8192, _cfg(64, 64, 8, 4), _cfg(64, 64, 16, 4)),
                  (None, _cfg(128, 64, 16, 3), _cfg(64, 64, 16, 4))],
}
_DEFAULT = [(1024, _SPLIT_DECODE, _SPLIT_DECODE),
            (None, _cfg(64, 64, 8, 3), _cfg(64, 64, 8, 3))]


GEMV_MAX_T = 4  # up to this many tokens the router multiplies as a GEMV (BLOCK_M = T rounded up to a power of 2)
GEMV_EXPERTS = 32  # experts a GEMV program multiplies (E_SPLIT = BLOCK_E / 32 programs cover the gate's rows)
GEMV_SLICES = 32  # most slices of H a GEMV splits into


def _gemv_config(T: int, E: int) -> dict:
    """T <= GEMV_MAX_T: BLOCK_M = T (power of 2); each program multiplies a block of <= 32 experts' rows over one
    256-wide step of H (E_SPLIT x SPLIT_K programs a token tile, one load each), its [BLOCK_M, experts, 256]
    product held at <= 16K fp32 values (128 a thread at 4 warps; at T = 4, 16 experts a program): the whole gate is
    in flight at once (E 256, H 7168: 8 x 28 programs of 16 KB at T = 1) instead of a few programs streaming it.
    `bench/probe_route.py`, H100, E 256, top-8, groups 8/4, bf16 gate, CUDA graph (2026-12-07, seventh session):
    T = 1 / 2 / 4 12.1 / 13.0 / 15.5 us, where the former rule (every expert in each of 32 programs, 8 steps of
    BLOCK_K 32) took 23.0 / 37.1 / 45.7; at T = 4, 32 experts over 128 columns took 25.7. An fp32 gate takes the
    same rule: the product is fp32 either way, and its loads go to registers, not shared memory."""
    m, e = _next_pow2(T), _next_pow2(E, 16)
    eb = max(16, min(e, GEMV_EXPERTS, 16384 // (m * 256)))
    k = max(16, min(16384 // (m * eb), 256))
    return dict(BLOCK_M=m, BLOCK_K=k, num_warps=4, num_stages=2, SPLIT_K=GEMV_SLICES, E_SPLIT=e // eb)


ROUTE_PROGRAMS = 128  # about one wave of programs on a Hopper GPU (132 SMs): what a SPLIT_K 0 config aims at


def _fill_split(T: int, block_m: int) -> int:
    """K slices a token tile takes so that the tiles x slices programs come near ROUTE_PROGRAMS (at most 16)."""
    return max(1, min(16, ROUTE_PROGRAMS // triton.cdiv(T, block_m)))


def _config(T: int, E: int, H: int, fp32: bool, heavy: bool) -> dict:
    if T <= GEMV_MAX_T:
        return cap_split(_gemv_config(T, E), H, min_steps=1)
    for max_t, light_cfg, heavy_cfg in _CONFIGS.get((_next_pow2(E, 16), H >= 4096), _DEFAULT):
        if max_t is None or T <= max_t:
            cfg = dict(heavy_cfg if heavy else light_cfg)
            break
    if cfg.get("SPLIT_K") == 0:
        cfg["SPLIT_K"] = _fill_split(T, cfg["BLOCK_M"])
    if fp32:  # twice the bytes per tile: keep the pipeline inside shared memory
        cfg.update(BLOCK_K=32, num_stages=2)
    return cap_split(cfg, H)


def cap_split(cfg: dict, H: int, min_steps: int = 2) -> dict:
    """``cfg`` with SPLIT_K lowered so that each slice has whole BLOCK_K steps, at least ``min_steps`` (a short H
    splits less), and no slice is left empty (the steps spread over as few slices as the same steps a slice
    need)."""
    if cfg.get("SPLIT_K", 1) > 1:
        steps = triton.cdiv(H, cfg["BLOCK_K"])
        split = max(1, min(cfg["SPLIT_K"], steps // min_steps))
        cfg["SPLIT_K"] = triton.cdiv(steps, triton.cdiv(steps, split))
    return cfg


def _next_pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(n))


def _route_triton(x, w, top_k, scoring, n_group, topk_group, norm, scaling, bias, escale, config=None):
    T, H = x.shape
    E = w.shape[0]
    weights = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=x.device)
    if T == 0:
        return weights, ids, torch.zeros(E, dtype=torch.int32, device=x.device)
    fp32_dot = x.dtype != w.dtype or x.dtype == torch.float32
    cfg = dict(config or _config(T, E, H, fp32_dot, heavy=top_k > 2 or n_group > 1))
    BLOCK_E = _next_pow2(E, 16)
    split = int(cfg.pop("SPLIT_K", 1))
    e_split = int(cfg.pop("E_SPLIT", 1))
    if split < 1:
        raise ValueError(f"route config: SPLIT_K must be >= 1 (0 is _config's, resolved from T), got {split}")
    if e_split < 1 or BLOCK_E % e_split or BLOCK_E // e_split < 16:
        raise ValueError(f"route config: E_SPLIT must divide BLOCK_E={BLOCK_E} into blocks of >= 16 experts, "
                         f"got {e_split}")
    parts = split * e_split
    tiles = triton.cdiv(T, cfg["BLOCK_M"])
    # the counts and (split-K) one arrival counter per token tile, zeroed by one fill: at decode sizes each
    # kernel of the step costs microseconds, a fill included; the counters are left at zero by the kernel
    zeroed = arrival_counters(x.device, E + (tiles if parts > 1 else 0))
    counts, sem = zeroed[:E], zeroed[E:]
    if parts > 1:  # the partial logits' workspace
        ws = torch.empty(tiles * split * cfg["BLOCK_M"] * BLOCK_E, dtype=torch.float32, device=x.device)
    else:
        ws, sem = weights, counts  # unused
    grid = (tiles * parts,)
    _route_kernel[grid](
        x, w, bias if bias is not None else counts, escale if escale is not None else counts,
        weights, ids, counts, ws, sem, T, H, E, E // n_group, x.stride(0), w.stride(0), float(scaling),
        TOP_K=top_k, K_PAD=_next_pow2(top_k, 2), SIGMOID=scoring == "sigmoid", N_GROUP=n_group,
        TOPK_GROUP=topk_group, G_PAD=_next_pow2(n_group, 2), HAS_BIAS=bias is not None,
        HAS_ESCALE=escale is not None, NORM=norm, FP32_DOT=fp32_dot, EVEN_K=H % cfg["BLOCK_K"] == 0,
        GROUPS_AS_AXIS=n_group > 1 and E == BLOCK_E and n_group == _next_pow2(n_group), BLOCK_E=BLOCK_E,
        SPLIT_K=split, E_SPLIT=e_split, **cfg, **pdl_kwargs(x.device),
    )
    return weights, ids, counts


@torch.library.custom_op("moe_kernels::route", mutates_args=())
def _route_op(
    x: torch.Tensor, router_weight: torch.Tensor, top_k: int, scoring: str, n_group: int, topk_group: int,
    norm_topk_prob: bool, routed_scaling_factor: float, bias: torch.Tensor | None,
    expert_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (top_k, scoring, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
    if use_triton(x):
        b = bias.float().contiguous() if bias is not None else None
        s = expert_scale.float().contiguous() if expert_scale is not None else None
        x = x if x.stride(-1) == 1 else x.contiguous()
        w = router_weight if router_weight.stride(-1) == 1 else router_weight.contiguous()
        return _route_triton(x, w, *args, b, s)
    return reference.route(x, router_weight, *args, bias, expert_scale)


@_route_op.register_fake
def _(x, router_weight, top_k, scoring, n_group, topk_group, norm_topk_prob, routed_scaling_factor, bias,
      expert_scale):
    T, E = x.shape[0], router_weight.shape[0]
    return (x.new_empty(T, top_k, dtype=torch.float32), x.new_empty(T, top_k, dtype=torch.int32),
            x.new_empty(E, dtype=torch.int32))


def _route_setup(ctx, inputs, output):
    x, router_weight, _, scoring, _, _, norm_topk_prob, routed_scaling_factor, _, _ = inputs
    ctx.set_materialize_grads(False)  # ids and counts have no gradient: no zero-filled stand-ins for theirs
    ctx.save_for_backward(x, router_weight, output[1])
    ctx.rule = (scoring, norm_topk_prob, routed_scaling_factor)


_MM_FP32_OUT_FAILED: list[str] = []  # set once if torch.mm(..., out_dtype=torch.float32) is missing here


def _logits_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The router logits x @ w^T in fp32, as the kernel computed them: 16-bit operands multiply exactly and
    accumulate in fp32 (the same numbers up to summation order). On CUDA, when x and w share a 16-bit dtype, one
    tensor-core GEMM with an fp32 output (``torch.mm(..., out_dtype=torch.float32)``: no fp32 copies of x and w,
    no fp32 SIMT GEMM); elsewhere the reference's fp32 copies."""
    if x.is_cuda and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16) and not _MM_FP32_OUT_FAILED:
        try:
            return torch.mm(x, w.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError) as e:  # a torch without mm's out_dtype
            _MM_FP32_OUT_FAILED.append(repr(e))
            warnings.warn(f"moe_kernels: torch.mm(..., out_dtype=torch.float32) failed ({type(e).__name__}: "
                          f"{str(e)[:200]}); the router's backward recomputes its logits from fp32 copies",
                          stacklevel=2)
    return reference.router_logits(x, w)


def _route_backward(ctx, grad_weights, _grad_ids, _grad_counts):
    """The weights' gradient for x and the gate (the choice itself, ids and counts, has none). The logits again
    (fp32, ``_logits_fp32``); the weights' rule on them differentiated by torch on [T, E] (small); then the two
    GEMMs dX = dL W and dW = dL^T X. When x and the gate share a 16-bit dtype these run on tensor cores with dL
    rounded to that dtype and fp32 accumulation, the results in x's / the gate's dtype (what a bf16 linear layer's
    backward does: no fp32 copy of x, no fp32 [T, H] gradient cast back); an fp32 or mixed-dtype gate keeps fp32
    GEMMs, as its forward does. Off the kernel path (CPU reference), or with MOE_KERNELS_ROUTER_BWD=fp32 (read at
    each call: the earlier formulation, for A/B timings), all in fp32 with fp32 copies of x and the gate."""
    none = (None,) * 8
    need_x, need_w = ctx.needs_input_grad[:2]
    if grad_weights is None or not (need_x or need_w):
        return None, None, *none
    x, router_weight, ids = ctx.saved_tensors
    scoring, norm, scaling = ctx.rule
    fast = use_triton(x) and os.environ.get("MOE_KERNELS_ROUTER_BWD", "") != "fp32"
    logits = _logits_fp32(x, router_weight) if fast else reference.router_logits(x, router_weight)
    logits = logits.detach().requires_grad_()
    with torch.enable_grad():
        weights = reference.expert_weights(reference.expert_scores(logits, scoring), ids, norm, scaling)
        (dlogits,) = torch.autograd.grad(weights, logits, grad_weights.float())
    gx = gw = None
    if fast and x.dtype == router_weight.dtype and x.dtype != torch.float32:
        d = dlogits.to(x.dtype)
        if need_x:
            gx = d @ router_weight
        if need_w:
            gw = d.t() @ x
    else:
        if need_x:
            gx = (dlogits @ router_weight.float()).to(x.dtype)
        if need_w:
            gw = (dlogits.t() @ x.float()).to(router_weight.dtype)
    return gx, gw, *none


_route_op.register_autograd(_route_backward, setup_context=_route_setup)


def route(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    bias: torch.Tensor | None = None,
    expert_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose top_k experts per token (see ``moe_kernels.reference.routing`` for the exact rule).

    Args:
        x: [T, H] bf16/fp16/fp32 tokens. router_weight: [E, H] gate matrix, E <= 256 (any E; a power of two or
            a multiple of 16 is what the kernel is tuned for).
        top_k: 1..min(8, E). scoring: "softmax" or "sigmoid". n_group/topk_group: group-limited selection.
        bias: [E] selection bias (DeepSeek-V3's e_score_correction_bias). expert_scale: [E] selection
            multiplier (the "adaptive" balancing rule). Both change the choice, never the weights.
    Returns:
        topk_weights fp32 [T, k], topk_ids int32 [T, k] (descending selection score), counts int32 [E].
    Raises:
        ValueError when a router logit is NaN or inf (checked when value checks are enabled; otherwise such a
        row gets NaN weights).
    """
    floats = (torch.bfloat16, torch.float16, torch.float32)
    check_tensor("x", x, dtype=floats, ndim=2)
    check_tensor("router_weight", router_weight, dtype=floats, ndim=2, device=x.device)
    T, H = x.shape
    E = router_weight.shape[0]
    if router_weight.shape[1] != H:
        raise ValueError(f"router_weight must have shape [E, {H}] to match x, got {list(router_weight.shape)}")
    if E > MAX_EXPERTS:
        raise ValueError(f"router_weight has {E} experts; route supports at most {MAX_EXPERTS}")
    check_routing_args(E, top_k, n_group, topk_group)
    if top_k > MAX_TOP_K:
        raise ValueError(f"top_k must be <= {MAX_TOP_K}, got {top_k}")
    check_choice("scoring", scoring, _SCORINGS)
    for name, t in (("bias", bias), ("expert_scale", expert_scale)):
        if t is not None:
            check_tensor(name, t, dtype=floats, shape=(E,), device=x.device)
    routed_scaling_factor = check_number("routed_scaling_factor", routed_scaling_factor)
    checks = T > 0 and value_checks_enabled(x)
    if checks:
        # a NaN selection term makes the kernel's argmax pick no valid expert (ids outside [0, E) downstream);
        # +inf makes NaN of group sums (inf - inf) and of scale * score (inf * 0). A -inf bias masks an expert out.
        if bias is not None:
            check_finite("bias", bias, allow_neg_inf=True)
        if expert_scale is not None:
            check_finite("expert_scale", expert_scale)
    if checks and not use_triton(x):  # the reference path: inspect the inputs (CPU, cheap)
        if not (torch.isfinite(x).all() and torch.isfinite(router_weight).all()):
            raise ValueError("router logits are non-finite: x or router_weight holds NaN or inf")
    out = _route_op(x, router_weight, top_k, scoring, n_group, topk_group, bool(norm_topk_prob),
                    float(routed_scaling_factor), bias, expert_scale)
    if checks and use_triton(x) and not bool(torch.isfinite(out[0]).all()):
        bad = int((~torch.isfinite(out[0])).any(1).nonzero()[0, 0])
        raise ValueError(f"router logits are non-finite (NaN or inf) for token {bad}: check x and router_weight")
    return out
