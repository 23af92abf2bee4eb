"""Grouped GEMMs over expert-grouped rows: FP8 with DeepSeek-V3 block scales, or bf16; the fused SwiGLU expert MLP.

out[r, :] = A[r, :] @ W[e]^T for the rows r of expert e (offsets[e] <= r < offsets[e+1]).

One kernel, specialised by constexpr switches (no copy per dtype or layout):
  * FP8: A e4m3 with fp32 scales per 1x128 group, W e4m3 with fp32 scales per 128x128 block. BLOCK_K = 128, so
    each K step is one tensor-core product (tl.dot on e4m3: QGMMA on Hopper) that is scaled by the A scale of its
    row and the W scale of its column block and added to an fp32 accumulator.
  * SWIGLU: W holds [gate; up] (2I rows); a program computes the gate tile and the up tile of the same columns
    (two accumulators) and writes silu(gate) * up. With QUANT_OUT it re-quantises that to e4m3 with 1x128 scales
    (BLOCK_N = 128 is one scale group), so the down projection reads FP8 at once: no bf16 intermediate in memory.
  * PAIR_N: a program of the plain GEMM computes two adjacent BLOCK_N column tiles with two accumulators (the
    SwiGLU kernel's shape, 16 warps = four warpgroups): one warpgroup's fp32 promotion overlaps the others'
    tensor-core products, and each K step's A tile feeds twice the columns.
  * ROW_WEIGHT: each output row is multiplied by a per-row weight (the routing weight, in permuted order).
  * MASKED: the decode layout, A [E, max_m, K] with the valid rows of each expert in ``masked_m`` on the device;
    the grid depends on shapes only, so a decode step can be captured in a CUDA graph.
  * USE_TMA: operands come through TMA tensor descriptors (Hopper, never in the interpreter) instead of pointers.
  * WGMMA (a config key, not a switch of this kernel): FP8 configs that set it run
    ``grouped_gemm_wgmma``, the Gluon kernel for sm_90 that overlaps each K step's promotion with the next
    step's tensor-core product; elsewhere (interpreter, other GPUs, Triton without Gluon) this kernel runs. Its own
    keys: UNROLL, WS (a loader warp) and PERSISTENT (n programs per SM walking the tiles), ignored here.
  * NO_SCALE: a timing probe for bench/probe_grouped_gemm.py only (no config sets it): the FP8 products are
    chained without their scales, so the results are wrong; it bounds what the per-K promotion costs.

No host sync: each program finds its (expert, row tile, column tile) from ``offsets`` on the device (a prefix sum
of the per-expert tile counts). The grid covers the upper bound cdiv(M, BLOCK_M) + E row tiles and programs past
the real count return at once. Row tiles are ordered in groups of GROUP_M that sweep the column tiles together,
so the W tiles of one expert are reused from L2.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch
import triton
import triton.language as tl

from .. import reference
from .._checks import FP8_DTYPE, check_multiple, check_tensor, value_checks_enabled
from ._common import interpret_mode, use_triton
from . import grouped_gemm_decode
from .grouped_gemm_decode import _dot_16_32
from .grouped_gemm_configs import get_config
from .quant import AMAX_FLOOR, E4M3_MAX, group_amax, quantize_fp8, to_e4m3_rne

try:  # host-side TMA descriptors (Triton >= 3.4): kernel arguments lowered to CUtensorMap
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None
try:  # the Hopper kernel in Gluon (Triton >= 3.5): configs with WGMMA=1 run it on sm_90
    from . import grouped_gemm_wgmma
except ImportError:  # pragma: no cover - Triton without Gluon: every config runs the Triton kernel
    grouped_gemm_wgmma = None
try:  # the bf16 / fp16 Hopper kernel in Gluon (MOE_KERNELS_BF16_GLUON=0: off; see _bf16_gluon_usable)
    from . import grouped_gemm_bf16_wgmma
except ImportError:  # pragma: no cover - Triton without Gluon: the Triton kernel
    grouped_gemm_bf16_wgmma = None

__all__ = ["grouped_gemm_fp8", "grouped_gemm_bf16", "grouped_gemm_fp8_masked", "expert_mlp", "expert_mlp_fp8_ste",
           "expert_mlp_fp8_train", "expert_mlp_train", "grouped_wgrad"]

SCALE_BLOCK = 128  # the K (and weight N) extent of one FP8 scale
_SB = tl.constexpr(SCALE_BLOCK)  # the same, for the kernel


@triton.jit
def _tile_schedule(pid, M, N, E, max_m, offsets_ptr, masked_m_ptr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, E_PAD: tl.constexpr):
    """Program id -> (expert, first row, end row of the expert's rows, column tile); first >= end: nothing to do.

    BLOCK_N is the columns one program covers (both tiles of a PAIR_N program). ``grouped_gemm_wgmma._schedule``
    computes the same schedule in Gluon (which cannot call this function): change both together."""
    num_n = tl.cdiv(N, BLOCK_N)
    if MASKED:
        tiles_per_e = tl.cdiv(max_m, BLOCK_M)
        num_m = E * tiles_per_e
    else:
        num_m = tl.cdiv(M, BLOCK_M) + E  # upper bound: every expert may end in a partial tile
    # GROUP_M consecutive row tiles sweep the column tiles together: their W tiles stay in L2
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    tile_m = first_m + (pid % in_group) % group_rows
    tile_n = (pid % in_group) // group_rows
    if MASKED:
        expert = tile_m // tiles_per_e
        slot = expert.to(tl.int64) * max_m
        row_start = slot + (tile_m % tiles_per_e) * BLOCK_M
        row_end = slot + tl.load(masked_m_ptr + expert)
    else:
        e_idx = tl.arange(0, E_PAD)
        e_mask = e_idx < E
        lo = tl.load(offsets_ptr + e_idx, mask=e_mask, other=0)
        hi = tl.load(offsets_ptr + e_idx + 1, mask=e_mask, other=0)
        tiles = tl.where(e_mask, (hi - lo + BLOCK_M - 1) // BLOCK_M, 0)
        ends = tl.cumsum(tiles, axis=0)
        # the expert owning row tile tile_m: how many experts' tiles end at or before it (empty experts included)
        expert = tl.sum((ends <= tile_m).to(tl.int32), axis=0)
        mine = e_idx == expert  # all false past the last real tile: row_end = 0 below
        first_tile = tl.sum(tl.where(mine, ends - tiles, 0), axis=0)
        row_start = tl.sum(tl.where(mine, lo, 0), axis=0).to(tl.int64) + (tile_m - first_tile) * BLOCK_M
        row_end = tl.sum(tl.where(mine, hi, 0), axis=0).to(tl.int64)
    return expert, row_start, row_end, tile_n


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, a_desc, a_scale_ptr, w_ptr, w_desc, w_scale_ptr, offsets_ptr, masked_m_ptr, row_weight_ptr,
    out_ptr, out_scale_ptr,
    M, N, K, E, max_m,
    w_rows,  # rows of W per expert (N, or 2I with SWIGLU)
    up_row,  # SWIGLU: the row of W where the "up" half starts (I)
    stride_am, stride_asm, stride_ask, stride_we, stride_wn, stride_wk, stride_wse, stride_wsn, stride_wsk,
    stride_om, stride_osm,
    FP8: tl.constexpr, SWIGLU: tl.constexpr, QUANT_OUT: tl.constexpr, ROW_WEIGHT: tl.constexpr,
    MASKED: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    E_PAD: tl.constexpr, PAIR_N: tl.constexpr = 0, NO_SCALE: tl.constexpr = 0,
):
    pid = tl.program_id(0)
    # DUAL: a second accumulator, for the "up" half of W (SWIGLU) or for the next BLOCK_N columns (PAIR_N)
    DUAL: tl.constexpr = SWIGLU or PAIR_N
    expert, row_start, row_end, tile_n = _tile_schedule(
        pid, M, N, E, max_m, offsets_ptr, masked_m_ptr, MASKED, BLOCK_M, BLOCK_N * (2 if PAIR_N else 1), GROUP_M,
        E_PAD)
    if row_start >= row_end:
        return
    if PAIR_N:
        tile_n = tile_n * 2  # this program's first column tile; the second is tile_n + 1
        up_row = BLOCK_N  # the second tile's W rows start BLOCK_N rows after the first's

    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < row_end
    n_mask = offs_n < N
    # the second tile's columns: the same as the first's with SWIGLU (its W rows are up_row further on)
    u_mask = (offs_n + BLOCK_N < N) if PAIR_N else n_mask
    expert64 = expert.to(tl.int64)

    if USE_TMA:
        # rows past the expert's end (another expert's, or TMA's zero fill) are computed and never stored
        a_row = row_start.to(tl.int32)
        g_row = expert * w_rows + tile_n * BLOCK_N
        u_row = g_row + up_row
    else:
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
        # B operand: a [BLOCK_K, BLOCK_N] view of W's K-contiguous rows (K-major, as FP8 wgmma wants it)
        g_ptrs = w_ptr + expert64 * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        u_ptrs = g_ptrs + up_row * stride_wn
    if FP8:
        as_ptrs = a_scale_ptr + offs_m * stride_asm
        ws_ptr = w_scale_ptr + expert64 * stride_wse
        if BLOCK_N > _SB:  # a tile spans several weight-scale blocks: one scale per column
            gs_ptrs = ws_ptr + (offs_n // _SB) * stride_wsn
            us_ptrs = ws_ptr + ((offs_n + up_row) // _SB) * stride_wsn
        else:
            gs_ptrs = ws_ptr + (tile_n * BLOCK_N // _SB) * stride_wsn
            # PAIR_N past the last column: any in-range scale will do (those columns are never stored)
            us_blk = (tile_n * BLOCK_N + up_row) // _SB
            if PAIR_N:
                us_blk = tl.minimum(us_blk, (N - 1) // _SB)
            us_ptrs = ws_ptr + us_blk * stride_wsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the second accumulator; unused without DUAL
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if USE_TMA:
            a = a_desc.load([a_row, kb * BLOCK_K])
            g = w_desc.load([g_row, kb * BLOCK_K]).T
            if DUAL:
                u = w_desc.load([u_row, kb * BLOCK_K]).T
        else:
            if EVEN_K:
                a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
                g = tl.load(g_ptrs, mask=n_mask[None, :], other=0.0)
                if DUAL:
                    u = tl.load(u_ptrs, mask=u_mask[None, :], other=0.0)
            else:
                k_mask = (kb * BLOCK_K + offs_k) < K
                a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                g = tl.load(g_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                if DUAL:
                    u = tl.load(u_ptrs, mask=k_mask[:, None] & u_mask[None, :], other=0.0)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K * stride_wk
            u_ptrs += BLOCK_K * stride_wk
        if FP8 and NO_SCALE:  # timing probe only (bench/probe_grouped_gemm.py): no promotion, no scales; wrong results
            acc = tl.dot(a, g, acc)
            if DUAL:
                acc_u = tl.dot(a, u, acc_u)
        elif FP8:
            # one K step = one scale block: promote the product to fp32 with its scales, then accumulate
            sa = tl.load(as_ptrs + kb * stride_ask, mask=m_mask, other=0.0)
            if BLOCK_N > _SB:
                sg = tl.load(gs_ptrs + kb * stride_wsk, mask=n_mask, other=0.0)[None, :]
            else:
                sg = tl.load(gs_ptrs + kb * stride_wsk)
            acc += tl.dot(a, g) * (sa[:, None] * sg)
            if DUAL:
                if BLOCK_N > _SB:
                    su = tl.load(us_ptrs + kb * stride_wsk, mask=u_mask, other=0.0)[None, :]
                else:
                    su = tl.load(us_ptrs + kb * stride_wsk)
                acc_u += tl.dot(a, u) * (sa[:, None] * su)
        else:
            acc = _dot_16_32(a, g, acc, IEEE, UPCAST)
            if DUAL:
                acc_u = _dot_16_32(a, u, acc_u, IEEE, UPCAST)

    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_u  # silu(gate) * up, in fp32
    if ROW_WEIGHT:
        rw = tl.load(row_weight_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
        acc = acc * rw
        if PAIR_N:
            acc_u = acc_u * rw
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if PAIR_N:
        tl.store(out_ptrs + BLOCK_N, acc_u.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & u_mask[None, :])
    if QUANT_OUT:
        # BLOCK_N == 128: the tile's columns are exactly one 1x128 scale group of each row
        amax = group_amax(tl.where(mask, acc, 0.0), 1)  # NaN in the group: a NaN scale (as the reference)
        scale = tl.div_rn(amax, tl.full(amax.shape, E4M3_MAX, tl.float32))  # IEEE: the reference's scale
        q = to_e4m3_rne(tl.div_rn(acc, tl.broadcast_to(scale[:, None], acc.shape)))
        tl.store(out_ptrs, q.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_scale_ptr + offs_m * stride_osm + tile_n, scale, mask=m_mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# launcher

@functools.lru_cache(maxsize=None)
def _has_tma(index: int) -> bool:
    return TensorDescriptor is not None and hasattr(tl, "make_tensor_descriptor") and \
        torch.cuda.get_device_capability(index)[0] >= 9


def _tma_usable(*tensors: torch.Tensor) -> bool:
    """TMA needs Hopper+, Triton's host descriptors, 16-byte aligned bases and row strides, contiguous rows."""
    if interpret_mode():
        return False
    for t in tensors:
        if not t.is_cuda or not _has_tma(t.device.index if t.device.index is not None else 0):
            return False
        if t.data_ptr() % 16 or t.stride(-1) != 1 or (t.stride(-2) * t.element_size()) % 16:
            return False
    return True


@functools.lru_cache(maxsize=None)
def _is_sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def _wgmma_usable(a, w2d, cfg, swiglu, quant_out) -> bool:
    """The Gluon kernel runs this call: sm_90, TMA-able operands, a tile it builds. Says once why not."""
    if interpret_mode() or not a.is_cuda:
        return False  # the interpreter runs the Triton kernel: expected, nothing to say
    if not _is_sm90(a.device.index if a.device.index is not None else torch.cuda.current_device()):
        return False  # not Hopper: the Triton kernel is this GPU's kernel (the default configs ask for WGMMA)
    if grouped_gemm_wgmma is None:
        why = "this Triton has no Gluon (triton.experimental.gluon)"
    elif not _tma_usable(a, w2d):
        why = "an operand is not 16-byte aligned for TMA"
    elif not grouped_gemm_wgmma.supports(cfg, swiglu, quant_out):
        why = f"the config {cfg} is no tile of the wgmma kernel"
    else:
        return True
    _say_once(f"moe_kernels: a WGMMA grouped GEMM config runs the Triton kernel instead: {why}")
    return False


# the fewest rows per expert (on average) at which the Gluon bf16 kernel runs by default: where it was measured
BF16_GLUON_MIN_ROWS = 256


def _bf16_gluon_usable(a, w, out, swiglu, row_weight) -> bool:
    """Whether the Gluon bf16 / fp16 kernel (``grouped_gemm_bf16_wgmma``) runs this call: on sm_90 where it
    applies and the experts average at least BF16_GLUON_MIN_ROWS rows, unless MOE_KERNELS_BF16_GLUON=0 (then the
    Triton kernel, as on other GPUs); =1: at any row count. On one H100 (tenth session,
    bench/probe_bf16_wgmma.py, Mixtral-like shapes, T = 4096..16384: 256-1024 rows an expert) it ran 1.07-1.28x
    the Triton kernel and 0.97-1.15x torch._grouped_mm (results/bf16_wgmma_probe-*.json); fewer rows (decode
    batches of 64-256 tokens, DeepSeek-V3's 256 experts) have not been timed, and keep the Triton kernel. Says
    once why not where it was asked for (=1)."""
    asked = os.environ.get("MOE_KERNELS_BF16_GLUON", "auto")
    if asked == "0" or interpret_mode() or not a.is_cuda:
        return False
    if asked != "1" and a.shape[0] < BF16_GLUON_MIN_ROWS * w.shape[0]:
        return False
    if not _is_sm90(a.device.index if a.device.index is not None else torch.cuda.current_device()):
        return False  # not Hopper: the Triton kernel is this GPU's kernel
    mod = grouped_gemm_bf16_wgmma
    why = ("this Triton has no Gluon (triton.experimental.gluon)" if mod is None
           else "its launch failed earlier: " + mod.FAILED[0] if mod.FAILED
           else mod.supports(a, w, out, swiglu=swiglu, row_weight=row_weight))
    if why is None:
        return True
    if asked == "1":
        _say_once(f"moe_kernels: MOE_KERNELS_BF16_GLUON=1 but this call runs the Triton kernel: {why}")
    return False


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def _launch(a, a_scale, w, w_scale, out, *, offsets=None, masked_m=None, max_m=0, out_scale=None,
            row_weight=None, swiglu=False, cfg=None):
    """Launch the grouped GEMM on 2-D a [M, K] (masked: [E * max_m, K]) and w [E, w_rows, K].

    Returns the compiled kernel (or None when there is nothing to compute).
    """
    fp8 = a.dtype == FP8_DTYPE
    E, w_rows, K = w.shape
    N = w_rows // 2 if swiglu else w_rows
    M = a.shape[0]
    if M == 0 or N == 0 or E == 0:
        return None
    masked = masked_m is not None
    # the kernel reads offsets[e] / masked_m[e] at unit stride: a strided view (offsets[::2]) is copied first
    offsets = offsets.contiguous() if offsets is not None else None
    masked_m = masked_m.contiguous() if masked else None
    kind = ("fp8" if fp8 else "fp32" if a.dtype == torch.float32 else "bf16") + ("_swiglu" if swiglu else "")
    if cfg is None:
        cfg = get_config(kind, N, K, max_m if masked else M // E, a.device)
    cfg = dict(cfg)
    if cfg.get("DECODE"):  # few rows per expert: the weight-streaming kernel (ops/grouped_gemm_decode.py)
        cfg.setdefault("BLOCK_T", grouped_gemm_decode.block_t_for(max_m if masked else M, 1 if masked else E))
        tma = w.is_contiguous() and _tma_usable(a, w.view(E * w_rows, K))
        return grouped_gemm_decode.launch(a, a_scale, w, w_scale, out, offsets=offsets, masked_m=masked_m,
                                          max_m=max_m, out_scale=out_scale, row_weight=row_weight, swiglu=swiglu,
                                          cfg=cfg, interpret=interpret_mode(), use_tma=tma)
    if not fp8 and not masked and out_scale is None and _bf16_gluon_usable(a, w, out, swiglu, row_weight):
        try:
            return grouped_gemm_bf16_wgmma.launch(a, w, out, offsets, swiglu=swiglu, row_weight=row_weight)
        except Exception as e:  # noqa: BLE001 - a Triton that cannot build it: the Triton kernel, said once
            grouped_gemm_bf16_wgmma.FAILED.append(f"{type(e).__name__}: {str(e)[:300]}")
            _say_once(f"moe_kernels: the Gluon bf16 grouped GEMM failed, the Triton kernel runs: "
                      f"{grouped_gemm_bf16_wgmma.FAILED[0]}")
    use_wgmma = bool(cfg.pop("WGMMA", 0))
    wgmma_keys = {k: cfg.pop(k) for k in ("UNROLL", "WS", "PERSISTENT") if k in cfg}  # the Gluon kernel's own knobs
    use_tma = bool(cfg.pop("USE_TMA", 0))
    pair_n = bool(cfg.pop("PAIR_N", 0)) and not swiglu and out_scale is None  # SwiGLU has its own second tile
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if fp8 and (BK != SCALE_BLOCK or (SCALE_BLOCK % BN if BN < SCALE_BLOCK else BN % SCALE_BLOCK)):
        raise ValueError(f"FP8 configs need BLOCK_K=128 and BLOCK_N dividing 128 or a multiple of it, got {cfg}")
    if out_scale is not None and BN != SCALE_BLOCK:
        cfg["BLOCK_N"] = BN = SCALE_BLOCK  # the quantising epilogue writes one scale group per tile row
    # a W with strides of its own (the backward's transposed view) takes pointer loads and the Triton kernel
    w2d = w.view(E * w_rows, K) if w.is_contiguous() else None
    if use_wgmma and fp8 and w2d is not None:
        wg_cfg = dict(cfg, PAIR_N=int(pair_n), **wgmma_keys)
        if _wgmma_usable(a, w2d, wg_cfg, swiglu, out_scale is not None):
            return grouped_gemm_wgmma.launch(a, a_scale, w, w_scale, out, offsets=offsets, masked_m=masked_m,
                                             max_m=max_m, out_scale=out_scale, row_weight=row_weight,
                                             swiglu=swiglu, cfg=wg_cfg)
    use_tma = use_tma and w2d is not None and _tma_usable(a, w2d)
    if use_tma:
        a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [BM, BK])
        w_desc = TensorDescriptor(w2d, [E * w_rows, K], [K, 1], [BN, BK])
    else:
        a_desc, w_desc = a, w
    num_m = E * triton.cdiv(max_m, BM) if masked else triton.cdiv(M, BM) + E
    grid = (num_m * triton.cdiv(N, BN * (2 if pair_n else 1)),)
    dummy = offsets if offsets is not None else masked_m  # any int tensor stands in for an absent pointer
    return _grouped_gemm_kernel[grid](
        a, a_desc, a_scale if fp8 else dummy, w, w_desc, w_scale if fp8 else dummy,
        offsets if offsets is not None else dummy, masked_m if masked else dummy,
        row_weight if row_weight is not None else dummy, out, out_scale if out_scale is not None else dummy,
        M, N, K, E, max_m, w_rows, N,
        a.stride(0), a_scale.stride(0) if fp8 else 0, a_scale.stride(1) if fp8 else 0, w.stride(0), w.stride(1),
        w.stride(2), w_scale.stride(0) if fp8 else 0, w_scale.stride(1) if fp8 else 0,
        w_scale.stride(2) if fp8 else 0,
        out.stride(0), out_scale.stride(0) if out_scale is not None else 0,
        FP8=fp8, SWIGLU=swiglu, QUANT_OUT=out_scale is not None, ROW_WEIGHT=row_weight is not None,
        MASKED=masked, USE_TMA=use_tma, EVEN_K=K % BK == 0, IEEE=a.dtype == torch.float32 or interpret_mode(),
        UPCAST=interpret_mode() and not fp8, E_PAD=max(16, triton.next_power_of_2(E)), PAIR_N=pair_n, **cfg,
    )


def _mlp_launch(x, x_scale, offsets, w13, w13_scale, w2, w2_scale, row_weight, out):
    """w13 GEMM + SwiGLU (+ FP8 re-quantisation) into h, then the w2 GEMM (+ routing weight) into out."""
    M = x.shape[0]
    I = w2.shape[2]
    if w13_scale is not None:
        h = torch.empty(M, I, dtype=FP8_DTYPE, device=x.device)
        h_scale = torch.empty(M, I // SCALE_BLOCK, dtype=torch.float32, device=x.device)
    else:
        h, h_scale = torch.empty(M, I, dtype=x.dtype, device=x.device), None
    _launch(x, x_scale, w13, w13_scale, h, offsets=offsets, out_scale=h_scale, swiglu=True)
    _launch(h, h_scale, w2, w2_scale, out, offsets=offsets, row_weight=row_weight)
    return out


# ---------------------------------------------------------------------------------------------------------------
# backward kernels (bf16 / fp16 / fp32): the weight gradient, and the expert MLP's backward composed of them

@triton.jit
def _quantize_columns(v):
    """fp32 [ROWS, C] -> (e4m3 [ROWS, C], fp32 scales [C]): each column one group, scale = max(amax, floor) / 448
    with IEEE divisions (the reference's rounding). A NaN in a column reaches the product through its value (the
    max of tl.max may drop it: the scale stays finite, the NaN does not)."""
    amax = tl.maximum(tl.max(tl.abs(v), axis=0), AMAX_FLOOR)
    scale = tl.div_rn(amax, tl.full(amax.shape, E4M3_MAX, tl.float32))
    q = to_e4m3_rne(tl.div_rn(v, tl.broadcast_to(scale[None, :], v.shape)))
    return q.to(tl.float8e4nv), scale


@triton.jit
def _wgrad_step(acc, dy, x, FP8: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc [BN, BK] += dy^T x for one row step (dy [BM, BN], x [BM, BK]; rows past the expert's end are zeros)."""
    if FP8:
        # one scale per column of the group: the transposed operands' 1x128 groups
        q_dy, s_dy = _quantize_columns(dy.to(tl.float32))
        q_x, s_x = _quantize_columns(x.to(tl.float32))
        return acc + tl.dot(tl.trans(q_dy), q_x) * (s_dy[:, None] * s_x[None, :])
    return _dot_16_32(tl.trans(dy), x, acc, IEEE, UPCAST)


@triton.jit
def _grouped_wgrad_kernel(dy_ptr, dy_desc, x_ptr, x_desc, offsets_ptr, dw_ptr, N, K, stride_dy, stride_x, stride_we,
                          stride_wn, FP8: tl.constexpr, USE_TMA: tl.constexpr, IEEE: tl.constexpr,
                          UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """dW[e] [N, K] = dY[rows of e, :N]^T @ X[rows of e, :K]: a program owns one [BLOCK_N, BLOCK_K] tile of one
    expert and walks that expert's rows (an expert without rows writes zeros).

    USE_TMA (bf16 / fp16 operands on Hopper): the expert's full BLOCK_M-row steps come through TMA descriptors of
    the whole dY and X (pipelined, num_stages deep; a full step holds no other expert's row), the last partial
    step through masked pointer loads.
    FP8 (DeepSeek-V3's wgrad): the reduction runs over rows, so both operands are quantised along rows: each
    BLOCK_M = 128 rows of the expert (counted from its first row) are one 1x128 group of every column of dY^T and
    of X^T, quantised here in registers (e4m3, scale = amax / 448); each group's e4m3 product is promoted to fp32
    with the two column scales. Nothing transposed is written to memory."""
    e = tl.program_id(1)
    num_k = tl.cdiv(K, BLOCK_K)
    n0 = (tl.program_id(0) // num_k) * BLOCK_N
    k0 = (tl.program_id(0) % num_k) * BLOCK_K
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_mask, k_mask = offs_n < N, offs_k < K
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    tail = lo
    if USE_TMA:
        n_full = (hi - lo) // BLOCK_M
        for it in range(0, n_full):
            m0 = lo + it * BLOCK_M
            acc = _wgrad_step(acc, dy_desc.load([m0, n0]), x_desc.load([m0, k0]), FP8, IEEE, UPCAST)
        tail = lo + n_full * BLOCK_M
    for m0 in range(tail, hi, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        r_mask = rows < hi
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :],
                     other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :],
                    other=0.0)
        acc = _wgrad_step(acc, dy, x, FP8, IEEE, UPCAST)
    ptrs = dw_ptr + e.to(tl.int64) * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :]
    tl.store(ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


def _wgrad_fp8_reference(dy, x, offsets, num_experts):
    """fp32 [E, N, K]: what the FP8 wgrad kernel computes, in torch ops (CPU tensors without the interpreter, and
    the tests' oracle): per expert, every 128 rows from its first one are a 1x128 group of each column of dY^T and
    X^T, quantised to e4m3, multiplied, the products promoted with their scales."""
    o = offsets.tolist()
    out = []
    for lo, hi in zip(o, o[1:]):
        acc = torch.zeros(dy.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        for m0 in range(lo, hi, SCALE_BLOCK):
            m1 = min(m0 + SCALE_BLOCK, hi)
            qd, sd = reference.quantize_fp8(dy[m0:m1].t().float(), m1 - m0)
            qx, sx = reference.quantize_fp8(x[m0:m1].t().float(), m1 - m0)
            acc += (qd.float() @ qx.float().t()) * (sd * sx.t())
        out.append(acc)
    return torch.stack(out) if out else torch.zeros(0, dy.shape[1], x.shape[1], device=x.device)


def _gluon_wgrad(module: str, env: str, kind: str, dy, x, offsets, dw, needs_tma: bool):
    """dw from the Gluon wgrad kernel of ``ops.<module>`` (its launch / supports / FAILED) when the switch ``env``
    allows it and it applies, else None (the caller runs the Triton kernel). A launch that fails is recorded in
    FAILED, so later calls skip it; the Triton fallback is said once where it surprises (``env=gluon``, a failed
    launch)."""
    choice = os.environ.get(env, "auto")
    if choice not in ("auto", "gluon") or not x.is_cuda or interpret_mode():
        return None
    try:
        mod = importlib.import_module(f".{module}", __package__)
    except ImportError as e:  # pragma: no cover - Triton without Gluon
        mod, why = None, f"this Triton has no Gluon ({e})"
    if mod is not None:
        why = ("not an sm_90 GPU" if not _is_sm90(x.device.index if x.device.index is not None else 0)
               else "an operand is not 16-byte aligned for TMA" if needs_tma and not _tma_usable(dy, x)
               else "its launch failed earlier: " + mod.FAILED[0] if mod.FAILED else mod.supports(dy, x, dw))
    if why is None or why == "no rows":
        if why:  # M = 0: every expert's gradient is zero
            return dw.zero_()
        try:
            mod.launch(dy, x, offsets.contiguous(), dw)
            return dw
        except Exception as e:  # noqa: BLE001 - a Triton that cannot build it: the Triton kernel, said once
            mod.FAILED.append(f"{type(e).__name__}: {str(e)[:300]}")
            why = "its launch failed: " + mod.FAILED[0]
    if choice == "gluon" or why.startswith("its launch failed"):
        _say_once(f"moe_kernels: the Gluon {kind}wgrad kernel does not run here, grouped_wgrad runs the Triton "
                  f"{kind}kernel: {why}")
    return None


def grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, num_experts: int,
                  out_dtype: torch.dtype | None = None, fp8: bool = False) -> torch.Tensor:
    """dW [E, N, K] with dW[e] = dY_e^T X_e over the rows of each expert (the weight gradient of
    ``out = A_e @ W_e^T``): dy [M, N], x [M, K] of one float dtype, offsets int32 [E+1]; fp32 accumulation.
    ``fp8``: the product in e4m3, both operands quantised along the rows (the reduction axis) in 1x128 groups that
    start at each expert's first row (DeepSeek-V3's FP8 wgrad)."""
    M, N = dy.shape
    K = x.shape[1]
    dw = torch.empty(num_experts, N, K, dtype=out_dtype or x.dtype, device=x.device)
    if num_experts == 0 or N == 0 or K == 0:
        return dw
    if not use_triton(x):
        if fp8:
            return _wgrad_fp8_reference(dy, x, offsets, num_experts).to(dw.dtype)
        o = offsets.tolist()
        return torch.stack([dy[lo:hi].float().t() @ x[lo:hi].float() for lo, hi in zip(o, o[1:])]).to(dw.dtype)
    if dy.dtype != x.dtype:  # one dtype for the kernel: fp8 quantises from dy's (bf16); else the wider of the two
        common = dy.dtype if fp8 else torch.promote_types(dy.dtype, x.dtype)
        dy, x = dy.to(common), x.to(common)
    dy, x = dy.contiguous(), x.contiguous()
    # the Gluon kernels where they apply (sm_90; bf16 also TMA-aligned), each by its switch: auto (default), gluon
    # (the same, and says why when it cannot run), triton or any other value (never).
    # bf16, MOE_KERNELS_WGRAD: grouped_wgrad_wgmma, 1.33-1.69x the Triton kernel, 0.91-1.22x torch._grouped_mm on
    # an H100 (bench/results/wgrad-*.json).
    # FP8, MOE_KERNELS_WGRAD_FP8: grouped_wgrad_fp8 (transposed e4m3 copies written once, then a K-grouped Gluon
    # GEMM). One H100 training step (mixtral-like, 8192 tokens, FP8 weight gradients): 8.34 ms with it, 67-69 ms
    # with the Triton FP8 kernel (2026-12-07).
    done = (_gluon_wgrad("grouped_wgrad_fp8", "MOE_KERNELS_WGRAD_FP8", "FP8 ", dy, x, offsets, dw, False) if fp8
            else _gluon_wgrad("grouped_wgrad_wgmma", "MOE_KERNELS_WGRAD", "", dy, x, offsets, dw, True))
    if done is not None:
        return done
    small = interpret_mode()
    tma = x.dtype != torch.float32 and not _WGRAD_TMA_FAILED and _tma_usable(dy, x)
    if fp8:  # a row step is one 1x128 group
        # (with TMA: 128 x 128 x 64, 3 stages; offline sm_90 compile: 241 registers, no spill, 123 KB smem)
        BM, BN, BK = (SCALE_BLOCK, 64, 64) if small else (SCALE_BLOCK, 128, 64 if tma else 128)
    else:
        BM, BN, BK = (16, 32, 32) if small else (32, 64, 64) if x.dtype == torch.float32 else (64, 128, 128 if tma else 64)
    stages = 1 if small else 3 if fp8 and tma else 2 if fp8 else 4 if tma else 3
    dy_desc, x_desc = dy, x
    if tma:
        dy_desc = TensorDescriptor(dy, [M, N], [dy.stride(0), 1], [BM, BN])
        x_desc = TensorDescriptor(x, [M, K], [x.stride(0), 1], [BM, BK])
    grid = (triton.cdiv(N, BN) * triton.cdiv(K, BK), num_experts)
    try:
        _grouped_wgrad_kernel[grid](dy, dy_desc, x, x_desc, offsets.contiguous(), dw, N, K, dy.stride(0),
                                    x.stride(0), dw.stride(0), dw.stride(1), FP8=fp8, USE_TMA=tma,
                                    IEEE=x.dtype == torch.float32 or small, UPCAST=small, BLOCK_M=BM, BLOCK_N=BN,
                                    BLOCK_K=BK, num_warps=4 if small else 8, num_stages=stages)
    except Exception as e:  # noqa: BLE001 - a Triton that cannot build or encode these descriptors: pointer loads
        if not tma:
            raise
        _WGRAD_TMA_FAILED.append(repr(e))
        _say_once(f"moe_kernels: grouped_wgrad's TMA form failed ({type(e).__name__}: {str(e)[:200]}); it runs "
                  f"with pointer loads")
        return grouped_wgrad(dy, x, offsets, num_experts, out_dtype, fp8)
    return dw


_WGRAD_TMA_FAILED: list[str] = []  # set once if grouped_wgrad's TMA form cannot run on this Triton


@triton.jit
def _grouped_dgrad_kernel(a_desc, w_desc, offsets_ptr, out_ptr, M, N, K, E, stride_om, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, E_PAD: tl.constexpr):
    """out[r, :N] = A[r, :K] @ W[e] for the rows r of expert e, W [E, K, N] row-major: the input gradient of a
    forward ``X_e @ W_e^T``, W as the forward stored it (its rows are the reduction here, its contiguous columns
    the output's). The B tile [BLOCK_K, BLOCK_N] comes through TMA as it lies (N-major for wgmma): no transposed
    copy. A and W through TMA descriptors, pipelined num_stages deep; K % BLOCK_K == 0, so no K step reads another
    expert's rows of W. The forward kernel's schedule (``_tile_schedule``); rows past the expert's end are
    computed and never stored."""
    expert, row_start, row_end, tile_n = _tile_schedule(tl.program_id(0), M, N, E, 0, offsets_ptr, offsets_ptr, False,
                                                        BLOCK_M, BLOCK_N, GROUP_M, E_PAD)
    if row_start >= row_end:
        return
    a_row = row_start.to(tl.int32)
    w_row = expert * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K // BLOCK_K):
        acc = tl.dot(a_desc.load([a_row, kb * BLOCK_K]), w_desc.load([w_row + kb * BLOCK_K, tile_n * BLOCK_N]), acc)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < row_end)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# 128 x 256 x 64, 8 warps, 3 stages (the forward's bf16 tile): offline sm_90 compiles give 167 (Triton 3.8) / 222
# (3.6) registers, no spill, 147 KB smem; 128 x 128 with 8 warps spills 248 bytes on 3.6
DGRAD_CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _dgrad_tma(a, offsets, wt, out) -> bool:
    """out = a_e @ wt[e] by ``_grouped_dgrad_kernel`` when it applies (bf16/fp16 on sm_90, TMA-able operands,
    K a multiple of BLOCK_K); False when it does not (the caller runs the general kernel). A failure to build or
    launch it is said once and falls back the same way."""
    E, K, N = wt.shape
    if a.dtype not in (torch.bfloat16, torch.float16) or not a.is_cuda or interpret_mode() or _DGRAD_FAILED or \
            not _is_sm90(a.device.index if a.device.index is not None else torch.cuda.current_device()) or \
            K % DGRAD_CONFIG["BLOCK_K"] or not wt.is_contiguous() or not _tma_usable(a, wt.view(E * K, N)):
        return False
    try:
        _dgrad_launch(a, offsets, wt, out, DGRAD_CONFIG)
    except Exception as e:  # noqa: BLE001 - a Triton without this lowering: the general kernel, said once
        _DGRAD_FAILED.append(repr(e))
        _say_once(f"moe_kernels: the TMA dgrad kernel failed ({type(e).__name__}: {str(e)[:200]}); the backward's "
                  f"dA / dX run the general grouped GEMM kernel")
        return False
    return True


def _dgrad_launch(a, offsets, wt, out, cfg) -> None:
    """Launch ``_grouped_dgrad_kernel``: a [M, K], wt [E, K, N] contiguous, out [M, N] with unit column stride."""
    cfg = dict(cfg)
    E, K, N = wt.shape
    M = a.shape[0]
    BM, BN, BK = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [BM, BK])
    w_desc = TensorDescriptor(wt.view(E * K, N), [E * K, N], [N, 1], [BK, BN])
    grid = ((triton.cdiv(M, BM) + E) * triton.cdiv(N, BN),)
    _grouped_dgrad_kernel[grid](a_desc, w_desc, offsets, out, M, N, K, E, out.stride(0), BLOCK_M=BM, BLOCK_N=BN,
                                BLOCK_K=BK, E_PAD=max(16, triton.next_power_of_2(E)), **cfg)


_DGRAD_FAILED: list[str] = []  # set once if the TMA dgrad kernel cannot run on this Triton (see _dgrad_tma)


def _gemm(a, offsets, w, w_scale=None, out_dtype=torch.float32):
    """out [M, N] = a_e @ W[e]^T per expert, W [E, N, K] with any strides (a transposed view takes the Triton
    kernel's pointer loads). With ``w_scale`` W is e4m3 with 128x128 scales (which transpose with their blocks) and
    a is quantised 1x128 first. The reference on CPU tensors without the interpreter."""
    a_scale = None
    if w_scale is not None:
        a, a_scale = quantize_fp8(a.contiguous())
    if not use_triton(a):
        if w_scale is not None:
            return reference.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out_dtype=out_dtype)
        return reference.grouped_gemm(a, w, offsets, out_dtype=out_dtype)
    out = torch.empty(a.shape[0], w.shape[1], dtype=out_dtype, device=a.device)
    # a transposed view of a contiguous weight (the backward's dA, dX): the TMA dgrad kernel reads it as it lies
    if w_scale is None and out_dtype == a.dtype and a.shape[0] and _dgrad_tma(a.contiguous(), offsets.contiguous(),
                                                                              w.transpose(1, 2), out):
        return out
    _launch(a, a_scale, w, w_scale, out, offsets=offsets)
    return out


@triton.jit
def _swiglu_kernel(h_ptr, g_ptr, d_ptr, M, I, stride_h, stride_g, stride_d, BACKWARD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    """SwiGLU per element of h = [gate | up] [M, 2I], fp32 inside.
    Forward: g [M, I] = silu(gate) * up.
    BACKWARD: g = dA [M, I] (the product's gradient) becomes A = silu(gate) * up (what the down projection read,
    for its weight gradient) and d [M, 2I] gets dH = [dgate | dup]; d may be h itself (in place: each program
    reads its tiles before writing the same tiles, which no other program touches)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < M)[:, None] & (cols < I)[None, :]
    gate_ptrs = h_ptr + rows[:, None] * stride_h + cols[None, :]
    g_ptrs = g_ptr + rows[:, None] * stride_g + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + I, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-gate))
    silu = gate * sig
    if BACKWARD:
        da = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        d_ptrs = d_ptr + rows[:, None] * stride_d + cols[None, :]
        tl.store(d_ptrs, (da * up * sig * (1.0 + gate * (1.0 - sig))).to(d_ptr.dtype.element_ty), mask=mask)
        tl.store(d_ptrs + I, (da * silu).to(d_ptr.dtype.element_ty), mask=mask)
    tl.store(g_ptrs, (silu * up).to(g_ptr.dtype.element_ty), mask=mask)


def _swiglu_launch(h13, g, dh=None) -> None:
    M, two_i = h13.shape
    I = two_i // 2
    if M and I:
        BM, BI = (16, 64) if interpret_mode() else (32, 128)
        d = h13 if dh is None else dh
        _swiglu_kernel[(triton.cdiv(M, BM), triton.cdiv(I, BI))](
            h13, g, d, M, I, h13.stride(0), g.stride(0), d.stride(0), BACKWARD=dh is not None, BLOCK_M=BM, BLOCK_I=BI,
            num_warps=4)


def _swiglu(h13):
    """silu(gate) * up [M, I] in h13's dtype for h13 = [gate | up] [M, 2I] contiguous (fp32 inside)."""
    if not use_triton(h13):
        return reference.swiglu(h13).to(h13.dtype)
    a = torch.empty(h13.shape[0], h13.shape[1] // 2, dtype=h13.dtype, device=h13.device)
    _swiglu_launch(h13, a)
    return a


@triton.jit
def _quantize_master_kernel(w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, N, K, NB, KB, TRANSPOSED: tl.constexpr,
                            BLOCK: tl.constexpr):
    """One 128x128 block of one expert's master weight w [N, K] -> e4m3 q [N, K] with its fp32 scale
    s [NB, KB] (amax / 448, IEEE divisions: the reference's rounding), and with TRANSPOSED the same block
    transposed into qt [K, N] / st [KB, NB]: one read of the master, both copies written."""
    e = tl.program_id(1).to(tl.int64)
    nb = tl.program_id(0) // KB
    kb = tl.program_id(0) % KB
    offs_n = nb * BLOCK + tl.arange(0, BLOCK)
    offs_k = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    w = tl.load(w_ptr + e * N * K + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(w), axis=1), axis=0), AMAX_FLOOR)
    scale = tl.div_rn(amax, tl.full(amax.shape, E4M3_MAX, tl.float32))
    q = to_e4m3_rne(tl.div_rn(w, tl.full(w.shape, 1.0, tl.float32) * scale)).to(tl.float8e4nv)
    tl.store(q_ptr + e * N * K + offs_n[:, None] * K + offs_k[None, :], q, mask=mask)
    tl.store(s_ptr + e * NB * KB + nb * KB + kb, scale)
    if TRANSPOSED:
        # the transposed copy from the e4m3 codes just stored (16 KiB, in L2; the barrier makes this program's
        # stores visible to all its threads): storing q itself transposed made Triton 3.6 give that store its own
        # layout by moving the 32 KiB bf16 tile and redoing the divisions there, two div.rn an element
        tl.debug_barrier()
        qt = tl.load(q_ptr + e * N * K + offs_n[None, :] * K + offs_k[:, None], mask=tl.trans(mask),
                     cache_modifier=".cg")
        tl.store(qt_ptr + e * N * K + offs_k[:, None] * N + offs_n[None, :], qt, mask=tl.trans(mask))
        tl.store(st_ptr + e * NB * KB + kb * NB + nb, scale)


def quantize_master_fp8(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, qt: torch.Tensor | None = None,
                        st: torch.Tensor | None = None) -> None:
    """FP8 training's once-per-step weight quantisation, into given buffers: w [E, N, K] bf16/fp32 (K and N
    multiples of 128 with ``qt``) -> q e4m3 [E, N, K], s fp32 [E, ceil(N/128), K/128] (``quantize_weight_fp8``'s
    values, bit for bit) and optionally qt e4m3 [E, K, N], st fp32 [E, K/128, ceil(N/128)]: the transposed copy,
    each block transposed with its scale. One pass over the master (a kernel per 128x128 block); the reference
    (chunked torch ops) off the kernel path."""
    E, N, K = w.shape
    if not use_triton(w):
        for lo in range(0, E, 8):  # bounded fp32 temporaries
            q[lo : lo + 8], s[lo : lo + 8] = reference.quantize_weight_fp8(w[lo : lo + 8])
        if qt is not None:
            qt.copy_(q.transpose(1, 2))
            st.copy_(s.transpose(1, 2))
        return
    if E == 0 or N == 0 or K == 0:
        return
    NB, KB = triton.cdiv(N, SCALE_BLOCK), triton.cdiv(K, SCALE_BLOCK)
    t = qt is not None
    _quantize_master_kernel[(NB * KB, E)](w.contiguous(), q, s, qt if t else q, st if t else s, N, K, NB, KB,
                                          TRANSPOSED=t, BLOCK=SCALE_BLOCK, num_warps=8)


# ---------------------------------------------------------------------------------------------------------------
# custom ops (CUDA / interpreter: Triton; CPU: the reference)

@torch.library.custom_op("moe_kernels::grouped_gemm_fp8", mutates_args=())
def _grouped_gemm_fp8_op(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                         offsets: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(a.shape[0], w.shape[1], dtype=out_dtype, device=a.device)
    _grouped_gemm_fp8_out_impl(a, a_scale, w, w_scale, offsets, out)
    return out


@_grouped_gemm_fp8_op.register_fake
def _(a, a_scale, w, w_scale, offsets, out_dtype):
    return a.new_empty(a.shape[0], w.shape[1], dtype=out_dtype)


def _grouped_gemm_fp8_out_impl(a, a_scale, w, w_scale, offsets, out):
    if use_triton(a):
        _launch(a.contiguous(), a_scale.contiguous(), w.contiguous(), w_scale.contiguous(), out, offsets=offsets)
    else:
        out.copy_(reference.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out_dtype=torch.float32))


@torch.library.custom_op("moe_kernels::grouped_gemm_fp8_out", mutates_args=("out",))
def _grouped_gemm_fp8_out_op(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                             offsets: torch.Tensor, out: torch.Tensor) -> None:
    _grouped_gemm_fp8_out_impl(a, a_scale, w, w_scale, offsets, out)


@_grouped_gemm_fp8_out_op.register_fake
def _(a, a_scale, w, w_scale, offsets, out):
    return None


@torch.library.custom_op("moe_kernels::grouped_gemm_bf16", mutates_args=())
def _grouped_gemm_bf16_op(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if not use_triton(a):
        return reference.grouped_gemm(a, w, offsets)
    out = torch.empty(a.shape[0], w.shape[1], dtype=a.dtype, device=a.device)
    _launch(a.contiguous(), None, w.contiguous(), None, out, offsets=offsets)
    return out


@_grouped_gemm_bf16_op.register_fake
def _(a, w, offsets):
    return a.new_empty(a.shape[0], w.shape[1])


@torch.library.custom_op("moe_kernels::grouped_gemm_fp8_masked", mutates_args=())
def _grouped_gemm_fp8_masked_op(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                                masked_m: torch.Tensor) -> torch.Tensor:
    E, max_m, K = a.shape
    N = w.shape[1]
    if use_triton(a):
        out = torch.empty(E, max_m, N, dtype=torch.bfloat16, device=a.device)
        _launch(a.contiguous().view(E * max_m, K), a_scale.contiguous().view(E * max_m, -1), w.contiguous(),
                w_scale.contiguous(), out.view(E * max_m, N), masked_m=masked_m, max_m=max_m)
        return out
    out = torch.zeros(E, max_m, N, dtype=torch.bfloat16, device=a.device)
    for e, m in enumerate(masked_m.tolist()):
        if m:
            one = torch.tensor([0, m], dtype=torch.int32)
            out[e, :m] = reference.grouped_gemm_fp8(a[e, :m], a_scale[e, :m], w[e : e + 1], w_scale[e : e + 1], one)
    return out


@_grouped_gemm_fp8_masked_op.register_fake
def _(a, a_scale, w, w_scale, masked_m):
    return a.new_empty(a.shape[0], a.shape[1], w.shape[1], dtype=torch.bfloat16)


@torch.library.custom_op("moe_kernels::expert_mlp", mutates_args=())
def _expert_mlp_op(x: torch.Tensor, x_scale: torch.Tensor | None, offsets: torch.Tensor, w13: torch.Tensor,
                   w13_scale: torch.Tensor | None, w2: torch.Tensor, w2_scale: torch.Tensor | None,
                   topk_weight: torch.Tensor | None) -> torch.Tensor:
    fp8 = w13_scale is not None
    out_dtype = torch.bfloat16 if fp8 else x.dtype
    if not use_triton(x):
        y = reference.expert_mlp(x, offsets, w13, w2, x_scale, w13_scale, w2_scale, out_dtype=torch.float32)
        return (y if topk_weight is None else y * topk_weight[:, None]).to(out_dtype)
    out = torch.empty(x.shape[0], w2.shape[1], dtype=out_dtype, device=x.device)
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return _mlp_launch(c(x), c(x_scale), offsets, c(w13), c(w13_scale), c(w2), c(w2_scale), c(topk_weight), out)


@_expert_mlp_op.register_fake
def _(x, x_scale, offsets, w13, w13_scale, w2, w2_scale, topk_weight):
    return x.new_empty(x.shape[0], w2.shape[1], dtype=torch.bfloat16 if w13_scale is not None else x.dtype)


@torch.library.custom_op("moe_kernels::expert_mlp_train", mutates_args=())
def _expert_mlp_train_op(x: torch.Tensor, offsets: torch.Tensor, w13: torch.Tensor,
                         w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h13 = _gemm(x, offsets, w13, out_dtype=x.dtype)
    return _gemm(_swiglu(h13), offsets, w2, out_dtype=x.dtype), h13


@_expert_mlp_train_op.register_fake
def _(x, offsets, w13, w2):
    return x.new_empty(x.shape[0], w2.shape[1]), x.new_empty(x.shape[0], w13.shape[1])


@torch.library.custom_op("moe_kernels::expert_mlp_fp8_ste", mutates_args=())
def _expert_mlp_fp8_ste_op(x: torch.Tensor, offsets: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                           w2: torch.Tensor, w2_scale: torch.Tensor) -> torch.Tensor:
    xq, x_scale = quantize_fp8(x.contiguous())
    return _expert_mlp_op(xq, x_scale, offsets, w13, w13_scale, w2, w2_scale, None)


@_expert_mlp_fp8_ste_op.register_fake
def _(x, offsets, w13, w13_scale, w2, w2_scale):
    return x.new_empty(x.shape[0], w2.shape[1], dtype=torch.bfloat16)


@torch.library.custom_op("moe_kernels::expert_mlp_fp8_train", mutates_args=())
def _expert_mlp_fp8_train_op(x: torch.Tensor, offsets: torch.Tensor, w13: torch.Tensor, w13_q: torch.Tensor,
                             w13_scale: torch.Tensor, w2: torch.Tensor, w2_q: torch.Tensor, w2_scale: torch.Tensor,
                             w13_tq: torch.Tensor | None, w13_ts: torch.Tensor | None, w2_tq: torch.Tensor | None,
                             w2_ts: torch.Tensor | None, fp8_wgrad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    # the master weights w13 / w2 are inputs for their gradients only: the GEMMs read their e4m3 copies. Unfused,
    # so that h13 (bf16) is kept for the backward: x and A = SwiGLU(h13) quantised 1x128 by _gemm. fp8_wgrad: the
    # backward's weight gradients in FP8 (else bf16 operands, fp32 accumulation)
    h13 = _gemm(x, offsets, w13_q, w13_scale, out_dtype=torch.bfloat16)
    return _gemm(_swiglu(h13), offsets, w2_q, w2_scale, out_dtype=torch.bfloat16), h13


@_expert_mlp_fp8_train_op.register_fake
def _(x, offsets, w13, w13_q, w13_scale, w2, w2_q, w2_scale, w13_tq, w13_ts, w2_tq, w2_ts, fp8_wgrad=True):
    return (x.new_empty(x.shape[0], w2.shape[1], dtype=torch.bfloat16),
            x.new_empty(x.shape[0], w13.shape[1], dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------------
# public wrappers: validate on the host (no launch before that), then call the op

def _check_offsets(offsets, E: int, M: int, device) -> None:
    check_tensor("offsets", offsets, dtype=torch.int32, shape=(E + 1,), device=device)
    if value_checks_enabled(offsets):  # reads values: one device->host sync, skipped when checks are off
        o = offsets.tolist()
        if o[0] != 0 or o[-1] != M or any(hi < lo for lo, hi in zip(o, o[1:])):
            raise ValueError(
                f"offsets must start at 0, never decrease and end at M={M} (rows of a), got {o[:4]} ... {o[-2:]}")


def _check_fp8_operands(a, a_scale, w, w_scale, names=("a", "a_scale", "w", "w_scale")) -> None:
    na, nas, nw, nws = names
    check_tensor(na, a, dtype=FP8_DTYPE, ndim=2)
    M, K = a.shape
    check_multiple(f"{na}.shape[-1] (K)", K, SCALE_BLOCK)
    check_tensor(nas, a_scale, dtype=torch.float32, shape=(M, K // SCALE_BLOCK), device=a.device)
    check_tensor(nw, w, dtype=FP8_DTYPE, ndim=3, device=a.device)
    E, N, Kw = w.shape
    if Kw != K:
        raise ValueError(f"{nw} must have shape [E, N, {K}] to match {na}'s K, got {list(w.shape)}")
    check_tensor(nws, w_scale, dtype=torch.float32, shape=(E, -(-N // SCALE_BLOCK), K // SCALE_BLOCK),
                 device=a.device)


def grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out_dtype=torch.bfloat16, out=None) -> torch.Tensor:
    """out [M, N] = A_e @ W_e^T for the rows of each expert; fp32 accumulation with the block scales per K block.

    Args:
        a: e4m3 [M, K], K a multiple of 128; a_scale: fp32 [M, K/128] (one scale per 1x128 group).
        w: e4m3 [E, N, K]; w_scale: fp32 [E, ceil(N/128), K/128] (DeepSeek-V3's ``weight_scale_inv``).
        offsets: int32 [E+1]; rows offsets[e]:offsets[e+1] belong to expert e (empty experts allowed).
        out_dtype: bf16 (default), fp16 or fp32.
        out: optional [M, N] tensor of out_dtype with unit column stride to write into (returned).
    """
    _check_fp8_operands(a, a_scale, w, w_scale)
    check_tensor("offsets", offsets, dtype=torch.int32, device=a.device)
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    M, N = a.shape[0], w.shape[1]
    if out is not None:
        check_tensor("out", out, dtype=out_dtype, shape=(M, N), device=a.device)
        if N > 1 and out.stride(1) != 1:
            raise ValueError("out must have unit stride along its last dimension")
    _check_offsets(offsets, w.shape[0], M, a.device)
    if out is None:
        return _grouped_gemm_fp8_op(a, a_scale, w, w_scale, offsets, out_dtype)
    _grouped_gemm_fp8_out_op(a, a_scale, w, w_scale, offsets, out)
    return out


def grouped_gemm_bf16(a, w, offsets) -> torch.Tensor:
    """out [M, N] = A_e @ W_e^T: a [M, K] and w [E, N, K] bf16 or fp16 (fp32 runs with IEEE products)."""
    check_tensor("a", a, dtype=(torch.bfloat16, torch.float16, torch.float32), ndim=2)
    check_tensor("w", w, dtype=a.dtype, ndim=3, device=a.device)
    if w.shape[2] != a.shape[1]:
        raise ValueError(f"w must have shape [E, N, {a.shape[1]}] to match a's K, got {list(w.shape)}")
    _check_offsets(offsets, w.shape[0], a.shape[0], a.device)
    return _grouped_gemm_bf16_op(a, w, offsets)


def grouped_gemm_fp8_masked(a, a_scale, w, w_scale, masked_m) -> torch.Tensor:
    """Decode layout: a [E, max_m, K] e4m3, a_scale fp32 [E, max_m, K/128], masked_m int32 [E] valid rows.

    Returns bf16 [E, max_m, N]; rows at and past masked_m[e] are unspecified (zero on the CPU reference). The
    grid depends only on shapes and masked_m is read on the device, so the call can be captured in a CUDA graph
    and replayed with new masked_m values.
    """
    check_tensor("a", a, dtype=FP8_DTYPE, ndim=3)
    E, max_m, K = a.shape
    check_tensor("a_scale", a_scale, dtype=torch.float32, ndim=3, device=a.device)
    _check_fp8_operands(a.reshape(E * max_m, K), a_scale.reshape(E * max_m, -1), w, w_scale)
    if tuple(a_scale.shape) != (E, max_m, K // SCALE_BLOCK):
        raise ValueError(f"a_scale must have shape [{E}, {max_m}, {K // SCALE_BLOCK}], got {list(a_scale.shape)}")
    if w.shape[0] != E:
        raise ValueError(f"w must have {E} experts to match a, got {w.shape[0]}")
    check_tensor("masked_m", masked_m, dtype=torch.int32, shape=(E,), device=a.device)
    if value_checks_enabled(masked_m) and E and (int(masked_m.min()) < 0 or int(masked_m.max()) > max_m):
        raise ValueError(f"masked_m must lie in [0, {max_m}], got [{int(masked_m.min())}, {int(masked_m.max())}]")
    return _grouped_gemm_fp8_masked_op(a, a_scale, w, w_scale, masked_m)


def expert_mlp(x, x_scale, offsets, w13, w13_scale, w2, w2_scale, topk_weight=None) -> torch.Tensor:
    """The SwiGLU MLP of every expert over expert-grouped rows: (silu(x W1^T) * (x W3^T)) W2^T.

    Args:
        x: [M, H] e4m3 with x_scale fp32 [M, H/128] (FP8 path), or bf16/fp16/fp32 with x_scale None.
        offsets: int32 [E+1]. w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I]. FP8 weights come with
            their 128x128 scales w13_scale [E, 2I/128, H/128], w2_scale [E, ceil(H/128), I/128]; bf16 weights
            with None.
        topk_weight: optional fp32 [M], multiplies each output row (routing weight in permuted order).
    Returns [M, H], bf16 on the FP8 path, x's dtype otherwise. On the FP8 path the SwiGLU output is re-quantised
    to e4m3 with 1x128 scales inside the first kernel; on the bf16 path it is rounded to x's dtype.
    """
    fp8 = w13_scale is not None
    check_tensor("x", x, ndim=2)
    check_tensor("w13", w13, ndim=3, device=x.device)
    if not fp8 and (x.dtype == FP8_DTYPE or w13.dtype == FP8_DTYPE):  # name the missing scale, not x's dtype
        what = "x" if x.dtype == FP8_DTYPE else "w13"
        raise TypeError(f"w13_scale is None but {what} is float8_e4m3fn: the FP8 path needs w13_scale and w2_scale "
                        f"(the weights' 128x128 block scales) and x_scale (1x128); the bf16 path none")
    check_tensor("w2", w2, ndim=3, device=w13.device)
    E, two_i, H = w13.shape
    I = two_i // 2
    if two_i % 2 or tuple(w2.shape) != (E, H, I):
        raise ValueError(f"w2 must have shape [{E}, {H}, {I}] to match w13 {list(w13.shape)}, got {list(w2.shape)}")
    if fp8:
        _check_fp8_operands(x, x_scale, w13, w13_scale, names=("x", "x_scale", "w13", "w13_scale"))
        check_multiple("intermediate size (w2.shape[2])", I, SCALE_BLOCK)
        check_tensor("w2", w2, dtype=FP8_DTYPE)
        check_tensor("w2_scale", w2_scale, dtype=torch.float32, shape=(E, -(-H // SCALE_BLOCK), I // SCALE_BLOCK),
                     device=x.device)
    else:
        check_tensor("x", x, dtype=(torch.bfloat16, torch.float16, torch.float32), ndim=2, shape=(None, H))
        check_tensor("w13", w13, dtype=x.dtype)
        check_tensor("w2", w2, dtype=x.dtype)
        if x_scale is not None or w2_scale is not None:
            raise ValueError("x_scale and w2_scale belong to the FP8 path: give w13_scale too, or pass None")
    check_tensor("offsets", offsets, dtype=torch.int32, device=x.device)
    if topk_weight is not None:
        check_tensor("topk_weight", topk_weight, dtype=torch.float32, shape=(x.shape[0],), device=x.device)
    _check_offsets(offsets, E, x.shape[0], x.device)
    return _expert_mlp_op(x, x_scale, offsets, w13, w13_scale, w2, w2_scale, topk_weight)


def expert_mlp_fp8_ste(x, offsets, w13, w13_scale, w2, w2_scale) -> torch.Tensor:
    """The FP8 expert MLP on bf16/fp16/fp32 rows x [M, H] (quantised 1x128 inside), differentiable in x with the
    quantisations taken as identities (straight-through): the gradient an FP8-trained layer sees. The e4m3 weights
    (buffers) get none. Returns bf16 [M, H]."""
    _check_fp8_rows_and_weights(x, offsets, w13, w13_scale, w2, w2_scale)
    return _expert_mlp_fp8_ste_op(x, offsets, w13, w13_scale, w2, w2_scale)


def _check_fp8_rows_and_weights(x, offsets, w13, w13_scale, w2, w2_scale) -> None:
    """The checks of the FP8 MLP on unquantised rows: x bf16/fp16/fp32 [M, H], e4m3 weights with their scales."""
    check_tensor("x", x, dtype=(torch.bfloat16, torch.float16, torch.float32), ndim=2)
    check_multiple("x.shape[1] (hidden size)", x.shape[1], SCALE_BLOCK)
    # the FP8 path's own checks, on an empty e4m3 stand-in for the quantised rows
    xq = x.new_empty(0, x.shape[1], dtype=FP8_DTYPE)
    _check_fp8_operands(xq, x.new_empty(0, x.shape[1] // SCALE_BLOCK, dtype=torch.float32), w13, w13_scale,
                        names=("x", "x_scale", "w13", "w13_scale"))
    E, two_i, H = w13.shape
    check_tensor("w2", w2, dtype=FP8_DTYPE, shape=(E, H, two_i // 2), device=x.device)
    check_tensor("w2_scale", w2_scale, dtype=torch.float32, shape=(E, -(-H // SCALE_BLOCK), two_i // 2 // SCALE_BLOCK),
                 device=x.device)
    check_tensor("offsets", offsets, dtype=torch.int32, device=x.device)
    _check_offsets(offsets, E, x.shape[0], x.device)


def expert_mlp_fp8_train(x, offsets, w13, w2, w13_fp8, w2_fp8, w13_fp8_t=None, w2_fp8_t=None,
                         fp8_wgrad: bool = True) -> torch.Tensor:
    """The FP8 expert MLP that trains its weights (DeepSeek-V3's FP8 training): master weights w13 [E, 2I, H] and
    w2 [E, H, I] (bf16 or fp32, they get the gradients) with their e4m3 copies ``w13_fp8`` = (e4m3 [E, 2I, H],
    fp32 [E, 2I/128, H/128]) and ``w2_fp8`` = (e4m3 [E, H, I], fp32 [E, H/128, I/128]) from
    ``quantize_weight_fp8`` of the masters (the caller quantises once per optimiser step), and optionally their
    contiguous transposes ``w13_fp8_t`` (e4m3 [E, H, 2I], fp32 [E, H/128, 2I/128]) and ``w2_fp8_t`` (e4m3
    [E, I, H], fp32 [E, I/128, H/128]) for the backward's dA and dX (the 128x128 blocks transpose with their
    scales: the same quantisation of W^T). x [M, H] bf16/fp16/fp32 rows grouped by ``offsets`` (int32 [E+1]) is
    quantised 1x128 inside. Forward, dgrad and wgrad GEMMs run in e4m3 with fp32 accumulation (see
    ``_autograd_mlp._expert_mlp_fp8_backward``); the quantisations are taken as identities. The forward runs
    unfused (the w13 GEMM into bf16 h13, SwiGLU, the w2 GEMM on A quantised 1x128) to keep h13 for the backward;
    saved: x, h13 and the e4m3 weights. ``fp8_wgrad=False``: the weight gradients from bf16 operands (dY, A, dH, X
    as the backward holds them; fp32 accumulation) instead of e4m3 ones, the other GEMMs still FP8. Returns bf16
    [M, H]."""
    check_tensor("w13", w13, dtype=(torch.bfloat16, torch.float32), ndim=3, device=x.device)
    check_tensor("w2", w2, dtype=w13.dtype, shape=(w13.shape[0], w13.shape[2], w13.shape[1] // 2), device=x.device)
    pairs = (("w13_fp8", w13_fp8, tuple(w13.shape)), ("w2_fp8", w2_fp8, tuple(w2.shape)),
             ("w13_fp8_t", w13_fp8_t, (w13.shape[0], w13.shape[2], w13.shape[1])),
             ("w2_fp8_t", w2_fp8_t, (w2.shape[0], w2.shape[2], w2.shape[1])))
    for name, pair, shape in pairs:
        if pair is None and name.endswith("_t"):
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{name} must be a pair (e4m3 weights, fp32 scales), got {type(pair).__name__}")
        check_tensor(f"{name}[0]", pair[0], dtype=FP8_DTYPE, shape=shape, device=x.device)
        check_tensor(f"{name}[1]", pair[1], dtype=torch.float32, shape=(shape[0], -(-shape[1] // SCALE_BLOCK),
                                                                         shape[2] // SCALE_BLOCK), device=x.device)
        if name.endswith("_t") and not (pair[0].is_contiguous() and pair[1].is_contiguous()):
            raise ValueError(f"{name} must be contiguous (its point is K-major e4m3 tiles for the backward)")
    _check_fp8_rows_and_weights(x, offsets, w13_fp8[0], w13_fp8[1], w2_fp8[0], w2_fp8[1])
    t13 = w13_fp8_t or (None, None)
    t2 = w2_fp8_t or (None, None)
    return _expert_mlp_fp8_train_op(x, offsets, w13, w13_fp8[0], w13_fp8[1], w2, w2_fp8[0], w2_fp8[1], *t13, *t2,
                                    bool(fp8_wgrad))[0]


def expert_mlp_train(x, offsets, w13, w2) -> torch.Tensor:
    """The bf16 / fp16 / fp32 expert MLP for training: ``expert_mlp``'s result ([M, H] in x's dtype) from a plain
    grouped GEMM into h13 [M, 2I], SwiGLU, the down projection, with h13 saved for the backward (the kernels'
    backward without computing h13 again: 1/4 of its GEMM work; h13 in x's dtype is the activation the torch
    composition keeps too). x [M, H], w13 [E, 2I, H], w2 [E, H, I] of one dtype, offsets int32 [E+1]."""
    check_tensor("x", x, dtype=(torch.bfloat16, torch.float16, torch.float32), ndim=2)
    check_tensor("w13", w13, dtype=x.dtype, ndim=3, device=x.device)
    E, two_i, H = w13.shape
    check_tensor("w2", w2, dtype=x.dtype, shape=(E, H, two_i // 2), device=x.device)
    check_tensor("x", x, shape=(None, H))
    check_tensor("offsets", offsets, dtype=torch.int32, device=x.device)
    _check_offsets(offsets, E, x.shape[0], x.device)
    return _expert_mlp_train_op(x, offsets, w13, w2)[0]
