"""MLA kernels: the fused latent down-projection and the absorbed decode over the latent cache.

Latent projection (``mla_latent_proj``), two kernels:
  1. ``_latent_gemm_kernel``: ONE GEMM y = x [W_DQ; W_DKV]^T over the concatenated down-projection weights
     [q_lora_rank + kv_lora_rank + rope, H] into a workspace in x's dtype (rounded as F.linear rounds it; fp32
     with split-K). bf16 (or fp16/fp32) weights, or e4m3 weights
     with 128x128 fp32 scales; then the activations are e4m3 with 1x128 scales, quantised by the quantisation
     kernel first or, with QUANT_A, inside the GEMM as each A tile is loaded (small T: one launch less).
     SPLIT_K > 1 (small T, where the grid would not fill the GPU) adds partial products with atomics.
  2. ``_latent_norm_rope_kernel``: one program per row reads y once: RMSNorm of the q latent (written in x's dtype
     for the q up-projection), RMSNorm of the kv latent and RoPE of the rope part, written as one row of the latent
     cache [kv_lora_rank + rope] (possibly straight into a cache slice).

Absorbed decode (``mla_decode``): one query per batch row attends over its latent cache rows [c_kv | k_rope]
with q_latent = q_nope W_UK (see moe_kernels/reference/mla_decode.py). The cache row is both key (all C + R
columns) and value (the C latent columns). Flash-decoding:
  * ``_mla_decode_kernel``: program (head block, split, batch row) runs an online softmax over its share of the
    row's keys for BLOCK_H heads at once, so each cache tile it loads serves BLOCK_H heads (the head blocks of one
    (split, row) are adjacent program ids: they run together and share the tile through L2). With one split it
    writes the normalised output; otherwise the partial output and its log-sum-exp (base 2). Config variants:
    LAZY (skip the accumulator rescale while no row max grows, by more than a threshold with LAZY=2) and
    V_BLOCKS=2 (a program scores all columns but accumulates half the value columns: a [BLOCK_H, C/2]
    accumulator, so 128 heads fit one program at the cost of computing QK^T twice).
  * ``_mla_decode_reduce_kernel``: merges the splits by their log-sum-exp.
  Per-row lengths come from ``cache_seqlens`` on the device; the grid depends on shapes only (CUDA graphs).
  A paged cache ([num_blocks, page, C + R] + block_table) is read through the block table.

Launch configs are data: ``configs/mla_<GPU>.json`` (written from bench/bench_mla.py's sweep),
looked up by kind and size, with the defaults below where no file or entry exists.
"""
from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path

import torch
import triton
import triton.language as tl

from .._checks import (FP8_DTYPE, check_int, check_multiple, check_same_device, check_tensor,
                       value_checks_enabled)
from ..reference import mla_decode as ref
from ._common import interpret_mode, use_triton
from .quant import quantize_fp8, quantize_groups

try:  # the Gluon sm_90 decode kernel (needs triton.experimental.gluon)
    from . import mla_decode_sm90
except Exception:  # noqa: BLE001 - an older Triton, or a Gluon API change: the Triton kernel runs
    mla_decode_sm90 = None

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

__all__ = ["mla_latent_proj", "mla_decode", "mla_decode_num_splits", "get_mla_config", "pack_latent_fp8",
           "fp8_row_bytes", "decode_kernel_name"]

fp8_row_bytes = ref.fp8_row_bytes

SCALE_BLOCK = 128
_SB = tl.constexpr(SCALE_BLOCK)
LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------------------------
# configs

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULTS = {
    # GEMM: 128x128 tiles; BLOCK_K = 128 on the FP8 path (one scale per K step)
    "latent_bf16": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_K=1, QUANT_A=0, USE_TMA=0,
                        num_warps=8, num_stages=4),
    "latent_fp8": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, SPLIT_K=1, QUANT_A=0, USE_TMA=0,
                       num_warps=8, num_stages=4),
    # decode, Triton kernel: 64 heads x 64 keys per step (measured best on H100); the [64, 512] fp32 accumulator
    # takes two warpgroups, the q tile and two stages of cache tiles 221 KB of shared memory. LAZY (0: rescale the
    # accumulator every tile, 1: only when a row's max grew, 2: only when it grew by more than 8 in log2 units)
    # and V_BLOCKS (1, or 2: each program accumulates half the value columns) are the variants of the sweep.
    # GLUON=1 (2: the seesaw schedule, two warpgroups alternating tiles; bf16 cache only): the Gluon sm_90 kernel
    # (mla_decode_sm90) wherever it applies (sm_90, bf16 queries, R = 64, C <= 512, page 64; else the Triton kernel
    # runs with the keys above, and says why once). Measured on one H200 (bench_mla, B 32 / 128, S 4096): Gluon
    # serial 126 / 366 us, the Triton kernel 159 / 553 us, FlashMLA 75 / 253 us; FP8 cache: Gluon 164 / 577 us,
    # Triton 277 / 1032 us. GLUON=2, the default: the seesaw schedule ($MOE_KERNELS_MLA_PIPE=0 / 1 forces serial /
    # seesaw): 1.04-1.24x the serial kernel on one H100 once it stopped spilling (results/mla_pipe-*.json, ninth
    # session), 0.78-0.89x FlashMLA in CUDA-graph replays (results/mla-NVIDIA_H100_80GB_HBM3.json). GLUON=3
    # ($MOE_KERNELS_MLA_PIPE=2): the serial kernel with lookahead (S of the next tile under this one's softmax):
    # passed its GPU tests, but 0.74-0.79x the serial kernel at B 128, S 4096 / 8192 on one H100.
    "decode": dict(BLOCK_H=64, BLOCK_N=64, LAZY=0, V_BLOCKS=1, num_warps=8, num_stages=2, GLUON=2),
    # FP8 cache, Triton kernel: the e4m3 tile is widened to bf16 in registers and staged in shared memory again
    "decode_fp8": dict(BLOCK_H=64, BLOCK_N=32, LAZY=0, V_BLOCKS=1, num_warps=8, num_stages=2, GLUON=1),
}
# few rows (decode-time projections): the grid of 128x128 tiles would leave most SMs idle
SMALL_M = {
    "latent_bf16": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, SPLIT_K=4, QUANT_A=0, USE_TMA=0,
                        num_warps=4, num_stages=4),
    "latent_fp8": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, SPLIT_K=4, QUANT_A=1, USE_TMA=0,
                       num_warps=4, num_stages=4),
}
INTERPRETER = {
    "latent_bf16": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, SPLIT_K=1, QUANT_A=0, USE_TMA=0,
                        num_warps=4, num_stages=1),
    "latent_fp8": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=2, SPLIT_K=1, QUANT_A=1, USE_TMA=0,
                       num_warps=4, num_stages=1),
    "decode": dict(BLOCK_H=16, BLOCK_N=16, LAZY=0, V_BLOCKS=1, num_warps=4, num_stages=1),
    "decode_fp8": dict(BLOCK_H=16, BLOCK_N=16, LAZY=0, V_BLOCKS=1, num_warps=4, num_stages=1),
}
_GLUON_WARNED: set = set()  # the reasons already given for not taking the Gluon kernel
# LAZY -> the growth of a row max (log2 units) that moves m_i and rescales the accumulator
LAZY_TAU = {1: 0.0, 2: 8.0}


@functools.lru_cache(maxsize=None)
def _device_facts(index: int) -> tuple[str, int]:
    p = torch.cuda.get_device_properties(index)
    return p.name, p.multi_processor_count


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def decode_kernel_name(device: torch.device | None = None) -> str:
    """Which kernel ``mla_decode`` runs on ``device`` (default: the current CUDA device, else the CPU)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda":
        return ("Triton kernel on the interpreter (TRITON_INTERPRET=1)" if interpret_mode()
                else "PyTorch reference (CPU)")
    hopper = mla_decode_sm90 is not None and torch.cuda.get_device_capability(device) == (9, 0)
    names = []
    for kind, what in (("decode", "bf16 cache"), ("decode_fp8", "FP8 cache")):
        gluon = hopper and int(get_mla_config(kind, 128, device).get("GLUON", 0))
        schedule = mla_decode_sm90.schedule(gluon - 1, kind == "decode_fp8") if gluon else ""
        schedule = {"seesaw": "seesaw schedule", "fp8 seesaw": "seesaw schedule, e4m3 products",
                    "lookahead": "serial schedule with lookahead"}.get(
            schedule, "serial schedule")
        names.append(f"{what}: " + (f"Gluon sm_90 kernel (mla_decode_sm90, {schedule})" if gluon
                                    else "Triton flash-decoding kernel (_mla_decode_kernel)"))
    return "; ".join(names)


def config_filename(device_name: str) -> str:
    return f"mla_{device_name.replace(' ', '_')}.json"


def get_mla_config(kind: str, size: int, device: torch.device) -> dict:
    """Launch config of ``kind`` ("latent_bf16", "latent_fp8", "decode", "decode_fp8") for ``size`` (rows T, or
    batch B)."""
    if device.type != "cuda":
        return dict(INTERPRETER[kind])
    base = SMALL_M[kind] if kind in SMALL_M and size <= 128 else DEFAULTS[kind]
    name, _ = _device_facts(device.index if device.index is not None else torch.cuda.current_device())
    table = _load_table(str(CONFIG_DIR / config_filename(name))).get(kind) or {}
    buckets = {int(k): v for k, v in table.items() if str(k).isdigit() and isinstance(v, dict)}
    if buckets:
        # nearest bucket on a log scale
        best = min(buckets, key=lambda m: abs(math.log2(max(m, 1) / max(size, 1))))
        if abs(math.log2(max(best, 1) / max(size, 1))) <= 2:
            return dict(base, **{k: int(v) for k, v in buckets[best].items()})
    return dict(base)


# ---------------------------------------------------------------------------------------------------------------
# kernels: latent projection


@triton.jit
def _latent_gemm_kernel(
    a_ptr, a_desc, a_scale_ptr, w_ptr, w_desc, w_scale_ptr, y_ptr,
    M, N, K, k_per_split,
    stride_am, stride_asm, stride_wn, stride_wsn, stride_ym,
    FP8: tl.constexpr, QUANT_A: tl.constexpr, SPLIT_K: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N] (+)= A[M, K] @ W[N, K]^T for one output tile and one K range (fp32)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row tiles sweep the column tiles together: the x tiles stay in L2
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    tile_m = first_m + (pid % in_group) % group_rows
    tile_n = (pid % in_group) // group_rows

    offs_m = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    a_ptrs = a_ptr + offs_m[:, None] * stride_am + (k_start + offs_k)[None, :]
    # B operand: a [BLOCK_K, BLOCK_N] view of W's K-contiguous rows (K-major, as FP8 wgmma wants it)
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + (k_start + offs_k)[:, None]
    if FP8:
        if not QUANT_A:
            as_ptrs = a_scale_ptr + offs_m * stride_asm
        if BLOCK_N > _SB:  # the tile spans several weight-scale blocks: one scale per column
            ws_ptrs = w_scale_ptr + (offs_n // _SB) * stride_wsn
        else:
            ws_ptr = w_scale_ptr + (tile_n * BLOCK_N // _SB) * stride_wsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if USE_TMA:
            a = a_desc.load([(tile_m * BLOCK_M).to(tl.int32), k0])
            w = w_desc.load([tile_n * BLOCK_N, k0]).T
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + offs_k) < k_end
            a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        if FP8:
            kb = k0 // BLOCK_K  # BLOCK_K == 128: one scale block per step
            if QUANT_A:  # 1x128 groups of the bf16 tile, bit-exact to the quantisation kernel
                qa, sa = quantize_groups(a.to(tl.float32))
                a = qa.to(w.dtype)
            else:
                sa = tl.load(as_ptrs + kb, mask=m_mask, other=0.0)
            if BLOCK_N > _SB:
                sw = tl.load(ws_ptrs + kb, mask=n_mask, other=0.0)[None, :]
            else:
                sw = tl.load(ws_ptr + kb)
            acc += tl.dot(a, w) * (sa[:, None] * sw)
        else:
            if UPCAST:  # Triton's CPU interpreter multiplies 16-bit float tiles wrongly: upcast there
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _latent_norm_rope_kernel(
    y_ptr, qw_ptr, kvw_ptr, cos_ptr, sin_ptr, cq_ptr, kv_ptr,
    eps, stride_ym, stride_cosm, stride_sinm, stride_cqm, stride_kvm,
    Q: tl.constexpr, C: tl.constexpr, R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
    HALF: tl.constexpr, INTERLEAVE: tl.constexpr,
):
    """One row of y = [q latent | kv latent | k rope] -> c_q = RMSNorm(q), kv row = [RMSNorm(c_kv) | RoPE(k_r)]."""
    row = tl.program_id(0).to(tl.int64)
    y_row = y_ptr + row * stride_ym
    if Q > 0:
        offs_q = tl.arange(0, BLOCK_Q)
        ss = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        for q0 in tl.static_range(0, Q, BLOCK_Q):
            v = tl.load(y_row + q0 + offs_q, mask=(q0 + offs_q) < Q, other=0.0).to(tl.float32)
            ss += v * v
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / Q + eps)
        for q0 in tl.static_range(0, Q, BLOCK_Q):  # second pass over the row: from L1/L2
            q_mask = (q0 + offs_q) < Q
            v = tl.load(y_row + q0 + offs_q, mask=q_mask, other=0.0).to(tl.float32)
            g = tl.load(qw_ptr + q0 + offs_q, mask=q_mask, other=0.0).to(tl.float32)
            tl.store(cq_ptr + row * stride_cqm + q0 + offs_q, (v * rstd * g).to(cq_ptr.dtype.element_ty), mask=q_mask)

    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    c = tl.load(y_row + Q + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    rstd_c = 1.0 / tl.sqrt(tl.sum(c * c, axis=0) / C + eps)
    g = tl.load(kvw_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    kv_row = kv_ptr + row * stride_kvm
    tl.store(kv_row + offs_c, (c * rstd_c * g).to(kv_ptr.dtype.element_ty), mask=c_mask)

    # RoPE pairs: interleaved (x0, x1), (x2, x3), ... or split-half; rotated halves written as [first | second]
    offs_i = tl.arange(0, HALF)
    i_mask = offs_i < R // 2
    if INTERLEAVE:
        x1 = tl.load(y_row + Q + C + 2 * offs_i, mask=i_mask, other=0.0).to(tl.float32)
        x2 = tl.load(y_row + Q + C + 2 * offs_i + 1, mask=i_mask, other=0.0).to(tl.float32)
    else:
        x1 = tl.load(y_row + Q + C + offs_i, mask=i_mask, other=0.0).to(tl.float32)
        x2 = tl.load(y_row + Q + C + R // 2 + offs_i, mask=i_mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + row * stride_cosm + offs_i, mask=i_mask, other=0.0)
    sin = tl.load(sin_ptr + row * stride_sinm + offs_i, mask=i_mask, other=0.0)
    tl.store(kv_row + C + offs_i, (x1 * cos - x2 * sin).to(kv_ptr.dtype.element_ty), mask=i_mask)
    tl.store(kv_row + C + R // 2 + offs_i, (x2 * cos + x1 * sin).to(kv_ptr.dtype.element_ty), mask=i_mask)


# ---------------------------------------------------------------------------------------------------------------
# kernels: absorbed decode


@triton.jit
def _mla_decode_kernel(
    q_ptr, qr_ptr, kc_ptr, kr_ptr, ks_ptr, seqlens_ptr, block_table_ptr, o_ptr, lse_ptr,
    num_rows, num_heads, s_q, num_splits, qk_scale,  # qk_scale = softmax_scale * log2(e): the softmax is base 2
    stride_qb, stride_qh, stride_qrb, stride_qrh, stride_kvb, stride_kvn, stride_btb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PAGED: tl.constexpr,
    PAGE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    LAZY: tl.constexpr, TAU: tl.constexpr, V_BLOCKS: tl.constexpr,
    FP8: tl.constexpr, KR_DIV: tl.constexpr, KS_DIV: tl.constexpr, MULTI_Q: tl.constexpr,
):
    """Query rows: the s_q x num_heads queries of batch row b (row r is token r // num_heads, which sees the
    row's keys 0 .. seqlen - s_q + r // num_heads). The cache is read through three pointers with one row offset
    ``rows`` (in kc's elements): kc (the C latent columns; e4m3 with FP8), kr = kr_ptr + rows // KR_DIV (the R rope
    columns) and, with FP8, the per-token scale ks_ptr + rows // KS_DIV (see reference.mla_decode: FP8 cache).
    LAZY: rescale the accumulator only when some row's running max grows by more than TAU (log2 units).
    V_BLOCKS = 2: the program scores all C + R key columns but accumulates only its half of the C value columns
    (half the accumulator's registers, so twice the heads per program)."""
    tl.static_assert(V_BLOCKS == 1 or V_BLOCKS == 2)
    BLOCK_V: tl.constexpr = BLOCK_C // V_BLOCKS
    # the V blocks of a head block are adjacent program ids, like the head blocks of one (split, row)
    pid_h = tl.program_id(0) // V_BLOCKS
    vb = tl.program_id(0) % V_BLOCKS
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = vb * BLOCK_V + tl.arange(0, BLOCK_V)  # this program's value columns (all C when V_BLOCKS = 1)
    offs_r = tl.arange(0, BLOCK_R)
    h_mask = offs_h < num_rows
    c_mask = offs_c < C
    r_mask = offs_r < R
    cdt = q_ptr.dtype.element_ty  # the dtype of the products (FP8: the cache tile is widened to it, exactly)
    if UPCAST:
        cdt = tl.float32

    q_rows = q_ptr + b * stride_qb + offs_h[:, None] * stride_qh
    q = tl.load(q_rows + offs_c[None, :], mask=h_mask[:, None] & c_mask[None, :], other=0.0)
    qr = tl.load(qr_ptr + b * stride_qrb + offs_h[:, None] * stride_qrh + offs_r[None, :],
                 mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    if V_BLOCKS == 2:  # the other half of the latent columns: key only
        offs_o = (1 - vb) * BLOCK_V + tl.arange(0, BLOCK_V)
        o_mask = offs_o < C
        qo = tl.load(q_rows + offs_o[None, :], mask=h_mask[:, None] & o_mask[None, :], other=0.0).to(cdt)
    q = q.to(cdt)
    qr = qr.to(cdt)

    # this split's keys: whole BLOCK_N tiles of the row's length
    seqlen = tl.load(seqlens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seqlen, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seqlen)
    if MULTI_Q:  # causal over the s_q new tokens: the keys each query row sees
        lim = seqlen - (s_q - 1 - offs_h // num_heads)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_V), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        if PAGED:
            blk = tl.load(block_table_ptr + b * stride_btb + offs_n // PAGE, mask=n_mask, other=0)
            rows = blk.to(tl.int64) * stride_kvb + (offs_n % PAGE) * stride_kvn
        else:
            rows = b * stride_kvb + offs_n.to(tl.int64) * stride_kvn
        # kc: key and value (the PV product reuses it), kr (and ko): key only
        kc = tl.load(kc_ptr + rows[:, None] + offs_c[None, :], mask=n_mask[:, None] & c_mask[None, :],
                     other=0.0).to(cdt)
        kr = tl.load(kr_ptr + (rows // KR_DIV)[:, None] + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :],
                     other=0.0).to(cdt)
        if V_BLOCKS == 2:
            ko = tl.load(kc_ptr + rows[:, None] + offs_o[None, :], mask=n_mask[:, None] & o_mask[None, :],
                         other=0.0).to(cdt)
        if IEEE:
            s = tl.dot(q, tl.trans(kc), input_precision="ieee")
            if V_BLOCKS == 2:
                s = tl.dot(qo, tl.trans(ko), s, input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kc))
            if V_BLOCKS == 2:
                s = tl.dot(qo, tl.trans(ko), s)
        if FP8:  # one scale per key: a column scale of the latent scores, and of the softmax weights below
            ks = tl.load(ks_ptr + rows // KS_DIV, mask=n_mask, other=0.0)
            s = s * ks[None, :]
        if IEEE:
            s = tl.dot(qr, tl.trans(kr), s, input_precision="ieee")
        else:
            s = tl.dot(qr, tl.trans(kr), s)
        if MULTI_Q:
            s = tl.where(offs_n[None, :] < lim[:, None], s * qk_scale, float("-inf"))
        else:
            s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
        # a row may see no key of a tile (MULTI_Q): its max stays -inf, and m_use keeps exp2 away from -inf - -inf
        m_tile = tl.max(s, axis=1)
        if LAZY:
            # m_i may lag the true running max by up to TAU: l_i and acc are both sums of 2^(s - m_i) with the
            # same m_i (rescaled together when it moves), so o = acc / l_i and lse = m_i + log2(l_i) stay exact;
            # no overflow, as every weight p = 2^(s - m_i) <= 2^TAU (TAU <= 8: p fits bf16 and l_i fp32 easily).
            # One block-wide test (a uniform branch): when no row grew by more than TAU the multiply is skipped.
            grow = tl.where(m_tile > m_i, m_tile - m_i, 0.0)  # +inf on a row's first key
            if tl.max(grow, axis=0) > TAU:
                m_new = tl.maximum(m_i, m_tile)
                alpha = tl.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
                l_i = l_i * alpha
                acc = acc * alpha[:, None]
                m_i = m_new
            p = tl.exp2(s - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
            l_i += tl.sum(p, axis=1)
        else:
            m_new = tl.maximum(m_i, m_tile)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            m_i = m_new
        if FP8:
            p = p * ks[None, :]
        if IEEE:
            acc = tl.dot(p, kc, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(cdt), kc, acc)

    # a split without keys (short row) leaves l_i = 0: output 0 with log-sum-exp -inf, ignored by the merge
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    o_ptrs = o_ptr + b * stride_ob + offs_h[:, None] * stride_oh + split * stride_os + offs_c[None, :]
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=h_mask[:, None] & c_mask[None, :])
    if SPLIT:  # the same in every V block: written by the first
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + offs_h * stride_lh + split, lse, mask=h_mask & (vb == 0))


@triton.jit
def _mla_decode_reduce_kernel(
    o_part_ptr, lse_ptr, o_ptr, num_heads, num_splits,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """o = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse): the softmax over all keys of the row."""
    pid_h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    h_mask = offs_h < num_heads
    mask = h_mask[:, None] & (offs_c < C)[None, :]
    lse_row = lse_ptr + b * stride_lb + offs_h * stride_lh
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(lse_row + s, mask=h_mask, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)  # a row without keys: every weight is 0 below
    den = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    part = o_part_ptr + b * stride_pb + offs_h[:, None] * stride_ph + offs_c[None, :]
    for s in range(num_splits):
        w = tl.exp2(tl.load(lse_row + s, mask=h_mask, other=float("-inf")) - m)
        den += w
        acc += w[:, None] * tl.load(part + s * stride_ps, mask=mask, other=0.0)
    o = acc / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(o_ptr + b * stride_ob + offs_h[:, None] * stride_oh + offs_c[None, :], o.to(o_ptr.dtype.element_ty),
             mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# launchers


def _tma_usable(*tensors: torch.Tensor) -> bool:
    if TensorDescriptor is None or interpret_mode():
        return False
    for t in tensors:
        if not t.is_cuda or torch.cuda.get_device_capability(t.device)[0] < 9:
            return False
        if t.data_ptr() % 16 or t.stride(-1) != 1 or (t.stride(-2) * t.element_size()) % 16:
            return False
    return True


def _row_chunk(Q: int) -> int:
    """Chunk of the q latent row per step: a power of two dividing Q when one >= 128 does (1536 -> 512)."""
    low = min(1024, Q & -Q) if Q else 1
    return low if low >= 128 else min(1024, triton.next_power_of_2(max(Q, 1)))


def _latent_proj_launch(x, w, w_scale, q_norm_weight, kv_norm_weight, cos, sin, Q, C, eps, interleave,
                        c_q, kv, cfg=None):
    """x [T, H], w [N, H] (contiguous) -> c_q [T, Q], kv [T, C + R] written in place (both unit column stride)."""
    T, K = x.shape
    N = w.shape[0]
    R = N - Q - C
    if T == 0:
        return
    fp8 = w_scale is not None
    kind = "latent_fp8" if fp8 else "latent_bf16"
    cfg = dict(cfg if cfg is not None else get_mla_config(kind, T, x.device))
    if x.dtype == torch.float32 and not fp8 and x.is_cuda:  # fp32 tiles are twice as large: fit shared memory
        cfg.update(BLOCK_K=min(cfg["BLOCK_K"], 32), num_stages=min(cfg["num_stages"], 2))
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    quant_a = bool(cfg.pop("QUANT_A")) and fp8
    use_tma = bool(cfg.pop("USE_TMA"))
    split_k = max(1, int(cfg.pop("SPLIT_K")))
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if fp8:
        if BK != SCALE_BLOCK:
            raise ValueError(f"FP8 configs need BLOCK_K=128, got {BK}")
        if BN < SCALE_BLOCK and SCALE_BLOCK % BN or BN > SCALE_BLOCK and BN % SCALE_BLOCK:
            raise ValueError(f"FP8 configs need BLOCK_N dividing 128 or a multiple of it, got {BN}")
        if quant_a:
            a, a_scale = x, None
        else:
            a, a_scale = quantize_fp8(x)
    else:
        a, a_scale = x, None
    # K split in whole BLOCK_K steps (whole scale blocks on the FP8 path)
    k_steps = triton.cdiv(K, BK)
    split_k = min(split_k, k_steps)
    k_per_split = triton.cdiv(k_steps, split_k) * BK
    split_k = triton.cdiv(K, k_per_split)
    # the GEMM output in x's dtype (as F.linear rounds it), fp32 for fp32 inputs and for split-K's atomic sums
    y_dtype = torch.float32 if split_k > 1 or x.dtype == torch.float32 else x.dtype
    y = (torch.zeros if split_k > 1 else torch.empty)(T, N, dtype=y_dtype, device=x.device)
    use_tma = use_tma and _tma_usable(a, w)
    if use_tma:
        a_desc = TensorDescriptor(a, [T, K], [a.stride(0), 1], [BM, BK])
        w_desc = TensorDescriptor(w, [N, K], [w.stride(0), 1], [BN, BK])
    else:
        a_desc, w_desc = a, w
    dummy = y
    grid = (triton.cdiv(T, BM) * triton.cdiv(N, BN), split_k)
    _latent_gemm_kernel[grid](
        a, a_desc, a_scale if a_scale is not None else dummy, w, w_desc, w_scale if fp8 else dummy, y,
        T, N, K, k_per_split,
        a.stride(0), a_scale.stride(0) if a_scale is not None else 0, w.stride(0),
        w_scale.stride(0) if fp8 else 0, y.stride(0),
        FP8=fp8, QUANT_A=quant_a, SPLIT_K=split_k, USE_TMA=use_tma, EVEN_K=K % k_per_split == 0 and K % BK == 0,
        IEEE=x.dtype == torch.float32 or interpret_mode(), UPCAST=interpret_mode() and not fp8,
        num_warps=num_warps, num_stages=num_stages, **cfg,
    )
    qw = q_norm_weight if Q else kv_norm_weight  # any tensor stands in for an absent pointer
    _latent_norm_rope_kernel[(T,)](
        y, qw, kv_norm_weight, cos, sin, c_q if Q else kv, kv,
        eps, y.stride(0), cos.stride(0), sin.stride(0), c_q.stride(0) if Q else 0, kv.stride(0),
        Q=Q, C=C, R=R, BLOCK_Q=_row_chunk(Q), BLOCK_C=triton.next_power_of_2(C),
        HALF=triton.next_power_of_2(max(R // 2, 1)), INTERLEAVE=interleave, num_warps=4,
    )


def mla_decode_num_splits(batch: int, num_heads: int, max_seqlen: int, block_h: int, device: torch.device,
                          v_blocks: int = 1) -> int:
    """Splits of the key range so that batch x head blocks x V blocks x splits programs fill the GPU in near-whole
    waves (one program per SM: its q tile and accumulator fill the SM); each split keeps >= 256 keys."""
    if device.type != "cuda":
        return min(4, max(1, triton.cdiv(max_seqlen, 64)))  # the interpreter: exercise the merge
    _, n_sm = _device_facts(device.index if device.index is not None else torch.cuda.current_device())
    return _wave_splits(max(1, batch * triton.cdiv(num_heads, block_h) * v_blocks), max_seqlen, n_sm)


@functools.lru_cache(maxsize=4096)
def _wave_splits(programs: int, max_seqlen: int, n_sm: int) -> int:
    """``mla_decode_num_splits``'s choice (cached: it runs on every eager decode call)."""
    most = max(1, min(32, max_seqlen // 256))
    # the waves the programs take, over the waves they would take with no rounding; partial outputs cost a bit
    cost = lambda s: triton.cdiv(programs * s, n_sm) * n_sm / (programs * s) + 0.02 * s  # noqa: E731
    return min(range(1, most + 1), key=cost)


def _cache_views(kv_cache: torch.Tensor, C: int, R: int):
    """(kc, kr, ks, KR_DIV, KS_DIV, row strides in kc's elements) of a bf16/fp16/fp32 cache [.., .., C + R] or an
    FP8 cache uint8 [.., .., fp8_row_bytes(C, R)] (see reference.mla_decode: kc e4m3 | kr bf16 | scale fp32)."""
    if kv_cache.dtype != torch.uint8:
        return kv_cache, kv_cache[..., C:], kv_cache, 1, 1, False
    kc = kv_cache[..., :C].view(FP8_DTYPE)
    kr = kv_cache[..., C : C + 2 * R].view(torch.bfloat16)
    ks = kv_cache[..., C + 2 * R : C + 2 * R + 4].view(torch.float32)
    return kc, kr, ks, 2, 4, True


def _decode_launch(q_latent, q_rope, kv_cache, cache_seqlens, block_table, softmax_scale, num_splits, out,
                   cfg=None):
    """q_latent [B, h, C] or [B, s_q, h, C] (q_rope alike, out alike): the queries' rows must merge to one
    [B, s_q * h] dimension (the op makes them so); kv_cache bf16/fp16/fp32 rows or the uint8 FP8 cache."""
    if q_latent.dim() == 3:
        q_latent, q_rope, out = q_latent.unsqueeze(1), q_rope.unsqueeze(1), out.unsqueeze(1)
    B, s_q, h, C = q_latent.shape
    R = q_rope.shape[3]
    rows_n = s_q * h
    if B == 0 or rows_n == 0:
        return
    q2, qr2, o2 = (t.reshape(B, rows_n, t.shape[3]) for t in (q_latent, q_rope, out))
    if o2.data_ptr() != out.data_ptr():
        raise ValueError("out must be contiguous over its token and head dimensions")
    kc, kr, ks, kr_div, ks_div, fp8 = _cache_views(kv_cache, C, R)
    cfg = dict(cfg if cfg is not None else get_mla_config("decode_fp8" if fp8 else "decode", B, q_latent.device))
    if q_latent.dtype == torch.float32 and q_latent.is_cuda:  # fp32 (tests): small tiles fit shared memory
        cfg.update(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    BH, BN = cfg["BLOCK_H"], cfg["BLOCK_N"]
    lazy, v_blocks = int(cfg.get("LAZY", 0)), int(cfg.get("V_BLOCKS", 1))  # absent: the plain kernel
    BLOCK_C = triton.next_power_of_2(C)
    if lazy not in (0, *LAZY_TAU):
        raise ValueError(f"decode configs need LAZY in {{0, {', '.join(map(str, LAZY_TAU))}}}, got {lazy}")
    if v_blocks not in (1, 2) or BLOCK_C // v_blocks < 16:
        raise ValueError(f"decode configs need V_BLOCKS 1 or 2 (and C / V_BLOCKS >= 16), got {v_blocks} for C={C}")
    paged = block_table is not None
    page = kv_cache.shape[1] if paged else 1
    max_len = block_table.shape[1] * page if paged else kv_cache.shape[1]
    gluon = bool(cfg.get("GLUON", 0)) and mla_decode_sm90 is not None
    if gluon:
        why = mla_decode_sm90.unsupported(q_latent, kv_cache, block_table)
        gluon = why is None
        if why is not None and q_latent.is_cuda and why not in _GLUON_WARNED:  # say once why the fast path is off
            _GLUON_WARNED.add(why)
            warnings.warn(f"mla_decode: the Gluon sm_90 kernel does not apply ({why}); the Triton kernel runs")
    if num_splits <= 0:  # the Gluon kernel: 64-row head blocks, all value columns
        num_splits = mla_decode_num_splits(B, rows_n, max_len, 64 if gluon else BH, q_latent.device,
                                           1 if gluon else v_blocks)
    if num_splits > 1:
        o_part = torch.empty(B, rows_n, num_splits, C, dtype=torch.float32, device=q_latent.device)
        lse = torch.empty(B, rows_n, num_splits, dtype=torch.float32, device=q_latent.device)
        o_stage, lse_strides = o_part, (lse.stride(0), lse.stride(1))
    else:
        o_stage, lse, lse_strides = o2.unsqueeze(2), o2, (0, 0)
    if gluon:
        mla_decode_sm90.launch(q2, qr2, kv_cache, cache_seqlens, block_table, softmax_scale * LOG2E, num_splits, h,
                               s_q, o_stage, lse, lse_strides, pipe=int(cfg["GLUON"]) - 1)
    else:
        _triton_decode(q2, qr2, kc, kr, ks, kr_div, ks_div, fp8, cache_seqlens, block_table, paged, page,
                       softmax_scale, num_splits, rows_n, h, s_q, o_stage, lse, lse_strides, C, R, BLOCK_C, BH, BN,
                       lazy, v_blocks, num_warps, num_stages)
    if num_splits > 1:
        BHR = 16
        _mla_decode_reduce_kernel[(triton.cdiv(rows_n, BHR), B)](
            o_part, lse, o2, rows_n, num_splits,
            o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
            o2.stride(0), o2.stride(1),
            C=C, BLOCK_C=BLOCK_C, BLOCK_H=BHR, num_warps=4,
        )


def _triton_decode(q2, qr2, kc, kr, ks, kr_div, ks_div, fp8, cache_seqlens, block_table, paged, page, softmax_scale,
                   num_splits, rows_n, h, s_q, o_stage, lse, lse_strides, C, R, BLOCK_C, BH, BN, lazy, v_blocks,
                   num_warps, num_stages):
    B = q2.shape[0]
    upcast = interpret_mode() and q2.dtype != torch.float32
    _mla_decode_kernel[(triton.cdiv(rows_n, BH) * v_blocks, num_splits, B)](
        q2, qr2, kc, kr, ks, cache_seqlens, block_table if paged else cache_seqlens, o_stage, lse,
        rows_n, h, s_q, num_splits, softmax_scale * LOG2E,
        q2.stride(0), q2.stride(1), qr2.stride(0), qr2.stride(1),
        kc.stride(0), kc.stride(1), block_table.stride(0) if paged else 0,
        o_stage.stride(0), o_stage.stride(1), o_stage.stride(2), *lse_strides,
        C=C, R=R, BLOCK_C=BLOCK_C, BLOCK_R=max(16, triton.next_power_of_2(R)), BLOCK_H=BH, BLOCK_N=BN,
        SPLIT=num_splits > 1, PAGED=paged, PAGE=page, UPCAST=upcast,
        IEEE=q2.dtype == torch.float32 or interpret_mode(), LAZY=lazy > 0, TAU=LAZY_TAU.get(lazy, 0.0),
        V_BLOCKS=v_blocks, FP8=fp8, KR_DIV=kr_div, KS_DIV=ks_div, MULTI_Q=s_q > 1,
        num_warps=num_warps, num_stages=num_stages,
    )


@triton.jit
def _pack_fp8_kernel(kv_ptr, qc_ptr, kr_ptr, ks_ptr, stride_kv, stride_out,
                     C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """One latent cache row [c_kv | k_rope] -> its FP8 row: c_kv as e4m3 with one scale, k_rope as bf16.
    stride_out: the packed row in bytes (qc's elements); kr and ks address it in 2- and 4-byte units."""
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c = tl.load(kv_ptr + row * stride_kv + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
    q, scale = quantize_groups(c[None, :])  # bit-exact to the reference's rounding (IEEE divisions)
    tl.store(qc_ptr + row * stride_out + offs_c[None, :], q.to(qc_ptr.dtype.element_ty), mask=(offs_c < C)[None, :])
    tl.store(ks_ptr + row * (stride_out // 4) + tl.arange(0, 1), scale)
    kr = tl.load(kv_ptr + row * stride_kv + C + offs_r, mask=offs_r < R, other=0.0)
    tl.store(kr_ptr + row * (stride_out // 2) + offs_r, kr.to(tl.bfloat16), mask=offs_r < R)


def pack_latent_fp8(kv: torch.Tensor, kv_lora_rank: int) -> torch.Tensor:
    """Latent cache rows kv [T, C + R] (bf16/fp16/fp32) -> the FP8 cache's rows, uint8 [T, fp8_row_bytes(C, R)]
    (layout: ``reference.mla_decode``; padding bytes zero). CPU tensors without the interpreter: the reference."""
    check_tensor("kv", kv, dtype=_FLOATS, ndim=2)
    C = kv_lora_rank
    R = kv.shape[1] - C
    check_int("kv_lora_rank", C, lo=1)
    if R < 1:
        raise ValueError(f"kv must have kv_lora_rank + rope columns (rope >= 1), got {kv.shape[1]} for C={C}")
    if not use_triton(kv):
        return ref.pack_latent_fp8(kv, C)
    T = kv.shape[0]
    out = torch.zeros(T, ref.fp8_row_bytes(C, R), dtype=torch.uint8, device=kv.device)
    if T:
        kv = kv if kv.stride(1) == 1 else kv.contiguous()
        qc, kr, ks, _, _, _ = _cache_views(out, C, R)
        _pack_fp8_kernel[(T,)](kv, qc, kr, ks, kv.stride(0), out.stride(0), C=C, R=R,
                               BLOCK_C=triton.next_power_of_2(C), BLOCK_R=triton.next_power_of_2(R), num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------------------------
# custom ops (CUDA / interpreter: Triton; CPU: the reference)


@torch.library.custom_op("moe_kernels::mla_latent_proj", mutates_args=())
def _mla_latent_proj_op(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None, q_norm_weight: torch.Tensor | None,
    kv_norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_lora_rank: int, kv_lora_rank: int,
    eps: float, interleave: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    T = x.shape[0]
    N = w.shape[0]
    out_dtype = x.dtype
    if not use_triton(x):
        c_q, kv = ref.mla_latent_proj(x, w, q_norm_weight, kv_norm_weight, cos, sin, q_lora_rank, kv_lora_rank,
                                      w_scale, eps, interleave)
        return c_q.to(out_dtype), kv.to(out_dtype)
    c_q = torch.empty(T, q_lora_rank, dtype=out_dtype, device=x.device)
    kv = torch.empty(T, N - q_lora_rank, dtype=out_dtype, device=x.device)
    # the norm kernel reads the norm weights at unit stride: strided views are copied first
    _latent_proj_launch(x.contiguous(), w.contiguous(), None if w_scale is None else w_scale.contiguous(),
                        None if q_norm_weight is None else q_norm_weight.contiguous(), kv_norm_weight.contiguous(),
                        cos, sin, q_lora_rank, kv_lora_rank, eps, interleave, c_q, kv)
    return c_q, kv


@_mla_latent_proj_op.register_fake
def _(x, w, w_scale, q_norm_weight, kv_norm_weight, cos, sin, q_lora_rank, kv_lora_rank, eps, interleave):
    T, N = x.shape[0], w.shape[0]
    return x.new_empty(T, q_lora_rank), x.new_empty(T, N - q_lora_rank)


@torch.library.custom_op("moe_kernels::mla_decode", mutates_args=())
def _mla_decode_op(
    q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None, softmax_scale: float, num_splits: int,
) -> torch.Tensor:
    """q_latent [B, h, C] or [B, s_q, h, C] (q_rope alike); the cache in q's dtype or the uint8 FP8 cache."""
    if not use_triton(q_latent):
        return ref.mla_decode(q_latent, q_rope, kv_cache, cache_seqlens, softmax_scale, block_table).to(
            q_latent.dtype)
    out = torch.empty(q_latent.shape, dtype=q_latent.dtype, device=q_latent.device)
    if q_latent.dim() == 4:  # the token and head dimensions are merged into one row index in the kernel
        q_latent = q_latent if q_latent.stride(1) == q_latent.shape[2] * q_latent.stride(2) else q_latent.contiguous()
        q_rope = q_rope if q_rope.stride(1) == q_rope.shape[2] * q_rope.stride(2) else q_rope.contiguous()
    # the kernel reads cache_seqlens[b] and block_table[b, j] at unit stride along their last dimension
    cache_seqlens = cache_seqlens.contiguous()
    block_table = None if block_table is None else block_table.contiguous()
    _decode_launch(q_latent, q_rope, kv_cache, cache_seqlens, block_table, softmax_scale, num_splits, out)
    return out


@_mla_decode_op.register_fake
def _(q_latent, q_rope, kv_cache, cache_seqlens, block_table, softmax_scale, num_splits):
    return torch.empty_like(q_latent, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------------------------
# public wrappers: validate on the host (no launch before that), then call the op

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def mla_latent_proj(
    x: torch.Tensor,
    w: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    kv_norm_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_lora_rank: int,
    kv_lora_rank: int,
    *,
    w_scale: torch.Tensor | None = None,
    eps: float = 1e-6,
    interleave: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA's down-projections as one GEMM, with both RMSNorms and the k RoPE fused after it.

    Args:
        x: [T, H] bf16/fp16/fp32 activations.
        w: [q_lora_rank + kv_lora_rank + rope, H]: ``q_a_proj.weight`` stacked on ``kv_a_proj_with_mqa.weight``,
            in x's dtype; or e4m3 with ``w_scale`` fp32 [ceil(N/128), H/128] (DeepSeek-V3's ``weight_scale_inv``),
            in which case x is quantised to e4m3 with 1x128 scales (H a multiple of 128).
        q_norm_weight: [q_lora_rank] (``q_a_layernorm.weight``), or None when q_lora_rank is 0.
        kv_norm_weight: [kv_lora_rank] (``kv_a_layernorm.weight``).
        cos, sin: fp32 [T, rope/2], the angles of each token's position (``reference.rope_cos_sin``).
        interleave: RoPE pairs (x0, x1), (x2, x3), ... (DeepSeek's checkpoints) or split halves.
    Returns:
        (c_q [T, q_lora_rank], kv [T, kv_lora_rank + rope]) in x's dtype: the normalised q latent, and the latent
        cache row [RMSNorm(c_kv) | RoPE(k_rope)].
    """
    check_tensor("x", x, dtype=_FLOATS, ndim=2)
    T, H = x.shape
    check_int("q_lora_rank", q_lora_rank, lo=0)
    check_int("kv_lora_rank", kv_lora_rank, lo=1)
    fp8 = w_scale is not None
    check_tensor("w", w, dtype=FP8_DTYPE if fp8 else x.dtype, ndim=2, device=x.device)
    N = w.shape[0]
    R = N - q_lora_rank - kv_lora_rank
    if w.shape[1] != H:
        raise ValueError(f"w must have shape [N, {H}] to match x's hidden size, got {list(w.shape)}")
    if R < 2 or R % 2:
        raise ValueError(f"w must have q_lora_rank + kv_lora_rank + rope rows with an even rope >= 2, got "
                         f"{N} rows for q_lora_rank={q_lora_rank}, kv_lora_rank={kv_lora_rank}")
    if fp8:
        check_multiple("x.shape[1] (hidden size, FP8 path)", H, SCALE_BLOCK)
        check_tensor("w_scale", w_scale, dtype=torch.float32, shape=(-(-N // SCALE_BLOCK), H // SCALE_BLOCK),
                     device=x.device)
    if q_lora_rank:
        check_tensor("q_norm_weight", q_norm_weight, dtype=_FLOATS, shape=(q_lora_rank,), device=x.device)
    elif q_norm_weight is not None:
        raise ValueError("q_norm_weight must be None when q_lora_rank is 0")
    check_tensor("kv_norm_weight", kv_norm_weight, dtype=_FLOATS, shape=(kv_lora_rank,), device=x.device)
    check_tensor("cos", cos, dtype=torch.float32, shape=(T, R // 2), device=x.device)
    check_tensor("sin", sin, dtype=torch.float32, shape=(T, R // 2), device=x.device)
    if (T > 1 and R > 2) and (cos.stride(1) != 1 or sin.stride(1) != 1):
        raise ValueError("cos and sin must have unit stride along their last dimension")
    return _mla_latent_proj_op(x, w, w_scale, q_norm_weight, kv_norm_weight, cos, sin, q_lora_rank, kv_lora_rank,
                               float(eps), bool(interleave))


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    *,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode over the latent cache -> o_latent [B, h, C] (or [B, s_q, h, C]) in q's dtype.

    Multiply the result by W_UV (``reference.mla_decode.split_kv_b``) to get the per-head outputs.

    Args:
        q_latent: [B, h, C] = q_nope @ W_UK per head, one new token per row; or [B, s_q, h, C]: s_q new tokens
            per row (speculative / MTP decoding), the last s_q keys of the row, causal among themselves (token t
            sees keys 0 .. cache_seqlens[b] - s_q + t). q_rope: [B, h, R] / [B, s_q, h, R], rotated. Same float
            dtype (bf16, fp16, fp32); unit last stride.
        kv_cache: [B, S_max, C + R] rows [c_kv | k_rope] in q's dtype; or the FP8 cache, uint8
            [B, S_max, fp8_row_bytes(C, R)] (``pack_latent_fp8``: e4m3 latent with one fp32 scale per token, bf16
            rope; C a multiple of 16); or, with ``block_table``, either one paged: [num_blocks, page, row].
        cache_seqlens: int32 [B], keys per row (<= S_max, or <= max_blocks * page); a query with no key gives zeros.
        block_table: int32 [B, max_blocks], the cache block of each row's logical block (paged cache only).
        num_splits: key-range splits (flash-decoding); None picks them from the GPU's SM count and the shapes only
            (no host sync: a call is CUDA-graph capturable; the value checks below are skipped while capturing).
    """
    check_tensor("q_latent", q_latent, dtype=_FLOATS)
    if q_latent.dim() not in (3, 4):
        raise ValueError(f"q_latent must be [B, h, C] or [B, s_q, h, C], got shape {list(q_latent.shape)}")
    *lead, C = q_latent.shape
    B, h = lead[0], lead[-1]
    check_tensor("q_rope", q_rope, dtype=q_latent.dtype, ndim=q_latent.dim(), device=q_latent.device)
    if list(q_rope.shape[:-1]) != lead:
        raise ValueError(f"q_rope must have shape {lead + ['R']} to match q_latent, got {list(q_rope.shape)}")
    if h < 1 or C < 1:
        raise ValueError(f"q_latent needs at least one head and one latent column, got shape {list(q_latent.shape)}")
    if q_latent.dim() == 4 and not 1 <= lead[1] <= 16:
        raise ValueError(f"q_latent must have 1 to 16 query tokens per row (dimension 1), got {lead[1]}")
    R = q_rope.shape[-1]
    fp8 = kv_cache.dtype == torch.uint8 if isinstance(kv_cache, torch.Tensor) else False
    check_tensor("kv_cache", kv_cache, dtype=(q_latent.dtype, torch.uint8), ndim=3, device=q_latent.device)
    width = ref.fp8_row_bytes(C, R) if fp8 else C + R
    if kv_cache.shape[2] != width:
        what = f"fp8_row_bytes(C={C}, R={R}) = {width} bytes (FP8 cache)" if fp8 else f"C + R = {width} columns"
        raise ValueError(f"kv_cache must have {what}, got shape {list(kv_cache.shape)}")
    if fp8 and (C % 16 or kv_cache.stride(1) % 16 or kv_cache.stride(0) % 16 or kv_cache.storage_offset() % 16):
        raise ValueError(f"the FP8 kv_cache needs C a multiple of 16 (got {C}) and 16-byte aligned rows "
                         f"(strides {kv_cache.stride()})")
    if kv_cache.stride(2) != 1:
        raise ValueError("kv_cache must have unit stride along its last dimension")
    if q_latent.stride(-1) != 1 or q_rope.stride(-1) != 1:
        raise ValueError("q_latent and q_rope must have unit stride along their last dimension")
    check_tensor("cache_seqlens", cache_seqlens, dtype=torch.int32, shape=(B,), device=q_latent.device)
    if block_table is not None:
        check_tensor("block_table", block_table, dtype=torch.int32, ndim=2, device=q_latent.device)
        if block_table.shape[0] != B:
            raise ValueError(f"block_table must have {B} rows (one per batch row), got {list(block_table.shape)}")
        capacity = block_table.shape[1] * kv_cache.shape[1]
    else:
        if kv_cache.shape[0] != B:
            raise ValueError(f"kv_cache must have {B} rows (one per batch row) without a block_table, got "
                             f"{list(kv_cache.shape)}")
        capacity = kv_cache.shape[1]
    check_same_device(q_latent=q_latent, kv_cache=kv_cache)
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise TypeError(f"softmax_scale must be a float, got {type(softmax_scale).__name__}")
    if num_splits is not None:
        check_int("num_splits", num_splits, lo=1, hi=256)
    if value_checks_enabled(cache_seqlens) and B:
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0 or hi > capacity:
            raise ValueError(f"cache_seqlens must lie in [0, {capacity}] (the cache's capacity), got [{lo}, {hi}]")
        if block_table is not None and hi:
            page = kv_cache.shape[1]
            blocks = torch.arange(block_table.shape[1], device=block_table.device)
            used = block_table[blocks[None, :] * page < cache_seqlens[:, None]]  # the entries the kernel reads
            if used.numel() and (int(used.min()) < 0 or int(used.max()) >= kv_cache.shape[0]):
                raise ValueError(f"block_table entries must lie in [0, {kv_cache.shape[0]}) (the cache's blocks)")
    return _mla_decode_op(q_latent, q_rope, kv_cache, cache_seqlens, block_table, float(softmax_scale),
                          int(num_splits or 0))
