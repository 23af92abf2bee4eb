"""Hopper forward grouped GEMM for bf16 / fp16, in Gluon: a persistent, warp-specialised wgmma kernel.

The contract of ``grouped_gemm._grouped_gemm_kernel`` with 16-bit operands: out[r, :] = A[r, :] @ W[e]^T for the
rows r of expert e (offsets[e] <= r < offsets[e + 1], int32 on the device), fp32 accumulation, out in bf16 / fp16
/ fp32; optional SwiGLU (W holds [gate; up] along its rows, output column j = silu(gate_j) * up_j, in fp32) and an
optional fp32 weight per row (applied last). Rows of no expert (past offsets[E]) are not written.

Why a kernel of its own: the Triton kernel reaches ~516 TFLOP/s on an H100 at Mixtral-like shapes (a program per
tile, its K loop's loads issued by the math warps, the epilogue exposed). This one keeps the tensor cores fed:

Tile: 128 rows x 256 rows of W per K step of 64, as two [128, 128] fp32 accumulators (128 registers a thread in
all): the W tile's two 128-row halves. Plain GEMM: the halves are output columns [c0, c0 + 128) and
[c0 + 128, c0 + 256). SWIGLU: the gate rows and the up rows of the same 128 output columns (the up half is I rows
of W further on), so the two accumulators line up elementwise and the tile writes 128 columns of
silu(gate) * up. The 256-row W tile read per step is what keeps the kernel's L2 traffic low enough at ~700
TFLOP/s (85 flops a byte of operands); A's 128 rows are read once per 256 W rows.

Schedule (persistent: about one program per SM; the tiles are (row tile, column tile) pairs over the *real* row
tiles, counted from ``offsets`` on the device, so no program meets an empty tile and no host sync is needed;
GROUP_M row tiles sweep the column tiles together so their W tiles are shared in L2; program p takes tiles p,
p + grid, p + 2 grid, ...):
  * the loader warp (``gl.warp_specialize`` worker, LOADER_REGS registers) walks the program's tiles and their K
    steps and TMA-loads each step's A [128, 64] and the two W halves [128, 64] (48 KiB) into a STAGES-deep ring
    (``ready`` / ``empty`` mbarriers per stage). It runs ahead into the next tile while the math warps finish and
    write the current one, so a tile starts with its first stages loaded. K past the end, rows past M and W rows
    past the tensor are TMA's zero fill; rows of the next expert are computed and never stored.
  * the math warps (two warpgroups of 64 rows, 8 warps) wait for a stage and issue two asynchronous wgmmas on it
    (m64n128k16 x 4 per warpgroup and half), then wait for the step before (``warpgroup_mma_wait(2)``) and hand
    its stage back to the loader. Each tile's first step starts the accumulators afresh (use_acc=False); the
    tile's coordinates (for the epilogue) are worked out while it runs.
  * epilogue (registers -> shared memory -> TMA store; the TMA store's box would overwrite the next expert's
    rows, so an expert's last, partial row tile is written by masked stores from the same shared buffer): the
    plain GEMM writes the first half while the tensor cores still run the last step's product of the second
    (``warpgroup_mma_wait(1)``); the stores run on while the next tile's products do, a buffer is reused only
    after ``tma.store_wait``. Columns past N: the TMA store clips them (a half wholly past N is not stored).

Shared memory: STAGES x 48 KiB + EPI_BUFS buffers of [128, 128] outputs. 16-bit outputs: 4 stages + 1 buffer
(224 KiB of the 227 KiB an sm_90 block may have; the second half waits for the first half's store to have read the
buffer) or 3 stages + 2 buffers; fp32 outputs: 3 stages + 1 buffer (208 KiB).

Passed its GPU tests on one H100 (tenth session; 1.07-1.28x the Triton kernel). Needs ``triton.experimental.gluon`` (Triton 3.6 and 3.8 compile it for sm_90a, see
``compile_sm90``) and sm_90; ``grouped_gemm`` runs it for bf16 / fp16 inputs unless MOE_KERNELS_BF16_GLUON=0, when
``supports`` holds, the Triton kernel otherwise.
"""
from __future__ import annotations

import functools
import os

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .grouped_gemm_wgmma import _expert_tiles, _group_order, _locate

__all__ = ["launch", "supports", "compile_sm90"]

FAILED: list[str] = []  # grouped_gemm's note of a launch of this kernel that raised (it then runs the Triton one)

BLOCK_M = 128  # rows of a tile (two warpgroups of 64)
HALF_N = 128  # W rows of one accumulator; a tile's W block is two halves
BLOCK_K = 64  # one K step: 128 bytes of a 16-bit row, the TMA box's swizzle width
NUM_WARPS = 8
GROUP_M = 8
LOADER_REGS = 40  # registers of the loader warp (the expert table, the tile decode, the ring position)
STAGE_BYTES = (BLOCK_M + 2 * HALF_N) * BLOCK_K * 2
SMEM_LIMIT = 227 * 1024  # what an sm_90 block may have
_BM = gl.constexpr(BLOCK_M)
_HN = gl.constexpr(HALF_N)
_BK = gl.constexpr(BLOCK_K)

# a CTA (partition) barrier: gl.barrier on Triton 3.8, gl.thread_barrier on 3.6
_sync = getattr(gl, "barrier", None) or gl.thread_barrier


@gluon.jit
def _tile_coords(t, num_m, num_n, e_idx, lo, hi, tiles, ends, OUT_N: gl.constexpr, GROUP_M: gl.constexpr):
    """Tile id -> (expert, first row, end row of the expert's rows, first output column)."""
    tile_m, tile_n = _group_order(t, num_m, num_n, GROUP_M)
    expert, row0, row_end = _locate(tile_m, e_idx, lo, hi, tiles, ends, _BM)
    return expert, row0, row_end, tile_n * OUT_N


@gluon.jit
def _loader(a_desc, w_desc, a_bufs, w_bufs, ready, empty, offsets_ptr, pid, nprog, my_count, num_m, num_n, num_k,
            N, E, w_rows, up_row, SWIGLU: gl.constexpr, GROUP_M: gl.constexpr, E_PAD: gl.constexpr,
            STAGES: gl.constexpr):
    """The loader warp: every K step of every tile of this program, in the math warps' order, into the ring."""
    OUT_N: gl.constexpr = _HN if SWIGLU else 2 * _HN
    e_idx, lo, hi, tiles, ends = _expert_tiles(E, offsets_ptr, _BM, E_PAD, 1)
    c = 0
    for j in range(my_count):
        expert, row0, row_end, col0 = _tile_coords(pid + j * nprog, num_m, num_n, e_idx, lo, hi, tiles, ends,
                                                   OUT_N, GROUP_M)
        w0 = expert * w_rows + col0
        if SWIGLU:
            w1 = w0 + up_row  # the up rows of the same output columns
        else:
            # the second half; where it lies wholly past N the first is loaded again in its place (never stored):
            # no box starts outside the tensor
            w1 = gl.where(col0 + _HN < N, w0 + _HN, w0)
        for kb in range(num_k):
            st = c % STAGES
            mbarrier.wait(empty.index(st), ((c // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1 at once
            bar = ready.index(st)
            mbarrier.expect(bar, a_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [row0, kb * _BK], bar, a_bufs.index(st))
            tma.async_copy_global_to_shared(w_desc, [w0, kb * _BK], bar, w_bufs.index(2 * st))
            tma.async_copy_global_to_shared(w_desc, [w1, kb * _BK], bar, w_bufs.index(2 * st + 1))
            c += 1


@gluon.jit
def _write(vals, buf, out_desc, out_ptr, row0, row_end, col0, N, stride_om, pred, num_warps: gl.constexpr):
    """One [128, 128] fp32 half of the tile, in the output dtype, into shared memory and out: by a TMA store where
    all 128 rows are the expert's (columns past N clipped; ``pred`` false: a half wholly past N, not stored), else
    by stores masked to the expert's rows and to N, read back from the same buffer in a row-major layout."""
    buf.store(vals.to(out_desc.dtype))
    fence_async_shared()  # generic-proxy writes -> the TMA store
    _sync()  # every warp's part written before the one thread that issues the store (or before the read-back)
    if row0 + _BM <= row_end:
        if pred:
            tma.async_copy_shared_to_global(out_desc, [row0, col0], buf)
    else:
        VEC: gl.constexpr = 128 // out_desc.dtype.primitive_bitwidth  # 16 bytes a thread
        layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 * VEC // _HN, _HN // VEC], [num_warps, 1], [1, 0])
        rows = row0 + gl.arange(0, _BM, layout=gl.SliceLayout(1, layout))
        cols = col0 + gl.arange(0, _HN, layout=gl.SliceLayout(0, layout))
        ptrs = out_ptr + rows.to(gl.int64)[:, None] * stride_om + cols[None, :]
        gl.store(ptrs, buf.load(layout), mask=(rows < row_end)[:, None] & (cols < N)[None, :])


@gluon.jit
def _math(a_bufs, w_bufs, ready, empty, c_smem, out_desc, out_ptr, offsets_ptr, row_weight_ptr, pid, nprog,
          my_count, num_m, num_n, num_k, N, E, stride_om, SWIGLU: gl.constexpr, ROW_WEIGHT: gl.constexpr,
          GROUP_M: gl.constexpr, E_PAD: gl.constexpr, STAGES: gl.constexpr, EPI_BUFS: gl.constexpr,
          num_warps: gl.constexpr):
    """The math warps (two warpgroups): each stage's two products into the two [128, 128] fp32 accumulators,
    stages handed back as their products finish, then the tile written (``_write``)."""
    OUT_N: gl.constexpr = _HN if SWIGLU else 2 * _HN
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, _HN, 16])
    e_idx, lo, hi, tiles, ends = _expert_tiles(E, offsets_ptr, _BM, E_PAD, num_warps)
    acc0 = gl.zeros([_BM, _HN], gl.float32, layout=mma_layout)
    acc1 = gl.zeros([_BM, _HN], gl.float32, layout=mma_layout)
    c = 0
    for j in range(my_count):
        # the tile's first step: fresh accumulators (use_acc=False)
        st = c % STAGES
        mbarrier.wait(ready.index(st), (c // STAGES) & 1)
        acc0 = warpgroup_mma(a_bufs.index(st), w_bufs.index(2 * st).permute((1, 0)), acc0, use_acc=False,
                             is_async=True)
        acc1 = warpgroup_mma(a_bufs.index(st), w_bufs.index(2 * st + 1).permute((1, 0)), acc1, use_acc=False,
                             is_async=True)
        acc0, acc1 = warpgroup_mma_wait(2, deps=(acc0, acc1))  # returns at once: only these two are in flight
        c += 1
        # the tile's coordinates and row weights, for the epilogue: read while the first products run
        expert, row0, row_end, col0 = _tile_coords(pid + j * nprog, num_m, num_n, e_idx, lo, hi, tiles, ends,
                                                   OUT_N, GROUP_M)
        if ROW_WEIGHT:
            rows = row0 + gl.arange(0, _BM, layout=gl.SliceLayout(1, mma_layout))
            rw = gl.load(row_weight_ptr + rows, mask=rows < row_end, other=0.0).to(gl.float32)[:, None]
        for kb in range(1, num_k):
            st = c % STAGES
            mbarrier.wait(ready.index(st), (c // STAGES) & 1)
            acc0 = warpgroup_mma(a_bufs.index(st), w_bufs.index(2 * st).permute((1, 0)), acc0, is_async=True)
            acc1 = warpgroup_mma(a_bufs.index(st), w_bufs.index(2 * st + 1).permute((1, 0)), acc1, is_async=True)
            acc0, acc1 = warpgroup_mma_wait(2, deps=(acc0, acc1))  # the step before is done: its stage is free
            _sync()  # every warpgroup's wait, before the one thread that arrives
            mbarrier.arrive(empty.index((c + STAGES - 1) % STAGES), count=1)
            c += 1
        last = empty.index((c + STAGES - 1) % STAGES)  # the tile's last stage
        if SWIGLU:
            acc0, acc1 = warpgroup_mma_wait(0, deps=(acc0, acc1))
            _sync()
            mbarrier.arrive(last, count=1)
            h = acc0 / (1.0 + gl.exp(-acc0)) * acc1  # silu(gate) * up, in fp32
            if ROW_WEIGHT:
                h = h * rw
            tma.store_wait(0)  # the previous tile's store has read the buffer
            _sync()
            _write(h, c_smem.index(0), out_desc, out_ptr, row0, row_end, col0, N, stride_om, True, num_warps)
        else:
            # the first half is written while the last step's product of the second is still running
            acc0 = warpgroup_mma_wait(1, deps=(acc0,))
            v0 = acc0
            if ROW_WEIGHT:
                v0 = v0 * rw
            tma.store_wait(0)  # the previous tile's stores have read the buffers
            _sync()
            _write(v0, c_smem.index(0), out_desc, out_ptr, row0, row_end, col0, N, stride_om, True, num_warps)
            acc1 = warpgroup_mma_wait(0, deps=(acc1,))
            _sync()
            mbarrier.arrive(last, count=1)
            v1 = acc1
            if ROW_WEIGHT:
                v1 = v1 * rw
            if EPI_BUFS == 1:  # one buffer: the first half's store reads it first
                tma.store_wait(0)
                _sync()
            _write(v1, c_smem.index(EPI_BUFS - 1), out_desc, out_ptr, row0, row_end, col0 + _HN, N, stride_om,
                   col0 + _HN < N, num_warps)
    tma.store_wait(0)


@gluon.jit
def _grouped_gemm_bf16_wgmma_kernel(a_desc, w_desc, out_desc, out_ptr, offsets_ptr, row_weight_ptr, N, E, w_rows,
                                    up_row, num_k, stride_om, SWIGLU: gl.constexpr, ROW_WEIGHT: gl.constexpr,
                                    GROUP_M: gl.constexpr, E_PAD: gl.constexpr, STAGES: gl.constexpr,
                                    EPI_BUFS: gl.constexpr, LOADER_REGS: gl.constexpr, num_warps: gl.constexpr):
    OUT_N: gl.constexpr = _HN if SWIGLU else 2 * _HN
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    tiles = _expert_tiles(E, offsets_ptr, _BM, E_PAD, num_warps)[3]
    num_m = gl.sum(tiles, axis=0)  # the real row tiles
    num_n = (N + OUT_N - 1) // OUT_N
    my_count = (num_m * num_n - pid + nprog - 1) // nprog

    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, _BM, _BK], a_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [2 * STAGES, _HN, _BK], w_desc.layout)
    c_smem = gl.allocate_shared_memory(out_desc.dtype, [EPI_BUFS, _BM, _HN], out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    fence_async_shared()  # the barriers' init, seen by the async proxy

    gl.warp_specialize([
        (_math, (a_bufs, w_bufs, ready, empty, c_smem, out_desc, out_ptr, offsets_ptr, row_weight_ptr, pid, nprog,
                 my_count, num_m, num_n, num_k, N, E, stride_om, SWIGLU, ROW_WEIGHT, GROUP_M, E_PAD, STAGES,
                 EPI_BUFS, num_warps)),
        (_loader, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, offsets_ptr, pid, nprog, my_count, num_m, num_n,
                   num_k, N, E, w_rows, up_row, SWIGLU, GROUP_M, E_PAD, STAGES)),
    ], [1], [LOADER_REGS])

    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))


# ---------------------------------------------------------------------------------------------------------------
# launcher

_GL_DTYPES = {"torch.bfloat16": gl.bfloat16, "torch.float16": gl.float16, "torch.float32": gl.float32}
_NAMES = {"bf16": gl.bfloat16, "fp16": gl.float16, "fp32": gl.float32}


def maxnreg(num_warps: int = NUM_WARPS) -> int:
    """The kernel-wide register cap for num_warps math warps + the loader's warpgroup (a warpgroup is the unit of
    register allocation); the loader then gives all but LOADER_REGS of its share to the math warps."""
    return (65536 // (32 * (num_warps + 4))) // 8 * 8


def plan(out_element_size: int, stages: int | None = None) -> tuple[int, int]:
    """(STAGES, EPI_BUFS) that fit in 227 KiB: 16-bit outputs 4 stages + 1 buffer by default (``stages`` 3: two
    buffers, both halves' stores in flight), fp32 outputs 3 stages + 1 buffer."""
    buf = BLOCK_M * HALF_N * out_element_size
    stages = stages or (4 if out_element_size == 2 else 3)
    while stages > 2 and stages * STAGE_BYTES + buf > SMEM_LIMIT - 2048:
        stages -= 1
    bufs = 2 if stages * STAGE_BYTES + 2 * buf <= SMEM_LIMIT - 2048 else 1
    return stages, bufs


def supports(a, w, out, *, swiglu: bool = False, row_weight=None) -> str | None:
    """None when this kernel computes out = grouped(a, w) as given, else why not: a [M, K] and w [E, N or 2I, K]
    of one 16-bit dtype with 16-byte aligned, unit-stride rows (w contiguous), out [M, N] bf16 / fp16 / fp32 with
    16-byte aligned unit-stride rows, row_weight fp32 [>= M] contiguous. The caller checks sm_90."""
    import torch

    if a.dtype not in (torch.bfloat16, torch.float16) or w.dtype != a.dtype:
        return f"operands {a.dtype} / {w.dtype} (bf16 or fp16, one dtype)"
    if out.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"output dtype {out.dtype}"
    if a.dim() != 2 or w.dim() != 3 or out.dim() != 2:
        return "a [M, K], w [E, N, K], out [M, N]"
    E, w_rows, K = w.shape
    if swiglu and w_rows % 2:
        return f"SwiGLU with an odd number of W rows ({w_rows})"
    N = w_rows // 2 if swiglu else w_rows
    if a.shape[1] != K or tuple(out.shape) != (a.shape[0], N):
        return f"shapes a {list(a.shape)}, w {list(w.shape)}, out {list(out.shape)}"
    if K == 0 or N == 0 or E == 0:
        return "an empty dimension"
    if E * w_rows >= 2**31 or a.shape[0] >= 2**31:
        return "more rows than int32 TMA coordinates reach"
    if not w.is_contiguous() or w.data_ptr() % 16 or (K * w.element_size()) % 16:
        return "w not contiguous with 16-byte aligned rows"
    if a.stride(1) != 1 or a.data_ptr() % 16 or (a.stride(0) * a.element_size()) % 16:
        return "a's rows not unit-stride and 16-byte aligned"
    if out.stride(1) != 1 or out.data_ptr() % 16 or (out.stride(0) * out.element_size()) % 16:
        return "out's rows not unit-stride and 16-byte aligned"
    if row_weight is not None and (row_weight.dtype != torch.float32 or not row_weight.is_contiguous()
                                   or row_weight.numel() < a.shape[0]):
        return "row_weight not a contiguous fp32 vector of M values"
    return None


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def launch(a, w, out, offsets, *, swiglu: bool = False, row_weight=None, cfg: dict | None = None):
    """out [M, N] = per-expert A_e @ W_e^T (a [M, K], w [E, N, K]; SWIGLU: w [E, 2I, K] = [gate; up] and out
    [M, I] = silu(A W_gate^T) * (A W_up^T)), times row_weight[r] (fp32) where given; offsets int32 [E + 1] on the
    device. ``supports`` must hold. ``cfg`` (all optional): STAGES (default env MOE_KERNELS_BF16_GLUON_STAGES, else
    ``plan``), GROUP_M (8), PROGRAMS (the persistent grid, default one per SM). Returns the compiled kernel (None
    when there is nothing to compute)."""
    import torch

    cfg = dict(cfg or {})
    M, K = a.shape
    E, w_rows, _ = w.shape
    N = out.shape[1]
    if M == 0 or E == 0:
        return None
    env = os.environ.get("MOE_KERNELS_BF16_GLUON_STAGES")
    stages, epi_bufs = plan(out.element_size(), cfg.get("STAGES") or (int(env) if env else None))
    offsets = offsets.to(torch.int32).contiguous()  # the kernel's row coordinates are int32 (TMA's)
    in_dt = _GL_DTYPES[str(a.dtype)]
    out_dt = _GL_DTYPES[str(out.dtype)]
    ab_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], in_dt)
    w_layout = gl.NVMMASharedLayout.get_default_for([HALF_N, BLOCK_K], in_dt)
    out_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HALF_N], out_dt)
    a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [BLOCK_M, BLOCK_K], ab_layout)
    w_desc = TensorDescriptor(w.view(E * w_rows, K), [E * w_rows, K], [K, 1], [HALF_N, BLOCK_K], w_layout)
    out_desc = TensorDescriptor(out, [M, N], [out.stride(0), 1], [BLOCK_M, HALF_N], out_layout)
    out_n = HALF_N if swiglu else 2 * HALF_N
    tiles_bound = (triton.cdiv(M, BLOCK_M) + E) * triton.cdiv(N, out_n)  # every expert may end in a partial tile
    programs = cfg.get("PROGRAMS") or _sm_count(a.device.index if a.device.index is not None else 0)
    grid = max(1, min(tiles_bound, programs))
    return _grouped_gemm_bf16_wgmma_kernel[(grid,)](
        a_desc, w_desc, out_desc, out, offsets, row_weight if row_weight is not None else offsets,
        N, E, w_rows, N if swiglu else 0, triton.cdiv(K, BLOCK_K), out.stride(0),
        SWIGLU=swiglu, ROW_WEIGHT=row_weight is not None, GROUP_M=cfg.get("GROUP_M", GROUP_M),
        E_PAD=max(32, triton.next_power_of_2(E)), STAGES=stages, EPI_BUFS=epi_bufs, LOADER_REGS=LOADER_REGS,
        num_warps=NUM_WARPS, maxnreg=maxnreg(NUM_WARPS))


# ---------------------------------------------------------------------------------------------------------------
# offline compile (no GPU): registers, spills and ptxas's wgmma notes of the sm_90a build

def compile_sm90(in_dtype: str = "bf16", out_dtype: str = "bf16", swiglu: bool = False, row_weight: bool = False,
                 stages: int | None = None, experts: int = 32) -> dict:
    """Compile the kernel for sm_90a without a GPU (this Triton, its ptxas): shared memory, registers, spill bytes,
    ptxas wgmma warnings (C7514 / C7512 / C7515...: wgmma serialised), PTX counts of wgmma / TMA loads and stores
    / setmaxnreg (``_sm90_offline.compile_gluon_report``); ``experts`` sets E_PAD (the expert table's lanes)."""
    from ._sm90_offline import compile_gluon_report  # noqa: PLC0415

    st, epi = plan(4 if out_dtype == "fp32" else 2, stages)
    const = dict(SWIGLU=bool(swiglu), ROW_WEIGHT=bool(row_weight), GROUP_M=GROUP_M,
                 E_PAD=max(32, triton.next_power_of_2(experts)), STAGES=st, EPI_BUFS=epi, LOADER_REGS=LOADER_REGS,
                 num_warps=NUM_WARPS)
    ab = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], _NAMES[in_dtype])
    wl = gl.NVMMASharedLayout.get_default_for([HALF_N, BLOCK_K], _NAMES[in_dtype])
    ol = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HALF_N], _NAMES[out_dtype])
    sig = dict(a_desc=f"tensordesc<{in_dtype}[{BLOCK_M},{BLOCK_K}],{ab!r}>",
               w_desc=f"tensordesc<{in_dtype}[{HALF_N},{BLOCK_K}],{wl!r}>",
               out_desc=f"tensordesc<{out_dtype}[{BLOCK_M},{HALF_N}],{ol!r}>", out_ptr=f"*{out_dtype}",
               offsets_ptr="*i32", row_weight_ptr="*fp32")
    sig.update({n: "i32" for n in _grouped_gemm_bf16_wgmma_kernel.arg_names if n not in sig and n not in const})
    report, _ = compile_gluon_report(_grouped_gemm_bf16_wgmma_kernel, sig, const, NUM_WARPS, maxnreg(NUM_WARPS))
    return dict(report, in_dtype=in_dtype, out_dtype=out_dtype, swiglu=bool(swiglu), row_weight=bool(row_weight),
                stages=st, epi_bufs=epi)


if __name__ == "__main__":  # python -m moe_kernels.ops.grouped_gemm_bf16_wgmma [in out swiglu row_weight stages E]
    import sys

    args = sys.argv[1:]
    kw = dict(zip(("in_dtype", "out_dtype"), args[:2]))
    for name, v in zip(("swiglu", "row_weight", "stages", "experts"), args[2:]):
        kw[name] = int(v)
    print(compile_sm90(**kw))
