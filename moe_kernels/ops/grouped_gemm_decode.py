"""Grouped GEMM for decode-sized batches: few rows per expert, so the weights are what the kernel reads.

With T tokens routed top-k over E experts, an expert gets about T*k/E rows: at T = 1..256 that is 0..64 rows,
while each expert's weights are megabytes. The prefill kernel puts rows on the tensor cores' M side (64-128 rows a
tile): at decode most of that tile is padding and the grid is sized for the worst case (every expert a tile of its
own, cdiv(M, BLOCK_M) + E row tiles), so few programs stream weights and many start only to return.

This kernel swaps the operands (out^T = W @ A^T): a BLOCK_N x BLOCK_K tile of one expert's weight rows is the MMA's
M side and the expert's rows (tokens) are its N side, BLOCK_T = 16..64 wide. One program owns BLOCK_N output
columns of one expert and streams those weight rows over all of K exactly once for up to BLOCK_T rows (more rows:
it loops over row chunks; the weight tile then comes again from L2). The grid is (column tiles, slots) with
min(E, M) slots: slot s takes the s-th expert that has rows, found on the device from ``offsets`` (or
``masked_m``) by a prefix count, so an expert without rows costs no program and the grid depends on shapes only
(CUDA-graph capturable, no host sync).

Epilogues as in the prefill kernel, by constexpr switch: FP8 block scales (W 128x128 per block, A 1x128 per row and
K step), SWIGLU (two accumulators: gate rows and the up rows ``up_row`` further on; silu(gate) * up in fp32),
QUANT_OUT (the SwiGLU output re-quantised to e4m3 with one scale per row and 128 columns: BLOCK_N = 128 is one
scale group), ROW_WEIGHT (routing weight per row), MASKED (A [E, max_m, K] with ``masked_m`` valid rows).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import arrival_counters, pdl_kwargs, pdl_start
from .quant import E4M3_MAX, group_amax, to_e4m3_rne

__all__ = ["launch", "block_t_for", "split_k_for"]

_SB = tl.constexpr(128)  # the K (and weight N) extent of one FP8 scale block


@triton.jit
def _find_expert(slot, E, offsets_ptr, masked_m_ptr, max_m, MASKED: tl.constexpr, E_PAD: tl.constexpr):
    """The slot-th expert that has rows (in expert order), its first row and its row count; count 0: none."""
    idx = tl.arange(0, E_PAD)
    in_range = idx < E
    if MASKED:
        counts = tl.load(masked_m_ptr + idx, mask=in_range, other=0)
        starts = idx * max_m
    else:
        starts = tl.load(offsets_ptr + idx, mask=in_range, other=0)
        counts = tl.load(offsets_ptr + idx + 1, mask=in_range, other=0) - starts
    busy = counts > 0
    rank = tl.cumsum(busy.to(tl.int32), axis=0)  # 1-based rank among the experts with rows
    hit = busy & (rank == slot + 1)
    expert = tl.sum(tl.where(hit, idx, 0), axis=0)
    row_start = tl.sum(tl.where(hit, starts, 0), axis=0)
    count = tl.sum(tl.where(hit, counts, 0), axis=0)  # 0 when fewer than slot + 1 experts have rows
    return expert, row_start, count


@triton.jit
def _dot_16_32(x, y, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x @ y for 16- and 32-bit float tiles (fp32 products exact with IEEE)."""
    if UPCAST:  # Triton's CPU interpreter multiplies 16-bit float tiles wrongly: upcast there
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    if IEEE:
        return tl.dot(x, y, acc, input_precision="ieee")
    return tl.dot(x, y, acc)


@triton.jit
def _epilogue(acc, acc_u, offs_t, t_mask, offs_n, n_mask, tile_n, row_weight_ptr, out_ptr, out_scale_ptr,
              stride_om, stride_osm, SWIGLU: tl.constexpr, QUANT_OUT: tl.constexpr, ROW_WEIGHT: tl.constexpr):
    """SwiGLU, routing weight, optional e4m3 re-quantisation; stores the [BLOCK_N, BLOCK_T] tile transposed."""
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_u
    if ROW_WEIGHT:
        acc = acc * tl.load(row_weight_ptr + offs_t, mask=t_mask, other=0.0)[None, :]
    out_ptrs = out_ptr + offs_t[None, :].to(tl.int64) * stride_om + offs_n[:, None]
    mask = n_mask[:, None] & t_mask[None, :]
    if QUANT_OUT:
        # BLOCK_N == 128: a column of this tile is one row's 1x128 scale group
        amax = group_amax(tl.where(mask, acc, 0.0), 0)  # NaN in the group: a NaN scale (as the reference)
        scale = tl.div_rn(amax, tl.full(amax.shape, E4M3_MAX, tl.float32))  # IEEE: the reference's scale
        q = to_e4m3_rne(tl.div_rn(acc, tl.broadcast_to(scale[None, :], acc.shape)))
        tl.store(out_ptrs, q.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_scale_ptr + offs_t * stride_osm + tile_n, scale, mask=t_mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_gemm_decode_kernel(
    a_ptr, a_desc, a_scale_ptr, w_ptr, w_desc, w_scale_ptr, offsets_ptr, masked_m_ptr, row_weight_ptr, out_ptr,
    out_scale_ptr, ws_ptr, sem_ptr,
    M, N, K, E, max_m, w_rows, up_row, slots,
    stride_am, stride_asm, stride_ask, stride_we, stride_wn, stride_wk, stride_wse, stride_wsn, stride_wsk,
    stride_om, stride_osm,
    FP8: tl.constexpr, SWIGLU: tl.constexpr, QUANT_OUT: tl.constexpr, ROW_WEIGHT: tl.constexpr,
    MASKED: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_TMA: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_start(PDL)  # before any load (_find_expert reads offsets)
    # SPLIT_K > 1: SPLIT_K programs share a (column tile, expert), each streaming one slice of K; each stores its
    # fp32 partials in the workspace ws [SPLIT_K, rows, 2N or N] and counts itself in the pair's semaphore; the
    # last to arrive sums the slices in slice order (the result does not depend on who came last) and runs the
    # epilogue. That keeps every SM streaming weights when few (expert, tile) pairs exist (one token, one expert).
    tile_n = tl.program_id(0) // SPLIT_K
    split = tl.program_id(0) % SPLIT_K
    slot = tl.program_id(1)
    expert, row_start, count = _find_expert(slot, E, offsets_ptr, masked_m_ptr, max_m, MASKED, E_PAD)
    if count == 0:
        return
    expert64 = expert.to(tl.int64)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's output columns = weight rows
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_steps = tl.cdiv(K, BLOCK_K)
    k_per = tl.cdiv(k_steps, SPLIT_K)  # whole BLOCK_K steps per slice
    kb_lo = split * k_per
    kb_hi = tl.minimum(kb_lo + k_per, k_steps)
    # MMA A operand: a [BLOCK_N, BLOCK_K] tile of W's K-contiguous rows; the up rows sit up_row rows further on
    g_base = w_ptr + expert64 * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + \
        (kb_lo * BLOCK_K + offs_k[None, :]) * stride_wk
    if FP8:
        # BLOCK_N divides 128 (the launcher checks): the tile's rows share one weight-scale block per K step
        gs_base = w_scale_ptr + expert64 * stride_wse + (tile_n * BLOCK_N // _SB) * stride_wsn
        us_base = w_scale_ptr + expert64 * stride_wse + ((tile_n * BLOCK_N + up_row) // _SB) * stride_wsn
    WN: tl.constexpr = 2 if SWIGLU else 1  # workspace columns per output column
    g_row = expert * w_rows + tile_n * BLOCK_N  # TMA: the tile's first row in W viewed as [E * w_rows, K]

    for t0 in range(0, count, BLOCK_T):
        offs_t = row_start + t0 + tl.arange(0, BLOCK_T)  # rows of A (tokens) = the MMA's N side
        t_mask = (t0 + tl.arange(0, BLOCK_T)) < count
        # MMA B operand: A^T as [BLOCK_K, BLOCK_T], K-contiguous per row (K-major, as FP8 wgmma wants it)
        a_ptrs = a_ptr + offs_t[None, :].to(tl.int64) * stride_am + (kb_lo * BLOCK_K + offs_k[:, None])
        g_ptrs = g_base
        acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)  # the up half; unused without SWIGLU
        for kb in range(kb_lo, kb_hi):
            if USE_TMA:
                # whole tiles through TMA: rows past the expert's (another expert's, or zero fill) are never stored
                g = w_desc.load([g_row, kb * BLOCK_K])
                if SWIGLU:
                    u = w_desc.load([g_row + up_row, kb * BLOCK_K])
                a = a_desc.load([row_start + t0, kb * BLOCK_K]).T
            elif EVEN_K:
                a = tl.load(a_ptrs, mask=t_mask[None, :], other=0.0)
                g = tl.load(g_ptrs, mask=n_mask[:, None], other=0.0)
                if SWIGLU:
                    u = tl.load(g_ptrs + up_row * stride_wn, mask=n_mask[:, None], other=0.0)
            else:
                k_mask = (kb * BLOCK_K + offs_k) < K
                a = tl.load(a_ptrs, mask=k_mask[:, None] & t_mask[None, :], other=0.0)
                g = tl.load(g_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                if SWIGLU:
                    u = tl.load(g_ptrs + up_row * stride_wn, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K * stride_wk
            if FP8:
                sa = tl.load(a_scale_ptr + offs_t * stride_asm + kb * stride_ask, mask=t_mask, other=0.0)[None, :]
                acc += tl.dot(g, a) * (tl.load(gs_base + kb * stride_wsk) * sa)
                if SWIGLU:
                    acc_u += tl.dot(u, a) * (tl.load(us_base + kb * stride_wsk) * sa)
            else:
                acc = _dot_16_32(g, a, acc, IEEE, UPCAST)
                if SWIGLU:
                    acc_u = _dot_16_32(u, a, acc_u, IEEE, UPCAST)
        if SPLIT_K > 1:
            part = ws_ptr + (split * M + offs_t[None, :].to(tl.int64)) * (WN * N) + offs_n[:, None]
            tl.store(part, acc, mask=n_mask[:, None] & t_mask[None, :])
            if SWIGLU:
                tl.store(part + N, acc_u, mask=n_mask[:, None] & t_mask[None, :])
        else:
            _epilogue(acc, acc_u, offs_t, t_mask, offs_n, n_mask, tile_n, row_weight_ptr, out_ptr, out_scale_ptr,
                      stride_om, stride_osm, SWIGLU, QUANT_OUT, ROW_WEIGHT)

    if SPLIT_K > 1:
        tl.debug_barrier()  # every thread's partials are written before the release below
        if tl.atomic_add(sem_ptr + tile_n * slots + slot, 1, sem="acq_rel") == SPLIT_K - 1:
            tl.store(sem_ptr + tile_n * slots + slot, 0)  # all slices arrived: left at 0 for the next launch
            tl.debug_barrier()
            for t0 in range(0, count, BLOCK_T):
                offs_t = row_start + t0 + tl.arange(0, BLOCK_T)
                t_mask = (t0 + tl.arange(0, BLOCK_T)) < count
                part = ws_ptr + offs_t[None, :].to(tl.int64) * (WN * N) + offs_n[:, None]
                mask = n_mask[:, None] & t_mask[None, :]
                acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
                acc_u = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
                for s in range(SPLIT_K):  # slice order: the sum does not depend on who arrived last
                    acc += tl.load(part + s * M * (WN * N), mask=mask, other=0.0, cache_modifier=".cg")
                    if SWIGLU:
                        acc_u += tl.load(part + s * M * (WN * N) + N, mask=mask, other=0.0, cache_modifier=".cg")
                _epilogue(acc, acc_u, offs_t, t_mask, offs_n, n_mask, tile_n, row_weight_ptr, out_ptr,
                          out_scale_ptr, stride_om, stride_osm, SWIGLU, QUANT_OUT, ROW_WEIGHT)


def block_t_for(rows: int, num_experts: int) -> int:
    """The token tile for ``rows`` rows over ``num_experts`` experts: about twice the mean rows an expert gets
    (routing is uneven), a power of two in [16, 64] (16: the smallest MMA N side Triton builds)."""
    mean = -(-max(rows, 1) // max(num_experts, 1))
    return min(64, max(16, triton.next_power_of_2(2 * mean)))


def launch(a, a_scale, w, w_scale, out, *, offsets=None, masked_m=None, max_m=0, out_scale=None,
           row_weight=None, swiglu=False, cfg=None, interpret=False, use_tma=False):
    """Run the decode kernel on 2-D a [M, K] (masked: [E * max_m, K]) and w [E, w_rows, K] (any strides).

    Same contract as ``grouped_gemm._launch``: ``out`` [M, N] (N = w_rows, or w_rows / 2 with ``swiglu``);
    ``out_scale`` [M, N / 128] makes the SwiGLU epilogue quantise to e4m3. ``cfg``: BLOCK_N, BLOCK_T, BLOCK_K,
    num_warps, num_stages (other keys are ignored). ``use_tma``: the caller found a and w TMA-able (Hopper,
    aligned, contiguous W); the pointer path holds a [BLOCK_N, BLOCK_K] tile of 64-bit addresses per operand in
    registers and Triton does not pipeline it. Returns the compiled kernel, or None when nothing runs.
    """
    fp8 = w_scale is not None
    E, w_rows, K = w.shape
    N = w_rows // 2 if swiglu else w_rows
    M = a.shape[0]
    masked = masked_m is not None
    if M == 0 or N == 0 or E == 0:
        return None
    BN, BT, BK = int(cfg["BLOCK_N"]), int(cfg["BLOCK_T"]), int(cfg["BLOCK_K"])
    if not fp8:
        BK = min(BK, 128 // a.element_size())  # a 16-bit (32-bit) stage of BLOCK_N x BLOCK_K: 16 (32) KB per W tile
    if out_scale is not None:
        BN = 128  # the quantising epilogue writes one scale group per tile column
    if fp8 and (BK != 128 or 128 % BN):
        raise ValueError(f"the FP8 decode kernel needs BLOCK_K=128 and BLOCK_N dividing 128, got {cfg}")
    slots = E if masked else min(E, M)
    tiles = triton.cdiv(N, BN)
    k_steps = triton.cdiv(K, BK)
    stages = int(cfg.get("num_stages", 4))
    split = int(cfg.get("SPLIT_K", 0)) or split_k_for(
        tiles * slots, k_steps, a.device, stage_bytes(BN, BT, BK, a.element_size(), swiglu), stages,
        (2 if swiglu else 1) * BN * BK * w.element_size())
    split = triton.cdiv(k_steps, triton.cdiv(k_steps, max(1, min(split, k_steps))))  # no empty slice
    dummy = offsets if offsets is not None else masked_m
    if use_tma:  # the caller checked that this Triton has host descriptors (grouped_gemm._tma_usable)
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: PLC0415

        a_desc = TensorDescriptor(a, list(a.shape), [a.stride(0), 1], [BT, BK])
        w_desc = TensorDescriptor(w.view(E * w_rows, K), [E * w_rows, K], [K, 1], [BN, BK])
    else:
        a_desc, w_desc = a, w
    if split > 1:  # fp32 partials per slice, and one arrival counter per (column tile, slot)
        rows = a.shape[0]
        ws = torch.empty(split * rows * (2 if swiglu else 1) * N, dtype=torch.float32, device=a.device)
        sem = arrival_counters(a.device, tiles * slots)  # zero, and left at zero by the kernel
    else:
        ws, sem = out, dummy  # unused
    grid = (tiles * split, slots)
    return _grouped_gemm_decode_kernel[grid](
        a, a_desc, a_scale if fp8 else dummy, w, w_desc, w_scale if fp8 else dummy,
        offsets if offsets is not None else dummy, masked_m if masked else dummy,
        row_weight if row_weight is not None else dummy, out, out_scale if out_scale is not None else dummy,
        ws, sem, a.shape[0], N, K, E, max_m, w_rows, N, slots,
        a.stride(0), a_scale.stride(0) if fp8 else 0, a_scale.stride(1) if fp8 else 0,
        w.stride(0), w.stride(1), w.stride(2),
        w_scale.stride(0) if fp8 else 0, w_scale.stride(1) if fp8 else 0, w_scale.stride(2) if fp8 else 0,
        out.stride(0), out_scale.stride(0) if out_scale is not None else 0,
        FP8=fp8, SWIGLU=swiglu, QUANT_OUT=out_scale is not None, ROW_WEIGHT=row_weight is not None,
        MASKED=masked, EVEN_K=K % BK == 0, IEEE=a.dtype == torch.float32 or interpret,
        UPCAST=interpret and not fp8, BLOCK_N=BN, BLOCK_T=BT, BLOCK_K=BK,
        E_PAD=max(16, triton.next_power_of_2(E)), SPLIT_K=split, USE_TMA=use_tma,
        # two warpgroups from BLOCK_T = 32 on: the two [BLOCK_N, BLOCK_T] fp32 accumulators fit without spills
        num_warps=max(int(cfg.get("num_warps", 4)), 8 if BT > 16 else 4), num_stages=stages, **pdl_kwargs(a.device),
    )


def stage_bytes(block_n: int, block_t: int, block_k: int, element_size: int, swiglu: bool) -> int:
    """Shared memory of one pipeline stage: the weight tile (two with SwiGLU: gate and up) and the token tile."""
    return ((2 if swiglu else 1) * block_n + block_t) * block_k * element_size


MIN_SLICE_BYTES = 192 << 10  # weight bytes a K slice streams at least: a split's fixed cost needs this to pay


def split_k_for(programs: int, k_steps: int, device: torch.device, stage_bytes: int = 0, stages: int = 1,
                step_weight_bytes: int = 0) -> int:
    """K slices per (column tile, slot) so that the programs fill the SMs in one wave: ``programs`` is the upper
    bound of (tile, slot) pairs (slots = min(E, rows)), so fewer experts with rows only means idler SMs, never a
    wrong result. Each slice keeps at least 4 K steps (the pipeline's depth) and, given ``step_weight_bytes`` (the
    weight bytes of one K step), at least MIN_SLICE_BYTES of weights: on an H100 (`probe_decode.py`, 2026-12-07)
    the down projection (K 2048: 16 steps of 16 KiB, 256 KiB a tile) ran fastest unsplit even with 56 or 112
    programs (6.4-6.6 us against 7.1-8.4 split 2-4; 7.7 against 9.3-13.5), while the SwiGLU projection (K 7168:
    1.75 MiB a tile) gained from 4-8 slices at 32-64 programs (28.9 -> 13.3-13.8 us; 33.3 -> 28.0-28.8).

    A wave is ``resident_per_sm`` programs an SM (at most 2; 1 where the stage ring of ``stages`` x ``stage_bytes``
    takes more than half the SM's shared memory, as the SwiGLU kernel's 4 stages of 2 x 16 KiB weight tiles do).
    The slice count rounds down: a second, partial wave would run its few programs alone after the first, each
    refilling its pipeline from cold, while the weight bytes in flight per SM do not grow with the split."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    capacity = resident_per_sm(index, stages * stage_bytes) * _sm_count(index)
    by_bytes = k_steps * step_weight_bytes // MIN_SLICE_BYTES if step_weight_bytes else k_steps
    return max(1, min(capacity // max(programs, 1), k_steps // 4, by_bytes))


def resident_per_sm(index: int, smem_bytes: int) -> int:
    """Programs of ``smem_bytes`` of shared memory (plus 2 KiB: the driver's reserve and the kernel's barriers and
    epilogue scratch) one SM of device ``index`` holds, capped at 2."""
    per_sm = _smem_per_sm(index)
    return max(1, min(2, per_sm // (smem_bytes + 2048)))


@functools.lru_cache(maxsize=None)
def _smem_per_sm(index: int) -> int:
    return int(getattr(torch.cuda.get_device_properties(index), "shared_memory_per_multiprocessor", 233472))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
