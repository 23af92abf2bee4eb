"""Hopper path of the FP8 grouped GEMM, in Gluon: asynchronous wgmma with the block-scale promotion overlapped.

The same contract as ``grouped_gemm._grouped_gemm_kernel`` with FP8 operands (A e4m3 with 1x128 scales, W e4m3
with 128x128 scales, rows grouped by expert through ``offsets`` or the masked decode layout, optional SwiGLU +
e4m3 re-quantisation epilogue, optional per-row weight). What differs is the K loop.

Triton's ``tl.dot`` cannot keep a product in flight while the previous one is scaled: every K step compiles to
``wgmma; wait 0``, then the fp32 promotion ``acc += P_k * (sa_k x sw_k)`` runs with the tensor cores idle (~30% at
DeepSeek shapes: bench/probe_grouped_gemm.py). Gluon exposes the wgmma groups, so here each K step issues its
product into a free register tile, waits only for the previous step's product (``warpgroup_mma_wait(1)``) and
promotes it while the new one runs. Three fp32 tiles are live (acc and two products), so a program computes a
[BLOCK_M, 128] tile (128 or 64 rows, one warp per 16 rows): 128 columns are one weight-scale block, whose W scale
is one number per K step.

What ptxas needs to keep the wgmmas asynchronous (it serialises all of them otherwise, notes C7514/C7512; the CI
compiles this kernel for sm_90 and fails on them, ``tools/compile_sm90.py WGMMA=1``): no register copy of a
product in flight, so products are in flight only inside statically unrolled groups of UNROLL steps (a loop's
back edge or an if's join would copy them), and each promotion passes a volatile no-op before the next issue
(Triton 3.6's LLVM otherwise sinks a group's promotions to its end, holding four tiles).

SWIGLU: the same rows run through the stage ring twice, against the gate block and then the up block of the same
128 output columns; the gate tile waits in shared memory, then silu(gate) * up is written as e4m3 with one scale
per 1x128 group. WS (opt-in, no shipped config sets it): ``gl.warp_specialize`` gives the TMA loads to one loader
warp (ready/empty barriers per stage), so the math warps never issue a load nor wait on the CTA barriers around
one. It compiles for sm_90 on Triton 3.6 and 3.8 (CI checks it) but has not run on a GPU yet.

PERSISTENT (opt-in, n > 0; not run on a GPU yet either): ``_grouped_gemm_fp8_wgmma_persistent_kernel`` launches n
programs per SM, each walking every grid-th tile of the real tile count (read from ``offsets`` on the device, so
no program meets an empty tile). The stage ring and its barrier phases run on across tiles: a tile's last STAGES
steps load the next tile's first ones, so its operands arrive while this tile's epilogue runs (with WS the loader
warp simply walks the same tiles). Without it every tile starts with the ring's latency and ends with its epilogue
exposed, a larger share at K = 2048 (16 steps, the down projection) than at K = 7168. The offsets layout only;
the launcher runs the one-tile kernel for the masked layout and for tiles with fewer K steps than stages.

Needs ``triton.experimental.gluon`` (Triton 3.6 and 3.8 tested) and sm_90; ``grouped_gemm`` imports this module
in a try and runs the Triton kernel when Gluon is missing or the GPU is not Hopper.
"""
from __future__ import annotations

import functools

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..reference.quant import MIN_AMAX

__all__ = ["launch", "supports"]

BLOCK_K = 128  # one K step = one scale block of A and of W
BLOCK_N = 128  # columns of one product = rows of W per TMA load = one weight-scale block
DEFAULT_UNROLL = 4  # K steps per statically unrolled group (8 reaches 255 registers and spills)
LOADER_REGS = 24  # WS: registers of the loader warp (it holds scalars only)
_BK = gl.constexpr(BLOCK_K)
_BN = gl.constexpr(BLOCK_N)
_AMAX_FLOOR = gl.constexpr(MIN_AMAX)
_E4M3_MAX = gl.constexpr(448.0)


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _group_order(tile, num_m, num_n, GROUP_M: gl.constexpr):
    """Tile id -> (row tile, column tile): GROUP_M consecutive row tiles sweep the column tiles together, so their
    W tiles stay in L2."""
    in_group = GROUP_M * num_n
    first_m = (tile // in_group) * GROUP_M
    group_rows = gl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % in_group) % group_rows, (tile % in_group) // group_rows


@gluon.jit
def _expert_tiles(E, offsets_ptr, BLOCK_M: gl.constexpr, E_PAD: gl.constexpr, num_warps: gl.constexpr):
    """Each expert's rows [lo, hi), its row tiles and the running total of row tiles (E_PAD lanes, E real)."""
    e_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    e_idx = gl.arange(0, E_PAD, layout=e_layout)
    e_mask = e_idx < E
    lo = gl.load(offsets_ptr + e_idx, mask=e_mask, other=0)
    hi = gl.load(offsets_ptr + e_idx + 1, mask=e_mask, other=0)
    tiles = gl.where(e_mask, (hi - lo + BLOCK_M - 1) // BLOCK_M, 0)
    return e_idx, lo, hi, tiles, gl.associative_scan(tiles, 0, _add)


@gluon.jit
def _locate(tile_m, e_idx, lo, hi, tiles, ends, BLOCK_M: gl.constexpr):
    """Row tile -> (expert, first row, end row of the expert's rows); past the last real tile row_end is 0."""
    # the expert owning row tile tile_m: how many experts' tiles end at or before it (empty experts included)
    expert = gl.sum((ends <= tile_m).to(gl.int32), axis=0)
    mine = e_idx == expert  # all false past the last real tile: row_end = 0
    first_tile = gl.sum(gl.where(mine, ends - tiles, 0), axis=0)
    row_start = gl.sum(gl.where(mine, lo, 0), axis=0) + (tile_m - first_tile) * BLOCK_M
    row_end = gl.sum(gl.where(mine, hi, 0), axis=0)
    return expert, row_start, row_end


@gluon.jit
def _schedule(pid, M, N, E, max_m, offsets_ptr, masked_m_ptr, MASKED: gl.constexpr, BLOCK_M: gl.constexpr,
              OUT_N: gl.constexpr, GROUP_M: gl.constexpr, E_PAD: gl.constexpr, num_warps: gl.constexpr):
    """Program id -> (expert, first row, end row of the expert's rows, column tile), as the Triton kernel's."""
    num_n = (N + OUT_N - 1) // OUT_N
    if MASKED:
        tiles_per_e = (max_m + BLOCK_M - 1) // BLOCK_M
        num_m = E * tiles_per_e
    else:
        num_m = (M + BLOCK_M - 1) // BLOCK_M + E  # upper bound: every expert may end in a partial tile
    tile_m, tile_n = _group_order(pid, num_m, num_n, GROUP_M)
    if MASKED:
        expert = tile_m // tiles_per_e
        row_start = expert * max_m + (tile_m % tiles_per_e) * BLOCK_M
        row_end = expert * max_m + gl.load(masked_m_ptr + expert)
    else:
        e_idx, lo, hi, tiles, ends = _expert_tiles(E, offsets_ptr, BLOCK_M, E_PAD, num_warps)
        expert, row_start, row_end = _locate(tile_m, e_idx, lo, hi, tiles, ends, BLOCK_M)
    return expert, row_start, row_end, tile_n


@gluon.jit
def _load_step(t, s, num_k, a_desc, w_desc, a_bufs, b_bufs, ready, a_row, w_row, up_row, pred,
               STAGES: gl.constexpr, PASSES: gl.constexpr):
    """TMA of a tile's pipeline step s into the stage of ring position t, when pred. A tile's steps are its K steps
    against the gate (or only) W block, then with PASSES = 2 (SwiGLU) against the up block, up_row rows on."""
    if PASSES == 2:
        p = (s >= num_k).to(gl.int32)
        kb = s - p * num_k
        w_row = w_row + p * up_row
    else:
        kb = s
    st = t % STAGES
    bar = ready.index(st)
    mbarrier.expect(bar, a_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(a_desc, [a_row, kb * _BK], bar, a_bufs.index(st), pred)
    tma.async_copy_global_to_shared(w_desc, [w_row, kb * _BK], bar, b_bufs.index(st), pred)


@gluon.jit
def _issue_mma(t, free, a_bufs, b_bufs, ready, STAGES: gl.constexpr):
    """Start the product of pipeline step t once its stage has landed, in the registers of ``free`` (a tile whose
    product is finished and promoted)."""
    s = t % STAGES
    mbarrier.wait(ready.index(s), (t // STAGES) & 1)
    return warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), free, use_acc=False, is_async=True)


@gluon.jit
def _pin(x):
    """x, through a volatile no-op: LLVM may not sink the math that produced x past the next wgmma issue (Triton
    3.6's LLVM sank every promotion of a group to its end: no overlap, and four product tiles live)."""
    return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=False, pack=1)


@gluon.jit
def _retire(t0, kb, num_k, acc, done, as_ptrs, m_in, stride_ask, ws_ptr, a_desc, w_desc, a_bufs, b_bufs, ready,
            empty, a_row, w_row, ring, STAGES: gl.constexpr, WS: gl.constexpr, PERSISTENT: gl.constexpr,
            PASSES: gl.constexpr):
    """Promote the finished product of step kb into acc (A scale of each row x the block's W scale), then hand
    the stage it has left back: load step kb+STAGES into it, or (WS) tell the loader warp that it is empty.

    PERSISTENT: the load that reuses the stage is the tile's step STAGES on, which may be one of the next tile's
    first steps (``ring``: this pass's first step in the tile, the tile's steps, up_row, the next tile's A row
    (-1: no next tile) and W row)."""
    sa = gl.load(as_ptrs + kb * stride_ask, mask=m_in, other=0.0)
    acc = _pin(acc + done * (sa * gl.load(ws_ptr + kb))[:, None])
    if WS:
        mbarrier.arrive(empty.index((t0 + kb) % STAGES), count=1)
    elif PERSISTENT:
        s0, steps, up_row, n_a_row, n_w_row = ring
        s = s0 + kb + STAGES
        here = s < steps
        _load_step(t0 + kb + STAGES, gl.where(here, s, s - steps), num_k, a_desc, w_desc, a_bufs, b_bufs, ready,
                   gl.where(here, a_row, n_a_row), gl.where(here, w_row, n_w_row), up_row, here | (n_a_row >= 0),
                   STAGES, PASSES)
    else:
        _load_step(t0 + kb + STAGES, kb + STAGES, num_k, a_desc, w_desc, a_bufs, b_bufs, ready, a_row, w_row, 0,
                   kb + STAGES < num_k, STAGES, 1)
    return acc


@gluon.jit
def _loader(a_desc, w_desc, a_bufs, b_bufs, ready, empty, a_row, w_row, up_row, num_k,
            STAGES: gl.constexpr, PASSES: gl.constexpr):
    """WS: the loader warp. Fills the stage ring for every K step of every pass (SwiGLU: gate, then up) as soon as
    the math warps have emptied a stage; the math warps never issue a load or meet at a CTA barrier."""
    for t in range(num_k * PASSES):
        mbarrier.wait(empty.index(t % STAGES), ((t // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1 at once
        _load_step(t, t, num_k, a_desc, w_desc, a_bufs, b_bufs, ready, a_row, w_row, up_row, True, STAGES, PASSES)


@gluon.jit
def _gemm_pass(t0, num_k, acc, free_a, free_b, as_ptrs, m_in, stride_ask, ws_ptr, a_desc, w_desc, a_bufs, b_bufs,
               ready, empty, a_row, w_row, ring, STAGES: gl.constexpr, UNROLL: gl.constexpr, WS: gl.constexpr,
               PERSISTENT: gl.constexpr, PASSES: gl.constexpr):
    """acc + A[rows, :] @ W[w_row : w_row + 128, :]^T with the block scales, through the stage ring; t0: pipeline
    steps done before (the ring's stages and barrier phases continue from there). Returns acc and the two free
    product tiles.

    Three fp32 register tiles: acc, the product in flight on the tensor cores, and the product finished one step
    earlier, promoted into acc while the next runs; the next product then reuses its registers. ptxas serialises
    every wgmma of the kernel once a register of a product in flight is copied (as a loop's back edge or an if's
    join would), so products stay in flight only inside a statically unrolled group of UNROLL steps; each group
    ends with nothing in flight (its last promotion does not overlap).

    PERSISTENT: the ring was filled before (by the previous tile's last steps, or the kernel's prologue).
    """
    if not WS and not PERSISTENT:
        for i in gl.static_range(STAGES):
            _load_step(t0 + i, i, num_k, a_desc, w_desc, a_bufs, b_bufs, ready, a_row, w_row, 0, i < num_k,
                       STAGES, 1)
    num_full = num_k // UNROLL * UNROLL
    for kb0 in range(0, num_full, UNROLL):
        pending = _issue_mma(t0 + kb0, free_a, a_bufs, b_bufs, ready, STAGES)
        free = free_b
        for j in gl.static_range(1, UNROLL):
            nxt = _issue_mma(t0 + kb0 + j, free, a_bufs, b_bufs, ready, STAGES)
            free = warpgroup_mma_wait(1, deps=(pending,))  # the older of the two groups in flight
            acc = _retire(t0, kb0 + j - 1, num_k, acc, free, as_ptrs, m_in, stride_ask, ws_ptr, a_desc, w_desc,
                          a_bufs, b_bufs, ready, empty, a_row, w_row, ring, STAGES, WS, PERSISTENT, PASSES)
            pending = nxt
        free_a = warpgroup_mma_wait(0, deps=(pending,))
        acc = _retire(t0, kb0 + UNROLL - 1, num_k, acc, free_a, as_ptrs, m_in, stride_ask, ws_ptr, a_desc, w_desc,
                      a_bufs, b_bufs, ready, empty, a_row, w_row, ring, STAGES, WS, PERSISTENT, PASSES)
        free_b = free
    for kb in range(num_full, num_k):  # the steps past the last full group, one at a time
        prod = _issue_mma(t0 + kb, free_a, a_bufs, b_bufs, ready, STAGES)
        free_a = warpgroup_mma_wait(0, deps=(prod,))
        acc = _retire(t0, kb, num_k, acc, free_a, as_ptrs, m_in, stride_ask, ws_ptr, a_desc, w_desc, a_bufs,
                      b_bufs, ready, empty, a_row, w_row, ring, STAGES, WS, PERSISTENT, PASSES)
    return acc, free_a, free_b


@gluon.jit
def _math(num_k, as_ptrs, m_in, stride_ask, ws_ptr, a_desc, w_desc, a_bufs, b_bufs, ready, empty, a_row, w_row, up_row,
          stride_wsn, t0, nxt, gate_smem, BLOCK_M: gl.constexpr, SWIGLU: gl.constexpr, STAGES: gl.constexpr,
          UNROLL: gl.constexpr, WS: gl.constexpr, PERSISTENT: gl.constexpr):
    """The math warps (one per 16 rows): the K loop over the gate (or only) W block, and with SWIGLU the up
    block; returns the fp32 tile (SWIGLU: silu(gate) * up).

    PERSISTENT: t0 is the ring position of the tile's first step, ``nxt`` the next tile's (A row, -1 if there is
    none; W row) for the loads that run ahead into it, and gate_smem the SwiGLU gate tile's shared memory (allocated
    once per program); otherwise the tile is the program's only one and t0, nxt, gate_smem are unused."""
    PASSES: gl.constexpr = 2 if SWIGLU else 1
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[BLOCK_M // 16, 1],
                                                         instr_shape=[16, _BN, 32])
    n_a_row, n_w_row = nxt
    steps = num_k * PASSES
    acc = gl.zeros([BLOCK_M, _BN], gl.float32, layout=mma_layout)
    free_a = gl.zeros([BLOCK_M, _BN], gl.float32, layout=mma_layout)
    free_b = gl.zeros([BLOCK_M, _BN], gl.float32, layout=mma_layout)
    if PERSISTENT:
        acc, free_a, free_b = _gemm_pass(t0, num_k, acc, free_a, free_b, as_ptrs, m_in, stride_ask, ws_ptr, a_desc,
                                         w_desc, a_bufs, b_bufs, ready, empty, a_row, w_row,
                                         (0, steps, up_row, n_a_row, n_w_row), STAGES, UNROLL, WS,
                                         PERSISTENT, PASSES)
    else:
        acc, free_a, free_b = _gemm_pass(0, num_k, acc, free_a, free_b, as_ptrs, m_in, stride_ask, ws_ptr, a_desc,
                                         w_desc, a_bufs, b_bufs, ready, empty, a_row, w_row, nxt, STAGES, UNROLL,
                                         WS, PERSISTENT, PASSES)
    if SWIGLU:
        # that was the gate tile: park it in shared memory (four register tiles do not fit) and run the same rows
        # through the up block, up_row rows of W further on
        if not PERSISTENT:
            gate_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, _BN],
                                                  gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
        gate_smem.store(acc)
        up = gl.zeros([BLOCK_M, _BN], gl.float32, layout=mma_layout)
        if PERSISTENT:  # the loads address the up block themselves (a tile's steps run on into it)
            up, free_a, free_b = _gemm_pass(t0 + num_k, num_k, up, free_a, free_b, as_ptrs, m_in, stride_ask,
                                            ws_ptr + (up_row // _BN) * stride_wsn, a_desc, w_desc, a_bufs, b_bufs,
                                            ready, empty, a_row, w_row,
                                            (num_k, steps, up_row, n_a_row, n_w_row), STAGES, UNROLL, WS,
                                            PERSISTENT, PASSES)
        else:
            up, free_a, free_b = _gemm_pass(num_k, num_k, up, free_a, free_b, as_ptrs, m_in, stride_ask,
                                            ws_ptr + (up_row // _BN) * stride_wsn, a_desc, w_desc, a_bufs, b_bufs,
                                            ready, empty, a_row, w_row + up_row, nxt, STAGES, UNROLL, WS, PERSISTENT,
                                            PASSES)
        gate = gate_smem.load(mma_layout)
        acc = gate / (1.0 + gl.exp(-gate)) * up  # silu(gate) * up, in fp32
    return (acc,)  # a tuple: what warp_specialize takes from its default partition


@gluon.jit
def _epilogue(acc, offs_m, row_start, row_end, tile_n, N, row_weight_ptr, out_ptr, out_scale_ptr, stride_om,
              stride_osm, BLOCK_M: gl.constexpr, ROW_WEIGHT: gl.constexpr, SWIGLU: gl.constexpr,
              num_warps: gl.constexpr):
    """Write the [BLOCK_M, 128] fp32 tile: times the row weight, then bf16 / fp32, or with SWIGLU e4m3 with one scale
    per row (the tile's 128 columns are one 1x128 group). Rows from row_end on belong to no one here."""
    row_ok = offs_m < row_end
    if ROW_WEIGHT:
        acc = acc * gl.load(row_weight_ptr + offs_m, mask=row_ok, other=0.0)[:, None]
    if SWIGLU:
        # 128 columns: exactly one 1x128 scale group of each row
        # IEEE divisions (div.rn.f32; "/" is div.full.f32, ~2 ulp): the values of the unfused quantisation
        amax = gl.maximum(gl.max(gl.abs(acc), axis=1), _AMAX_FLOOR)
        scale = gl.div_rn(amax, gl.full(amax.shape, _E4M3_MAX, gl.float32, amax.type.layout))
        gl.store(out_scale_ptr + offs_m.to(gl.int64) * stride_osm + tile_n, scale, mask=row_ok)
        scale_2d, acc = gl.broadcast(scale[:, None], acc)
        q = gl.div_rn(acc, scale_2d).to(out_ptr.dtype.element_ty)  # cvt.rn.satfinite: nearest even, saturating
    else:
        q = acc.to(out_ptr.dtype.element_ty)
    # stores from a row-major layout: 16 consecutive bytes per thread
    VEC: gl.constexpr = 128 // out_ptr.dtype.element_ty.primitive_bitwidth
    out_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 * VEC // _BN, _BN // VEC], [num_warps, 1], [1, 0])
    o_rows = row_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
    o_cols = tile_n * _BN + gl.arange(0, _BN, layout=gl.SliceLayout(0, out_layout))
    out_ptrs = out_ptr + o_rows.to(gl.int64)[:, None] * stride_om + o_cols[None, :]
    gl.store(out_ptrs, gl.convert_layout(q, out_layout), mask=(o_rows < row_end)[:, None] & (o_cols < N)[None, :])


@gluon.jit
def _grouped_gemm_fp8_wgmma_kernel(
    a_desc, w_desc, a_scale_ptr, w_scale_ptr, offsets_ptr, masked_m_ptr, row_weight_ptr, out_ptr, out_scale_ptr,
    M, N, K, E, max_m,
    w_rows,  # rows of W per expert (N, or 2I with SWIGLU)
    up_row,  # SWIGLU: the row of W where the "up" half starts (I)
    stride_asm, stride_ask, stride_wse, stride_wsn, stride_om, stride_osm,
    SWIGLU: gl.constexpr, ROW_WEIGHT: gl.constexpr, MASKED: gl.constexpr, BLOCK_M: gl.constexpr,
    GROUP_M: gl.constexpr, E_PAD: gl.constexpr, STAGES: gl.constexpr, UNROLL: gl.constexpr, WS: gl.constexpr,
    LOADER_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    # A program computes a [BLOCK_M, 128] output tile: 128 columns are one weight-scale block (its W scale is one
    # number per K step) and, with SWIGLU, one 1x128 scale group of the e4m3 output. One warp per 16 rows.
    pid = gl.program_id(0)
    expert, row_start, row_end, tile_n = _schedule(pid, M, N, E, max_m, offsets_ptr, masked_m_ptr, MASKED,
                                                   BLOCK_M, _BN, GROUP_M, E_PAD, num_warps)
    if row_start >= row_end:
        return

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, _BN, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
    offs_m = row_start + gl.arange(0, BLOCK_M, layout=row_layout)
    # rows past M are TMA's zero fill (scale 0); rows of the next expert are computed and never stored
    as_ptrs = a_scale_ptr + offs_m.to(gl.int64) * stride_asm
    m_in = offs_m < M
    w_row = expert * w_rows + tile_n * _BN
    ws_ptr = w_scale_ptr + expert.to(gl.int64) * stride_wse + tile_n * stride_wsn

    a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, _BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, _BN, _BK], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)

    if WS:  # the math warps hand emptied stages back to the loader warp
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(empty.index(i), count=1)
    else:
        empty = ready  # unused: the math warps load the stages themselves

    num_k = K // _BK
    if WS:
        # one loader warp issues every TMA load; the math warps only wait for stages and hand them back
        acc = gl.warp_specialize([
            (_math, (num_k, as_ptrs, m_in, stride_ask, ws_ptr, a_desc, w_desc, a_bufs, b_bufs, ready, empty,
                     row_start, w_row, up_row, stride_wsn, 0, (0, 0), ready, BLOCK_M, SWIGLU, STAGES, UNROLL,
                     WS, False)),
            (_loader, (a_desc, w_desc, a_bufs, b_bufs, ready, empty, row_start, w_row, up_row, num_k, STAGES,
                       2 if SWIGLU else 1)),
        ], [1], [LOADER_REGS])[0]
    else:
        acc = _math(num_k, as_ptrs, m_in, stride_ask, ws_ptr, a_desc, w_desc, a_bufs, b_bufs, ready, empty,
                    row_start, w_row, up_row, stride_wsn, 0, (0, 0), ready, BLOCK_M, SWIGLU, STAGES, UNROLL,
                    WS, False)[0]
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        if WS:
            mbarrier.invalidate(empty.index(i))

    _epilogue(acc, offs_m, row_start, row_end, tile_n, N, row_weight_ptr, out_ptr, out_scale_ptr, stride_om,
              stride_osm, BLOCK_M, ROW_WEIGHT, SWIGLU, num_warps)


@gluon.jit
def _persistent_loader(a_desc, w_desc, a_bufs, b_bufs, ready, empty, pid, num_programs, my_count, num_m, num_n, E,
                       offsets_ptr, w_rows, up_row, num_k, BLOCK_M: gl.constexpr, GROUP_M: gl.constexpr,
                       E_PAD: gl.constexpr, STAGES: gl.constexpr, PASSES: gl.constexpr):
    """WS + PERSISTENT: the loader warp walks the program's tiles in the math warps' order and fills the stage ring
    with every step of each; it runs into the next tile while the math warps finish and write the current one."""
    e_idx, lo, hi, tiles, ends = _expert_tiles(E, offsets_ptr, BLOCK_M, E_PAD, 1)
    steps = num_k * PASSES
    for it in range(my_count):
        tile_m, tile_n = _group_order(pid + it * num_programs, num_m, num_n, GROUP_M)
        expert, row_start, row_end = _locate(tile_m, e_idx, lo, hi, tiles, ends, BLOCK_M)
        w_row = expert * w_rows + tile_n * _BN
        for s in range(steps):
            t = it * steps + s
            mbarrier.wait(empty.index(t % STAGES), ((t // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
            _load_step(t, s, num_k, a_desc, w_desc, a_bufs, b_bufs, ready, row_start, w_row, up_row, True, STAGES,
                       PASSES)


@gluon.jit
def _persistent_tiles(pid, num_programs, my_count, num_m, num_n, num_k, M, N, E, offsets_ptr, w_rows, up_row,
                      a_scale_ptr, w_scale_ptr, row_weight_ptr, out_ptr, out_scale_ptr, stride_asm, stride_ask,
                      stride_wse, stride_wsn, stride_om, stride_osm, a_desc, w_desc, a_bufs, b_bufs, ready, empty,
                      gate_smem, SWIGLU: gl.constexpr, ROW_WEIGHT: gl.constexpr, BLOCK_M: gl.constexpr,
                      GROUP_M: gl.constexpr, E_PAD: gl.constexpr, STAGES: gl.constexpr, UNROLL: gl.constexpr,
                      WS: gl.constexpr):
    """PERSISTENT: the math warps compute and write the program's tiles pid, pid + num_programs, ... in turn.
    Without WS they also issue every load; the last STAGES steps of a tile load the next tile's first ones, so the
    next tile's operands arrive while this one's epilogue runs."""
    PASSES: gl.constexpr = 2 if SWIGLU else 1
    NW: gl.constexpr = BLOCK_M // 16  # the math warps
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                         instr_shape=[16, _BN, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
    e_idx, lo, hi, tiles, ends = _expert_tiles(E, offsets_ptr, BLOCK_M, E_PAD, NW)
    steps = num_k * PASSES
    last = num_m * num_n - 1
    tile_m, tile_n = _group_order(gl.minimum(pid, last), num_m, num_n, GROUP_M)
    expert, row_start, row_end = _locate(tile_m, e_idx, lo, hi, tiles, ends, BLOCK_M)
    w_row = expert * w_rows + tile_n * _BN
    if not WS:  # the first tile's first STAGES steps (the launcher makes sure a tile has that many)
        for i in gl.static_range(STAGES):
            _load_step(i, i, num_k, a_desc, w_desc, a_bufs, b_bufs, ready, row_start, w_row, up_row, my_count > 0,
                       STAGES, PASSES)
    for it in range(my_count):
        # the next tile (clamped to a real one past the end: its loads are then predicated off); the expert table
        # is read again (L1 hits) rather than held in registers through the K loop
        e_idx, lo, hi, tiles, ends = _expert_tiles(E, offsets_ptr, BLOCK_M, E_PAD, NW)
        n_tile_m, n_tile_n = _group_order(gl.minimum(pid + (it + 1) * num_programs, last), num_m, num_n, GROUP_M)
        n_expert, n_row_start, n_row_end = _locate(n_tile_m, e_idx, lo, hi, tiles, ends, BLOCK_M)
        n_w_row = n_expert * w_rows + n_tile_n * _BN
        offs_m = row_start + gl.arange(0, BLOCK_M, layout=row_layout)
        as_ptrs = a_scale_ptr + offs_m.to(gl.int64) * stride_asm
        ws_ptr = w_scale_ptr + expert.to(gl.int64) * stride_wse + tile_n * stride_wsn
        acc = _math(num_k, as_ptrs, offs_m < M, stride_ask, ws_ptr, a_desc, w_desc, a_bufs, b_bufs, ready, empty,
                    row_start, w_row, up_row, stride_wsn, it * steps,
                    (gl.where(it + 1 < my_count, n_row_start, -1), n_w_row),
                    gate_smem, BLOCK_M, SWIGLU, STAGES, UNROLL, WS, True)[0]
        _epilogue(acc, offs_m, row_start, row_end, tile_n, N, row_weight_ptr, out_ptr, out_scale_ptr, stride_om,
                  stride_osm, BLOCK_M, ROW_WEIGHT, SWIGLU, NW)
        expert, row_start, row_end, tile_n, w_row = n_expert, n_row_start, n_row_end, n_tile_n, n_w_row
    return (my_count,)  # a tuple: what warp_specialize takes from its default partition


@gluon.jit
def _grouped_gemm_fp8_wgmma_persistent_kernel(
    a_desc, w_desc, a_scale_ptr, w_scale_ptr, offsets_ptr, masked_m_ptr, row_weight_ptr, out_ptr, out_scale_ptr,
    M, N, K, E, max_m, w_rows, up_row,
    stride_asm, stride_ask, stride_wse, stride_wsn, stride_om, stride_osm,
    SWIGLU: gl.constexpr, ROW_WEIGHT: gl.constexpr, MASKED: gl.constexpr, BLOCK_M: gl.constexpr,
    GROUP_M: gl.constexpr, E_PAD: gl.constexpr, STAGES: gl.constexpr, UNROLL: gl.constexpr, WS: gl.constexpr,
    LOADER_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    # The persistent form of the kernel above (same arguments; the offsets layout only): a grid of about one
    # program per SM, each taking every num_programs-th tile of the real tile count (counted here from offsets,
    # so no program meets an empty tile), with the stage ring and its barrier phases running on across tiles.
    gl.static_assert(not MASKED, "the persistent kernel takes the offsets layout only")
    pid = gl.program_id(0)
    num_programs = gl.num_programs(0)
    e_idx, lo, hi, tiles, ends = _expert_tiles(E, offsets_ptr, BLOCK_M, E_PAD, num_warps)
    num_m = gl.sum(tiles, axis=0)  # real row tiles
    num_n = (N + _BN - 1) // _BN
    my_count = (num_m * num_n - pid + num_programs - 1) // num_programs
    num_k = K // _BK

    a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, _BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, _BN, _BK], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    if WS:
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(empty.index(i), count=1)
    else:
        empty = ready  # unused: the math warps load the stages themselves
    if SWIGLU:  # the gate tile's parking place, once for all tiles
        gate_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, _BN],
                                              gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    else:
        gate_smem = ready  # unused

    if WS:
        gl.warp_specialize([
            (_persistent_tiles, (pid, num_programs, my_count, num_m, num_n, num_k, M, N, E, offsets_ptr, w_rows,
                                 up_row, a_scale_ptr, w_scale_ptr, row_weight_ptr, out_ptr, out_scale_ptr, stride_asm,
                                 stride_ask, stride_wse, stride_wsn, stride_om, stride_osm, a_desc, w_desc, a_bufs,
                                 b_bufs, ready, empty, gate_smem, SWIGLU, ROW_WEIGHT, BLOCK_M, GROUP_M, E_PAD, STAGES,
                                 UNROLL, WS)),
            (_persistent_loader, (a_desc, w_desc, a_bufs, b_bufs, ready, empty, pid, num_programs, my_count, num_m,
                                  num_n, E, offsets_ptr, w_rows, up_row, num_k, BLOCK_M, GROUP_M, E_PAD, STAGES,
                                  2 if SWIGLU else 1)),
        ], [1], [LOADER_REGS])
    else:
        _persistent_tiles(pid, num_programs, my_count, num_m, num_n, num_k, M, N, E, offsets_ptr, w_rows, up_row,
                          a_scale_ptr, w_scale_ptr, row_weight_ptr, out_ptr, out_scale_ptr, stride_asm, stride_ask,
                          stride_wse, stride_wsn, stride_om, stride_osm, a_desc, w_desc, a_bufs, b_bufs, ready, empty,
                          gate_smem, SWIGLU, ROW_WEIGHT, BLOCK_M, GROUP_M, E_PAD, STAGES, UNROLL, WS)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        if WS:
            mbarrier.invalidate(empty.index(i))


# ---------------------------------------------------------------------------------------------------------------
# launcher

def supports(cfg: dict, swiglu: bool, quant_out: bool) -> bool:
    """Whether a config describes a tile this kernel builds: [BLOCK_M, 128] output tiles of 64 or 128 rows, one warp
    per 16 rows; SwiGLU only with its e4m3 epilogue, PAIR_N not at all."""
    BM, BN, warps = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"]
    return (BN == BLOCK_N and cfg.get("BLOCK_K", BLOCK_K) == BLOCK_K and BM in (64, 128) and warps == BM // 16
            and not cfg.get("PAIR_N", 0) and quant_out == swiglu)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def launch(a, a_scale, w, w_scale, out, *, offsets=None, masked_m=None, max_m=0, out_scale=None, row_weight=None,
           swiglu=False, cfg):
    """Launch on 2-D a [M, K] e4m3 (masked: [E * max_m, K]) and w [E, w_rows, K] e4m3 (row-major, 16-byte
    aligned rows), writing out [M, N] (SwiGLU: e4m3 out and fp32 out_scale [M, N/128]).

    ``cfg``: BLOCK_M (64 or 128), BLOCK_N (128), num_warps (BLOCK_M / 16), num_stages, GROUP_M, UNROLL (K steps
    per unrolled group, default 4), WS (1: a loader warp of its own issues the TMA loads, warp-specialised),
    PERSISTENT (n > 0: the persistent kernel on n programs per SM; the masked layout, and a tile with fewer K steps
    than stages, run the one-tile-per-program kernel).
    """
    E, w_rows, K = w.shape
    M = a.shape[0]
    N = w_rows // 2 if swiglu else w_rows
    BM = cfg["BLOCK_M"]
    stages = cfg["num_stages"]
    masked = masked_m is not None
    a_layout = gl.NVMMASharedLayout.get_default_for([BM, BLOCK_K], gl.float8e4nv)
    w_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.float8e4nv)
    a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [BM, BLOCK_K], a_layout)
    w_desc = TensorDescriptor(w.view(E * w_rows, K), [E * w_rows, K], [K, 1], [BLOCK_N, BLOCK_K], w_layout)
    num_m = E * triton.cdiv(max_m, BM) if masked else triton.cdiv(M, BM) + E
    grid = num_m * triton.cdiv(N, BLOCK_N)
    kernel = _grouped_gemm_fp8_wgmma_kernel
    per_sm = int(cfg.get("PERSISTENT", 0))
    if per_sm and not masked and (K // BLOCK_K) * (2 if swiglu else 1) >= stages:
        kernel = _grouped_gemm_fp8_wgmma_persistent_kernel
        grid = min(grid, per_sm * _sm_count(a.device.index if a.device.index is not None else 0))
    idx = offsets if offsets is not None else masked_m  # any int32 tensor stands in for an absent pointer
    return kernel[(grid,)](
        a_desc, w_desc, a_scale, w_scale, idx, idx, row_weight if row_weight is not None else a_scale, out,
        out_scale if out_scale is not None else a_scale,
        M, N, K, E, max_m, w_rows, N,
        a_scale.stride(0), a_scale.stride(1), w_scale.stride(0), w_scale.stride(1), out.stride(0),
        out_scale.stride(0) if out_scale is not None else 0,
        SWIGLU=swiglu, ROW_WEIGHT=row_weight is not None, MASKED=masked, BLOCK_M=BM, GROUP_M=cfg["GROUP_M"],
        E_PAD=max(32, triton.next_power_of_2(E)), STAGES=stages, UNROLL=cfg.get("UNROLL", DEFAULT_UNROLL),
        WS=bool(cfg.get("WS", 0)), LOADER_REGS=LOADER_REGS, num_warps=cfg["num_warps"],
        **({"maxnreg": ws_maxnreg(cfg["num_warps"])} if cfg.get("WS", 0) else {}),
    )


def ws_maxnreg(num_warps: int) -> int:
    """WS: the kernel-wide register cap for num_warps math warps + one loader warpgroup. The loader gives up all
    but LOADER_REGS of its share, which the math warps take (setmaxnreg): they end up with about 240."""
    return (65536 // (32 * (num_warps + 4))) // 8 * 8
