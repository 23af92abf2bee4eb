"""FP8 weight gradient of the grouped GEMM, DeepSeek-V3's recipe, as a K-grouped GEMM on Hopper (DeepGEMM's way).

The contract of ``grouped_gemm.grouped_wgrad(..., fp8=True)`` (its oracle: ``grouped_gemm._wgrad_fp8_reference``):
dW[e] = sum over the expert's 128-row groups (counted from its first row; the last one may be short) of
Q(dY_g)^T Q(X_g) * (sa_g x sb_g), where Q quantises each column of the group (a row of dY^T / X^T: the 1x128 group
along the reduction axis) to e4m3 with scale = max(amax, 1e-10) / 448; fp32 accumulation of the promoted products;
dW in the output dtype; an expert without rows gets zeros.

Two kernels (``launch`` runs both):

1. ``quantize_transposed`` (Triton, memory-bound; also runs in the interpreter): reads dY [M, N] and X [M, K] once
   and writes e4m3 copies transposed, dYt [N, Mp] and Xt [K, Mp], with one fp32 scale per (row of the copy, token
   group): dYs [Gp, N], Xs [Gp, K] (group-major: the scales of one group for a tile's 128 rows are 512 contiguous
   bytes, one TMA box). On the padded token axis every expert starts on a group boundary: expert e owns the groups
   gofs[e] : gofs[e+1] (gofs = prefix sum of ceil(M_e / 128), written by ``_group_offsets_kernel``), its rows
   laid out from token gofs[e] * 128 on, the rest of its last group zeros. Mp = 128 * (M // 128 + E) bounds the
   padded length without a device->host sync; groups past gofs[E] are neither written nor read.
   A program quantises one group x 128 columns: a [128, 128] tile of dY or X, each column's amax (NaN kept, as the
   reference's), e4m3 values with IEEE divisions (tl.div_rn: div.rn.f32 with every Triton; the reference's values;
   the interpreter's rounding emulation gives +0 where the hardware cast gives -0), stored transposed.

2. ``_wgrad_fp8_kernel`` (Gluon, sm_90a): dW_e [N, K] as [128, 128] output tiles, each the sum over the expert's
   groups of one e4m3 wgmma product P_g = dYt[n-tile, group g] @ Xt[k-tile, group g]^T (both operands K-major from
   shared memory, the layout FP8 wgmma needs; 128 tokens = one product of 4 m64n128k32 instructions per
   warpgroup), promoted into the fp32 accumulator with its rank-1 scale: acc += P_g * (sa_g[:, None] * sb_g[None, :]).
   Tiles are ordered expert-major ((expert, n-tile, k-tile)), each expert owning the same number of tiles, so a
   tile id decodes by division; a persistent program takes every grid-th tile.
   * a loader warp (``gl.warp_specialize`` worker, LOADER_REGS registers) walks the program's tiles and groups and
     TMA-loads per group the dYt box [128, 128], the Xt box [128, 128] (rows past K: TMA's zero fill) and the two
     scale rows [1, 128] into a STAGES-deep ring (ready / empty mbarriers per stage); it runs ahead into the next
     tile while the math warps write the current one.
   * the math warps (two warpgroups, 8 warps; one [128, 128] fp32 tile = 64 registers a thread) keep one product
     on the tensor cores while they promote the one before: three fp32 tiles live (acc, the product in flight, the
     finished one), as ``grouped_gemm_wgmma`` does it. ptxas serialises every wgmma of a kernel once a register of
     a product in flight is copied (a loop's back edge, an if's join: notes C7514 / C7512), so products are in
     flight only inside statically unrolled groups of UNROLL steps (the remainder one at a time), and each
     promotion passes a volatile no-op (``_pin``) before the next issue. A promotion reads its scales from the
     stage's shared memory (2 + 32 values a thread), then hands the stage back (CTA barrier of the math warps,
     one arrive).
   * epilogue: the tile in the output dtype into shared memory and out by a TMA store into dW viewed [E * N, K]
     (columns past K clipped; N % 128 == 0, so a tile never crosses experts); two buffers for 16-bit outputs, so
     a store runs on while the next tile's products do.
   Shared memory: STAGES x 33 KiB + 32 KiB per epilogue buffer (64 KiB fp32): 196 KiB at 4 stages.

Needs ``triton.experimental.gluon`` (Triton 3.6 and 3.8 compile it for sm_90a, see ``compile_sm90``) and sm_90;
``grouped_gemm.grouped_wgrad(fp8=True)`` runs it by default where ``supports`` holds (MOE_KERNELS_WGRAD_FP8=triton
opts out), the Triton kernel otherwise. H100 (2026-12-07): all its GPU tests pass, and a trainable-FP8 training step
with FP8 weight gradients (mixtral-like, 8192 tokens) took 8.34 ms with it against 67-69 ms with the Triton kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .grouped_gemm_wgmma import _pin
from .grouped_wgrad_wgmma import _gl_dtype, _sm_count, _sync, maxnreg
from .quant import AMAX_FLOOR, E4M3_MAX, to_e4m3_rne

__all__ = ["launch", "supports", "quantize_transposed", "gemm", "compile_sm90", "padded_groups"]

FAILED: list[str] = []  # grouped_wgrad's note of a launch of this path that raised (it then runs the Triton kernel)

GROUP = 128  # tokens per scale group = the reduction of one product
BLOCK_N = 128  # rows of a dW tile (rows of dY^T: the wgmma M, two warpgroups of 64)
BLOCK_K = 128  # columns of a dW tile (rows of X^T: the wgmma N)
NUM_WARPS = 8
DEFAULT_STAGES = 4
DEFAULT_UNROLL = 4
LOADER_REGS = 24  # the loader warp holds scalars only
QUANT_BLOCK_C = 128  # columns (channels) per quantisation program
QUANT_WARPS = 8
_G = gl.constexpr(GROUP)
_BN = gl.constexpr(BLOCK_N)
_BK = gl.constexpr(BLOCK_K)
_TG = tl.constexpr(GROUP)


# ---------------------------------------------------------------------------------------------------------------
# 1. the quantisation pass (Triton)

@triton.jit
def _group_offsets_kernel(offsets_ptr, gofs_ptr, E, E_PAD: tl.constexpr):
    """gofs[0] = 0, gofs[e + 1] = sum over experts <= e of ceil(rows / 128): each expert's first padded group."""
    e = tl.arange(0, E_PAD)
    m = e < E
    lo = tl.load(offsets_ptr + e, mask=m, other=0)
    hi = tl.load(offsets_ptr + e + 1, mask=m, other=0)
    groups = tl.where(m, (tl.maximum(hi - lo, 0) + _TG - 1) // _TG, 0)
    tl.store(gofs_ptr + 1 + e, tl.cumsum(groups, 0), mask=m)
    tl.store(gofs_ptr + e, tl.zeros_like(e), mask=e == 0)


@triton.jit
def _column_amax(v):
    """max |v| of each column, at least 1e-10, NaN where the column holds a NaN (the reference's amax). Built from
    tl.max (tl.max may drop NaNs on the GPU, hence the separate test), not quant.group_amax: its custom combine
    runs element by element in the interpreter."""
    amax = tl.maximum(tl.max(tl.abs(v), axis=0), AMAX_FLOOR)
    has_nan = tl.max((v != v).to(tl.int32), axis=0) > 0
    return tl.where(has_nan, float("nan"), amax)


@triton.jit
def _quantize_group(src_ptr, q_ptr, s_ptr, g, c0, r0, hi, C, stride_src, stride_q, stride_s,
                    BLOCK_C: tl.constexpr):
    """Rows r0 : min(r0 + 128, hi) x columns c0 : c0 + BLOCK_C of src: each column one 1x128 group (rows past hi:
    zeros), e4m3 stored transposed at tokens g * 128 + (0..127) of rows c0 + (0..) of q, scales at s[g, c]."""
    rows = r0 + tl.arange(0, _TG)
    cols = c0 + tl.arange(0, BLOCK_C)
    r_ok = rows < hi
    c_ok = cols < C
    v = tl.load(src_ptr + rows.to(tl.int64)[:, None] * stride_src + cols[None, :],
                mask=r_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    amax = _column_amax(v)
    # tl.div_rn, not tl.fdiv(..., ieee_rounding=True): Triton 3.6 drops that flag (div.full.f32, ~2 ulp, on the GPU)
    scale = tl.div_rn(amax, tl.full(amax.shape, E4M3_MAX, tl.float32))
    q = to_e4m3_rne(tl.div_rn(v, tl.broadcast_to(scale[None, :], v.shape)))
    q = tl.where(r_ok[:, None], q, 0.0)  # padded tokens zero also in a NaN column (0 / NaN)
    toks = g.to(tl.int64) * _TG + tl.arange(0, _TG)
    tl.store(q_ptr + cols.to(tl.int64)[None, :] * stride_q + toks[:, None], q.to(q_ptr.dtype.element_ty),
             mask=c_ok[None, :])
    tl.store(s_ptr + g.to(tl.int64) * stride_s + cols, scale, mask=c_ok)


@triton.jit
def _quantize_transposed_kernel(dy_ptr, x_ptr, offsets_ptr, gofs_ptr, dyq_ptr, dys_ptr, xq_ptr, xs_ptr, N, K, E,
                                stride_dy, stride_x, stride_dyq, stride_xq, stride_dys, stride_xs,
                                E_PAD: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (g, c): padded group g, column block c of dY (c < ceil(N / BLOCK_C)) or of X (the rest)."""
    g = tl.program_id(0)
    cb = tl.program_id(1)
    ee = tl.arange(0, E_PAD)
    ends = tl.load(gofs_ptr + 1 + ee, mask=ee < E, other=2147483647)
    e = tl.sum((ends <= g).to(tl.int32), 0)  # the expert whose groups hold g (empty experts end where they start)
    if e < E:
        first = tl.load(gofs_ptr + e)
        hi = tl.load(offsets_ptr + e + 1)
        r0 = tl.load(offsets_ptr + e) + (g - first) * _TG
        nb_dy = tl.cdiv(N, BLOCK_C)
        if cb < nb_dy:
            _quantize_group(dy_ptr, dyq_ptr, dys_ptr, g, cb * BLOCK_C, r0, hi, N, stride_dy, stride_dyq, stride_dys,
                            BLOCK_C)
        else:
            _quantize_group(x_ptr, xq_ptr, xs_ptr, g, (cb - nb_dy) * BLOCK_C, r0, hi, K, stride_x, stride_xq,
                            stride_xs, BLOCK_C)


def padded_groups(M: int, E: int) -> int:
    """An upper bound of sum_e ceil(M_e / 128) for rows M over E experts, known without reading offsets."""
    return M // GROUP + E


def quantize_transposed(dy, x, offsets, num_experts: int, *, out=None, block_c: int | None = None,
                        num_warps: int | None = None):
    """dy [M, N], x [M, K] (one float dtype, contiguous rows), offsets int32 [E + 1] ->
    (dyq e4m3 [N, Mp], dys fp32 [Gp, N], xq e4m3 [K, Mp], xs fp32 [Gp, K], gofs int32 [E + 1]), Gp =
    ``padded_groups(M, E)``, Mp = 128 Gp: expert e's rows quantised in 1x128 groups along the rows, at padded
    groups gofs[e] : gofs[e + 1] (tokens from gofs[e] * 128 on, the last group zero-padded). Groups from gofs[E]
    on are left as they were. ``out``: those five tensors to write into (contiguous, these shapes)."""
    import torch

    M, N = dy.shape
    K = x.shape[1]
    E = num_experts
    G = padded_groups(M, E)
    dev = dy.device
    if out is None:
        out = (torch.empty(N, G * GROUP, dtype=torch.float8_e4m3fn, device=dev),
               torch.empty(G, N, dtype=torch.float32, device=dev),
               torch.empty(K, G * GROUP, dtype=torch.float8_e4m3fn, device=dev),
               torch.empty(G, K, dtype=torch.float32, device=dev),
               torch.empty(E + 1, dtype=torch.int32, device=dev))
    dyq, dys, xq, xs, gofs = out
    want = [(N, G * GROUP), (G, N), (K, G * GROUP), (G, K), (E + 1,)]
    if [tuple(t.shape) for t in out] != want or not all(t.is_contiguous() for t in out):
        raise ValueError(f"out: contiguous tensors of shapes {want}, got {[tuple(t.shape) for t in out]}")
    offsets = offsets.to(torch.int32).contiguous()
    e_pad = max(16, triton.next_power_of_2(E + 1))
    _group_offsets_kernel[(1,)](offsets, gofs, E, E_PAD=e_pad)
    if G and (N or K):
        bc = block_c or QUANT_BLOCK_C
        grid = (G, triton.cdiv(N, bc) + triton.cdiv(K, bc))
        _quantize_transposed_kernel[grid](dy, x, offsets, gofs, dyq, dys, xq, xs, N, K, E, dy.stride(0),
                                          x.stride(0), dyq.stride(0), xq.stride(0), dys.stride(0), xs.stride(0),
                                          E_PAD=e_pad, BLOCK_C=bc, num_warps=num_warps or QUANT_WARPS)
    return dyq, dys, xq, xs, gofs


# ---------------------------------------------------------------------------------------------------------------
# 2. the K-grouped FP8 GEMM (Gluon)

@gluon.jit
def _tile(t, tiles_per_e, num_kb, gofs_ptr):
    """Tile id -> (expert, first row n0 of dW[e], first column k0, the expert's padded groups [g_lo, g_hi))."""
    e = t // tiles_per_e
    r = t - e * tiles_per_e
    nb = r // num_kb
    kb = r - nb * num_kb
    g_lo = gl.load(gofs_ptr + e)
    g_hi = gl.load(gofs_ptr + e + 1)
    return e, nb * _BN, kb * _BK, g_lo, g_hi


@gluon.jit
def _loader(a_desc, b_desc, sa_desc, sb_desc, a_bufs, b_bufs, s_bufs, ready, empty, gofs_ptr, pid, nprog, my_count,
            tiles_per_e, num_kb, STAGES: gl.constexpr):
    """The loader warp: every group of every tile of this program, in the math warps' order, into the ring."""
    nbytes: gl.constexpr = (a_desc.block_type.nbytes + b_desc.block_type.nbytes + sa_desc.block_type.nbytes
                            + sb_desc.block_type.nbytes)
    c = 0
    for j in range(my_count):
        e, n0, k0, g_lo, g_hi = _tile(pid + j * nprog, tiles_per_e, num_kb, gofs_ptr)
        for g in range(g_lo, g_hi):
            st = c % STAGES
            mbarrier.wait(empty.index(st), ((c // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1 at once
            bar = ready.index(st)
            mbarrier.expect(bar, nbytes)
            tma.async_copy_global_to_shared(a_desc, [n0, g * _G], bar, a_bufs.index(st))
            tma.async_copy_global_to_shared(b_desc, [k0, g * _G], bar, b_bufs.index(st))
            sc = s_bufs.index(st)
            tma.async_copy_global_to_shared(sa_desc, [g, n0], bar, sc.slice(0, 1))
            tma.async_copy_global_to_shared(sb_desc, [g, k0], bar, sc.slice(1, 1))
            c += 1


@gluon.jit
def _issue(c, free, a_bufs, b_bufs, ready, STAGES: gl.constexpr):
    """Start the product of ring position c once its stage has landed, into the registers of ``free``."""
    st = c % STAGES
    mbarrier.wait(ready.index(st), (c // STAGES) & 1)
    return warpgroup_mma(a_bufs.index(st), b_bufs.index(st).permute((1, 0)), free, use_acc=False, is_async=True)


@gluon.jit
def _retire(c, acc, done, s_bufs, empty, STAGES: gl.constexpr, mma_layout: gl.constexpr):
    """Promote the finished product of ring position c into acc with its group's scales (dY^T rows x X^T rows),
    then hand the stage back to the loader (every math warp past its reads, then one arrive)."""
    st = c % STAGES
    sc = s_bufs.index(st).reshape([2 * _BN])
    sa = sc.slice(0, _BN).load(gl.SliceLayout(1, mma_layout))
    sb = sc.slice(_BN, _BK).load(gl.SliceLayout(0, mma_layout))
    acc = _pin(acc + done * (sa[:, None] * sb[None, :]))
    _sync()
    mbarrier.arrive(empty.index(st), count=1)
    return acc


@gluon.jit
def _reduce(c0, steps, acc, free_a, free_b, a_bufs, b_bufs, s_bufs, ready, empty, STAGES: gl.constexpr,
            UNROLL: gl.constexpr, mma_layout: gl.constexpr):
    """acc + the tile's ``steps`` promoted products, ring positions c0, c0 + 1, ...; two product tiles alternate
    (one on the tensor cores, one being promoted), in flight only inside a statically unrolled group."""
    num_full = steps // UNROLL * UNROLL
    for s0 in range(0, num_full, UNROLL):
        pending = _issue(c0 + s0, free_a, a_bufs, b_bufs, ready, STAGES)
        free = free_b
        for i in gl.static_range(1, UNROLL):
            nxt = _issue(c0 + s0 + i, free, a_bufs, b_bufs, ready, STAGES)
            free = warpgroup_mma_wait(1, deps=(pending,))  # the older of the two products in flight
            acc = _retire(c0 + s0 + i - 1, acc, free, s_bufs, empty, STAGES, mma_layout)
            pending = nxt
        free_a = warpgroup_mma_wait(0, deps=(pending,))
        acc = _retire(c0 + s0 + UNROLL - 1, acc, free_a, s_bufs, empty, STAGES, mma_layout)
        free_b = free
    for s in range(num_full, steps):  # the steps past the last full group, one at a time
        prod = _issue(c0 + s, free_a, a_bufs, b_bufs, ready, STAGES)
        free_a = warpgroup_mma_wait(0, deps=(prod,))
        acc = _retire(c0 + s, acc, free_a, s_bufs, empty, STAGES, mma_layout)
    return acc, free_a, free_b


@gluon.jit
def _math(a_bufs, b_bufs, s_bufs, ready, empty, c_smem, out_desc, gofs_ptr, pid, nprog, my_count, num_tiles,
          tiles_per_e, num_kb, N, STAGES: gl.constexpr, UNROLL: gl.constexpr, EPI_BUFS: gl.constexpr,
          num_warps: gl.constexpr):
    """The math warps: each tile's promoted products, then the tile through shared memory and a TMA store."""
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, _BK, 32])
    free_a = gl.zeros([_BN, _BK], gl.float32, layout=mma_layout)
    free_b = gl.zeros([_BN, _BK], gl.float32, layout=mma_layout)
    c = 0
    e, n0, k0, g_lo, g_hi = _tile(pid, tiles_per_e, num_kb, gofs_ptr)
    for j in range(my_count):
        # the next tile's coordinates, read now: their loads' latency hides behind this tile's products
        n_e, n_n0, n_k0, n_lo, n_hi = _tile(gl.minimum(pid + (j + 1) * nprog, num_tiles - 1), tiles_per_e, num_kb,
                                            gofs_ptr)
        acc = gl.zeros([_BN, _BK], gl.float32, layout=mma_layout)
        acc, free_a, free_b = _reduce(c, g_hi - g_lo, acc, free_a, free_b, a_bufs, b_bufs, s_bufs, ready, empty,
                                      STAGES, UNROLL, mma_layout)
        c += g_hi - g_lo
        buf = c_smem.index(j % EPI_BUFS)
        tma.store_wait(EPI_BUFS - 1)  # the store that last read this buffer is done
        _sync()
        buf.store(acc.to(out_desc.dtype))
        fence_async_shared()  # generic-proxy writes -> the TMA store
        _sync()  # every warp's part written before the one thread that issues the store
        tma.async_copy_shared_to_global(out_desc, [e * N + n0, k0], buf)
        e, n0, k0, g_lo, g_hi = n_e, n_n0, n_k0, n_lo, n_hi
    tma.store_wait(0)


@gluon.jit
def _wgrad_fp8_kernel(a_desc, b_desc, sa_desc, sb_desc, out_desc, gofs_ptr, N, tiles_per_e, num_kb, num_tiles,
                      STAGES: gl.constexpr, UNROLL: gl.constexpr, EPI_BUFS: gl.constexpr,
                      LOADER_REGS: gl.constexpr, num_warps: gl.constexpr):
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    my_count = (num_tiles - pid + nprog - 1) // nprog

    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, _BN, _G], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, _BK, _G], b_desc.layout)
    s_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, 2, _BN], sa_desc.layout)  # rows: sa, sb
    c_smem = gl.allocate_shared_memory(out_desc.dtype, [EPI_BUFS, _BN, _BK], out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    fence_async_shared()  # the barriers' init, seen by the async proxy

    gl.warp_specialize([
        (_math, (a_bufs, b_bufs, s_bufs, ready, empty, c_smem, out_desc, gofs_ptr, pid, nprog, my_count, num_tiles,
                 tiles_per_e, num_kb, N, STAGES, UNROLL, EPI_BUFS, num_warps)),
        (_loader, (a_desc, b_desc, sa_desc, sb_desc, a_bufs, b_bufs, s_bufs, ready, empty, gofs_ptr, pid, nprog,
                   my_count, tiles_per_e, num_kb, STAGES)),
    ], [1], [LOADER_REGS])

    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))


# ---------------------------------------------------------------------------------------------------------------
# launcher

SMEM_LIMIT = 232448  # bytes an sm_90 block may have


def smem_bytes(stages: int, epi_bufs: int, out_size: int) -> int:
    """Shared memory of the GEMM kernel: the ring (two 16 KiB e4m3 boxes and 1 KiB of scales a stage), the epilogue
    buffers, the barriers."""
    return stages * (2 * BLOCK_N * GROUP + 2 * BLOCK_N * 4) + epi_bufs * BLOCK_N * BLOCK_K * out_size + 16 * stages


def epi_bufs_for(out_size: int, stages: int) -> int:
    """Two epilogue buffers where they fit beside the ring (a tile's store runs on under the next tile), else one."""
    return 2 if smem_bytes(stages, 2, out_size) <= SMEM_LIMIT - 1024 else 1


def supports(dy, x, dw) -> str | None:
    """None when this path takes grouped_wgrad(dy, x, ..., fp8=True) -> dw (contiguous dy [M, N] and x [M, K] of one
    bf16 / fp16 / fp32 dtype, dw [E, N, K] bf16 / fp16 / fp32, N % 128 == 0, K % 8 == 0), else why not (the caller
    checks sm_90 and the operands' alignment)."""
    import torch

    floats = (torch.bfloat16, torch.float16, torch.float32)
    if dy.dtype not in floats or x.dtype != dy.dtype:
        return f"operands {dy.dtype} / {x.dtype} (one float dtype)"
    if dw.dtype not in floats:
        return f"output dtype {dw.dtype}"
    M, N = dy.shape
    K = x.shape[1]
    if M == 0:
        return "no rows"
    if N % BLOCK_N:
        return f"N = {N} is no multiple of {BLOCK_N}"
    if K % 8:
        return f"K = {K} is no multiple of 8 (16-byte rows of dW and of the scales)"
    if not (dy.is_contiguous() and x.is_contiguous()):
        return "dy / x not contiguous"
    if not dw.is_contiguous() or dw.data_ptr() % 16:
        return "dw not contiguous / aligned"
    return None


def _descriptors(dyq, dys, xq, xs, dw):
    E, N, K = dw.shape
    Mp = dyq.shape[1]
    G = dys.shape[0]
    q_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, GROUP], gl.float8e4nv)
    s_layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    out_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], _gl_dtype(dw.dtype))
    a_desc = TensorDescriptor(dyq, [N, Mp], [dyq.stride(0), 1], [BLOCK_N, GROUP], q_layout)
    b_desc = TensorDescriptor(xq, [K, Mp], [xq.stride(0), 1], [BLOCK_K, GROUP], q_layout)
    sa_desc = TensorDescriptor(dys, [G, N], [dys.stride(0), 1], [1, BLOCK_N], s_layout)
    sb_desc = TensorDescriptor(xs, [G, K], [xs.stride(0), 1], [1, BLOCK_K], s_layout)
    out_desc = TensorDescriptor(dw.view(E * N, K), [E * N, K], [K, 1], [BLOCK_N, BLOCK_K], out_layout)
    return a_desc, b_desc, sa_desc, sb_desc, out_desc


def _config(stages, unroll, out_size):
    import os

    if stages is None:
        stages = int(os.environ.get("MOE_KERNELS_WGRAD_FP8_STAGES", DEFAULT_STAGES))
    if unroll is None:
        unroll = int(os.environ.get("MOE_KERNELS_WGRAD_FP8_UNROLL", DEFAULT_UNROLL))
    stages = max(2, stages)  # the math warps wait for step c + 1 before they hand back step c - 1's stage
    while stages > 2 and smem_bytes(stages, 1, out_size) > SMEM_LIMIT - 1024:
        stages -= 1
    return stages, max(1, unroll), epi_bufs_for(out_size, stages)


def gemm(dyq, dys, xq, xs, gofs, dw, *, stages: int | None = None, unroll: int | None = None,
         programs: int | None = None):
    """dw [E, N, K] from ``quantize_transposed``'s outputs. ``stages`` (default env MOE_KERNELS_WGRAD_FP8_STAGES,
    else 4; lowered until the ring fits), ``unroll`` (MOE_KERNELS_WGRAD_FP8_UNROLL, else 4), ``programs``: the
    persistent grid (default one per SM, at most one per tile)."""
    E, N, K = dw.shape
    stages, unroll, epi = _config(stages, unroll, dw.element_size())
    num_kb = triton.cdiv(K, BLOCK_K)
    tiles_per_e = (N // BLOCK_N) * num_kb
    num_tiles = E * tiles_per_e
    if programs is None:
        programs = _sm_count(dw.device.index if dw.device.index is not None else 0)
    grid = max(1, min(num_tiles, programs))
    return _wgrad_fp8_kernel[(grid,)](
        *_descriptors(dyq, dys, xq, xs, dw), gofs, N, tiles_per_e, num_kb, num_tiles,
        STAGES=stages, UNROLL=unroll, EPI_BUFS=epi, LOADER_REGS=LOADER_REGS, num_warps=NUM_WARPS,
        maxnreg=maxnreg(NUM_WARPS))


def launch(dy, x, offsets, dw, *, stages: int | None = None, unroll: int | None = None,
           programs: int | None = None):
    """dw [E, N, K] = the FP8 weight gradient of dy [M, N], x [M, K] (contiguous, M > 0) over offsets int32 [E + 1]:
    the quantisation pass, then the GEMM. Returns dw."""
    dyq, dys, xq, xs, gofs = quantize_transposed(dy, x, offsets, dw.shape[0])
    gemm(dyq, dys, xq, xs, gofs, dw, stages=stages, unroll=unroll, programs=programs)
    return dw


# ---------------------------------------------------------------------------------------------------------------
# offline compile (no GPU): registers, spills and ptxas's wgmma notes of the sm_90a build

def compile_sm90(out_dtype: str = "bf16", stages: int = DEFAULT_STAGES, unroll: int = DEFAULT_UNROLL) -> dict:
    """Compile the GEMM kernel for sm_90a without a GPU (this Triton, its ptxas): shared memory, registers, spill
    bytes, ptxas wgmma warnings (C7514 / C7512 / C7515...: wgmma serialised), and PTX counts of wgmma (e4m3 ones
    too) / wgmma waits / TMA loads and stores / setmaxnreg (``_sm90_offline.compile_gluon_report``)."""
    from ._sm90_offline import compile_gluon_report  # noqa: PLC0415

    dt = {"bf16": gl.bfloat16, "fp16": gl.float16, "fp32": gl.float32}
    stages, unroll, epi = _config(stages, unroll, 4 if out_dtype == "fp32" else 2)
    const = dict(STAGES=stages, UNROLL=unroll, EPI_BUFS=epi, LOADER_REGS=LOADER_REGS, num_warps=NUM_WARPS)
    ql = gl.NVMMASharedLayout.get_default_for([BLOCK_N, GROUP], gl.float8e4nv)
    sl = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    ol = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], dt[out_dtype])
    q_desc, s_desc = f"tensordesc<fp8e4nv[{BLOCK_N},{GROUP}],{ql!r}>", f"tensordesc<fp32[1,{BLOCK_N}],{sl!r}>"
    sig = dict(a_desc=q_desc, b_desc=q_desc, sa_desc=s_desc, sb_desc=s_desc, gofs_ptr="*i32",
               out_desc=f"tensordesc<{out_dtype}[{BLOCK_N},{BLOCK_K}],{ol!r}>")
    sig.update({n: "i32" for n in _wgrad_fp8_kernel.arg_names if n not in sig and n not in const})
    report, wgmma = compile_gluon_report(_wgrad_fp8_kernel, sig, const, NUM_WARPS, maxnreg(NUM_WARPS))
    return dict(report, out_dtype=out_dtype, stages=stages, unroll=unroll, epi_bufs=epi,
                wgmma_e4m3=sum(".e4m3.e4m3" in w for w in wgmma))


if __name__ == "__main__":  # python -m moe_kernels.ops.grouped_wgrad_fp8 [out_dtype stages unroll]
    import sys

    args = sys.argv[1:]
    print(compile_sm90(*args[:1], *[int(a) for a in args[1:3]]))
