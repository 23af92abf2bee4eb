"""Hopper weight gradient of the grouped GEMM, in Gluon: dW[e] = dY_e^T @ X_e, a K-grouped GEMM on wgmma.

The contract of ``grouped_gemm.grouped_wgrad`` (bf16 / fp16 operands, fp32 accumulation, dW [E, N, K] in the
output dtype, an expert without rows gets a zero gradient), for the inputs this kernel takes (``supports``).

Shape of the work: every expert e owns the same grid of output tiles, (N / BLOCK_N) x cdiv(K, BLOCK_K), and each
tile reduces over the expert's token rows offsets[e]:offsets[e+1], BLOCK_M = 64 rows per step. The reduction
length differs per expert (it can be 0); the tile count does not, so a tile id decodes to (expert, column tiles)
by division alone, and every program can walk the tile list on its own without a device-side prefix sum.

Per program (persistent: about one per SM, program p takes tiles p, p + grid, p + 2 grid, ...; the tiles are in
expert-major order, so each program gets a near-equal share of every expert's tiles whatever the expert sizes,
and the programs running at one time read the same one or two experts' rows from L2):
  * a loader warp (``gl.warp_specialize`` worker, few registers) walks the program's tiles and their steps and
    TMA-loads each step's dY rows [64, BLOCK_N] and X rows [64, 2 x 128] into a STAGES-deep ring of shared
    memory stages (ready / empty mbarriers per stage). It runs ahead into the next tile while the math warps
    finish and write the current one, so a tile starts with its first stages already loaded.
  * the math warps (two warpgroups, 8 warps) wait for a stage and issue two asynchronous wgmmas on it:
    A = the dY tile viewed transposed ([BLOCK_N, 64], MN-major, allowed from shared memory for 16-bit types),
    B = one 128-column half of the X tile ([64, 128], MN-major), one fp32 accumulator [128, 128] per half (128
    registers a thread in all). The step's products stay in flight while the next stage is awaited; the stage of
    the step before is handed back to the loader once its products are done (``warpgroup_mma_wait(2)``).
  * the expert's last step usually holds rows of the next expert (or rows past M, which TMA fills with zeros):
    before its products the math warps zero those rows in shared memory, in dY and in both X halves (so a
    non-finite value of the next expert cannot reach this one as 0 x inf), rewriting only the 16-row slices that
    hold such rows (load, select, store, async-proxy fence, barrier). Only that one step per tile pays for it,
    while the tensor cores still run the step before.
  * epilogue: each accumulator half goes to shared memory in the output dtype and out through a TMA store into
    dW viewed [E * N, K] (columns past K are clipped by TMA; N % BLOCK_N == 0, so a tile never crosses into the
    next expert's rows). The first half is converted and stored while the tensor cores still run the last
    step's product of the second (``warpgroup_mma_wait(1)``); the stores run on while the next tile's products
    do, a buffer is reused only after ``tma.store_wait``. 16-bit outputs at 3 stages use two buffers (both halves
    in flight), fp32 outputs and 4 stages one (the second half waits until the first half's store has read it).

Shared memory: STAGES x 48 KiB + the epilogue buffers, 208 KiB of the 227 KiB an sm_90 block may have at 3 stages
(64 KiB of buffers), 224 KiB at 4 (MOE_KERNELS_WGRAD_STAGES=4: one 32 KiB buffer, 16-bit outputs only).

Needs ``triton.experimental.gluon`` (Triton 3.6 and 3.8 compile it for sm_90a, see ``compile_sm90``) and sm_90;
``grouped_gemm.grouped_wgrad`` runs it when MOE_KERNELS_WGRAD=gluon and ``supports`` holds, the Triton kernel
otherwise.
"""
from __future__ import annotations

import functools

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

__all__ = ["launch", "supports", "compile_sm90"]

FAILED: list[str] = []  # grouped_wgrad's note of a launch of this kernel that raised (it then runs the Triton one)

BLOCK_M = 64  # token rows per reduction step
BLOCK_N = 128  # rows of a dW tile (the wgmma M: two warpgroups of 64 rows)
HALF_K = 128  # columns of one accumulator; a dW tile is two halves
BLOCK_K = 2 * HALF_K
NUM_WARPS = 8
DEFAULT_STAGES = 3
LOADER_REGS = 40  # registers of the loader warp (scalars: tile decode, offsets, ring position)
_BM = gl.constexpr(BLOCK_M)
_BN = gl.constexpr(BLOCK_N)
_HK = gl.constexpr(HALF_K)

# a CTA (partition) barrier: gl.barrier on Triton 3.8, gl.thread_barrier on 3.6
_sync = getattr(gl, "barrier", None) or gl.thread_barrier


@gluon.jit
def _tile(t, tiles_per_e, num_kb, offsets_ptr):
    """Tile id -> (expert, the tile's first row n0 of dW[e] (a row of dY^T), its first column k0 (of X), the
    expert's token rows [lo, hi))."""
    e = t // tiles_per_e
    r = t - e * tiles_per_e
    nb = r // num_kb
    kb = r - nb * num_kb
    lo = gl.load(offsets_ptr + e)
    hi = gl.load(offsets_ptr + e + 1)
    return e, nb * _BN, kb * (2 * _HK), lo, hi


@gluon.jit
def _loader(dy_desc, x_desc, dy_bufs, x_bufs, ready, empty, offsets_ptr, pid, nprog, my_count, tiles_per_e, num_kb,
            K, STAGES: gl.constexpr):
    """The loader warp: every step of every tile of this program, in the math warps' order, into the ring."""
    c = 0
    for j in range(my_count):
        e, n0, k0, lo, hi = _tile(pid + j * nprog, tiles_per_e, num_kb, offsets_ptr)
        # the tile's second column half; where it lies wholly past K (K % 256 in (0, 128]) the first half is
        # loaded again in its place: its product lands in columns >= K, which the TMA store clips
        k1 = gl.where(k0 + _HK < K, k0 + _HK, k0)
        for r in range(lo, hi, _BM):
            st = c % STAGES
            mbarrier.wait(empty.index(st), ((c // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1 at once
            bar = ready.index(st)
            mbarrier.expect(bar, dy_desc.block_type.nbytes + 2 * x_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(dy_desc, [r, n0], bar, dy_bufs.index(st))
            tma.async_copy_global_to_shared(x_desc, [r, k0], bar, x_bufs.index(2 * st))
            tma.async_copy_global_to_shared(x_desc, [r, k1], bar, x_bufs.index(2 * st + 1))
            c += 1


_ZROWS = gl.constexpr(16)  # rows of one zeroing slice (one wgmma K step; a multiple of the 8-row swizzle period)


@gluon.jit
def _zero_rows(buf, first, valid, layout: gl.constexpr):
    """Rows first + i >= valid of a [16, 128] slice of a stage set to zero (a read-modify-write)."""
    rows = first + gl.arange(0, _ZROWS, layout=gl.SliceLayout(1, layout))
    v = buf.load(layout)
    buf.store(gl.where((rows < valid)[:, None], v, gl.zeros_like(v)))


@gluon.jit
def _zero_foreign_rows(dy_s, x0_s, x1_s, valid, num_warps: gl.constexpr):
    """Rows >= valid of a stage (the next expert's rows, or TMA's zero fill past M) set to zero in shared memory,
    in dY and in both X halves, so that they add exactly nothing (not 0 x inf = nan where the next expert's
    values are not finite); only the 16-row slices that hold such rows are rewritten. Visible to the wgmmas that
    read the stage next (and ordered before the TMA load that refills it)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])  # [16, 128], 8 a thread
    for i in gl.static_range(_BM // _ZROWS):
        if (i + 1) * _ZROWS > valid:
            _zero_rows(dy_s.slice(i * _ZROWS, _ZROWS), i * _ZROWS, valid, layout)
            _zero_rows(x0_s.slice(i * _ZROWS, _ZROWS), i * _ZROWS, valid, layout)
            _zero_rows(x1_s.slice(i * _ZROWS, _ZROWS), i * _ZROWS, valid, layout)
    fence_async_shared()  # generic-proxy writes -> the async proxy (wgmma now, the next TMA load later)
    _sync()


@gluon.jit
def _store_half(acc, buf, out_desc, row, col, pred):
    """One [128, 128] column half of the tile, in the output dtype, into shared memory and out by a TMA store
    (columns past K clipped by TMA; ``pred`` false: a half wholly past K, not stored)."""
    buf.store(acc.to(out_desc.dtype))
    fence_async_shared()  # generic-proxy writes -> the TMA store
    _sync()  # every warp's part written before the one thread that issues the store
    if pred:
        tma.async_copy_shared_to_global(out_desc, [row, col], buf)


@gluon.jit
def _math(dy_bufs, x_bufs, ready, empty, c_smem, out_desc, offsets_ptr, pid, nprog, my_count, num_tiles,
          tiles_per_e, num_kb, N, K, STAGES: gl.constexpr, EPI_BUFS: gl.constexpr, num_warps: gl.constexpr):
    """The math warps (two warpgroups): products of each stage into two [128, 128] fp32 accumulators, stages handed
    back as their products finish, then the tile written through shared memory and TMA."""
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, _HK, 16])
    c = 0
    e, n0, k0, lo, hi = _tile(pid, tiles_per_e, num_kb, offsets_ptr)
    for j in range(my_count):
        # the next tile's coordinates, read now: their loads' latency hides behind this tile's products
        n_e, n_n0, n_k0, n_lo, n_hi = _tile(gl.minimum(pid + (j + 1) * nprog, num_tiles - 1), tiles_per_e, num_kb,
                                            offsets_ptr)
        acc0 = gl.zeros([_BN, _HK], gl.float32, layout=mma_layout)
        acc1 = gl.zeros([_BN, _HK], gl.float32, layout=mma_layout)
        for r in range(lo, hi, _BM):
            st = c % STAGES
            mbarrier.wait(ready.index(st), (c // STAGES) & 1)
            dy_s = dy_bufs.index(st)
            x0_s = x_bufs.index(2 * st)
            x1_s = x_bufs.index(2 * st + 1)
            if r + _BM > hi:  # the expert's last step holds rows that are not its own
                _zero_foreign_rows(dy_s, x0_s, x1_s, hi - r, num_warps)
            a = dy_s.permute((1, 0))  # [BLOCK_N, 64], N-major: dY^T
            acc0 = warpgroup_mma(a, x0_s, acc0, is_async=True)
            acc1 = warpgroup_mma(a, x1_s, acc1, is_async=True)
            acc0, acc1 = warpgroup_mma_wait(2, deps=(acc0, acc1))  # the step before is done: its stage is free
            _sync()  # every warpgroup's wait, before the one thread that arrives
            mbarrier.arrive(empty.index((c + STAGES - 1) % STAGES), count=1, pred=r > lo)
            c += 1
        # epilogue: the first half is written while the last step's product of the second is still running
        row = e * N + n0
        acc0 = warpgroup_mma_wait(1, deps=(acc0,))
        tma.store_wait(0)  # the previous tile's stores have read the buffers
        _sync()
        _store_half(acc0, c_smem.index(0), out_desc, row, k0, True)
        acc1 = warpgroup_mma_wait(0, deps=(acc1,))
        _sync()
        mbarrier.arrive(empty.index((c + STAGES - 1) % STAGES), count=1, pred=hi > lo)
        if EPI_BUFS == 1:  # fp32: one buffer, read by the first half's store first
            tma.store_wait(0)
            _sync()
        _store_half(acc1, c_smem.index(EPI_BUFS - 1), out_desc, row, k0 + _HK, k0 + _HK < K)
        e, n0, k0, lo, hi = n_e, n_n0, n_k0, n_lo, n_hi
    tma.store_wait(0)


@gluon.jit
def _grouped_wgrad_wgmma_kernel(dy_desc, x_desc, out_desc, offsets_ptr, N, K, tiles_per_e, num_kb, num_tiles,
                                STAGES: gl.constexpr, EPI_BUFS: gl.constexpr, LOADER_REGS: gl.constexpr,
                                num_warps: gl.constexpr):
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    my_count = (num_tiles - pid + nprog - 1) // nprog

    dy_bufs = gl.allocate_shared_memory(dy_desc.dtype, [STAGES, _BM, _BN], dy_desc.layout)
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [2 * STAGES, _BM, _HK], x_desc.layout)
    c_smem = gl.allocate_shared_memory(out_desc.dtype, [EPI_BUFS, _BN, _HK], out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    fence_async_shared()  # the barriers' init, seen by the async proxy

    gl.warp_specialize([
        (_math, (dy_bufs, x_bufs, ready, empty, c_smem, out_desc, offsets_ptr, pid, nprog, my_count, num_tiles,
                 tiles_per_e, num_kb, N, K, STAGES, EPI_BUFS, num_warps)),
        (_loader, (dy_desc, x_desc, dy_bufs, x_bufs, ready, empty, offsets_ptr, pid, nprog, my_count, tiles_per_e,
                   num_kb, K, STAGES)),
    ], [1], [LOADER_REGS])

    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))


# ---------------------------------------------------------------------------------------------------------------
# launcher

_GL_DTYPES = {"torch.bfloat16": gl.bfloat16, "torch.float16": gl.float16, "torch.float32": gl.float32}


def _gl_dtype(dtype):
    return _GL_DTYPES[str(dtype)]


def maxnreg(num_warps: int = NUM_WARPS) -> int:
    """The kernel-wide register cap for num_warps math warps + the loader's warpgroup (a warpgroup is the unit of
    register allocation); the loader then gives all but LOADER_REGS of its share to the math warps."""
    return (65536 // (32 * (num_warps + 4))) // 8 * 8


def supports(dy, x, dw) -> str | None:
    """None when this kernel takes grouped_wgrad(dy, x, ...) -> dw (as given: contiguous dy [M, N] and x [M, K] of
    one 16-bit dtype, dw [E, N, K] bf16 / fp16 / fp32), else why not (the caller checks sm_90 and TMA alignment)."""
    import torch

    if dy.dtype not in (torch.bfloat16, torch.float16) or x.dtype != dy.dtype:
        return f"operands {dy.dtype} / {x.dtype} (bf16 or fp16, one dtype)"
    if dw.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"output dtype {dw.dtype}"
    M, N = dy.shape
    K = x.shape[1]
    if M == 0:
        return "no rows"
    if N % BLOCK_N:
        return f"N = {N} is no multiple of {BLOCK_N}"
    if (K * dw.element_size()) % 16 or (K * x.element_size()) % 16:
        return f"K = {K}: rows not 16-byte aligned"
    if not dw.is_contiguous() or dw.data_ptr() % 16:
        return "dw not contiguous / aligned"
    return None


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def epi_bufs_for(element_size: int, stages: int) -> int:
    """Epilogue buffers of [128, 128] output elements (64 KiB + 3 stages, or 32 KiB + 4 stages with a 16-bit
    output): two where they fit beside the stages (both halves' stores in flight), else one (the second half
    waits for the first half's store to have read it)."""
    return 2 if element_size == 2 and stages * 48 + 64 <= 227 - 3 else 1


def default_stages(rows: int, experts: int, K: int) -> int:
    """The stage ring without MOE_KERNELS_WGRAD_STAGES: 4 where an expert's reduction is long and its dW wide (mean
    rows per expert >= 512 and K >= 4096), else 3. On an H100 (`bench_wgrad.py`, three runs, 2026-12-07): dW13 of
    32 experts (512 rows each, K 7168) 2-14% faster at 4 stages (uniform 1.72 / 1.73 / 1.77 -> 1.69 / 1.65 / 1.53
    ms; skewed 2-4%); dW2 (K 2048) and 256 experts of 32 rows (the output writes dominate) 1-8% slower."""
    return 4 if K >= 4096 and rows >= 512 * max(experts, 1) else DEFAULT_STAGES


def launch(dy, x, offsets, dw, *, stages: int | None = None, programs: int | None = None):
    """dw [E, N, K] = per-expert dY^T X (dy [M, N], x [M, K] contiguous rows, offsets int32 [E + 1] on the device).
    ``programs``: the persistent grid (default: one per SM, at most one per tile). ``stages``: 3 or 4 (default:
    env MOE_KERNELS_WGRAD_STAGES, else ``default_stages``); with 4 a 16-bit output keeps one epilogue buffer, an
    fp32 output fits 3 stages only (4 asked: 3)."""
    import os

    import torch

    M, N = dy.shape
    K = x.shape[1]
    E = dw.shape[0]
    if stages is None:
        env = os.environ.get("MOE_KERNELS_WGRAD_STAGES")
        stages = int(env) if env else default_stages(M, E, K)
    if dw.element_size() == 4:
        stages = min(stages, 3)
    offsets = offsets.to(torch.int32).contiguous()  # the kernel's row coordinates are int32 (TMA's)
    in_dt = _gl_dtype(dy.dtype)
    out_dt = _gl_dtype(dw.dtype)
    ab_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], in_dt)
    x_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HALF_K], in_dt)
    out_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HALF_K], out_dt)
    dy_desc = TensorDescriptor(dy, [M, N], [dy.stride(0), 1], [BLOCK_M, BLOCK_N], ab_layout)
    x_desc = TensorDescriptor(x, [M, K], [x.stride(0), 1], [BLOCK_M, HALF_K], x_layout)
    dw2 = dw.view(E * N, K)
    out_desc = TensorDescriptor(dw2, [E * N, K], [K, 1], [BLOCK_N, HALF_K], out_layout)
    num_kb = triton.cdiv(K, BLOCK_K)
    tiles_per_e = (N // BLOCK_N) * num_kb
    num_tiles = E * tiles_per_e
    if programs is None:
        programs = _sm_count(dy.device.index if dy.device.index is not None else 0)
    grid = max(1, min(num_tiles, programs))
    return _grouped_wgrad_wgmma_kernel[(grid,)](
        dy_desc, x_desc, out_desc, offsets, N, K, tiles_per_e, num_kb, num_tiles,
        STAGES=stages, EPI_BUFS=epi_bufs_for(dw.element_size(), stages), LOADER_REGS=LOADER_REGS,
        num_warps=NUM_WARPS, maxnreg=maxnreg(NUM_WARPS))


# ---------------------------------------------------------------------------------------------------------------
# offline compile (no GPU): registers, spills and ptxas's wgmma notes of the sm_90a build

def compile_sm90(in_dtype: str = "bf16", out_dtype: str = "bf16", stages: int = DEFAULT_STAGES) -> dict:
    """Compile the kernel for sm_90a without a GPU (this Triton, its ptxas): shared memory, registers, spill bytes,
    ptxas wgmma warnings (C7514 / C7512 / C7515...: wgmma serialised), and PTX counts of wgmma / transposed-A
    wgmma / TMA loads and stores / setmaxnreg (``_sm90_offline.compile_gluon_report``)."""
    from ._sm90_offline import compile_gluon_report  # noqa: PLC0415

    dt = {"bf16": gl.bfloat16, "fp16": gl.float16, "fp32": gl.float32}
    epi = epi_bufs_for(4 if out_dtype == "fp32" else 2, stages)
    const = dict(STAGES=stages, EPI_BUFS=epi, LOADER_REGS=LOADER_REGS, num_warps=NUM_WARPS)
    ab = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dt[in_dtype])
    xl = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HALF_K], dt[in_dtype])
    ol = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HALF_K], dt[out_dtype])
    sig = dict(dy_desc=f"tensordesc<{in_dtype}[{BLOCK_M},{BLOCK_N}],{ab!r}>",
               x_desc=f"tensordesc<{in_dtype}[{BLOCK_M},{HALF_K}],{xl!r}>",
               out_desc=f"tensordesc<{out_dtype}[{BLOCK_N},{HALF_K}],{ol!r}>", offsets_ptr="*i32")
    sig.update({n: "i32" for n in _grouped_wgrad_wgmma_kernel.arg_names if n not in sig and n not in const})
    report, wgmma = compile_gluon_report(_grouped_wgrad_wgmma_kernel, sig, const, NUM_WARPS, maxnreg(NUM_WARPS))
    # the last four immediates of a wgmma: scale-a, scale-b, transpose-a, transpose-b (1: MN-major)
    transposed = sum(w.rstrip(";").replace(" ", "").endswith("1,1,1,1") for w in wgmma)
    return dict(report, in_dtype=in_dtype, out_dtype=out_dtype, stages=stages, wgmma_transposed_ab=transposed)


if __name__ == "__main__":  # python -m moe_kernels.ops.grouped_wgrad_wgmma [in_dtype out_dtype stages]
    import sys

    args = sys.argv[1:]
    print(compile_sm90(*(args[:2]), *([int(args[2])] if len(args) > 2 else [])))
