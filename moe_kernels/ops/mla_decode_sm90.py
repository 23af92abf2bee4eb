"""Hopper (sm_90) MLA decode over a bf16 latent cache, in Gluon: TMA tiles through a stage ring, wgmma from shared
memory, exact online softmax, split-KV (merged by ``mla._mla_decode_reduce_kernel``), contiguous or paged cache.

Contract: that of ``mla._mla_decode_kernel`` (the Triton kernel) for bf16 queries over a bf16 or FP8 cache with C a
multiple of 64 (FP8: 128) up to 512 latent columns and R = 64 rope columns: program (head block of 64 query rows,
split, batch row); rows are the s_q x h queries of the batch row (row r is token r // h, which sees keys
0 .. seqlen - s_q + r // h). With one split it writes the normalised output in bf16, else the fp32 partial output
and its log-sum-exp (base 2).

Serial schedule (PIPE = 0; the FP8 cache's, and the bf16 cache's where the seesaw does not apply) of one program (8 warps = two warpgroups; 64 query rows; key tiles of 64):
  * shared memory: q [64, C] and q_rope [64, R] (loaded once), STAGES cache tiles [64, C] + [64, R] (a 64 x 576
    bf16 tile is 72 KiB: C/64 + 1 TMA copies of 64 x 64, each a 128-byte-swizzled column block), P [64, 64].
  * per tile: S = q K^T (C/64 + 1 wgmmas, K-major B, async) -> wait -> the stage of the tile before is free: the
    next tile's TMA copies go into it -> softmax in registers (base 2, masked past the split's end) -> the
    accumulator rescaled -> P to shared memory -> O += P V with V = the same cache tile read as an MN-major B
    operand [64 keys, C] (no second copy of the values).
  * the accumulator O [64, C] fp32 is split by columns between the warpgroups (warps [4, 2]: each holds
    [64, C/2], 128 registers a thread at C = 512); S [64, 64] likewise by keys, its row max and sum reduced
    across the two.
  * a tile that runs past the split's end (the last one) has the cache rows past it zeroed in shared memory
    before P V (they may hold any bits, NaN included; their weights are 0).

FP8 cache (uint8 rows of reference.mla_decode's layout): the stages hold the e4m3 tiles (C/128 copies of 64 x 128
bytes, half the bytes of bf16) and the bf16 rope; each step widens its e4m3 tile times the per-token scales into one
bf16 tile [64, C] in shared memory (rows past the split's end zeroed there), which S and P V then read. So q is
never quantised and the products are bf16 x bf16, as with the bf16 cache (serial schedule only: one widened tile).
``mla_decode_sm90_fp8`` holds the FP8 cache's seesaw with e4m3 products (q and the weights rounded to e4m3 as
well; opt-in: PIPE = 1 over the FP8 cache, ``schedule`` "fp8 seesaw").

PIPE = 1 (``launch(pipe=1)``, config GLUON=2, or $MOE_KERNELS_MLA_PIPE=1; bf16 cache with C a multiple of 128,
else the serial kernel runs): the "seesaw" schedule of FlashMLA's sm_90 decode kernel, written anew in Gluon.
Serially, the tensor cores wait during each tile's softmax; and with the q tile (72 KiB) and two stages (144 KiB)
in shared memory, any overlap of two tiles inside one program leaves no stage free to load the next tile into.
The seesaw gives the tiles to the warpgroups in turn instead (a warp-specialised region, 4 + 4 warps): warpgroup
0 takes the even tiles (stage 0), warpgroup 1 the odd ones (stage 1), each computes S of its own tile whole
(m64n64 wgmmas: twice the columns per instruction of the serial kernel, half the q re-reads), while both keep
their half of the output columns [64, C/2] and one running max passes between them through shared memory. Per
pair of tiles (a, b):
  wg0: softmax(S_a) with the max so far -> m_a --> O_L = O_L x exp2(m - m_a) + P_a V_a[:, :C/2]
  wg1:   (its P V of the pair before still runs)    m_a --> softmax(S_b) -> m_b, P_b --> O_R = O_R x
         exp2(m - m_b) + P_b V_b[:, C/2:]
  wg0: m_b --> P_a exp2(m_a - m_b) to shared memory --> O_L = O_L exp2(m_a - m_b) + P_b V_b[:, :C/2] || S of
       the next a
  wg1: P_a --> O_R += P_a V_a[:, C/2:] -> S of the next b
so one warpgroup's softmax runs under the other one's wgmmas. The values each product reads set when a stage half
may be refilled: wg0 loads the columns [0, C/2) of the next tiles (its own P V has read them), wg1 the columns
[C/2, C) and the rope; the next S waits for each half separately. A paged cache's block-table entries of the
next pair's tiles are read at the top of each pair, so their latency passes under the softmax and P V instead of
before each TMA issue (ninth session: paged ran 1.01-1.07x contiguous in graph replays before this; not yet
timed after). The rope queries stay in registers (wgmma A operand), which leaves the shared memory for a second
P tile (230 KB in all). Each warpgroup sums its own tiles' weights; the two row sums are added at the end. The
last pair is peeled (b may be missing; the tile past the split's end has its rows past the end zeroed by each
warpgroup in the columns it reads).
Registers: each warpgroup holds its output half (128 a thread), S (32) and the rope queries (16). The pair loops
index q and the stages with a loop-variant zero (``z``), so that LLVM does not hoist the 36 q K^T steps' shared-
memory descriptors out of the loop and keep them live (ptxas spilled 320-544 B of them; now none).
The bf16 cache's default (config GLUON=2) since it stopped spilling: on one H100 (2026-12-07, ninth session) it
ran 1.04-1.24x the serial kernel (results/mla_pipe-*.json) and, CUDA-graph replays beside FlashMLA in one process,
0.78-0.89x FlashMLA where the serial kernel ran 0.40-0.71x (results/mla-*.json). tests/test_mla_decode.py's GPU
tests and tools/gpu/mla_pipe.sh check and time it.

The Triton kernel stays for other GPUs, other shapes, the FP8 cache and the interpreter; ``mla.decode_kernel_name``
says which runs.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

__all__ = ["launch", "supports", "schedule", "uses_pipe", "uses_lookahead", "pipe_setting"]

BLOCK_H = 64  # query rows per program (one wgmma M)
BLOCK_N = 64  # keys per tile = the page size of a paged cache
CHUNK = 64  # columns per TMA copy: one 128-byte swizzle block of bf16
WG_REGS = 248  # PIPE: registers a thread of the second warpgroup (the worker partition) keeps
_BH = gl.constexpr(BLOCK_H)
_BN = gl.constexpr(BLOCK_N)
_CH = gl.constexpr(CHUNK)
# a CTA-wide barrier: gl.barrier in Triton 3.8, gl.thread_barrier before
_cta_barrier = getattr(gl, "thread_barrier", None) or getattr(gl, "barrier")


@gluon.jit
def _tile_row(t, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, PAGED: gl.constexpr):
    """The cache row (of the 2-D view the descriptors address) where key tile t starts. Paged: past the keys the
    table is not read (it may end there): block 0 stands in."""
    n0 = start + t * _BN
    if PAGED:
        blk = gl.load(block_table_ptr + b * stride_btb + n0 // _BN, mask=t < n_tiles, other=0)
        row = blk * _BN
    else:
        row = b * S_cap + n0
    return row.to(gl.int32)


@gluon.jit
def _issue_tile(t, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, kc_desc, kr_desc, kc_bufs, kr_bufs, ready,
                C: gl.constexpr, PAGED: gl.constexpr, STAGES: gl.constexpr, FP8: gl.constexpr = False):
    """TMA copies of key tile t (keys start + 64 t ...) into its stage, when t < n_tiles. 128-byte column blocks:
    64 bf16 columns a copy, or 128 e4m3 ones (FP8)."""
    pred = t < n_tiles
    row = _tile_row(t, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, PAGED)
    KCH: gl.constexpr = 2 * _CH if FP8 else _CH
    st = t % STAGES
    bar = ready.index(st)
    mbarrier.expect(bar, kc_desc.block_type.nbytes * (C // KCH) + kr_desc.block_type.nbytes, pred=pred)
    kc = kc_bufs.index(st)
    for j in gl.static_range(C // KCH):
        tma.async_copy_global_to_shared(kc_desc, [row, j * KCH], bar, kc.slice(j * KCH, KCH, dim=1), pred)
    tma.async_copy_global_to_shared(kr_desc, [row, 0], bar, kr_bufs.index(st), pred)


@gluon.jit
def _widen_fp8(kc8, kcb, row, t, start, end, ks_ptr, stride_ks, C: gl.constexpr):
    """FP8 cache: the e4m3 tile times each key's scale -> the bf16 tile the wgmmas read (keys past the split's end
    -> 0), then made visible to the tensor cores. 128 columns at a time (32 values a thread)."""
    cl: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [8, 1], [1, 0])
    kk = gl.arange(0, _BN, layout=gl.SliceLayout(1, cl))
    valid = start + t * _BN + kk < end
    sc = gl.load(ks_ptr + (row + kk).to(gl.int64) * stride_ks, mask=valid, other=0.0)
    for j in gl.static_range(C // (2 * _CH)):
        v = kc8.slice(j * 2 * _CH, 2 * _CH, dim=1).load(cl).to(gl.float32) * sc[:, None]
        v = gl.where(valid[:, None], v, 0.0)
        kcb.slice(j * 2 * _CH, 2 * _CH, dim=1).store(v.to(gl.bfloat16))
    fence_async_shared()
    _cta_barrier()


@gluon.jit
def _scores(t, q_smem, qr_smem, kc, kr_bufs, ready, s_zero, STAGES: gl.constexpr, WAIT: gl.constexpr = True):
    """Wait for tile t's stage (WAIT) and start S = q K^T on it (async): the latent columns kc, then the rope
    columns of the stage."""
    st = t % STAGES
    if WAIT:
        mbarrier.wait(ready.index(st), (t // STAGES) & 1)
    s = warpgroup_mma(q_smem, kc.permute((1, 0)), s_zero, use_acc=False, is_async=True)
    return warpgroup_mma(qr_smem, kr_bufs.index(st).permute((1, 0)), s, is_async=True)


@gluon.jit
def _softmax(s, t, start, end, keys, lim, m_i, l_i, acc, qk_scale, MULTI_Q: gl.constexpr, o_layout: gl.constexpr):
    """Online softmax step of tile t (base 2, keys past the split's end or a query's causal limit masked): the
    weights p [64, 64], the running max / sum, and the accumulator rescaled."""
    offs_n = start + t * _BN + keys
    if MULTI_Q:
        s = gl.where(offs_n[None, :] < lim[:, None], s * qk_scale, float("-inf"))
    else:
        s = gl.where((offs_n < end)[None, :], s * qk_scale, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees no key yet: no -inf - -inf
    alpha = gl.exp2(m_i - m_use)
    p = gl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + gl.sum(p, axis=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    return p, m_new, l_i, acc


@gluon.jit
def _stage_p(p, kc, t, start, end, p_smem, C: gl.constexpr):
    """P -> shared memory for P V. On a tile that runs past the split's end, the rows of V past it are zeroed first
    (they may hold any bits, NaN included, and 0 x NaN is NaN). Then every warp's stores are made visible to the
    tensor cores (fence + CTA barrier)."""
    if start + (t + 1) * _BN > end:
        zl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])
        z_rows = start + t * _BN + gl.arange(0, _BN, layout=gl.SliceLayout(1, zl))
        for j in gl.static_range(C // _CH):
            part = kc.slice(j * _CH, _CH, dim=1)
            v = part.load(zl)
            part.store(gl.where((z_rows < end)[:, None], v, gl.zeros_like(v)))
    p_smem.store(p.to(gl.bfloat16))
    fence_async_shared()
    _cta_barrier()


@gluon.jit
def _mla_decode_sm90_kernel(
    q_ptr, qr_ptr, kc_desc, kr_desc, ks_ptr, seqlens_ptr, block_table_ptr, o_ptr, lse_ptr,
    num_rows, num_heads, s_q, num_splits, qk_scale, S_cap,
    stride_qb, stride_qh, stride_qrb, stride_qrh, stride_ks, stride_btb, stride_ob, stride_oh, stride_os, stride_lb,
    stride_lh,
    C: gl.constexpr, R: gl.constexpr, PAGED: gl.constexpr, SPLIT: gl.constexpr, MULTI_Q: gl.constexpr,
    STAGES: gl.constexpr, FP8: gl.constexpr, num_warps: gl.constexpr, LOOKAHEAD: gl.constexpr = False,
):
    """The serial schedule: per tile S, wait, softmax, P V, wait.
    LOOKAHEAD (bf16 cache): S of tile t + 1 is started before the softmax of tile t, so the tensor cores compute
    it while the CUDA cores run the softmax; P V of tile t then waits with it (see ``launch``).
    FP8: the stages hold e4m3 tiles (half the bytes), widened with their scales into one bf16 tile per step
    (ks_ptr: the fp32 scale of cache row r at r * stride_ks)."""
    gl.static_assert(num_warps == 8, "two warpgroups")
    pid_h = gl.program_id(0)
    split = gl.program_id(1)
    b = gl.program_id(2).to(gl.int64)

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, 32, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, C // 2, 16])
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])  # 16-byte loads of q rows
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

    # q and q_rope of this head block -> shared memory (rows past num_rows are zeros)
    rows_ld = pid_h * _BH + gl.arange(0, _BH, layout=gl.SliceLayout(1, ld_layout))
    rmask = (rows_ld < num_rows)[:, None]
    cols_c = gl.arange(0, C, layout=gl.SliceLayout(0, ld_layout))
    cols_r = gl.arange(0, R, layout=gl.SliceLayout(0, ld_layout))
    q = gl.load(q_ptr + b * stride_qb + rows_ld[:, None] * stride_qh + cols_c[None, :], mask=rmask, other=0.0)
    qr = gl.load(qr_ptr + b * stride_qrb + rows_ld[:, None] * stride_qrh + cols_r[None, :], mask=rmask, other=0.0)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [_BH, C], smem_layout)
    qr_smem = gl.allocate_shared_memory(gl.bfloat16, [_BH, R], smem_layout)
    q_smem.store(q)
    qr_smem.store(qr)

    if FP8:
        kc_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, _BN, C], kc_desc.layout)
        kcb = gl.allocate_shared_memory(gl.bfloat16, [_BN, C], smem_layout)
    else:
        kc_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, _BN, C], smem_layout)
    kr_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, _BN, R], smem_layout)
    p_smem = gl.allocate_shared_memory(gl.bfloat16, [_BH, _BN], smem_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    fence_async_shared()  # q in shared memory and the barriers' init, seen by the async proxy (TMA, wgmma)
    _cta_barrier()

    # this split's keys: whole tiles of the row's length (as the Triton kernel splits them)
    seqlen = gl.load(seqlens_ptr + b)
    per_split = gl.cdiv(gl.cdiv(seqlen, num_splits), _BN) * _BN
    start = split * per_split
    end = gl.minimum(start + per_split, seqlen)
    n_tiles = gl.maximum(gl.cdiv(end - start, _BN), 0)
    for i in gl.static_range(STAGES):
        _issue_tile(i, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, kc_desc, kr_desc, kc_bufs, kr_bufs,
                    ready, C, PAGED, STAGES, FP8)

    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_s = pid_h * _BH + gl.arange(0, _BH, layout=row_s)
    keys = gl.arange(0, _BN, layout=gl.SliceLayout(0, s_layout))
    lim = seqlen - (s_q - 1 - rows_s // num_heads)  # the keys each query row sees (MULTI_Q)
    m_i = gl.full([_BH], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([_BH], gl.float32, layout=row_s)
    acc = gl.zeros([_BH, C], gl.float32, layout=o_layout)
    s_zero = gl.zeros([_BH, _BN], gl.float32, layout=s_layout)
    if LOOKAHEAD:
        gl.static_assert(not FP8, "the lookahead schedule reads the bf16 stages directly")
        s = s_zero
        if n_tiles > 0:
            s = warpgroup_mma_wait(0, deps=(_scores(0, q_smem, qr_smem, kc_bufs.index(0), kr_bufs, ready, s_zero,
                                                    STAGES),))
        for t in range(n_tiles):
            # S of tile t + 1 into the tensor cores first (past the last tile: the stage's stale bits, never waited
            # for nor read), then the softmax of tile t under it
            t1 = t + 1
            mbarrier.wait(ready.index(t1 % STAGES), (t1 // STAGES) & 1, pred=t1 < n_tiles)
            s_next = _scores(t1, q_smem, qr_smem, kc_bufs.index(t1 % STAGES), kr_bufs, ready, s_zero, STAGES, False)
            kc = kc_bufs.index(t % STAGES)
            p, m_i, l_i, acc = _softmax(s, t, start, end, keys, lim, m_i, l_i, acc, qk_scale, MULTI_Q, o_layout)
            _stage_p(p, kc, t, start, end, p_smem, C)
            acc = warpgroup_mma(p_smem, kc, acc, is_async=True)
            s, acc = warpgroup_mma_wait(0, deps=(s_next, acc))
            _cta_barrier()  # every warpgroup is past P V of tile t: its stage and P are free
            _issue_tile(t + STAGES, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, kc_desc, kr_desc,
                        kc_bufs, kr_bufs, ready, C, PAGED, STAGES, FP8)
    else:
        for t in range(n_tiles):
            if FP8:  # widen the stage's e4m3 tile into kcb (tail rows zeroed there): S and P V read kcb
                mbarrier.wait(ready.index(t % STAGES), (t // STAGES) & 1)
                _widen_fp8(kc_bufs.index(t % STAGES), kcb, _tile_row(t, n_tiles, start, b, S_cap, block_table_ptr,
                                                                     stride_btb, PAGED),
                           t, start, end, ks_ptr, stride_ks, C)
                kc = kcb
            else:
                kc = kc_bufs.index(t % STAGES)
            s = warpgroup_mma_wait(0, deps=(_scores(t, q_smem, qr_smem, kc, kr_bufs, ready, s_zero, STAGES,
                                                    not FP8),))
            p, m_i, l_i, acc = _softmax(s, t, start, end, keys, lim, m_i, l_i, acc, qk_scale, MULTI_Q, o_layout)
            if FP8:
                p_smem.store(p.to(gl.bfloat16))
                fence_async_shared()
                _cta_barrier()
            else:
                _stage_p(p, kc, t, start, end, p_smem, C)
            acc = warpgroup_mma_wait(0, deps=(warpgroup_mma(p_smem, kc, acc, is_async=True),))
            _cta_barrier()  # every warpgroup is past P V of tile t: its stage and P are free
            _issue_tile(t + STAGES, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, kc_desc, kr_desc,
                        kc_bufs, kr_bufs, ready, C, PAGED, STAGES, FP8)

    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))

    # a split without keys (short row) leaves l_i = 0: output 0 with log-sum-exp -inf, ignored by the merge
    has = l_i > 0
    l_o = gl.convert_layout(gl.where(has, l_i, 1.0), gl.SliceLayout(1, o_layout))
    o = acc / l_o[:, None]
    rows_o = pid_h * _BH + gl.arange(0, _BH, layout=gl.SliceLayout(1, o_layout))
    cols_o = gl.arange(0, C, layout=gl.SliceLayout(0, o_layout))
    o_ptrs = o_ptr + b * stride_ob + rows_o[:, None] * stride_oh + split * stride_os + cols_o[None, :]
    gl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=(rows_o < num_rows)[:, None])
    if SPLIT:
        lse = gl.where(has, m_i + gl.log2(gl.where(has, l_i, 1.0)), float("-inf"))
        gl.store(lse_ptr + b * stride_lb + rows_s * stride_lh + split, lse, mask=rows_s < num_rows)


# ---------------------------------------------------------------------------------------------------------------
# PIPE = 1: the seesaw schedule. Two warpgroups in a warp-specialised region, each with its own tiles.


@gluon.jit
def _ss_issue_half(t, n_tiles, row, kc_desc, kr_desc, kc_bufs, kr_bufs, ready, C: gl.constexpr, HALF: gl.constexpr):
    """TMA copies of one half of key tile t (starting at cache row ``row``, ``_tile_row``'s) into stage t % 2, when
    t < n_tiles: HALF 0 the latent columns [0, C/2) (the values warpgroup 0 reads), HALF 1 the columns [C/2, C)
    and the rope. ready: that half's barrier of each stage."""
    pred = t < n_tiles
    HC: gl.constexpr = C // 2
    st = t % 2
    bar = ready.index(st)
    kc = kc_bufs.index(st)
    if HALF == 0:
        mbarrier.expect(bar, kc_desc.block_type.nbytes * (HC // _CH), pred=pred)
    else:
        mbarrier.expect(bar, kc_desc.block_type.nbytes * (HC // _CH) + kr_desc.block_type.nbytes, pred=pred)
    for j in gl.static_range(HC // _CH):
        tma.async_copy_global_to_shared(kc_desc, [row, HALF * HC + j * _CH], bar,
                                        kc.slice(HALF * HC + j * _CH, _CH, dim=1), pred)
    if HALF == 1:
        tma.async_copy_global_to_shared(kr_desc, [row, 0], bar, kr_bufs.index(st), pred)


@gluon.jit
def _ss_qk_lo(t, q_smem, kc_bufs, ready_lo, s_zero, z, C: gl.constexpr):
    """S of tile t, first half: wait for the tile's columns [0, C/2), start q[:, :C/2] K[:, :C/2]^T (async)."""
    HC: gl.constexpr = C // 2
    st = t % 2
    mbarrier.wait(ready_lo.index(st), (t // 2) & 1)
    return warpgroup_mma(q_smem.index(z).slice(0, HC, dim=1),
                         kc_bufs.index(st + z).slice(0, HC, dim=1).permute((1, 0)), s_zero,
                         use_acc=False, is_async=True)


@gluon.jit
def _ss_qk_hi(t, s, q_smem, qr, kc_bufs, kr_bufs, ready_hi, z, C: gl.constexpr):
    """S of tile t, second half: wait for its columns [C/2, C) and rope, add their products (async; the rope
    queries qr come from registers)."""
    HC: gl.constexpr = C // 2
    st = t % 2
    mbarrier.wait(ready_hi.index(st), (t // 2) & 1)
    s = warpgroup_mma(q_smem.index(z).slice(HC, HC, dim=1), kc_bufs.index(st + z).slice(HC, HC, dim=1).permute((1, 0)),
                      s, is_async=True)
    return warpgroup_mma(qr, kr_bufs.index(st + z).permute((1, 0)), s, is_async=True)


@gluon.jit
def _ss_qk(t, q_smem, qr, kc_bufs, kr_bufs, ready_lo, ready_hi, s_zero, z, C: gl.constexpr):
    """S of tile t, waited for."""
    s = _ss_qk_lo(t, q_smem, kc_bufs, ready_lo, s_zero, z, C)
    s = _ss_qk_hi(t, s, q_smem, qr, kc_bufs, kr_bufs, ready_hi, z, C)
    return warpgroup_mma_wait(0, deps=(s,))


@gluon.jit
def _ss_softmax(s, t, start, lim, m_i, qk_scale, s_layout: gl.constexpr):
    """The weights of tile t against the running max m_i (base 2; per row, keys from lim on masked: the split's
    end, or a query's causal limit if smaller): p (fp32), the new max, and the factor exp2(m_i - new max) that
    the sums and outputs kept so far take (0 while a row has seen no key)."""
    keys = gl.arange(0, _BN, layout=gl.SliceLayout(0, s_layout))
    offs_n = start + t * _BN + keys
    s = gl.where(offs_n[None, :] < lim[:, None], s * qk_scale, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees no key yet: no -inf - -inf
    p = gl.exp2(s - m_use[:, None])
    return p, m_new, gl.exp2(m_i - m_use)


@gluon.jit
def _ss_factor(m_old, m_new):
    """exp2(m_old - m_new) for running maxima m_old <= m_new (m_new = -inf: a row without keys yet, factor 0)."""
    return gl.exp2(m_old - gl.where(m_new == float("-inf"), 0.0, m_new))


@gluon.jit
def _ss_scale_rows(acc, f, o_layout: gl.constexpr):
    return acc * gl.convert_layout(f, gl.SliceLayout(1, o_layout))[:, None]


@gluon.jit
def _ss_zero_tail(kc, t, start, end, COL0: gl.constexpr, NCOL: gl.constexpr):
    """On the tile that runs past the split's end: its rows past the end zeroed in columns [COL0, COL0 + NCOL) of
    its stage (they may hold any bits, NaN included; 0 x NaN is NaN), made visible to the tensor cores."""
    if start + (t + 1) * _BN > end:
        zl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        z_rows = start + t * _BN + gl.arange(0, _BN, layout=gl.SliceLayout(1, zl))
        for j in gl.static_range(NCOL // _CH):
            part = kc.slice(COL0 + j * _CH, _CH, dim=1)
            v = part.load(zl)
            part.store(gl.where((z_rows < end)[:, None], v, gl.zeros_like(v)))
        fence_async_shared()
        _cta_barrier()  # in a partition: its own warps


@gluon.jit
def _ss_wg0_pair(i, s, m_i, l_i, acc, q_smem, qr, kc_bufs, kr_bufs, p_a, p_b, m_a_smem, m_b_smem, ready_lo,
                 ready_hi, bar_a, bar_b, bar_pa, n_tiles, start, end, lim, b, S_cap, block_table_ptr, stride_btb,
                 kc_desc, kr_desc, qk_scale, C: gl.constexpr, PAGED: gl.constexpr, LAST: gl.constexpr,
                 s_layout: gl.constexpr, o_layout: gl.constexpr):
    """Warpgroup 0, pair i (tiles a = 2i, its own, in stage 0, and b = 2i + 1, warpgroup 1's, in stage 1), holding
    S of tile a and the output columns [0, C/2):
      softmax of a -> its max m_a to warpgroup 1 (bar_a) -> O_L = O_L alpha + P_a V_a[:, :C/2] (P_a from
      registers) -> the stage 0 values it read are free: the next a's columns [0, C/2) are loaded -> m_b from
      warpgroup 1 (bar_b) -> P_a exp2(m_a - m_b) to shared memory for warpgroup 1 (bar_pa) -> O_L = O_L
      exp2(m_a - m_b) + P_b V_b[:, :C/2] (P_b from shared memory) || S of the next a, first half -> the stage 1
      values read: the next b's columns [0, C/2) are loaded -> S of the next a, second half (its columns there
      are loaded by warpgroup 1 once its P V of a is done).
    LAST (the last pair: b may be missing, a or b may run past the split's end): no next tiles, tails zeroed."""
    HC: gl.constexpr = C // 2
    ta = 2 * i
    tb = ta + 1
    z = i >> 30  # 0, but not loop-invariant: the shared-memory descriptors are rebuilt each pair, not kept live
    kc_a = kc_bufs.index(z)
    kc_b = kc_bufs.index(1 + z)
    if not LAST:  # paged: the block-table reads of the next tiles, issued here, land under the softmax and P V
        row_a2 = _tile_row(ta + 2, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, PAGED)
        row_b2 = _tile_row(tb + 2, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, PAGED)
    p, m_a, alpha = _ss_softmax(s, ta, start, lim, m_i, qk_scale, s_layout)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    m_a_smem.store(m_a)
    _cta_barrier()
    mbarrier.arrive(bar_a)
    acc = _ss_scale_rows(acc, alpha, o_layout)
    if LAST:
        _ss_zero_tail(kc_a, ta, start, end, 0, HC)
    pa_op = gl.convert_layout(p.to(gl.bfloat16), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    acc = warpgroup_mma(pa_op, kc_a.slice(0, HC, dim=1), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    if not LAST:
        _ss_issue_half(ta + 2, n_tiles, row_a2, kc_desc, kr_desc, kc_bufs, kr_bufs, ready_lo, C, 0)
    mbarrier.wait(bar_b, i & 1)
    m_b = m_b_smem.load(gl.SliceLayout(1, s_layout))
    beta = _ss_factor(m_a, m_b)
    p_a.store((p * beta[:, None]).to(gl.bfloat16))
    fence_async_shared()
    _cta_barrier()
    mbarrier.arrive(bar_pa)
    l_i = l_i * beta
    acc = _ss_scale_rows(acc, beta, o_layout)
    if LAST:
        if tb < n_tiles:
            _ss_zero_tail(kc_b, tb, start, end, 0, HC)
            acc = warpgroup_mma(p_b, kc_b.slice(0, HC, dim=1), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc,))
    else:
        pv = warpgroup_mma(p_b, kc_b.slice(0, HC, dim=1), acc, is_async=True)
        sn = _ss_qk_lo(ta + 2, q_smem, kc_bufs, ready_lo, gl.zeros([_BH, _BN], gl.float32, s_layout), z, C)
        acc = warpgroup_mma_wait(1, deps=(pv,))
        _ss_issue_half(tb + 2, n_tiles, row_b2, kc_desc, kr_desc, kc_bufs, kr_bufs, ready_lo, C, 0)
        sn = _ss_qk_hi(ta + 2, sn, q_smem, qr, kc_bufs, kr_bufs, ready_hi, z, C)
        s = warpgroup_mma_wait(0, deps=(sn,))
    return s, m_b, l_i, acc


@gluon.jit
def _ss_wg1_pair(i, s, m_i, l_i, acc, q_smem, qr, kc_bufs, kr_bufs, p_a, p_b, m_a_smem, m_b_smem, ready_lo,
                 ready_hi, bar_a, bar_b, bar_pa, n_tiles, start, end, lim, b, S_cap, block_table_ptr, stride_btb,
                 kc_desc, kr_desc, qk_scale, C: gl.constexpr, PAGED: gl.constexpr, LAST: gl.constexpr,
                 s_layout: gl.constexpr, o_layout: gl.constexpr):
    """Warpgroup 1, pair i, holding S of tile b and the output columns [C/2, C):
      m_a from warpgroup 0 (bar_a) -> softmax of b against it -> m_b and P_b to warpgroup 0 (bar_b) -> O_R =
      O_R exp2(m_old - m_b) + P_b V_b[:, C/2:] (P_b from registers) -> P_a from warpgroup 0 (bar_pa) -> O_R += P_a
      V_a[:, C/2:] -> as each of the two finishes, the next tile's columns [C/2, C) and rope are loaded into its
      stage -> S of the next b.
    LAST: b may be missing (then no P_b: m_b = m_a), tails zeroed, no next tiles."""
    HC: gl.constexpr = C // 2
    ta = 2 * i
    tb = ta + 1
    z = i >> 30  # 0, but not loop-invariant: the shared-memory descriptors are rebuilt each pair, not kept live
    kc_a = kc_bufs.index(z)
    kc_b = kc_bufs.index(1 + z)
    if not LAST:  # as in warpgroup 0: the next tiles' block-table reads early
        row_a2 = _tile_row(ta + 2, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, PAGED)
        row_b2 = _tile_row(tb + 2, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, PAGED)
    mbarrier.wait(bar_a, i & 1)
    m_a = m_a_smem.load(gl.SliceLayout(1, s_layout))
    alpha = _ss_factor(m_i, m_a)
    p, m_b, beta = _ss_softmax(s, tb, start, lim, m_a, qk_scale, s_layout)  # b missing: all masked, p = 0
    l_i = l_i * (alpha * beta) + gl.sum(p, axis=1)
    pb = p.to(gl.bfloat16)
    m_b_smem.store(m_b)
    p_b.store(pb)
    fence_async_shared()
    _cta_barrier()
    mbarrier.arrive(bar_b)
    acc = _ss_scale_rows(acc, alpha * beta, o_layout)
    pb_op = gl.convert_layout(pb, gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    if LAST:
        if tb < n_tiles:
            _ss_zero_tail(kc_b, tb, start, end, HC, HC)
            acc = warpgroup_mma(pb_op, kc_b.slice(HC, HC, dim=1), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.wait(bar_pa, i & 1)
        _ss_zero_tail(kc_a, ta, start, end, HC, HC)
        acc = warpgroup_mma(p_a, kc_a.slice(HC, HC, dim=1), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
    else:
        pv = warpgroup_mma(pb_op, kc_b.slice(HC, HC, dim=1), acc, is_async=True)
        mbarrier.wait(bar_pa, i & 1)
        pv = warpgroup_mma(p_a, kc_a.slice(HC, HC, dim=1), pv, is_async=True)
        warpgroup_mma_wait(1, deps=(pb_op,))  # P_b V_b done: stage 1's columns [C/2, C) and rope are free
        _ss_issue_half(tb + 2, n_tiles, row_b2, kc_desc, kr_desc, kc_bufs, kr_bufs, ready_hi, C, 1)
        acc = warpgroup_mma_wait(0, deps=(pv,))
        _ss_issue_half(ta + 2, n_tiles, row_a2, kc_desc, kr_desc, kc_bufs, kr_bufs, ready_hi, C, 1)
        if tb + 2 < n_tiles:
            s = _ss_qk(tb + 2, q_smem, qr, kc_bufs, kr_bufs, ready_lo, ready_hi,
                       gl.zeros([_BH, _BN], gl.float32, s_layout), z, C)
    return s, m_b, l_i, acc


@gluon.jit
def _ss_partition(q_smem, kc_bufs, kr_bufs, p_a, p_b, m_a_smem, m_b_smem, l_a_smem, l_b_smem, ready_lo, ready_hi,
                  sync, kc_desc, kr_desc, seqlens_ptr, block_table_ptr, o_ptr, lse_ptr, num_rows, num_heads, s_q,
                  num_splits, qk_scale, S_cap, stride_btb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                  C: gl.constexpr, PAGED: gl.constexpr, SPLIT: gl.constexpr, WG: gl.constexpr):
    """One warpgroup's part of the seesaw (WG 0: even tiles and output columns [0, C/2); WG 1: odd tiles and
    columns [C/2, C)); then the row sums of both are added and each writes its columns."""
    HC: gl.constexpr = C // 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HC, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    pid_h = gl.program_id(0)
    split = gl.program_id(1)
    b = gl.program_id(2).to(gl.int64)
    seqlen = gl.load(seqlens_ptr + b)
    per_split = gl.cdiv(gl.cdiv(seqlen, num_splits), _BN) * _BN
    start = split * per_split
    end = gl.minimum(start + per_split, seqlen)
    n_tiles = gl.maximum(gl.cdiv(end - start, _BN), 0)
    n_pairs = (n_tiles + 1) // 2
    rows_s = pid_h * _BH + gl.arange(0, _BH, layout=row_s)
    lim = gl.minimum(seqlen - (s_q - 1 - rows_s // num_heads), end)  # the keys each query row sees here
    # the rope queries: from registers (their shared-memory copy sits in P_b until warpgroup 1 first writes it)
    qr = p_b.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
    _cta_barrier()  # all of this warpgroup's warps hold qr before warpgroup 1 may overwrite P_b
    m_i = gl.full([_BH], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([_BH], gl.float32, layout=row_s)
    acc = gl.zeros([_BH, HC], gl.float32, layout=o_layout)
    s = gl.zeros([_BH, _BN], gl.float32, layout=s_layout)
    bar_a = sync.index(0)
    bar_b = sync.index(1)
    bar_pa = sync.index(2)
    if n_tiles > WG:
        s = _ss_qk(WG, q_smem, qr, kc_bufs, kr_bufs, ready_lo, ready_hi, s, 0, C)
    if WG == 0:
        for i in range(n_pairs - 1):
            s, m_i, l_i, acc = _ss_wg0_pair(i, s, m_i, l_i, acc, q_smem, qr, kc_bufs, kr_bufs, p_a, p_b, m_a_smem,
                                            m_b_smem, ready_lo, ready_hi, bar_a, bar_b, bar_pa, n_tiles, start, end,
                                            lim, b, S_cap, block_table_ptr, stride_btb, kc_desc, kr_desc, qk_scale, C,
                                            PAGED, False, s_layout, o_layout)
        if n_pairs > 0:
            s, m_i, l_i, acc = _ss_wg0_pair(n_pairs - 1, s, m_i, l_i, acc, q_smem, qr, kc_bufs, kr_bufs, p_a, p_b,
                                            m_a_smem, m_b_smem, ready_lo, ready_hi, bar_a, bar_b, bar_pa, n_tiles,
                                            start, end, lim, b, S_cap, block_table_ptr, stride_btb, kc_desc, kr_desc,
                                            qk_scale, C, PAGED, True, s_layout, o_layout)
        l_mine = l_a_smem
        l_other = l_b_smem
    else:
        for i in range(n_pairs - 1):
            s, m_i, l_i, acc = _ss_wg1_pair(i, s, m_i, l_i, acc, q_smem, qr, kc_bufs, kr_bufs, p_a, p_b, m_a_smem,
                                            m_b_smem, ready_lo, ready_hi, bar_a, bar_b, bar_pa, n_tiles, start, end,
                                            lim, b, S_cap, block_table_ptr, stride_btb, kc_desc, kr_desc, qk_scale, C,
                                            PAGED, False, s_layout, o_layout)
        if n_pairs > 0:
            s, m_i, l_i, acc = _ss_wg1_pair(n_pairs - 1, s, m_i, l_i, acc, q_smem, qr, kc_bufs, kr_bufs, p_a, p_b,
                                            m_a_smem, m_b_smem, ready_lo, ready_hi, bar_a, bar_b, bar_pa, n_tiles,
                                            start, end, lim, b, S_cap, block_table_ptr, stride_btb, kc_desc, kr_desc,
                                            qk_scale, C, PAGED, True, s_layout, o_layout)
        l_mine = l_b_smem
        l_other = l_a_smem
    # the row sums: each warpgroup summed its own tiles' weights (in the same running-max frame)
    l_mine.store(l_i)
    _cta_barrier()
    mbarrier.arrive(sync.index(3 + WG))
    mbarrier.wait(sync.index(4 - WG), 0)
    l_i = l_i + l_other.load(row_s)
    # a split without keys (short row) leaves l_i = 0: output 0 with log-sum-exp -inf, ignored by the merge
    has = l_i > 0
    l_o = gl.convert_layout(gl.where(has, l_i, 1.0), gl.SliceLayout(1, o_layout))
    o = acc / l_o[:, None]
    rows_o = pid_h * _BH + gl.arange(0, _BH, layout=gl.SliceLayout(1, o_layout))
    cols_o = WG * HC + gl.arange(0, HC, layout=gl.SliceLayout(0, o_layout))
    o_ptrs = o_ptr + b * stride_ob + rows_o[:, None] * stride_oh + split * stride_os + cols_o[None, :]
    gl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=(rows_o < num_rows)[:, None])
    if SPLIT and WG == 0:
        lse = gl.where(has, m_i + gl.log2(gl.where(has, l_i, 1.0)), float("-inf"))
        gl.store(lse_ptr + b * stride_lb + rows_s * stride_lh + split, lse, mask=rows_s < num_rows)


@gluon.jit
def _mla_decode_sm90_seesaw_kernel(
    q_ptr, qr_ptr, kc_desc, kr_desc, seqlens_ptr, block_table_ptr, o_ptr, lse_ptr,
    num_rows, num_heads, s_q, num_splits, qk_scale, S_cap,
    stride_qb, stride_qh, stride_qrb, stride_qrh, stride_btb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    C: gl.constexpr, R: gl.constexpr, PAGED: gl.constexpr, SPLIT: gl.constexpr, WG_REGS: gl.constexpr,
    num_warps: gl.constexpr,
):
    """PIPE = 1 (bf16 cache, C a multiple of 128): the prologue (q to shared memory, the first two tiles' loads)
    in warpgroup 0, then the two warpgroups' parts in a warp-specialised region (``_ss_partition``)."""
    gl.static_assert(num_warps == 4, "one warpgroup here, the second one a worker partition")
    gl.static_assert(C % (2 * _CH) == 0, "each warpgroup's value columns: whole 64-column blocks")
    pid_h = gl.program_id(0)
    split = gl.program_id(1)
    b = gl.program_id(2).to(gl.int64)
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # 16-byte loads of q rows
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    vec_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])

    q_smem = gl.allocate_shared_memory(gl.bfloat16, [1, _BH, C], smem_layout)  # [1, ..]: see _ss_wg0_pair's z
    kc_bufs = gl.allocate_shared_memory(gl.bfloat16, [2, _BN, C], smem_layout)
    kr_bufs = gl.allocate_shared_memory(gl.bfloat16, [2, _BN, R], smem_layout)
    p_a = gl.allocate_shared_memory(gl.bfloat16, [_BH, _BN], smem_layout)
    p_b = gl.allocate_shared_memory(gl.bfloat16, [_BH, _BN], smem_layout)
    m_a_smem = gl.allocate_shared_memory(gl.float32, [_BH], vec_layout)
    m_b_smem = gl.allocate_shared_memory(gl.float32, [_BH], vec_layout)
    l_a_smem = gl.allocate_shared_memory(gl.float32, [_BH], vec_layout)
    l_b_smem = gl.allocate_shared_memory(gl.float32, [_BH], vec_layout)
    ready_lo = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ready_hi = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    sync = gl.allocate_shared_memory(gl.int64, [5, 1], mbarrier.MBarrierLayout())  # m_a, m_b + P_b, P_a, l_a, l_b
    for i in gl.static_range(2):
        mbarrier.init(ready_lo.index(i), count=1)
        mbarrier.init(ready_hi.index(i), count=1)
    for i in gl.static_range(5):
        mbarrier.init(sync.index(i), count=1)

    # q (64-column blocks) and q_rope (parked in P_b) of this head block -> shared memory (rows past num_rows: 0)
    rows_ld = pid_h * _BH + gl.arange(0, _BH, layout=gl.SliceLayout(1, ld_layout))
    rmask = (rows_ld < num_rows)[:, None]
    cols = gl.arange(0, _CH, layout=gl.SliceLayout(0, ld_layout))
    for j in gl.static_range(C // _CH):
        q = gl.load(q_ptr + b * stride_qb + rows_ld[:, None] * stride_qh + (j * _CH + cols)[None, :], mask=rmask,
                    other=0.0)
        q_smem.index(0).slice(j * _CH, _CH, dim=1).store(q)
    gl.static_assert(R == _BN, "the rope queries are parked in P_b")
    qr = gl.load(qr_ptr + b * stride_qrb + rows_ld[:, None] * stride_qrh + cols[None, :], mask=rmask, other=0.0)
    p_b.store(qr)
    fence_async_shared()  # q in shared memory and the barriers' init, seen by the async proxy (TMA, wgmma)
    _cta_barrier()

    seqlen = gl.load(seqlens_ptr + b)
    per_split = gl.cdiv(gl.cdiv(seqlen, num_splits), _BN) * _BN
    start = split * per_split
    end = gl.minimum(start + per_split, seqlen)
    n_tiles = gl.maximum(gl.cdiv(end - start, _BN), 0)
    for t in gl.static_range(2):
        row = _tile_row(t, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, PAGED)
        _ss_issue_half(t, n_tiles, row, kc_desc, kr_desc, kc_bufs, kr_bufs, ready_lo, C, 0)
        _ss_issue_half(t, n_tiles, row, kc_desc, kr_desc, kc_bufs, kr_bufs, ready_hi, C, 1)

    gl.warp_specialize([
        (_ss_partition, (q_smem, kc_bufs, kr_bufs, p_a, p_b, m_a_smem, m_b_smem, l_a_smem, l_b_smem, ready_lo,
                         ready_hi, sync, kc_desc, kr_desc, seqlens_ptr, block_table_ptr, o_ptr, lse_ptr, num_rows,
                         num_heads, s_q, num_splits, qk_scale, S_cap, stride_btb, stride_ob, stride_oh, stride_os,
                         stride_lb, stride_lh, C, PAGED, SPLIT, 0)),
        (_ss_partition, (q_smem, kc_bufs, kr_bufs, p_a, p_b, m_a_smem, m_b_smem, l_a_smem, l_b_smem, ready_lo,
                         ready_hi, sync, kc_desc, kr_desc, seqlens_ptr, block_table_ptr, o_ptr, lse_ptr, num_rows,
                         num_heads, s_q, num_splits, qk_scale, S_cap, stride_btb, stride_ob, stride_oh, stride_os,
                         stride_lb, stride_lh, C, PAGED, SPLIT, 1)),
    ], [4], [WG_REGS])


def _fp8_width(C: int) -> int:
    """Bytes of an FP8 cache row (reference.mla_decode.fp8_row_bytes with R = 64)."""
    return -(-(C + 2 * 64 + 4) // 16) * 16


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def unsupported(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor | None) -> str | None:
    """Why this kernel does not take a call (None: it does). It takes: sm_90, bf16 queries, C a multiple of 64
    (FP8 cache: 128) up to 512, R = 64, a bf16 or FP8 cache with contiguous 16-byte aligned rows, page 64."""
    if not q.is_cuda or _capability(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
            != (9, 0):
        return "not an sm_90 GPU"
    C = q.shape[-1]
    D = kv_cache.shape[2]
    if q.dtype != torch.bfloat16 or C > 512:
        return f"needs bf16 queries with C <= 512 (got {q.dtype}, C={C})"
    if kv_cache.dtype == torch.uint8:
        if C % (2 * CHUNK) or D != _fp8_width(C):
            return f"the FP8 cache needs C a multiple of 128 and rope 64 (C={C}, row of {D} bytes)"
    elif kv_cache.dtype != torch.bfloat16 or C % CHUNK or D - C != 64:
        return f"needs a bf16 cache with C a multiple of 64 and rope 64 (got {kv_cache.dtype}, C={C}, R={D - C})"
    if block_table is not None and kv_cache.shape[1] != BLOCK_N:
        return f"needs pages of {BLOCK_N} tokens (got {kv_cache.shape[1]})"
    if kv_cache.stride(2) != 1 or kv_cache.stride(1) != D or kv_cache.stride(0) != kv_cache.shape[1] * D:
        return "needs a contiguous cache"
    if kv_cache.data_ptr() % 16 or (D * kv_cache.element_size()) % 16:
        return "needs 16-byte aligned cache rows"
    return None


def supports(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor | None) -> bool:
    """Whether this kernel takes a call (see ``unsupported``)."""
    return unsupported(q, kv_cache, block_table) is None


def pipe_setting(pipe: int = 0) -> int:
    """The schedule ``launch`` is asked for: $MOE_KERNELS_MLA_PIPE when set (0 serial, 1 seesaw, 2 serial with
    lookahead), else ``pipe`` (the config's GLUON - 1)."""
    env = os.environ.get("MOE_KERNELS_MLA_PIPE", "").strip()
    return int(env) if env else int(pipe)


def schedule(pipe: int = 0, fp8: bool = False, C: int = 512) -> str:
    """The schedule ``launch`` runs when asked for ``pipe`` (``pipe_setting``): "seesaw" (1) over a bf16 cache
    with C a multiple of 128 (each warpgroup's value columns whole 64-column blocks), "fp8 seesaw" (1) over the FP8
    cache with C a multiple of 256 (``mla_decode_sm90_fp8``: the seesaw with e4m3 products), "lookahead" (2: the serial
    kernel with S of the next tile under this tile's softmax) over a bf16 cache (the FP8 cache's one widened tile
    serves one step at a time), else "serial"."""
    asked = pipe_setting(pipe)
    if asked == 1 and not fp8 and C % (2 * CHUNK) == 0:
        return "seesaw"
    if asked == 1 and fp8 and C % (4 * CHUNK) == 0:
        return "fp8 seesaw"
    if asked == 2 and not fp8:
        return "lookahead"
    return "serial"


def uses_pipe(kv_cache: torch.Tensor, C: int, pipe: int = 0) -> bool:
    """Whether ``launch`` runs the seesaw kernel (``schedule``)."""
    return schedule(pipe, kv_cache.dtype != torch.bfloat16, C) == "seesaw"


def uses_lookahead(kv_cache: torch.Tensor, pipe: int = 0) -> bool:
    """Whether ``launch`` runs the serial kernel with LOOKAHEAD (``schedule``)."""
    return schedule(pipe, kv_cache.dtype != torch.bfloat16) == "lookahead"


def launch(q2, qr2, kv_cache, cache_seqlens, block_table, qk_scale, num_splits, num_heads, s_q, o_stage, lse,
           lse_strides, stages: int = 2, pipe: int = 0):
    """q2 [B, rows, C], qr2 [B, rows, 64] bf16 (rows = s_q x heads), o_stage [B, rows, splits, C] (fp32 partials,
    or the bf16 output as [B, rows, 1, C] with one split); qk_scale includes log2(e). The cache: bf16 rows
    [.., .., C + 64] or the FP8 cache's uint8 rows. pipe (or $MOE_KERNELS_MLA_PIPE): 1 the seesaw kernel where it
    applies (``uses_pipe``; the FP8 cache: ``mla_decode_sm90_fp8``'s, where ``schedule`` says "fp8 seesaw"), 2 the
    serial one with lookahead where it applies (``uses_lookahead``), else the serial one."""
    B, rows, C = q2.shape
    D = kv_cache.shape[2]
    kv2d = kv_cache.view(-1, D)
    n = kv2d.shape[0]
    R = 64
    l16 = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    fp8 = kv_cache.dtype == torch.uint8
    if fp8:
        l8 = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        kc_desc = TensorDescriptor(kv2d[:, :C].view(torch.float8_e4m3fn), [n, C], [D, 1], [BLOCK_N, 2 * CHUNK], l8)
        kr_desc = TensorDescriptor(kv2d[:, C : C + 2 * R].view(torch.bfloat16), [n, R], [D // 2, 1], [BLOCK_N, R],
                                   l16)
        ks = kv2d[:, C + 2 * R : C + 2 * R + 4].view(torch.float32)
        stride_ks = D // 4
    else:
        kc_desc = TensorDescriptor(kv2d, [n, C], [D, 1], [BLOCK_N, CHUNK], l16)
        kr_desc = TensorDescriptor(kv2d[:, C:], [n, R], [D, 1], [BLOCK_N, R], l16)
        ks, stride_ks = cache_seqlens, 0  # unused
    paged = block_table is not None
    grid = (triton.cdiv(rows, BLOCK_H), num_splits, B)
    if fp8 and schedule(pipe, True, C) == "fp8 seesaw":
        from .mla_decode_sm90_fp8 import _mla_decode_sm90_fp8_kernel

        _mla_decode_sm90_fp8_kernel[grid](
            q2, qr2, kc_desc, kr_desc, ks, cache_seqlens, block_table if paged else cache_seqlens, o_stage, lse,
            rows, num_heads, s_q, num_splits, qk_scale, 0 if paged else kv_cache.shape[1],
            q2.stride(0), q2.stride(1), qr2.stride(0), qr2.stride(1), stride_ks, block_table.stride(0) if paged else 0,
            o_stage.stride(0), o_stage.stride(1), o_stage.stride(2), *lse_strides,
            C=C, R=R, PAGED=paged, SPLIT=num_splits > 1, WG_REGS=WG_REGS, num_warps=4,
        )
        return
    if uses_pipe(kv_cache, C, pipe):
        _mla_decode_sm90_seesaw_kernel[grid](
            q2, qr2, kc_desc, kr_desc, cache_seqlens, block_table if paged else cache_seqlens, o_stage, lse,
            rows, num_heads, s_q, num_splits, qk_scale, 0 if paged else kv_cache.shape[1],
            q2.stride(0), q2.stride(1), qr2.stride(0), qr2.stride(1), block_table.stride(0) if paged else 0,
            o_stage.stride(0), o_stage.stride(1), o_stage.stride(2), *lse_strides,
            C=C, R=R, PAGED=paged, SPLIT=num_splits > 1, WG_REGS=WG_REGS, num_warps=4,
        )
        return
    _mla_decode_sm90_kernel[grid](
        q2, qr2, kc_desc, kr_desc, ks, cache_seqlens, block_table if paged else cache_seqlens, o_stage, lse,
        rows, num_heads, s_q, num_splits, qk_scale, 0 if paged else kv_cache.shape[1],
        q2.stride(0), q2.stride(1), qr2.stride(0), qr2.stride(1), stride_ks, block_table.stride(0) if paged else 0,
        o_stage.stride(0), o_stage.stride(1), o_stage.stride(2), *lse_strides,
        C=C, R=R, PAGED=paged, SPLIT=num_splits > 1, MULTI_Q=s_q > 1, STAGES=stages, FP8=fp8, num_warps=8,
        LOOKAHEAD=uses_lookahead(kv_cache, pipe),
    )
