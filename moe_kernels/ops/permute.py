"""Permutation: group the (token, k) pairs by expert (optionally quantising to FP8), and the weighted way back.

permute runs one kernel up to INLINE_PAIRS pairs, two up to SINGLE_PROGRAM_PAIRS, three beyond, and no host sync.
Pairs p = t*k + j are in (token, k) order, so ranking each pair among the earlier pairs of its expert keeps one
expert's rows in ascending token order (stable).
  0. Up to INLINE_PAIRS pairs (decode batches) there is no index kernel: each _scatter_kernel program reads all the
     ids and finds its pairs' rows itself (row of p = pairs of lower experts + earlier pairs of p's expert: a
     [k, n] compare), and its first program writes offsets from the ids' histogram. One launch less on the
     decode path, where a launch costs more than the work.
  1. _index_kernel: walks its pairs CHUNK at a time with a running per-expert count: a pair's rank is the count
     of its expert before the chunk (a gather) plus its earlier same-expert pairs inside the chunk (a [CHUNK,
     CHUNK] compare); the count then takes the chunk's histogram. Costs O(CHUNK) per pair, whatever E is.
     Up to SINGLE_PROGRAM_PAIRS pairs one program ranks them all and writes offsets [E+1] itself.
     Beyond, programs take blocks of PAIRS pairs (ranks within the block, counts -> hist [blocks, E]) and
     _scan_kernel (one program) turns hist into base [blocks, E] (exclusive sums down the blocks) and offsets.
  2. _scatter_kernel: per token, row = offsets[e] (+ base[block, e]) + rank for each of its k pairs (-> slot,
     token_index); the token row is read once and written to its k rows, quantised on the way with fp8.
unpermute is one kernel: per token, the k rows are gathered and summed in fp32 with their routing weights.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .._checks import FP8_DTYPE, check_int, check_multiple, check_tensor, value_checks_enabled
from ..reference.permute import Permuted
from ._common import pdl_kwargs, pdl_start, use_triton
from .quant import quantize_groups

__all__ = ["permute", "unpermute", "Permuted"]

FP8_GROUP = 128
MAX_PAIRS = 2**31 - 1  # T*k: rows, slots and offsets are int32
# Up to this many pairs one program (one SM) ranks them all, saving the scan launch (~20-30 us of host time).
# Measured on an H200 (bench/results/routing-threshold16384-NVIDIA_H200.json): one program takes ~3 us per
# 128-pair chunk (a serial chain of reductions), so permute at T=4096 k=2 (8192 pairs) took 263 us against 177 us
# for 4x the pairs on the multi-block path. Below ~1024 pairs (8 chunks, ~25 us) the saved launch still pays.
SINGLE_PROGRAM_PAIRS = 1024
INDEX_CHUNK = 128  # pairs per step of _index_kernel: a [128, 128] compare tile
# Up to this many pairs (T = 64 at top-8) the scatter kernel ranks its own pairs (a [k, INLINE_PAIRS] compare per
# program, the ids read from L2) and the index kernel is not launched.
INLINE_PAIRS = 512


@triton.jit
def _index_kernel(ids_ptr, rank_ptr, counts_ptr, n_pairs, pairs_per_block, E,
                  SINGLE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    b = tl.program_id(0).to(tl.int64)
    lo = b * pairs_per_block
    hi = tl.minimum(lo + pairs_per_block, n_pairs)
    local = tl.arange(0, CHUNK)
    earlier = local[None, :] < local[:, None]  # [i, j]: pair j comes before pair i
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)  # pairs of each expert before the current chunk
    e_next = tl.load(ids_ptr + lo + local, mask=lo + local < hi, other=0).to(tl.int32)
    for c in range(lo, hi, CHUNK):
        offs = c + local
        mask = offs < hi  # the tail sits at the chunk's end: a valid pair never has a masked earlier pair
        e = e_next
        # the loop is latency-bound: fetch the next chunk's ids before working on this one
        e_next = tl.load(ids_ptr + offs + CHUNK, mask=offs + CHUNK < hi, other=0).to(tl.int32)
        same = (e[:, None] == e[None, :]) & earlier
        rank = tl.gather(counts, e, 0) + tl.sum(same.to(tl.int32), axis=1)
        tl.store(rank_ptr + offs, rank, mask=mask)
        counts += tl.histogram(e, BLOCK_E, mask=mask)
    cols = tl.arange(0, BLOCK_E)
    if SINGLE:  # counts_ptr is offsets [E+1]
        tl.store(counts_ptr + cols, tl.cumsum(counts, axis=0) - counts, mask=cols < E)
        tl.store(counts_ptr + E, tl.sum(counts, axis=0))
    else:  # counts_ptr is hist [blocks, E]
        tl.store(counts_ptr + b * E + cols, counts, mask=cols < E)


@triton.jit
def _scan_kernel(hist_ptr, base_ptr, offsets_ptr, n_blocks, E, ROWS: tl.constexpr, BLOCK_E: tl.constexpr,
                 PDL: tl.constexpr = False):
    pdl_start(PDL)
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < E
    carry = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for r0 in range(0, n_blocks, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        mask = (rows < n_blocks)[:, None] & col_mask[None, :]
        ptrs = rows[:, None].to(tl.int64) * E + cols[None, :]
        tile = tl.load(hist_ptr + ptrs, mask=mask, other=0)
        tl.store(base_ptr + ptrs, tl.cumsum(tile, axis=0) - tile + carry[None, :], mask=mask)
        carry += tl.sum(tile, axis=0)
    tl.store(offsets_ptr + cols, tl.cumsum(carry, axis=0) - carry, mask=col_mask)
    tl.store(offsets_ptr + E, tl.sum(carry, axis=0))


@triton.jit
def _scatter_kernel(x_ptr, ids_ptr, rank_ptr, offsets_ptr, base_ptr, slot_ptr, token_index_ptr, out_ptr, scale_ptr,
                    H, E, pairs_per_block, stride_x, stride_out, stride_scale, TOP_K: tl.constexpr,
                    BLOCKED: tl.constexpr, FP8: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
                    INLINE: tl.constexpr = False, N_PAD: tl.constexpr = 1, BLOCK_E: tl.constexpr = 1,
                    PDL: tl.constexpr = False):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    if INLINE:  # no index kernel ran: every pair's expert, here (pairs_per_block is the pair count)
        pq = tl.arange(0, N_PAD)
        pq_ok = pq < pairs_per_block
        eq = tl.load(ids_ptr + pq, mask=pq_ok, other=0).to(tl.int32)
        if (t == 0) & (pid_h == 0):  # offsets [E+1]: exclusive sums of the histogram
            counts = tl.histogram(eq, BLOCK_E, mask=pq_ok)
            cols = tl.arange(0, BLOCK_E)
            tl.store(offsets_ptr + cols, tl.cumsum(counts, axis=0) - counts, mask=cols < E)
            tl.store(offsets_ptr + E, tl.sum(counts, axis=0))
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    x = tl.load(x_ptr + t * stride_x + offs_h, mask=h_mask, other=0.0)
    if FP8:
        NG: tl.constexpr = BLOCK_H // GROUP
        q, scale = quantize_groups(tl.reshape(x.to(tl.float32), (NG, GROUP)))
        val = tl.reshape(q, (BLOCK_H,)).to(out_ptr.dtype.element_ty)
        offs_g = pid_h * NG + tl.arange(0, NG)
        g_mask = offs_g * GROUP < H
    else:
        val = x
    for j in tl.static_range(TOP_K):
        p = t * TOP_K + j
        e = tl.load(ids_ptr + p).to(tl.int64)
        if INLINE:  # pairs of lower experts, then p's expert's earlier pairs
            before = pq_ok & ((eq < e) | ((eq == e) & (pq < p)))
            row = tl.sum(before.to(tl.int32), axis=0)
        else:
            row = tl.load(offsets_ptr + e) + tl.load(rank_ptr + p)
        if BLOCKED:
            row += tl.load(base_ptr + (p // pairs_per_block) * E + e)
        if pid_h == 0:
            tl.store(slot_ptr + p, row)
            tl.store(token_index_ptr + row, t.to(tl.int32))
        row = row.to(tl.int64)
        tl.store(out_ptr + row * stride_out + offs_h, val, mask=h_mask)
        if FP8:
            tl.store(scale_ptr + row * stride_scale + offs_g, scale, mask=g_mask)


@triton.jit
def _unpermute_kernel(y_ptr, slot_ptr, w_ptr, out_ptr, add_ptr, H, stride_y, stride_out, stride_add,
                      TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, ADD: tl.constexpr = False, PDL: tl.constexpr = False):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    if ADD:  # a row added to the sum (the shared experts' output), in fp32 before the one rounding
        acc += tl.load(add_ptr + t * stride_add + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(slot_ptr + t * TOP_K + j).to(tl.int64)
        w = tl.load(w_ptr + t * TOP_K + j)
        acc += w * tl.load(y_ptr + row * stride_y + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_out + offs_h, acc.to(out_ptr.dtype.element_ty), mask=h_mask)


@triton.jit
def _unpermute_backward_kernel(g_ptr, y_ptr, slot_ptr, w_ptr, gy_ptr, gw_part_ptr, H, stride_g, stride_y, stride_gy,
                               NB, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, NEED_GY: tl.constexpr,
                               NEED_GW: tl.constexpr):
    """unpermute's backward for token t and one column block: y's row slot[t, j] gets w[t, j] * g[t] (a scatter
    with no collisions: slot is a permutation), and w[t, j] the block's part of <g[t], y[slot[t, j]]> (fp32,
    summed over the NB blocks afterwards, in block order)."""
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    g = tl.load(g_ptr + t * stride_g + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(slot_ptr + t * TOP_K + j).to(tl.int64)
        if NEED_GY:
            w = tl.load(w_ptr + t * TOP_K + j)
            tl.store(gy_ptr + row * stride_gy + offs_h, (w * g).to(gy_ptr.dtype.element_ty), mask=h_mask)
        if NEED_GW:
            yv = tl.load(y_ptr + row * stride_y + offs_h, mask=h_mask, other=0.0).to(tl.float32)
            tl.store(gw_part_ptr + (t * TOP_K + j) * NB + hb, tl.sum(g * yv, axis=0))


def _row_block(H: int, fp8: bool) -> int:
    """Columns per program of the row kernels: up to 1024 for bf16, 2048 for fp8 rows, so that each of 4 warps' threads
    stores 16 bytes a row either way (the H200 sweep in results/routing_sweep-hwcvt-NVIDIA_H200.json: fp8 k=8
    T=4096 121 us at 2048 columns, 128 us at 1024)."""
    return min(2048 if fp8 else 1024, max(FP8_GROUP if fp8 else 16, triton.next_power_of_2(H)))


def _pairs_per_block(n: int) -> int:
    """Pairs per program of the multi-block index path: about 1024 blocks (a short scan), CHUNK..8192 pairs each."""
    return min(8192, max(INDEX_CHUNK, triton.next_power_of_2(triton.cdiv(n, 1024))))


def _permute_triton(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, fp8: bool, block_h=None, num_warps=4):
    T, H = x.shape
    k = topk_ids.shape[1]
    n, E, dev = T * k, num_experts, x.device
    out = torch.empty(n, H, dtype=FP8_DTYPE if fp8 else x.dtype, device=dev)
    scale = torch.empty(n, H // FP8_GROUP if fp8 else 0, dtype=torch.float32, device=dev)
    slot = torch.empty(T, k, dtype=torch.int32, device=dev)
    token_index = torch.empty(n, dtype=torch.int32, device=dev)
    if n == 0:
        return out, scale, torch.zeros(E + 1, dtype=torch.int32, device=dev), token_index, slot
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()  # int32 or int64, read flat, as is
    BLOCK_E = max(32, triton.next_power_of_2(E))  # 32: at least one histogram bin per lane
    launch = pdl_kwargs(dev)
    single = n <= SINGLE_PROGRAM_PAIRS
    inline = n <= INLINE_PAIRS
    # of each pair among its expert's earlier pairs (in its block); inline: not read
    rank = ids if inline else torch.empty(n, dtype=torch.int32, device=dev)
    if inline:
        PAIRS, base = n, offsets  # base is not read; the scatter kernel writes offsets
    elif single:
        PAIRS, base = n, offsets  # base is not read
        _index_kernel[(1,)](ids, rank, offsets, n, n, E, SINGLE=True, CHUNK=INDEX_CHUNK, BLOCK_E=BLOCK_E,
                            num_warps=8, **launch)
    else:
        PAIRS = _pairs_per_block(n)
        blocks = triton.cdiv(n, PAIRS)
        hist = torch.empty(blocks, E, dtype=torch.int32, device=dev)
        base = torch.empty(blocks, E, dtype=torch.int32, device=dev)
        _index_kernel[(blocks,)](ids, rank, hist, n, PAIRS, E, SINGLE=False, CHUNK=INDEX_CHUNK, BLOCK_E=BLOCK_E,
                                 num_warps=8, **launch)
        _scan_kernel[(1,)](hist, base, offsets, blocks, E, ROWS=max(1, min(64, 8192 // BLOCK_E)), BLOCK_E=BLOCK_E,
                           num_warps=8, **launch)
    BLOCK_H = block_h or _row_block(H, fp8)
    _scatter_kernel[(T, triton.cdiv(H, BLOCK_H))](
        x, ids, rank, offsets, base, slot, token_index, out, scale, H, E, PAIRS, x.stride(0), out.stride(0),
        max(scale.stride(0), 1), TOP_K=k, BLOCKED=not single, FP8=fp8, BLOCK_H=BLOCK_H, GROUP=FP8_GROUP,
        INLINE=inline, N_PAD=max(16, triton.next_power_of_2(n)) if inline else 1, BLOCK_E=BLOCK_E,
        num_warps=num_warps, **launch,
    )
    return out, scale, offsets, token_index, slot


@torch.library.custom_op("moe_kernels::permute", mutates_args=())
def _permute_op(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, fp8: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return _permute_triton(x if x.stride(-1) == 1 else x.contiguous(), topk_ids, num_experts, fp8)
    p = reference.permute(x, topk_ids, num_experts, fp8=fp8)
    scale = p.scale if p.scale is not None else x.new_empty(p.x.shape[0], 0, dtype=torch.float32)
    return p.x, scale, p.offsets, p.token_index, p.slot


@_permute_op.register_fake
def _(x, topk_ids, num_experts, fp8):
    T, H = x.shape
    k = topk_ids.shape[1]
    return (x.new_empty(T * k, H, dtype=FP8_DTYPE if fp8 else x.dtype),
            x.new_empty(T * k, H // FP8_GROUP if fp8 else 0, dtype=torch.float32),
            x.new_empty(num_experts + 1, dtype=torch.int32), x.new_empty(T * k, dtype=torch.int32),
            x.new_empty(T, k, dtype=torch.int32))


def _permute_setup(ctx, inputs, output):
    x, _, _, fp8 = inputs
    ctx.fp8, ctx.x_shape, ctx.x_dtype = fp8, x.shape, x.dtype
    ctx.set_materialize_grads(False)  # scale, offsets, token_index, slot: no zero-filled gradients for them
    ctx.save_for_backward(output[3], output[4])  # token_index, slot


def _permute_backward(ctx, grad_rows, *_):
    """x's gradient: each token's k permuted rows' gradients summed in fp32 (a gather kernel; the reference path:
    index_add)."""
    if grad_rows is None:
        return None, None, None, None
    if ctx.fp8:
        raise RuntimeError("permute(fp8=True) has no backward: its rows are quantised to e4m3. Train with "
                           "bf16 or fp32 rows (MoELayer precision='bf16'), or run inference under torch.no_grad()")
    token_index, slot = ctx.saved_tensors
    if use_triton(grad_rows) and slot.numel():
        # x's row t gathers its k rows (slot[t, :]) and sums them in fp32: the unpermute op with unit weights
        # (deterministic; no atomics, no fp32 copy of the rows; an op, so that AOTAutograd can trace it)
        ones = torch.ones(slot.shape, dtype=torch.float32, device=slot.device)
        return _unpermute_op(grad_rows.to(ctx.x_dtype), slot, ones), None, None, None
    gx = torch.zeros(ctx.x_shape, dtype=torch.float32, device=grad_rows.device)
    gx.index_add_(0, token_index.long(), grad_rows.float())
    return gx.to(ctx.x_dtype), None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


def permute(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, fp8: bool = False) -> Permuted:
    """Group the rows of x by expert: row r of the result is token ``token_index[r]`` for expert e where
    ``offsets[e] <= r < offsets[e+1]``; inside one expert tokens keep ascending order. With ``fp8`` the rows are
    e4m3 with fp32 scales per 1x128 group (``scale`` [T*k, H/128]), quantised in the same pass.

    Args: x [T, H] bf16/fp16/fp32; topk_ids int32/int64 [T, k] in [0, num_experts). Returns a ``Permuted``
    (dropless: T*k rows, no padding, no host sync).
    """
    check_tensor("x", x, dtype=(torch.bfloat16, torch.float16, torch.float32), ndim=2)
    check_tensor("topk_ids", topk_ids, dtype=(torch.int32, torch.int64), ndim=2, device=x.device)
    check_int("num_experts", num_experts, lo=1)
    if topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids must have one row per token of x ({x.shape[0]}), got {topk_ids.shape[0]}")
    if topk_ids.numel() > MAX_PAIRS:
        raise ValueError(f"topk_ids has T*k = {topk_ids.numel()} (token, k) pairs; permute supports at most "
                         f"{MAX_PAIRS} (int32 row indices): split the batch")
    if fp8:
        check_multiple("x.shape[1] (hidden size) for fp8", x.shape[1], FP8_GROUP)
    if value_checks_enabled(x) and topk_ids.numel():
        lo, hi = torch.aminmax(topk_ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"topk_ids must lie in [0, {num_experts}), got values in [{lo}, {hi}]")
    xq, scale, offsets, token_index, slot = _permute_op(x, topk_ids, num_experts, bool(fp8))
    return Permuted(xq, scale if fp8 else None, offsets, token_index, slot)


def _unpermute_triton(y: torch.Tensor, slot: torch.Tensor, topk_weights: torch.Tensor, block_h=None, num_warps=4,
                      out_dtype=None, add=None):
    T, k = slot.shape
    H = y.shape[1]
    if add is not None and k == 0:
        return add.to(out_dtype or y.dtype, copy=True)
    out = (torch.empty if k else torch.zeros)(T, H, dtype=out_dtype or y.dtype, device=y.device)  # k = 0: empty sum
    if T * k and H:
        y = y if y.stride(-1) == 1 else y.contiguous()
        if add is not None and add.stride(-1) != 1:
            add = add.contiguous()
        BLOCK_H = block_h or _row_block(H, False)
        _unpermute_kernel[(T, triton.cdiv(H, BLOCK_H))](
            y, slot.contiguous(), topk_weights.float().contiguous(), out, add if add is not None else out, H,
            y.stride(0), out.stride(0), add.stride(0) if add is not None else 0,
            TOP_K=k, BLOCK_H=BLOCK_H, ADD=add is not None, num_warps=num_warps, **pdl_kwargs(y.device),
        )
    return out


def unpermute_add(y: torch.Tensor, permuted: Permuted, topk_weights: torch.Tensor, add: torch.Tensor,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inference only (no autograd): ``add + unpermute(y, permuted, topk_weights)`` in one kernel, summed in fp32
    and rounded once to ``out_dtype`` (default y's dtype). ``add`` [T, N] (the shared experts' output)."""
    T, k = permuted.slot.shape
    check_tensor("add", add, shape=(T, y.shape[1]), device=y.device)
    if use_triton(y):
        return _unpermute_triton(y, permuted.slot, topk_weights, out_dtype=out_dtype, add=add)
    out = _unpermute_op(y, permuted.slot, topk_weights)
    return (out.float() + add.float()).to(out_dtype or y.dtype)


@torch.library.custom_op("moe_kernels::unpermute", mutates_args=())
def _unpermute_op(y: torch.Tensor, slot: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    if use_triton(y):
        return _unpermute_triton(y, slot, topk_weights)
    if slot.numel() == 0:  # the reference cannot view an empty gather
        return y.new_zeros(slot.shape[0], y.shape[1])
    return reference.unpermute(y, Permuted(y, None, None, None, slot), topk_weights)


@_unpermute_op.register_fake
def _(y, slot, topk_weights):
    return y.new_empty(slot.shape[0], y.shape[1])


@torch.library.custom_op("moe_kernels::unpermute_backward", mutates_args=())
def _unpermute_backward_op(grad_out: torch.Tensor, y: torch.Tensor, slot: torch.Tensor, w: torch.Tensor, need_gy: bool,
                           need_gw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gy, gw) of unpermute by ``_unpermute_backward_kernel`` (empty where not wanted; T*k and N > 0): an op of
    its own, so that AOTAutograd can trace the backward on fake tensors."""
    T, k = slot.shape
    N = y.shape[1]
    g = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    yc = y if y.stride(-1) == 1 else y.contiguous()
    BLOCK_H = _row_block(N, False)
    NB = triton.cdiv(N, BLOCK_H)
    gy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if need_gy else y.new_empty(0)
    part = torch.empty(T, k, NB, dtype=torch.float32, device=y.device) if need_gw else None
    _unpermute_backward_kernel[(T, NB)](
        g, yc, slot.contiguous(), w.float().contiguous(), gy if need_gy else g, part if need_gw else g, N,
        g.stride(0), yc.stride(0), gy.stride(0) if need_gy else 0, NB, TOP_K=k, BLOCK_H=BLOCK_H,
        NEED_GY=need_gy, NEED_GW=need_gw, num_warps=4)
    return gy, part.sum(-1).to(w.dtype) if need_gw else w.new_empty(0)


@_unpermute_backward_op.register_fake
def _(grad_out, y, slot, w, need_gy, need_gw):
    return y.new_empty(y.shape) if need_gy else y.new_empty(0), w.new_empty(w.shape) if need_gw else w.new_empty(0)


def _unpermute_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # y, slot, topk_weights


def _unpermute_backward(ctx, grad_out):
    """out[t] = sum_j w[t, j] y[slot[t, j]]: y's row slot[t, j] gets w[t, j] grad_out[t] (slot is a permutation),
    w[t, j] gets <grad_out[t], y[slot[t, j]]>; in fp32, as the forward sums. One gather/scatter kernel where the
    forward ran one (no zero-filled copy, no torch index ops)."""
    y, slot, w = ctx.saved_tensors
    T, k = slot.shape
    N = y.shape[1]
    need_gy, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if use_triton(y) and T * k and N:
        gy, gw = _unpermute_backward_op(grad_out, y, slot, w, bool(need_gy), bool(need_gw))
        return gy if need_gy else None, None, gw if need_gw else None
    rows = slot.reshape(-1).long()
    g = grad_out.float()
    gy = gw = None
    if need_gy:
        gy = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
        gy[rows] = (g[:, None, :] * w.float()[:, :, None]).reshape(T * k, N)
        gy = gy.to(y.dtype)
    if need_gw:
        gw = (g[:, None, :] * y.float()[rows].view(T, k, N)).sum(-1).to(w.dtype)
    return gy, None, gw


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


def unpermute(y: torch.Tensor, permuted: Permuted, topk_weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * y[permuted.slot[t, j]], summed in fp32, written in y's dtype.

    Args: y [T*k, N] bf16/fp16/fp32 expert outputs in permuted row order; permuted: what ``permute`` returned;
    topk_weights [T, k].
    """
    check_tensor("y", y, dtype=(torch.bfloat16, torch.float16, torch.float32), ndim=2)
    if not isinstance(permuted, Permuted):
        raise TypeError(f"permuted must be the Permuted returned by permute, got {type(permuted).__name__}")
    T, k = permuted.slot.shape
    if y.shape[0] != T * k:
        raise ValueError(f"y must have T*k = {T * k} rows (one per permuted row), got {y.shape[0]}")
    check_tensor("permuted.slot", permuted.slot, dtype=(torch.int32, torch.int64), ndim=2, device=y.device)
    check_tensor("topk_weights", topk_weights, shape=(T, k), device=y.device)
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    if value_checks_enabled(y) and permuted.slot.numel():  # the kernel gathers y rows at these indices
        lo, hi = torch.aminmax(permuted.slot)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= T * k:
            raise ValueError(f"permuted.slot must lie in [0, {T * k}) (rows of y), got values in [{lo}, {hi}]: "
                             f"pass the Permuted that permute returned")
    return _unpermute_op(y, permuted.slot, topk_weights)
